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
stdin, stdout, stderr); one reply per request, ``{"ok": true}`` once the setup child has forked
PID 1 and exited, or ``{"error": "..."}``.
"""

from __future__ import annotations

import os
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

    @classmethod
    def start(cls) -> Zygote:
        """Start a zygote: a new interpreter running this module (a few ms, once)."""
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
        z = cls(proc.pid, mine, proc)
        reply = z._read()  # it says hello once its imports are done: nothing is forked before
        if reply.get("ok") is not True:
            z.close()
            from .errors import SetupError

            raise SetupError("zygote", str(reply.get("error", "did not start")))
        return z

    def _read(self) -> dict[str, Any]:
        data = self._sock.recv(MAX_MESSAGE)
        if not data:
            return {"error": f"zygote (pid {self.pid}) exited"}
        reply = loads(data)
        return reply if isinstance(reply, dict) else {"error": "bad reply"}

    def spawn(self, request: dict[str, Any], fds: list[int]) -> None:
        """Have the zygote fork a setup child with these arguments and descriptors."""
        from .errors import SetupError

        try:
            send_fds(self._sock, dumps(request).encode(), fds)
            reply = self._read()
        except OSError as e:
            raise SetupError("zygote", f"pid {self.pid}: {e.strerror}") from None
        if reply.get("ok") is not True:
            raise SetupError("zygote", str(reply.get("error")))

    def alive(self) -> bool:
        return self._proc is None or self._proc.poll() is None

    def close(self) -> None:
        """Stop the zygote and reap it (bounded)."""
        import subprocess

        self._sock.close()
        if self._proc is not None:
            with suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


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
    ok = b'{"ok": true}'
    sock.send(ok)
    while True:
        try:
            data, fds = recv_fds(sock, MAX_MESSAGE, 4)
        except OSError:
            return
        if not data:
            return
        if len(fds) != 4:
            for fd in fds:
                with suppress(OSError):
                    os.close(fd)
            reply = dumps({"error": f"expected 4 descriptors, got {len(fds)}"}).encode()
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
            # the setup child only unshares and forks PID 1: reaping it here keeps us simple
            os.waitpid(child, 0)
            reply = ok
        try:
            sock.send(reply)
        except OSError:
            return


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
