"""Which nsinitd to talk to, and the blocking client that talks to it.

:class:`Client` speaks :mod:`supervisor.protocol` over a plain blocking unix socket, one request at a
time, each answer awaited for a bounded time (the timeouts below). It never imports trio: nsinitctl
must start fast. The socket is ``-s``, else ``[supervisor] socket`` of the ``-c`` config (read
leniently, see :func:`config_path`), else :data:`DEFAULT_SOCKET`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Iterator
from typing import Any

from supervisor import protocol as proto
from supervisor.ctl.errors import FAILED, REFUSED, UNREACHABLE, USAGE, CtlError, RemoteError
from supervisor.ctl.fast import DEFAULT_SOCKET as DEFAULT_SOCKET  # owned by the fast path, which imports little
from supervisor.ctl.fast import QUICK_TIMEOUT as QUICK_TIMEOUT

# How long nsinitctl waits for nsinitd. A daemon stuck in a blocking call accepts connections (the
# kernel does that for it) and never answers: without a bound, nsinitctl would wait with it forever.
CONNECT_TIMEOUT = 5.0  # a live nsinitd takes a connection at once; a full backlog is a stuck one
ACTION_TIMEOUT = 30.0  # a request that waits on programs: a start waits startsecs, a stop stopwaitsecs
ACTION_COMMANDS = frozenset({"start", "stop", "restart", "reload", "shutdown"})


class Client:
    """One connection to nsinitd; requests are answered in order."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout  # for each answer; a stream's items after the first answer wait without limit
        self._sock: socket.socket | None = None
        self._conn = proto.Connection(proto.Role.CLIENT)
        self.ended = ""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connect_timeout = min(CONNECT_TIMEOUT, self.timeout)
        # A unix socket's connect never waits when non-blocking (a full backlog is EAGAIN at once),
        # which is what settimeout() would make it. Blocking, it waits for room in the backlog,
        # for as long as SO_SNDTIMEO says, then fails with EAGAIN.
        seconds = int(connect_timeout)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", seconds, max(int((connect_timeout - seconds) * 1e6), 1)),
        )
        try:
            sock.connect(self.path)
        except BlockingIOError:
            sock.close()
            raise CtlError(
                UNREACHABLE, f"nsinitd at {self.path} accepts no connection within {connect_timeout:g} s"
            ) from None
        except PermissionError:
            sock.close()
            raise CtlError(REFUSED, f"permission denied on {self.path} (only root or the socket's group)") from None
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            kind = _not_a_socket(self.path)
            if kind:
                raise CtlError(UNREACHABLE, f"cannot connect to {self.path}: not a socket ({kind})") from None
            raise CtlError(UNREACHABLE, f"cannot connect to {self.path}: {e.strerror} (is nsinitd running?)") from None
        except OSError as e:
            sock.close()
            raise CtlError(UNREACHABLE, f"cannot connect to {self.path}: {e.strerror or e}") from None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
        self._sock = sock
        return sock

    def _receive(self, deadline: float | None) -> proto.Message:
        """The next message; ``deadline`` (time.monotonic()) bounds the wait for it as a whole, so a
        daemon that trickles bytes can't stretch it."""
        sock = self._connect()
        while True:
            try:
                event = self._conn.next_event()
            except proto.ProtocolError as e:
                raise CtlError(FAILED, f"bad reply from nsinitd: {e.message}") from None
            if isinstance(event, proto.Request):  # pragma: no cover - a client never parses these
                raise CtlError(FAILED, "bad reply from nsinitd: a request")
            if event is proto.CLOSED:
                raise CtlError(UNREACHABLE, "nsinitd closed the connection")
            if event is not proto.NEED_DATA:
                return event
            if deadline is None:
                sock.settimeout(None)
            else:
                sock.settimeout(max(deadline - time.monotonic(), 1e-6))
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                raise CtlError(
                    UNREACHABLE, f"no answer from nsinitd at {self.path} within {self.timeout:g} s"
                ) from None
            except ConnectionResetError:
                data = b""
            self._conn.receive_data(data)

    def _send(self, command: str, args: dict[str, Any], deadline: float) -> int:
        sock = self._connect()
        request_id, data = self._conn.request(command, **args)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 1e-6))
            sock.sendall(data)
        except TimeoutError:
            raise CtlError(UNREACHABLE, f"no answer from nsinitd at {self.path} within {self.timeout:g} s") from None
        except OSError as e:
            # The server may already have refused us and closed: its reason is waiting to be read.
            try:
                reply: proto.Message | None = self._receive(deadline)
            except CtlError:
                reply = None
            if isinstance(reply, proto.Error):
                raise remote_error(reply) from None
            raise CtlError(UNREACHABLE, f"connection to nsinitd lost: {e.strerror or e}") from None
        return request_id

    def call(self, command: str, **args: Any) -> Any:
        deadline = time.monotonic() + self.timeout
        self._send(command, args, deadline)
        reply = self._receive(deadline)
        if isinstance(reply, proto.Error):
            raise remote_error(reply)
        if isinstance(reply, proto.Reply):
            return reply.result
        raise CtlError(FAILED, f"bad reply from nsinitd: unexpected {type(reply).__name__}")

    def stream(self, command: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Items of a streaming request. Returns at the end of the stream (``self.ended`` says
        why), raises CtlError (FAILED) if the daemon dropped us."""
        self.call(command, **args)
        while True:
            message = self._receive(None)  # the timeout bounds the first answer; a stream may be quiet for long
            if isinstance(message, proto.StreamItem):
                yield dict(message.data)
            elif isinstance(message, proto.StreamEnd):
                if message.reason == "dropped":
                    raise CtlError(FAILED, f"event stream dropped by nsinitd: {message.message}")
                self.ended = message.message
                return
            elif isinstance(message, proto.Error):
                raise remote_error(message)


def _not_a_socket(path: str) -> str:
    """What ``path`` is when it exists and isn't a socket ("a regular file"), else ""."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISSOCK(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "some other kind of file"


def remote_error(error: proto.Error) -> RemoteError:
    """The exception for a daemon's error reply; a refusal ends the command at once (exit 5)."""
    if error.code == proto.REFUSED:
        raise CtlError(REFUSED, error.message)
    return RemoteError(error.code, error.message)


# -- the socket path --------------------------------------------------------------------------------


_TABLE = re.compile(r"\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?")


def config_path(config: str, key: str) -> str | None:
    """``[supervisor] KEY`` of an nsinitd config, relative paths taken from the config's directory;
    None when the key isn't there.

    Read leniently: nsinitctl needs one path, and a typo elsewhere in the file (which nsinitd
    refuses on reload, and says so) must not cut the operator off from the daemon still running
    the previous version. A file that isn't valid TOML is read line by line: every ``key = value``
    line of the [supervisor] table that parses alone counts."""
    try:
        with open(config, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError as e:
        raise CtlError(USAGE, f"cannot read config {config}: {e.strerror}") from None
    import tomllib  # only -c pays for a TOML parser (6 ms of every start)

    broken: tomllib.TOMLDecodeError | None = None
    try:
        section = tomllib.loads(text).get("supervisor", {})
    except tomllib.TOMLDecodeError as e:
        broken = e
        section = _supervisor_lines(text)
    value = section.get(key) if isinstance(section, dict) else None
    if value is None:
        if broken is not None:
            raise CtlError(USAGE, f"config {config}: {broken}; no [supervisor] {key} could be read from it")
        return None
    if not isinstance(value, str):
        raise CtlError(USAGE, f"config {config}: supervisor.{key}: expected a string")
    return os.path.join(os.path.dirname(os.path.abspath(config)), value)


def _supervisor_lines(text: str) -> dict[str, Any]:
    """The one-line keys of the [supervisor] table of a file that isn't valid TOML as a whole."""
    import tomllib

    found: dict[str, Any] = {}
    table = ""
    for line in text.splitlines():
        header = _TABLE.fullmatch(line)
        if header:
            table = header.group(1)
        elif table == "supervisor":
            with contextlib.suppress(tomllib.TOMLDecodeError):
                found.update(tomllib.loads(line))
    return found


def answer_timeout(args: argparse.Namespace) -> float:
    if args.timeout is not None:
        return float(args.timeout)
    return ACTION_TIMEOUT if args.command in ACTION_COMMANDS else QUICK_TIMEOUT


def connect(args: argparse.Namespace) -> Client:
    """A client for the daemon the command line names, with the command's timeout."""
    return Client(socket_path(args), answer_timeout(args))


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if args.config:
        path = config_path(args.config, "socket")
        if path:
            return path
    return DEFAULT_SOCKET


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True
