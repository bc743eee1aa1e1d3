#!/bin/bash
. /work/main/.venv/bin/activate
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
CMD="hybridlora ablate qwen3.5-0.8b --tiny --plan all --limit 8 --data-dir /work/shared/data --quiet --format json"
for round in 1 2; do
for v in base new local; do
  rm -rf out-$v-$round
  if [ $v = base ]; then P=/tmp/base-wt/src; else P=/work/main/src; fi
  extra="--backend ray"; [ $v = local ] && extra=""
  echo "== $v round $round $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
  PYTHONPATH=$P /usr/bin/time -f "$v $round: %e s wall %U user %S sys" $CMD $extra --output out-$v-$round > $v-$round.jsonl 2> $v-$round.err
  tail -1 $v-$round.err
done
done
