"""The study runner: claim a job, run it, record it atomically; repeat until the grid is done; then report.

Several runners may work on one study directory at once (each claims different jobs through the database);
a runner that dies (``kill -9``, power cut) leaves its job claimed by a dead process, and the next runner
takes it over and redoes it — resuming training from its last checkpoint. Re-running the same command on a
finished study does nothing but rebuild the report.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..threads import current as current_threads
from .backends import LOCAL, Backend, run_on_backend
from .config import BUILTIN_DATA, StudyConfig
from .grid import Job, expand_grid, filter_jobs, parse_only
from .jobs import crash_point, execute_group, group_rule
from .store import HEARTBEAT_S, Store, make_owner, release_owner


@dataclass
class StudyRun:
    study_dir: Path
    jobs: list[Job]
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    report: Path | None = None
    report_skipped: bool = False


class _Heartbeat:
    """Refreshes the current claim from a background thread (its own connection), so a long job is never
    mistaken for an abandoned one."""

    def __init__(self, study_dir: Path, owner: str):
        self.study_dir, self.owner = study_dir, owner
        self.job_ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store = Store(self.study_dir)
        try:
            while not self._stop.wait(HEARTBEAT_S):
                for job_id in list(self.job_ids):
                    store.heartbeat(job_id, self.owner)
        finally:
            store.close()

    def stop(self) -> None:
        self._stop.set()


def prepare(config: StudyConfig, *, only: str | None = None) -> tuple[Path, list[Job]]:
    """The study directory (with its demo data written, if asked for) and the jobs to run."""
    study_dir = config.output_dir()
    jobs = filter_jobs(expand_grid(config), parse_only(only))
    check_inputs(config)
    planned_params(jobs)  # every placement resolves on its model, before anything is written
    make_study_folder(study_dir)
    if config.data_dir == BUILTIN_DATA:
        from .demo_data import write_demo_data

        write_demo_data(study_dir / "data", seed=config.model_seed)
    return study_dir, jobs


def run_study(config: StudyConfig, *, only: str | None = None, progress: bool = True, report: bool = True,
              add_cells: bool = False, on_start=None, log=print, backend: Backend | None = None) -> StudyRun:
    """Run (or resume) the study; ``on_start`` is called once the inputs have been validated, before any job runs
    (so that notices are not printed for a command that is about to be refused)."""
    from .ownership import check_owner, register_grid

    adding = check_owner(config.output_dir(), config, filter_jobs(expand_grid(config), parse_only(only)),
                         add_cells=add_cells)  # before anything is written
    study_dir, jobs = prepare(config, only=only)
    register_grid(study_dir, jobs, config)
    if not adding:
        _write_config_snapshot(study_dir, config)
    if progress and current_threads() and not (backend and backend.workers_per_gpu):  # runners choose their own
        tqdm.write(current_threads(), file=sys.stderr)
    if on_start is not None:
        on_start()
    run = run_jobs(study_dir, jobs, progress=progress, desc="study", backend=backend)
    run.report_skipped = not report
    if report and run.counts["complete"]:
        run.report = build_study_report(study_dir)
    return run


def run_jobs(study_dir: Path, jobs: list[Job], *, progress: bool = True, desc: str = "study",
             backend: Backend | None = None) -> StudyRun:
    """Claim, run and record the given (already registered) jobs until none is left to claim.

    The one dispatch loop for every kind of job (study cells, ablation conditions, …): each job runs through
    :func:`.jobs.execute`, which looks its kind up in ``JOB_KINDS``; the result is recorded complete atomically.
    A kind in ``JOB_GROUPS`` whose spec asks for it (``ablate --conditions-per-batch K``) is claimed up to K jobs
    at a time that run together (:func:`.jobs.execute_group`), each still recorded on its own.
    ``backend`` says where jobs run (default: here); ``ray`` hands the same claim/record protocol to
    :mod:`.backends.ray_backend`, ``workers_per_gpu`` runs this loop in several processes at once
    (:mod:`.backends.processes`). A job that raises is rerun up to ``backend.retries`` times.
    """
    backend = backend or LOCAL
    run = StudyRun(study_dir, jobs)
    if backend.name != "local":
        run_on_backend(run, backend, progress=progress, desc=desc)
        return run
    if backend.workers_per_gpu:
        from .backends.processes import run_in_processes

        run_in_processes(run, backend, run_jobs, progress=progress, desc=desc)
        return run
    store = Store(study_dir)
    owner = make_owner()
    ids = [j.id for j in jobs]
    rules = {j.id: group_rule(j.spec) for j in jobs}  # jobs that may share their forwards (ablate's groups)
    failures: dict[str, int] = {}
    done = store.counts(ids)["complete"]
    beat = _Heartbeat(study_dir, owner)
    bar = tqdm(total=len(jobs), initial=done, desc=desc, unit="job", disable=not progress, position=0)
    try:
        while True:
            skip = set(run.ran) | set(run.failed)
            job = store.claim(owner, skip=skip, ids=ids)
            if job is None:
                break
            group = store.claim_partners(owner, job, rules, skip)
            beat.job_ids = [j.id for j in group]
            _rebalance_threads(progress)
            crash_point("claimed")
            _test_delay()
            bar.set_postfix_str(job.label if len(group) == 1 else f"{job.label} + {len(group) - 1} sharing its batches")
            try:
                results = execute_group([j.spec for j in group], study_dir, [study_dir / "runs" / j.id for j in group],
                                        progress=progress)
            except Exception as exc:  # noqa: BLE001 — one failed cell must not stop the grid
                message = f"{type(exc).__name__}: {exc}"
                for j in group:
                    store.fail(j.id, owner, message + "\n" + traceback.format_exc(limit=8))
                    failures[j.id] = failures.get(j.id, 0) + 1
                    retry = failures[j.id] <= backend.retries
                    if not retry:
                        run.failed[j.id] = message
                    tqdm.write(f"FAILED {j.label}: {message}" + (
                        f" (retry {failures[j.id]} of {backend.retries})" if retry else ""), file=sys.stderr)
                continue
            finally:
                beat.job_ids = []
            _flush_to_disk()  # the artifacts are durable before the database says the job is complete
            crash_point("before_complete")
            for j, result in zip(group, results):
                if store.complete(j.id, owner, result):
                    run.ran.append(j.id)
                    bar.update(1)
                else:
                    tqdm.write(f"note: {j.label} was taken over by another runner; its result is kept, not ours",
                               file=sys.stderr)
                crash_point("after_complete")
    finally:
        bar.close()
        beat.stop()
        release_owner(owner)
    run.counts = store.counts(ids)
    store.close()
    return run


def _rebalance_threads(progress: bool) -> None:
    """Runners come and go while a study runs: each job starts with this process's share of the cores."""
    from ..threads import rebalance

    changed = rebalance()
    if changed is not None and progress:
        tqdm.write(changed.describe(), file=sys.stderr)


DELAY_ENV = "HYBRIDLORA_TEST_JOB_DELAY"
"""Test hook: seconds to wait after each claim, so that concurrent runners surely overlap in tests."""


def _test_delay() -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _flush_to_disk() -> None:
    sync = getattr(os, "sync", None)
    if sync is not None:
        sync()


def _write_config_snapshot(study_dir: Path, config: StudyConfig) -> None:
    import yaml

    from ..train.loop import write_atomic

    write_atomic(study_dir / "study.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def build_study_report(study_dir: Path, output: Path | None = None) -> Path:
    """Build the report under a lock held from reading the database to renaming the report into place: runners
    finishing in any order then leave the report of the newest state (complete once every cell is), never an
    older partial one written last."""
    from ..analysis.report import build_report
    from .results import load_study_results

    with _report_lock(study_dir):
        paths = build_report(load_study_results(study_dir), output or study_dir / "report", progress=False)
    return Path(paths["html"]) if "html" in paths else Path(next(iter(paths.values())))


@contextmanager
def _report_lock(study_dir: Path):
    import fcntl

    with open(Path(study_dir) / ".report.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dry_run(config: StudyConfig, *, only: str | None = None, out=print) -> list[Job]:
    """Print the grid, the number of runs and a rough cost; runs nothing, writes nothing."""
    jobs = filter_jobs(expand_grid(config), parse_only(only))
    check_inputs(config)
    trainable = planned_params(jobs)
    widths = (22, 28, 28, 12, 6, 12)
    out("  ".join(h.ljust(w) for h, w in zip(("job", "model", "placement", "domain", "seed", "trainable"), widths)))
    for job in jobs:
        seed = "" if job.seed is None else str(job.seed)
        params = f"{trainable[job.id]:,}" if job.id in trainable else ""
        out("  ".join(str(v)[:w].ljust(w) for v, w in zip(
            (job.id, job.model, job.placement, job.train_domain, seed, params), widths)))
    base = sum(j.kind == "base" for j in jobs)
    train = [j for j in jobs if j.kind == "train"]
    out(f"{len(jobs)} jobs: {base} base evaluations + {len(train)} fine-tuning runs ({_grid_shape(train)})")
    out(_cost_line(config, jobs))
    return jobs


def make_study_folder(study_dir: Path) -> None:
    """The study folder, created once every input is known to be good (the first thing a study writes)."""
    from .config import StudyConfigError

    if study_dir.exists() and not study_dir.is_dir():
        raise StudyConfigError(f"--output {study_dir}: exists and is not a folder; give a new or existing study folder")
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyConfigError(f"--output {study_dir}: cannot create the study folder ({exc.strerror or exc}); "
                               "choose a folder you can write to") from None
    if not os.access(study_dir, os.W_OK | os.X_OK):
        raise StudyConfigError(f"--output {study_dir}: not writable; choose a folder you can write to")


def check_inputs(config: StudyConfig) -> None:
    """Data problems a run would only meet after hours of work: unknown domains, missing folders and files."""
    from ..data import DOMAINS
    from .config import StudyConfigError

    if config.data_dir not in (None, BUILTIN_DATA) and not Path(config.data_dir).is_dir():
        raise StudyConfigError(f"data_dir {config.data_dir}: no such folder; point it at a folder laid out like "
                               "shared/data, or remove it to read the Hugging Face hub")
    from ..synthetic import TASKS as SYNTHETIC

    for domain in config.domains:
        is_file_name = domain.name.endswith((".jsonl", ".json", ".csv"))
        hub_id = "/" in domain.name and not is_file_name
        known = domain.name in DOMAINS or domain.name in SYNTHETIC
        if not known and not hub_id and not Path(domain.name).is_file():
            raise StudyConfigError(f"domains: {domain.name!r} is neither a known domain ({', '.join(DOMAINS)}), a "
                                   f"synthetic task ({', '.join(SYNTHETIC)}), an existing .jsonl/.json/.csv file, "
                                   "nor a hub dataset id (owner/name)")
        if is_file_name and Path(domain.name).is_file():
            _check_readable(Path(domain.name))
        if domain.name in DOMAINS and config.data_dir not in (None, BUILTIN_DATA):
            local = Path(config.data_dir) / DOMAINS[domain.name].local_path
            if not local.is_file():
                raise StudyConfigError(f"domains: {domain.name}: {local} not found under data_dir")


def _check_readable(path: Path) -> None:
    """Every row of a domain file decodes (a bad byte in row 1,900 must not wait for the cell that trains on it)."""
    from ..data import DataError
    from ..data.registry import read_rows
    from .config import StudyConfigError

    try:
        for _ in read_rows(path):
            pass
    except DataError as exc:
        raise StudyConfigError(f"domains: {exc}") from None


def planned_params(jobs: list[Job]) -> dict[str, int]:
    """Trainable parameters of every train job, resolved on the exact architecture (meta device, no weights) —
    so a placement that matches nothing on some model fails here, before any compute is spent."""
    from ..models import build_meta_model, resolve_model, text_config, tiny_config
    from ..placement import PlacementError
    from .config import StudyConfigError
    from .jobs import resolve_placement

    maps: dict[str, object] = {}
    out = {}
    for job in jobs:
        if job.kind != "train":
            continue
        key = json.dumps(job.spec["model"], sort_keys=True)
        if key not in maps:
            from ..families import family_for

            config = text_config(resolve_model(job.spec["model"]["model"]).config)
            if job.spec["model"]["tiny"]:
                config = tiny_config(config, family_for(config.model_type))
            maps[key] = build_meta_model(config)
        try:
            out[job.id] = resolve_placement(job.spec, maps[key]).trainable_params
        except PlacementError as exc:
            raise StudyConfigError(f"{job.model}: {exc}") from None
    return out


def _grid_shape(train: list[Job]) -> str:
    """"2 models × 6 placements × 3 domains × 1 seeds"; placements counted per model, since models of different
    families take different placement names (counting the union multiplied out to more runs than there are)."""
    per_model = {m: len({j.placement for j in train if j.model == m}) for m in dict.fromkeys(j.model for j in train)}
    counts = sorted(set(per_model.values()))
    placements = (f"{counts[0]} placements" if len(counts) == 1
                  else "placements " + " / ".join(str(n) for n in per_model.values()) + " per model")
    return (f"{len(per_model)} models × {placements} × {len({j.train_domain for j in train})} domains × "
            f"{len({j.seed for j in train})} seeds")


def _cost_line(config: StudyConfig, jobs: list[Job]) -> str:
    """A rough cost of what is asked: GPU-hours at the full-size models' measured rates for real checkpoints,
    CPU-minutes at the demo's measured rate for tiny random-weight stand-ins (never the GPU figure for those)."""
    tiny = [j for j in jobs if _cpu_scale(j.spec["model"])]
    real = [j for j in jobs if not _cpu_scale(j.spec["model"])]
    lines = []
    if real:
        lines.append(_gpu_cost(config, real))
    if tiny:
        lines.append(_tiny_cost(config, tiny))
    return "\n".join(lines)


def _cpu_scale(model: dict) -> bool:
    """Tiny random stand-ins and the demo's built-in 250k-parameter models: priced in CPU-minutes."""
    from ..builtin_models import BUILTIN_PREFIX

    return model["tiny"] or model["model"].startswith(BUILTIN_PREFIX)


def _work(config: StudyConfig, jobs: list[Job]) -> tuple[int, int, list[str]]:
    """(training sequences, evaluation items, benchmarks evaluated on their whole split) of ``jobs``."""
    sequences = sum((j.spec["domain"]["max_examples"] or 0) * config.train.epochs for j in jobs if j.kind == "train")
    full = [b for b, n in config.eval.benchmarks.items() if n is None and not config.eval.limit]
    per_job_q = sum(min(n or 10**9, config.eval.limit or 10**9) for n in config.eval.benchmarks.values()
                    if n is not None or config.eval.limit)
    return sequences, per_job_q * len(jobs), full


# The former demo preset (tiny random models), measured: 14 jobs, 1,152 training sequences of <= 256 tokens and
# 2,240 evaluation items in about 52 s on 2 CPU cores, report included; split evenly between training and
# evaluation. (The built-in demo's ~20-token synthetic examples run faster: 26 jobs in 111 s CPU.)
_DEMO_S_PER_SEQUENCE_256 = 26.0 / 1152
_DEMO_S_PER_ITEM = 26.0 / 2240


def _tiny_cost(config: StudyConfig, jobs: list[Job]) -> str:
    sequences, questions, full = _work(config, jobs)
    seconds = (sequences * _DEMO_S_PER_SEQUENCE_256 * max(1.0, config.train.max_length / 256)
               + questions * _DEMO_S_PER_ITEM)
    whole = f" plus the whole split of {', '.join(full)} per job" if full else ""
    return (f"cost ({len(jobs)} jobs on tiny or built-in demo models): {sequences:,} training sequences and "
            f"{questions:,} evaluation items{whole}; ≈ {max(seconds, 1) / 60:,.1f} CPU-minutes on 2 cores at the demo's "
            "measured rate for sequences of up to 256 tokens (52 s for 14 tiny-model jobs; an upper bound for short "
            "examples: the built-in demo's 26 jobs took 111 s), no GPU needed")


def _gpu_cost(config: StudyConfig, jobs: list[Job]) -> str:
    sequences, questions, full = _work(config, jobs)
    tokens = sequences * config.train.max_length
    # Rough rates on one H100 from docs/PERFORMANCE.md: the reference (HF fallback) path, and the fast path
    # (1024-token rows through the trainer with graphs and the Triton kernels, ~40k tokens/s for both studied
    # models; evaluation ~12 ms per item: batched MC plus graph-replayed generation, fourth device session).
    reference = tokens / 5000 / 3600 + questions * 0.5 / 3600
    fast = tokens / 40000 / 3600 + questions * 0.012 / 3600
    whole = f" plus the whole split of {', '.join(full)} per job" if full else ""
    return (f"cost ({len(jobs)} jobs, at the rates of the 0.5-0.8B models the paper studied: larger models take "
            f"longer, small lab models far less): ≤ {sequences:,} training sequences (≤ {tokens/1e6:,.1f}M "
            f"tokens at max_length {config.train.max_length}) and {questions:,} evaluation items{whole}; on one "
            f"H100 ≈ {reference:,.1f} GPU-hours at the reference path's rough rates (5k tokens/s, 0.5 s per item), "
            f"≈ {fast:,.1f} on the fast path (40k tokens/s, 12 ms per item) — upper bounds that count every example "
            "at max_length; with the study's real lengths the `paper` preset projects to about 0.6 h on an H100 "
            "and 0.55 h on an H200 (docs/PERFORMANCE.md)")


def summary_line(run: StudyRun) -> str:
    c = run.counts
    parts = [f"{c.get('complete', 0)}/{len(run.jobs)} jobs complete"]
    if run.ran:
        parts.append(f"{len(run.ran)} run now")
    if c.get("failed"):
        parts.append(f"{c['failed']} failed (re-run to retry; errors in study.db)")
    if c.get("running"):
        parts.append(f"{c['running']} still running elsewhere")
    if run.report and c.get("complete", 0) < len(run.jobs):
        where = f"; PARTIAL report (rewritten complete by the runner that finishes the grid; re-run to finish it): {run.report}"
    else:
        where = f"; report: {run.report}" if run.report else ("; no report (--no-report)" if run.report_skipped
                                                           else "; no report (no complete job)")
    return ", ".join(parts) + where


def status_json(study_dir: Path) -> str:
    store = Store(study_dir, create=False)
    try:
        return json.dumps(store.counts(), indent=1)
    finally:
        store.close()
