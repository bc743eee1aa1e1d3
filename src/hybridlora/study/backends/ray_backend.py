"""The Ray backend: one driver owns the study's SQLite store; every job is a Ray task in a fresh worker process.

The driver claims jobs in the store exactly as the local runner does (so ``kill -9`` of the driver, a rerun,
or a local runner working on the same study all keep "every cell exactly once"), keeps as many tasks in flight
as the cluster has room for, and records each result in one transaction after unpacking the job's artifacts into
``runs/<id>``. Workers share no file system with the driver: inputs and artifacts travel as bytes (see
:mod:`.worker` and :mod:`.transfer`). While a job trains, its checkpoints stream back through a small actor, so a
job whose worker dies is rerun elsewhere from its last checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm.auto import tqdm

from ..config import BUILTIN_DATA
from ..jobs import JOB_KINDS, JOB_USES_GPU, crash_point
from ..store import HEARTBEAT_S, Store, make_owner, release_owner
from . import Backend, BackendError
from .transfer import pack, replace_with
from .worker import run_remote_job

WAIT_S = 1.0  # how often the driver looks at events (job started, checkpoint arrived) between results
MAX_LOST = 3  # reruns of a job whose worker or node died, before it is recorded failed
FORWARDED_ENV = ("PYTHONPATH", "HYBRIDLORA_KERNEL_CACHE")  # the driver's values reach every worker


class JobEvents:
    """Actor (no CPU): workers report here when a job starts and when it wrote a checkpoint; the driver drains
    the events between results. Checkpoints are kept only until drained (the newest per attempt)."""

    def __init__(self):
        self.events: list[tuple] = []

    def started(self, token: str, where: dict) -> None:
        self.events.append(("started", token, where))

    def checkpoint(self, token: str, name: str | None, blob: bytes) -> None:
        self.events = [e for e in self.events if not (e[0] == "checkpoint" and e[1] == token)]
        self.events.append(("checkpoint", token, name, blob))

    def drain(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


def connect(backend: Backend) -> None:
    """Join (or start) the cluster; BackendError with what to check when that is impossible."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    kwargs = dict(runtime_env={"env_vars": env} if env else None, log_to_driver=False,
                  logging_level="WARNING", configure_logging=True)
    address = backend.address
    check_address(address)
    if not address:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"cannot join the Ray cluster at {address}: {first}; start one with `ray start --head` "
                           "and pass the address it prints as --address (or --address auto on a cluster node)"
                           ) from None


def check_address(address: str | None) -> None:
    """A HOST:PORT address answers (seconds, where ray.init would retry for a minute); auto/None pass."""
    import socket

    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BackendError(f"--address {address}: give auto or HOST:PORT (the address `ray start --head` prints)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise BackendError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one there with "
                           "`ray start --head`, or check --address") from None


@dataclass
class _Attempt:
    job: object  # grid.Job
    token: str
    resumed_from: str | None


class _Heartbeat:
    """Keeps the claims of every job in flight fresh (its own connection, a background thread)."""

    def __init__(self, study_dir: Path, owner: str):
        self.owner, self.job_ids = owner, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(study_dir,), daemon=True)
        self._thread.start()

    def _run(self, study_dir: Path) -> None:
        store = Store(study_dir)
        try:
            while not self._stop.wait(HEARTBEAT_S):
                for job_id in list(self.job_ids):
                    store.heartbeat(job_id, self.owner)
        finally:
            store.close()

    def stop(self) -> None:
        self._stop.set()


class _Driver:
    def __init__(self, run, backend: Backend, progress: bool, desc: str):
        self.run, self.backend = run, backend
        self.gpus_per_job = self._gpus_per_job()  # first: an impossible request stops here, before any claim
        self.study_dir = Path(run.study_dir)
        self.store = Store(self.study_dir)
        self.owner = make_owner()
        self.ids = [j.id for j in run.jobs]
        self.labels = {j.id: j.label for j in run.jobs}
        self.inflight: dict = {}  # ObjectRef -> _Attempt
        self.failures, self.lost, self.submitted = Counter(), Counter(), Counter()
        self.finished: set[str] = set()  # complete, or given up, in this run
        self.events = ray.remote(num_cpus=0)(JobEvents).remote()
        self.task = ray.remote(max_calls=1)(run_remote_job)  # a fresh process per job: GPU memory returned
        self.inputs: dict[str, object] = {}  # data source -> ObjectRef of its tar, put once, shared by all jobs
        self.beat = _Heartbeat(self.study_dir, self.owner)
        done = self.store.counts(self.ids)["complete"]
        self.bar = tqdm(total=len(run.jobs), initial=done, desc=desc, unit="job", disable=not progress, position=0)

    # ------------------------------------------------------------ resources
    def _gpus_per_job(self) -> float:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        most = max((r.get("GPU", 0) for r in nodes), default=0)
        wanted = self.backend.gpus_per_job
        if wanted is None:
            wanted = 1.0 if most >= 1 else 0.0
        if wanted > most:
            raise BackendError(f"--gpus-per-job {wanted:g}: no node of this cluster has that many GPUs (most: "
                               f"{most:g}); lower it, or add GPU nodes")
        cpus = self.backend.cpus_per_job
        if not any(r.get("CPU", 0) >= cpus for r in nodes):
            raise BackendError(f"--cpus-per-job {cpus:g}: no node of this cluster has that many CPUs")
        total = ray.cluster_resources()
        self._log(f"ray: {len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs; each "
                  f"job asks for {wanted:g} GPU(s) and {cpus:g} CPU(s)")
        return wanted

    def _needs(self, kind: str) -> tuple[float, float]:
        gpus = self.gpus_per_job if JOB_USES_GPU.get(kind, True) else 0.0
        return gpus, self.backend.cpus_per_job

    def _slots(self) -> int:
        """Jobs the cluster can run at once (re-read each time: nodes come and go)."""
        total = ray.cluster_resources()
        gpus, cpus = self._needs("train")
        by_gpu = total.get("GPU", 0) // gpus if gpus else math.inf
        return max(1, int(min(by_gpu, total.get("CPU", 0) // cpus)))

    # ------------------------------------------------------------ the loop
    def loop(self) -> None:
        try:
            while True:
                self._fill()
                if not self.inflight:
                    break
                refs = list(self.inflight)
                ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_S)
                if ready:  # and every other result that is in already
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                self._drain_events()  # before results: a late checkpoint must never overwrite final artifacts
                for ref in ready:
                    self._finish(ref, self.inflight.pop(ref))
        finally:
            self.bar.close()
            self.beat.stop()
            release_owner(self.owner)
            self.run.counts = self.store.counts(self.ids)
            self.store.close()

    def _fill(self) -> None:
        while len(self.inflight) < self._slots():
            busy = {a.job.id for a in self.inflight.values()}
            job = self.store.claim(self.owner, skip=self.finished | busy, ids=self.ids)
            if job is None:
                return
            crash_point("claimed")
            self._submit(job)

    def _submit(self, job) -> None:
        self.submitted[job.id] += 1
        token = f"{job.id}#{self.submitted[job.id]}"
        out = self.study_dir / "runs" / job.id
        prior = pack(out, keep=lambda rel: not rel.parts[0].startswith(".")) if out.is_dir() else None
        resumed_from = _resume_point(out) if prior else None
        task = {"job_id": job.id, "token": token, "spec": job.spec, "kind_path": JOB_KINDS.get(job.kind),
                "study_dir": str(self.study_dir), "data": "builtin" if _data_source(job.spec) == BUILTIN_DATA
                else "folder", "resumed_from": resumed_from}
        gpus, cpus = self._needs(job.kind)
        options = dict(num_gpus=gpus, num_cpus=cpus, max_retries=0, retry_exceptions=False,
                       name=f"hybridlora:{job.id}")
        ref = self.task.options(**options).remote(task, self._data_ref(job.spec), self._domain_ref(job.spec),
                                                  prior, self.events)
        self.inflight[ref] = _Attempt(job, token, resumed_from)
        self.beat.job_ids.add(job.id)

    def _data_ref(self, spec: dict):
        """The job's data folder as one shared object: packed and put once per study run, fetched once per node."""
        source = _data_source(spec)
        folder = self.study_dir / "data" if source == BUILTIN_DATA else (Path(source) if source else None)
        if folder is None or not folder.is_dir():
            return None  # the hub: each worker downloads what it needs
        if source not in self.inputs:
            self.inputs[source] = ray.put(pack(folder))
        return self.inputs[source]

    def _domain_ref(self, spec: dict):
        name = spec.get("domain", {}).get("name")
        if not name or not Path(name).is_file():
            return None  # a known domain (in the data folder) or a hub dataset
        key = f"file:{Path(name).resolve()}"
        if key not in self.inputs:
            self.inputs[key] = ray.put(Path(name).read_bytes())
        return self.inputs[key]

    # ------------------------------------------------------------ events and results
    def _current(self, token: str) -> _Attempt | None:
        return next((a for a in self.inflight.values() if a.token == token), None)

    def _drain_events(self) -> None:
        for event in ray.get(self.events.drain.remote()):
            attempt = self._current(event[1])
            if attempt is None:
                continue  # from an attempt already given up (a worker the driver counted lost)
            if event[0] == "started":
                where = event[2]
                gpus = ",".join(where["gpu_ids"]) or "none"
                resumed = f", resuming from {attempt.resumed_from}" if attempt.resumed_from else ""
                self._log(f"started {attempt.job.label} [{attempt.job.id}] on {where['host']} ({where['node_ip']}, "
                          f"node {where['node_id'][:8]}), GPUs {gpus}, pid {where['pid']}{resumed}")
            else:
                replace_with(event[3], self.study_dir / "runs" / attempt.job.id)
                crash_point("checkpoint")

    def _finish(self, ref, attempt: _Attempt) -> None:
        self.beat.job_ids.discard(attempt.job.id)
        try:
            payload = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task wrapper itself raised (inputs could not unpack)
            self._failed(attempt, {"message": str(exc).strip().splitlines()[-1], "traceback": str(exc)})
            return
        except ray.exceptions.RayError as exc:  # the worker process or its node died
            self._lost(attempt, exc)
            return
        if "error" in payload:
            self._failed(attempt, payload["error"], payload.get("where"))
        else:
            self._complete(attempt, payload)

    def _complete(self, attempt: _Attempt, payload: dict) -> None:
        job = attempt.job
        replace_with(payload["artifacts"], self.study_dir / "runs" / job.id)
        result = _with_driver_paths(payload["result"], payload["paths"])
        crash_point("before_complete")
        if self.store.complete(job.id, self.owner, result):
            self.run.ran.append(job.id)
            self.bar.update(1)
            where = payload["where"]
            self._log(f"done {job.label} in {payload['timing']['task_s']:.1f} s on {where['host']} "
                      f"(GPUs {','.join(where['gpu_ids']) or 'none'})")
        else:
            self._log(f"note: {job.label} was taken over by another runner; its result is kept, not ours")
        self.finished.add(job.id)
        crash_point("after_complete")

    def _failed(self, attempt: _Attempt, error: dict, where: dict | None = None) -> None:
        job = attempt.job
        self.store.fail(job.id, self.owner, error["message"] + "\n" + error.get("traceback", ""))
        self.failures[job.id] += 1
        on = f" on {where['host']}" if where else ""
        if self.failures[job.id] > self.backend.retries:
            self.finished.add(job.id)
            self.run.failed[job.id] = error["message"]
            self._log(f"FAILED {job.label}{on}: {error['message']}")
        else:
            self._log(f"FAILED {job.label}{on}: {error['message']} (retry {self.failures[job.id]} of "
                      f"{self.backend.retries})")

    def _lost(self, attempt: _Attempt, exc: Exception) -> None:
        job = attempt.job
        message = f"worker lost ({type(exc).__name__})"
        self.store.fail(job.id, self.owner, message + "\n" + str(exc)[:2000])
        self.lost[job.id] += 1
        if self.lost[job.id] > MAX_LOST:
            self.finished.add(job.id)
            self.run.failed[job.id] = f"{message} {self.lost[job.id]} times"
            self._log(f"FAILED {job.label}: {message} {self.lost[job.id]} times; giving up")
            return
        point = _resume_point(self.study_dir / "runs" / job.id)
        self._log(f"LOST {job.label}: {message}; rerunning "
                  + (f"from {point}" if point else "from the start (no checkpoint reached the driver)"))

    def _log(self, line: str) -> None:
        tqdm.write(line, file=sys.stderr)


def _data_source(spec: dict) -> str | None:
    """The data folder a job reads (``builtin:demo``, a path, or None for the hub or a kind that reads none)."""
    return (spec.get("data") or {}).get("source")


def _resume_point(out: Path) -> str | None:
    """What a rerun of the job starts from: its finished adapter, its newest checkpoint, or nothing."""
    if (out / "train" / "adapter" / "adapter_config.json").is_file():
        return "its trained adapter"
    steps = sorted((p for p in (out / "train" / "checkpoints").glob("step-*")), key=lambda p: int(p.name[5:]))
    return f"checkpoint {steps[-1].name}" if steps else None


def _with_driver_paths(result: dict, paths: dict[str, str]) -> dict:
    """The result with the worker's temporary paths replaced by the driver's (where the artifacts now are), so
    the store holds what the local runner would have recorded."""
    text = json.dumps(result)
    for local in sorted(paths, key=len, reverse=True):
        text = text.replace(json.dumps(local)[1:-1], json.dumps(paths[local])[1:-1])
    return json.loads(text)


def run_on_ray(run, backend: Backend, *, progress: bool = True, desc: str = "study") -> None:
    """Run ``run.jobs`` (already registered in the store) on a Ray cluster; fills ``run`` like the local loop.
    A caller that already called ``ray.init`` keeps its connection (and ``backend.address`` is not used)."""
    owned = not ray.is_initialized()
    if owned:
        connect(backend)
    try:
        _Driver(run, backend, progress, desc).loop()
    finally:
        if owned:
            ray.shutdown()
