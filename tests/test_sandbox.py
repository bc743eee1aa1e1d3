"""Tests for the sandbox that executes untrusted, model-generated code.

Hostile programs are only ever executed through the sandbox, with its limits in force.
Where a test switches protection layers off (``disable=``) to prove that the remaining
layers hold on their own, it is skipped unless those remaining layers are active here, so
that a machine without them is never exposed to the hostile code.
"""
from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid

import pytest

from hybridlora.evaluate import sandbox
from hybridlora.evaluate.sandbox import (
    SandboxResult,
    SandboxWarning,
    describe_protections,
    humaneval_program,
    protections,
    run_humaneval,
    run_many,
    run_program,
)

# A small problem in the HumanEval schema; hostile code is appended to a wrong completion,
# so that a hostile completion "succeeding" at its side effect still cannot pass.
PROBLEM = {
    "task_id": "Sandbox/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def hostile(code: str, **options) -> SandboxResult:
    completion = "    return a - b\n\n" + textwrap.dedent(code)
    return run_humaneval(PROBLEM, completion, **options)


@pytest.fixture(scope="module")
def prot() -> dict:
    return protections()


_EXPANDS = {
    "landlock": ("landlock_fs", "landlock_tcp", "landlock_signals"),
    "pid_namespace": ("pid_namespace", "proc_remount"),
    "mount_namespace": ("mount_namespace", "proc_remount"),
}


def active(prot: dict, disable=()) -> set[str]:
    """Layers in force for a run with ``disable`` switched off."""
    off = {name for layer in disable for name in _EXPANDS.get(layer, (layer,))}
    return {name for name, value in prot.items() if value is True and name not in off}


def require(prot: dict, *layers: str, disable=(), any_of: bool = False) -> None:
    have = active(prot, disable)
    missing = [layer for layer in layers if layer not in have]
    if (any_of and len(missing) == len(layers)) or (not any_of and missing):
        pytest.skip(f"sandbox layers not active here: {missing}")


def marker_processes(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as handle:
                comm = handle.read().strip()
            with open(f"/proc/{name}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm == marker and state not in ("Z", "X"):
            found.append(int(name))
    return found


def sandbox_uid_processes() -> list[int]:
    base = int(os.environ.get("HYBRIDLORA_SANDBOX_UID_BASE", sandbox._UID_BASE_DEFAULT))
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        info = sandbox._uid_status(int(name))
        if info and not info[1] and any(base <= uid < base + sandbox._UID_POOL_SIZE for uid in info[0]):
            pids.append(int(name))
    return pids


def assert_no_leftovers(marker: str | None = None) -> None:
    deadline = time.monotonic() + 2.0
    while True:
        left = (marker_processes(marker) if marker else []) + (
            sandbox_uid_processes() if os.geteuid() == 0 else [])
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == [], f"processes survived the sandbox: {left}"


def new_marker() -> str:
    return "sbx" + uuid.uuid4().hex[:10]  # fits in the 15 characters of /proc/PID/comm


def assert_not_passed(res: SandboxResult, *statuses: str) -> None:
    assert isinstance(res, SandboxResult)
    assert res.passed is False
    assert res.status in (statuses or ("failed", "timeout")), res


# ----------------------------------------------------------------------------- basics
def test_passing_and_failing_programs():
    ok = run_program("x = sum(range(10))\nassert x == 45\n")
    assert ok == SandboxResult(True, "passed", "", ok.wall_s)
    assert ok.wall_s > 0

    res = run_program("raise ValueError('boom 42')\n")
    assert_not_passed(res, "failed")
    assert "ValueError: boom 42" in res.detail and "Traceback" in res.detail

    res = run_program("import sys\nsys.exit(3)\n")
    assert_not_passed(res, "failed")
    assert "status 3" in res.detail


def test_humaneval_program_layout():
    # the sandboxed worker loads the prompt and the completion only; the tests stay with the trusted checker
    program = humaneval_program(PROBLEM, "    return a + b\n")
    assert program == PROBLEM["prompt"] + "    return a + b\n\n"
    assert "check" not in program
    assert run_humaneval(PROBLEM, PROBLEM["canonical_solution"]).passed


def test_broken_completions_fail_with_useful_detail():
    res = run_humaneval(PROBLEM, "    return a +\n")
    assert_not_passed(res, "failed")
    assert "SyntaxError" in res.detail

    res = run_humaneval(PROBLEM, "    return a * b\n")
    assert_not_passed(res, "failed")
    assert "AssertionError" in res.detail and "candidate(2, 3) == 5" in res.detail

    res = run_humaneval(PROBLEM, "    return undefined_name\n")
    assert_not_passed(res, "failed")
    assert "NameError" in res.detail


@pytest.mark.parametrize("escape", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit\n",
])
def test_exiting_before_the_tests_is_a_failure(escape):
    res = run_humaneval(PROBLEM, "    return 0\n\n" + escape)
    assert_not_passed(res, "failed")
    assert "SystemExit" in res.detail


def test_run_many_preserves_order():
    programs = ["pass\n", "raise RuntimeError('second')\n", "assert 1 + 1 == 2\n", "1/0\n"] * 3
    results = run_many(programs, workers=3)
    assert [r.passed for r in results] == [True, False, True, False] * 3
    assert "RuntimeError: second" in results[1].detail
    assert "ZeroDivisionError" in results[3].detail
    mixed = run_many([(PROBLEM, PROBLEM["canonical_solution"]), "import sys; sys.exit(1)"])
    assert [r.passed for r in mixed] == [True, False]
    assert run_many([]) == []


def test_fresh_private_workdir_and_home_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # only this test's runs, not concurrent evaluations
    tmp = tempfile.gettempdir()
    before = {n for n in os.listdir(tmp) if n.startswith("hybridlora-sbx-")}
    program = textwrap.dedent("""
        import os, sys
        cwd = os.getcwd()
        assert os.environ["HOME"] == cwd == os.environ["TMPDIR"], (os.environ, cwd)
        assert sorted(os.listdir(cwd)) == ["_program.py"], os.listdir(cwd)
        with open("leftover.txt", "w") as handle:
            handle.write("x")
    """)
    assert run_program(program).passed
    assert run_program(program).passed  # the file of the first run is gone
    after = {n for n in os.listdir(tmp) if n.startswith("hybridlora-sbx-")}
    assert after == before


def test_protections_report(prot):
    for key in ("python_guard", "rlimits", "uid_drop", "seccomp", "landlock_fs", "net_namespace",
                "mount_namespace", "pid_namespace", "process_group", "scrubbed_environment"):
        assert isinstance(prot[key], bool)
        if not prot[key]:
            assert prot[f"{key}_reason"]
    assert prot["probe"] == "ok"
    assert prot["python_guard"] and prot["rlimits"] and prot["process_group"]
    if os.geteuid() == 0:
        assert prot["uid_drop"], prot.get("uid_drop_reason")
    text = describe_protections()
    assert "active:" in text and "python_guard" in text
    print(text)


def test_missing_layers_are_reported_loudly(caplog):
    sandbox._WARNED.discard(("seccomp", "unit-test reason"))
    with pytest.warns(SandboxWarning, match="seccomp.*unit-test reason"):
        sandbox._warn_layers({"seccomp": "unit-test reason", "python_guard": True})
    assert "unit-test reason" in caplog.text


def test_invalid_layer_names_are_rejected():
    with pytest.raises(ValueError):
        run_program("pass", disable=["uid_drop"])


# ----------------------------------------------------------------------------- hostile code
def test_infinite_loop_times_out():
    start = time.monotonic()
    res = hostile("while True:\n    pass\n", timeout_s=1.0)
    assert_not_passed(res, "timeout")
    assert "timeout" in res.detail
    assert time.monotonic() - start < 5
    assert_no_leftovers()

    res = hostile("import time\nwhile True:\n    time.sleep(0.05)\n", timeout_s=1.0)
    assert_not_passed(res, "timeout")
    assert_no_leftovers()


def test_cpu_limit_counts_as_timeout():
    # Threads hashing (the GIL is released) can reach the CPU-time limit before the wall clock.
    program = textwrap.dedent("""
        import hashlib, threading
        buf = bytes(8 * 1024 * 1024)
        def burn():
            while True:
                hashlib.sha256(buf).digest()
        for _ in range(3):
            threading.Thread(target=burn, daemon=True).start()
        burn()
    """)
    res = run_program(program, timeout_s=2.0)
    assert_not_passed(res, "timeout")
    assert "CPU-time limit" in res.detail or "wall-clock limit" in res.detail
    assert_no_leftovers()


def test_status_classification():
    classify = sandbox._classify
    res = classify(False, 5, 6, 137, [{"worker": {"signal": 9, "cpu_s": 6.5}}], "", 3.0)
    assert res.status == "timeout" and "CPU" in res.detail
    res = classify(False, 5, 6, 128 + 25, [{"worker": {"signal": 25, "cpu_s": 0.1}}], "", 0.1)
    assert res.status == "failed" and "SIGXFSZ" in res.detail
    # A forged record written by the program itself is not trusted.
    forged = [{"worker": {"exitcode": 0, "cpu_s": 0}}, {"worker": {"exitcode": 1, "cpu_s": 0}}]
    assert classify(False, 5, 6, 1, forged, "boom", 0.1).status == "failed"
    assert classify(False, 5, 6, 1, forged[:1], "", 0.1).status == "error"
    assert classify(False, 5, 6, 70, [{"error": "setup failed"}], "", 0.1).status == "error"


FORK_BOMB = """
with open("/proc/self/comm", "w") as handle:
    handle.write({marker!r})
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.mark.parametrize("disable,needs", [
    ((), ()),
    (("python_guard",), ("seccomp",)),
    (("python_guard", "seccomp"), ("uid_drop", "rlimit_nproc", "pid_namespace")),
    (("python_guard", "seccomp", "pid_namespace"), ("uid_drop", "rlimit_nproc")),
], ids=["all-layers", "no-guard", "nproc+pidns+sweep", "nproc+uid-sweep"])
def test_fork_bomb_is_contained(prot, disable, needs):
    require(prot, *needs, disable=disable)
    marker = new_marker()
    res = hostile(FORK_BOMB.format(marker=marker), timeout_s=1.5, disable=disable)
    assert_not_passed(res)
    assert_no_leftovers(marker)


@pytest.mark.parametrize("code", [
    "hog = []\nwhile True:\n    hog.append(bytearray(32 * 1024 * 1024))\n",
    "hog = bytearray(8 * 1024 ** 3)\n",
    "hog = 'x' * (4 * 1024 ** 3)\n",
])
def test_memory_bomb_is_limited(code):
    res = hostile(code, memory_mb=256, timeout_s=10.0)
    assert_not_passed(res, "failed")
    assert "MemoryError" in res.detail
    assert_no_leftovers()


def test_file_size_limit():
    res = hostile("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (64 * 1024 * 1024))\n",
                  file_size_mb=8)
    assert_not_passed(res, "failed")
    assert "SIGXFSZ" in res.detail or "File too large" in res.detail


def test_output_flood_is_bounded():
    res = hostile("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n", file_size_mb=1, timeout_s=5.0)
    assert_not_passed(res, "failed")
    assert len(res.detail) < 2000  # (Python ignores SIGXFSZ: its writes fail with EFBIG instead)
    res = hostile("while True:\n    print('y' * 65536)\n", timeout_s=1.0)  # stdout goes nowhere
    assert_not_passed(res, "timeout")


@pytest.mark.filterwarnings("ignore:sandbox runs programs with a different interpreter")
@pytest.mark.parametrize("disable", [
    (),
    ("python_guard", "seccomp"),
    ("python_guard", "seccomp", "landlock"),
    ("python_guard", "seccomp", "mount_namespace"),
    ("python_guard", "seccomp", "landlock", "mount_namespace"),
], ids=["all-layers", "landlock+mountns+uid", "mountns+uid", "landlock+uid", "uid-only"])
def test_writes_outside_the_workdir_do_not_reach_the_host(prot, tmp_path, disable):
    """What is guaranteed, by layer:

    * the caller's own files (its tmp dir, HOME, the repository) are unwritable with a uid
      drop or Landlock;
    * /tmp, /var/tmp, /dev/shm: with a mount namespace writes land in a private tmpfs that is
      gone after the run; with Landlock they are refused; with only a uid drop, whatever the
      sandbox uid left at their top level is deleted afterwards (deeper, pre-existing
      world-writable directories are then NOT covered: see the last assertion).
    """
    layers = active(prot, disable)
    if not layers & {"uid_drop", "landlock_fs"}:
        pytest.skip("neither a uid drop nor Landlock is active: the sandbox can write as the caller")
    open_dir = tempfile.mkdtemp(prefix="sandbox_target_", dir="/tmp")  # world-writable, known path
    os.chmod(open_dir, 0o777)
    tag = uuid.uuid4().hex
    private = [str(tmp_path / "pwned.txt"), os.path.expanduser(f"~/sandbox_escape_{tag}"),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), f"sandbox_escape_{tag}")]
    shared = [f"/tmp/sandbox_escape_{tag}", f"/var/tmp/sandbox_escape_{tag}", f"/dev/shm/sandbox_escape_{tag}"]
    nested = os.path.join(open_dir, "pwned.txt")
    code = f"""
    for target in {private + shared + [nested]!r}:
        try:
            with open(target, "w") as handle:
                handle.write("pwned")
        except OSError as exc:
            print("blocked", target, exc)
    """
    try:
        res = hostile(code, disable=disable)
        assert_not_passed(res, "failed")
        for target in private + shared:
            assert not os.path.exists(target), target
        if layers & {"landlock_fs", "mount_namespace"}:
            assert not os.path.exists(nested)
        else:  # documented limitation of the uid-drop-only fallback
            assert os.path.exists(nested)
    finally:
        for target in private + shared + [nested]:
            if os.path.exists(target):
                os.unlink(target)
        os.rmdir(open_dir)


def test_caller_files_are_not_readable(prot, tmp_path):
    """Wherever the checkout is: a file outside /tmp is refused (PermissionError); one under /tmp may
    instead be hidden by the sandbox's private /tmp (FileNotFoundError). Either way nothing is read."""
    if not active(prot) & {"uid_drop", "landlock_fs"}:
        pytest.skip("neither a uid drop nor Landlock is active")
    secret = "s3cr3t-" + uuid.uuid4().hex
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    targets = [os.path.abspath(__file__), str(secret_file)]
    assert all(os.path.isfile(t) for t in targets)
    res = hostile(f"""
    import sys
    for target in {targets!r}:
        try:
            with open(target) as handle:
                print("READ", target, handle.read()[:80], file=sys.stderr)
        except OSError as exc:
            print("blocked", type(exc).__name__, target, file=sys.stderr)
    """)
    assert_not_passed(res, "failed")
    assert secret not in res.detail and "READ" not in res.detail, res.detail
    for target in targets:
        assert (f"blocked PermissionError {target}" in res.detail
                or f"blocked FileNotFoundError {target}" in res.detail), res.detail


def test_host_tmp_is_invisible_with_mount_namespace(prot):
    require(prot, "mount_namespace")
    secret_dir = tempfile.mkdtemp(prefix="sandbox_visible_", dir="/tmp")
    os.chmod(secret_dir, 0o755)
    try:
        res = run_program(f"import os\nassert not os.path.exists({secret_dir!r})\n"
                          "assert not os.path.exists('/tmp/hybridlora-sandbox-uids')\n")
        assert res.passed, res
    finally:
        os.rmdir(secret_dir)


def test_environment_secret_is_not_inherited(monkeypatch):
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("HYBRIDLORA_FAKE_SECRET", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    res = hostile("""
    import os, sys
    leaked = [k for k, v in os.environ.items() if v.startswith("s3cr3t-") or "SECRET" in k]
    with open("/proc/self/environ", "rb") as handle:
        if b"s3cr3t-" in handle.read():
            leaked.append("/proc/self/environ")
    if leaked:
        print("LEAKED", leaked, [os.environ[k] for k in leaked if k in os.environ], file=sys.stderr)
    """)
    assert_not_passed(res, "failed")
    assert "LEAKED" not in res.detail and secret not in res.detail


def test_environment_secret_not_readable_via_proc(prot, monkeypatch):
    if not active(prot) & {"uid_drop", "pid_namespace", "landlock_fs"}:
        pytest.skip("without a uid drop, PID namespace or Landlock /proc/<caller>/environ is readable")
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("HYBRIDLORA_FAKE_SECRET", secret)
    res = hostile(f"""
    import os, sys
    found = []
    for pid in [{os.getpid()}, os.getppid(), 1] + [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{{pid}}/environ", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        for item in data.split(b"\\0"):
            if item.startswith(b"HYBRIDLORA_FAKE_SECRET="):
                found.append(item.decode())
    if found:
        print("LEAKED", found, file=sys.stderr)
    """)
    assert_not_passed(res, "failed")
    assert "LEAKED" not in res.detail and secret not in res.detail


@pytest.mark.parametrize("disable,needs", [
    ((), ()),
    (("python_guard",), ("seccomp",)),
    (("python_guard", "seccomp", "landlock"), ("net_namespace",)),
    (("python_guard", "seccomp", "net_namespace"), ("landlock_tcp",)),
], ids=["all-layers", "seccomp", "netns-only", "landlock-only"])
def test_network_is_unreachable(prot, disable, needs):
    require(prot, *needs, disable=disable)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        res = hostile(f"""
        import socket
        sock = socket.create_connection(("127.0.0.1", {port}), timeout=3)
        sock.sendall(b"pwned")
        print("CONNECTED")
        """, disable=disable)
        assert_not_passed(res, "failed")
        assert "CONNECTED" not in res.detail
        with pytest.raises(BlockingIOError):
            listener.accept()
    if not disable:
        assert "PermissionError" in res.detail


@pytest.mark.parametrize("disable,needs", [
    ((), ()),
    (("python_guard", "landlock"), ("seccomp",)),
    (("python_guard", "seccomp"), ("landlock_signals",)),
    (("python_guard", "seccomp", "landlock"), ("uid_drop",)),
], ids=["all-layers", "seccomp", "landlock", "uid-drop"])
def test_cannot_kill_the_parent_or_host_processes(prot, disable, needs):
    require(prot, *needs, disable=disable)
    canary = subprocess.Popen(["sleep", "60"])
    try:
        attempts = [
            f"os.kill({os.getpid()}, signal.SIGKILL)",
            f"os.killpg(os.getpgid({os.getpid()}), signal.SIGKILL)",
            f"os.killpg({os.getpgid(0)}, signal.SIGKILL)",
            "os.kill(os.getppid(), signal.SIGKILL)",
            "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
            f"os.kill({canary.pid}, signal.SIGKILL)",
            "os.kill(1, signal.SIGKILL)",
        ]
        if active(prot, disable) & {"uid_drop", "seccomp", "landlock_signals"}:  # else: never broadcast
            attempts.append("os.kill(-1, signal.SIGKILL)")
        body = "\n".join(
            f"try:\n    {a}\nexcept Exception as exc:\n    print('blocked', {a!r}, exc)" for a in attempts)
        res = hostile("import os, signal\n" + body + "\n", disable=disable)
        assert_not_passed(res, "failed")
        time.sleep(0.1)
        assert canary.poll() is None, "the sandbox killed a host process"
        # ... and this test process obviously survived.
    finally:
        canary.kill()
        canary.wait()
    assert_no_leftovers()


DAEMON = """
import os, time
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        with open("/proc/self/comm", "w") as handle:
            handle.write({marker!r})
        time.sleep(120)
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(0.3)
"""


@pytest.mark.parametrize("disable,needs", [
    ((), ()),
    (("python_guard", "seccomp"), ("pid_namespace",)),
    (("python_guard", "seccomp", "pid_namespace"), ("uid_drop",)),
], ids=["all-layers", "pidns", "uid-sweep"])
def test_background_process_does_not_survive(prot, disable, needs):
    require(prot, *needs, disable=disable)
    marker = new_marker()
    res = hostile(DAEMON.format(marker=marker), disable=disable)
    assert_not_passed(res, "failed")
    assert marker_processes(marker) == []
    assert_no_leftovers(marker)


def test_subprocess_and_ctypes_are_blocked():
    res = hostile("import subprocess\nsubprocess.run(['true'])\n")
    assert_not_passed(res, "failed")
    assert "PermissionError" in res.detail
    res = hostile("import ctypes\n")
    assert_not_passed(res, "failed")
    assert "ImportError" in res.detail or "ModuleNotFoundError" in res.detail
