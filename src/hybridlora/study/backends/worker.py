"""What runs inside a Ray worker process: one job (or a group sharing its forwards), in a private temporary folder,
with the node's kernel caches.

The worker never reads or writes the study directory: its inputs (the job spec, the data folder or file, the
state an earlier attempt left: checkpoints or a finished adapter) arrive as arguments, and what it makes goes back
as bytes — checkpoints while training (through the driver's event actor), every artifact at the end (the return
value). This module imports neither torch nor the job code at import time: the kernel cache variables must be set
before torch or Triton first reads them.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .transfer import pack, unpack

KERNEL_CACHE_ENV = "HYBRIDLORA_KERNEL_CACHE"
"""Per-node folder kept across jobs for compiled kernels and autotune results (default ~/.cache/hybridlora/kernels)."""

CHECKPOINT_POLL_S = 1.0
WORKER_INFO = "worker.json"  # written into the job's artifacts: where it ran and what its start cost


def kernel_cache_dir() -> Path:
    return Path(os.environ.get(KERNEL_CACHE_ENV) or Path.home() / ".cache" / "hybridlora" / "kernels")


def use_node_kernel_caches() -> dict[str, str]:
    """Point Triton, TorchInductor and the CUDA driver's JIT cache at one persistent folder of this node, so a
    fresh process per job reuses what an earlier job compiled and autotuned (a variable already set wins)."""
    root = kernel_cache_dir()
    wanted = {"TRITON_CACHE_DIR": str(root / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
              "CUDA_CACHE_PATH": str(root / "cuda"),
              "TRITON_CACHE_AUTOTUNING": "1",  # Triton versions that support it keep autotune winners on disk
              "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
              "CUDA_CACHE_MAXSIZE": str(4 << 30)}
    for name, value in wanted.items():
        os.environ.setdefault(name, value)
    for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH"):
        Path(os.environ[name]).mkdir(parents=True, exist_ok=True)
    return {name: os.environ[name] for name in wanted}


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux); the share of a job's start cost spent before the task ran."""
    from ...threads import process_start_time

    start_ticks = process_start_time(os.getpid())
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(start_ticks) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, TypeError, IndexError):
        return None


def where_am_i() -> dict[str, Any]:
    import ray

    context = ray.get_runtime_context()
    return {"host": socket.gethostname(), "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cwd": os.getcwd()}


class _CheckpointStreamer:
    """Sends the job's resumable state to the driver whenever it changes: the newest checkpoint (with the run
    log and configs beside it), and once training is over the adapter — so a rerun elsewhere resumes there."""

    def __init__(self, out: Path, send):
        self.out, self.send = out, send
        self.last: tuple | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _state(self) -> tuple[str | None, bool]:
        root = self.out / "train" / "checkpoints"
        steps = [p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file()] if root.is_dir() else []
        newest = max(steps, key=lambda p: int(p.name.split("-")[1])).name if steps else None
        return newest, (self.out / "train" / "adapter" / "adapter_config.json").is_file()

    def _loop(self) -> None:
        while not self._stop.wait(CHECKPOINT_POLL_S):
            self.send_if_changed()

    def send_if_changed(self) -> None:
        state = self._state()
        if state == self.last or state == (None, False):
            return
        newest = state[0]

        def keep(rel: Path) -> bool:  # the newest checkpoint only; no half-written temporaries
            parts = rel.parts
            if any(p.startswith(".") for p in parts):
                return False
            return not (parts[:2] == ("train", "checkpoints") and len(parts) > 2 and parts[2] != newest)
        try:
            blob = pack(self.out, keep=keep)
        except (OSError, EOFError, ValueError):  # the trainer replaced files under us: try again next round
            return
        self.send(newest, blob)
        self.last = state

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _process_inputs_dir() -> Path:
    """Where this process keeps the inputs it was shipped (removed with the process's other folders once it is
    gone, see :func:`_new_work_dir`)."""
    return Path(tempfile.gettempdir()) / "hybridlora-ray-jobs" / f"{os.getpid()}-inputs"


_LOCAL_INPUTS: dict[tuple[str, str], Path] = {}  # (form, driver path) -> this process's copy, unpacked once


def _local_copy(item: dict) -> Path:
    """This process's copy of one shipped file or folder, at the same place for every job it runs (so that what
    the job caches by path — prepared benchmarks, tokenized texts — is found again by the next job)."""
    import ray

    key = (item["form"], item["source"])
    if key not in _LOCAL_INPUTS:
        import hashlib

        slot = _process_inputs_dir() / hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
        local = slot / (Path(item["source"]).name or "input")
        blob = ray.get(item["ref"])
        if item["form"] == "folder":
            unpack(blob, local)
        else:
            slot.mkdir(parents=True, exist_ok=True)
            local.write_bytes(blob)
        _LOCAL_INPUTS[key] = local
    return _LOCAL_INPUTS[key]


def _localise_inputs(task: dict, study: Path, inputs: list[dict], prior_blob: bytes | None) -> tuple[dict, dict]:
    """Unpack what the driver shipped for one job; the spec the job runs with (pointing at the local copies) and
    the map from local paths back to the driver's, for the paths the job writes into its result."""
    import copy

    import ray

    from ..jobs import set_spec_value

    spec = copy.deepcopy(task["spec"])
    back = {str(study): task["study_dir"]}
    if prior_blob is not None:
        unpack(prior_blob, study / "runs" / task["job_id"])
    for item in inputs:
        if item["form"] == "builtin":  # the job reads <study>/data
            if not (study / "data").is_dir():
                unpack(ray.get(item["ref"]), study / "data")
            continue
        local = _local_copy(item)
        back[str(local)] = item["source"]
        set_spec_value(spec, item["key"], str(local))
    return spec, back


def _new_work_dir(job_id: str) -> Path:
    """A private folder for one job under the node's temp dir, named after this process; folders left by workers
    that were killed (their process is gone) are removed first, so lost jobs do not fill the node's disk."""
    root = Path(tempfile.gettempdir()) / "hybridlora-ray-jobs"
    root.mkdir(parents=True, exist_ok=True)
    if Path("/proc").is_dir():
        for old in root.iterdir():
            pid = old.name.split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{job_id}-", dir=root))


def _job_function(kind_path: str | None, kind: str):
    """The function of a job kind, as the driver's ``JOB_KINDS`` named it ("module:function")."""
    if not kind_path:
        from ..jobs import JobError

        raise JobError(f"unknown job kind {kind!r} (not in the driver's JOB_KINDS)")
    from ..jobs import job_function

    return job_function(kind_path)


def _job_error(exc: BaseException) -> dict:
    return {"message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}


def run_remote_jobs(tasks: list[dict], inputs: list[list[dict]], priors: list[bytes | None], events, *,
                    keep_process: bool = False, jobs_before: int = 0) -> list[dict[str, Any]]:
    """Run one job, or a group of jobs that share their forwards (:func:`..jobs.execute_group`), in this process.

    ``tasks[i]``: the job's id, spec, token and the driver's study path; ``inputs[i]``: what it reads, shipped as
    object refs (:data:`..jobs.JOB_INPUTS`); ``priors[i]``: the state an earlier attempt left. Returns per job
    {"result" | "error", "artifacts" (tar of the job's folder), "where", "timing", "paths" (local path -> driver
    path)}; a job that raises is returned as an error, not raised, so that the driver tells a failed job
    (recorded, maybe retried) from a lost worker (rerun). ``keep_process``: this process runs later jobs too (a
    kept process, :class:`JobProcess`): its shipped inputs stay for them."""
    task_start = time.time()
    timing: dict[str, Any] = {"process_age_at_task_s": _process_age_s(), "task_start": task_start,
                              "jobs_before_in_process": jobs_before, "group_size": len(tasks)}
    from ...quiet import quiet_libraries

    quiet_libraries()  # a Ray worker never passes through the command line: the same filters here
    caches = use_node_kernel_caches()
    where = where_am_i()
    where["saw_study_dir"] = os.path.exists(tasks[0]["study_dir"])  # True only on a shared file system (never used)
    where["jobs_before_in_process"] = jobs_before
    import ray

    ray.get([events.started.remote(t["token"], where) for t in tasks])  # the driver hears it before the result
    root = _new_work_dir(tasks[0]["job_id"])
    study = root / "study"
    outs = [study / "runs" / t["job_id"] for t in tasks]
    try:
        localised = [_localise_inputs(t, study, i, p) for t, i, p in zip(tasks, inputs, priors)]
        where.update(work_dir=str(root), resumed_from=tasks[0].get("resumed_from"))
        timing["inputs_s"] = time.time() - task_start
        t = time.time()
        import torch  # noqa: F401 — timed apart: part of every fresh process's start cost

        timing["import_torch_s"] = time.time() - t
        streamer = _CheckpointStreamer(  # training jobs run alone; a group's kinds write no checkpoints
            outs[0], lambda name, blob: ray.get(events.checkpoint.remote(tasks[0]["token"], name, blob)))
        t = time.time()
        try:
            results, error = _execute(tasks, [spec for spec, _ in localised], study, outs), None
        except Exception as exc:  # noqa: BLE001 — the job failed; its message goes to the store
            results, error = None, _job_error(exc)
        finally:
            streamer.stop()
        timing["job_s"] = time.time() - t
        timing["task_end"] = time.time()
        timing["task_s"] = timing["task_end"] - task_start
        if error is not None:
            return [{"error": error, "where": where, "timing": timing} for _ in tasks]
        payloads = []
        for out, result, (_, back) in zip(outs, results, localised):
            _write_worker_info(out, where, timing, caches)
            artifacts = pack(out, keep=lambda rel: not rel.parts[0].startswith("."))
            payloads.append({"result": result, "artifacts": artifacts, "where": where, "timing": timing,
                             "paths": back})
        return payloads
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not keep_process:
            shutil.rmtree(_process_inputs_dir(), ignore_errors=True)


def _execute(tasks: list[dict], specs: list[dict], study: Path, outs: list[Path]) -> list[dict]:
    """The jobs' results: one job through the function the driver's ``JOB_KINDS`` named, a group through
    :func:`..jobs.execute_group` (which also runs a group's last lone job as its kind asks)."""
    from ..jobs import execute_group, group_rule

    for task, spec in zip(tasks, specs):
        _job_function(task["kind_path"], spec["kind"])  # a kind the driver does not know fails here
    if len(tasks) == 1 and group_rule(specs[0]) is None:
        return [_job_function(tasks[0]["kind_path"], specs[0]["kind"])(specs[0], study, outs[0], progress=False)]
    return execute_group(specs, study, outs, progress=False)


class JobProcess:
    """A worker process kept for one job (or group) after another, for kinds in ``JOB_KEEPS_PROCESS``: the driver
    makes it a Ray actor holding the job's GPUs and CPUs for its whole life, so that a job always runs on the
    device its process first initialised."""

    def __init__(self):
        self.jobs_run = 0

    def run(self, tasks: list[dict], inputs: list[list[dict]], priors: list[bytes | None], events) -> list[dict]:
        payloads = run_remote_jobs(tasks, inputs, priors, events, keep_process=True, jobs_before=self.jobs_run)
        self.jobs_run += len(tasks)
        return payloads


def _write_worker_info(out: Path, where: dict, timing: dict, caches: dict) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)  # a job kind may write no artifact at all
    (out / WORKER_INFO).write_text(json.dumps({"where": where, "timing": timing, "kernel_caches": caches},
                                              indent=1, default=str))
