"""nsinitd's side of the keeper (:mod:`supervisor.keeper`): finding or starting it, asking it, and
the programs it is the parent of.

At start nsinitd attaches to the keeper of its state_dir if one answers on ``keeper.sock`` (a
previous nsinitd died or left its programs running), else starts one. From then on plain programs
are forked by the keeper, container PID 1s are cloned by a zygote the keeper started, and the
keeper reports each exit with its wait status (``exited`` notices, read by :meth:`KeeperClient.run`).
A :class:`KeptChild` is a plain program seen from nsinitd: signalled through a pidfd the keeper
opened before the program could exit, so a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from nsruntime import ExitStatus

from . import keeper as proto
from .config import ProgramConfig
from .process import Cgroup, Reaper, Released, SpawnError

#: Bound on the keeper's answer to one request (a spawn waits for the exec).
ANSWER_TIMEOUT = 10.0
#: Bound on the keeper's exit after ``quit`` once the programs are stopped.
QUIT_TIMEOUT = 10.0
#: Exit notices kept for a reader that may never come (a container's exit, heard through its PID 1).
MAX_UNREAD_EXITS = 4096


class KeeperError(Exception):
    """The keeper can't be used; ``str()`` is the one line nsinitd prints before exiting 1."""


def config_digest(cfg: ProgramConfig) -> str:
    """What tells a program's config from a changed one across nsinitd runs (the keeper keeps it)."""
    return hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]


def _fds_message(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []


class KeeperClient:
    """One connection to the keeper: requests in turn, exit notices dispatched as they come."""

    def __init__(self, sock: socket.socket, hello: Mapping[str, Any], proc: subprocess.Popen[bytes] | None) -> None:
        self._sock = trio.socket.from_stdlib_socket(sock)
        self.pid = int(hello["pid"])
        self.start = hello.get("start")
        self.cgroup = Path(hello["cgroup"]) if hello.get("cgroup") else None
        self.proc = proc  # when this nsinitd started it (then it is our child)
        self._lock = trio.Lock()
        self._replies_in, self._replies = trio.open_memory_channel[tuple[dict[str, Any], list[int]]](1)
        self._exits: dict[int, ExitStatus] = {}
        self._exit_events: dict[int, trio.Event] = {}
        self.lost = trio.Event()
        self._out_of_step = False

    # -- finding or starting the keeper -----------------------------------------------------------

    @classmethod
    def attach(cls, state_dir: Path, cgroup_parent: Path | None, reaper: Reaper) -> KeeperClient:
        """The keeper of state_dir, started if none answers. Synchronous: called once at start,
        before any program. Raises KeeperError (another protocol version, no answer)."""
        sock = cls._connect(state_dir)
        proc = None
        if sock is None:
            sock, proc = cls._launch(state_dir, cgroup_parent)
            reaper.own(proc.pid)
        try:
            hello = cls._hello(sock, state_dir)
        except BaseException:
            sock.close()
            if proc is not None:
                proc.kill()
                proc.wait()
                reaper.disown(proc.pid)
            raise
        return cls(sock, hello, proc)

    @staticmethod
    def _connect(state_dir: Path) -> socket.socket | None:
        path = state_dir / proto.SOCKET_NAME
        if not path.exists():
            return None
        dfd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"/proc/self/fd/{dfd}/{proto.SOCKET_NAME}")  # short, however long state_dir is
        except OSError as e:
            sock.close()
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                path.unlink(missing_ok=True)  # a dead keeper's socket
                return None
            raise KeeperError(f"{path}: connect: {e.strerror}") from None
        finally:
            os.close(dfd)
        return sock

    @staticmethod
    def _launch(state_dir: Path, cgroup_parent: Path | None) -> tuple[socket.socket, subprocess.Popen[bytes]]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        log = os.open(state_dir / "keeper.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            argv = [sys.executable, "-m", "supervisor.keeper", str(state_dir), str(theirs.fileno())]
            if cgroup_parent is not None:
                argv.append(str(cgroup_parent))
            proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True, cwd="/")
        except OSError as e:
            mine.close()
            raise KeeperError(f"cannot start the keeper: {e}") from None
        finally:
            theirs.close()
            os.close(log)
        return mine, proc

    @staticmethod
    def _hello(sock: socket.socket, state_dir: Path) -> dict[str, Any]:
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            proto.send(sock, {"op": "hello"})
            while True:
                msg, fds = proto.receive(sock)
                for fd in fds:
                    os.close(fd)
                if msg is None:
                    raise KeeperError(f"state_dir {state_dir}: the keeper closed the connection")
                if "exited" not in msg:  # exits are asked for again with list
                    break
        except TimeoutError:
            raise KeeperError(f"state_dir {state_dir}: the keeper did not answer within {ANSWER_TIMEOUT:g} s") from None
        finally:
            sock.settimeout(None)
        if msg.get("version") != proto.PROTOCOL:
            raise KeeperError(f"state_dir {state_dir}: its keeper (pid {msg.get('pid')}) speaks protocol "
                              f"{msg.get('version')!r}, this nsinitd {proto.PROTOCOL}: stop it with the nsinitd "
                              f"that started it (nsinitctl shutdown) or use another state_dir")
        return msg

    # -- talking ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read everything the keeper says; replies go to the waiting call(), exits to their waiters."""
        task_status.started()
        try:
            while True:
                try:
                    data, anc, _f, _a = await self._sock.recvmsg(proto.MAX_MESSAGE,
                                                                 socket.CMSG_LEN(proto.MAX_FDS * 4),
                                                                 socket.MSG_CMSG_CLOEXEC)
                except OSError:
                    data, anc = b"", []
                fds = [fd for level, kind, payload in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                       for fd in struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])]
                if not data:
                    return
                msg = json.loads(data)
                if "exited" in msg:
                    self._exited(int(msg["pid"]), int(msg["status"]))
                else:
                    await self._replies_in.send((msg, fds))
        finally:
            self.lost.set()
            self._replies_in.close()

    def _exited(self, pid: int, status: int) -> None:
        self._exits[pid] = ExitStatus.from_wait_status(status)
        self.exit_event(pid).set()
        while len(self._exits) > MAX_UNREAD_EXITS:  # a container's, told after its PID 1 was released
            stale = next(iter(self._exits))
            self.forget_pid(stale)

    def exit_event(self, pid: int) -> trio.Event:
        return self._exit_events.setdefault(pid, trio.Event())

    def exit_status(self, pid: int) -> ExitStatus | None:
        return self._exits.get(pid)

    def forget_pid(self, pid: int) -> None:
        self._exits.pop(pid, None)
        self._exit_events.pop(pid, None)

    async def call(self, msg: Mapping[str, Any], fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        """Send one request; its reply and the descriptors that came with it (the caller owns them).
        KeeperError when the keeper is gone or does not answer in time."""
        async with self._lock:
            if self.lost.is_set() or self._out_of_step:
                raise KeeperError(f"the keeper (pid {self.pid}) is gone")
            data = json.dumps(dict(msg), separators=(",", ":")).encode()
            # Shielded: a request sent must have its reply taken here, or the next caller would
            # take it for its own. Bounded all the same.
            with trio.CancelScope(deadline=trio.current_time() + ANSWER_TIMEOUT, shield=True) as scope:
                try:
                    await self._sock.sendmsg([data], _fds_message(fds))
                except OSError as e:
                    raise KeeperError(f"the keeper (pid {self.pid}): {e.strerror}") from None
                try:
                    return await self._replies.receive()
                except trio.EndOfChannel:
                    pass
            if scope.cancelled_caught:
                self._out_of_step = True  # a late reply would answer the wrong request
                raise KeeperError(f"the keeper (pid {self.pid}) did not answer within {ANSWER_TIMEOUT:g} s")
            raise KeeperError(f"the keeper (pid {self.pid}) is gone")

    async def quit(self, reaper: Reaper) -> None:
        """After an ordered shutdown: the keeper exits once its last child is gone; bounded."""
        with contextlib.suppress(KeeperError):
            await self.call({"op": "quit"})
        with trio.move_on_after(QUIT_TIMEOUT):
            await self.lost.wait()  # it closes the connection as it exits
        self.close()
        if self.proc is not None:
            with trio.move_on_after(QUIT_TIMEOUT):
                while self.proc.poll() is None:
                    await trio.sleep(0.01)
            reaper.disown(self.proc.pid)
        if self.cgroup is not None and self.cgroup.exists():  # a keeper killed before it could
            for sub in [self.cgroup / n for n in os.listdir(self.cgroup)]:
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        await Cgroup(sub).remove(reaper, timeout=QUIT_TIMEOUT / 2)
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()

    async def detach(self) -> None:
        """Leave the keeper with everything it holds (shutdown --keep-running): it sees our end
        close and drains the programs' pipes from then on. Bounded."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF and ends; then close
        with trio.move_on_after(ANSWER_TIMEOUT):
            await self.lost.wait()
        self.close()

    def close(self) -> None:
        """Only once the reader (run) has ended: closing under it is an error in trio."""
        self._sock.close()


class KeptChild:
    """A plain program whose parent is the keeper (a :class:`supervisor.process.Child`)."""

    def __init__(self, keeper: KeeperClient, pid: int, pidfd: int, cgroup: Cgroup | None) -> None:
        self.keeper = keeper
        self.pid = pid
        self.pidfd = pidfd  # opened by the keeper before the program could exit: this process or none
        self.cgroup = cgroup
        self.exit: ExitStatus | None = None
        self.teardown_timeout = 5.0

    def signal(self, signum: int) -> None:
        if self.exit is None and self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signum)

    def kill(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill()
        self.signal(signal.SIGKILL)

    def reap(self) -> ExitStatus | None:
        if self.exit is None:
            self.exit = self.keeper.exit_status(self.pid)
            if self.exit is None and self.keeper.lost.is_set() and self._gone():
                # the keeper died (killed by hand, OOM) and took the status with it: reported as a
                # SIGKILL, as the runtime reports a container whose PID 1 left no word
                self.exit = ExitStatus(128 + int(signal.SIGKILL), int(signal.SIGKILL))
            if self.exit is None:
                return None
            self.keeper.forget_pid(self.pid)
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1
        return self.exit

    def _gone(self) -> bool:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return self.pidfd < 0 or bool(poller.poll(0))

    async def wait(self) -> None:
        """Until the keeper tells the exit; or, should the keeper die, until the process is gone."""
        if self.exit is not None:
            return
        async with trio.open_nursery() as nursery:
            async def told() -> None:
                await self.keeper.exit_event(self.pid).wait()
                nursery.cancel_scope.cancel()

            async def keeper_gone() -> None:
                await self.keeper.lost.wait()
                if self.pidfd >= 0:
                    await trio.lowlevel.wait_readable(self.pidfd)
                nursery.cancel_scope.cancel()

            nursery.start_soon(told)
            nursery.start_soon(keeper_gone)

    def stats(self) -> Mapping[str, int]:
        return self.cgroup.stats() if self.cgroup is not None else {}

    async def teardown(self) -> Released:
        """Kill what the program left in its cgroup; the keeper reaps them (a child subreaper)."""
        if self.cgroup is not None:
            return {"cgroups": await self.cgroup.remove(None, timeout=self.teardown_timeout)}
        return {"cgroups": []}


async def spawn_kept(keeper: KeeperClient, cfg: ProgramConfig, env: Mapping[str, str], stdio: tuple[int, int, int],
                     held: Sequence[int], logs: Mapping[str, str], cgroup: Cgroup | None) -> KeptChild:
    """Have the keeper fork and exec a plain program; ``held``: the pipe read ends it keeps a copy
    of. SpawnError (one line) if exec fails."""
    msg = {"op": "spawn", "name": cfg.name, "argv": list(cfg.command), "env": dict(env),
           "cgroup": str(cgroup.path) if cgroup is not None else None, "digest": config_digest(cfg),
           "logs": dict(logs)}
    try:
        reply, fds = await keeper.call(msg, [*stdio, *held])
    except KeeperError as e:
        raise SpawnError(str(e)) from None
    if not reply.get("ok"):
        for fd in fds:
            os.close(fd)
        raise SpawnError(str(reply.get("error", "the keeper could not spawn it")))
    (pidfd,) = fds
    return KeptChild(keeper, int(reply["pid"]), pidfd, cgroup)


class GoneChild:
    """A program that exited while no nsinitd was attached: the keeper reaped it and kept its
    wait status. Seen by nsinitd as any exit is (program.exited, teardown, the restart policy)."""

    def __init__(self, pid: int, info: ExitStatus, release: Callable[[], Awaitable[Released]], *,
                 container: bool) -> None:
        self.container = container  # its teardown releases a container (container.destroyed)
        self.pid = pid
        self.pidfd = -1
        self.exit = info
        self._release = release

    def signal(self, signum: int) -> None:
        pass

    def kill(self) -> None:
        pass

    def reap(self) -> ExitStatus | None:
        return self.exit

    async def wait(self) -> None:
        return

    def stats(self) -> Mapping[str, int]:
        return {}

    async def teardown(self) -> Released:
        return await self._release()
