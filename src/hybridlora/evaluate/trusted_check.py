"""The trusted side of a HumanEval run: the benchmark's ``check`` against a sandboxed candidate.

Not imported: :mod:`.sandbox` runs this file's source text, after the source of :mod:`.plain_data`,
as its own process (``python -I -S -B -c SOURCE REQUEST_FD REPLY_FD VERDICT_FD``) started by the
evaluation process, never inside the sandbox. It reads the problem (JSON: ``prompt``, ``test``,
``entry_point``) from stdin, executes the problem's prompt (its helper functions) and tests here,
and hands ``check`` a *proxy* for the candidate: each call sends its arguments as plain data to the
sandboxed worker (which holds the only copy of the completion's code) and turns the reply back
into plain values, an exception of a built-in type, or a failure. The verdict (``passed`` only
when ``check`` returned and every call crossed the channel cleanly) is written as JSON to
VERDICT_FD, which the sandboxed worker never holds.
No ``from __future__`` imports here: the text is run after another file's text.
"""


class _ChannelFailure(BaseException):
    """Ends ``check`` when the candidate's side broke the protocol (not catchable by ``except Exception``)."""


def _checker_main():
    import builtins
    import json
    import linecache
    import os
    import sys
    import traceback

    request_fd, reply_fd, verdict_fd = (int(x) for x in sys.argv[1:4])
    _harden()
    problem = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    state = {"failure": None, "calls": 0}

    def verdict(status, detail):
        data = json.dumps({"status": status, "detail": detail[:3000], "calls": state["calls"]}).encode()
        os.write(verdict_fd, data)
        os._exit(0)

    def broken(reason):
        state["failure"] = reason
        raise _ChannelFailure(reason)

    def receive():
        try:
            return read_message(reply_fd)  # noqa: F821 (plain_data's source runs first)
        except EOFError:
            broken("the candidate's process ended before the tests finished")
        except PlainDataError as exc:  # noqa: F821
            broken(f"the candidate's side sent something that is not plain data: {exc}")

    try:
        first = receive()
    except _ChannelFailure:
        verdict("failed", state["failure"])
    if first != ["ready"]:
        if type(first) is list and len(first) == 2 and first[0] == "load_error" and type(first[1]) is str:
            verdict("failed", "the completion did not load: " + first[1])
        verdict("failed", "the candidate's side did not follow the protocol at start-up")

    def candidate(*args, **kwargs):
        if state["failure"]:
            raise _ChannelFailure(state["failure"])
        state["calls"] += 1
        try:
            write_message(request_fd, ["call", list(args), kwargs])  # noqa: F821
        except PlainDataError as exc:  # noqa: F821
            broken(f"the test passes an argument that cannot cross the channel: {exc}")
        except OSError:
            broken("the candidate's process ended before the tests finished")
        return _interpret(receive(), args, kwargs, broken)

    for name, source in (("<prompt>", problem["prompt"]), ("<test>", problem["test"])):
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    namespace = {"__name__": "__check__", "__builtins__": builtins}
    prompt = _executable_prompt(problem["prompt"])
    if prompt is None:
        verdict("error", "the problem's prompt is not valid Python on its own (even with a 'pass' body), "
                         "so its helper functions cannot be defined for the tests")
    try:
        exec(prompt, namespace)  # the problem's own helpers (the entry point's stub is replaced below)
        namespace[problem["entry_point"]] = candidate  # tests may call the function by its name
        exec(compile(problem["test"], "<test>", "exec"), namespace)
        namespace["check"](candidate)
    except BaseException as exc:
        if state["failure"]:
            verdict("failed", state["failure"])
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        verdict("failed", "the tests failed:\n" + "".join(line for line in lines if "<string>" not in line))
    if state["failure"]:  # the test swallowed a broken call
        verdict("failed", state["failure"])
    verdict("passed", "")


def _executable_prompt(prompt):
    """The prompt compiled: as is (signature + docstring is a complete function), else with a ``pass`` body."""
    for source in (prompt, prompt.rstrip("\n") + "\n    pass\n"):
        try:
            return compile(source, "<prompt>", "exec")
        except SyntaxError:
            continue
    return None


def _harden():
    """No core dumps or ptrace by same-uid processes (PR_SET_DUMPABLE 0); bounded memory."""
    import resource

    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    limit = 2 * 1024 ** 3
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _interpret(reply, args, kwargs, broken):
    """The candidate's reply as the test should see it: a value, or a raised built-in exception."""
    import builtins

    if type(reply) is not list or not reply or type(reply[0]) is not str:
        broken("the candidate's side did not follow the protocol")
    kind = reply[0]
    if kind == "return" and len(reply) == 3 and type(reply[2]) is list and len(reply[2]) == len(args):
        for before, after in zip(args, reply[2]):
            _write_back(before, after)
        return reply[1]
    if kind == "raise" and len(reply) == 3 and type(reply[1]) is list and type(reply[2]) is str:
        # StopIteration would silently end a test's map()/iteration early instead of failing it
        stops = "StopIteration" in reply[1] or "StopAsyncIteration" in reply[1]
        for name in [] if stops else reply[1]:  # the candidate's exception class and its bases, most derived first
            cls = getattr(builtins, name, None) if type(name) is str else None
            if isinstance(cls, type) and issubclass(cls, Exception):
                try:
                    error = cls("raised by the candidate: " + reply[2])
                except TypeError:  # a constructor with other arguments (UnicodeDecodeError): use a base
                    continue
                raise error
        broken("the candidate raised " + (reply[1][0] if reply[1] and type(reply[1][0]) is str else "?")
               + ": " + reply[2][:500])
    if kind == "not_plain" and len(reply) == 2 and type(reply[1]) is str:
        broken("the candidate returned a value that is not plain data: " + reply[1][:500])
    broken("the candidate's side did not follow the protocol")


def _write_back(before, after):
    """Apply the candidate's in-place changes of a list/dict/set argument to the test's own object."""
    if before == after:
        return
    if type(before) is list and type(after) is list:
        before[:] = after
    elif type(before) is dict and type(after) is dict:
        before.clear()
        before.update(after)
    elif type(before) is set and type(after) is set:
        before.clear()
        before.update(after)
