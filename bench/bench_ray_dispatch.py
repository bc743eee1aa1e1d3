"""What it costs to run a study's jobs through Ray instead of in this process, per job, on this machine.

Two measurements, both through ``hybridlora.study.runner.run_jobs`` (the one dispatch loop):

* **empty jobs** — N jobs of a kind that does nothing: the wall time per job is pure dispatch cost (local: a
  claim and a record in SQLite; ray: also a fresh worker process, its imports, shipping inputs and artifacts).
* **the demo grid** (or part of it, ``--only``) — the same cells on both backends; the per-job difference
  between wall time and the job's own compute, and what a fresh worker pays before its job starts (process
  start-up, ``import torch``), first job of a node vs later ones.

Ray runs on a cluster this script starts in-process (``ray.init``), with as many CPUs as ``--cpus`` and jobs
one at a time (each asks for every CPU), so that wall time minus job time is the overhead and not parallelism.

Usage::

    python bench/bench_ray_dispatch.py                   # 8 empty jobs + the whole demo grid (minutes)
    python bench/bench_ray_dispatch.py --only placement=all,domain=gsm8k --empty 6
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
# Ray workers import this file's empty job kind, and the checkout's code: both through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH.parent / "src"), str(BENCH),
                                                       os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away local cluster
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from hybridlora.study import Store, load_study_config  # noqa: E402
from hybridlora.study import jobs as jobs_module  # noqa: E402
from hybridlora.study.backends import Backend  # noqa: E402
from hybridlora.study.grid import Job  # noqa: E402
from hybridlora.study.runner import prepare, run_jobs  # noqa: E402


def empty_job(spec, study_dir, out, progress=True):
    """A job kind that computes nothing (its result has no metrics)."""
    return {"summaries": {}, "records": [], "wall_s": 0.0}


def _timed_run(study_dir: Path, jobs: list, backend: Backend) -> float:
    start = time.perf_counter()
    run = run_jobs(study_dir, jobs, progress=False, desc="bench", backend=backend)
    wall = time.perf_counter() - start
    assert not run.failed and run.counts["complete"] == len(jobs), (run.failed, run.counts)
    return wall


def bench_empty(root: Path, n: int, ray_backend: Backend) -> dict:
    jobs_module.JOB_KINDS["empty"] = "bench_ray_dispatch:empty_job"
    jobs_module.JOB_USES_GPU["empty"] = False
    out = {}
    for name, backend in (("local", Backend()), ("ray", ray_backend)):
        study = root / f"empty-{name}"
        jobs = [Job(f"empty-{i}", "empty", "m", "p", "d", i, {"kind": "empty", "n": i}) for i in range(n)]
        store = Store(study)
        store.register(jobs)
        store.close()
        wall = _timed_run(study, jobs, backend)
        out[name] = {"jobs": n, "wall_s": wall, "per_job_s": wall / n}
        if name == "ray":
            out[name]["worker"] = _worker_timings(study)
    return out


def _worker_timings(study: Path) -> list[dict]:
    """Per job, in the order the jobs started: what the fresh worker paid before and around its job."""
    infos = [(p.parent.name, json.loads(p.read_text())) for p in (study / "runs").glob("*/worker.json")]
    infos.sort(key=lambda i: i[1]["timing"]["task_start"])
    return [{"job": job, **{k: round(v, 3) for k, v in i["timing"].items()
                            if k not in ("task_start", "task_end") and v is not None}} for job, i in infos]


def bench_demo(root: Path, only: str | None, ray_backend: Backend, compile_scope: str = "off",
               ray_passes: int = 1) -> dict:
    """The demo cells on both backends; with ``ray_passes`` 2 the Ray run is repeated into a fresh study (same
    jobs, fresh processes, the node's kernel cache now warm): job time cold vs warm cache."""
    out = {}
    runs = [("local", Backend())] + [("ray" if n == 0 else f"ray_pass{n + 1}", ray_backend) for n in range(ray_passes)]
    for name, backend in runs:
        config = load_study_config("demo")
        config = config.model_copy(update={"output": str(root / f"demo-{name}"),
                                           "train": config.train.model_copy(update={"compile": compile_scope})})
        study_dir, jobs = prepare(config, only=only)
        store = Store(study_dir)
        store.register(jobs, config.model_dump(mode="json"))
        store.close()
        wall = _timed_run(study_dir, jobs, backend)
        store = Store(study_dir)
        rows = store.jobs([j.id for j in jobs])
        accuracy = {(r["id"], b): m.get("accuracy") for r in rows for b, m in store.metrics(r["id"]).items()}
        store.close()
        job_s = sum(r["wall_s"] for r in rows)
        out[name] = {"jobs": len(jobs), "wall_s": wall, "sum_job_s": job_s,
                     "overhead_per_job_s": (wall - job_s) / len(jobs), "accuracy": accuracy}
        if name.startswith("ray"):
            out[name]["worker"] = _worker_timings(study_dir)
    local = out["local"].pop("accuracy")
    out["same_accuracy"] = all(out[name].pop("accuracy") == local for name, _ in runs[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--empty", type=int, default=8, help="number of empty jobs (0: skip)")
    parser.add_argument("--only", default=None, help="demo cells to run (--only of `hybridlora study`)")
    parser.add_argument("--no-demo", action="store_true", help="only the empty jobs")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the in-process Ray cluster")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--compile", choices=("off", "lora", "layers"), default="off",
                        help="the demo's train.compile: with lora/layers the first Ray job of the node compiles "
                             "(Inductor) into the node's kernel cache, later jobs load it")
    parser.add_argument("--ray-passes", type=int, default=1,
                        help="run the demo cells this many times on Ray (2: kernel cache cold, then warm)")
    args = parser.parse_args()
    import ray

    cache = Path(tempfile.mkdtemp(prefix="bench-ray-kernels-"))  # cold: the first job compiles from nothing
    os.environ["HYBRIDLORA_KERNEL_CACHE"] = str(cache)

    # One job at a time: each asks for all the cluster's CPUs, so wall minus job time is overhead.
    # run_jobs uses this connection (and leaves it up) when ray is already initialised.
    ray.init(num_cpus=args.cpus, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    backend = Backend(name="ray", cpus_per_job=args.cpus, gpus_per_job=0)
    figures: dict = {"date": time.strftime("%Y-%m-%d"), "device": f"CPU ({os.cpu_count()} cores visible), "
                     f"Ray {ray.__version__}, cluster of {args.cpus} CPUs started in-process",
                     "command": "python " + " ".join(sys.argv),
                     "load_average_at_start": os.getloadavg()}  # the machine may be shared: say how busy
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        if args.empty:
            figures["empty_jobs"] = bench_empty(Path(tmp), args.empty, backend)
        if not args.no_demo:
            figures["demo"] = bench_demo(Path(tmp), args.only, backend, args.compile, args.ray_passes)
    shutil.rmtree(cache, ignore_errors=True)
    ray.shutdown()
    text = json.dumps(figures, indent=1, default=str)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
