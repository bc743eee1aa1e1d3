"""What runs inside a Ray worker process: one job, in a private temporary folder, with the node's kernel caches.

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


def _localise_inputs(task: dict, root: Path, study: Path, data_blob: bytes | None, domain_blob: bytes | None,
                     prior_blob: bytes | None) -> tuple[dict, dict[str, str]]:
    """Unpack what the driver shipped; the spec the job runs with (pointing at the local copies) and the map
    from local paths back to the driver's, for the paths the job writes into its result."""
    import copy

    spec = copy.deepcopy(task["spec"])
    back = {str(study): task["study_dir"]}
    out = study / "runs" / task["job_id"]
    if prior_blob is not None:
        unpack(prior_blob, out)
    if data_blob is not None:
        if task["data"] == "builtin":  # the job reads <study>/data
            unpack(data_blob, study / "data")
        else:
            unpack(data_blob, root / "data")
            back[str(root / "data")] = spec["data"]["source"]
            spec["data"]["source"] = str(root / "data")
    if domain_blob is not None:
        local = root / "domain" / Path(spec["domain"]["name"]).name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(domain_blob)
        back[str(local)] = spec["domain"]["name"]
        spec["domain"]["name"] = str(local)
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


def run_remote_job(task: dict, data_blob: bytes | None, domain_blob: bytes | None, prior_blob: bytes | None,
                   events) -> dict[str, Any]:
    """The Ray task of one job. Returns {"result" | "error", "artifacts" (tar of the job's folder), "where",
    "timing", "paths" (local path -> driver path)}; a job that raises is returned as an error, not raised, so
    that the driver tells a failed job (recorded, maybe retried) from a lost worker (rerun)."""
    task_start = time.time()
    timing: dict[str, Any] = {"process_age_at_task_s": _process_age_s(), "task_start": task_start}
    from ...quiet import quiet_libraries

    quiet_libraries()  # a Ray worker never passes through the command line: the same filters here
    caches = use_node_kernel_caches()
    where = where_am_i()
    where["saw_study_dir"] = os.path.exists(task["study_dir"])  # True only on a shared file system (never used)
    import ray

    ray.get(events.started.remote(task["token"], where))  # waited for: the driver hears it before the result
    root = _new_work_dir(task["job_id"])
    study = root / "study"
    out = study / "runs" / task["job_id"]
    try:
        spec, back = _localise_inputs(task, root, study, data_blob, domain_blob, prior_blob)
        where.update(work_dir=str(root), resumed_from=task.get("resumed_from"))
        timing["inputs_s"] = time.time() - task_start
        t = time.time()
        import torch  # noqa: F401 — timed apart: part of every fresh process's start cost

        timing["import_torch_s"] = time.time() - t
        streamer = _CheckpointStreamer(
            out, lambda name, blob: ray.get(events.checkpoint.remote(task["token"], name, blob)))
        t = time.time()
        try:
            result, error = _job_function(task["kind_path"], spec["kind"])(spec, study, out, progress=False), None
        except Exception as exc:  # noqa: BLE001 — the job failed; its message goes to the store
            result, error = None, {"message": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc(limit=8)}
        finally:
            streamer.stop()
        timing["job_s"] = time.time() - t
        timing["task_end"] = time.time()
        timing["task_s"] = timing["task_end"] - task_start
        if error is not None:
            return {"error": error, "where": where, "timing": timing}
        _write_worker_info(out, where, timing, caches)
        return {"result": result, "artifacts": pack(out, keep=lambda rel: not rel.parts[0].startswith(".")),
                "where": where, "timing": timing, "paths": back}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _write_worker_info(out: Path, where: dict, timing: dict, caches: dict) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)  # a job kind may write no artifact at all
    (out / WORKER_INFO).write_text(json.dumps({"where": where, "timing": timing, "kernel_caches": caches},
                                              indent=1, default=str))
