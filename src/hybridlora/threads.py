"""CPU threads per process: the cores this process may use, shared fairly among the hybridlora processes using them.

Why: torch sizes its intra-op thread pool to every core of the machine. Two hybridlora processes on two cores then
run four spinning threads that fight for two cores: two study runners took 575 s where one took 52 s, and with one
thread each 41 s (issue 16). So each computing command registers itself in a per-user folder of live hybridlora
processes and takes ``usable cores // live processes`` threads, no more than the cores that other work (the load
average) leaves idle, and at least one; a study runner re-balances between jobs as runners come and go.

Order of precedence: ``--threads N``, then $HYBRIDLORA_THREADS, then $OMP_NUM_THREADS (an explicit choice of the
standard variable, e.g. by Ray for its workers), then the automatic choice.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "HYBRIDLORA_THREADS"
REGISTRY_ENV = "HYBRIDLORA_PROCESS_DIR"  # where live processes register (tests point it at a temporary folder)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cores: int
    processes: int
    source: str  # "--threads", "$HYBRIDLORA_THREADS", "$OMP_NUM_THREADS" or "auto"
    other_load: float = 0.0

    def describe(self) -> str:
        if self.source == "auto":
            busy = f", other load {self.other_load:.1f}" if self.other_load >= 0.5 else ""
            return (f"threads: {self.threads} ({self.cores} usable cores shared by {self.processes} hybridlora "
                    f"process{'es' if self.processes != 1 else ''}{busy}; --threads N or ${THREADS_ENV} overrides)")
        if self.source.startswith(("--", "$")):
            return f"threads: {self.threads} (from {self.source}; {self.cores} usable cores)"
        return f"threads: {self.threads} ({self.source}; {self.cores} usable cores)"


def threads_for(cores: int, processes: int, other_load: float = 0.0) -> int:
    """An equal share of the cores, no more than the cores other work leaves idle, at least one thread.

    Why the load: on a machine whose cores other programs keep busy, a second spinning thread only waits for a
    core (measured: one demo runner with 2 threads at load ~10 on 2 cores took 5x as long as with 1)."""
    idle = cores - int(other_load + 0.5)
    return max(1, min(cores // max(1, processes), idle))


# --- cores ----------------------------------------------------------------------------------------
def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    """Whole cores allowed by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None


def other_load() -> float:
    """Runnable threads of other work on this process's cores: the 1-minute load average, scaled to the cores
    this process may use, minus this process's own threads while it computes."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    machine = os.cpu_count() or 1
    own = _current.threads if _current is not None else 0
    return max(0.0, load * min(1.0, usable_cores() / machine) - own)


# --- live hybridlora processes -------------------------------------------------------------------------
def _registry() -> Path:
    base = os.environ.get(REGISTRY_ENV) or Path(tempfile.gettempdir()) / f"hybridlora-{os.getuid()}-processes"
    return Path(base)


def process_start_time(pid: int) -> str | None:
    """The process's start time (tells a reused pid from the original), None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    if Path("/proc").is_dir():
        now = process_start_time(pid)
        return now is not None and now == start
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def _cores_set() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


_registered: Path | None = None


def register_process() -> None:
    """Enter this process in the registry until it exits (idempotent; best effort: a read-only /tmp only means
    this process is not counted by others)."""
    global _registered
    if _registered is not None:
        return
    pid = os.getpid()
    entry = _registry() / str(pid)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{pid}.tmp")
        tmp.write_text(json.dumps({"start": process_start_time(pid), "cores": _cores_set()}))
        os.replace(tmp, entry)
    except OSError:
        return
    _registered = entry
    atexit.register(unregister_process)


def unregister_process() -> None:
    global _registered
    if _registered is not None:
        try:
            _registered.unlink()
        except OSError:
            pass
        _registered = None


def live_processes() -> int:
    """Registered hybridlora processes alive now that share a core with this one (this one included)."""
    mine = set(_cores_set())
    count = 0
    try:
        entries = [p for p in _registry().iterdir() if p.name.isdigit()]
    except OSError:
        entries = []
    for entry in entries:
        pid = int(entry.name)
        try:
            info = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue  # being written or removed right now
        if pid != os.getpid() and not _alive(pid, info.get("start")):
            try:
                entry.unlink()  # its process died without unregistering (kill -9)
            except OSError:
                pass
            continue
        if pid == os.getpid() or mine & set(info.get("cores") or mine):
            count += 1
    return max(1, count + (0 if _registered is not None else 1))


# --- the choice ---------------------------------------------------------------------------------------
_current: ThreadChoice | None = None  # what configure()/rebalance() last applied in this process
_explicit = False  # the user fixed the number (option or variable): no re-balancing between jobs


def add_option(parser) -> None:
    """``--threads N`` on a command that computes."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"CPU threads for this process (default: the usable cores divided among the running "
                             f"hybridlora processes; also ${THREADS_ENV})")


def parse_threads(value, source: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1 or n > 4096:
        raise ValueError(f"{source}={value!r}: give a whole number of threads between 1 and 4096")
    return n


def choose(requested: int | None = None) -> ThreadChoice:
    """What this process should use now (see the module docstring for the order of precedence)."""
    cores = usable_cores()
    for value, source in ((requested, "--threads"), (os.environ.get(THREADS_ENV), f"${THREADS_ENV}"),
                          (os.environ.get("OMP_NUM_THREADS"), "$OMP_NUM_THREADS")):
        if value not in (None, ""):
            return ThreadChoice(parse_threads(value, source), cores, 1, source)
    return _automatic(cores)


def _automatic(cores: int) -> ThreadChoice:
    processes, busy = live_processes(), other_load()
    return ThreadChoice(threads_for(cores, processes, busy), cores, processes, "auto", round(busy, 1))


def apply(choice: ThreadChoice) -> ThreadChoice:
    """Size torch's intra-op pool (OpenMP and MKL); safe to call again between jobs. The environment is left
    alone: a child process makes its own choice."""
    global _current
    import torch

    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    try:  # only possible before the first inter-op parallel work; the pool is rarely used, so best effort
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:
        pass
    _current = choice
    return choice


def configure(requested: int | None = None) -> ThreadChoice:
    """Register this process and size its threads; called by every command that computes, before any work."""
    global _explicit
    register_process()
    choice = choose(requested)
    _explicit = choice.source != "auto"
    return apply(choice)


def pin(threads: int, reason: str) -> ThreadChoice:
    """Fix this process's threads for the rest of its work (no re-balancing between jobs), as an explicit choice
    would, and hand the same number to the processes it starts. Why: a float sum split over another number of
    threads rounds differently, so results that must not depend on the machine's load need a fixed count."""
    global _explicit
    register_process()
    _explicit = True
    return apply(ThreadChoice(threads, usable_cores(), 1, reason))


def busy_cores_now(sample_s: float = 0.2) -> float | None:
    """Cores busy with other work over the next ``sample_s`` seconds (``/proc/stat``, scaled to the cores this
    process may use; this process sleeps meanwhile), None where that cannot be read."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # all jiffies, idle + iowait

    try:
        total0, idle0 = read()
        time.sleep(sample_s)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    machine = os.cpu_count() or 1
    return (1 - (idle1 - idle0) / (total1 - total0)) * machine * min(1.0, usable_cores() / machine)


def spare_cores() -> int:
    """How many single-threaded runner processes this process could start without oversubscribing: its share of
    the usable cores among the live hybridlora processes, less the cores other work keeps busy, at least one.
    Other work is the smaller of the load average and a short sample of the cores' idle time: the load average
    lags by a minute, so right after a run it still counts that run's finished processes. Meant for work whose
    tiny tensors leave a multi-threaded process mostly single-core."""
    busy = other_load()
    now = busy_cores_now()
    if now is not None:
        busy = min(busy, now)
    return threads_for(usable_cores(), live_processes(), busy)


def explicit_threads() -> int | None:
    """The thread count the user fixed for this process (option or variable), to hand to the processes it starts;
    None when the choice is automatic (each of them then makes its own)."""
    return _current.threads if _explicit and _current is not None else None


@contextmanager
def standing_aside():
    """While this process only waits for the processes it started: not counted among those sharing the cores."""
    was_registered = _registered is not None
    unregister_process()
    try:
        yield
    finally:
        if was_registered:
            register_process()


def current() -> str | None:
    """The line describing the threads chosen in this process (for run logs), None before :func:`configure`."""
    return _current.describe() if _current is not None else None


def rebalance() -> ThreadChoice | None:
    """Between jobs: the automatic choice again (processes may have started or stopped); None when the user
    fixed the number, when nothing changed, or in a process that never called :func:`configure` (a library
    caller, a Ray worker: their threads are theirs to set)."""
    import torch

    if _explicit or _current is None:
        return None
    choice = _automatic(usable_cores())
    return None if torch.get_num_threads() == choice.threads else apply(choice)
