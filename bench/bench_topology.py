"""The topology experiment end to end, timed (issue 20): make a preset's lab models, run its study, project the rest.

0. ``--warm-up-steps N``: a few steps of every missing model's pretraining, all at once, so that a fresh GPU
   machine compiles and autotunes the kernels before the real runs, with no training competing for the GPU.
1. Each model entry of the preset whose directory is missing is made by its own ``made_by`` command (``hybridlora
   lab pretrain ...``, run as a child process); the wall time, tokens, steady training rate and final losses are
   recorded from the run's ``lab_run.json`` and ``train_log.jsonl``. The runs checkpoint every
   ``--pretrain-save-every`` steps; one still going at ``--deadline`` is stopped and resumed from its newest
   checkpoint by the next run of this script (its figures then add the stopped runs' seconds).
2. ``hybridlora study PRESET`` runs with ``--workers-per-gpu`` runner processes until ``--deadline`` seconds after
   the script started; then it is interrupted (Ctrl-C, as a user would) and the next run of this script continues
   the same study (models already made are kept). The study writes its report when the grid is complete.
3. ``OUT/bench_topology.json``: the per-model pretraining figures, the study's wall time, jobs done / total, the
   seconds per job, and the projection of the full experiment (the Mamba-2 pair added: two more pretrained models
   and their cells, at the measured rates); ``OUT/report/``: the study's report when it is complete;
   ``OUT/study/``: a copy of the study's store and config after every run (``hybridlora report OUT/study`` writes
   a report from the cells finished so far, marked partial).

Usage::

    python bench/bench_topology.py --out OUT                       # GPU: the topology-synthetic preset
    python bench/bench_topology.py --out OUT --deadline 520        # within one 10-minute device call; rerun continues
    python bench/bench_topology.py --out OUT --warm-up-steps 3 --pretrain-concurrently --deadline 500  # fresh GPU machine
    python bench/bench_topology.py --out OUT --tiny                # CPU check: demo-gdn models, few tokens, 2 cells
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
# The opt-in of docs/PERFORMANCE.md, inherited by the pretraining and study processes: without it fla's Gated
# DeltaNet backward stays refused on Hopper (fla #640) and every GDN model trains on the torch reference — the
# first GPU check of this script ran so, at ~22k tokens/s for a 30M model.
os.environ.setdefault("HYBRIDLORA_LIFT_FLA_HOPPER_GUARD", "1")

TINY_PRETRAIN = {"spec": "demo-gdn", "--tokens": "20000", "--micro-batch-size": "64", "--lr": "5e-3"}
TINY_ONLY = "placement=attention_only,seed=3407,domain=syn_first"


def pretrain_argv(made_by: str, tiny: bool, tokens: int | None = None, save_every: int | None = None,
                  fresh: bool = False) -> list[str]:
    """A made_by command as the child's argv (only `hybridlora lab pretrain ...` is run); ``tokens`` replaces its
    --tokens (a quick check of the pipeline; the figures then say so). ``save_every`` replaces its checkpoint
    interval (checkpoints do not change the model: resume is exact, tests/test_lab_pretrain.py), and a run that
    a deadline stopped is continued from its newest checkpoint."""
    words = shlex.split(made_by)
    if words[:3] != ["hybridlora", "lab", "pretrain"]:
        raise SystemExit(f"made_by is not a `hybridlora lab pretrain` command: {made_by}")
    if tokens:
        words[words.index("--tokens") + 1] = str(tokens)
    if save_every is not None:
        _set_flag(words, "--save-every", str(save_every))
    output = Path(words[words.index("--output") + 1])
    if not fresh and (output / "checkpoints").is_dir() and any((output / "checkpoints").iterdir()):
        words.append("--resume")
    if tiny:
        words[3] = TINY_PRETRAIN["spec"]
        for flag, value in TINY_PRETRAIN.items():
            if flag in words:
                words[words.index(flag) + 1] = value
        words.append("--no-progress")
    return [sys.executable, "-m", "hybridlora.cli", *words[1:]]


def pretrain_figures(run_dir: Path, seconds: float) -> dict:
    info = json.loads((run_dir / "lab_run.json").read_text())
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in log if x.get("event") == "step"]
    end = next((x for x in log if x.get("event") == "end"), {})
    steady = steps[len(steps) // 2:]  # the second half: past warm-up, graph capture and autotuning
    return {"seconds": round(seconds, 1), "parameters": info["match"]["achieved"],
            "tokens": info["train_tokens_per_epoch"] * info["epochs"], "steps": len(steps),
            "steady_tokens_per_s": round(sum(x["tokens_per_s"] for x in steady) / max(len(steady), 1)),
            "final_loss": end.get("final_loss"), "val_loss": end.get("val_loss"),
            # the end line's account: the start line's is written before any graph was captured ("0 captured")
            "kernels": log[0].get("kernels"), "cuda_graphs": end.get("cuda_graphs", log[0].get("cuda_graphs"))}


def _set_flag(words: list[str], flag: str, value: str) -> None:
    if flag in words:
        words[words.index(flag) + 1] = value
    else:
        words += [flag, value]


class PretrainingStopped(Exception):
    """The deadline came during pretraining: the runs still going were stopped, their checkpoints kept for the
    next run. ``made``: the figures of the runs that had finished by then (their models are kept and made)."""

    def __init__(self, message: str, made: dict | None = None):
        super().__init__(message)
        self.made = made or {}


def make_models(config, tiny: bool, say, out: Path, tokens: int | None = None, allow_slow: bool = False,
                concurrently: bool = False, save_every: int | None = None, stop_at: float | None = None,
                partial_s: dict[str, float] | None = None) -> dict:
    """Run each missing model's made_by; its whole output and train log are kept in ``out`` (a slow run must be
    explainable from what comes back). ``concurrently``: all at once, sharing the GPU (their rates are then each
    a share of the GPU, and the figures say so) -- a fresh machine's kernel autotuning is paid once in wall time.
    ``stop_at`` (a ``time.perf_counter()`` value): runs still going then are stopped (PretrainingStopped, which
    carries the figures of those that finished); with checkpoints (``save_every``) the next call resumes them.
    ``partial_s``: seconds each stopped run has spent so far, added here when a run is stopped and to its figures
    when its resumed run ends."""
    made, running, partial_s = {}, [], {} if partial_s is None else partial_s

    def record(item) -> None:
        _record_pretraining(item, made, out, say, allow_slow, concurrently, partial_s)

    def stop_message(left: list) -> str:
        return (f"{', '.join(r[0].name for r in left)}: pretraining stopped at --deadline; the checkpoints are kept "
                "and the next run resumes from them")

    try:
        for entry in config.models:
            model_dir = Path(entry.model)
            if model_dir.is_dir():
                say(f"{entry.name}: {model_dir} exists, kept")
                continue
            argv = pretrain_argv(entry.made_by, tiny, tokens, save_every)
            say(f"{entry.name}: {' '.join(argv[3:])}")
            log = open(out / f"pretrain_{entry.name}.log", "a" if "--resume" in argv else "w", encoding="utf-8")
            running.append((entry, model_dir, log, time.perf_counter(),
                            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))
            if not concurrently:
                _wait_for_runs(running, record, stop_at, stop_message)
        _wait_for_runs(running, record, stop_at, stop_message)
    except PretrainingStopped as stopped:
        stopped.made = made
        raise
    finally:  # one failed, too slow or past the deadline: the others are stopped, not left running on the GPU
        for entry, _, log, start, child in running:
            if child.poll() is None:
                child.terminate()
                child.wait()
                partial_s[entry.name] = partial_s.get(entry.name, 0.0) + time.perf_counter() - start
            log.close()
    return made


def _wait_for_runs(running: list, ended, stop_at: float | None, stopped_message) -> None:
    """Call ``ended(item)`` for each run (a tuple whose last element is its process) as it ends, whatever the
    order they end in, until none is left; or raise PretrainingStopped(``stopped_message(left)``) at ``stop_at``
    with the unfinished ones still in ``running``."""
    while running:
        for item in [r for r in running if r[-1].poll() is not None]:
            running.remove(item)
            ended(item)
        if running and stop_at is not None and time.perf_counter() >= stop_at:
            raise PretrainingStopped(stopped_message(running))
        if running:
            time.sleep(0.5)


def _record_pretraining(item, made: dict, out: Path, say, allow_slow: bool, concurrently: bool,
                        partial_s: dict[str, float]) -> None:
    entry, model_dir, log, start, child = item
    seconds = time.perf_counter() - start
    log.close()
    for name in ("train_log.jsonl", "lab_run.json"):
        if (model_dir.parent / name).is_file():
            shutil.copyfile(model_dir.parent / name, out / f"{entry.name}_{name}")
    if child.returncode:
        raise SystemExit(f"{entry.name}: pretraining failed (exit {child.returncode}); see "
                         f"{out / f'pretrain_{entry.name}.log'}")
    earlier = partial_s.pop(entry.name, 0.0)  # the runs a deadline stopped before this one resumed
    made[entry.name] = {**pretrain_figures(model_dir.parent, seconds + earlier),
                        "concurrent_with_other_pretraining": concurrently,
                        **({"seconds_in_runs_stopped_at_deadline": round(earlier, 1)} if earlier else {})}
    say(f"{entry.name}: {json.dumps(made[entry.name])}")
    slow = slow_kernels(made[entry.name]["kernels"] or "")
    if slow and not allow_slow:
        raise SystemExit(f"{entry.name} trained with fast kernels off ({', '.join(slow)}): the rest would run "
                         "at a fraction of the speed. Fix the setup (docs/PERFORMANCE.md) or pass --allow-slow.")


def warm_up(config, tiny: bool, say, out: Path, steps: int, stop_at: float | None = None) -> dict | None:
    """A few steps of every missing model's pretraining, all at once, before the real runs: a fresh GPU machine
    compiles and autotunes each model's kernels here, while no training competes for the GPU (autotuning beside
    running trainings took minutes a step and times its candidates on a shared GPU). The results stay in the
    kernel cache, which the real runs then read; nothing else is kept. Skipped when ``out/warm_up.json`` says
    it ran on this machine (a rerun after a deadline) or when no model is missing."""
    marker = out / "warm_up.json"
    missing = [e for e in config.models if not Path(e.model).is_dir()]
    if steps <= 0 or not missing or marker.is_file():
        return None
    children, started = [], time.perf_counter()
    for entry in missing:
        target = out / "warm-up" / entry.name
        shutil.rmtree(target, ignore_errors=True)
        words = shlex.split(entry.made_by)
        tokens = int(_flag(words, "--micro-batch-size", "8")) * int(_flag(words, "--seq-len", "512")) * (steps + 1)
        argv = pretrain_argv(entry.made_by, tiny, tokens=None if tiny else tokens, save_every=0, fresh=True)
        _set_flag(argv, "--output", str(target))
        argv += ["--stop-after-steps", str(steps)] + ([] if "--no-progress" in argv else ["--no-progress"])
        log = open(out / f"warm_up_{entry.name}.log", "w", encoding="utf-8")
        children.append((entry.name, log, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))
    say(f"warm-up: {steps} steps of {', '.join(n for n, _, _ in children)} at once (compiling and autotuning)")
    ended: dict[str, float] = {}

    def end(item) -> None:
        name, _, child = item
        ended[name] = round(time.perf_counter() - started, 1)
        if child.returncode:
            raise SystemExit(f"warm-up of {name} failed (exit {child.returncode}); see {out / f'warm_up_{name}.log'}")

    try:
        _wait_for_runs(list(children), end, stop_at, lambda left: "warm-up stopped at --deadline; the next run "
                                                                  "starts it again")
    finally:
        for _, log, child in children:
            if child.poll() is None:
                child.terminate()
                child.wait()
            log.close()
        shutil.rmtree(out / "warm-up", ignore_errors=True)
    figures = {"steps": steps, "wall_s": round(time.perf_counter() - started, 1), "seconds_per_model": ended}
    marker.write_text(json.dumps(figures, indent=1) + "\n")
    say(f"warm-up: {json.dumps(figures)}")
    return figures


def _flag(words: list[str], flag: str, default: str) -> str:
    return words[words.index(flag) + 1] if flag in words else default


def slow_kernels(kernels_line: str) -> list[str]:
    """The kernels a CUDA run's kernels line reports off (none on CPU, where the references are expected)."""
    if "(no CUDA)" in kernels_line or "mode=" not in kernels_line:
        return []
    listed = kernels_line.split("; notes:")[0].split(":", 1)[-1]
    return [part.split("=")[0].strip() for part in listed.split(",") if part.strip().endswith("=off")]


def store_counts(study_dir: Path) -> tuple[int, int, float]:
    """(complete jobs, all jobs, summed wall seconds of the complete ones) of a study directory's store."""
    from hybridlora.study.store import Store

    if not (study_dir / "study.db").is_file():
        return 0, 0, 0.0
    store = Store(study_dir, create=False)
    try:
        jobs = store.jobs()
    finally:
        store.close()
    complete = [j for j in jobs if j["status"] == "complete"]
    return len(complete), len(jobs), sum(j["wall_s"] or 0.0 for j in complete)


def run_study(preset: str, study_dir: Path, workers: int, only: str | None, seconds_left: float, log_path: Path,
              say) -> dict:
    argv = [sys.executable, "-m", "hybridlora.cli", "study", preset, "--quiet"]
    if workers > 1:
        argv += ["--workers-per-gpu", str(workers)]
    if only:
        argv += ["--only", only]
    say(f"study: {' '.join(argv[3:])} (stopped after {seconds_left:.0f} s if not done)")
    before, _, wall_before = store_counts(study_dir)
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc, stopped = child.wait(timeout=max(seconds_left, 1)), False
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGINT)  # what a user's Ctrl-C does: running jobs end, the store stays whole
            rc, stopped = child.wait(timeout=120), True
    seconds = time.perf_counter() - start
    done, total, wall = store_counts(study_dir)
    run_now = done - before
    return {"seconds": round(seconds, 1), "rc": rc, "stopped_at_deadline": stopped, "jobs_done": done,
            "jobs_total": total, "jobs_run_now": run_now, "workers_per_gpu": workers,
            "seconds_per_job": round(seconds / run_now, 2) if run_now else None,
            "job_wall_s_mean": round((wall - wall_before) / run_now, 2) if run_now else None}


def keep_study_results(study_dir: Path, out: Path) -> Path | None:
    """Copy the study's store, config and report (if written) into ``out/study``, finished cells or not: a device
    call returns only what is under its output folder, and the machine keeps nothing once released. The store is
    copied through SQLite's backup, so the copy is whole even if a runner still held it open."""
    import sqlite3
    from contextlib import closing

    source = study_dir / "study.db"
    if not source.is_file():
        return None
    kept = out / "study"
    kept.mkdir(parents=True, exist_ok=True)
    partial = kept / "study.db.partial"
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(partial)) as dst:
        src.backup(dst)
    partial.replace(kept / "study.db")
    if (study_dir / "study.yaml").is_file():
        shutil.copy2(study_dir / "study.yaml", kept / "study.yaml")
    if (study_dir / "report").is_dir():
        shutil.copytree(study_dir / "report", kept / "report", dirs_exist_ok=True)
    return kept


def projection(config, made: dict, study: dict, warm_up_s: float = 0.0) -> dict | None:
    """The full experiment (this preset plus a Mamba-2 pair: two more models with every placement) at the
    measured rates: pretraining at the mean measured time per model, cells at the measured seconds per job, plus
    the warm-up a fresh machine paid here (``warm_up_s``; the Mamba-2 pair's own autotuning is not in it)."""
    if not made or not study.get("seconds_per_job"):
        return None
    from hybridlora.study.grid import expand_grid

    recurrent = [m for m in config.models if m.placements is None]
    cells_per_model = len(config.placements) * len(config.domains) * len(config.seeds)
    extra_jobs = 2 * (cells_per_model + 1)  # two more models: their cells and their base evaluations
    seconds_made = [m["seconds"] for m in made.values()]
    # models pretrained at once share the wall time: charge each its share of the longest
    concurrent = any(m.get("concurrent_with_other_pretraining") for m in made.values())
    mean_pretrain = (max(seconds_made) if concurrent else sum(seconds_made)) / len(made)
    total_jobs = len(expand_grid(config)) + extra_jobs  # the whole grid, whatever --only ran
    seconds = warm_up_s + (len(config.models) + 2) * mean_pretrain + total_jobs * study["seconds_per_job"]
    return {"models": len(config.models) + 2, "recurrent_models": len(recurrent) + 2, "jobs": total_jobs,
            "warm_up_s": round(warm_up_s, 1),
            "pretrain_s_per_model": round(mean_pretrain, 1), "seconds_per_job": study["seconds_per_job"],
            "minutes": round(seconds / 60, 1),
            "assumes": "Mamba-2 models pretrain and fine-tune at the Gated DeltaNet models' measured rates"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="topology-synthetic")
    ap.add_argument("--workers-per-gpu", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=0, help="seconds after start at which the study is stopped "
                    "(0: no limit); a rerun continues it")
    ap.add_argument("--only", help="passed to study --only")
    ap.add_argument("--tiny", action="store_true", help="CPU check: demo-gdn models on few tokens, two cells")
    ap.add_argument("--allow-slow", action="store_true", help="go on when a model trained with a fast kernel off")
    ap.add_argument("--pretrain-concurrently", action="store_true", help="pretrain the missing models at once, "
                    "sharing the GPU (each figure then is a share of it)")
    ap.add_argument("--pretrain-save-every", type=int, default=100, help="checkpoint interval of the pretraining "
                    "runs (steps; replaces the made_by's): a run stopped at --deadline resumes from its newest "
                    "checkpoint (0: none, a stopped run starts over)")
    ap.add_argument("--warm-up-steps", type=int, default=0, help="before pretraining, run this many steps of every "
                    "missing model at once (a fresh GPU machine compiles and autotunes there, with no training "
                    "competing for the GPU; 3 is enough; 0: none)")
    ap.add_argument("--min-study-seconds", type=float, default=90, help="with --deadline: start the study only "
                    "when at least this many seconds are left (on the H200, 8 runners given 41 s ended no job: "
                    "starting them and their first jobs took longer)")
    ap.add_argument("--pretrain-tokens", type=int, help="replace the made_by commands' --tokens (a quick check: "
                    "the models then are not the preset's)")
    args = ap.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "bench_topology.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True)

    from hybridlora.study.config import load_study_config

    config = load_study_config(args.preset)
    only = args.only or (TINY_ONLY if args.tiny else None)
    workers = 1 if args.tiny else args.workers_per_gpu
    stop_at = started + args.deadline - 20 if args.deadline else None  # 20 s to stop the runs and write the figures
    partial_s = results.setdefault("pretraining_stopped_s", {})
    try:
        warmed = warm_up(config, args.tiny, say, args.out, args.warm_up_steps, stop_at)
        if warmed:
            results["warm_up"] = warmed
        made = make_models(config, args.tiny, say, args.out, args.pretrain_tokens, args.allow_slow,
                           args.pretrain_concurrently, args.pretrain_save_every, stop_at, partial_s)
    except PretrainingStopped as stopped:
        say(f"{stopped}; run this again to continue")
        results["pretrained"] = {**results.get("pretrained", {}), **stopped.made}
        results["runs"].append({"preset": args.preset, "pretraining_stopped_at_deadline": True,
                                "seconds": round(time.perf_counter() - started, 1)})
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    if made:  # kept now: a study stopped by a device call's limit must not lose the pretraining figures
        results["pretrained"] = {**results.get("pretrained", {}), **made}
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    left = (args.deadline - (time.perf_counter() - started)) if args.deadline else 10 ** 7
    if left < args.min_study_seconds:  # runners stopped before their first job ends only cost the call's time
        say(f"{max(left, 0):.0f} s left before --deadline (under --min-study-seconds {args.min_study_seconds:.0f}): "
            "the study is not started; run this again to continue")
        study = {"seconds": 0.0, "not_started": True}
    else:
        study = run_study(args.preset, config.output_dir(), workers, only, left, args.out / "study.log", say)
    say(f"study: {json.dumps(study)}")
    run = {"preset": args.preset, "tiny": args.tiny, "pretrain_tokens_override": args.pretrain_tokens,
           "pretrained": made, "study": study,
           "projection": projection(config, {**results.get("pretrained", {}), **made}, study,
                                     results.get("warm_up", {}).get("wall_s", 0.0))}
    results["pretrained"] = {**results.get("pretrained", {}), **made}
    results["runs"].append(run)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    kept = keep_study_results(config.output_dir(), args.out)
    if kept:
        say(f"the study's store and config copied to {kept} (finished cells, whether or not the grid is complete)")
    report = config.output_dir() / "report"
    if study.get("jobs_done") and study["jobs_done"] == study["jobs_total"] and report.is_dir():
        shutil.copytree(report, args.out / "report", dirs_exist_ok=True)
        say(f"report copied to {args.out / 'report'}")
    say(f"projection of the full experiment: {json.dumps(run['projection'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
