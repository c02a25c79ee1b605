"""join: enter a live container and run one more command there, with the caller's stdio or a pty.

A helper is forked on the host; it enters the container's cgroups (before setns and fork: the
command counts against the pids limit), its namespaces in the kernel's order (user first), and
PID 1's root exactly (setns(mnt) alone lands on the namespace's root, not the container's), then
forks the command and says Pid (+ the pty master) over a socketpair (channel.py). From then on it
forwards signals to the command and leaves with its status, so the caller waits for the helper
as for any child. Every pid is taken from the records through state.open_live, and the helper
checks that PID 1 still lives once it holds PID 1's files: a reused pid is never entered.
"""

from __future__ import annotations

import os
import select
import time

from . import cgroups, channel, init, libc, spawn
from .config import NAMESPACE_FILES, ContainerConfig, parse
from .creator import SETUP_TIMEOUT
from .errors import SetupError, StateError
from .lean import recv_fds, suppress
from .signals import ExitStatus, status_to_code
from .state import StateDir, resolve

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from collections.abc import Callable, Sequence
    from os import PathLike
    from typing import Any

    from .cgroups.base import CgroupSet
else:  # the C modules: signal.py and socket.py build enums at import (see lean.py)
    import _signal as signal
    import _socket as socket


class Joined:
    """A command started inside a live container by join(); ``pid`` is its host pid."""

    def __init__(self, pid: int, cmd_pid: int, console: int | None, sock: socket.socket) -> None:
        self.pid = pid  # the host-side helper waiting for it; signal() reaches the command
        self.cmd_pid = cmd_pid
        self.console = console
        self._sock = sock

    def signal(self, signum: int) -> None:
        with suppress(ProcessLookupError):
            os.kill(self.cmd_pid, signum)

    def wait(self) -> ExitStatus:
        _, st = os.waitpid(self.pid, 0)
        self._sock.close()
        status = ExitStatus.from_wait_status(st)
        if status.signal is None and status.exit_code > 128:  # the helper leaves with the command's 128+N
            return ExitStatus(status.exit_code, status.exit_code - 128)
        return status


def load_state_config(sdir: StateDir) -> tuple[ContainerConfig, dict[str, Any]]:
    """The config the container was created with, as its creator recorded it, and the records."""
    st = sdir.read_state()
    raw = st.get("config")
    if raw is None:
        raise StateError(f"{sdir.path}: state.json holds no config")
    if isinstance(raw, dict) and isinstance(raw.get("nsrun"), dict) and isinstance(raw.get("spec"), dict):
        from .oci import spec as oci_spec  # made from an OCI bundle: by nsrun, or an nsinitd bundle program

        return oci_spec.parse(raw["spec"], str(raw["nsrun"].get("bundle") or "/")).config, st
    return parse(raw), st


def _answer(sock: socket.socket, deadline: float) -> tuple[channel.Message | None, list[int]]:
    """The join helper's first message (and the descriptors with it), bounded by deadline."""
    reader = channel.Reader("join")
    fds: list[int] = []
    while (m := reader.next()) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SetupError("join", f"container init did not answer within {SETUP_TIMEOUT:.0f} s")
        if not libc.wait_readable(sock.fileno(), left):
            continue
        data, got = recv_fds(sock, 4096, 4)
        fds += got
        if not data:
            return None, fds
        reader.feed(data)
    return m, fds


def open_join(state_dir: str | PathLike[str] | StateDir, command: Sequence[str], *,
              stdio: tuple[int, int, int] | None = None, tty: bool | None = None,
              env: dict[str, str] | None = None, config: ContainerConfig | None = None,
              detach: bool = False) -> Joined:
    """Start ``command`` inside the live container whose records are in state_dir.

    config: the container's config, for a caller that holds it already (its creator): then the
    one recorded in state.json is not parsed again. detach: the helper leaves (status 0) as soon
    as the command exists, so the command is reparented to the nearest child subreaper above the
    caller (an OCI runtime's caller, which reaps it); wait() then reaps only the helper."""
    sdir = resolve(state_dir)
    live = sdir.open_live()
    if live is None:
        raise StateError(f"{sdir.path}: no live container")
    pid, pidfd = live
    try:
        if config is None:
            cfg, st = load_state_config(sdir)
        else:
            cfg, st = config, sdir.read_state()
        use_tty = cfg.tty if tty is None else tty
        full_env = cfg.env_dict()
        if env:
            full_env.update(env)
        cg = cgroups.from_paths(st["cgroups"]) if st.get("cgroups") else None
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        helper = os.fork()
        if helper == 0:
            _join_child(cfg, pid, pidfd, list(command), full_env, stdio, use_tty, cg, child_sock, parent_sock,
                        detach)
    finally:
        os.close(pidfd)
    child_sock.close()
    try:
        msg, fds = _answer(parent_sock, time.monotonic() + SETUP_TIMEOUT)
        if not isinstance(msg, channel.Pid):
            for fd in fds:
                os.close(fd)
            raise channel.expected("join", "pid", msg)
        return Joined(helper, msg.pid, fds[0] if fds else None, parent_sock)
    except BaseException:
        with suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)
        os.waitpid(helper, 0)
        parent_sock.close()
        raise


def _join_child(cfg: ContainerConfig, pid: int, pidfd: int, command: list[str], env: dict[str, str],
                stdio: tuple[int, int, int] | None, use_tty: bool, cg: CgroupSet | None, sock: socket.socket,
                parent_end: socket.socket, detach: bool) -> None:
    try:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        sock, sigfd = spawn.child_prologue(stdio, sock, parent_end, keep=[pidfd, *spawn.preserved(cfg)])
        spawn._process_limits(cfg)  # rlimits, OOM score (OCI only): while the host's stdlib is in reach
        if cg is not None:
            cg.join_self()  # before setns and fork: the command counts against the pids limit
        nsfds = []
        for name, nsfile in NAMESPACE_FILES.items():
            joined = (name == "NEWNET" and any(n.type == "netns" for n in cfg.networks)) or any(
                k == name for k, _p in cfg.namespace_joins)
            if name not in cfg.namespaces and not joined:
                continue
            # the pid namespace of PID 1's children: PID 1's own, or one joined by path (OCI)
            path = f"/proc/{pid}/ns/{'pid_for_children' if nsfile == 'pid' else nsfile}"
            if os.stat(path).st_ino == os.stat(f"/proc/self/ns/{nsfile}").st_ino:
                continue
            nsfds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), path))
        rootfd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # pidfd names the PID 1 that was checked: alive now, it still held pid when we opened its files
        if libc.wait_readable(pidfd, 0):
            raise StateError(f"pid {pid} (the container's PID 1) exited while joining it")
        os.close(pidfd)
        for fd, path in nsfds:
            libc.setns(fd, 0, path)
            os.close(fd)
        # setns(mnt) puts us at the namespace's root; the container's root is PID 1's, take it exactly
        os.fchdir(rootfd)
        os.chroot(".")
        os.close(rootfd)
        os.chdir("/")
        tty_path = None
        fds: list[int] = []
        slave = -1
        if use_tty:
            master, slave = os.openpty()
            tty_path = os.ttyname(slave)
            fds = [master]
        cmd = os.fork()
        if cmd == 0:
            os.close(sigfd)
            sock.close()
            if fds:
                os.close(fds[0])
            init.exec_command(cfg, command, env, tty_path)
        channel.send(sock, channel.Pid(cmd), fds=fds)
        for fd in [*fds, slave, *spawn.preserved(cfg)]:
            if fd >= 0:
                os.close(fd)
    except BaseException as e:
        init.main_fail(sock, e)
    if detach:
        os._exit(0)  # the command goes to the caller's subreaper, which reaps it
    # forward what reaches this helper to the command; leave with its status
    status = None
    while status is None:
        libc.wait_readable(sigfd, None)
        while (info := libc.read_signalfd(sigfd)) is not None:
            if info[0] == signal.SIGCHLD:
                with suppress(ChildProcessError):
                    p, st_ = os.waitpid(cmd, os.WNOHANG)
                    if p == cmd:
                        status = st_
            else:
                with suppress(ProcessLookupError):
                    os.kill(cmd, info[0])
    code, _sig = status_to_code(status)
    os._exit(code)


def join(state_dir: str | PathLike[str] | StateDir, command: Sequence[str], *, tty: bool | None = None,
         env: dict[str, str] | None = None, config: ContainerConfig | None = None) -> int:
    """Run ``command`` in the live container of state_dir with this process's stdio; its exit status.

    Blocks. Signals sent to the caller meanwhile are forwarded to the command; with a terminal the
    caller's stdin goes raw and is relayed (and restored on every way out).
    """
    init.block_signals()
    sigfd = libc.signalfd(init.ALL_SIGNALS, libc.SFD_CLOEXEC | libc.SFD_NONBLOCK)
    try:
        j = open_join(state_dir, command, tty=tty, env=env, config=config)
        waitfd = os.pidfd_open(j.pid)
        try:
            if j.console is None:
                forward_until_exit(sigfd, waitfd, j.signal, None)
            else:
                from . import console  # termios, tty, contextlib: only for a terminal

                with console.raw_mode(0):
                    console.copy_winsize(0, j.console)
                    forward_until_exit(sigfd, waitfd, j.signal, j.console)
        finally:
            os.close(waitfd)
        return j.wait().exit_code
    finally:
        os.close(sigfd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, init.ALL_SIGNALS)


def forward_until_exit(sigfd: int, waitfd: int, forward: Callable[[int], None], master: int | None) -> None:
    """Forward signals and relay the terminal until waitfd (a pidfd) says the process is gone."""
    relay = None
    if master is not None:
        from . import console  # termios, tty, contextlib: ~2 ms, only for a terminal

        relay = console.Relay(master)
    while True:
        p = select.poll()
        events: dict[int, int] = {sigfd: select.POLLIN, waitfd: select.POLLIN}
        for fd in relay.read_fds() if relay else []:
            events[fd] = events.get(fd, 0) | select.POLLIN
        for fd in relay.write_fds() if relay else []:
            events[fd] = events.get(fd, 0) | select.POLLOUT
        for fd, ev in events.items():
            p.register(fd, ev)
        ready = p.poll()
        # hang-ups and errors count as readable: the read that follows sees EOF or EIO
        r = [fd for fd, ev in ready if ev & (select.POLLIN | select.POLLHUP | select.POLLERR)]
        w = [fd for fd, ev in ready if ev & select.POLLOUT]
        if sigfd in r:
            while (info := libc.read_signalfd(sigfd)) is not None:
                signo = info[0]
                if signo == signal.SIGCHLD:
                    continue
                if signo == signal.SIGWINCH and master is not None:
                    from . import console

                    console.copy_winsize(0, master)
                    continue
                forward(signo)
        if relay:
            relay.pump(r, w)
        if waitfd in r:
            break
    if relay:
        relay.drain()
