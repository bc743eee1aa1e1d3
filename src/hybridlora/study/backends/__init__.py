"""Where a study's (or an ablation's) jobs run: ``local`` (this process, the default) or ``ray`` (a Ray cluster).

The choice travels as one small :class:`Backend` value into :func:`hybridlora.study.runner.run_jobs`, so every
command that dispatches jobs (``study``, ``ablate``) shares one mechanism. :func:`add_backend_options` adds the
command line options to any parser; :func:`backend_from_args` merges them over a config's ``backend:`` key.
The Ray code is imported only when the ray backend is used, so ``local`` works without Ray installed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BACKENDS = ("local", "ray")


class BackendError(RuntimeError):
    """The backend cannot run the jobs (Ray missing, cluster unreachable, impossible resource request); the
    message says what to install or check."""


@dataclass(frozen=True)
class Backend:
    name: str = "local"  # "local" | "ray"
    address: str | None = None  # ray: None starts a cluster in this process; "auto" or HOST:PORT joins one
    gpus_per_job: float | None = None  # ray: None = 1 when the cluster has GPUs, else 0
    cpus_per_job: float = 1.0  # ray
    retries: int = 0  # a job that raises is run again up to this many times (both backends)
    workers_per_gpu: int | None = None  # local: runner processes per GPU (in all without one); None: this process

    def describe(self) -> str:
        if self.name == "local":
            return f"local ({self.workers_per_gpu} runners per GPU)" if self.workers_per_gpu else "local"
        return f"ray ({self.address or 'new local cluster'})"


LOCAL = Backend()


def add_backend_options(parser) -> None:
    """The backend options of any command that runs jobs (``study``, ``ablate``)."""
    group = parser.add_argument_group("where jobs run (docs/RAY.md)")
    group.add_argument("--backend", choices=BACKENDS, default=None,
                       help="local: this process (default); ray: one Ray task per job on a Ray cluster")
    group.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                       help="ray: the cluster to join (`ray start --head` prints it); default: start one here")
    group.add_argument("--gpus-per-job", type=float, default=None, metavar="N",
                       help="ray: GPUs each job asks for (default 1 when the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-job", type=float, default=None, metavar="N", help="ray: CPUs each job asks for "
                       "(default 1)")
    group.add_argument("--retries", type=int, default=None, metavar="N",
                       help="run a job that raises up to N more times before recording it failed (default 0)")
    group.add_argument("--workers-per-gpu", type=int, default=None, metavar="N",
                       help="local: N runner processes per GPU (N in all without a GPU), each taking jobs from the "
                            "same store; default: this process alone (ray: --gpus-per-job 1/N instead)")


# A run of small models (tiny configs, the demo's lab models) on a machine without a GPU: one runner process per
# spare core once this many jobs are left. Small tensors keep one process on about one core whatever its thread
# count, and a runner's start (imports, model, data) costs several seconds, about five jobs' work. Measured on 2
# cores: `ablate qwen3.5-0.8b --tiny --plan all --limit 8` (37 removals) 56.6 s with one runner, 42.0 s with two,
# while Falcon-H1's 17 cheaper removals took 21.7 s with one and 27.0 s with two; the demo study's 26 cells 100 s
# with one, 54 s with two.
SMALL_CPU_RUNNERS_FROM = 24
SMALL_CPU_RUNNERS_MAX = 4


def small_cpu_runners(backend: Backend | None, jobs_left: int, *, small: bool, what: str,
                      say: bool = True) -> Backend | None:
    """Small models (tiny configs, the demo's lab models) on a machine without a GPU, threads not chosen by the
    user: each process computes with one thread — pinned, so results do not change with the machine's load or the
    number of runners — and where at least :data:`SMALL_CPU_RUNNERS_FROM` jobs are left and the user did not set
    ``--workers-per-gpu``, the returned backend runs one such runner per spare core (at most 4, at least 12 jobs
    each). Anything else: ``backend`` unchanged."""
    import dataclasses

    import torch

    from ... import threads

    if (backend is None or backend.name != "local" or not small or torch.cuda.is_available()
            or threads.explicit_threads()):
        return backend
    threads.pin(1, "small models on CPU: one thread per process, the same results at any load; --threads N "
                   "overrides")
    if backend.workers_per_gpu is not None or jobs_left < SMALL_CPU_RUNNERS_FROM:
        return backend
    runners = min(SMALL_CPU_RUNNERS_MAX, threads.spare_cores(), jobs_left // (SMALL_CPU_RUNNERS_FROM // 2))
    if runners < 2:
        return backend
    if say:
        print(f"note: small models on CPU: {runners} runner processes of one thread each share the {jobs_left} "
              f"{what} (--workers-per-gpu 1 keeps one)", file=sys.stderr)
    return dataclasses.replace(backend, workers_per_gpu=runners)


def jobs_left(study_dir, job_ids: list[str]) -> int:
    """How many of ``job_ids`` the study directory has not completed (all of them in a new directory)."""
    from ..store import DB_NAME, Store

    if not (Path(study_dir) / DB_NAME).is_file():
        return len(job_ids)
    store = Store(study_dir, create=False)
    try:
        return len(job_ids) - store.counts(job_ids)["complete"]
    finally:
        store.close()


def backend_from_args(args, settings: Any = None) -> Backend:
    """The backend a command asked for: command line options over the config's ``backend:`` settings (an object
    or dict with the same field names, or None) over the defaults. Raises CliError on impossible values."""
    from ...errors import CliError

    base = settings.model_dump() if hasattr(settings, "model_dump") else dict(settings or {})
    fields = {k: v for k, v in base.items() if k in Backend.__dataclass_fields__ and v is not None}
    for key in ("backend", "address", "gpus_per_job", "cpus_per_job", "retries", "workers_per_gpu"):
        value = getattr(args, key, None)
        if value is not None:
            fields["name" if key == "backend" else key] = value
    backend = Backend(**fields)
    for key in ("gpus_per_job", "cpus_per_job", "retries"):
        value = getattr(backend, key)
        if value is not None and value < 0:
            raise CliError(f"--{key.replace('_', '-')} {value}: give a number >= 0")
    # Only the command line's own options are refused: a config may keep its ray settings while `--backend
    # local` runs it here for once.
    if backend.name == "local" and (getattr(args, "address", None) or getattr(args, "gpus_per_job", None) is not None):
        raise CliError("--address/--gpus-per-job apply to --backend ray; add --backend ray (or backend: ray in the "
                       "config)")
    if backend.workers_per_gpu is not None and (backend.workers_per_gpu < 1 or backend.name != "local"):
        raise CliError(f"--workers-per-gpu {backend.workers_per_gpu}: give N >= 1, with the local backend (on Ray, "
                       "--gpus-per-job 1/N runs N jobs per GPU)")
    return backend


def check_backend(backend: Backend) -> None:
    """What can be checked before any work: Ray importable, the cluster's address reachable (BackendError)."""
    if backend.name != "ray":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise BackendError("--backend ray needs Ray, which is not installed here: pip install 'hybridlora[ray]' "
                           "(or pip install ray)") from None
    from .ray_backend import check_address

    check_address(backend.address)


def run_on_backend(run, backend: Backend, *, progress: bool, desc: str) -> None:
    """Run ``run.jobs`` on a non-local backend (today: ray), filling ``run`` as the local loop does."""
    if backend.name != "ray":
        raise BackendError(f"unknown backend {backend.name!r}; choose one of {', '.join(BACKENDS)}")
    check_backend(backend)
    from .ray_backend import run_on_ray

    run_on_ray(run, backend, progress=progress, desc=desc)
