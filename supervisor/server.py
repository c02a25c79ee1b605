"""The control socket of nsinitd: a trio unix-socket server feeding :mod:`supervisor.protocol`.

The daemon runs ``await serve(api, socket_path, task_status=...)`` in its root nursery; ``serve``
calls ``task_status.started()`` once the socket accepts connections and runs until cancelled, then
removes the socket file it made.

Each command of :data:`supervisor.protocol.COMMANDS` has one handler, in one of two tables:
:data:`CALLS` (one reply) and :data:`STREAMS` (a channel of items). A protocol command without a
handler, or a handler for no command, makes importing this module fail (:func:`table_errors`).

What this module promises, and how:

* **Access.** The socket is created mode 0600 (0660 with the config's group) under a restrictive
  umask, so it never exists with looser permissions, not even between bind and chmod. The file mode
  is only the first gate: every connection's SO_PEERCRED (and SO_PEERGROUPS) is checked, so a
  socket that ends up too open (a bind mount, a chmod by hand) still lets in only root, the daemon's
  own user and the configured group. A refusal is answered with a ``refused`` error and reported as
  a ``control.refused`` event (rate-limited, so a flood of refused peers can't flood the event log).
* **One daemon per socket.** An existing socket file is probed before it is replaced: if nothing
  listens (ECONNREFUSED) it is the leftover of a crashed daemon and is removed; if something
  listens and the process that called listen() on it is alive, :class:`SocketInUseError` is
  raised and the daemon must not start. A listener whose process is dead (its socket kept open by
  an orphaned child) counts as stale. The probe and the bind run under a lock file so two daemons
  starting together can't both take the path; at shutdown the socket and the lock file are
  removed under the same lock (see :func:`_lock`).
* **Nobody blocks anybody.** Each connection is its own task and every wait on a peer is bounded:
  a half-written request line is dropped after ``request_timeout``, a reply the peer doesn't read
  after ``send_timeout``, an idle connection after ``idle_timeout``. Connections beyond
  ``max_connections`` get a ``busy`` error at once and are closed. Lines are bounded by the
  protocol (``too_large`` and close). An event subscriber has a bounded buffer in the daemon
  (``event_buffer``); falling that far behind, or not draining the socket within ``send_timeout``,
  drops it with a final ``end`` notice when the socket can still take one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import signal
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from supervisor import __version__
from supervisor import protocol as proto
from supervisor.api import ControlError, ProgramStatus, SupervisorAPI
from supervisor.states import STOPPED_STATES

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python doesn't name it
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_RECEIVE_CHUNK = 64 * 1024


_STREAM_BATCH = 256  # events per write to an event reader, at most

# What supervisorctl refuses: starting a program that runs, stopping one that doesn't. The daemon's
# start and stop return the status whatever it was; the refusal is the control socket's to make.
_NOT_RUNNING = frozenset(s.value for s in STOPPED_STATES)


class SocketInUseError(OSError):
    """The control socket path belongs to a live daemon (or isn't a socket): refuse to start.

    An OSError, so a daemon that reports socket errors and exits reports this one the same way."""


@dataclass(frozen=True)
class Limits:
    """Per-connection bounds; the defaults suit a daemon, tests shrink them."""

    max_connections: int = 1024
    request_timeout: float = 5.0  # from the first byte of a request line to its newline
    idle_timeout: float = 300.0  # no request in progress and nothing received
    send_timeout: float = 10.0  # one reply or event written to a peer that doesn't read
    event_buffer: int = 1000  # events a subscriber may fall behind before it is dropped
    refusal_events_per_second: float = 10.0
    backlog: int = 1024


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def describe(self) -> str:
        return f"pid {self.pid}, uid {self.uid}, gid {self.gid}"


class _Drop(Exception):
    """The connection must be closed now (peer stuck or gone)."""


async def serve(
    api: SupervisorAPI,
    socket_path: str | os.PathLike[str],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    *,
    limits: Limits = Limits(),  # frozen, so sharing the default is safe
) -> None:
    """Serve the control protocol on ``socket_path`` until cancelled.

    Raises :class:`SocketInUseError` (before ``task_status.started()``) when another live daemon
    owns the path, or when the path exists and isn't a socket.
    """
    path = Path(socket_path)
    listener, identity = await _bind(path, api.socket_group, limits.backlog)
    server = _Server(api, limits)
    try:
        with listener:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await server.accept_loop(listener, nursery)
    finally:
        _remove_files(path, identity)


# -- the commands ----------------------------------------------------------------------------------
#
# One handler per command of supervisor.protocol.COMMANDS, in two tables: a call is answered by one
# reply, a stream by an ok reply and then the items of a channel. The protocol has already checked
# each argument's presence and type (protocol.check_request), so a handler reads ``args`` as given.

Json = Any  # what a protocol.Reply carries: anything json.dumps takes
Args = Mapping[str, Any]
Call = Callable[[SupervisorAPI, Args], Awaitable[Json]]
Stream = Callable[[SupervisorAPI, Limits], trio.MemoryReceiveChannel[dict[str, Any]]]


async def _status(api: SupervisorAPI, args: Args) -> Json:
    return [s.to_json() for s in api.status(tuple(args.get("names", ())))]


async def _start(api: SupervisorAPI, args: Args) -> Json:
    # no checkpoint between the look and the start: nothing can change the state in between
    if api.status((args["name"],))[0].state == "RUNNING":
        raise ControlError("bad_state", "already started")
    return (await api.start(args["name"])).to_json()


async def _stop(api: SupervisorAPI, args: Args) -> Json:
    if api.status((args["name"],))[0].state in _NOT_RUNNING:
        raise ControlError("bad_state", "not running")
    return (await api.stop(args["name"])).to_json()


async def _restart(api: SupervisorAPI, args: Args) -> Json:
    return (await api.restart(args["name"])).to_json()


def _refusal(api: SupervisorAPI, name: str, refused: frozenset[str], message: str) -> ControlError | None:
    """Why start/stop refuses ``name`` (what the one-program handlers above raise), or None."""
    try:
        state = api.status((name,))[0].state
    except ControlError as e:
        return e
    return ControlError("bad_state", message) if state in refused else None


async def _many(names: list[str], refusal: Callable[[str], ControlError | None],
                act: Callable[[list[str]], Awaitable[list[ProgramStatus | ControlError]]]) -> Json:
    """One answer per name, in their order (each once): the program's status, or
    ``{"name", "error": {"code", "message"}}`` as nsinitctl --json prints a refused one. The
    refusals are made before anything changes, then the rest is acted on at once."""
    names = list(dict.fromkeys(names))
    answers: dict[str, ProgramStatus | ControlError] = {}
    for name in names:
        if (refused := refusal(name)) is not None:
            answers[name] = refused
    acting = [n for n in names if n not in answers]
    answers.update(zip(acting, await act(acting), strict=True))
    return [{"name": name, "error": {"code": a.code, "message": a.message}} if isinstance(a, ControlError)
            else a.to_json() for name, a in ((n, answers[n]) for n in names)]


async def _start_many(api: SupervisorAPI, args: Args) -> Json:
    return await _many(args["names"], lambda n: _refusal(api, n, frozenset({"RUNNING"}), "already started"),
                       api.start_many)


async def _stop_many(api: SupervisorAPI, args: Args) -> Json:
    return await _many(args["names"], lambda n: _refusal(api, n, _NOT_RUNNING, "not running"), api.stop_many)


async def _restart_many(api: SupervisorAPI, args: Args) -> Json:
    return await _many(args["names"], lambda n: _refusal(api, n, frozenset(), ""), api.restart_many)


async def _signal(api: SupervisorAPI, args: Args) -> Json:
    signum = args["signum"]
    if signum not in signal.valid_signals() or signum == 0:
        raise ControlError("bad_request", f"signal: no such signal {signum}")
    api.signal(args["name"], signum)
    return None


async def _exec_target(api: SupervisorAPI, args: Args) -> Json:
    return os.fspath(api.exec_target(args["name"]))


async def _log_path(api: SupervisorAPI, args: Args) -> Json:
    return os.fspath(api.log_path(args["name"], args["stream"]))


async def _stats(api: SupervisorAPI, args: Args) -> Json:
    result: dict[str, Json] = {}
    for status in api.status(tuple(args.get("names", ()))):
        try:
            usage = dict(api.stats(status.name))
        except NotImplementedError:
            raise ControlError(proto.UNSUPPORTED, "this nsinitd doesn't report resource usage") from None
        result[status.name] = {"status": status.to_json(), "stats": usage}
    return result


async def _pid(api: SupervisorAPI, args: Args) -> Json:
    if "name" not in args:
        return api.pid
    status = api.status((args["name"],))[0]
    if status.pid is None:
        raise ControlError("bad_state", f"{status.name} is not running ({status.state})")
    return status.pid


async def _reload(api: SupervisorAPI, args: Args) -> Json:
    return await api.reload()


async def _reread(api: SupervisorAPI, args: Args) -> Json:
    return api.reread()


async def _event_log(api: SupervisorAPI, args: Args) -> Json:
    return None if api.event_log is None else os.fspath(api.event_log)


async def _shutdown(api: SupervisorAPI, args: Args) -> Json:
    keep = bool(args.get("keep_running", False))
    api.request_shutdown("shutdown --keep-running" if keep else "requested", keep_running=keep)
    return {"pid": api.pid, "keep_running": keep}


async def _version(api: SupervisorAPI, args: Args) -> Json:
    return {"version": __version__, "protocol": proto.PROTOCOL_VERSION, "pid": api.pid}


def _events(api: SupervisorAPI, limits: Limits) -> trio.MemoryReceiveChannel[dict[str, Any]]:
    return api.subscribe(limits.event_buffer)


CALLS: Final[Mapping[str, Call]] = {
    "status": _status,
    "start": _start,
    "stop": _stop,
    "restart": _restart,
    "start_many": _start_many,
    "stop_many": _stop_many,
    "restart_many": _restart_many,
    "signal": _signal,
    "exec_target": _exec_target,
    "log_path": _log_path,
    "stats": _stats,
    "pid": _pid,
    "reload": _reload,
    "reread": _reread,
    "event_log": _event_log,
    "shutdown": _shutdown,
    "version": _version,
}
STREAMS: Final[Mapping[str, Stream]] = {"events": _events}


def table_errors(calls: Mapping[str, Call], streams: Mapping[str, Stream]) -> list[str]:
    """What is wrong with a pair of command tables against the protocol's command list (nothing,
    for the tables above: checked when this module is imported)."""
    errors = []
    for command in proto.COMMANDS:
        if command not in calls and command not in streams:
            errors.append(f"the protocol's command {command!r} has no handler")
    for command in sorted(calls.keys() | streams.keys()):
        if command not in proto.COMMANDS:
            errors.append(f"a handler for {command!r}, which is no command of the protocol")
        elif (command in streams) != (command in proto.STREAMING_COMMANDS):
            kind = "streams" if command in proto.STREAMING_COMMANDS else "is answered once"
            errors.append(f"{command!r} {kind} in the protocol, but its handler is in the other table")
    return errors


if _table_errors := table_errors(CALLS, STREAMS):
    raise ImportError(f"supervisor.server: {'; '.join(_table_errors)}")


# -- the socket file -------------------------------------------------------------------------------


async def _bind(path: Path, group: int | None, backlog: int) -> tuple[trio.socket.SocketType, tuple[int, int]]:
    if len(os.fsencode(path)) > 107:
        raise SocketInUseError(f"control socket path too long for AF_UNIX (max 107 bytes): {path}")
    if not path.parent.exists():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with _lock(path):
        await _remove_if_stale(path)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask rather than a chmod after bind: the file must never exist with looser bits.
            # The umask is process-wide, so the bind is a plain synchronous call: no other trio
            # task may run (and create files) while it is set.
            old_umask = os.umask(0o177)
            try:
                raw.bind(os.fspath(path))
            finally:
                os.umask(old_umask)
            if group is not None:
                os.chown(path, -1, group)
                os.chmod(path, 0o660)
            raw.listen(backlog)
            st = os.stat(path)
        except OSError as e:
            raw.close()
            if e.errno == errno.EADDRINUSE:
                raise SocketInUseError(f"control socket {path} appeared while starting; not taking it over") from e
            raise
        sock = trio.socket.from_stdlib_socket(raw)
        return sock, (st.st_dev, st.st_ino)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise the stale-check-and-bind of daemons starting at the same time, and the removal of
    the socket and this lock file by a daemon stopping. Held only while binding or removing: a
    lock held for the daemon's life would be inherited by every child it forks and outlive a
    SIGKILLed daemon.

    Removing a lock file races with opening it: a daemon that opened the file just before another
    removed it would lock a file nobody else can find, while the next daemon creates a new one and
    locks that. So a lock counts only when the locked file is still the one at the path; if not,
    lock the new one."""
    lock_path = path.with_name(path.name + ".lock")
    for _ in range(16):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SocketInUseError(f"another nsinitd is starting or stopping on {path} right now") from None
        if _is_at(fd, lock_path):
            break
        os.close(fd)
    else:
        raise SocketInUseError(f"{lock_path} keeps being replaced; is another nsinitd starting and stopping?")
    try:
        yield
    finally:
        os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _remove_files(path: Path, identity: tuple[int, int]) -> None:
    """At shutdown: the socket we made (if still ours) and the lock file, under the lock. If a
    daemon starting right now holds the lock, both are left to it: it finds our socket dead
    (nothing listens any more) and replaces it, and it uses the lock file."""
    try:
        with _lock(path):
            _unlink_if_ours(path, identity)
            path.with_name(path.name + ".lock").unlink()
    except SocketInUseError:
        pass
    except OSError:
        _unlink_if_ours(path, identity)  # no lock to be had at all (the directory went read-only?)


async def _remove_if_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path} exists and is not a socket; not replacing it")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(2):
                await probe.connect(os.fspath(path))
        except trio.TooSlowError:
            # A full backlog: someone is listening and busy, which is alive enough.
            raise SocketInUseError(f"{path} is in use by a live nsinitd (it accepts no connection now)") from None
        except ConnectionRefusedError:
            pass  # nobody listens: a crashed daemon's leftover
        except FileNotFoundError:
            return
        else:
            listener_pid = _peer(probe).pid
            if _alive(listener_pid):
                raise SocketInUseError(
                    f"{path} is in use by a live nsinitd (pid {listener_pid}); refusing to take it over"
                )
            # The listener's process is gone, but an orphaned child still holds the socket open.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # no credentials to judge by: assume alive rather than steal
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_if_ours(path: Path, identity: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass


# -- peers -----------------------------------------------------------------------------------------


def _peer(sock: trio.socket.SocketType | socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid, uid, gid)


def _peer_groups(sock: trio.socket.SocketType) -> set[int]:
    size = 64 * 4
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                size *= 4
                continue
            return set()
        return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return set()


def peer_allowed(peer: Peer, groups: set[int], socket_group: int | None) -> bool:
    """Root, the daemon's own user, and members of the configured group."""
    if peer.uid in (0, os.geteuid()):
        return True
    return socket_group is not None and (peer.gid == socket_group or socket_group in groups)


def _connection_cap(configured: int) -> int:
    """At most a quarter of the descriptors the process may open: clients must never use up the
    ones nsinitd needs to spawn and watch its programs (pidfds, log pipes)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return min(configured, max(8, soft // 4))


# -- connections -----------------------------------------------------------------------------------


class _Server:
    def __init__(self, api: SupervisorAPI, limits: Limits) -> None:
        self.api = api
        self.limits = limits
        self.active = 0
        self.max_connections = _connection_cap(limits.max_connections)
        self._refusal_tokens = limits.refusal_events_per_second
        self._refusal_stamp = time.monotonic()
        self._refusals_suppressed = 0

    async def accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    # Out of descriptors: back off instead of spinning; connections wait in the backlog.
                    await trio.sleep(0.05)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                # Anything else is unexpected; raising would take the whole daemon (and every
                # program it supervises) down for the sake of its control socket. Report, retry.
                self._emit("control.error", error=f"accept: {e}")
                await trio.sleep(1)
                continue
            if self.active >= self.max_connections:
                _reply_and_close(sock, proto.Error(None, proto.BUSY, "too many connections; try again"))
                continue
            self.active += 1
            nursery.start_soon(self._connection, sock)

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        try:
            stream = trio.SocketStream(sock)
            async with stream:
                try:
                    await self._converse(stream, sock)
                except* (_Drop, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the peer is stuck or gone: closing is all there is to do
                except* Exception as group:
                    # A bug serving one connection must not take the control socket down with it.
                    self._emit("control.error", error=repr(group.exceptions[0]))
        finally:
            self.active -= 1

    async def _converse(self, stream: trio.SocketStream, sock: trio.socket.SocketType) -> None:
        peer = _peer(sock)
        if not peer_allowed(peer, _peer_groups(sock), self.api.socket_group):
            self._report_refusal(peer)
            allowed = "root" if self.api.socket_group is None else f"root and group {self.api.socket_group}"
            conn = proto.Connection(proto.Role.SERVER)
            message = f"permission denied: uid {peer.uid} may not use the control socket (only {allowed})"
            await self._send(stream, conn, proto.Error(None, proto.REFUSED, message))
            await _linger(stream)
            return
        conn = proto.Connection(proto.Role.SERVER)
        partial_since: float | None = None
        while True:
            try:
                event = conn.next_event()
            except proto.ProtocolError as e:
                await self._send(stream, conn, proto.Error(e.request_id, e.code, e.message))
                if e.fatal:
                    await _linger(stream)
                    return
                continue
            if event is proto.CLOSED:
                return
            if event is proto.NEED_DATA:
                now = trio.current_time()
                if conn.pending:
                    partial_since = now if partial_since is None else partial_since
                    deadline = partial_since + self.limits.request_timeout
                else:
                    partial_since = None
                    deadline = now + self.limits.idle_timeout
                data: bytes | None = None
                with trio.move_on_at(deadline):
                    data = await stream.receive_some(_RECEIVE_CHUNK)
                if data is None:
                    if conn.pending:
                        await self._send(
                            stream,
                            conn,
                            proto.Error(
                                None,
                                proto.TIMEOUT,
                                f"request incomplete after {self.limits.request_timeout:g}s; closing",
                            ),
                        )
                        await _linger(stream)
                    return
                conn.receive_data(data)
                continue
            assert isinstance(event, proto.Request)
            partial_since = None
            opener = STREAMS.get(event.command)
            if opener is not None:
                await self._stream(stream, sock, conn, event, peer, opener(self.api, self.limits))
                return
            await self._send(stream, conn, await self._dispatch(event))

    @staticmethod
    def _encode(conn: proto.Connection, message: proto.Message) -> bytes:
        try:
            return conn.send(message)
        except (TypeError, ValueError) as e:
            return conn.send(proto.Error(message.id, proto.INTERNAL, f"unencodable reply: {e}"))

    async def _send(self, stream: trio.SocketStream, conn: proto.Connection, message: proto.Message) -> None:
        data = self._encode(conn, message)
        with trio.move_on_after(self.limits.send_timeout):
            await stream.send_all(data)
            return
        raise _Drop

    def _report_refusal(self, peer: Peer) -> None:
        now = time.monotonic()
        rate = self.limits.refusal_events_per_second
        self._refusal_tokens = min(rate, self._refusal_tokens + (now - self._refusal_stamp) * rate)
        self._refusal_stamp = now
        if self._refusal_tokens < 1:
            self._refusals_suppressed += 1
            return
        self._refusal_tokens -= 1
        suppressed, self._refusals_suppressed = self._refusals_suppressed, 0
        self._emit(
            "control.refused",
            pid=peer.pid,
            uid=peer.uid,
            gid=peer.gid,
            reason="not root or the socket's group",
            suppressed=suppressed,
        )

    def _emit(self, event: str, **fields: Any) -> None:
        # Reporting must never take the server down with it.
        with contextlib.suppress(Exception):
            self.api.emit(event, **fields)

    async def _dispatch(self, request: proto.Request) -> proto.Message:
        try:
            result = await CALLS[request.command](self.api, request.args)
        except ControlError as e:
            return proto.Error(request.id, e.code, e.message)
        except proto.ProtocolError as e:
            return proto.Error(request.id, e.code, e.message)
        except Exception as e:
            self._emit("control.error", command=request.command, error=f"{type(e).__name__}: {e}")
            return proto.Error(
                request.id,
                proto.INTERNAL,
                f"{request.command} failed inside nsinitd: {type(e).__name__}: {e}",
            )
        return proto.Reply(request.id, result)

    async def _stream(
        self,
        stream: trio.SocketStream,
        sock: trio.socket.SocketType,
        conn: proto.Connection,
        request: proto.Request,
        peer: Peer,
        channel: trio.MemoryReceiveChannel[dict[str, Any]],
    ) -> None:
        finished = False
        try:
            await self._send(stream, conn, proto.Reply(request.id, {"stream": True}))
            async with trio.open_nursery() as nursery:
                # A streaming connection takes no more requests: anything the client sends, or its
                # EOF, ends the stream. Watching for it also notices a client that went away.
                nursery.start_soon(_cancel_on_input, stream, nursery.cancel_scope)
                # Errors are handled inside the nursery body: raised out of it they would arrive
                # wrapped in an ExceptionGroup.
                try:
                    ended = await self._forward(stream, conn, request.id, channel)
                    await self._send(stream, conn, ended)
                except _Drop:
                    self._emit(
                        "control.dropped",
                        pid=peer.pid,
                        uid=peer.uid,
                        reason=f"event reader did not read for {self.limits.send_timeout:g}s",
                    )
                    _send_nowait(
                        sock,
                        conn.send(proto.StreamEnd(request.id, "dropped", "event reader too slow; dropped")),
                    )
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                nursery.cancel_scope.cancel()
            finished = True
        finally:
            if not finished:
                # Cancelled from outside: nsinitd is going away. Say so, without waiting.
                _send_nowait(sock, conn.send(proto.StreamEnd(request.id, "closed", "nsinitd is stopping")))
            channel.close()

    async def _forward(
        self,
        stream: trio.SocketStream,
        conn: proto.Connection,
        request_id: int,
        channel: trio.MemoryReceiveChannel[dict[str, Any]],
    ) -> proto.StreamEnd:
        async for event in channel:
            # what else is already waiting goes out in the same send: a burst costs one write
            # and one wake-up per batch, not per event
            batch = [dict(event)]
            while len(batch) < _STREAM_BATCH and batch[-1].get("event") != "subscriber.dropped":
                try:
                    batch.append(dict(channel.receive_nowait()))
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            data = b"".join(self._encode(conn, proto.StreamItem(request_id, item)) for item in batch)
            with trio.move_on_after(self.limits.send_timeout):
                await stream.send_all(data)
                data = b""
            if data:
                raise _Drop
            last = batch[-1]
            if last.get("event") == "subscriber.dropped":
                return proto.StreamEnd(request_id, "dropped", str(last.get("reason", "fell behind; dropped")))
        return proto.StreamEnd(request_id, "closed", "the event stream ended")


async def _linger(stream: trio.SocketStream, seconds: float = 0.5, limit: int = 4 << 20) -> None:
    """Before closing on a peer that may still be sending: closing with unread input makes the
    kernel reset the connection, and the peer could lose the error we just wrote. So shut our
    side, then discard its input for a bounded time and amount."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_eof()
        with trio.move_on_after(seconds):
            while limit > 0 and (chunk := await stream.receive_some(_RECEIVE_CHUNK)):
                limit -= len(chunk)


async def _cancel_on_input(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.receive_some(_RECEIVE_CHUNK)
    scope.cancel()


def _send_nowait(sock: trio.socket.SocketType, data: bytes) -> None:
    """Best effort, never blocking: for a last word to a peer we are about to drop."""
    with contextlib.suppress(OSError):
        _raw_send(sock, data)


def _raw_send(sock: trio.socket.SocketType, data: bytes) -> None:
    # trio sockets only offer async send; the fd is non-blocking, so a plain send can't block.
    with socket.socket(fileno=os.dup(sock.fileno())) as raw:
        raw.setblocking(False)
        raw.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)


def _reply_and_close(sock: trio.socket.SocketType, error: proto.Error) -> None:
    _send_nowait(
        sock,
        proto.encode({"id": error.id, "ok": False, "error": {"code": error.code, "message": error.message}}),
    )
    sock.close()
