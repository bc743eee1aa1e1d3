"""Training rate of one probe run at MAD's settings, with the CUDA-graph step and without (issue 19).

Why: the probe suite at MAD's settings is 20,000 steps a run; whether it fits a GPU session depends on the time
of one step, which the setup (data generation, model build, capture, autotuning) hides in a single run's total.
Each (architecture, probe, step kind) is run twice at MAD's task sizes, for ``--epochs`` and for 1 epoch; the
difference over the difference in steps is the marginal step time, and the projection multiplies it out to a
whole run (200 epochs) and to the suite (every probe × architectures × seeds, one process).

    python bench/bench_probes.py --spec gpu-120m-gdn --archs sequential,parallel --out OUT
    python bench/bench_probes.py --tiny          # CPU check of the script (tiny settings), measures nothing useful

Prints one line per measurement and writes ``OUT/probe_rates.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hybridlora.lab.probes import PROBE_MODULES, run_probe  # noqa: E402
from hybridlora.lab.probes.base import Settings  # noqa: E402
from hybridlora.lab.probes.graphed import ENV as GRAPHS_ENV  # noqa: E402
from hybridlora.lab.spec import load_spec, variants  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="gpu-120m-gdn")
    p.add_argument("--archs", default="sequential,parallel")
    p.add_argument("--probes", default="in_context_recall", help="comma list, or all")
    p.add_argument("--graphs", default="on,off", help="step kinds to time: on (CUDA graph where it applies), off")
    p.add_argument("--epochs", type=int, default=4, help="the longer of the two runs (the shorter is 1 epoch)")
    p.add_argument("--seeds", type=int, default=2, help="seeds in the suite projection")
    p.add_argument("--tiny", action="store_true", help="tiny settings (CPU check)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    return p.parse_args(argv)


def timed_run(spec, probe: str, settings: Settings, graphs: str) -> tuple[float, dict]:
    before = os.environ.get(GRAPHS_ENV)
    os.environ[GRAPHS_ENV] = "1" if graphs == "on" else "0"
    try:
        start = time.perf_counter()
        record = run_probe(spec, probe, 0, settings)
        return time.perf_counter() - start, record
    finally:  # leave the switch as found (the bench may run inside another process, e.g. its test)
        if before is None:
            os.environ.pop(GRAPHS_ENV, None)
        else:
            os.environ[GRAPHS_ENV] = before


def measure(spec, probe: str, settings: Settings, graphs: str, epochs: int) -> dict:
    """Marginal seconds per step from a 1-epoch and an ``epochs``-epoch run (the same setup in both)."""
    timed_run(spec, probe, dataclasses.replace(settings, epochs=1), graphs)  # first shapes: compile, autotune
    short_s, short = timed_run(spec, probe, dataclasses.replace(settings, epochs=1), graphs)
    long_s, long = timed_run(spec, probe, dataclasses.replace(settings, epochs=epochs), graphs)
    per_step = (long_s - short_s) / max(long["steps"] - short["steps"], 1)
    # a difference under the runs' timing noise (tiny steps in a CUDA graph) is no step time: flagged, not clipped
    return {"arch": spec.name, "probe": probe, "graphs": graphs, "step": long["step"], "params": long["params"],
            "measured": per_step > 0,
            "short_s": round(short_s, 3), "long_s": round(long_s, 3), "steps": [short["steps"], long["steps"]],
            "ms_per_step": round(1000 * per_step, 3), "setup_s": round(short_s - per_step * short["steps"], 2),
            "run_min": round((short_s - per_step * short["steps"] + per_step * settings.steps) / 60, 2)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.epochs < 2:
        raise SystemExit("error: --epochs must be at least 2 (the step time is the difference from a 1-epoch run)")
    settings = Settings.tiny() if args.tiny else Settings.mad()
    probes = list(PROBE_MODULES) if args.probes == "all" else args.probes.split(",")
    spec = load_spec(args.spec if not args.tiny else "tiny-gdn")
    found = variants(spec)
    specs = {name: found[name] for name in args.archs.split(",")}
    rows = []
    for name, arch in specs.items():
        for probe in probes:
            for graphs in args.graphs.split(","):
                row = measure(arch, probe, settings, graphs, args.epochs)
                rows.append(row)
                if not row["measured"]:
                    print(f"warning: {name} {probe} graphs {graphs}: the longer run was not slower; the step is under "
                          "the timing noise, raise --epochs for a figure", flush=True)
                print(f"{name:>14} {probe:<18} graphs {graphs:<3} ({row['step']}): {row['ms_per_step']:.2f} ms/step, "
                      f"setup {row['setup_s']:.1f} s, a whole run ({settings.steps} steps) ≈ {row['run_min']:.2f} min",
                      flush=True)
    best = {}
    for row in (r for r in rows if r["measured"]):  # a step under the timing noise projects nothing
        key = (row["arch"], row["probe"])
        best[key] = min(best.get(key, float("inf")), row["run_min"])
    # per architecture: each probe at the measured probes' mean, the faster step kind
    suite_min = sum(best.values()) / len(best) * len(specs) * len(PROBE_MODULES) * args.seeds if best else None
    if suite_min is None:
        print("no suite projection: no step time rose above the timing noise (raise --epochs)")
    else:
        print(f"suite projection ({len(PROBE_MODULES)} probes × {len(specs)} archs × {args.seeds} seeds, one "
              f"process, the faster step kind, each probe at the measured probes' mean): {suite_min:.1f} min")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    projected = None if suite_min is None else round(suite_min, 1)
    (out / "probe_rates.json").write_text(json.dumps({"settings": settings.name, "rows": rows,
                                                      "suite_min_one_process": projected}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
