"""nsinitctl: control a running nsinitd over its unix socket, and read JSON event logs.

Usage: ``nsinitctl [-s SOCKET] [-c CONFIG] [--json] [--timeout S] COMMAND ...``

The socket is ``-s``, else ``[supervisor] socket`` of the config file given with ``-c``, else
``/run/nsinit/nsinitd.sock``. Commands: status, start, stop, restart, signal, exec, pid, logs, events,
top, reload, reread, shutdown, version (``nsinitctl COMMAND -h`` for each). Each answer is awaited
30 s for start/stop/restart/reload/shutdown, 10 s for the rest, or ``--timeout``.

Exit statuses:

====  ==========================================================================================
0     success
1     the action failed: a program did not reach the wanted state (start ended FATAL/BACKOFF,
      start of a running program, stop of a stopped one), reload failed, the daemon reported an
      internal error, an event stream was dropped for falling behind
2     usage error: bad arguments, unknown command, unknown program, unreadable config or file
3     a program is not running: ``status NAME...`` with a named program not RUNNING, ``pid NAME``,
      ``signal`` or ``exec`` on a program that isn't running
4     nsinitd unreachable: no socket, not a socket, nobody listening, connection lost, no answer
      within the timeout (--timeout, default 30 s or 10 s)
5     refused: the socket's permissions or the daemon's SO_PEERCRED check (not root, not in the
      configured group)
125   exec: the runtime failed to join the container (the command never ran)
N     exec: otherwise the exit status of the command run in the container (128+signal if killed)
130   interrupted (Ctrl-C) -- except while following (``logs -f``, ``events -f``, ``top``), where
      Ctrl-C is the normal way out and the status is 0
====  ==========================================================================================

With several programs the worst status wins (the highest number). The client never imports trio:
it speaks :mod:`supervisor.protocol` over a blocking socket, so it starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import importlib
import json
import os
import re
import signal as signal_module
import socket
import stat
import struct
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from supervisor import __version__
from supervisor import protocol as proto

DEFAULT_SOCKET = "/run/nsinit/nsinitd.sock"

# How long nsinitctl waits for nsinitd. A daemon stuck in a blocking call accepts connections (the
# kernel does that for it) and never answers: without a bound, nsinitctl would wait with it forever.
CONNECT_TIMEOUT = 5.0  # a live nsinitd takes a connection at once; a full backlog is a stuck one
QUICK_TIMEOUT = 10.0  # a request answered from the daemon's memory (status, pid, logs, ...)
ACTION_TIMEOUT = 30.0  # a request that waits on programs: a start waits startsecs, a stop stopwaitsecs
ACTION_COMMANDS = frozenset({"start", "stop", "restart", "reload", "shutdown"})

OK, FAILED, USAGE, NOT_RUNNING, UNREACHABLE, REFUSED = 0, 1, 2, 3, 4, 5
EXEC_FAILED = 125
INTERRUPTED = 130

# Where a program is on its way up or already up; "all" for stop/signal means these.
ACTIVE_STATES = frozenset({"STARTING", "RUNNING", "BACKOFF", "STOPPING"})


class CtlError(Exception):
    """Ends the command with ``status`` after printing ``message`` on stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RemoteError(Exception):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- talking to the daemon ---------------------------------------------------------------------------


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
                raise _remote(reply) from None
            raise CtlError(UNREACHABLE, f"connection to nsinitd lost: {e.strerror or e}") from None
        return request_id

    def call(self, command: str, **args: Any) -> Any:
        deadline = time.monotonic() + self.timeout
        self._send(command, args, deadline)
        reply = self._receive(deadline)
        if isinstance(reply, proto.Error):
            raise _remote(reply)
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
                raise _remote(message)


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


def _remote(error: proto.Error) -> RemoteError:
    """The exception for a daemon's error reply; a refusal ends the command at once (exit 5)."""
    if error.code == proto.REFUSED:
        raise CtlError(REFUSED, error.message)
    return RemoteError(error.code, error.message)


def _status_for(code: str, *, not_running: int = FAILED) -> int:
    """Exit status for a daemon error code; ``not_running`` is what bad_state means here."""
    if code in ("no_such_program", "bad_request"):
        return USAGE
    if code == "bad_state":
        return not_running
    if code == proto.REFUSED:
        return REFUSED
    return FAILED


# -- the socket path -----------------------------------------------------------------------------------


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


# -- output helpers ------------------------------------------------------------------------------------


@dataclass
class Output:
    out: IO[str]
    err: IO[str]
    json: bool

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def dump(self, value: Any) -> None:
        self.line(json.dumps(value, indent=None if isinstance(value, dict) and "event" in value else 2))

    def error(self, text: str) -> None:
        self.err.write(f"nsinitctl: {text}\n")
        self.err.flush()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    if days:
        return f"{days} day{'s' if days > 1 else ''}, {clock}"
    return clock


def describe(program: dict[str, Any], now: float) -> str:
    state = program.get("state")
    if state == "RUNNING" and program.get("pid"):
        return f"pid {program['pid']}, uptime {format_duration(now - float(program.get('since') or now))}"
    if program.get("description"):
        return str(program["description"])
    if program.get("exit_code") is not None:
        text = f"exit status {program['exit_code']}"
        if program.get("signal"):
            text += f" ({program['signal']})"
        return text
    return ""


def status_lines(programs: Sequence[dict[str, Any]], now: float) -> list[str]:
    width = max([len(str(p["name"])) for p in programs] + [16]) + 2
    return [f"{p['name']:<{width}}{p['state']:<10}{describe(p, now)}".rstrip() for p in programs]


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


# -- commands ------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, o: Output) -> int:
    with connect(args) as client:
        programs: list[dict[str, Any]] = client.call("status")
    status = OK
    if args.names:
        by_name = {p["name"]: p for p in programs}
        unknown = [n for n in args.names if n not in by_name]
        programs = [by_name[n] for n in dict.fromkeys(args.names) if n in by_name]
        for name in unknown:
            o.error(f"{name}: ERROR (no such program)")
            status = USAGE
        if status == OK and any(p["state"] != "RUNNING" for p in programs):
            status = NOT_RUNNING
    if o.json:
        o.dump(programs)
    else:
        for line in status_lines(programs, time.time()):
            o.line(line)
    return status


def _expand_all(client: Client, names: Sequence[str], wanted: Callable[[dict[str, Any]], bool]) -> list[str]:
    if "all" not in names:
        return list(dict.fromkeys(names))
    return [p["name"] for p in client.call("status") if wanted(p)]


_ACTIONS: dict[str, tuple[str, str, frozenset[str]]] = {
    # command: (done word, the state that means done, the states "all" picks)
    "start": ("started", "RUNNING", frozenset({"STOPPED", "EXITED", "FATAL", "BACKOFF"})),
    "stop": ("stopped", "STOPPED", ACTIVE_STATES),
    "restart": ("restarted", "RUNNING", frozenset({"STOPPED", "EXITED", "FATAL", "BACKOFF", *ACTIVE_STATES})),
}


def cmd_action(args: argparse.Namespace, o: Output) -> int:
    word, wanted, picked = _ACTIONS[args.command]
    results: list[dict[str, Any]] = []
    status = OK
    with connect(args) as client:
        names = _expand_all(client, args.names, lambda p: p["state"] in picked)
        if args.command == "stop" and "all" in args.names:
            names.reverse()  # the daemon lists by name; stop in the opposite order of start
        for name in names:
            try:
                result = client.call(args.command, name=name)
            except RemoteError as e:
                status = max(status, _status_for(e.code))
                results.append({"name": name, "error": {"code": e.code, "message": e.message}})
                if not o.json:
                    o.line(f"{name}: ERROR ({e.message})")
                continue
            results.append(result)
            reached = result["state"] == wanted or (args.command == "stop" and result["state"] not in ACTIVE_STATES)
            if not reached:
                status = max(status, FAILED)
            if not o.json:
                if reached:
                    o.line(f"{name}: {word}")
                else:
                    o.line(f"{name}: ERROR ({result['state']}: {describe(result, time.time()) or 'failed'})")
    if o.json:
        o.dump(results)
    return status


def parse_signal(text: str) -> int:
    if text.isdigit():
        number = int(text)
        if number in {int(s) for s in signal_module.valid_signals()}:
            return number
        raise CtlError(USAGE, f"no such signal: {text}")
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal_module.Signals[name])
    except KeyError:
        raise CtlError(USAGE, f"no such signal: {text}") from None


def cmd_signal(args: argparse.Namespace, o: Output) -> int:
    signum = parse_signal(args.signal)
    try:
        signame = signal_module.Signals(signum).name
    except ValueError:
        signame = str(signum)  # a real-time signal
    results: list[dict[str, Any]] = []
    status = OK
    with connect(args) as client:
        for name in _expand_all(client, args.names, lambda p: p["state"] == "RUNNING"):
            try:
                client.call("signal", name=name, signum=signum)
            except RemoteError as e:
                status = max(status, _status_for(e.code, not_running=NOT_RUNNING))
                results.append({"name": name, "error": {"code": e.code, "message": e.message}})
                if not o.json:
                    o.line(f"{name}: ERROR ({e.message})")
                continue
            results.append({"name": name, "signal": signame})
            if not o.json:
                o.line(f"{name}: signalled {signame}")
    if o.json:
        o.dump(results)
    return status


def cmd_exec(args: argparse.Namespace, o: Output) -> int:
    command: list[str] = args.cmd
    with connect(args) as client:
        try:
            state_dir = client.call("exec_target", name=args.name)
        except RemoteError as e:
            raise CtlError(_status_for(e.code, not_running=NOT_RUNNING), e.message) from None
    # Imported by name: only exec pays for the runtime, and a runtime without join() is an
    # error message rather than an ImportError at startup.
    join = getattr(importlib.import_module("nsruntime"), "join", None)
    if join is None:
        raise CtlError(EXEC_FAILED, "exec: this nsruntime has no join()")
    try:
        return int(join(Path(state_dir), command, tty=args.tty))
    except Exception as e:
        # The runtime's errors name the step and the path; show them as they are.
        raise CtlError(EXEC_FAILED, f"exec {args.name}: {e}") from None


def cmd_pid(args: argparse.Namespace, o: Output) -> int:
    with connect(args) as client:
        try:
            pid = client.call("pid", **({"name": args.name} if args.name else {}))
        except RemoteError as e:
            # Print no pid at all rather than 0: `kill $(nsinitctl pid web)` must not become `kill 0`.
            raise CtlError(_status_for(e.code, not_running=NOT_RUNNING), e.message) from None
    if o.json:
        o.dump({"name": args.name, "pid": pid})
    else:
        o.line(str(pid))
    return OK


# -- logs ------------------------------------------------------------------------------------------------


def tail_bytes(f: IO[bytes], lines: int) -> bytes:
    """The last ``lines`` lines of a file, reading backwards in blocks."""
    if lines <= 0:
        f.seek(0, os.SEEK_END)
        return b""
    end = f.seek(0, os.SEEK_END)
    pos, data = end, b""
    while pos > 0 and data.count(b"\n") <= lines:
        step = min(pos, 64 * 1024)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
    f.seek(end)
    keep = data.splitlines(keepends=True)[-lines:]
    return b"".join(keep)


class Follower:
    """``tail -F`` for one path: reads what is appended, reopens when the file is rotated
    (replaced by a new inode) or truncated, and waits for a file that doesn't exist yet.

    :meth:`wait` sleeps until the kernel says something changed in the file's directory (inotify
    on the directory reports writes to the files in it, and renames and creations: appends,
    truncation and rotation alike). The watch is made before the first read, so a write between
    a read that found nothing and the wait still wakes it."""

    # inotify sees every local write; the re-check covers what it can't see (a network
    # filesystem written from another machine), or a watch that couldn't be made
    RECHECK = 2.0
    POLL = 0.2  # without inotify at all

    def __init__(self, path: Path, f: IO[bytes] | None) -> None:
        self.path = path
        self.f = f
        self._inotify: int | None = None
        try:
            from nsruntime import libc  # only a follower pays for it

            fd = libc.inotify_init1()
            try:
                mask = libc.IN_MODIFY | libc.IN_ATTRIB | libc.IN_CREATE | libc.IN_MOVED_TO | libc.IN_MOVED_FROM
                libc.inotify_add_watch(fd, os.fspath(path.parent), mask | libc.IN_DELETE)
            except OSError:
                os.close(fd)
                raise
            self._inotify = fd
        except (OSError, ImportError):
            pass

    def wait(self) -> None:
        """Until the file may have changed (bounded by RECHECK)."""
        if self._inotify is None:
            time.sleep(self.POLL)
            return
        import select

        poller = select.poll()
        poller.register(self._inotify, select.POLLIN)
        if poller.poll(self.RECHECK * 1000):
            with contextlib.suppress(BlockingIOError):
                while os.read(self._inotify, 64 * 1024):
                    pass

    def _reopen(self) -> bool:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open across calls
        except OSError:
            return False
        if self.f is not None:
            self.f.close()
        self.f = f
        return True

    def read(self) -> bytes:
        if self.f is None:
            return self.read_reopened()
        data = self.f.read()
        if data:
            return data
        try:
            st = os.stat(self.path)
        except OSError:
            return b""
        current = os.fstat(self.f.fileno())
        if (st.st_dev, st.st_ino) != (current.st_dev, current.st_ino):
            return self.f.read() + self.read_reopened()  # the old file's last words first
        if st.st_size < self.f.tell():
            self.f.seek(0)  # truncated in place
            return self.f.read()
        return b""

    def read_reopened(self) -> bytes:
        if not self._reopen():
            return b""
        assert self.f is not None
        return self.f.read()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self._inotify is not None:
            os.close(self._inotify)
            self._inotify = None


def cmd_logs(args: argparse.Namespace, o: Output) -> int:
    stream = "stderr" if args.stderr else "stdout"
    with connect(args) as client:
        try:
            path = Path(client.call("log_path", name=args.name, stream=stream))
        except RemoteError as e:
            raise CtlError(_status_for(e.code), e.message) from None
    out = getattr(o.out, "buffer", None)

    def write(data: bytes) -> None:
        if out is not None:
            out.write(data)
            out.flush()
        else:
            o.out.write(data.decode(errors="replace"))
            o.out.flush()

    f: IO[bytes] | None
    try:
        f = open(path, "rb")  # noqa: SIM115 - handed to the Follower
    except FileNotFoundError:
        if not args.follow:
            o.error(f"{args.name}: no {stream} captured yet ({path})")
            return OK
        f = None
    except OSError as e:
        raise CtlError(FAILED, f"cannot read {path}: {e.strerror}") from None
    if f is not None:
        write(tail_bytes(f, args.lines))
    if not args.follow:
        if f is not None:
            f.close()
        return OK
    follower = Follower(path, f)
    try:
        while True:
            data = follower.read()
            if data:
                write(data)
            else:
                follower.wait()
    finally:
        follower.close()


# -- events ----------------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """RFC 3339 (``2026-11-28T00:10:00Z``; without an offset, local time) or relative to now
    (``90s``, ``10m``, ``1h30m``, ``2d``). Returns a POSIX timestamp."""
    now = time.time() if now is None else now
    text = text.strip()
    if text and _RELATIVE.sub("", text) == "":
        return now - sum(float(n) * _UNITS[u] for n, u in _RELATIVE.findall(text))
    try:
        when = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise CtlError(USAGE, f"--since: expected RFC 3339 (2026-11-28T00:10:00Z) or 10m/2h/1d, got {text!r}") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def event_time(event: dict[str, Any]) -> float | None:
    ts = event.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return dt.datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class EventFilter:
    programs: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()
    since: float | None = None

    def __call__(self, event: dict[str, Any]) -> bool:
        if self.programs and event.get("program") not in self.programs:
            return False
        name = str(event.get("event", ""))
        if self.patterns and not any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            return False
        if self.since is not None:
            when = event_time(event)
            if when is None or when < self.since:
                return False
        return True


_PRETTY_SKIP = ("ts", "event", "program")


def pretty(event: dict[str, Any]) -> str:
    when = event_time(event)
    stamp = (
        dt.datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        if when is not None
        else str(event.get("ts", "-"))
    )
    details = " ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in event.items() if k not in _PRETTY_SKIP
    )
    return f"{stamp}  {event.get('event', '?')!s:<22} {event.get('program') or '-'!s:<16} {details}".rstrip()


class EventPrinter:
    def __init__(self, o: Output, keep: EventFilter, as_table: bool) -> None:
        self.o = o
        self.keep = keep
        self.as_table = as_table
        self.malformed = 0
        self._header = False

    def line(self, raw: bytes | str) -> None:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        text = text.strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except ValueError:
            self.malformed += 1
            return
        if not isinstance(event, dict):
            self.malformed += 1
            return
        self.event(event, text)

    def event(self, event: dict[str, Any], raw: str | None = None) -> None:
        if not self.keep(event):
            return
        if not self.as_table:
            # Live events are printed the way nsinitd writes its event log, so both read alike.
            self.o.line(raw if raw is not None else json.dumps(event))
            return
        if not self._header:
            self.o.line(f"{'TIME':<23}  {'EVENT':<22} {'PROGRAM':<16} DETAILS")
            self._header = True
        self.o.line(pretty(event))


def _event_log(args: argparse.Namespace) -> str:
    """The event log to read: the config's ``event_log``, else the one the daemon names."""
    if args.config:
        path = config_path(args.config, "event_log")
        if path:
            return path
    try:
        with connect(args) as client:
            path = client.call("event_log")
    except (CtlError, RemoteError) as e:
        if isinstance(e, CtlError) and e.status != UNREACHABLE:
            raise
        raise CtlError(
            USAGE,
            f"events: nothing to read: no nsinitd answers at {socket_path(args)} to say where its event log is; "
            "use -f for the live stream, or --file PATH (or -c CONFIG with [supervisor] event_log)",
        ) from None
    if not isinstance(path, str):
        raise CtlError(
            USAGE,
            f"events: nsinitd at {socket_path(args)} keeps no event log ([supervisor] event_log): "
            "use -f for the live stream",
        )
    return path


def cmd_events(args: argparse.Namespace, o: Output) -> int:
    keep = EventFilter(
        programs=frozenset(args.program or ()),
        patterns=tuple(args.event or ()),
        since=parse_since(args.since) if args.since else None,
    )
    printer = EventPrinter(o, keep, args.pretty)
    path = args.file
    if path is None and not args.follow:
        path = _event_log(args)
    if path is None:
        with connect(args) as client:
            for event in client.stream("events"):
                printer.event(event)
        o.error(f"the event stream ended: {client.ended or 'nsinitd closed it'}")
        return OK
    try:
        f = open(path, "rb")  # noqa: SIM115 - handed to the Follower
    except OSError as e:
        raise CtlError(USAGE, f"cannot read {path}: {e.strerror}") from None
    try:
        pending = b""
        for raw in f:
            if raw.endswith(b"\n"):
                printer.line(raw)
            else:
                pending = raw  # a line still being written
        if not args.follow:
            printer.line(pending)
            return OK
        follower = Follower(Path(path), f)
        try:
            while True:
                data = follower.read()
                if not data:
                    follower.wait()
                    continue
                *lines, pending = (pending + data).split(b"\n")
                for raw in lines:
                    printer.line(raw)
        finally:
            follower.close()
    finally:
        f.close()
        if printer.malformed:
            o.error(f"skipped {printer.malformed} malformed line(s) in {path}")


# -- top -------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    when: float
    data: dict[str, Any]


def top_rows(previous: Sample | None, current: Sample) -> list[dict[str, Any]]:
    rows = []
    for name, entry in sorted(current.data.items()):
        stats = entry.get("stats") or {}
        status = entry.get("status") or {}
        cpu: float | None = None
        usage = stats.get("cpu_usage_ns")
        if previous is not None and isinstance(usage, int):
            before = (previous.data.get(name) or {}).get("stats") or {}
            elapsed = current.when - previous.when
            if isinstance(before.get("cpu_usage_ns"), int) and elapsed > 0:
                cpu = max(0.0, (usage - before["cpu_usage_ns"]) / (elapsed * 1e9) * 100)
        rows.append(
            {
                "name": name,
                "state": status.get("state", "?"),
                "cpu_percent": None if cpu is None else round(cpu, 2),
                "memory_bytes": stats.get("memory_bytes"),
                "pids": stats.get("pids"),
                "restarts": status.get("restarts"),
            }
        )
    return rows


def top_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    width = max([len(r["name"]) for r in rows] + [16]) + 2
    lines = [f"{'NAME':<{width}}{'STATE':<10}{'CPU %':>8}{'MEM':>12}{'PIDS':>7}{'RESTARTS':>10}"]
    for r in rows:
        cpu = "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.2f}%"
        pids = "-" if r["pids"] is None else str(r["pids"])
        restarts = "-" if r["restarts"] is None else str(r["restarts"])
        lines.append(
            f"{r['name']:<{width}}{r['state']:<10}{cpu:>8}{format_bytes(r['memory_bytes']):>12}{pids:>7}{restarts:>10}"
        )
    return lines


def cmd_top(args: argparse.Namespace, o: Output) -> int:
    interactive = o.out.isatty() and not o.json
    previous: Sample | None = None
    frames = 0
    with connect(args) as client:

        def sample() -> Sample:
            try:
                return Sample(time.monotonic(), client.call("stats"))
            except RemoteError as e:
                raise CtlError(FAILED, f"top: {e.message}") from None

        previous = sample()
        time.sleep(min(args.delay, 0.5))
        try:
            while args.iterations is None or frames < args.iterations:
                current = sample()
                rows = top_rows(previous, current)
                previous = current
                frames += 1
                if o.json:
                    o.line(json.dumps({"ts": time.time(), "programs": rows}))
                elif interactive:
                    # Home, rewrite each line clearing its tail, clear below: no flicker, no scroll.
                    body = "".join(f"{line}\x1b[K\n" for line in top_table(rows))
                    o.out.write("\x1b[?25l\x1b[H" + body + "\x1b[J")
                    o.out.flush()
                else:
                    if frames > 1:
                        o.line()
                    for line in top_table(rows):
                        o.line(line)
                if args.iterations is None or frames < args.iterations:
                    time.sleep(args.delay)
        finally:
            if interactive:
                o.out.write("\x1b[?25h")
                o.out.flush()
    return OK


# -- reload, shutdown, version ------------------------------------------------------------------------------


def cmd_reload(args: argparse.Namespace, o: Output) -> int:
    with connect(args) as client:
        try:
            changes = client.call("reload")
        except RemoteError as e:
            raise CtlError(_status_for(e.code), f"reload: {e.message}") from None
    if o.json:
        o.dump(changes)
        return OK
    said = False
    for key in ("added", "changed", "removed"):
        for name in changes.get(key, ()):
            o.line(f"{name}: {key}")
            said = True
    if not said:
        o.line("no changes")
    return OK


def cmd_reread(args: argparse.Namespace, o: Output) -> int:
    with connect(args) as client:
        try:
            changes = client.call("reread")
        except RemoteError as e:
            raise CtlError(_status_for(e.code), f"reread: {e.message}") from None
    if o.json:
        o.dump(changes)
        return OK
    lines = [
        f"{name}: {word}"
        for key, word in (("added", "available"), ("changed", "changed"), ("removed", "disappeared"))
        for name in changes.get(key, ())
    ]
    for line in lines or ["no config updates to programs"]:
        o.line(line)
    return OK


def cmd_shutdown(args: argparse.Namespace, o: Output) -> int:
    path = socket_path(args)
    timeout = answer_timeout(args)
    with Client(path, timeout) as client:
        try:
            result = client.call("shutdown")
        except RemoteError as e:
            raise CtlError(_status_for(e.code), f"shutdown: {e.message}") from None
    pid = result.get("pid") if isinstance(result, dict) else None
    if args.wait:
        deadline = time.monotonic() + timeout
        while os.path.exists(path) and _listening(path):
            if time.monotonic() > deadline:
                raise CtlError(FAILED, f"nsinitd (pid {pid}) still running after {timeout:g} s")
            time.sleep(0.1)
    if o.json:
        o.dump({"pid": pid, "stopped": bool(args.wait)})
    else:
        o.line(f"nsinitd (pid {pid}) {'shut down' if args.wait else 'is shutting down'}")
    return OK


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def cmd_version(args: argparse.Namespace, o: Output) -> int:
    try:
        with connect(args) as client:
            daemon = client.call("version")
    except CtlError as e:
        if o.json:
            o.dump({"nsinitctl": __version__, "nsinitd": None})
        else:
            o.line(f"nsinitctl {__version__}")
        raise e from None
    if o.json:
        o.dump({"nsinitctl": __version__, "nsinitd": daemon})
    else:
        o.line(f"nsinitctl {__version__}")
        o.line(f"nsinitd {daemon.get('version')} (pid {daemon.get('pid')}, protocol {daemon.get('protocol')})")
    return OK


# -- command line --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's shape (usage, then "PROG: error: ..."), always under one name, and exit 2
        # through run() like every other usage error
        self.print_usage(sys.stderr)
        raise CtlError(USAGE, f"error: {message}")


def _at_least(minimum: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return whole_number


class _ExecCommand(argparse.Action):
    """exec's command: everything after ``--``. Anything else after NAME that looks like an option
    is a mistake (``exec web -t -- sh`` would run ``-t``), refused rather than run."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        command = list(values)
        if command[:1] == ["--"]:
            command = command[1:]
        elif command and command[0].startswith("-"):
            parser.error(f"exec: options go before NAME, the command after --: {command[0]!r}")
        if not command:
            parser.error("exec: no command given (nsinitctl exec NAME -- CMD...)")
        setattr(namespace, self.dest, command)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    # The global options work before or after the command: the subparsers share them with
    # SUPPRESS defaults, so a subparser never overwrites what was given before the command.
    def common() -> _Parser:
        # A fresh parser each time: parents share their action objects, and set_defaults on the
        # main parser would otherwise turn the subparsers' SUPPRESS defaults into None too.
        p = _Parser(add_help=False)
        p.add_argument("-s", "--socket", default=argparse.SUPPRESS, help=f"control socket (default {DEFAULT_SOCKET})")
        p.add_argument("-c", "--config", default=argparse.SUPPRESS, help="nsinitd config: its [supervisor] socket")
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        p.add_argument(
            "--timeout",
            type=_positive,
            default=argparse.SUPPRESS,
            metavar="S",
            help=f"seconds to wait for an answer from nsinitd (default {ACTION_TIMEOUT:g} for start, stop, restart, "
            f"reload, shutdown; {QUICK_TIMEOUT:g} for the rest; a following -f waits without limit after the "
            "first answer)",
        )
        return p

    parser = _Parser(
        prog="nsinitctl",
        description="Control nsinitd.",
        parents=[common()],
        epilog="Exit statuses: 0 ok, 1 failed (also: start of a running program, stop of a stopped one), "
        "2 usage/unknown program, 3 not running, 4 nsinitd unreachable or no answer in time, 5 refused; "
        "exec: the command's own.",
    )
    parser.set_defaults(socket=None, config=None, json=False, timeout=None)
    parser.add_argument("--version", action="version", version=f"nsinitctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, handler: Callable[[argparse.Namespace, Output], int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common()], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    p = add("status", cmd_status, "one line per program (exit 3 if a named program is not RUNNING)")
    p.add_argument("names", nargs="*", metavar="NAME")
    for name, text in (
        ("start", "start programs and wait until RUNNING"),
        ("stop", "stop programs and wait until STOPPED"),
        ("restart", "stop, then start programs"),
    ):
        p = add(name, cmd_action, text)
        p.add_argument("names", nargs="+", metavar="NAME", help="program names, or all")
    p = add("signal", cmd_signal, "send a signal (name or number) to programs")
    p.add_argument("signal", metavar="SIG")
    p.add_argument("names", nargs="+", metavar="NAME", help="program names, or all")
    p = add("exec", cmd_exec, "run a command inside a program's live container")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("name", metavar="NAME")
    p.add_argument("cmd", nargs=argparse.REMAINDER, action=_ExecCommand, metavar="-- CMD...")
    p = add("pid", cmd_pid, "the pid of nsinitd, or of a program")
    p.add_argument("name", nargs="?", metavar="NAME")
    p = add("logs", cmd_logs, "a program's captured output")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    p.add_argument("-n", "--lines", type=_at_least(0), default=10, metavar="N", help="last N lines (default 10)")
    p.add_argument("--stderr", action="store_true", help="the stderr capture instead of stdout")
    p.add_argument("name", metavar="NAME")
    p = add("events", cmd_events, "lifecycle events: live from nsinitd, or from an event log file")
    p.add_argument("-f", "--follow", action="store_true", help="follow: live from nsinitd, or tail the --file")
    p.add_argument("--program", action="append", metavar="NAME", help="only this program (repeatable)")
    p.add_argument("--event", action="append", metavar="PATTERN", help="only events matching (fnmatch, repeatable)")
    p.add_argument("--since", metavar="TIME", help="RFC 3339 time, or relative: 30s, 10m, 2h, 1d")
    p.add_argument("--file", metavar="PATH", help="read this JSON-lines event log (no nsinitd needed)")
    p.add_argument("--pretty", action="store_true", help="a human-readable table instead of JSON lines")
    p = add("top", cmd_top, "live cpu, memory, pids and restarts of every program")
    p.add_argument("-d", "--delay", type=_positive, default=2.0, metavar="S", help="seconds between refreshes")
    p.add_argument("-n", "--iterations", type=_at_least(1), default=None, metavar="N", help="stop after N refreshes")
    add("reload", cmd_reload, "reread the config and apply additions, removals and changes")
    add("reread", cmd_reread, "what a reload would change (available, changed, disappeared), changing nothing")
    p = add("shutdown", cmd_shutdown, "stop every program and nsinitd")
    p.add_argument("--wait", action="store_true", help="wait until nsinitd has exited")
    add("version", cmd_version, "versions of nsinitctl and nsinitd")
    return parser


_FOLLOWING = {"top"}


def run(argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run one nsinitctl command; returns its exit status."""
    o = Output(out or sys.stdout, err or sys.stderr, json=False)
    try:
        args = build_parser().parse_args(argv)
        o.json = args.json
        try:
            return int(args.handler(args, o))
        except KeyboardInterrupt:
            following = args.command in _FOLLOWING or getattr(args, "follow", False)
            return OK if following else INTERRUPTED
    except CtlError as e:
        o.error(e.message)
        return e.status
    except RemoteError as e:
        o.error(e.message)
        return _status_for(e.code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    try:
        status = run(argv)
    except BrokenPipeError:
        # `nsinitctl events | head`: the reader left; that's not an error of ours.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        status = OK
    except KeyboardInterrupt:
        status = INTERRUPTED
    sys.exit(status)


if __name__ == "__main__":
    main()
