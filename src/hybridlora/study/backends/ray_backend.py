"""The Ray backend: one driver owns the study's SQLite store; every job is a Ray task in a fresh worker process,
except jobs of kinds that may follow one another in one process (``JOB_KEEPS_PROCESS``: ablation conditions),
which run one after another in kept worker processes (Ray actors, each holding its GPU), reusing what the
process caches, and groups of jobs that share their forwards (``JOB_GROUPS``), which run as one task.

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
from ..jobs import (CRASH_ONCE_ENV, JOB_INPUTS, JOB_KEEPS_PROCESS, JOB_KINDS, JOB_USES_GPU, crash_point, group_rule,
                    spec_value)
from ..store import HEARTBEAT_S, Store, make_owner, release_owner
from . import Backend, BackendError
from .transfer import pack, replace_with
from .worker import JobProcess, run_remote_jobs

WAIT_S = 1.0  # how often the driver looks at events (job started, checkpoint arrived) between results
MAX_LOST = 3  # reruns of a job whose worker or node died, before it is recorded failed
FORWARDED_ENV = ("PYTHONPATH", "HYBRIDLORA_KERNEL_CACHE", CRASH_ONCE_ENV)  # the driver's values reach every worker


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
        self.rules = {j.id: group_rule(j.spec) for j in run.jobs}  # jobs that may share their forwards
        self.inflight: dict = {}  # ObjectRef -> [_Attempt] (one job, or a group run together)
        self.failures, self.lost, self.submitted = Counter(), Counter(), Counter()
        self.finished: set[str] = set()  # complete, or given up, in this run
        self.events = ray.remote(num_cpus=0)(JobEvents).remote()
        self.task = ray.remote(max_calls=1)(run_remote_jobs)  # a fresh process per job: GPU memory returned
        self.kept = ray.remote(JobProcess)  # a process kept across jobs, for kinds in JOB_KEEPS_PROCESS
        self.idle: dict[str, list] = {}  # kind -> kept processes with no job now (they still hold their resources)
        self.running_on: dict = {}  # ObjectRef -> the kept process running it
        self.inputs: dict[tuple, object] = {}  # (form, path) -> ObjectRef of its bytes, put once, shared by all jobs
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
            self._retire_idle()
            self.bar.close()
            self.beat.stop()
            release_owner(self.owner)
            self.run.counts = self.store.counts(self.ids)
            self.store.close()

    def _fill(self) -> None:
        while len(self.inflight) < self._slots():
            busy = {a.job.id for attempts in self.inflight.values() for a in attempts}
            skip = self.finished | busy
            job = self.store.claim(self.owner, skip=skip, ids=self.ids)
            if job is None:
                self._retire_idle()  # nothing left to start: kept processes give their GPUs back
                return
            group = self.store.claim_partners(self.owner, job, self.rules, skip)
            crash_point("claimed")
            self._submit(group)

    def _submit(self, group: list) -> None:
        tasks, inputs, priors, attempts = [], [], [], []
        for job in group:
            self.submitted[job.id] += 1
            token = f"{job.id}#{self.submitted[job.id]}"
            out = self.study_dir / "runs" / job.id
            prior = pack(out, keep=lambda rel: not rel.parts[0].startswith(".")) if out.is_dir() else None
            resumed_from = _resume_point(out) if prior else None
            tasks.append({"job_id": job.id, "token": token, "spec": job.spec, "kind_path": JOB_KINDS.get(job.kind),
                          "study_dir": str(self.study_dir), "resumed_from": resumed_from})
            inputs.append(self._input_refs(job))
            priors.append(prior)
            attempts.append(_Attempt(job, token, resumed_from))
        kind = group[0].kind
        gpus, cpus = self._needs(kind)
        if JOB_KEEPS_PROCESS.get(kind):
            process = self._kept_process(kind, gpus, cpus)
            ref = process.run.remote(tasks, inputs, priors, self.events)
            self.running_on[ref] = (kind, process)
        else:
            self._retire_idle()  # their resources, for a fresh process
            options = dict(num_gpus=gpus, num_cpus=cpus, max_retries=0, retry_exceptions=False,
                           name=f"hybridlora:{group[0].id}")
            ref = self.task.options(**options).remote(tasks, inputs, priors, self.events)
        self.inflight[ref] = attempts
        self.beat.job_ids.update(job.id for job in group)

    def _kept_process(self, kind: str, gpus: float, cpus: float):
        """An idle kept process of this kind, or a new one (it keeps the resources it asked for until retired)."""
        idle = self.idle.setdefault(kind, [])
        if idle:
            return idle.pop()
        self._retire_idle()  # those of other kinds: their resources, for this one (else it could wait forever)
        return self.kept.options(num_gpus=gpus, num_cpus=cpus, max_restarts=0, max_task_retries=0).remote()

    def _retire(self, process) -> None:
        ray.kill(process, no_restart=True)

    def _retire_idle(self) -> None:
        for processes in self.idle.values():
            for process in processes:
                self._retire(process)
        self.idle.clear()

    def _input_refs(self, job) -> list[dict]:
        """What the job reads (``JOB_INPUTS`` of its kind) that exists here, each put once per run and shared by
        every job: a folder as a tar, a file as its bytes; ``builtin:demo`` as the study's data folder."""
        items = []
        for key in JOB_INPUTS.get(job.kind, ()):
            value = spec_value(job.spec, key)
            if not isinstance(value, str) or not value:
                continue
            path = self.study_dir / "data" if value == BUILTIN_DATA else Path(value)
            form = "folder" if path.is_dir() else "file" if path.is_file() else None
            if form is None:
                continue  # a hub id, a known domain name: the worker resolves it itself
            if value == BUILTIN_DATA:
                form = "builtin"
            ident = (form, str(path))
            if ident not in self.inputs:
                self.inputs[ident] = ray.put(pack(path) if form != "file" else path.read_bytes())
            items.append({"key": key, "form": form, "source": value, "ref": self.inputs[ident]})
        return items

    # ------------------------------------------------------------ events and results
    def _current(self, token: str) -> _Attempt | None:
        return next((a for attempts in self.inflight.values() for a in attempts if a.token == token), None)

    def _drain_events(self) -> None:
        for event in ray.get(self.events.drain.remote()):
            attempt = self._current(event[1])
            if attempt is None:
                continue  # from an attempt already given up (a worker the driver counted lost)
            if event[0] == "started":
                where = event[2]
                gpus = ",".join(where["gpu_ids"]) or "none"
                resumed = f", resuming from {attempt.resumed_from}" if attempt.resumed_from else ""
                before = where.get("jobs_before_in_process")
                kept = f" (kept process, {before} job{'s' if before > 1 else ''} before)" if before else ""
                self._log(f"started {attempt.job.label} [{attempt.job.id}] on {where['host']} ({where['node_ip']}, "
                          f"node {where['node_id'][:8]}), GPUs {gpus}, pid {where['pid']}{kept}{resumed}")
            else:
                replace_with(event[3], self.study_dir / "runs" / attempt.job.id)
                crash_point("checkpoint")

    def _finish(self, ref, attempts: list[_Attempt]) -> None:
        kept = self.running_on.pop(ref, None)
        for attempt in attempts:
            self.beat.job_ids.discard(attempt.job.id)
        try:
            payloads = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task wrapper itself raised (inputs could not unpack)
            error = {"message": str(exc).strip().splitlines()[-1], "traceback": str(exc)}
            payloads = [{"error": error} for _ in attempts]
        except ray.exceptions.RayError as exc:  # the worker process or its node died
            for attempt in attempts:
                self._lost(attempt, exc)
            return
        for attempt, payload in zip(attempts, payloads):
            if "error" in payload:
                self._failed(attempt, payload["error"], payload.get("where"))
            else:
                self._complete(attempt, payload)
        if kept is not None:
            kind, process = kept
            if any("error" in p for p in payloads):
                self._retire(process)  # a process whose job raised may hold a broken state: the next gets a new one
            else:
                self.idle.setdefault(kind, []).append(process)

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
