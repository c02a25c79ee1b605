"""Small stand-ins for the stdlib pieces whose imports would dominate `nsinit exec`'s start.

``nsinit exec /bin/true`` lives for a few tens of milliseconds, and importing ``dataclasses``
(inspect, ast, dis, tokenize), ``json`` and ``re`` (enum, sre), ``typing``, ``pathlib``,
``contextlib`` and the enum-building ``signal``/``socket`` wrappers costs more than the container
itself. The start path uses these instead; everything else (nsinitd, tests) may use the real ones.

- ``frozen``: a typed, immutable value class (what ``@dataclass(frozen=True)`` gives, minus the
  import); ``replace`` copies one with some fields changed.
- ``loads``/``dumps``: JSON through the C scanner and encoder of ``_json`` (what ``json`` uses).
- ``suppress``: ``contextlib.suppress``.
- ``send_fds``/``recv_fds``: ``socket.send_fds``/``socket.recv_fds``.
- ``read_file``: a whole file as bytes through os.open/os.read (``open()`` adds a buffer, and a
  text wrapper that costs four more syscalls per file: fstat, ioctl(TCGETS), two lseeks).

Type checkers see the real dataclass semantics (``dataclass_transform``).
"""

from __future__ import annotations

import _json
import _socket
import _struct as struct  # struct.py only re-exports it
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType
    from typing import Any, TypeVar, dataclass_transform

    _T = TypeVar("_T")

    @dataclass_transform(frozen_default=True)
    def frozen(cls: type[_T]) -> type[_T]: ...

else:

    def frozen(cls):
        """Make cls an immutable record of its annotated fields (in order; class values are defaults).

        Fields named in the class attribute ``_uncompared`` take no part in ==, hash and repr.
        A method the class defines itself (``__hash__``, ``__repr__``...) is kept.
        """
        annotations = vars(cls).get("__annotations__", {})  # strings: `from __future__ import annotations`
        names = tuple(n for n, a in annotations.items() if not str(a).startswith("ClassVar"))
        defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
        compared = tuple(n for n in names if n not in cls.__dict__.get("_uncompared", ()))
        qual = cls.__name__

        def __init__(self, *args, **kwargs):
            if len(args) > len(names):
                raise TypeError(f"{qual}() takes {len(names)} arguments, {len(args)} given")
            d = self.__dict__
            for n, v in zip(names, args, strict=False):
                if n in kwargs:
                    raise TypeError(f"{qual}() got {n!r} twice")
                d[n] = v
            for n in names[len(args):]:
                if n in kwargs:
                    d[n] = kwargs.pop(n)
                elif n in defaults:
                    d[n] = defaults[n]
                else:
                    raise TypeError(f"{qual}() missing argument {n!r}")
            if kwargs:
                raise TypeError(f"{qual}() got unexpected argument(s) {', '.join(map(repr, kwargs))}")

        def _key(self):
            d = self.__dict__
            return tuple(d[n] for n in compared)

        def __eq__(self, other):
            if other.__class__ is not self.__class__:
                return NotImplemented
            return _key(self) == _key(other)

        def __hash__(self):
            return hash(_key(self))

        def __repr__(self):
            d = self.__dict__
            return f"{qual}({', '.join(f'{n}={d[n]!r}' for n in compared)})"

        def __setattr__(self, name, value):
            raise AttributeError(f"{qual} is frozen: cannot set {name!r}")

        def __delattr__(self, name):
            raise AttributeError(f"{qual} is frozen: cannot delete {name!r}")

        for f in (__init__, __eq__, __hash__, __repr__, __setattr__, __delattr__):
            if f.__name__ in vars(cls):
                continue  # written in the class itself: kept (as dataclass keeps an explicit __hash__)
            f.__qualname__ = f"{qual}.{f.__name__}"
            setattr(cls, f.__name__, f)
        cls.__record_fields__ = names
        return cls


def replace(obj: _T, **changes: Any) -> _T:
    """A copy of the record obj with some fields changed (``dataclasses.replace``)."""
    fields = obj.__class__.__record_fields__  # type: ignore[attr-defined]
    for n in changes:
        if n not in fields:
            raise TypeError(f"{obj.__class__.__name__} has no field {n!r}")
    new = object.__new__(obj.__class__)
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


class suppress:
    """``contextlib.suppress``: the block's exceptions of these types end the block silently."""

    def __init__(self, *exceptions: type[BaseException]) -> None:
        self._exceptions = exceptions

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> bool:
        return kind is not None and issubclass(kind, self._exceptions)


class JSONError(ValueError):
    """Malformed JSON; ``msg``, ``lineno`` and ``colno`` as json.JSONDecodeError has them."""

    def __init__(self, msg: str, doc: str, pos: int) -> None:
        self.msg = msg
        self.lineno = doc.count("\n", 0, pos) + 1
        self.colno = pos - doc.rfind("\n", 0, pos)
        super().__init__(f"{msg}: line {self.lineno} column {self.colno} (char {pos})")


class _ScanContext:
    # the attributes _json.make_scanner reads, with json.loads' defaults
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__
    memo: dict[str, str] = {}


_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # typeshed wants a JSONDecoder
_WS = " \t\n\r"


def loads(data: str | bytes) -> Any:
    """``json.loads`` for UTF-8 text; raises JSONError (a ValueError) or UnicodeDecodeError."""
    doc = data
    if isinstance(doc, bytes):
        # what the "utf-8-sig" codec does, without importing its module (encodings.utf_8_sig)
        doc = (doc[3:] if doc[:3] == b"\xef\xbb\xbf" else doc).decode()
    pos = len(doc) - len(doc.lstrip(_WS))
    try:
        obj, end = _scan(doc, pos)
    except StopIteration as e:
        raise JSONError("Expecting value", doc, e.value) from None
    except ValueError as e:  # json.decoder.JSONDecodeError, raised by the C scanner
        raise JSONError(getattr(e, "msg", str(e)), doc, getattr(e, "pos", pos)) from None
    except SystemError:
        # the C scanner raises json.decoder.JSONDecodeError only if that module is loaded already
        # (it looks in sys.modules): load it, on this error path only, and scan again
        import sys

        if "json.decoder" in sys.modules:
            raise
        import json.decoder  # noqa: F401

        return loads(data)
    rest = len(doc) - len(doc[end:].lstrip(_WS))
    if rest != len(doc):
        raise JSONError("Extra data", doc, rest)
    return obj


def _not_serializable(o: object) -> Any:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def dumps(obj: Any) -> str:
    """``json.dumps(obj)`` (ASCII, one line)."""
    encode: Callable[[Any, int], tuple[str, ...]] = _json.make_encoder(
        {}, _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return "".join(encode(obj, 0))


def send_fds(sock: Any, data: bytes, fds: list[int]) -> None:
    """``socket.send_fds``: data with descriptors passed along (SCM_RIGHTS)."""
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])


def recv_fds(sock: Any, bufsize: int, maxfds: int, nonblocking: bool = False) -> tuple[bytes, list[int]]:
    """``socket.recv_fds``: data and the descriptors that came with it (close-on-exec).
    With nonblocking, BlockingIOError when nothing is there."""
    flags = _socket.MSG_CMSG_CLOEXEC | (_socket.MSG_DONTWAIT if nonblocking else 0)
    data, ancdata, _flags, _addr = sock.recvmsg(bufsize, _socket.CMSG_LEN(maxfds * 4), flags)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds += struct.unpack(f"{n}i", payload[: n * 4])
    return data, fds


def read_file(path: str) -> bytes:
    """The whole content of the file at path (FileNotFoundError and the like as open() raises them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
