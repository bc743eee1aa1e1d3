"""HumanEval scoring that a completion cannot fake (issue 15).

A completion runs in the sandbox and only answers calls of its function; the problem's ``check`` runs in a
trusted process and decides ``passed``. Every attack below is a *wrong* completion that tries to get itself
scored as passed anyway (each class the issue lists, several variants each); all must be scored failed —
as root (with every sandbox layer, and with every layer that can be switched off switched off: the verdict
must not depend on them) and as an ordinary user where the machine has one.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from hybridlora.evaluate import plain_data, sandbox
from hybridlora.evaluate.sandbox import DISABLEABLE_LAYERS, run_humaneval, run_many

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def problems(data_dir) -> dict:
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    assert len(rows) == 164
    return {row["task_id"]: row for row in rows}


# ----------------------------------------------------------------------------- the plain-data channel
@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 10 ** 300, 1.5, -0.0, math.inf, "naïve \udcff text", b"\x00\xff", [], (),
    [1, [2, (3, "x")], {"k": {1, 2}}], {(1, "a"): [None, b"z"], 3.5: 1}, {1.25, "s", (1, 2)},
])
def test_plain_values_cross_unchanged(value):
    back = plain_data.decode(plain_data.encode(value))
    assert back == value and type(back) is type(value)


def test_nan_crosses_as_nan():
    assert math.isnan(plain_data.decode(plain_data.encode(float("nan"))))


class _AlwaysEqual:
    def __eq__(self, other):
        return True


class _SneakyInt(int):
    def __eq__(self, other):
        return True


@pytest.mark.parametrize("value,reason", [
    (_AlwaysEqual(), "_AlwaysEqual object is not plain data"),
    (_SneakyInt(3), "_SneakyInt object is not plain data"),
    ([1, [_AlwaysEqual()]], "not plain data"),
    ({"k": iter([])}, "not plain data"),
    ((x for x in range(3)), "generator object is not plain data"),
    (frozenset({1}), "frozenset object is not plain data"),
])
def test_anything_else_is_refused_with_the_reason(value, reason):
    with pytest.raises(plain_data.PlainDataError, match=reason):
        plain_data.encode(value)


def test_recursive_and_malformed_messages_are_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(plain_data.PlainDataError, match="contains itself"):
        plain_data.encode(loop)
    for bad in (b'["o", "builtins.object"]', b'["i", "1e5"]', b'["d", [[["l", []], ["n"]]]]', b"\xff",
                b'["l", [' * 200 + b']' * 200, b'["s"]'):
        with pytest.raises(plain_data.PlainDataError):
            plain_data.decode(bad)


# ----------------------------------------------------------------------------- the 164 problems
def test_all_canonical_solutions_pass(problems):
    start = time.monotonic()
    results = run_many([(p, p["canonical_solution"]) for p in problems.values()], timeout_s=20.0)
    failures = {tid: r.detail[:300] for tid, r in zip(problems, results) if not r.passed}
    assert failures == {}
    print(f"164/164 canonical solutions passed in {time.monotonic() - start:.1f}s")


def test_a_plainly_wrong_body_fails_on_every_problem(problems):
    results = run_many([(p, "    return None\n") for p in problems.values()], timeout_s=20.0)
    passed = [tid for tid, r in zip(problems, results) if r.passed]
    assert passed == []
    assert all(r.status == "failed" and "the tests failed" in r.detail for r in results)


def test_mutated_arguments_exceptions_and_floats_reach_the_test():
    """What the test sees of a call: in-place changes of its list/dict/set arguments, a built-in exception
    type the candidate raised, and genuine floats (closeness computed by the trusted side)."""
    problem = {
        "task_id": "Channel/0",
        "prompt": "def f(xs, d, s, x):\n",
        "entry_point": "f",
        "test": textwrap.dedent("""
            def check(candidate):
                xs, d, s = [3, 1, 2], {"a": 1}, {1}
                assert candidate(xs, d, s, 0.1) is None
                assert xs == [1, 2, 3] and d == {"a": 1, "b": 2} and s == {1, 2}
                try:
                    candidate([], {}, set(), -1.0)
                except ValueError as exc:
                    assert "negative" in str(exc)
                else:
                    raise AssertionError("no ValueError")
                assert abs(candidate([], {}, set(), 0.5) - 0.7) < 1e-9
        """),
    }
    completion = textwrap.indent(textwrap.dedent("""
        if x < 0:
            raise ValueError("negative x")
        if x == 0.5:
            return x + 0.2
        xs.sort()
        d["b"] = 2
        s.add(2)
    """), "    ")
    res = run_humaneval(problem, completion)
    assert res.passed, res.detail
    assert not run_humaneval(problem, completion.replace("xs.sort()", "xs.reverse()")).passed
    assert not run_humaneval(problem, completion.replace("ValueError", "KeyError")).passed
    assert not run_humaneval(problem, completion.replace("0.2", "0.2000001")).passed


def test_stop_iteration_cannot_end_a_tests_loop_early():
    problem = {"task_id": "Channel/1", "prompt": "def f(x):\n", "entry_point": "f",
               "test": "def check(candidate):\n    assert all(map(candidate, [1, 2, 3]))\n"}
    assert run_humaneval(problem, "    return x > 0\n").passed
    res = run_humaneval(problem, "    raise StopIteration\n")
    assert not res.passed and "the candidate raised StopIteration" in res.detail


def test_a_generator_is_not_plain_data(problems):
    res = run_humaneval(problems["HumanEval/29"], "    return (s for s in strings if s.startswith(prefix))\n")
    assert not res.passed and "generator object is not plain data" in res.detail


# ----------------------------------------------------------------------------- attacks
_WRONG = "    return None\n"


def _body(code: str) -> str:
    return textwrap.indent(textwrap.dedent(code), "    ")


_STACK_BODY = _body("""
    import sys
    frame = sys._getframe()
    while frame is not None:
        for name in ("finish", "real_exit", "_exit"):
            fn = frame.f_locals.get(name) or frame.f_globals.get(name)
            if callable(fn):
                fn(0)
        frame = frame.f_back
    return None
""")
_STACK_TOP = _WRONG + textwrap.dedent("""

import sys
frame = sys._getframe()
while frame is not None:
    if callable(frame.f_locals.get("finish")):
        frame.f_locals["finish"](0)
    frame = frame.f_back
""")
_STACK_INSPECT = _WRONG + textwrap.dedent("""

import inspect
for info in inspect.stack():
    exit_ = info.frame.f_locals.get("real_exit")
    if exit_ is not None:
        exit_(0)
""")
_STACK_TRACEBACK = _body("""
    try:
        raise RuntimeError
    except RuntimeError as exc:
        frame = exc.__traceback__.tb_frame
    while frame is not None:
        if "finish" in frame.f_locals:
            frame.f_locals["finish"](0)
        frame = frame.f_back
    return None
""")
_GC_TOP = _WRONG + textwrap.dedent("""

import gc
for obj in gc.get_objects():
    if getattr(obj, "__name__", "") == "finish" and callable(obj):
        obj(0)
""")
_GC_BODY = _body("""
    import gc
    for obj in gc.get_objects():
        if getattr(obj, "__name__", "") in ("finish", "_serve") and callable(obj):
            obj(0)
    return None
""")
_GC_CLOSURE = _WRONG + textwrap.dedent("""

import gc, types
for obj in gc.get_objects():
    if isinstance(obj, types.FunctionType) and obj.__closure__:
        for cell in obj.__closure__:
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if getattr(value, "__name__", "") == "_exit":
                value(0)
""")
_FORGE_CHANNEL = _WRONG + textwrap.dedent("""

import gc, os
writer = next(o for o in gc.get_objects() if getattr(o, "__name__", "") == "write_message")
for fd in range(3, 64):
    for message in (["ready"], ["return", True, []], ["passed"], {"status": "passed"}):
        try:
            writer(fd, message)
        except Exception:
            pass
    try:
        os.write(fd, b'{"status": "passed", "detail": ""}')
    except OSError:
        pass
os._exit(0)
""")
_FRESH_POSIX = "import _imp, importlib.machinery as m\nposix = _imp.create_builtin(m.ModuleSpec('posix', m.BuiltinImporter))\n"
_POSIX_EXIT_TOP = _WRONG + "\n" + _FRESH_POSIX + "posix._exit(0)\n"
_POSIX_EXIT_BODY = _body(_FRESH_POSIX + "posix._exit(0)\nreturn None\n")
_POSIX_EXECV = _WRONG + "\n" + _FRESH_POSIX + "posix.execv('/bin/true', ['true'])\n"
_POSIX_EXECV_PYTHON = _WRONG + "\nimport sys\n" + _FRESH_POSIX + \
    "posix.execv(sys.executable, [sys.executable, '-c', 'import os; os._exit(0)'])\n"
_CTYPES_TOP = _WRONG + textwrap.dedent("""

import sys
sys.modules.pop("ctypes", None)
sys.modules.pop("_ctypes", None)
import ctypes
ctypes.CDLL(None)._exit(0)
""")
_CTYPES_BODY = _body("""
    import sys
    for name in ("ctypes", "_ctypes"):
        sys.modules.pop(name, None)
    import ctypes
    ctypes.CDLL("libc.so.6").exit(0)
    return None
""")
_CTYPES_IMP = _WRONG + textwrap.dedent("""

import sys, importlib.util
for name in ("ctypes", "_ctypes"):
    sys.modules.pop(name, None)
spec = importlib.util.find_spec("_ctypes")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["_ctypes"] = module
import ctypes
ctypes.CDLL(None)._exit(0)
""")
_EQ_OBJECT = _body("""
    class Yes:
        def __eq__(self, other):
            return True
        __ne__ = lambda self, other: False
        __bool__ = lambda self: True
    return Yes()
""")
_EQ_SUBCLASS = _body("""
    class Yes(int):
        def __eq__(self, other):
            return True
    return Yes(1)
""")
_EQ_BOOL_LIKE = _body("""
    class Yes(str):
        __eq__ = lambda self, other: True
        __hash__ = str.__hash__
    return [Yes("x")][0]
""")
_EQ_NESTED = _body("""
    class Yes:
        __eq__ = lambda self, other: True
    return [Yes()]
""")
_EQ_PATCH_ENCODER = _WRONG.replace("None", "Yes()") + textwrap.dedent("""

class Yes:
    __eq__ = lambda self, other: True

import gc
for obj in gc.get_objects():
    if getattr(obj, "__name__", "") == "to_plain":
        obj.__globals__["to_plain"] = lambda value, *a, **k: ["b", True]
""")

ATTACKS = {
    # class: stack walk to the runner's own exit function
    "stack-body": ("HumanEval/0", _STACK_BODY),
    "stack-top-level": ("HumanEval/0", _STACK_TOP),
    "stack-inspect": ("HumanEval/0", _STACK_INSPECT),
    "stack-traceback": ("HumanEval/0", _STACK_TRACEBACK),
    # class: gc search for the finish function (or the channel's own code)
    "gc-top-level": ("HumanEval/0", _GC_TOP),
    "gc-body": ("HumanEval/0", _GC_BODY),
    "gc-closure-cell": ("HumanEval/0", _GC_CLOSURE),
    "gc-forge-channel": ("HumanEval/0", _FORGE_CHANNEL),
    # class: a fresh posix module without the guard's patches
    "posix-exit-top-level": ("HumanEval/0", _POSIX_EXIT_TOP),
    "posix-exit-body": ("HumanEval/0", _POSIX_EXIT_BODY),
    "posix-execv-true": ("HumanEval/0", _POSIX_EXECV),
    "posix-execv-python": ("HumanEval/0", _POSIX_EXECV_PYTHON),
    # class: re-imported ctypes
    "ctypes-top-level": ("HumanEval/0", _CTYPES_TOP),
    "ctypes-body": ("HumanEval/0", _CTYPES_BODY),
    "ctypes-importlib": ("HumanEval/0", _CTYPES_IMP),
    # class: objects that claim equality
    "eq-object": ("HumanEval/0", _EQ_OBJECT),
    "eq-int-subclass": ("HumanEval/0", _EQ_SUBCLASS),
    "eq-str-subclass": ("HumanEval/0", _EQ_BOOL_LIKE),
    "eq-nested": ("HumanEval/1", _EQ_NESTED),
    "eq-patched-encoder": ("HumanEval/0", _EQ_PATCH_ENCODER),
    # class: monkeypatching what the tests use, at top level
    "builtins-abs-4": ("HumanEval/4", "    return 0.0\n\nimport builtins\nbuiltins.abs = lambda x: 0.0\n"),
    "builtins-abs-2": ("HumanEval/2", "    return 0.5\n\nimport builtins\nbuiltins.abs = lambda x: 0.0\n"),
    "math-fabs-32": ("HumanEval/32", "    return 0.0\n\nimport math\nmath.fabs = lambda x: 0.0\n"),
    "float-subclass-2": ("HumanEval/2", _body("""
        class Close(float):
            __sub__ = lambda self, other: 0.0
            __eq__ = lambda self, other: True
        return Close(0.5)
    """)),
    "builtins-copy-32": ("HumanEval/32", "    return 0.0\n\nimport copy, builtins\ncopy.deepcopy = lambda x: x\n"
                                         "builtins.__import__ = None\n"),
}


def _attack_items(problems: dict) -> list:
    return [(problems[tid], completion) for tid, completion in ATTACKS.values()]


def _assert_all_failed(results: list) -> None:
    scored = {name: (r.passed, r.status, r.detail[:200]) for name, r in zip(ATTACKS, results)}
    passed = {name: v for name, v in scored.items() if v[0]}
    assert passed == {}
    assert all(status in ("failed", "timeout") for _, status, _ in scored.values()), scored


def test_attacks_are_scored_failed(problems):
    results = run_many(_attack_items(problems), timeout_s=10.0)
    _assert_all_failed(results)
    by_name = dict(zip(ATTACKS, results))
    assert "not plain data" in by_name["eq-object"].detail
    assert "ended before the tests finished" in by_name["posix-execv-true"].detail


@pytest.mark.filterwarnings("ignore::hybridlora.evaluate.sandbox.SandboxWarning")
def test_attacks_fail_with_every_switchable_layer_off(problems):
    """The verdict rests on the trusted checker, not on the guard, seccomp, Landlock or namespaces."""
    if os.geteuid() != 0:
        pytest.skip("switching layers off is only done where a uid drop still contains the code (root)")
    results = run_many(_attack_items(problems), timeout_s=10.0, disable=sorted(DISABLEABLE_LAYERS))
    _assert_all_failed(results)


def _nobody_can_run(python: str) -> bool:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                           f"import os; os.stat({str(SRC / 'hybridlora' / 'evaluate' / 'sandbox.py')!r})"],
                          capture_output=True).returncode == 0


def test_attacks_are_scored_failed_as_an_ordinary_user(problems, tmp_path):
    """The same attacks from an evaluation process that is not root (no uid drop, no namespaces)."""
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if os.geteuid() != 0 or not shutil.which("setpriv") or not python or not _nobody_can_run(python):
        pytest.skip("needs root, setpriv and a system python3 that an ordinary user can run with this checkout")
    folder = Path(tempfile.mkdtemp(prefix="he-nonroot-"))
    try:
        folder.chmod(0o755)
        (folder / "items.json").write_text(json.dumps(_attack_items(problems)
                                                      + [(problems["HumanEval/0"],
                                                          problems["HumanEval/0"]["canonical_solution"])]))
        script = textwrap.dedent(f"""
            import json, sys, warnings
            sys.path.insert(0, {str(SRC)!r})
            warnings.simplefilter("ignore")
            from hybridlora.evaluate.sandbox import run_many, protections
            items = json.load(open({str(folder / 'items.json')!r}))
            from hybridlora.evaluate.sandbox import run_program
            results = run_many([tuple(i) for i in items], workers=2, timeout_s=10.0)
            flood = run_program({_DISK_FLOOD!r}, disk_mb=16, timeout_s=20.0)
            print(json.dumps({{"layers": protections(), "results": [[r.passed, r.status, r.detail[:200]]
                                                                    for r in results],
                              "flood": [flood.passed, flood.detail]}}))
        """)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                               script], capture_output=True, text=True, timeout=300, cwd=folder,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(folder)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["layers"]["running_as"] == "uid 65534" and not out["layers"]["uid_drop"]
    *attacks, canonical = out["results"]
    assert canonical[0] is True, canonical  # the set-up can score a pass at all
    passed = {name: r for name, r in zip(ATTACKS, attacks) if r[0]}
    assert passed == {}
    assert out["flood"][0] is False and "16 MiB allowed in total" in out["flood"][1]  # disk cap without root


# ----------------------------------------------------------------------------- disk cap and leftovers
_DISK_FLOOD = textwrap.dedent("""
    import sys
    for i in range(64):
        with open(f"f{i}.bin", "wb") as handle:
            handle.write(b"x" * (4 * 1024 * 1024))
    print("WROTE ALL", file=sys.stderr)
""")


def test_total_bytes_written_are_capped():
    """64 files of 4 MiB each stay under the per-file limit; the total cap stops the program (the work folder
    is on the host's disk here, as it is without root)."""
    res = sandbox.run_program(_DISK_FLOOD, disk_mb=16, timeout_s=20.0, disable=["mount_namespace"])
    assert not res.passed
    assert "16 MiB allowed in total" in res.detail and "WROTE ALL" not in res.detail


def test_leftover_folders_of_a_killed_run_are_removed_but_not_a_live_runs(tmp_path):
    import fcntl

    tmp = str(tmp_path)
    stale = Path(tempfile.mkdtemp(prefix="hybridlora-sbx-", dir=tmp))
    (stale / "lock").write_text("12345\n")  # the pid of a run that was killed
    Path(str(stale) + ".work").mkdir()
    (Path(str(stale) + ".work") / "junk").write_bytes(b"x")
    live = Path(tempfile.mkdtemp(prefix="hybridlora-sbx-", dir=tmp))
    Path(str(live) + ".work").mkdir()
    holder = os.open(live / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"1\n")
    fresh_unlocked = Path(tempfile.mkdtemp(prefix="hybridlora-sbx-", dir=tmp))  # just created, lock not yet
    (fresh_unlocked / "lock").touch()  # created, not yet locked and marked by its run
    old_unlocked = Path(tempfile.mkdtemp(prefix="hybridlora-sbx-", dir=tmp))
    old = time.time() - 3600
    os.utime(old_unlocked, (old, old))
    unrelated = Path(tempfile.mkdtemp(prefix="hybridlora-other-", dir=tmp))
    try:
        assert sandbox._remove_stale_dirs(tmp) == 2
        assert not stale.exists() and not Path(str(stale) + ".work").exists()
        assert live.exists() and Path(str(live) + ".work").exists()
        assert fresh_unlocked.exists() and not old_unlocked.exists() and unrelated.exists()
    finally:
        os.close(holder)
    assert sandbox._remove_stale_dirs(tmp) == 1  # the lock is gone: now the former live run is stale
    assert not live.exists()


def test_a_killed_evaluation_leaves_folders_that_the_next_one_removes(tmp_path):
    """kill -9 of an evaluation process in the middle of a run, then a new process starts the sandbox."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(SRC))
    runner = textwrap.dedent("""
        import warnings; warnings.simplefilter("ignore")
        from hybridlora.evaluate.sandbox import run_program
        print(run_program("import time; time.sleep(30)", timeout_s=60).status, flush=True)
    """)
    victim = subprocess.Popen([sys.executable, "-c", runner], env=env)
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".work") for p in tmp_path.glob("hybridlora-sbx-*")):
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    victim.kill()
    victim.wait()
    assert list(tmp_path.glob("hybridlora-sbx-*"))  # left behind
    again = subprocess.run([sys.executable, "-c", runner.replace("time.sleep(30)", "pass")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.stdout.strip() == "passed", again.stderr[-2000:]
    assert list(tmp_path.glob("hybridlora-sbx-*")) == []
