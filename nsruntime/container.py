"""A created container and its verbs: start, signal, kill, poll/wait, stats, destroy; describe.

A Container is what create() hands back once PID 1 is up and the root in place (creator.py makes
it; spawn.py is the other side of the fork). From then on the host only talks to PID 1 through
its pidfd (signals, exit) and the control socket (Start, then PID 1's last word, Exited), and
reaches the container's processes through its cgroups. Every verb here is bounded and safe to
call on a container that has exited already.
"""

from __future__ import annotations

import os
import time

from . import channel, libc
from .errors import NsRuntimeError, TeardownError
from .lean import suppress
from .signals import ExitStatus
from .state import StateDir, proc_state, resolve

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from os import PathLike
    from typing import Any

    from .cgroups import CgroupSet
    from .config import ContainerConfig
else:  # the C modules: signal.py and socket.py build enums at import (see lean.py)
    import _signal as signal


class Container:
    """A created container: PID 1 is up, its root in place, the command waiting for start()."""

    def __init__(self, id: str, config: ContainerConfig, rootfs: str, state: StateDir, pid: int, pidfd: int,
                 cgroups: CgroupSet | None, links: list[str], console: int | None, sock: socket.socket,
                 *, started: bool = False, reader: channel.Reader | None = None) -> None:
        self.id = id
        self.config = config
        self.rootfs = rootfs
        self.state = state
        self.pid = pid
        self.pidfd = pidfd
        self.cgroups = cgroups
        self.links = links
        self.console = console  # pty master when the command has a terminal
        self._sock = sock
        self._started = started  # Start went with Go (begin_create(start=True))
        self._reader = reader or channel.Reader("container init")  # with what PID 1 said after Ready
        self._status: ExitStatus | None = None
        self._destroyed = False
        self._exit_msg: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"Container(id={self.id!r}, pid={self.pid}, rootfs={self.rootfs!r})"

    @property
    def control_fd(self) -> int:
        """The host's end of the control socket, over which PID 1 reports the command's status
        (Exited): whoever holds a copy keeps that report for a later reader (nsinitd's keeper)."""
        return self._sock.fileno()

    def start(self) -> None:
        if not self._started:
            self._started = True
            channel.send(self._sock, channel.Start())

    def signal(self, signum: int) -> None:
        """To the command, through PID 1 (which forwards everything but SIGCHLD)."""
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signum)

    def kill(self, timeout: float = 1.0) -> None:
        """SIGKILL every process of the container (the cgroup), PID 1 included.

        Waits at most timeout for the cgroup to empty; destroy() reports what would not die.
        """
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        if self.cgroups is not None:
            with suppress(NsRuntimeError, OSError):
                self.cgroups.kill(timeout=timeout)

    def _read_exit_msg(self) -> None:
        """Take PID 1's Exited, if it said it (it can't when SIGKILL took it)."""
        said = _last_word(self._sock, self._reader)
        if said is not None:
            self._exit_msg = said

    def poll(self) -> ExitStatus | None:
        """The exit status once PID 1 has exited (reaping it), else None. Never blocks."""
        if self._status is not None:
            return self._status
        try:
            res = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
            if res is None:
                return None
        except ChildProcessError:  # not our child (adopted after a restart): exit status unknown
            res = None
            if not libc.wait_readable(self.pidfd, 0):
                return None
        self._read_exit_msg()
        oom = self._oom_kills() > 0
        if self._exit_msg is not None:
            code, sig = self._exit_msg
            self._status = ExitStatus(code, sig or None, oom and sig == signal.SIGKILL)
        elif res is not None and res.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            self._status = ExitStatus(128 + res.si_status, res.si_status, oom and res.si_status == signal.SIGKILL)
        elif res is not None:
            self._status = ExitStatus(res.si_status, None)
        else:
            self._status = ExitStatus(128 + signal.SIGKILL, signal.SIGKILL, oom)
        return self._status

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Block until PID 1 exits (or timeout); returns its status."""
        libc.wait_readable(self.pidfd, timeout)
        return self.poll()

    def stats(self) -> dict[str, Any]:
        if self.cgroups is None:
            return {}
        try:
            return dict(self.cgroups.stats())
        except (NsRuntimeError, OSError):
            return {}

    def _oom_kills(self) -> int:
        if self.cgroups is None:
            return 0
        try:
            return self.cgroups.oom_kills()
        except (NsRuntimeError, OSError):
            return 0

    def destroy(self, timeout: float = 10.0) -> dict[str, list[str]]:
        """Kill what is left, reap PID 1, release cgroups, links and files. Bounded by timeout.

        Raises TeardownError naming the process and the resource that would not go (a frozen
        cgroup, a process in D state); what could be released is released, what couldn't stays
        recorded in the state dir, and destroy() may be called again later to finish.
        """
        released: dict[str, list[str]] = {"cgroups": [], "links": [], "files": []}
        if self._destroyed:
            return released
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        errors: list[str] = []
        if self.poll() is None:
            self.kill(timeout=left() / 2)
            if self.wait(left()) is None:
                errors.append(f"pid {self.pid} (PID 1 of {self.id}) is {proc_state(self.pid)} "
                              f"{timeout:g} s after SIGKILL")
        if self.cgroups is not None:
            try:
                self.cgroups.kill(timeout=left())
                released["cgroups"] = list(self.cgroups.destroy(timeout=left()))
            except (NsRuntimeError, OSError) as e:
                errors.append(str(e))
        if self.links:
            from . import network

            try:
                released["links"] = network.teardown(self.links)
                self.links = []
            except (NsRuntimeError, OSError) as e:
                errors.append(str(e))
        if errors:
            raise TeardownError("; ".join(errors))
        released["files"] = self.state.remove()
        self.state.release()
        if self.console is not None:
            with suppress(OSError):
                os.close(self.console)
            self.console = None
        with suppress(OSError):
            os.close(self.pidfd)
        self._sock.close()
        self._destroyed = True
        return released


def _last_word(sock: socket.socket, reader: channel.Reader) -> tuple[int, int] | None:
    """Whatever PID 1 sent that is still unread on sock, without blocking: its Exited (code,
    signal), if it said it."""
    with suppress(OSError, NsRuntimeError):
        sock.setblocking(False)
        while True:
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            reader.feed(chunk)
    said = None
    while (m := reader.next()) is not None:
        if isinstance(m, channel.Exited):
            said = (m.code, m.signal)
    return said


def exit_report(sock: socket.socket) -> ExitStatus | None:
    """How the command of a container that is gone ended, as its PID 1 reported it on the control
    socket (unread till now: the creator that would have read it died first); None when PID 1 left
    without a word (SIGKILL)."""
    said = _last_word(sock, channel.Reader("container init"))
    return ExitStatus(said[0], said[1] or None) if said is not None else None


def reattach(state_dir: str | PathLike[str] | StateDir, sock: socket.socket, pid: int) -> Container | None:
    """The live container recorded in state_dir, made (and started) by another process whose end
    of the control socket is sock: a Container whose verbs work as on the one create() returned
    (PID 1 need not be our child: its status comes as its Exited report, or SIGKILL when none
    came), with the config it was made with (state.json). None, touching nothing, unless PID 1
    proves to be the recorded one (open_live: start time, namespaces, cgroup) and is pid, the one
    the caller was told of."""
    from . import cgroups
    from .config import parse

    sdir = resolve(state_dir)
    live = sdir.open_live()
    if live is None:
        return None
    if live[0] != pid:
        os.close(live[1])
        return None
    pidfd = live[1]
    st = sdir.read_state()
    try:
        config = parse(st.get("config"))
        cg = cgroups.from_paths(list(st["cgroups"])) if st.get("cgroups") else None
    except (NsRuntimeError, OSError):
        os.close(pidfd)
        return None
    return Container(str(st.get("id", "")), config, str(st.get("rootfs", "")), sdir, pid, pidfd, cg,
                     list(st.get("links", [])), None, sock, started=True)


def describe(state_dir: str | PathLike[str] | StateDir) -> dict[str, Any]:
    """The state of the container in state_dir, in the shape of the OCI ``state`` verb."""
    sdir = resolve(state_dir)
    pid = sdir.live_pid()
    st = sdir.read_state()
    return {
        "ociVersion": "1.0.2",
        "id": st.get("id"),
        "status": "running" if pid else ("stopped" if sdir.has_files() else "absent"),
        "pid": pid,
        "bundle": st.get("rootfs"),
        "cgroups": st.get("cgroups", []),
        "links": st.get("links", []),
    }
