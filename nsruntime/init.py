"""PID 1 of the container, and the last steps of every command started in it.

Like tini: signals are blocked from birth and read from a signalfd, so nothing that arrives before
the command exists is lost; every signal but SIGCHLD is forwarded to the command; every child
that reaches PID 1 is reaped at once on SIGCHLD; PID 1 exits with the command's status (its exit
code, or 128+N when signal N killed it). Only the standard library is used here: this code runs
in every container.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import sys

from . import apparmor, capabilities, channel, libc
from .errors import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_RUNTIME_FAILED, NsRuntimeError
from .lean import suppress
from .signals import status_to_code

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket

    from .config import ContainerConfig
else:  # the C modules: signal.py and socket.py build enums at import (see lean.py)
    import _signal as signal
    import _socket as socket

# every signal a process can catch; glibc reserves 32 and 33 for its threads (Python refuses them)
ALL_SIGNALS = [s for s in range(1, signal.NSIG) if s not in (signal.SIGKILL, signal.SIGSTOP, 32, 33)]


def block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, ALL_SIGNALS)


def reset_signals() -> None:
    """Default dispositions and an empty mask: both survive exec, and CPython ignores SIGPIPE/SIGXFSZ."""
    with suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for s in ALL_SIGNALS:
        # the interpreter records every disposition (read at its start, changed only through it):
        # one sigaction for each that isn't the default, not sixty on the way to every command
        if signal.getsignal(s) != signal.SIG_DFL:
            with suppress(OSError, ValueError):
                signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


# no imports from here on: this runs after pivot_root, where the host's stdlib is out of reach
_TIOCSCTTY = 0x540E  # termios.TIOCSCTTY on x86_64 and aarch64 (termios itself is not imported for it)
def _lookup_user(spec: str) -> tuple[int, int, list[int], str | None]:
    """uid[:gid] or name[:group] against the container's own /etc/passwd and /etc/group."""
    user, _, group = spec.partition(":")
    passwd: list[list[str]] = []
    groups: list[list[str]] = []
    with suppress(OSError), open("/etc/passwd") as f:
        passwd = [line.rstrip("\n").split(":") for line in f if line.count(":") >= 6]
    with suppress(OSError), open("/etc/group") as f:
        groups = [line.rstrip("\n").split(":") for line in f if line.count(":") >= 3]
    home = None
    if user.isdigit():
        uid = int(user)
        gid = uid
        name = None
        for p in passwd:
            if p[2] == user:
                name, gid, home = p[0], int(p[3]), p[5]
                break
    else:
        for p in passwd:
            if p[0] == user:
                name, uid, gid, home = p[0], int(p[2]), int(p[3]), p[5]
                break
        else:
            raise NsRuntimeError(f'user: no user "{user}" in the container\'s /etc/passwd')
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            for g in groups:
                if g[0] == group:
                    gid = int(g[2])
                    break
            else:
                raise NsRuntimeError(f'user: no group "{group}" in the container\'s /etc/group')
    extra = [int(g[2]) for g in groups if name and name in g[3].split(",") and int(g[2]) != gid]
    return uid, gid, extra, home


def exec_command(cfg: ContainerConfig, argv: list[str], env: dict[str, str], tty_path: str | None) -> None:
    """The last steps before execve, in the command's own process; never returns.

    Failures print one line on stderr and exit 125 (setup), 126 (not executable) or 127 (not found).
    """
    try:
        reset_signals()
        if tty_path is not None:
            os.setsid()
            fd = os.open(tty_path, os.O_RDWR)
            fcntl.ioctl(fd, _TIOCSCTTY, 0)
            for n in (0, 1, 2):
                os.dup2(fd, n)
            if fd > 2:
                os.close(fd)
        ids = _lookup_user(cfg.user) if cfg.user else None
        if ids and ids[3] and "HOME" not in env:
            env = {**env, "HOME": ids[3]}
        if cfg.personality is not None:
            libc.personality(cfg.personality)  # (before the seccomp filter, which may allow only some)
        if cfg.apparmor_profile:
            apparmor.apply(cfg.apparmor_profile)
        if cfg.no_new_privileges:
            libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        elif cfg.seccomp is not None:
            cfg.seccomp.load()  # without no_new_privs the kernel wants CAP_SYS_ADMIN: before the drop
        sets = cfg.capability_sets
        if sets is None:
            capabilities.drop(cfg.capabilities_mask)
        else:
            capabilities.limit_bounding(sets.bounding)
        if ids:
            uid, gid, extra, _home = ids
            if cfg.additional_gids is not None:
                extra = list(cfg.additional_gids)
            if sets is not None:
                libc.prctl(libc.PR_SET_KEEPCAPS, 1)  # the permitted set survives setuid; it is set next
            os.setgroups(extra)
            os.setgid(gid)
            os.setuid(uid)
        if sets is not None:
            capabilities.set_sets(sets.effective, sets.permitted, sets.inheritable, sets.ambient)
        try:
            os.chdir(cfg.working_dir)
        except OSError as e:
            raise NsRuntimeError(f"working_dir: {cfg.working_dir}: {e.strerror}") from None
        for fd in range(3, 3 + cfg.preserve_fds):  # the caller's, passed on as they are numbered
            os.set_inheritable(fd, True)
        libc.close_range(3 + cfg.preserve_fds)
        if cfg.seccomp is not None and cfg.no_new_privileges:
            cfg.seccomp.load()  # last: the filter sees the command's calls (and execve), not ours
    except (NsRuntimeError, OSError) as e:
        _die(EXIT_RUNTIME_FAILED, f"nsinit: {e}")
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        code = EXIT_NOT_FOUND if e.errno in (errno.ENOENT, errno.ENOTDIR) else EXIT_NOT_EXECUTABLE
        _die(code, f'nsinit: exec "{argv[0]}": {e.strerror}')


def _die(code: int, message: str) -> None:
    with suppress(OSError):
        os.write(2, (message + "\n").encode(errors="replace"))
    os._exit(code)


def serve(sock: socket.socket, sigfd: int, cmd_pid: int, die_with_parent: bool, pidns: bool) -> None:
    """PID 1's loop from the command's fork on; exits the process with the command's status.

    The socket is only watched for the creator hanging up, never read: what the creator sends
    (Go, Start) is for the command's process while it sets the container up.
    """
    poller = select.poll()
    poller.register(sigfd, select.POLLIN)
    poller.register(sock.fileno(), select.POLLRDHUP)
    status: int | None = None
    while status is None:
        for fd, _ev in poller.poll():
            if fd == sigfd:
                while (info := libc.read_signalfd(sigfd)) is not None:
                    signo = info[0]
                    if signo == signal.SIGCHLD:
                        status = _reap(cmd_pid, status)
                    else:
                        with suppress(ProcessLookupError):
                            os.kill(cmd_pid, signo)
            else:
                poller.unregister(fd)
                if die_with_parent:
                    # whoever created us is gone: take the container down with it
                    with suppress(ProcessLookupError):
                        os.kill(-1 if pidns else cmd_pid, signal.SIGKILL)
    code, sig = status_to_code(status)
    with suppress(OSError):
        channel.send(sock, channel.Exited(code, sig or 0))
    os._exit(code)


def _reap(cmd_pid: int, status: int | None) -> int | None:
    """Reap every child that has exited; returns the command's status once it is among them."""
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == cmd_pid:
            status = st


def main_fail(sock: socket.socket, err: BaseException) -> None:
    """Report a setup failure to the creator and leave (never returns)."""
    msg = str(err) if isinstance(err, NsRuntimeError | OSError) else f"{type(err).__name__}: {err}"
    with suppress(OSError):
        channel.send(sock, channel.Error(msg))
    if not isinstance(err, NsRuntimeError | OSError):
        try:
            import traceback  # not there once the root is switched: then the one line must do
        except ImportError:
            sys.stderr.write(f"nsinit: {msg}\n")
        else:
            traceback.print_exception(err, file=sys.stderr)
    os._exit(EXIT_RUNTIME_FAILED)
