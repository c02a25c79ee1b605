"""The control protocol between nsinitctl and nsinitd, free of I/O.

One JSON object per line (UTF-8, ``\\n``-terminated), in both directions::

    -> {"id": 7, "cmd": "status", "args": {"names": ["web"]}}
    <- {"id": 7, "ok": true, "result": [{"name": "web", "state": "RUNNING", ...}]}
    <- {"id": 7, "ok": false, "error": {"code": "no_such_program", "message": "no such program: web"}}

A streaming request (``events``) is answered by an ok reply, then any number of items, then one end::

    <- {"id": 8, "ok": true, "result": {"stream": true}}
    <- {"id": 8, "item": {"ts": "...", "event": "program.running", ...}}
    <- {"id": 8, "end": {"reason": "dropped", "message": "..."}}

:class:`Connection` follows h11's shape: feed bytes with :meth:`Connection.receive_data` (``b""`` for
EOF), pull messages with :meth:`Connection.next_event` until it returns :data:`NEED_DATA` (or
:data:`CLOSED`), and turn outgoing messages into bytes with :meth:`Connection.send`. It never sees a
socket, so the server and the client share it and it is tested with plain bytes.

Lines are bounded (:data:`MAX_REQUEST_BYTES` for what a server accepts, :data:`MAX_RESPONSE_BYTES`
for what a client accepts) and the bound is enforced while a line is still incomplete, so a peer
that never sends a newline costs at most one line's worth of memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
MAX_REQUEST_BYTES: Final = 64 * 1024
MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
MAX_NAME_LENGTH: Final = 256
MAX_NAMES: Final = 4096

# Error codes beyond the ones api.ControlError defines (no_such_program, bad_state, bad_request,
# failed, not_a_container).
MALFORMED: Final = "malformed"  # not a JSON object on one line
TOO_LARGE: Final = "too_large"  # a line over the limit; the connection is closed after the reply
REFUSED: Final = "refused"  # SO_PEERCRED says this peer may not use the socket
BUSY: Final = "busy"  # too many connections
TIMEOUT: Final = "timeout"  # a request line left half-written for too long
UNSUPPORTED: Final = "unsupported"  # the daemon doesn't offer this request
INTERNAL: Final = "internal"  # the daemon failed unexpectedly; the request may not have happened


class _Kind(Enum):
    STR = "a string"
    INT = "an integer"
    NAMES = "a list of program names"
    STREAM = 'one of "stdout", "stderr"'
    BOOL = "true or false"


# command -> {argument: (kind, required)}. Everything a client may send is listed here, so a server
# never sees an argument it didn't expect or of the wrong type.
COMMANDS: Final[Mapping[str, Mapping[str, tuple[_Kind, bool]]]] = {
    "status": {"names": (_Kind.NAMES, False)},
    "start": {"name": (_Kind.STR, True)},
    "stop": {"name": (_Kind.STR, True)},
    "restart": {"name": (_Kind.STR, True)},
    # many programs at once, by priority groups (each group together); one answer per name
    "start_many": {"names": (_Kind.NAMES, True)},
    "stop_many": {"names": (_Kind.NAMES, True)},
    "restart_many": {"names": (_Kind.NAMES, True)},
    "signal": {"name": (_Kind.STR, True), "signum": (_Kind.INT, True)},
    "exec_target": {"name": (_Kind.STR, True)},
    "log_path": {"name": (_Kind.STR, True), "stream": (_Kind.STREAM, True)},
    "stats": {"names": (_Kind.NAMES, False)},
    "pid": {"name": (_Kind.STR, False)},
    "events": {},
    "reload": {},
    "reread": {},
    "event_log": {},
    "shutdown": {"keep_running": (_Kind.BOOL, False)},
    "version": {},
}
STREAMING_COMMANDS: Final = frozenset({"events"})


class ProtocolError(Exception):
    """The peer sent something that isn't a valid message.

    ``fatal`` means the byte stream can't be resynchronised (an oversized or truncated line): reply
    if possible, then close. Otherwise the bad line has been consumed and the connection goes on.
    ``request_id`` is the id of the offending request when it could be read, for the error reply.
    """

    def __init__(self, code: str, message: str, *, fatal: bool = False, request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    id: int
    command: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    id: int | None
    result: Any


@dataclass(frozen=True)
class Error:
    id: int | None
    code: str
    message: str


@dataclass(frozen=True)
class StreamItem:
    id: int
    data: Mapping[str, Any]


@dataclass(frozen=True)
class StreamEnd:
    id: int
    reason: str  # "dropped" (fell behind), "closed" (the daemon is going away)
    message: str = ""


Message = Request | Reply | Error | StreamItem | StreamEnd


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = _Sentinel.NEED_DATA
"""No complete message buffered: feed more bytes."""
CLOSED: Final = _Sentinel.CLOSED
"""The peer closed its side cleanly, between messages."""


class Role(Enum):
    SERVER = "server"  # receives requests, sends replies
    CLIENT = "client"  # sends requests, receives replies


class Connection:
    """One side of one control connection. Not thread-safe; holds no I/O resources."""

    def __init__(self, role: Role, *, max_line: int | None = None) -> None:
        self.role = role
        if max_line is None:
            max_line = MAX_REQUEST_BYTES if role is Role.SERVER else MAX_RESPONSE_BYTES
        self.max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already known to hold no newline
        self._eof = False
        self._broken = False
        self._next_id = 1

    @property
    def pending(self) -> int:
        """Bytes received but not yet turned into a message (a half-written line)."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self._eof and data:
            raise RuntimeError("receive_data after EOF")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Message | _Sentinel:
        """The next complete message, :data:`NEED_DATA` or :data:`CLOSED`.

        Raises :class:`ProtocolError` for a bad line; after a fatal one, every call raises again.
        """
        if self._broken:
            raise ProtocolError(MALFORMED, "connection already failed", fatal=True)
        newline = self._buffer.find(b"\n", self._scanned)
        if newline < 0:
            self._scanned = len(self._buffer)
            if len(self._buffer) > self.max_line:
                self._broken = True
                raise ProtocolError(TOO_LARGE, f"message longer than {self.max_line} bytes", fatal=True)
            if self._eof:
                if self._buffer:
                    self._broken = True
                    raise ProtocolError(
                        MALFORMED,
                        f"connection closed in the middle of a message ({len(self._buffer)} bytes)",
                        fatal=True,
                    )
                return CLOSED
            return NEED_DATA
        if newline > self.max_line:
            self._broken = True
            raise ProtocolError(TOO_LARGE, f"message longer than {self.max_line} bytes", fatal=True)
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        self._scanned = 0
        obj = _decode(line)
        if self.role is Role.SERVER:
            return _parse_request(obj)
        return _parse_response(obj)

    def send(self, message: Message) -> bytes:
        """The bytes for one outgoing message (one line)."""
        if self.role is Role.CLIENT:
            if not isinstance(message, Request):
                raise TypeError(f"a client sends requests, not {type(message).__name__}")
            check_request(message)
            obj: dict[str, Any] = {"id": message.id, "cmd": message.command, "args": dict(message.args)}
        elif isinstance(message, Reply):
            obj = {"id": message.id, "ok": True, "result": message.result}
        elif isinstance(message, Error):
            obj = {"id": message.id, "ok": False, "error": {"code": message.code, "message": message.message}}
        elif isinstance(message, StreamItem):
            obj = {"id": message.id, "item": dict(message.data)}
        elif isinstance(message, StreamEnd):
            obj = {"id": message.id, "end": {"reason": message.reason, "message": message.message}}
        else:
            raise TypeError(f"a server sends replies, not {type(message).__name__}")
        return encode(obj)

    def request(self, command: str, **args: Any) -> tuple[int, bytes]:
        """Client helper: a new request id and the bytes asking ``command(**args)``."""
        request_id = self._next_id
        self._next_id += 1
        return request_id, self.send(Request(request_id, command, args))


def encode(obj: Mapping[str, Any]) -> bytes:
    # json escapes control characters inside strings, so the only newline is the terminator.
    # allow_nan=False keeps the output strict JSON that any reader can parse.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ProtocolError(MALFORMED, f"not UTF-8: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(MALFORMED, f"not JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise ProtocolError(MALFORMED, "not JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(MALFORMED, f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_request(obj: dict[str, Any]) -> Request:
    request_id: Any = obj.get("id")
    if not _is_int(request_id) or not 0 <= request_id < 2**53:
        raise ProtocolError(MALFORMED, "id: expected a non-negative integer")
    extra = set(obj) - {"id", "cmd", "args"}
    if extra:
        raise ProtocolError(MALFORMED, f"unknown field {sorted(extra)[0]!r}", request_id=request_id)
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(MALFORMED, "args: expected an object", request_id=request_id)
    request = Request(request_id, obj.get("cmd"), args)  # type: ignore[arg-type]
    try:
        check_request(request)
    except ProtocolError as e:
        e.request_id = request_id
        raise
    return request


def check_request(request: Request) -> None:
    """Raise ProtocolError(bad_request) unless ``request`` names a known command with valid args."""
    command = request.command
    if not isinstance(command, str):
        raise ProtocolError("bad_request", "cmd: expected a string")
    spec = COMMANDS.get(command)
    if spec is None:
        raise ProtocolError("bad_request", f"unknown command {command[:64]!r}")
    for key, value in request.args.items():
        if key not in spec:
            raise ProtocolError("bad_request", f"{command}: unknown argument {str(key)[:64]!r}")
        kind = spec[key][0]
        if not _valid(kind, value):
            raise ProtocolError("bad_request", f"{command}: {key}: expected {kind.value}")
    for key, (_kind, required) in spec.items():
        if required and key not in request.args:
            raise ProtocolError("bad_request", f"{command}: missing argument {key!r}")


def _valid_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_LENGTH and "\0" not in value


def _valid(kind: _Kind, value: Any) -> bool:
    if kind is _Kind.STR:
        return _valid_name(value)
    if kind is _Kind.INT:
        return _is_int(value) and -(2**31) <= value < 2**31
    if kind is _Kind.STREAM:
        return value in ("stdout", "stderr")
    if kind is _Kind.BOOL:
        return isinstance(value, bool)
    return isinstance(value, list) and len(value) <= MAX_NAMES and all(_valid_name(v) for v in value)


def _parse_response(obj: dict[str, Any]) -> Reply | Error | StreamItem | StreamEnd:
    request_id = obj.get("id")
    if request_id is not None and not _is_int(request_id):
        raise ProtocolError(MALFORMED, "id: expected an integer or null")
    if "item" in obj or "end" in obj:
        if request_id is None:
            raise ProtocolError(MALFORMED, "stream message without an id")
        if "item" in obj:
            if not isinstance(obj["item"], dict):
                raise ProtocolError(MALFORMED, "item: expected an object")
            return StreamItem(request_id, obj["item"])
        end = obj["end"]
        if not isinstance(end, dict) or not isinstance(end.get("reason"), str):
            raise ProtocolError(MALFORMED, "end: expected an object with a reason")
        return StreamEnd(request_id, end["reason"], str(end.get("message", "")))
    ok = obj.get("ok")
    if ok is True:
        return Reply(request_id, obj.get("result"))
    if ok is False:
        error = obj.get("error")
        if not isinstance(error, dict):
            raise ProtocolError(MALFORMED, "error: expected an object")
        return Error(request_id, str(error.get("code", "failed")), str(error.get("message", "")))
    raise ProtocolError(MALFORMED, "expected ok, item or end")
