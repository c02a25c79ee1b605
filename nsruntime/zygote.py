"""A small process that forks containers on behalf of a big one.

Every container's PID 1 is a fork of whoever creates it, and stays a Python process for the
container's whole life. Forked from a supervisor (trio, structlog, hundreds of programs' state),
each PID 1 starts out sharing the supervisor's pages, but the supervisor keeps writing to its own
objects (reference counts, the allocator), and every page it writes is copied: each PID 1 ends up
owning a private copy of most of the supervisor, several MiB of PSS per container.

The zygote is a fresh interpreter that imports only nsruntime and then does little but fork.
Its pages hardly change, so every PID 1 forked from it keeps sharing them. It makes PID 1 itself
with clone3 and CLONE_PARENT: PID 1 is born the caller's child (the caller waits for it as for
any other), in its namespaces and cgroup2 directory; and PID 1 leaves the container's setup to
the command's process, so it writes few pages of its own (spawn.zygote_clone, spawn._be_init).
With a user namespace, or without clone3, it forks a setup child that does it the long way (the
setup child exits, and PID 1 is reparented to the caller, a child subreaper). It dies with its
caller (PR_SET_PDEATHSIG).

Protocol, over a SOCK_SEQPACKET socketpair: one request per message, two JSON objects on two
lines plus four descriptors (the control socket's far end, stdin, stdout, stderr). The head is
all the zygote reads (clone flags, cgroup directories, network namespaces: spawn.zygote_header);
the body, the rest of the create() arguments, is decoded inside the container. No reply: the
caller hears Pid or Error (channel.py) over the control socket, and a request the zygote can't take
ends in that socket's EOF. One ``{"ok": true}`` once, when the zygote is ready.
"""

from __future__ import annotations

import os
import select
import sys

from .lean import dumps, loads, recv_fds, send_fds, suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    import subprocess
    from typing import Any
else:  # the C modules: signal.py and socket.py build enums at import (see lean.py)
    import _signal as signal
    import _socket as socket

MAX_MESSAGE = 1 << 20


class Zygote:
    """The caller's handle on a running zygote process."""

    #: How long a request may wait for the zygote to take it, and the hello for the zygote to say
    #: it: the socket buffer holds some tens of requests, then sendmsg waits. A zygote that is
    #: stopped or stuck must fail a create, not hang the caller (an event loop) for good.
    TIMEOUT = 10.0

    def __init__(self, pid: int, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None,
                 *, ready: bool | None = None) -> None:
        """proc: the zygote when it is our child; ready: whether its hello was taken already
        (default: only when it is not our child). A zygote that another process started for
        us (nsinitd's keeper) is given as pid and socket, ready=False."""
        self.pid = pid
        sock.settimeout(self.TIMEOUT)
        self._sock = sock
        self._proc = proc
        self._ready = proc is None if ready is None else ready

    @classmethod
    def start(cls) -> Zygote:
        """Start a zygote and wait until it is ready (a few tens of ms, once)."""
        z = cls.launch()
        z.wait_ready()
        return z

    @classmethod
    def launch(cls) -> Zygote:
        """Start a zygote without waiting for it: it boots while the caller goes on; wait_ready()
        (spawn() calls it) then takes its hello."""
        import subprocess  # here: the zygote process itself never needs it

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nsruntime.zygote", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            theirs.close()
        return cls(proc.pid, mine, proc)

    def wait_ready(self) -> None:
        """Take the hello the zygote says once its imports are done; SetupError (the zygote
        closed) if it never does."""
        if self._ready:
            return
        reply = self._read()
        if reply.get("ok") is not True:
            self.close()
            from .errors import SetupError

            raise SetupError("zygote", str(reply.get("error", "did not start")))
        self._ready = True

    def _read(self) -> dict[str, Any]:
        try:
            data = self._sock.recv(MAX_MESSAGE)
        except TimeoutError:
            return {"error": f"zygote (pid {self.pid}) did not start within {self.TIMEOUT:g} s"}
        if not data:
            return {"error": f"zygote (pid {self.pid}) exited"}
        reply = loads(data)
        return reply if isinstance(reply, dict) else {"error": "bad reply"}

    def spawn(self, head: dict[str, Any], body: dict[str, Any], fds: list[int]) -> None:
        """Have the zygote make PID 1 with these arguments and descriptors (no waiting: PID 1, or
        the setup child, reports over the control socket among fds). head is what the zygote
        reads (spawn.zygote_header), body what the container's own process decodes."""
        from .errors import SetupError

        self.wait_ready()
        try:
            send_fds(self._sock, (dumps(head) + "\n" + dumps(body)).encode(), fds)
        except OSError as e:
            why = e.strerror or f"did not take the request within {self.TIMEOUT:g} s"
            raise SetupError("zygote", f"pid {self.pid}: {why}") from None

    def alive(self) -> bool:
        return self._proc is None or self._proc.poll() is None

    def close(self) -> None:
        """Stop the zygote and reap it (bounded). Closing the socket lets it reap its last setup
        children and leave; SIGKILL if it doesn't (it blocks every other signal)."""
        import subprocess

        self._sock.close()
        if self._proc is not None:
            for sig in (None, signal.SIGKILL):
                if sig is not None:
                    with suppress(ProcessLookupError):
                        self._proc.send_signal(sig)
                try:
                    self._proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    continue


def serve(sock: socket.socket) -> None:
    """The zygote's loop: one fork per request, until the caller closes its end.

    The zygote itself does as little as it can around each fork: every page it writes after a
    fork is copied, so it reads only the request's head (spawn.zygote_clone).
    """
    import gc

    from . import init, libc, spawn  # (spawn imports config, rootfs...: shared with every PID 1)

    os.setsid()  # PID 1s inherit these three (spawn.zygote_clone)
    init.block_signals()
    sigfd = libc.signalfd(init.ALL_SIGNALS, libc.SFD_CLOEXEC | libc.SFD_NONBLOCK)
    gc.disable()
    gc.freeze()  # from here on the pages stay as they are, shared with every PID 1
    sock.send(b'{"ok": true}')
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    setup_children = 0  # forked and not yet reaped: they run side by side, several containers at once
    while True:
        while setup_children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                setup_children = 0
                break
            if pid == 0:
                break
            setup_children -= 1
        if setup_children and not poller.poll(20):
            continue  # no request: look for exited setup children again
        try:
            data, fds = recv_fds(sock, MAX_MESSAGE, 4)
        except OSError:
            data, fds = b"", []
        if not data:  # the caller is done: wait for the last setup children (they only fork and leave)
            with suppress(ChildProcessError):
                while True:
                    os.waitpid(-1, 0)
            return
        # (a request without its four descriptors is the caller's bug: closing what came ends its
        # wait, with EOF on the control socket)
        if len(fds) == 4 and spawn.zygote_clone(data, fds, sigfd) == 0:
            child = os.fork()
            if child == 0:
                sock.close()
                spawn.zygote_child(data, (fds[1], fds[2], fds[3]), socket.socket(fileno=fds[0]))
            setup_children += 1
        for fd in fds:
            with suppress(OSError):
                os.close(fd)


PID1_TITLE = b"nsinit-init"


def retitle(title: bytes) -> None:
    """Make /proc/self/cmdline (what ps and top show) read ``title``, not the interpreter's path
    and ``-m nsruntime.zygote FD`` (or nsrun's arguments): every container PID 1 is a fork of this
    process and inherits it. PR_SET_MM_ARG_START would need CAP_SYS_RESOURCE; the argv area itself is ours to write.
    Its last byte is left non-NUL, so the kernel reads the title up to its NUL (as for
    setproctitle) instead of the whole area with NUL padding."""
    import ctypes

    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49
    size = end - start
    if size < len(title) + 2:
        return
    ctypes.memmove(start, title + b"\0" + b" " * (size - len(title) - 1), size)


def main() -> None:
    from . import libc
    from .errors import NsRuntimeError

    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    with suppress(OSError, ValueError, IndexError):
        retitle(PID1_TITLE)
    with suppress(NsRuntimeError):
        libc.set_process_name("nsinit-zygote")  # comm; each PID 1 names itself nsinit-init
    sock = socket.socket(fileno=int(sys.argv[1]))
    if os.getppid() == 1:
        os._exit(0)  # the caller died before the death signal was armed
    serve(sock)
    os._exit(0)


if __name__ == "__main__":
    main()
