"""The narrow channel between a sandboxed candidate function and the trusted test code.

Only *plain data* crosses: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes`` and ``list`` /
``tuple`` / ``dict`` / ``set`` of those (exact types, no subclasses). Anything else is refused
with a reason. Messages are JSON text with a type tag per value, so decoding never runs
code and never builds an object that untrusted code has chosen the class of: equality,
``abs``, ``math.isclose`` and friends then act on genuine built-in values in the trusted
process.

This file is self-contained (standard library only, no package imports): its source text is
also executed inside the sandboxed worker and the trusted checker process.
No ``from __future__`` imports here: the text is run after another file's text.
"""
import json

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one request or reply
MAX_DEPTH = 100  # nesting of containers
MAX_INT_DIGITS = 4000  # below CPython's int/str conversion limit


class PlainDataError(ValueError):
    """A value or message is not plain data (the message says why)."""


_SCALARS = {type(None): "n", bool: "b", int: "i", float: "f", str: "s", bytes: "y"}
_CONTAINERS = {list: "l", tuple: "t", set: "S", dict: "d"}


def to_plain(value, depth=0, _active=None):
    """The tagged JSON-able form of ``value``; raises :class:`PlainDataError` for anything else."""
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    tag = _SCALARS.get(kind)
    if tag == "n":
        return ["n"]
    if tag == "b":
        return ["b", bool(value)]
    if tag == "i":
        text = int.__repr__(value)
        if len(text) > MAX_INT_DIGITS:
            raise PlainDataError(f"an int with more than {MAX_INT_DIGITS} digits")
        return ["i", text]
    if tag == "f":
        return ["f", float.hex(value)]
    if tag == "s":
        return ["s", str.__str__(value)]
    if tag == "y":
        return ["y", bytes.hex(value)]
    tag = _CONTAINERS.get(kind)
    if tag is None:
        raise PlainDataError(f"a {kind.__module__}.{kind.__qualname__} object is not plain data")
    active = set() if _active is None else _active
    if id(value) in active:
        raise PlainDataError("a container that contains itself")
    active.add(id(value))
    try:
        if tag == "d":
            items = [[to_plain(k, depth + 1, active), to_plain(v, depth + 1, active)]
                     for k, v in dict.items(value)]
            return ["d", items]
        elements = list.__iter__(value) if tag == "l" else iter(tuple(value) if tag == "t" else set(value))
        return [tag, [to_plain(v, depth + 1, active) for v in elements]]
    finally:
        active.discard(id(value))


def from_plain(node, depth=0):
    """Build genuine built-in values from a tagged form; raises :class:`PlainDataError` on anything malformed."""
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    if type(node) is not list or not node or type(node[0]) is not str:
        raise PlainDataError("malformed value")
    tag, args = node[0], node[1:]
    if tag == "n" and not args:
        return None
    if len(args) != 1:
        raise PlainDataError("malformed value")
    arg = args[0]
    try:
        if tag == "b" and type(arg) is bool:
            return arg
        if tag == "i" and type(arg) is str and len(arg) <= MAX_INT_DIGITS + 1:
            return int(arg, 10)
        if tag == "f" and type(arg) is str and len(arg) < 64:
            return float.fromhex(arg)
        if tag == "s" and type(arg) is str:
            return arg
        if tag == "y" and type(arg) is str:
            return bytes.fromhex(arg)
    except ValueError:
        raise PlainDataError(f"malformed {tag!r} value") from None
    if type(arg) is not list:
        raise PlainDataError(f"malformed {tag!r} value")
    if tag == "l":
        return [from_plain(v, depth + 1) for v in arg]
    if tag == "t":
        return tuple(from_plain(v, depth + 1) for v in arg)
    try:
        if tag == "S":
            return {from_plain(v, depth + 1) for v in arg}
        if tag == "d":
            out = {}
            for pair in arg:
                if type(pair) is not list or len(pair) != 2:
                    raise PlainDataError("malformed dict item")
                out[from_plain(pair[0], depth + 1)] = from_plain(pair[1], depth + 1)
            return out
    except TypeError as exc:  # an unhashable set element or dict key (e.g. a list)
        raise PlainDataError(f"unhashable set element or dict key ({exc})") from None
    raise PlainDataError(f"unknown type tag {tag!r}")


def encode(message):
    """Bytes of one message (a plain-data value), length-checked."""
    data = json.dumps(to_plain(message), ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_MESSAGE_BYTES:
        raise PlainDataError(f"a message of {len(data):,} bytes (limit {MAX_MESSAGE_BYTES:,})")
    return data


def decode(data):
    """The plain-data value of one message; :class:`PlainDataError` for anything else."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise PlainDataError(f"a message of {len(data):,} bytes (limit {MAX_MESSAGE_BYTES:,})")
    try:
        node = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PlainDataError(f"not a valid message ({type(exc).__name__})") from None
    return from_plain(node)


def write_message(fd, message):
    """Send one message on a file descriptor: 4-byte length, then the encoded bytes."""
    import os

    data = encode(message)
    view = memoryview(len(data).to_bytes(4, "little") + data)
    while view:
        view = view[os.write(fd, view):]


def read_message(fd):
    """Receive one message; ``EOFError`` when the other side has closed the channel."""
    import os

    def exactly(n):
        chunks, left = [], n
        while left:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError("channel closed")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    size = int.from_bytes(exactly(4), "little")
    if size > MAX_MESSAGE_BYTES:
        raise PlainDataError(f"a message of {size:,} bytes (limit {MAX_MESSAGE_BYTES:,})")
    return decode(exactly(size))
