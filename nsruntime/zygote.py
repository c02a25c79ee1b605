"""A small process that forks containers on behalf of a big one.

Every container's PID 1 is a fork of whoever creates it, and stays a Python process for the
container's whole life. Forked from a supervisor (trio, structlog, hundreds of programs' state),
each PID 1 starts out sharing the supervisor's pages, but the supervisor keeps writing to its own
objects (reference counts, the allocator), and every page it writes is copied: each PID 1 ends up
owning a private copy of most of the supervisor, several MiB of PSS per container.

The zygote is a fresh interpreter that imports only nsruntime and then does nothing but fork.
Its pages never change, so every PID 1 forked from it keeps sharing them. It is started before
the caller creates containers, is not a child subreaper (so a PID 1 whose setup child exits is
reparented to the caller, which is one, and which then waits for it as usual), and dies with
its caller (PR_SET_PDEATHSIG).

Protocol, over a SOCK_SEQPACKET socketpair: one request per message, a JSON object with the
create() arguments plus four descriptors (the setup child's end of the control socketpair,
stdin, stdout, stderr). No reply: the caller doesn't wait for the zygote, it hears from the setup
child over the control socket ("pid N" or "error ..."), and a request the zygote can't take ends
in the control socket's EOF. One ``{"ok": true}`` once, when the zygote is ready.
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

    def __init__(self, pid: int, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._sock = sock
        self._proc = proc
        self._ready = proc is None

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
        data = self._sock.recv(MAX_MESSAGE)
        if not data:
            return {"error": f"zygote (pid {self.pid}) exited"}
        reply = loads(data)
        return reply if isinstance(reply, dict) else {"error": "bad reply"}

    def spawn(self, request: dict[str, Any], fds: list[int]) -> None:
        """Have the zygote fork a setup child with these arguments and descriptors (no waiting:
        the setup child reports over the control socket among fds)."""
        from .errors import SetupError

        self.wait_ready()
        try:
            send_fds(self._sock, dumps(request).encode(), fds)
        except OSError as e:
            raise SetupError("zygote", f"pid {self.pid}: {e.strerror}") from None

    def alive(self) -> bool:
        return self._proc is None or self._proc.poll() is None

    def close(self) -> None:
        """Stop the zygote and reap it (bounded). Closing the socket lets it reap its last setup
        children and leave; SIGTERM, then SIGKILL, if it doesn't."""
        import subprocess

        self._sock.close()
        if self._proc is not None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
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
    fork is copied into each PID 1 forked before, so the request is decoded by the child.
    """
    import gc

    from . import cgroups, container, init
    from .config import parse

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
        if len(fds) != 4:  # the caller's bug: closing what came ends its wait (EOF on the control socket)
            for fd in fds:
                with suppress(OSError):
                    os.close(fd)
        else:
            child = os.fork()
            if child == 0:
                sock.close()
                child_sock = socket.socket(fileno=fds[0])
                try:
                    req = loads(data)
                    cfg = parse(req["source"])
                    cg = cgroups.from_paths(req["cgroups"]) if req["cgroups"] else None
                except BaseException as e:  # reported to the creator, which is waiting on child_sock
                    init.main_fail(child_sock, e)
                container._setup_child(cfg, req["root"], req["command"], req["env"], (fds[1], fds[2], fds[3]),
                                       req["tty"], cg, child_sock, None, req["die_with_parent"])
            for fd in fds:
                os.close(fd)
            setup_children += 1


def main() -> None:
    from . import libc

    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    sock = socket.socket(fileno=int(sys.argv[1]))
    if os.getppid() == 1:
        os._exit(0)  # the caller died before the death signal was armed
    serve(sock)
    os._exit(0)


if __name__ == "__main__":
    main()
