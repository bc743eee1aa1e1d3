"""Several runners on this machine at once: ``--workers-per-gpu N`` (local backend).

Starts N runner processes per visible GPU (N in all on a machine without one). Each is the ordinary local dispatch
loop on the same store — the several-runners mode the store already supports (every job claimed by one runner,
recorded once; a runner that dies leaves its job to the others) — pinned to one GPU through
``CUDA_VISIBLE_DEVICES``, so N jobs share each GPU. Each runner keeps its own per-process caches (an ablation's
base model, tokenized texts, prepared benchmarks), and all of them share the node's compiled-kernel and autotune
caches (:func:`.worker.use_node_kernel_caches`). A job that raises is retried by the runner that ran it (up to
``--retries``), and may also be taken once by each other runner, as with runners started by hand.

Why several per GPU: a 0.5–0.8B model leaves most of an H200 idle (a decode step is many small kernels), and a
second runner's host work (Python, tokenization, scoring) overlaps the first one's GPU work. Without the CUDA MPS
daemon, kernels of different processes take turns on the GPU rather than running side by side;
``bench/bench_ablation.py`` measures what N runners gain.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

POLL_S = 1.0
RUNNER_NAME = "runner-{}"  # the runner processes' names, numbered from 0


def repeats_another_runner() -> bool:
    """Whether this is the second or a later runner process of ``--workers-per-gpu``: the notes every runner would
    make alike (a benchmark's few-shot prompts trimmed to the context, say) are said by the first runner only, not
    once per process. The main process and Ray's workers speak for themselves."""
    name = multiprocessing.current_process().name
    prefix = RUNNER_NAME.format("")
    return name.startswith(prefix) and name[len(prefix):].isdigit() and name[len(prefix):] != "0"


def worker_devices(per_gpu: int) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each runner: N per visible GPU, or N times None without a GPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    names = visible[:count] if visible else [str(i) for i in range(count)]
    return [name for name in names for _ in range(per_gpu)] or [None] * per_gpu


def run_in_processes(run, backend, loop: Callable, *, progress: bool, desc: str) -> None:
    """Run ``run.jobs`` with ``backend.workers_per_gpu`` runners per GPU, each calling ``loop`` (the local
    :func:`hybridlora.study.runner.run_jobs`); fills ``run`` as the local loop does."""
    from ... import threads
    from ..store import Store

    devices = worker_devices(backend.workers_per_gpu)
    single = dataclasses.replace(backend, workers_per_gpu=None)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; each runner starts clean
    results = context.Queue()
    explicit = threads.explicit_threads()
    children = [context.Process(target=_runner, args=(loop, str(run.study_dir), run.jobs, single, device,
                                                       explicit, desc, results), name=RUNNER_NAME.format(i))
                for i, device in enumerate(devices)]
    if progress:
        tqdm.write(f"{len(children)} runners: " + ", ".join(f"GPU {d}" if d is not None else "CPU" for d in devices),
                   file=sys.stderr)
    with threads.standing_aside():  # this process only waits: the runners share the cores
        try:
            for child in children:
                child.start()
            _wait(run, children, results, progress, desc)
        finally:
            for child in children:
                if child.is_alive():
                    child.terminate()
                child.join()
    store = Store(run.study_dir)
    try:
        run.counts = store.counts([j.id for j in run.jobs])
    finally:
        store.close()


def _wait(run, children, results, progress: bool, desc: str) -> None:
    """Show the store's progress until every runner has exited; collect what each ran and what failed."""
    from ..store import Store

    ids = [j.id for j in run.jobs]
    store = Store(run.study_dir)
    bar = tqdm(total=len(ids), initial=store.counts(ids)["complete"], desc=desc, unit="job", disable=not progress)
    reported: set[str] = set()
    try:
        while True:
            _collect(run, results, reported)
            bar.n = store.counts(ids)["complete"]
            bar.refresh()
            if not any(child.is_alive() for child in children):
                break
            time.sleep(POLL_S)
        _collect(run, results, reported)
    finally:
        bar.close()
        store.close()
    for child in children:
        if child.name not in reported:
            tqdm.write(f"note: {child.name} exited with status {child.exitcode} before reporting; a job it held is "
                       "redone by the next run", file=sys.stderr)


def _collect(run, results, reported: set[str]) -> None:
    while not results.empty():
        name, ran, failed = results.get()
        reported.add(name)
        run.ran.extend(ran)
        run.failed.update(failed)


def _runner(loop: Callable, study_dir: str, jobs: list, backend, device: str | None, explicit: int | None,
            desc: str, results) -> None:
    """One runner process: its GPU and caches set before torch starts, then the local loop."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    from ... import threads
    from ...quiet import quiet_libraries
    from .worker import use_node_kernel_caches

    quiet_libraries()  # a spawned process starts with no warning filters: the command line's apply here too
    use_node_kernel_caches()
    threads.configure(explicit)
    run = loop(Path(study_dir), jobs, progress=False, desc=desc, backend=backend)
    results.put((multiprocessing.current_process().name, run.ran, run.failed))
