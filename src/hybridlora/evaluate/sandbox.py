"""Sandboxed execution of untrusted, model-generated Python code (HumanEval pass@1).

HumanEval (:func:`run_humaneval`): only the candidate function runs in here.  The sandboxed worker
loads prompt + completion and then serves calls of the entry point on its stdin/stdout (a pipe);
the problem's tests run in a separate *trusted* process (``trusted_check.py``) that calls the
candidate through that pipe, where only plain data crosses (``plain_data.py``), and that alone
decides "passed".  Nothing the completion does in the sandbox can produce a pass.
:func:`run_program` (passed = exit status 0) is for general programs, not for scoring.

Every program runs in its own short-lived process tree, built by a small *launcher* (this
very file run as a script: ``python -I -S sandbox.py --hybridlora-sandbox-launch CONFIG``)::

    caller (run_program)                      -- waits with a wall-clock timeout, then kills
      └─ launcher   (own session/process group, root if the caller is root)
           └─ init  (pid 1 of a fresh PID namespace, when available; reaps, relays status)
                └─ worker -> exec python -I -S -B -c RUNNER   (unprivileged, limited)

Protection layers, each one independent of the others (defence in depth):

* scrubbed environment (minimal PATH/LANG/HOME/TMPDIR only) and a fresh private working
  directory used as cwd, HOME and TMPDIR, removed afterwards;
* own session / process group; the whole group is SIGKILLed when the run ends, also on success;
* resource limits set in the worker before exec: RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE,
  RLIMIT_NOFILE, RLIMIT_NPROC, RLIMIT_CORE=0 (and RLIMIT_MEMLOCK/RLIMIT_MSGQUEUE=0);
* when running as root: the worker drops to a *dedicated* unprivileged uid/gid taken from a
  private range (one uid per concurrent run, guarded by a lock file so that concurrent
  evaluation processes never share one).  It therefore cannot signal the caller, RLIMIT_NPROC
  counts only its own processes, and after the run every process still owned by that uid is
  killed (a "uid sweep"), which catches daemons that escaped the process group;
* Linux namespaces when permitted: network (no interface but a downed loopback: nothing can
  be reached), IPC, mount (fresh size-limited tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock,
  so nothing written there outlives the run and the host's temporary files are invisible),
  and PID (the sandbox sees only itself; when its init exits the kernel kills everything
  left inside; /proc is remounted so host processes are not even visible);
* PR_SET_NO_NEW_PRIVS and a seccomp-BPF filter (x86-64): no sockets, no new processes
  (threads are allowed), signals only to itself, no ptrace / namespaces / mount / io_uring /
  bpf / keyrings;
* Landlock (works without root too): the file system is read-only and limited to the
  interpreter and system directories (/usr, /lib*, /bin, /etc, own /proc entry), writable
  only inside the working directory; TCP bind/connect is denied (ABI >= 4); signals and
  abstract unix sockets cannot leave the sandbox (ABI >= 6);
* an in-interpreter guard prelude executed before the untrusted code: process spawning,
  signalling, socket creation and ``ctypes`` are disabled, ``os._exit`` raises SystemExit.

Without root only the rlimits (but RLIMIT_NPROC), seccomp, Landlock, the guard, the
process group and the scrubbed environment remain; namespaces and the uid drop need root.

The layers really in force on this machine are reported by :func:`protections` (obtained by
running a probe program through the sandbox), and any layer that could not be established is
reported loudly through :mod:`warnings` (:class:`SandboxWarning`) and :mod:`logging`.

The launcher part of this file (up to the ``__main__`` dispatch) deliberately imports only
cheap built-in modules, because it is started once per program.
"""
from __future__ import annotations

import marshal
import os
import sys

_LAUNCH_FLAG = "--hybridlora-sandbox-launch"

# Layers that a caller may switch off (tests use this to exercise the remaining layers).
DISABLEABLE_LAYERS = frozenset(
    {"python_guard", "seccomp", "landlock", "net_namespace", "ipc_namespace", "mount_namespace", "pid_namespace"}
)

# Linux constants (x86-64 / generic values; the seccomp table is x86-64 only).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_CLONE_THREAD = 0x00010000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_PDEATHSIG = 1
_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2
_SIGKILL = 9
_EXIT_SANDBOX_ERROR = 70

# Directories that any user may write into; inside the mount namespace each gets a fresh tmpfs.
_WORLD_WRITABLE_CANDIDATES = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")
_NS_WORKDIR = "/tmp/sandbox"
_NS_PYTHON_MOUNT = "/tmp/.sandbox-python"

# The guard prelude and program runner, executed by the sandboxed interpreter via ``-c`` after the
# source of plain_data.py.  argv: program path, strict-exit flag ("1"/"0"), guard flag ("1"/"0"),
# entry point to serve ("" = run the program for its exit status).
_RUNNER_SRC = r'''
import sys

def _sandbox_guard():
    import posix, os

    def deny(what):
        def denied(*args, **kwargs):
            raise PermissionError("sandbox: %s is disabled" % what)
        denied.__name__ = what.rsplit(".", 1)[-1]
        return denied

    blocked = (
        "fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp",
        "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
        "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "fexecve",
        "kill", "killpg", "setsid", "setpgid", "setpgrp", "pidfd_open", "plock",
        "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid", "setregid",
        "setresgid", "setgroups", "unshare", "setns", "chroot",
    )
    for module in (posix, os):
        for name in blocked:
            if hasattr(module, name):
                setattr(module, name, deny("os." + name))

    def guarded_exit(code=0):
        raise SystemExit(code)
    posix._exit = os._exit = guarded_exit

    import _posixsubprocess
    _posixsubprocess.fork_exec = deny("subprocess")
    import _signal
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(_signal, name):
            setattr(_signal, name, deny("signal." + name))
    if "signal" in sys.modules:
        for name in ("pthread_kill", "pidfd_send_signal"):
            if hasattr(sys.modules["signal"], name):
                setattr(sys.modules["signal"], name, deny("signal." + name))

    import _socket

    class socket(_socket.socket):
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: socket creation is disabled")

    _socket.socket = _socket.SocketType = socket
    for name in ("socketpair", "fromfd"):
        if hasattr(_socket, name):
            setattr(_socket, name, deny("socket." + name))
    for name in ("ctypes", "_ctypes", "cffi", "_cffi_backend", "multiprocessing", "_multiprocessing"):
        sys.modules[name] = None


def _serve(entry, channel_in, channel_out, finish):
    """Answer the trusted checker's calls of ``entry`` until it closes the channel."""
    import os
    function = sys.modules["__main__"].__dict__.get(entry)
    if not callable(function):
        write_message(channel_out, ["load_error", "the completion does not define %s()" % entry])
        finish(1)
    write_message(channel_out, ["ready"])
    while True:
        try:
            request = read_message(channel_in)
        except EOFError:
            finish(0)
        _, args, kwargs = request
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:
            import traceback
            names = [cls.__name__ for cls in type(exc).__mro__]
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-1000:]
            write_message(channel_out, ["raise", names, text])
            continue
        try:
            reply = encode(["return", result, args])
        except PlainDataError as exc:
            write_message(channel_out, ["not_plain", str(exc)])
            continue
        os.write(channel_out, len(reply).to_bytes(4, "little") + reply)


def _sandbox_main():
    import builtins, os, types
    path, strict, guard, entry = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4]
    real_exit = os._exit
    if entry:  # the channel is on fds 0/1; the program's own stdin/stdout go to /dev/null
        channel_in, channel_out = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)

    def finish(code):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        real_exit(code)

    try:
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        code = compile(source, path, "exec", dont_inherit=True)
    except BaseException as exc:
        import traceback
        text = "".join(traceback.format_exception_only(type(exc), exc))
        sys.stderr.write(text)
        if entry:
            write_message(channel_out, ["load_error", text[-1500:]])
        finish(1)
    if guard:
        _sandbox_guard()
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [path]
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        if entry:  # loading the completion must finish normally
            sys.stderr.write("sandbox: the program exited early via SystemExit(%r)\n" % (exc.code,))
            write_message(channel_out, ["load_error", "SystemExit(%r) while loading the completion" % (exc.code,)])
            finish(1)
        if strict:
            sys.stderr.write("sandbox: the program exited early via SystemExit(%r) "
                             "before its tests finished\n" % (exc.code,))
            finish(1)
        if exc.code is None:
            finish(0)
        if isinstance(exc.code, int):
            finish(exc.code & 0xFF)
        sys.stderr.write("%s\n" % (exc.code,))
        finish(1)
    except BaseException as exc:
        import traceback
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        sys.stderr.write(text)
        if entry:
            write_message(channel_out, ["load_error", text[-1500:]])
        finish(1)
    if entry:
        _serve(entry, channel_in, channel_out, finish)
    finish(0)

_sandbox_main()
'''


# ======================================================================= launcher side
# Everything up to the ``__main__`` dispatch runs inside the launcher process.

def _record(fd: int, **entry) -> None:
    """Append one length-prefixed marshal record to the report file."""
    data = marshal.dumps(entry)
    os.write(fd, len(data).to_bytes(4, "little") + data)


def _err_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return f"{type(exc).__name__}: [{os.strerror(exc.errno)}] {exc.args[-1] if exc.args else ''}".strip()
    return f"{type(exc).__name__}: {exc}"


class _Libc:
    """Thin ctypes wrapper around the few libc calls the launcher needs."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.unshare.argtypes = [ctypes.c_int]
        self.lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        self.lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int, what: str) -> None:
        self._check(self.lib.unshare(flags), f"unshare({what})")

    def mount(self, source, target, fstype, flags: int, data=None) -> None:
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        self._check(self.lib.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

    def prctl(self, option: int, arg2, what: str) -> None:
        self._check(self.lib.prctl(option, arg2, 0, 0, 0), what)


def _seccomp_program(self_pid: int) -> list[tuple[int, int, int, int]]:
    """Classic-BPF seccomp filter (x86-64 syscall numbers)."""
    audit_arch_x86_64 = 0xC000003E
    nr_clone, nr_clone3 = 56, 435
    self_only = (62, 200, 234, 129, 297)  # kill tkill tgkill rt_sigqueueinfo rt_tgsigqueueinfo
    denied = (
        41, 53,  # socket socketpair
        57, 58,  # fork vfork
        101, 310, 311,  # ptrace process_vm_readv process_vm_writev
        272, 308,  # unshare setns
        165, 166, 155, 161,  # mount umount2 pivot_root chroot
        425, 426, 427,  # io_uring_setup/enter/register
        321, 298, 323,  # bpf perf_event_open userfaultfd
        248, 249, 250,  # add_key request_key keyctl
        424, 438,  # pidfd_send_signal pidfd_getfd
    )
    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    prog: list = []  # entries: (code, jt_label_or_0, jf_label_or_0, k)

    prog.append((ld_w_abs, 0, 0, 4))  # seccomp_data.arch
    prog.append((jeq, 0, "kill", audit_arch_x86_64))
    prog.append((ld_w_abs, 0, 0, 0))  # seccomp_data.nr
    prog.append((jge, "eperm", 0, 0x40000000))  # x32 ABI: refuse
    prog.append((jeq, "clone", 0, nr_clone))
    prog.append((jeq, "enosys", 0, nr_clone3))  # glibc falls back to clone()
    for nr in self_only:
        prog.append((jeq, "self", 0, nr))
    for nr in denied:
        prog.append((jeq, "eperm", 0, nr))
    prog.append((ret, 0, 0, allow))
    labels = {}
    labels["clone"] = len(prog)
    prog.append((ld_w_abs, 0, 0, 16))  # args[0] low word: clone flags
    prog.append((jset, "allow", "eperm", _CLONE_THREAD))
    labels["self"] = len(prog)
    prog.append((ld_w_abs, 0, 0, 16))  # args[0] low word: target pid
    prog.append((jeq, "allow", "eperm", self_pid))
    labels["allow"] = len(prog)
    prog.append((ret, 0, 0, allow))
    labels["eperm"] = len(prog)
    prog.append((ret, 0, 0, eperm))
    labels["enosys"] = len(prog)
    prog.append((ret, 0, 0, enosys))
    labels["kill"] = len(prog)
    prog.append((ret, 0, 0, kill))

    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise ValueError("seccomp jump out of range")
        out.append((code, jt, jf, k))
    return out


def _install_seccomp(libc: _Libc) -> None:
    machine = os.uname().machine  # no imports here: the stdlib may be unreadable after the uid drop
    if machine != "x86_64":
        raise OSError(0, f"seccomp filter table not available for {machine}")
    ctypes = libc.ctypes

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    insns = _seccomp_program(os.getpid())
    array = (SockFilter * len(insns))(*[SockFilter(*insn) for insn in insns])
    prog = SockFprog(len(insns), ctypes.cast(array, ctypes.POINTER(SockFilter)))
    rc = libc.lib.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


# Landlock access rights (ABI 1..5) and scopes (ABI 6).
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1, 2, 4, 8
_LL_MAKE_CHAR, _LL_MAKE_BLOCK = 64, 2048
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV
_LL_READ_RIGHTS = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
_NR_LANDLOCK_CREATE_RULESET, _NR_LANDLOCK_ADD_RULE, _NR_LANDLOCK_RESTRICT_SELF = 444, 445, 446


def _landlock_ruleset(libc: _Libc, rules: list) -> tuple[int, dict]:
    """Create a Landlock ruleset: only ``rules`` ((path, rights) pairs) stay accessible, TCP
    bind/connect is denied (ABI >= 4), and signals / abstract unix sockets are scoped to the
    sandbox (ABI >= 6).  Returns (ruleset fd, layer report)."""
    ctypes = libc.ctypes
    syscall = libc.lib.syscall
    syscall.restype = ctypes.c_long

    def call(*args) -> int:
        rc = syscall(*[a if isinstance(a, ctypes.Array) else ctypes.c_long(a) for a in args])
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock syscall {args[0]}: {os.strerror(err)}")
        return rc

    abi = call(_NR_LANDLOCK_CREATE_RULESET, 0, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    handled = (1 << 13) - 1
    handled |= _LL_REFER if abi >= 2 else 0
    handled |= _LL_TRUNCATE if abi >= 3 else 0
    handled |= _LL_IOCTL_DEV if abi >= 5 else 0
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = (handled.to_bytes(8, "little") + net.to_bytes(8, "little") + scoped.to_bytes(8, "little"))[:size]
    fd = call(_NR_LANDLOCK_CREATE_RULESET, ctypes.create_string_buffer(attr, size), size, 0)
    try:
        for path, rights in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # absent on this system
            try:
                if os.fstat(pfd).st_mode & 0o170000 != 0o040000:  # not a directory
                    rights &= _LL_FILE_RIGHTS
                rule = (rights & handled).to_bytes(8, "little") + pfd.to_bytes(4, "little", signed=True)
                call(_NR_LANDLOCK_ADD_RULE, fd, 1, ctypes.create_string_buffer(rule, 12), 0)
            finally:
                os.close(pfd)
    except BaseException:
        os.close(fd)
        raise
    report = {
        "landlock_fs": True,
        "landlock_tcp": True if net else f"needs Landlock ABI 4 (kernel has ABI {abi})",
        "landlock_signals": True if scoped else f"needs Landlock ABI 6 (kernel has ABI {abi})",
        "landlock_detail": f"Landlock ABI {abi}",
    }
    return fd, report


def _landlock_restrict(libc: _Libc, fd: int) -> None:
    ctypes = libc.ctypes
    rc = libc.lib.syscall(ctypes.c_long(_NR_LANDLOCK_RESTRICT_SELF), ctypes.c_long(fd), ctypes.c_long(0))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")


class _Launcher:
    def __init__(self, cfg: dict, report_fd: int) -> None:
        self.cfg = cfg
        self.report_fd = report_fd
        self.disabled = set(cfg["disable"])
        self.uid = cfg["uid"]
        self.gid = cfg["gid"]
        self.layers: dict = {}
        self.python = cfg["python"]
        self.extra_env: dict = {}
        self.workdir = cfg["host_workdir"]
        self.mount_ns = False
        self.libc: _Libc | None = None

    # -- helpers -----------------------------------------------------------------------
    def _wanted(self, layer: str) -> bool:
        if layer in self.disabled:
            self.layers[layer] = "disabled by caller"
            return False
        return True

    def _access_failures(self, checks: list) -> list:
        """Paths the sandbox uid could not use (checked with the launcher's euid switched)."""
        os.setegid(self.gid)
        os.seteuid(self.uid)
        try:
            return [path for path, mode in checks if not os.access(path, mode, effective_ids=True)]
        finally:
            os.seteuid(0)
            os.setegid(0)

    def _python_checks(self, python: str, prefix_from: str | None = None, prefix_to: str | None = None) -> list:
        def remap(path: str) -> str:
            if prefix_from and path.startswith(prefix_from):
                return prefix_to + path[len(prefix_from):]
            return path

        checks = [(python, os.X_OK)]
        if self.cfg["stdlib"]:
            checks.append((remap(os.path.join(self.cfg["stdlib"], "os.py")), os.R_OK))
        if self.cfg["libdir"] and os.path.isdir(self.cfg["libdir"]):
            checks.append((remap(self.cfg["libdir"]), os.X_OK))
        return checks

    # -- stages ------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.libc = _Libc()
        except Exception as exc:  # pragma: no cover - ctypes missing
            self.layers["ctypes"] = _err_text(exc)
        if self.libc is not None:
            self.libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != self.cfg["parent_pid"]:
            return _EXIT_SANDBOX_ERROR  # caller already gone
        with open(self.cfg["program"], "rb") as handle:
            program = handle.read()
        as_root = os.geteuid() == 0
        if as_root:
            os.setgroups([])
        self._namespaces(as_root)
        self._prepare_workdir(program)
        self._choose_interpreter(as_root)
        self._pid_namespace(as_root)
        _record(self.report_fd, layers=self.layers)

        pid = os.fork()
        if pid == 0:  # child: init of the PID namespace, or directly the worker
            if self.layers.get("pid_namespace") is True:
                self._init_main()
            else:
                self._worker_main()
            os._exit(_EXIT_SANDBOX_ERROR)  # not reached
        self._close_channel()  # only the worker may hold it: its death must close the channel
        # The launcher's exit status mirrors the worker's (exit code, or 128 + signal number),
        # so the caller can cross-check the report file.
        if self.layers.get("pid_namespace") is True:
            _, status = os.waitpid(pid, 0)
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        return self._reap_worker(pid)

    def _namespaces(self, as_root: bool) -> None:
        libc = self.libc
        not_root = "needs root (CAP_SYS_ADMIN); the sandbox is not running as root"
        for layer, flag in (("net_namespace", _CLONE_NEWNET), ("ipc_namespace", _CLONE_NEWIPC)):
            if not self._wanted(layer):
                continue
            if not as_root or libc is None:
                self.layers[layer] = not_root if libc else "ctypes unavailable"
                continue
            try:
                libc.unshare(flag, layer)
                self.layers[layer] = True
            except OSError as exc:
                self.layers[layer] = _err_text(exc)
        if not self._wanted("mount_namespace"):
            return
        if not as_root or libc is None:
            self.layers["mount_namespace"] = not_root if libc else "ctypes unavailable"
            return
        try:
            libc.unshare(_CLONE_NEWNS, "mount_namespace")
            # Never let our mounts propagate back to the host.
            libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        except OSError as exc:
            self.layers["mount_namespace"] = _err_text(exc)
            return
        failures, seen = [], set()
        tmpfs_mb = self.cfg["tmpfs_mb"]
        for path in _WORLD_WRITABLE_CANDIDATES:
            real = os.path.realpath(path)
            if real in seen or not os.path.isdir(real) or not (os.stat(real).st_mode & 0o002):
                continue
            seen.add(real)
            try:
                libc.mount("tmpfs", real, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                           f"size={tmpfs_mb}m,nr_inodes=16384,mode=1777")
                if real == "/tmp":
                    self.mount_ns = True
            except OSError as exc:
                failures.append(_err_text(exc))
        if failures:
            self.layers["mount_namespace"] = "partial: " + "; ".join(failures)
        elif not self.mount_ns:
            self.layers["mount_namespace"] = "no world-writable /tmp to replace"
        else:
            self.layers["mount_namespace"] = True

    def _prepare_workdir(self, program: bytes) -> None:
        if self.mount_ns:
            os.mkdir(_NS_WORKDIR, 0o700)
            if self.uid is not None:
                os.chown(_NS_WORKDIR, self.uid, self.gid)
            self.workdir = _NS_WORKDIR
        if not os.path.isdir(self.workdir):
            raise RuntimeError(f"working directory {self.workdir} is not visible in the sandbox")
        path = os.path.join(self.workdir, "_program.py")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        with os.fdopen(fd, "wb") as handle:
            handle.write(program)
        self.program_path = path

    def _choose_interpreter(self, as_root: bool) -> None:
        if self.uid is None:
            if as_root:
                raise RuntimeError("refusing to run untrusted code as root: no unprivileged uid available")
            self.layers["uid_drop"] = "not running as root: the program runs under the caller's own uid"
            return
        checks = self._python_checks(self.python) + [(self.program_path, os.R_OK)]
        if not self._access_failures(checks):
            self.layers["uid_drop"] = True
            return
        reasons = [f"{self.python} is not usable by the sandbox uid"]
        prefix = self.cfg["python_prefix"]
        if self.mount_ns and prefix and self.python.startswith(prefix + os.sep):
            try:  # expose the interpreter's installation read-only at a path the uid can reach
                os.mkdir(_NS_PYTHON_MOUNT, 0o755)
                self.libc.mount(prefix, _NS_PYTHON_MOUNT, None, _MS_BIND | _MS_REC)
                self.libc.mount(None, _NS_PYTHON_MOUNT, None,
                                _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
                candidate = _NS_PYTHON_MOUNT + self.python[len(prefix):]
                if not self._access_failures(self._python_checks(candidate, prefix, _NS_PYTHON_MOUNT)):
                    self.python = candidate
                    libdir = self.cfg["libdir"]
                    if libdir and libdir.startswith(prefix):
                        self.extra_env["LD_LIBRARY_PATH"] = _NS_PYTHON_MOUNT + libdir[len(prefix):]
                    self.layers["uid_drop"] = True
                    self.layers["interpreter"] = f"{self.cfg['python']} (bind-mounted read-only at {_NS_PYTHON_MOUNT})"
                    return
                reasons.append("relocated interpreter still not usable")
            except OSError as exc:
                reasons.append(_err_text(exc))
        for fallback in self.cfg["fallback_pythons"]:
            if not self._access_failures([(fallback, os.X_OK)]):
                self.python = fallback
                self.layers["uid_drop"] = True
                self.layers["interpreter"] = f"{fallback} (fallback: {'; '.join(reasons)})"
                return
        raise RuntimeError("refusing to run untrusted code as root: " + "; ".join(reasons)
                           + "; no fallback interpreter is usable by the sandbox uid either")

    def _pid_namespace(self, as_root: bool) -> None:
        if not self._wanted("pid_namespace"):
            self.layers["proc_remount"] = "disabled by caller (needs the PID namespace)"
            return
        if not as_root or self.libc is None:
            self.layers["pid_namespace"] = "needs root (CAP_SYS_ADMIN); the sandbox is not running as root"
        else:
            try:
                self.libc.unshare(_CLONE_NEWPID, "pid_namespace")
                self.layers["pid_namespace"] = True
                return
            except OSError as exc:
                self.layers["pid_namespace"] = _err_text(exc)
        self.layers["proc_remount"] = "needs the PID namespace"

    def _reap_worker(self, pid: int) -> int:
        """Wait for the worker (reaping any other child), record how it ended, return its code."""
        while True:
            try:
                wpid, status, usage = os.wait4(-1, 0)
            except ChildProcessError:
                _record(self.report_fd, error="worker vanished without an exit status")
                return _EXIT_SANDBOX_ERROR
            if wpid == pid:
                break
        cpu = usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(status):
            _record(self.report_fd, worker={"signal": os.WTERMSIG(status), "cpu_s": cpu})
            return 128 + os.WTERMSIG(status)
        _record(self.report_fd, worker={"exitcode": os.WEXITSTATUS(status), "cpu_s": cpu})
        return os.WEXITSTATUS(status)

    def _close_channel(self) -> None:
        for fd in self.cfg["channel"] or ():
            try:
                os.close(fd)
            except OSError:
                pass

    def _init_main(self) -> None:
        """PID 1 of the new PID namespace: start the worker, reap, relay its status."""
        try:
            self.libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, "prctl(PR_SET_PDEATHSIG)")
            layers = {}
            if self.mount_ns:
                try:
                    self.libc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
                    layers["proc_remount"] = True
                except OSError as exc:
                    layers["proc_remount"] = _err_text(exc)
            elif "mount_namespace" in self.disabled:
                layers["proc_remount"] = "disabled by caller (needs the mount namespace)"
            else:
                layers["proc_remount"] = "needs the mount namespace"
            _record(self.report_fd, layers=layers)
            pid = os.fork()
            if pid == 0:
                self._worker_main()
            self._close_channel()
            code = self._reap_worker(pid)
        except BaseException as exc:
            try:
                _record(self.report_fd, error=f"sandbox init failed: {_err_text(exc)}")
            finally:
                os._exit(_EXIT_SANDBOX_ERROR)
        os._exit(code)  # the kernel now kills whatever is left in the namespace

    def _landlock_rules(self) -> list:
        """Read-only: the interpreter and system directories; read-write: the workdir only."""
        cfg = self.cfg
        if self.python.startswith(_NS_PYTHON_MOUNT + os.sep):
            interpreter = [_NS_PYTHON_MOUNT]
        else:
            interpreter = [p for p in (cfg["python_prefix"], cfg["stdlib"], cfg["libdir"],
                                       os.path.dirname(os.path.realpath(self.python))) if p]
        system = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc",
                  "/sys/devices/system/cpu", "/dev/urandom", "/dev/random", "/dev/zero", "/proc/self"]
        everything = (1 << 16) - 1
        rules = [(path, _LL_READ_RIGHTS) for path in interpreter + system]
        rules.append(("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV))
        rules.append((self.workdir, everything & ~(_LL_MAKE_CHAR | _LL_MAKE_BLOCK)))
        return rules

    def _worker_main(self) -> None:
        """Apply limits, drop privileges, install seccomp, then exec the interpreter."""
        import resource

        try:
            cfg, layers = self.cfg, {}
            os.chdir(self.workdir)
            os.umask(0o077)
            cpu = cfg["cpu_s"]
            limits = [
                (resource.RLIMIT_CORE, 0),
                (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                (resource.RLIMIT_AS, cfg["memory_mb"] * 1024 * 1024),
                (resource.RLIMIT_FSIZE, cfg["file_size_mb"] * 1024 * 1024),
                (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
                (resource.RLIMIT_MEMLOCK, 0),
            ]
            if hasattr(resource, "RLIMIT_MSGQUEUE"):
                limits.append((resource.RLIMIT_MSGQUEUE, 0))
            if self.uid is not None and cfg["dedicated_uid"]:
                # Only meaningful for a dedicated uid: the count is per real uid.
                limits.append((resource.RLIMIT_NPROC, cfg["max_processes"]))
            for which, value in limits:
                soft, hard = value if isinstance(value, tuple) else (value, value)
                resource.setrlimit(which, (soft, hard))
            layers["rlimits"] = True
            layers["rlimit_nproc"] = True if self.uid is not None and cfg["dedicated_uid"] else (
                "not set: without a dedicated uid RLIMIT_NPROC would count unrelated processes too")
            landlock_fd = None
            landlock_keys = ("landlock_fs", "landlock_tcp", "landlock_signals")
            if "landlock" in self.disabled:
                layers.update(dict.fromkeys(landlock_keys, "disabled by caller"))
            elif self.libc is None:
                layers.update(dict.fromkeys(landlock_keys, "ctypes unavailable"))
            else:
                try:  # built while still privileged: the rule paths are opened here
                    landlock_fd, report = _landlock_ruleset(self.libc, self._landlock_rules())
                except OSError as exc:
                    layers.update(dict.fromkeys(landlock_keys, f"Landlock unavailable: {_err_text(exc)}"))
                else:
                    layers.update(report)
            if self.uid is not None:
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
                if os.getresuid() != (self.uid,) * 3 or os.getresgid() != (self.gid,) * 3:
                    raise RuntimeError("privilege drop did not take effect")
                try:
                    os.setuid(0)
                except PermissionError:
                    pass
                else:
                    raise RuntimeError("privilege drop is reversible")
            libc = self.libc
            if libc is None:
                layers["no_new_privs"] = layers["seccomp"] = "ctypes unavailable"
            else:
                try:
                    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
                    layers["no_new_privs"] = True
                except OSError as exc:
                    layers["no_new_privs"] = _err_text(exc)
                libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, "prctl(PR_SET_PDEATHSIG)")
                if landlock_fd is not None:
                    try:
                        if layers["no_new_privs"] is not True:
                            raise OSError(0, "needs PR_SET_NO_NEW_PRIVS")
                        _landlock_restrict(libc, landlock_fd)
                    except OSError as exc:
                        layers.update(dict.fromkeys(landlock_keys, _err_text(exc)))
                    finally:
                        os.close(landlock_fd)
                if "seccomp" in self.disabled:
                    layers["seccomp"] = "disabled by caller"
                elif layers["no_new_privs"] is not True:
                    layers["seccomp"] = "needs PR_SET_NO_NEW_PRIVS"
                else:
                    try:
                        _install_seccomp(libc)
                        layers["seccomp"] = True
                    except OSError as exc:
                        layers["seccomp"] = _err_text(exc)
            layers["python_guard"] = "disabled by caller" if "python_guard" in self.disabled else True
            _record(self.report_fd, layers=layers)
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "HOME": self.workdir,
                "TMPDIR": self.workdir,
                "PWD": self.workdir,
                "USER": "sandbox",
                "LOGNAME": "sandbox",
                **self.extra_env,
            }
            argv = [self.python, "-I", "-S", "-B", "-c", cfg["runner_source"], self.program_path,
                    "1" if cfg["strict_exit"] else "0",
                    "0" if "python_guard" in self.disabled else "1", cfg["serve"] or ""]
            if cfg["channel"]:  # the trusted checker's channel becomes the worker's stdin/stdout
                os.dup2(cfg["channel"][0], 0)
                os.dup2(cfg["channel"][1], 1)
            os.closerange(3, 65536)
            os.execve(self.python, argv, env)
        except BaseException as exc:
            try:
                msg = f"sandbox worker setup failed: {_err_text(exc)}"
                os.write(2, (msg + "\n").encode())
                _record(self.report_fd, error=msg)
            finally:
                os._exit(_EXIT_SANDBOX_ERROR)


def _launcher_main(cfg_path: str) -> int:
    report_fd = -1
    try:
        with open(cfg_path, "rb") as handle:
            cfg = marshal.load(handle)
        report_fd = os.open(cfg["report"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return _Launcher(cfg, report_fd).run()
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        if report_fd >= 0:
            _record(report_fd, error=f"sandbox launcher failed: {_err_text(exc)}")
        return _EXIT_SANDBOX_ERROR


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _LAUNCH_FLAG:
    _code = _launcher_main(sys.argv[2])
    sys.stderr.flush()
    os._exit(_code)


# ======================================================================= caller side
import fcntl  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Iterable, Mapping  # noqa: E402

__all__ = [
    "DISABLEABLE_LAYERS",
    "SandboxResult",
    "SandboxWarning",
    "describe_protections",
    "humaneval_program",
    "protections",
    "run_humaneval",
    "run_many",
    "run_program",
]

logger = logging.getLogger(__name__)

_DETAIL_CHARS = 1500
_UID_BASE_DEFAULT = 1_900_000_000
_UID_POOL_SIZE = 512
_NOBODY = 65534
_LAYER_ORDER = (
    "python_guard", "rlimits", "rlimit_nproc", "uid_drop", "no_new_privs", "seccomp",
    "landlock_fs", "landlock_tcp", "landlock_signals", "net_namespace", "ipc_namespace", "mount_namespace",
    "pid_namespace", "proc_remount", "uid_sweep",
)


class SandboxWarning(RuntimeWarning):
    """A protection layer of the sandbox is not in force."""


@dataclass
class SandboxResult:
    passed: bool
    status: str  # 'passed' | 'failed' | 'timeout' | 'error'
    detail: str  # short, truncated stderr / reason
    wall_s: float


# ----------------------------------------------------------------------- uids and processes
def _uid_status(pid: int) -> tuple[set[int], bool] | None:
    """(real/effective/saved/fs uids, is_zombie) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    uids, zombie = set(), False
    for line in data.split(b"\n"):
        if line.startswith(b"Uid:"):
            uids = {int(x) for x in line.split()[1:]}
        elif line.startswith(b"State:"):
            zombie = line.split()[1:2] in ([b"Z"], [b"X"])
    return uids, zombie


def _processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes that hold ``uid`` as real, effective, saved or fs uid."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _uid_status(int(name))
            if info is not None and uid in info[0] and not info[1]:
                pids.append(int(name))
    return pids


def _kill_pid_if_uid(pid: int, uid: int) -> bool:
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        info = _uid_status(pid)  # re-check after pinning the process: no pid-reuse accidents
        if info is None or uid not in info[0]:
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _sweep_uid(uid: int, deadline_s: float = 5.0) -> int:
    """SIGKILL every process running as the (dedicated) sandbox uid until none is left."""
    killed, end = 0, time.monotonic() + deadline_s
    while True:
        pids = _processes_of_uid(uid)
        if not pids:
            return killed
        if time.monotonic() > end:
            logger.error("sandbox: processes of uid %d survive the sweep: %s", uid, pids)
            warnings.warn(f"sandbox: processes of uid {uid} survived cleanup: {pids}", SandboxWarning, stacklevel=3)
            return killed
        for pid in pids:
            killed += _kill_pid_if_uid(pid, uid)
        time.sleep(0.005)


def _id_mapped(value: int, map_path: str) -> bool:
    try:
        with open(map_path) as handle:
            for line in handle:
                inside, _outside, count = (int(x) for x in line.split())
                if inside <= value < inside + count:
                    return True
    except (OSError, ValueError):
        return True  # no user namespace information: assume the full range
    return False


def _uid_base() -> int:
    return int(os.environ.get("HYBRIDLORA_SANDBOX_UID_BASE", _UID_BASE_DEFAULT))


class _UidPool:
    """Dedicated sandbox uids, one per concurrent run, exclusive across processes (flock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._held: dict[int, int] = {}
        self._cursor: int | None = None
        self._problem: str | None = None

    def _setup(self) -> None:
        base = _uid_base()
        last = base + _UID_POOL_SIZE - 1
        if not all(_id_mapped(v, f"/proc/self/{m}_map") for v in (base, last) for m in ("uid", "gid")):
            self._problem = (f"uids {base}..{last} are not mapped in this user namespace "
                             "(set HYBRIDLORA_SANDBOX_UID_BASE)")
            return
        # One place for every evaluation process on the machine, whatever its TMPDIR: two processes
        # locking uids in different folders could share a uid and kill each other's sandboxes in the sweep.
        self._lockdir = "/tmp/hybridlora-sandbox-uids"
        try:
            os.mkdir(self._lockdir, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(self._lockdir)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
            self._problem = f"lock directory {self._lockdir} is not a private root-owned directory"
            return
        self._cursor, self._end = base, base + _UID_POOL_SIZE

    def acquire(self) -> tuple[int | None, bool]:
        """(uid, dedicated).  Falls back to the shared ``nobody`` uid if no dedicated one exists."""
        with self._lock:
            uid = self._acquire_dedicated()
        if uid is not None:
            return uid, True
        if _id_mapped(_NOBODY, "/proc/self/uid_map") and _id_mapped(_NOBODY, "/proc/self/gid_map"):
            return _NOBODY, False
        return None, False

    def _acquire_dedicated(self) -> int | None:
        """Caller holds ``self._lock``."""
        import pwd

        if self._cursor is None and self._problem is None:
            self._setup()
        if self._free:
            return self._free.pop()
        if self._problem is not None:
            return None
        while self._cursor < self._end:
            uid = self._cursor
            self._cursor += 1
            try:
                pwd.getpwuid(uid)
                continue  # a real account: never use it
            except KeyError:
                pass
            fd = os.open(os.path.join(self._lockdir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # used by another evaluation process
            _sweep_uid(uid)  # leftovers of a crashed earlier run, if any
            self._held[uid] = fd
            return uid
        self._problem = "sandbox uid range exhausted"
        return None

    def release(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)

    @property
    def problem(self) -> str | None:
        return self._problem


_UID_POOL = _UidPool()


# ----------------------------------------------------------------------- interpreter
@functools.lru_cache(maxsize=None)
def _interpreters() -> tuple[str, str, str | None, str | None, list[str]]:
    """(python, prefix, stdlib dir, libdir, fallbacks) for the sandboxed interpreter."""
    import sysconfig

    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if sys.prefix != sys.base_prefix or not python.startswith(prefix + os.sep):
        for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", f"python{sys.version_info[0]}"):
            candidate = os.path.join(prefix, "bin", name)
            if os.access(candidate, os.X_OK):
                python = os.path.realpath(candidate)
                break
    stdlib = sysconfig.get_paths().get("stdlib")
    libdir = sysconfig.get_config_var("LIBDIR")
    fallbacks = []
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3"):
        found = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        if found and os.path.realpath(found) != python and found not in fallbacks:
            fallbacks.append(found)
    return python, prefix, stdlib and os.path.realpath(stdlib), libdir and os.path.realpath(libdir), fallbacks


# ----------------------------------------------------------------------- running one program
def _read_report(path: str) -> list[dict]:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return []
    out, pos = [], 0
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "little")
        try:
            out.append(marshal.loads(data[pos + 4:pos + 4 + size]))
        except (EOFError, ValueError, TypeError):
            break
        pos += 4 + size
    return out


def _tail(path: str, limit: int = _DETAIL_CHARS) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4 * limit))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _rmtree(path: str) -> None:
    def fix(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        except OSError:
            pass
        try:
            func(target)
        except OSError:
            pass

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=fix)


def _remove_owned_in_world_writable(uid: int) -> int:
    """Fallback without a mount namespace: delete what the sandbox uid left in /tmp & co."""
    removed, seen = 0, set()
    for base in _WORLD_WRITABLE_CANDIDATES:
        real = os.path.realpath(base)
        if real in seen or not os.path.isdir(real):
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(real))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    if entry.is_dir(follow_symlinks=False):
                        _rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed += 1
            except OSError:
                pass
    return removed


def _wait(proc: subprocess.Popen, timeout_s: float, watch: Any = None, interval_s: float = 0.02) -> tuple[bool, str]:
    """Wait for the launcher to exit without reaping it.

    Returns (timed out, reason to stop it early): every ``interval_s`` seconds ``watch()`` may return a
    reason (e.g. too many bytes written), which ends the wait at once.
    """
    end = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        poller = None
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return True, ""
            step = min(remaining, interval_s if watch else remaining)
            if poller is not None:
                if poller.poll(max(1, int(step * 1000))):
                    return False, ""
            else:
                try:
                    proc.wait(step)
                    return False, ""
                except subprocess.TimeoutExpired:
                    pass
            reason = watch() if watch else ""
            if reason:
                return False, reason
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _disk_watch(workdir: str, limit_bytes: int, max_entries: int = 20_000) -> Any:
    """A ``watch`` for :func:`_wait`: the total size of everything under ``workdir`` must stay below
    ``limit_bytes`` (needed where the workdir is on the host's disk, i.e. without a mount namespace)."""
    def used() -> str:
        total, entries, stack = 0, 0, [workdir]
        while stack:
            try:
                with os.scandir(stack.pop()) as listing:
                    for entry in listing:
                        entries += 1
                        info = entry.stat(follow_symlinks=False)
                        total += max(info.st_size, info.st_blocks * 512)
                        if stat.S_ISDIR(info.st_mode):
                            stack.append(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                return f"stopped: the sandbox made its working directory unmeasurable ({exc.strerror})"
            if total > limit_bytes:
                return (f"stopped: the program wrote more than the {limit_bytes // 2 ** 20} MiB allowed "
                        "in total (sandbox disk limit)")
            if entries > max_entries:
                return f"stopped: the program created more than {max_entries} files (sandbox disk limit)"
        return ""
    return used


_LOCK_NAME = "lock"
_STALE_AFTER_S = 60.0
_CLEANED = False


def _remove_stale_dirs(tmp: str | None = None) -> int:
    """Remove ``hybridlora-sbx-*`` folders left by a killed evaluation (once per process).

    Each run's private folder holds a ``lock`` file that its evaluation process keeps locked
    (flock) for the whole run and then writes its pid into; the kernel drops the lock when that
    process dies, however it dies. A folder whose lock can be taken and whose lock file holds a
    pid is stale; a live run's folder is never touched. An empty or missing lock file (the
    instant between creating the folder and locking it, or a folder made by an older version)
    counts as stale only when the folder is older than a minute. Only folders owned by this
    user (the work folder may belong to a sandbox uid) are considered.
    """
    tmp = tmp or tempfile.gettempdir()
    removed = 0
    try:
        names = sorted(n for n in os.listdir(tmp) if n.startswith("hybridlora-sbx-"))
    except OSError:
        return 0
    now = time.time()
    for name in names:
        path = os.path.join(tmp, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            continue
        private = path[:-len(".work")] if name.endswith(".work") else path
        if name.endswith(".work") or name.startswith("hybridlora-sbx-work-"):
            # a work folder goes with its private folder; an orphan only once it is old
            if (name.endswith(".work") and os.path.lexists(private)) or now - info.st_mtime < _STALE_AFTER_S:
                continue
            if info.st_uid == os.geteuid() or _is_sandbox_uid(info.st_uid):
                _rmtree(path)
                removed += 1
            continue
        if info.st_uid != os.geteuid():
            continue
        try:
            fd = os.open(os.path.join(path, _LOCK_NAME), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if now - info.st_mtime < _STALE_AFTER_S:
                continue
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not os.fstat(fd).st_size and now - info.st_mtime < _STALE_AFTER_S:
                    continue  # created but not locked yet by its (live) run
        except OSError:
            continue  # a live run holds it
        else:
            work = path + ".work"
            if os.path.isdir(work) and not os.path.islink(work):
                _rmtree(work)
            _rmtree(path)
            removed += 1
        finally:
            if fd is not None:
                os.close(fd)
    if removed:
        logger.info("sandbox: removed %d folder(s) left in %s by a killed evaluation", removed, tmp)
    return removed


def _is_sandbox_uid(uid: int) -> bool:
    return uid == _NOBODY or _uid_base() <= uid < _uid_base() + _UID_POOL_SIZE


@functools.lru_cache(maxsize=None)
def _runner_source() -> str:
    """The worker's ``-c`` source: the plain-data channel's code, then the guard and runner."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "plain_data.py"), encoding="utf-8") as handle:
        return handle.read() + "\n" + _RUNNER_SRC


_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGKILL: "killed (SIGKILL)",
    signal.SIGSYS: "forbidden system call (seccomp)",
}


def _classify(timed_out: bool, timeout_s: float, cpu_limit: int, returncode: int | None,
              records: list[dict], stderr: str, wall: float) -> SandboxResult:
    def result(status: str, detail: str) -> SandboxResult:
        # The reason comes first, then the (already truncated) tail of stderr.
        return SandboxResult(status == "passed", status, detail[:2 * _DETAIL_CHARS], wall)

    def with_tail(reason: str) -> str:
        return f"{reason}\n{stderr}" if stderr else reason

    # The last worker record is the one written after the worker ended (without a uid drop the
    # program could append forged records before it); it must agree with the launcher's status.
    worker = next((r["worker"] for r in reversed(records) if "worker" in r), None)
    errors = [r["error"] for r in records if "error" in r]
    if timed_out:
        return result("timeout", with_tail(f"timeout: exceeded the {timeout_s:g}s wall-clock limit"))
    if worker is None or errors:
        reason = "; ".join(errors) or f"sandbox error: launcher exited with status {returncode} and no worker status"
        return result("error", with_tail(reason))
    expected = worker["exitcode"] if "exitcode" in worker else 128 + worker["signal"]
    if returncode != expected:
        return result("error", with_tail(f"sandbox error: launcher status {returncode} does not match "
                                         f"the reported worker status {worker}"))
    if "signal" in worker:
        sig = worker["signal"]
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and worker["cpu_s"] >= cpu_limit):
            return result("timeout", with_tail(f"timeout: exceeded the {cpu_limit}s CPU-time limit"))
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return result("failed", with_tail(f"killed by signal {name}: {_SIGNAL_REASONS.get(sig, 'terminated')}"))
    code = worker["exitcode"]
    if code == 0:
        return result("passed", "")
    return result("failed", stderr or f"exited with status {code}")


def _run(program: str, *, timeout_s: float, memory_mb: int, strict_exit: bool,
         disable: Iterable[str], file_size_mb: int, max_processes: int, max_open_files: int,
         tmpfs_mb: int, disk_mb: int = 64, channel: tuple[int, int] | None = None,
         serve: str | None = None) -> tuple[SandboxResult, dict]:
    """One sandboxed run.  ``channel`` (read fd, write fd) becomes the worker's stdin/stdout and is
    closed here once the launcher holds it; ``serve`` names the function the worker then serves."""
    global _CLEANED
    owned = list(channel or ())  # closed exactly once, by whoever gets there first
    try:
        if not isinstance(program, str):
            raise TypeError("program must be a str")
        if not (timeout_s > 0 and memory_mb > 0 and disk_mb > 0):
            raise ValueError("timeout_s, memory_mb and disk_mb must be positive")
        disable = sorted(set(disable))
        unknown = set(disable) - DISABLEABLE_LAYERS
        if unknown:
            raise ValueError(f"unknown or non-disableable sandbox layers: {sorted(unknown)}")
        if not _CLEANED:
            _CLEANED = True
            _remove_stale_dirs()
        return _run_checked(program, timeout_s=timeout_s, memory_mb=memory_mb, strict_exit=strict_exit,
                            disable=disable, file_size_mb=file_size_mb, max_processes=max_processes,
                            max_open_files=max_open_files, tmpfs_mb=tmpfs_mb, disk_mb=disk_mb,
                            channel=owned, serve=serve)
    finally:
        _close_fds(owned)


def _close_fds(fds: list) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def _run_checked(program: str, *, timeout_s: float, memory_mb: int, strict_exit: bool, disable: list,
                 file_size_mb: int, max_processes: int, max_open_files: int, tmpfs_mb: int, disk_mb: int,
                 channel: list, serve: str | None) -> tuple[SandboxResult, dict]:
    as_root = os.geteuid() == 0
    uid, dedicated = _UID_POOL.acquire() if as_root else (None, False)
    private = workdir = None
    lock_fd = -1
    start = time.monotonic()
    try:
        private = tempfile.mkdtemp(prefix="hybridlora-sbx-")  # root/caller only: config, report
        # held for the whole run: a later evaluation process leaves this run's folders alone
        lock_fd = os.open(os.path.join(private, _LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.write(lock_fd, b"%d\n" % os.getpid())  # marks the lock as taken (see _remove_stale_dirs)
        workdir = private + ".work"  # fallback cwd without mount ns
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        python, prefix, stdlib, libdir, fallbacks = _interpreters()
        program_path = os.path.join(private, "program.py")
        with open(program_path, "w", encoding="utf-8") as handle:
            handle.write(program)
        cpu_s = max(1, math.ceil(timeout_s)) + 1
        cfg = {
            "parent_pid": os.getpid(), "program": program_path, "report": os.path.join(private, "report"),
            "host_workdir": workdir, "uid": uid, "gid": uid, "python": python, "python_prefix": prefix,
            "stdlib": stdlib, "libdir": libdir, "fallback_pythons": fallbacks, "disable": disable,
            "strict_exit": strict_exit, "cpu_s": cpu_s, "memory_mb": int(memory_mb),
            "file_size_mb": int(file_size_mb), "max_processes": int(max_processes),
            "max_open_files": int(max_open_files), "tmpfs_mb": int(tmpfs_mb), "dedicated_uid": dedicated,
            "channel": tuple(channel) if channel else None, "serve": serve, "runner_source": _runner_source(),
        }
        cfg_path = os.path.join(private, "config")
        with open(cfg_path, "wb") as handle:
            marshal.dump(cfg, handle)
        stderr_path = os.path.join(private, "stderr")
        with open(stderr_path, "wb") as err:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-S", "-B", os.path.abspath(__file__), _LAUNCH_FLAG, cfg_path],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                    cwd=private, start_new_session=True, close_fds=True, pass_fds=tuple(channel or ()),
                )
            except OSError as exc:
                return SandboxResult(False, "error", f"cannot start the sandbox: {exc}", 0.0), {}
        _close_fds(channel)  # the launcher has its copies; ours would keep the channel open
        try:
            timed_out, stopped = _wait(proc, timeout_s, _disk_watch(workdir, disk_mb * 2 ** 20))
        finally:
            try:  # the launcher is unreaped (at worst a zombie), so its group id is still ours
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        wall = time.monotonic() - start
        if dedicated:
            stray = _sweep_uid(uid)
            if stray:
                logger.debug("sandbox: killed %d stray process(es) of uid %d", stray, uid)
        records = _read_report(os.path.join(private, "report"))
        layers: dict = {}
        for record in records:
            layers.update(record.get("layers", {}))
        if dedicated:
            layers["uid_sweep"] = True
            if layers.get("mount_namespace") is not True:
                _remove_owned_in_world_writable(uid)
        elif uid is not None:
            layers["uid_sweep"] = f"the sandbox uid {uid} is shared ({_UID_POOL.problem})"
        else:
            layers["uid_sweep"] = "needs a uid drop"
        layers["sandbox_uid"] = (
            f"dedicated per-run uid from {_uid_base()}..{_uid_base() + _UID_POOL_SIZE - 1}" if dedicated
            else f"shared uid {uid}" if uid is not None else "the caller's uid")
        if stopped:
            return SandboxResult(False, "failed", stopped, wall), layers
        res = _classify(timed_out, timeout_s, cpu_s, proc.returncode, records, _tail(stderr_path), wall)
        if serve and res.passed:  # a served function's exit status means nothing: keep what it printed
            res.detail = _tail(stderr_path)
        return res, layers
    finally:
        for path in (workdir, private):
            if path:
                _rmtree(path)
        if lock_fd >= 0:
            os.close(lock_fd)
        if dedicated:
            _UID_POOL.release(uid)


# ----------------------------------------------------------------------- protections report
_PROBE_LOCK = threading.Lock()
_PROBED: dict | None = None
_WARNED: set = set()


def _warn_layers(layers: Mapping[str, Any], disabled: Iterable[str] = ()) -> None:
    disabled = set(disabled)
    interpreter = layers.get("interpreter")
    if isinstance(interpreter, str) and "fallback" in interpreter and ("interpreter", interpreter) not in _WARNED:
        _WARNED.add(("interpreter", interpreter))
        msg = f"sandbox runs programs with a different interpreter: {interpreter}"
        logger.warning(msg)
        warnings.warn(msg, SandboxWarning, stacklevel=3)
    for name in _LAYER_ORDER:
        if name not in layers:
            continue
        value = layers[name]
        if value is True or name in disabled or (isinstance(value, str) and value.startswith("disabled by caller")):
            continue
        reason = value if isinstance(value, str) else "not established"
        key = (name, reason)
        if key in _WARNED:
            continue
        _WARNED.add(key)
        msg = f"sandbox protection '{name}' is NOT in force: {reason}"
        logger.warning(msg)
        warnings.warn(msg, SandboxWarning, stacklevel=3)


def protections(*, refresh: bool = False) -> dict[str, bool | str]:
    """Protection layers in force for sandboxed runs from this process.

    Obtained by running a probe program through the sandbox (once, cached).  Layer keys map to
    ``True`` when active and ``False`` otherwise; ``"<layer>_reason"`` keys say why a layer is
    missing, and a few informational keys (``running_as``, ``sandbox_uid``, ``interpreter``,
    ``architecture``) describe the setup.  Missing layers are also reported as warnings.
    """
    global _PROBED
    with _PROBE_LOCK:
        if _PROBED is None or refresh:
            res, layers = _run("pass\n", timeout_s=30.0, memory_mb=512, strict_exit=False, disable=(),
                               file_size_mb=1, max_processes=8, max_open_files=64, tmpfs_mb=8)
            info: dict[str, bool | str] = {
                "process_group": True,
                "scrubbed_environment": True,
                "private_workdir": True,
            }
            for name in _LAYER_ORDER:
                value = layers.get(name)
                info[name] = value is True
                if value is not True:
                    info[f"{name}_reason"] = value if isinstance(value, str) else "not established by the probe"
            info["running_as"] = f"uid {os.geteuid()}" + (" (root)" if os.geteuid() == 0 else "")
            info["sandbox_uid"] = layers.get("sandbox_uid", "unknown") if info["uid_drop"] else "the caller's uid"
            info["interpreter"] = layers.get("interpreter") or _interpreters()[0]
            if "landlock_detail" in layers:
                info["landlock_detail"] = layers["landlock_detail"]
            info["probe"] = "ok" if res.passed else f"{res.status}: {res.detail[:300]}"
            import platform

            info["architecture"] = platform.machine()
            _PROBED = info
            _warn_layers(layers)
            if not res.passed:
                msg = f"sandbox probe program did not pass ({res.status}): {res.detail[:300]}"
                logger.warning(msg)
                warnings.warn(msg, SandboxWarning, stacklevel=2)
        return dict(_PROBED)


def describe_protections() -> str:
    """One line for evaluation logs: which sandbox layers are active and which are not."""
    info = protections()
    active = [name for name in ("process_group", "scrubbed_environment", "private_workdir", *_LAYER_ORDER)
              if info.get(name) is True]
    missing = [name for name in _LAYER_ORDER if info.get(name) is not True]
    return (f"sandbox ({info['running_as']}, interpreter {info['interpreter']}): active: {', '.join(active)}"
            + (f"; NOT active: {', '.join(missing)}" if missing else ""))


# ----------------------------------------------------------------------- public API
def run_program(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, strict_exit: bool = False,
                disable: Iterable[str] = (), file_size_mb: int = 16, max_processes: int = 16,
                max_open_files: int = 128, tmpfs_mb: int = 64, disk_mb: int = 64) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox; passed iff it exits 0 within the limits.

    The exit status is the program's own word: a hostile program can exit 0 whatever it did, so
    this is no way to *score* untrusted code (HumanEval is scored by :func:`run_humaneval`).
    ``strict_exit`` makes a ``SystemExit``/``os._exit`` from the program a failure.  ``disk_mb``
    caps the total bytes it may write (``file_size_mb`` each file).  ``disable`` switches off
    named layers (see :data:`DISABLEABLE_LAYERS`); it exists for testing the remaining layers.
    """
    protections()  # probe once, warn loudly about missing layers
    res, layers = _run(program, timeout_s=timeout_s, memory_mb=memory_mb, strict_exit=strict_exit,
                       disable=disable, file_size_mb=file_size_mb, max_processes=max_processes,
                       max_open_files=max_open_files, tmpfs_mb=tmpfs_mb, disk_mb=disk_mb)
    _check_layers(res, layers, disable)
    return res


def _check_layers(res: SandboxResult, layers: dict, disable: Iterable[str]) -> None:
    if layers and res.status != "error":
        expected = [k for k in _LAYER_ORDER if _PROBED and _PROBED.get(k) is True]
        checked = {k: layers.get(k, "not established in this run") for k in expected}
        if "interpreter" in layers:
            checked["interpreter"] = layers["interpreter"]
        _warn_layers(checked, disabled=disable)


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """What the sandboxed worker loads for a HumanEval problem: the prompt and the completion only
    (the tests stay in the trusted checker process)."""
    return f"{problem['prompt']}{completion}\n"


@functools.lru_cache(maxsize=None)
def _checker_source() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    parts = []
    for name in ("plain_data.py", "trusted_check.py"):
        with open(os.path.join(here, name), encoding="utf-8") as handle:
            parts.append(handle.read())
    return "\n".join(parts) + "\n_checker_main()\n"


def run_humaneval(problem: Mapping[str, Any], completion: str, *, timeout_s: float = 10.0,
                  **options: Any) -> SandboxResult:
    """Score one HumanEval completion; passed only on the word of trusted code.

    The completion (loaded after the problem's prompt) runs in the sandbox and does nothing but
    answer calls of the problem's entry point. The problem's ``check`` runs in a separate trusted
    process (never sandboxed code) that calls the candidate through a pipe on which only plain
    data crosses (:mod:`.plain_data`); that process alone decides ``passed``, and reports it on a
    pipe the sandbox never holds. See docs/EVALUATION.md for what this does and does not guarantee.
    """
    options.pop("strict_exit", None)  # the checker decides; how the worker exits does not matter
    disable = options.get("disable", ())
    protections()
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    checker = None
    try:
        with tempfile.TemporaryFile() as checker_err:
            try:
                checker = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", "-c", _checker_source(),
                     str(request_w), str(reply_r), str(verdict_w)],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=checker_err,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                    start_new_session=True, close_fds=True, pass_fds=(request_w, reply_r, verdict_w))
            finally:
                for fd in (request_w, reply_r, verdict_w):
                    os.close(fd)
            try:
                payload = {k: problem[k] for k in ("prompt", "test", "entry_point")}
                checker.stdin.write(json.dumps(payload).encode("utf-8"))
                checker.stdin.close()
            except OSError:
                pass  # the checker died: no verdict, which is a failure below
            channel, request_r, reply_w = (request_r, reply_w), -1, -1  # from here on owned (closed) by _run
            res, layers = _run(humaneval_program(problem, completion), timeout_s=timeout_s, strict_exit=False,
                               channel=channel, serve=str(problem["entry_point"]), **_run_options(options))
            verdict = _checker_verdict(checker, verdict_r, grace_s=1.0)
            if verdict is None:
                checker_err.seek(0)
                problem_text = checker_err.read()[-_DETAIL_CHARS:].decode("utf-8", "replace").strip()
            else:
                problem_text = ""
    finally:
        for fd in (request_r, reply_w, verdict_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if checker is not None and checker.poll() is None:
            _kill_group(checker)
    _check_layers(res, layers, disable)
    return _humaneval_result(verdict, res, problem_text)


def _run_options(options: Mapping[str, Any]) -> dict:
    defaults = dict(memory_mb=1024, disable=(), file_size_mb=16, max_processes=16, max_open_files=128,
                    tmpfs_mb=64, disk_mb=64)
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"unknown sandbox option(s): {sorted(unknown)}")
    return {**defaults, **options}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def _checker_verdict(checker: subprocess.Popen, verdict_fd: int, grace_s: float) -> dict | None:
    """The trusted checker's verdict, or None when it gave none (killed, crashed, still running)."""
    try:
        checker.wait(grace_s)
    except subprocess.TimeoutExpired:
        _kill_group(checker)
        return None
    os.set_blocking(verdict_fd, False)
    try:
        data = os.read(verdict_fd, 1 << 16)
    except OSError:
        return None
    try:
        verdict = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and verdict.get("status") in ("passed", "failed", "error") else None


def _humaneval_result(verdict: dict | None, sandbox: SandboxResult, checker_problem: str) -> SandboxResult:
    """Passed iff the trusted checker says so; otherwise the most telling reason first."""
    if verdict is not None and verdict["status"] == "passed":
        return SandboxResult(True, "passed", "", sandbox.wall_s)
    reason = verdict["detail"] if verdict is not None else "the trusted checker gave no verdict" + (
        f" ({checker_problem})" if checker_problem else "")
    extra = ("sandbox: " + sandbox.detail) if sandbox.detail and sandbox.detail not in reason else ""
    parts = [extra, reason] if sandbox.status == "timeout" else [reason, extra]  # the cause first
    detail = "\n".join(part for part in parts if part)[:2 * _DETAIL_CHARS]
    status = sandbox.status if sandbox.status in ("timeout", "error") else "failed"
    if verdict is not None and verdict["status"] == "error":
        status = "error"
    return SandboxResult(False, status, detail, sandbox.wall_s)


def run_many(items: Iterable[Any], *, workers: int | None = None, timeout_s: float = 10.0,
             **options: Any) -> list[SandboxResult]:
    """Run several programs concurrently (at most ``workers`` at a time), results in input order.

    Each item is either program source (``str``, run with :func:`run_program`) or a
    ``(problem, completion)`` pair (run with :func:`run_humaneval`).
    """
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    if not items:
        return []
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(int(workers), len(items)))
    protections()

    def one(item: Any) -> SandboxResult:
        try:
            if isinstance(item, str):
                return run_program(item, timeout_s=timeout_s, **options)
            problem, completion = item
            return run_humaneval(problem, completion, timeout_s=timeout_s, **options)
        except Exception as exc:  # a broken item must not abort the whole batch
            logger.exception("sandbox run failed")
            return SandboxResult(False, "error", f"sandbox error: {type(exc).__name__}: {exc}", 0.0)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, items))
