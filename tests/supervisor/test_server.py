"""The control server through a real unix socket, against a fake supervisor (supervisor.api's protocol).

Covers the access rules (socket mode, SO_PEERCRED refusal of a non-root user), the socket's life
(stale file replaced, live one never taken over) and robustness (malformed, oversized, half-written
requests, a flood of connections, an event reader that never reads).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor import protocol as proto
from supervisor import server
from supervisor.api import ControlError, ProgramStatus

NOBODY = 65534


class FakeAPI:
    """A SupervisorAPI with programs in a dict: enough state to answer like a daemon."""

    def __init__(self, tmp: Path, names: Sequence[str] = ("db", "web", "worker")) -> None:
        self.tmp = tmp
        now = time.time()
        self.programs: dict[str, ProgramStatus] = {}
        for i, name in enumerate(names):
            self.programs[name] = ProgramStatus(
                name=name, state="RUNNING", pid=1000 + i, since=now - 3725, exit_code=None, signal=None,
                restarts=0, container=f"containers/{name}" if name != "worker" else None,
                description=f"pid {1000 + i}, uptime 1:02:05",
            )
        self.signals: list[tuple[str, int]] = []
        self.emitted: list[dict[str, Any]] = []
        self.subscribers: list[tuple[trio.MemorySendChannel[dict[str, Any]], int]] = []
        self.shutdown_requested = False
        self.keep_running: bool | None = None
        self.fail_start: set[str] = set()
        self.action_delay = 0.0
        self.socket_group: int | None = None
        self.stats_calls = 0
        self.event_log: Path | None = tmp / "events.jsonl"
        self.subscribed = trio.Event()  # set at the first subscribe()

    @property
    def pid(self) -> int:
        return os.getpid()

    def _get(self, name: str) -> ProgramStatus:
        try:
            return self.programs[name]
        except KeyError:
            raise ControlError("no_such_program", f"no such program: {name}") from None

    def status(self, names: Sequence[str] = ()) -> list[ProgramStatus]:
        if names:
            return [self._get(n) for n in names]
        return [self.programs[n] for n in sorted(self.programs)]

    def _set(self, name: str, **changes: Any) -> ProgramStatus:
        status = replace(self._get(name), since=time.time(), **changes)
        self.programs[name] = status
        self.emit(f"program.{status.state.lower()}", program=name, pid=status.pid)
        return status

    # start and stop answer like the daemon's: with the program's status, whatever state it was in
    # (the control server decides what "already started" and "not running" are)
    async def start(self, name: str) -> ProgramStatus:
        if self._get(name).state == "RUNNING":
            return self._get(name)
        await trio.sleep(self.action_delay)
        if name in self.fail_start:
            return self._set(name, state="FATAL", pid=None, exit_code=1,
                             description="exited too quickly (exit status 1)")
        return self._set(name, state="RUNNING", pid=2000 + len(self.emitted), description="")

    async def stop(self, name: str) -> ProgramStatus:
        if self._get(name).state not in ("RUNNING", "STARTING", "BACKOFF"):
            return self._get(name)
        await trio.sleep(self.action_delay)
        return self._set(name, state="STOPPED", pid=None, exit_code=143, signal="SIGTERM",
                         description="stopped")

    async def restart(self, name: str) -> ProgramStatus:
        if self._get(name).state == "RUNNING":
            await self.stop(name)
        return await self.start(name)

    def signal(self, name: str, signum: int) -> None:
        if self._get(name).state != "RUNNING":
            raise ControlError("bad_state", f"{name} is not running")
        self.signals.append((name, signum))

    def exec_target(self, name: str) -> Path:
        status = self._get(name)
        if status.container is None:
            raise ControlError("not_a_container", f"{name} is a plain process, not a container")
        if status.state != "RUNNING":
            raise ControlError("bad_state", f"{name} is not running")
        return self.tmp / "state" / name

    def log_path(self, name: str, stream: str) -> Path:
        self._get(name)
        return self.tmp / "logs" / f"{name}.{stream}.log"

    def stats(self, name: str) -> dict[str, Any]:
        status = self._get(name)
        self.stats_calls += 1
        if status.state != "RUNNING":
            return {}
        return {"cpu_usage_ns": self.stats_calls * 50_000_000, "memory_bytes": 12 * 2**20, "pids": 3}

    def subscribe(self, max_buffer: int) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](max_buffer + 1)
        self.subscribers.append((send, max_buffer))
        self.subscribed.set()
        return receive

    def reread(self) -> dict[str, list[str]]:
        return {"added": ["new"], "removed": ["worker"], "changed": ["db"]}

    async def reload(self) -> dict[str, list[str]]:
        self.programs["new"] = replace(self.programs[sorted(self.programs)[0]], name="new", state="STOPPED",
                                       pid=None)
        return {"added": ["new"], "removed": [], "changed": []}

    def request_shutdown(self, reason: str = "requested", *, keep_running: bool = False) -> None:
        self.shutdown_requested = True
        self.keep_running = keep_running

    def emit(self, event: str, **fields: Any) -> None:
        record = {"ts": "2026-11-28T00:00:00.000000Z", "event": event, **fields}
        self.emitted.append(record)
        for sub in list(self.subscribers):
            send, max_buffer = sub
            try:
                if send.statistics().current_buffer_used >= max_buffer:
                    send.send_nowait({"event": "subscriber.dropped", "reason": f"fell {max_buffer} behind"})
                    raise trio.ClosedResourceError
                send.send_nowait(record)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.subscribers.remove(sub)
                send.close()


# -- helpers ---------------------------------------------------------------------------------------


async def connect(path: Path) -> trio.SocketStream:
    return await trio.open_unix_socket(os.fspath(path))


async def read_message(stream: trio.SocketStream, conn: proto.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is proto.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        return event


async def call(path: Path, command: str, **args: Any) -> Any:
    stream = await connect(path)
    async with stream:
        conn = proto.Connection(proto.Role.CLIENT)
        _, data = conn.request(command, **args)
        await stream.send_all(data)
        return await read_message(stream, conn)


async def raw_exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Send raw bytes, then read every line until the server closes (or 5 s)."""
    stream = await connect(path)
    async with stream:
        await stream.send_all(data)
        buf = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                buf += chunk
        return [json.loads(line) for line in buf.splitlines()]


FAST = server.Limits(request_timeout=0.3, idle_timeout=2.0, send_timeout=0.5, event_buffer=50)


@pytest.fixture
def api(tmp_path: Path) -> FakeAPI:
    return FakeAPI(tmp_path)


@pytest.fixture
async def sock(api: FakeAPI, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Path]:
    path = tmp_path / "run" / "nsinitd.sock"
    await nursery.start(lambda task_status: server.serve(api, path, task_status, limits=FAST))
    yield path
    nursery.cancel_scope.cancel()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is 0700, which would refuse `nobody`
    by file permissions before SO_PEERCRED is ever consulted)."""
    path = Path(tempfile.mkdtemp(prefix="nsinitctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


# -- requests --------------------------------------------------------------------------------------


async def test_status_all_and_named(sock: Path, api: FakeAPI) -> None:
    reply = await call(sock, "status")
    assert isinstance(reply, proto.Reply)
    assert [p["name"] for p in reply.result] == ["db", "web", "worker"]
    assert reply.result[1] == api.programs["web"].to_json()
    reply = await call(sock, "status", names=["worker"])
    assert [p["name"] for p in reply.result] == ["worker"]


async def test_control_errors_keep_their_code(sock: Path) -> None:
    error = await call(sock, "status", names=["nope"])
    assert error == proto.Error(1, "no_such_program", "no such program: nope")
    error = await call(sock, "start", name="web")
    assert isinstance(error, proto.Error) and error.code == "bad_state"
    error = await call(sock, "exec_target", name="worker")
    assert isinstance(error, proto.Error) and error.code == "not_a_container"
    error = await call(sock, "signal", name="web", signum=999)
    assert isinstance(error, proto.Error) and error.code == "bad_request"


async def test_start_of_a_running_program_and_stop_of_a_stopped_one_are_refused(sock: Path, api: FakeAPI) -> None:
    assert await call(sock, "start", name="web") == proto.Error(1, "bad_state", "already started")
    assert (await call(sock, "stop", name="web")).result["state"] == "STOPPED"
    assert await call(sock, "stop", name="web") == proto.Error(1, "bad_state", "not running")
    api.programs["db"] = replace(api.programs["db"], state="FATAL", pid=None)
    assert await call(sock, "stop", name="db") == proto.Error(1, "bad_state", "not running")
    assert [e["event"] for e in api.emitted] == ["program.stopped"]  # nothing else happened


async def test_reread_and_event_log(sock: Path, api: FakeAPI) -> None:
    assert (await call(sock, "reread")).result == {"added": ["new"], "removed": ["worker"], "changed": ["db"]}
    assert (await call(sock, "event_log")).result == os.fspath(api.tmp / "events.jsonl")
    api.event_log = None
    assert (await call(sock, "event_log")).result is None


async def test_actions(sock: Path, api: FakeAPI) -> None:
    reply = await call(sock, "stop", name="web")
    assert reply.result["state"] == "STOPPED"
    reply = await call(sock, "start", name="web")
    assert reply.result["state"] == "RUNNING"
    reply = await call(sock, "restart", name="web")
    assert reply.result["state"] == "RUNNING"
    assert (await call(sock, "signal", name="db", signum=1)).result is None
    assert api.signals == [("db", 1)]
    assert (await call(sock, "exec_target", name="db")).result == os.fspath(api.tmp / "state" / "db")
    reply = await call(sock, "log_path", name="db", stream="stderr")
    assert reply.result.endswith("db.stderr.log")
    assert (await call(sock, "pid")).result == os.getpid()
    assert (await call(sock, "pid", name="db")).result == 1000
    reply = await call(sock, "reload")
    assert reply.result == {"added": ["new"], "removed": [], "changed": []}
    error = await call(sock, "pid", name="new")
    assert isinstance(error, proto.Error) and error.code == "bad_state"
    reply = await call(sock, "version")
    assert reply.result["protocol"] == proto.PROTOCOL_VERSION
    reply = await call(sock, "stats")
    assert reply.result["web"]["stats"]["pids"] == 3
    assert reply.result["web"]["status"]["state"] == "RUNNING"
    with pytest.raises(proto.ProtocolError, match="keep_running"):  # refused before it is sent
        proto.Connection(proto.Role.CLIENT).request("shutdown", keep_running="yes")
    assert (await call(sock, "shutdown", keep_running=True)).result == {"pid": os.getpid(), "keep_running": True}
    assert (api.shutdown_requested, api.keep_running) == (True, True)
    assert (await call(sock, "shutdown")).result == {"pid": os.getpid(), "keep_running": False}
    assert api.keep_running is False


async def test_stats_from_a_daemon_that_cannot_read_usage_are_unsupported(sock: Path, api: FakeAPI) -> None:
    def unreadable(name: str) -> dict[str, Any]:
        raise NotImplementedError

    api.stats = unreadable  # type: ignore[method-assign]
    error = await call(sock, "stats")
    assert error == proto.Error(1, proto.UNSUPPORTED, "this nsinitd doesn't report resource usage")


def test_every_protocol_command_has_exactly_one_handler() -> None:
    assert server.table_errors(server.CALLS, server.STREAMS) == []
    assert set(server.CALLS) | set(server.STREAMS) == set(proto.COMMANDS)


def test_a_command_without_a_handler_or_a_handler_without_a_command_is_named() -> None:
    calls = {k: v for k, v in server.CALLS.items() if k != "pid"}
    calls["frobnicate"] = server.CALLS["status"]
    assert server.table_errors(calls, server.STREAMS) == [
        "the protocol's command 'pid' has no handler",
        "a handler for 'frobnicate', which is no command of the protocol",
    ]
    assert server.table_errors({**server.CALLS, "events": server.CALLS["status"]}, {}) == [
        "'events' streams in the protocol, but its handler is in the other table",
    ]


async def test_an_exception_in_the_daemon_is_an_internal_error(sock: Path, api: FakeAPI) -> None:
    def broken(names: Sequence[str] = ()) -> list[ProgramStatus]:
        raise RuntimeError("boom")

    api.status = broken  # type: ignore[method-assign]
    error = await call(sock, "status")
    assert isinstance(error, proto.Error) and error.code == proto.INTERNAL and "boom" in error.message
    assert any(e["event"] == "control.error" for e in api.emitted)
    assert isinstance(await call(sock, "version"), proto.Reply)


async def test_several_requests_on_one_connection(sock: Path) -> None:
    stream = await connect(sock)
    async with stream:
        conn = proto.Connection(proto.Role.CLIENT)
        data = b"".join(conn.request("pid")[1] for _ in range(20))
        await stream.send_all(data)
        replies = [await read_message(stream, conn) for _ in range(20)]
    assert [r.id for r in replies] == list(range(1, 21))


async def test_a_slow_action_does_not_block_other_clients(sock: Path, api: FakeAPI) -> None:
    api.action_delay = 2.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: call(sock, "stop", name="web"))
        await trio.sleep(0.1)
        t0 = time.perf_counter()
        await call(sock, "status")
        assert time.perf_counter() - t0 < 0.1
        nursery.cancel_scope.cancel()


# -- the socket file -------------------------------------------------------------------------------


async def test_socket_is_0600_root(sock: Path) -> None:
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert not stat.S_IMODE(os.stat(sock.parent).st_mode) & 0o002


async def test_umask_is_left_as_it_was(api: FakeAPI, tmp_path: Path, nursery: trio.Nursery) -> None:
    before = os.umask(0o022)
    try:
        await nursery.start(server.serve, api, tmp_path / "u.sock")
        assert os.umask(0o022) == 0o022
        (tmp_path / "after").touch()
        assert stat.S_IMODE(os.stat(tmp_path / "after").st_mode) == 0o644
    finally:
        os.umask(before)
    nursery.cancel_scope.cancel()


async def test_socket_group_makes_it_0660(api: FakeAPI, tmp_path: Path, nursery: trio.Nursery) -> None:
    api.socket_group = 4242
    path = tmp_path / "g.sock"
    await nursery.start(server.serve, api, path)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 4242
    nursery.cancel_scope.cancel()


async def test_socket_removed_on_exit(api: FakeAPI, tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, api, path)
        assert path.exists()
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_the_lock_file_goes_with_the_socket(api: FakeAPI, tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, api, path)
        assert (tmp_path / "x.sock.lock").exists()
        nursery.cancel_scope.cancel()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


async def test_a_daemon_starting_while_one_stops_keeps_the_lock_file(api: FakeAPI, tmp_path: Path) -> None:
    """The lock file is removed under the lock: if another daemon holds it (it is checking the
    socket right now), the one stopping leaves both files to it (the socket is then a dead one's,
    which the starter replaces)."""
    path = tmp_path / "x.sock"
    lock_path = tmp_path / "x.sock.lock"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, api, path)
        starter = os.open(lock_path, os.O_RDWR)
        fcntl.flock(starter, fcntl.LOCK_EX | fcntl.LOCK_NB)
        nursery.cancel_scope.cancel()
    try:
        assert os.stat(lock_path).st_ino == os.fstat(starter).st_ino  # the starter's lock still guards the path
    finally:
        os.close(starter)


def test_a_lock_file_removed_while_waiting_for_it_is_locked_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between open() and flock() a stopping daemon may remove the lock file: a lock on the removed
    file guards nothing, since the next daemon creates a new file and locks that."""
    path = tmp_path / "x.sock"
    lock_path = tmp_path / "x.sock.lock"
    real_flock = fcntl.flock
    removed = []

    def flock_after_removal(fd: int, operation: int) -> None:
        if not removed:
            lock_path.unlink()  # the stopping daemon's removal, just before our flock
            removed.append(True)
        real_flock(fd, operation)

    monkeypatch.setattr(server.fcntl, "flock", flock_after_removal)
    with server._lock(path):
        monkeypatch.setattr(server.fcntl, "flock", real_flock)
        other = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)  # a second daemon starting
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert removed


async def test_stale_socket_is_replaced(api: FakeAPI, tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(os.fspath(path))  # bound, never listening, then gone: a crashed daemon's file
    leftover.close()
    assert path.exists()
    await nursery.start(server.serve, api, path)
    assert isinstance(await call(path, "version"), proto.Reply)
    nursery.cancel_scope.cancel()


async def test_socket_held_by_an_orphan_of_a_dead_daemon_is_stale(
    api: FakeAPI, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The daemon died but a child it forked kept the listening socket open: connect() succeeds,
    yet the process that listened is gone, so the file is replaced."""
    path = tmp_path / "orphan.sock"
    script = (
        "import os, socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(5)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.closerange(0, 3); time.sleep(30); os._exit(0)\n"
        "print(child, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, os.fspath(path)], capture_output=True, timeout=10,
                          check=True)
    orphan = int(proc.stdout)
    try:
        await nursery.start(server.serve, api, path)
        assert isinstance(await call(path, "version"), proto.Reply)
    finally:
        os.kill(orphan, 9)
    nursery.cancel_scope.cancel()


async def test_live_socket_is_never_taken_over(sock: Path, api: FakeAPI) -> None:
    other = FakeAPI(api.tmp, names=("other",))
    with pytest.raises(server.SocketInUseError, match="in use by a live nsinitd"):
        await server.serve(other, sock)
    reply = await call(sock, "status")
    assert [p["name"] for p in reply.result] == ["db", "web", "worker"]


async def test_a_file_that_is_not_a_socket_is_left_alone(api: FakeAPI, tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(server.SocketInUseError, match="not a socket"):
        await server.serve(api, path)
    assert path.read_text() == "data"


# -- access ----------------------------------------------------------------------------------------

_NOBODY_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b'{"id":1,"cmd":"status"}\\n')
buf = b""
try:
    while b"\\n" not in buf and (chunk := s.recv(65536)):
        buf += chunk
except ConnectionResetError:
    pass
print(buf.decode().strip())
"""


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to another user)")
async def test_non_root_user_is_refused_by_peer_credentials(
    api: FakeAPI, open_dir: Path, nursery: trio.Nursery
) -> None:
    path = open_dir / "s.sock"
    await nursery.start(server.serve, api, path)
    os.chmod(path, 0o666)  # so that SO_PEERCRED, not the file mode, is what refuses
    proc = await trio.run_process(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
         _NOBODY_CLIENT, os.fspath(path)],
        capture_stdout=True, capture_stderr=True,
    )
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "refused"
    assert f"uid {NOBODY}" in reply["error"]["message"]
    refused = [e for e in api.emitted if e["event"] == "control.refused"]
    assert refused and refused[0]["uid"] == NOBODY
    assert isinstance(await call(path, "version"), proto.Reply)  # root still served
    nursery.cancel_scope.cancel()


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to another user)")
async def test_the_configured_group_is_let_in(api: FakeAPI, open_dir: Path, nursery: trio.Nursery) -> None:
    api.socket_group = 4242
    path = open_dir / "s.sock"
    await nursery.start(server.serve, api, path)
    proc = await trio.run_process(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--groups=4242", sys.executable, "-c",
         _NOBODY_CLIENT, os.fspath(path)],
        capture_stdout=True, capture_stderr=True,
    )
    assert json.loads(proc.stdout)["ok"] is True
    nursery.cancel_scope.cancel()


def test_peer_allowed_rules() -> None:
    root, nobody = server.Peer(1, 0, 0), server.Peer(1, NOBODY, NOBODY)
    assert server.peer_allowed(root, set(), None)
    assert not server.peer_allowed(nobody, set(), None)
    assert server.peer_allowed(nobody, {10, 4242}, 4242)
    assert server.peer_allowed(server.Peer(1, NOBODY, 4242), set(), 4242)
    assert not server.peer_allowed(nobody, {10}, 4242)


# -- robustness ------------------------------------------------------------------------------------


async def test_malformed_lines_get_errors_and_the_connection_goes_on(sock: Path) -> None:
    replies = await raw_exchange(
        sock, b'garbage\n[]\n{"id":5,"cmd":"nope"}\n\n{"id":6,"cmd":"pid"}\n'
    )
    assert [(r["id"], r["ok"]) for r in replies[:4]] == [(None, False), (None, False), (5, False), (None, False)]
    assert replies[0]["error"]["code"] == "malformed"
    assert replies[2]["error"]["code"] == "bad_request"
    assert replies[4] == {"id": 6, "ok": True, "result": os.getpid()}


async def test_oversized_request_is_refused_and_closed(sock: Path) -> None:
    replies = await raw_exchange(sock, b'{"id":1,"cmd":"status","args":{"names":["' + b"a" * 200_000)
    assert len(replies) == 1 and replies[0]["error"]["code"] == "too_large"


async def test_half_written_request_times_out(sock: Path) -> None:
    t0 = time.perf_counter()
    replies = await raw_exchange(sock, b'{"id":1,"cmd":"sta')
    assert replies[0]["error"]["code"] == "timeout"
    assert time.perf_counter() - t0 < 2


async def test_a_slow_drip_does_not_extend_the_deadline(sock: Path) -> None:
    stream = await connect(sock)
    async with stream:
        t0 = time.perf_counter()
        with contextlib.suppress(trio.BrokenResourceError):
            for byte in b'{"id":1,"cmd":"status"}':
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.1)
        buf = await stream.receive_some(65536)
    assert json.loads(buf)["error"]["code"] == "timeout"
    assert time.perf_counter() - t0 < 3


async def test_idle_connection_is_closed(sock: Path) -> None:
    stream = await connect(sock)
    async with stream:
        with trio.fail_after(5):
            assert await stream.receive_some(1024) == b""


async def test_client_vanishing_mid_request_is_harmless(sock: Path, api: FakeAPI) -> None:
    api.action_delay = 0.2
    stream = await connect(sock)
    await stream.send_all(proto.Connection(proto.Role.CLIENT).request("stop", name="web")[1])
    await stream.aclose()
    await trio.sleep(0.4)
    assert api.programs["web"].state == "STOPPED"
    assert isinstance(await call(sock, "status"), proto.Reply)


_FLOOD = """
import json, socket, sys, time
path = sys.argv[1]
socks = []
for i in range(300):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    socks.append(s)
for i, s in enumerate(socks):
    kind = i % 3
    if kind == 0:
        s.sendall(b'{"id":1,"cmd":"status"}\\n')
    elif kind == 1:
        s.sendall(b"\\x00garbage\\n" + b"x" * 70000 if i % 2 else b"[not json\\n")
    else:
        s.sendall(b'{"id":1,"cmd":"status","args":{"names":["w')
print("sent", flush=True)
answered = errors = 0
for i, s in enumerate(socks):
    buf = b""
    try:
        while b"\\n" not in buf and (chunk := s.recv(65536)):
            buf += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    line = buf.split(b"\\n")[0]
    if line:
        reply = json.loads(line)
        answered += reply["ok"]
        errors += not reply["ok"]
print(json.dumps({"answered": answered, "errors": errors}), flush=True)
"""


_PROBE = """
import json, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
latencies = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    t0 = time.perf_counter()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.sendall(b'{"id":1,"cmd":"status","args":{"names":["web"]}}\\n')
    buf = b""
    while b"\\n" not in buf:
        buf += s.recv(65536)
    s.close()
    assert json.loads(buf)["ok"], buf
    latencies.append(time.perf_counter() - t0)
    time.sleep(0.01)
print(json.dumps(latencies))
"""


async def probe_status(path: Path, seconds: float) -> list[float]:
    """Status round trips, measured from another process as a real client sees them (measured
    in this process they would include the test's own work on the same trio loop)."""
    proc = await trio.run_process([sys.executable, "-c", _PROBE, os.fspath(path), str(seconds)],
                                  capture_stdout=True)
    latencies: list[float] = json.loads(proc.stdout)
    return latencies


def assert_fast(latencies: list[float], blocked: float) -> None:
    """Every status answered within 100 ms. On this shared 2-core machine one round trip may lose
    the CPU to another process, so the single worst sample only has to stay below ``blocked``, the
    wait a server stuck on a bad client would show."""
    assert len(latencies) > 20
    worst = sorted(latencies)
    assert worst[-2] < 0.1, worst[-5:]
    assert worst[-1] < blocked, worst[-5:]


@pytest.mark.slow
async def test_flood_of_300_connections_does_not_block_status(api: FakeAPI, tmp_path: Path,
                                                              nursery: trio.Nursery) -> None:
    """Another process opens 300 connections at once: a third valid, a third malformed or
    oversized, a third half-written. Status keeps answering within 100 ms, every valid request is
    answered and every bad one gets an error."""
    path = tmp_path / "flood.sock"
    limits = replace(FAST, request_timeout=2.0)
    await nursery.start(lambda task_status: server.serve(api, path, task_status, limits=limits))
    latencies: list[float] = []
    result: dict[str, Any] = {}

    async def flood() -> None:
        await trio.sleep(0.2)  # the probe is running first
        proc = await trio.run_process([sys.executable, "-c", _FLOOD, os.fspath(path)], capture_stdout=True)
        result.update(json.loads(proc.stdout.splitlines()[-1]))

    async def probe() -> None:
        latencies.extend(await probe_status(path, 3.0))

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            inner.start_soon(probe)
    assert result == {"answered": 100, "errors": 200}
    assert_fast(latencies, blocked=limits.request_timeout)
    nursery.cancel_scope.cancel()


async def test_connections_beyond_the_limit_are_told_busy(api: FakeAPI, tmp_path: Path,
                                                          nursery: trio.Nursery) -> None:
    path = tmp_path / "busy.sock"
    limits = replace(FAST, max_connections=5, idle_timeout=10)
    await nursery.start(lambda task_status: server.serve(api, path, task_status, limits=limits))
    held = [await connect(path) for _ in range(5)]
    await trio.sleep(0.1)
    replies = await raw_exchange(path, b"")
    assert replies[0]["error"]["code"] == "busy"
    for stream in held:
        await stream.aclose()
    await trio.sleep(0.1)
    assert isinstance(await call(path, "version"), proto.Reply)
    nursery.cancel_scope.cancel()


# -- events ----------------------------------------------------------------------------------------


async def test_event_stream_delivers_new_events(sock: Path, api: FakeAPI) -> None:
    stream = await connect(sock)
    async with stream:
        conn = proto.Connection(proto.Role.CLIENT)
        request_id, data = conn.request("events")
        await stream.send_all(data)
        assert await read_message(stream, conn) == proto.Reply(request_id, {"stream": True})
        await trio.sleep(0.05)
        api.emit("program.running", program="web", pid=7)
        item = await read_message(stream, conn)
        assert isinstance(item, proto.StreamItem) and item.data["event"] == "program.running"
        assert item.data["pid"] == 7
    await trio.sleep(0.1)
    api.emit("program.stopped", program="web")  # the closed reader is noticed and unsubscribed
    assert api.subscribers == []


async def test_event_stream_ends_when_the_daemon_closes_it(sock: Path, api: FakeAPI) -> None:
    stream = await connect(sock)
    async with stream:
        conn = proto.Connection(proto.Role.CLIENT)
        await stream.send_all(conn.request("events")[1])
        await read_message(stream, conn)
        await trio.sleep(0.05)
        for send, _ in api.subscribers:
            send.close()
        end = await read_message(stream, conn)
        assert isinstance(end, proto.StreamEnd) and end.reason == "closed"


async def test_event_stream_ends_cleanly_when_the_server_stops(api: FakeAPI, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, api, path)
        stream = await connect(path)
        conn = proto.Connection(proto.Role.CLIENT)
        await stream.send_all(conn.request("events")[1])
        await read_message(stream, conn)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    end = await read_message(stream, conn)
    assert end == proto.StreamEnd(1, "closed", "nsinitd is stopping")
    await stream.aclose()


async def test_a_reader_that_falls_behind_gets_a_final_notice(sock: Path, api: FakeAPI) -> None:
    stream = await connect(sock)
    async with stream:
        conn = proto.Connection(proto.Role.CLIENT)
        await stream.send_all(conn.request("events")[1])
        await read_message(stream, conn)
        await trio.sleep(0.05)
        # A burst faster than the server task can forward: the fake drops at 50 behind.
        for i in range(200):
            api.emit("program.backoff", program="web", attempt=i, delay=1.0)
        messages = []
        with trio.fail_after(5):
            while not isinstance(message := await read_message(stream, conn), proto.StreamEnd):
                messages.append(message)
        assert message.reason == "dropped"
        assert messages[-1].data["event"] == "subscriber.dropped"


@pytest.mark.slow
async def test_a_stuck_event_reader_is_dropped_and_status_stays_fast(sock: Path, api: FakeAPI) -> None:
    """The reader subscribes and never reads. Big events fill its socket, the server's send times
    out (0.5 s here) and the reader is dropped; status answers within 100 ms all along."""
    stuck = await connect(sock)
    conn = proto.Connection(proto.Role.CLIENT)
    await stuck.send_all(conn.request("events")[1])
    await trio.sleep(0.05)
    assert len(api.subscribers) == 1
    latencies: list[float] = []
    payload = "x" * 8192

    async def probe() -> None:
        latencies.extend(await probe_status(sock, 2.5))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            for i in range(400):
                api.emit("program.running", program="web", pid=i, payload=payload)
                await trio.sleep(0.005)
    assert api.subscribers == []
    assert any(e["event"] == "control.dropped" for e in api.emitted)
    assert_fast(latencies, blocked=FAST.send_timeout)
    # The server closed its end: the stuck reader, reading at last, finds the end of the stream.
    with trio.fail_after(5):
        while await stuck.receive_some(1 << 20):
            pass
    await stuck.aclose()
