"""Two study runners side by side vs one: the cost of sharing a machine's cores (issue 16, section 1).

Runs the demo study (or a part of it, ``--only``) three ways, each in a fresh study directory:

* ``one``: one runner alone;
* ``two_shared``: two runners started together on one study directory (the README's way to use two processes);
  they split the cells, so on enough cores the grid finishes about as fast as with one runner or faster;
* ``two_separate``: two runners on two directories, each doing the whole grid: twice the work, so on N cores at
  best ``max(1, 2 / N)`` times one runner's wall time (1.0 on two cores).

Every runner chooses its CPU threads itself (hybridlora.threads): the script removes $OMP_NUM_THREADS,
$MKL_NUM_THREADS and $HYBRIDLORA_THREADS from the runners' environment and gives them a private process registry,
so only they count each other. ``--threads N`` fixes the runners' threads instead (``--threads 2`` on two cores
reproduces the oversubscription the automatic choice avoids; expect it to be many times slower).

    python bench/bench_threads.py                    # the demo, about 3-6 min on 2 idle cores
    python bench/bench_threads.py --tiny             # two cells only: checks the script in well under a minute

Prints one line per mode and the ratios; ``--json PATH`` also writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_ONLY = "model=tiny-qwen*,placement=attention_only,domain=gsm8k"


def runner_env(registry: Path, threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HYBRIDLORA_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env["HYBRIDLORA_PROCESS_DIR"] = str(registry)
    if threads is not None:
        env["HYBRIDLORA_THREADS"] = str(threads)
    return env


def start_runner(study_dir: Path, only: str | None, env: dict[str, str], log: Path) -> subprocess.Popen:
    # not --quiet: the runner names its threads only with progress output on (the bars go to the log file)
    cmd = [sys.executable, "-m", "hybridlora.cli", "study", "demo", "--output", str(study_dir), "--no-report"]
    if only:
        cmd += ["--only", only]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def timed(runs: list[tuple[Path, Path]], only: str | None, env: dict[str, str]) -> dict:
    """Start the runners together; wall time until the last one exits, and each one's threads line."""
    start = time.perf_counter()
    procs = [start_runner(study, only, env, log) for study, log in runs]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    logs = [log.read_text() for _, log in runs]
    if any(codes):
        raise SystemExit(f"a runner failed (exit {codes}):\n" + "\n---\n".join(text[-2000:] for text in logs))
    chosen = [next((line for line in text.splitlines() if line.startswith("threads:")), "threads: ?") for text in logs]
    return {"wall_s": round(wall, 1), "threads": chosen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help=f"only the cells --only {TINY_ONLY} (a quick check)")
    ap.add_argument("--only", help="cells to run (study --only syntax); default: the whole demo grid")
    ap.add_argument("--threads", type=int, help="fix every runner's threads instead of the automatic choice")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    only = args.only or (TINY_ONLY if args.tiny else None)
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        root = Path(tmp)
        env = runner_env(root / "registry", args.threads)
        results = {}
        plans = {
            "one": [(root / "one", root / "one.log")],
            "two_shared": [(root / "shared", root / "shared_a.log"), (root / "shared", root / "shared_b.log")],
            "two_separate": [(root / "sep_a", root / "sep_a.log"), (root / "sep_b", root / "sep_b.log")],
        }
        for mode, runs in plans.items():
            results[mode] = timed(runs, only, env)
            print(f"{mode:13s} {results[mode]['wall_s']:7.1f} s   " + " | ".join(results[mode]["threads"]), flush=True)
    one = results["one"]["wall_s"]
    ratios = {"two_shared / one": round(results["two_shared"]["wall_s"] / one, 2),
              "two_separate / one": round(results["two_separate"]["wall_s"] / one, 2)}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"ratios: {json.dumps(ratios)}  (cores: {cores}; ideal on 2 cores: shared <= 1, separate about 1; "
          "issue 16 measured 11x for two shared runners before threads were chosen)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "only": only, "threads": args.threads,
                                               "results": results, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
