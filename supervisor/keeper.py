"""The keeper: one small process per state_dir that is the parent of every program and outlives nsinitd.

nsinitd (trio, structlog, every program's state) is the part most likely to die: a bug, the OOM
killer, an upgrade. Whatever is a process's parent reaps it and learns its exit status; whoever holds
the read end of its stdout pipe decides whether it gets SIGPIPE. So neither may be nsinitd if the
programs are to outlive it. The keeper is both, and does nothing else:

- it is started by nsinitd in a session of its own (no terminal's ^C, no death signal tied to
  nsinitd), and is a child subreaper: plain programs are forked here, container PID 1s are cloned
  by a zygote that is the keeper's child (with CLONE_PARENT: PID 1 is born the keeper's child),
  and every orphan below them comes back here to be reaped;
- it holds a duplicate of each program's pipe read ends (and a container's control socket, over
  which PID 1 reports the command's status), so that nsinitd's death closes nothing the programs
  write to. While no nsinitd is attached it drains the pipes itself, appending to the programs'
  capture files (no rotation meanwhile), so a program never blocks on a full pipe nor gets
  SIGPIPE; an attached nsinitd reads them and the keeper stays away (one reader at a time, so no
  line is split between two writers of a file);
- it reaps and keeps each program's wait status until nsinitd says it has seen it (``forget``).

It is a fresh interpreter importing the standard library only (no trio): its pages stay few and
its loop is a plain poll(2).

Protocol: SOCK_SEQPACKET, one JSON object per message, descriptors with SCM_RIGHTS. The first
nsinitd talks over a socketpair made when it starts the keeper; a later one connects to
``state_dir/keeper.sock`` (0600 in the 0700 state_dir; the peer must be our uid). One nsinitd at a
time: the state_dir lock already makes it so, and a second connection waits until the first
closes. Each request ``{"op": ...}`` gets exactly one reply ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}``, in order; between them the keeper may send notices
``{"exited": NAME, "pid": PID, "status": WAIT_STATUS}``.

- ``hello``: ``{"version", "pid", "start", "cgroup"}``; ``version`` is :data:`PROTOCOL`.
- ``spawn`` (fds: stdin, stdout, stderr, then the read ends to hold): fork and exec a plain
  program; ``{"pid", "start"}`` and its pidfd, or the exec error.
- ``hold`` (fds: the read ends and the control socket): a container's PID 1, already our child.
- ``list``: ``{"programs": [record, ...]}``; ``take NAME``: a record and its descriptors (pidfd
  first when the program still runs, then those held), names in ``"fds"``.
- ``forget NAME``: its exit was seen and its leftovers released: drop the record.
- ``zygote`` (fd: the zygote's end of a socketpair): start ``nsruntime.zygote`` as our child.
- ``quit``: exit once every child is gone (an ordered shutdown has stopped the programs).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

#: Bumped whenever a message or the state_dir layout changes meaning; an nsinitd refuses a keeper
#: (and a state_dir) of another version instead of misreading it.
PROTOCOL = 1
SOCKET_NAME = "keeper.sock"
MAX_MESSAGE = 1 << 20
MAX_FDS = 8
#: Read ends are enlarged to this (F_SETPIPE_SZ; /proc/sys/fs/pipe-max-size is the ceiling without
#: CAP_SYS_RESOURCE): what a program can write in the instant between nsinitd's death and the keeper
#: noticing it, and what an attached nsinitd may fall behind, before the program's write blocks.
PIPE_SIZE = 1 << 20
#: Statuses of children reaped before anyone said whose they are (a PID 1 that died before
#: ``hold``); the oldest are dropped beyond this.
UNCLAIMED_MAX = 1024


# -- the child side of a plain program's fork -----------------------------------------------------


def exec_child(argv: Sequence[str], env: Mapping[str, str], stdio: tuple[int, int, int],
               cgroup_fd: int, errw: int, cwd: str | None) -> NoReturn:
    """In a freshly forked child: own session, the program's cgroup (before exec, so nothing it
    forks escapes), stdio, signals and mask reset (CPython ignores SIGPIPE and SIGXFSZ, and that
    survives exec), every other descriptor closed, exec. A failure is written to errw as
    ``errno NUL step: message``; the child then exits 127."""
    step = "setsid"
    try:
        os.setsid()
        if cgroup_fd >= 0:
            step = "join cgroup"
            os.write(cgroup_fd, b"0")
        step = "stdio"
        for target, fd in enumerate(stdio):
            os.dup2(fd, target, inheritable=True)
        step = "signals"
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for sig in range(1, signal.NSIG):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        step = "close fds"
        os.closerange(3, errw)
        os.closerange(errw + 1, 1 << 20)
        if cwd is not None:
            step = f"chdir {cwd}"
            os.chdir(cwd)
        step = f"exec {argv[0]}"
        os.execvpe(argv[0], list(argv), dict(env))
    except BaseException as e:
        try:
            err = e.errno if isinstance(e, OSError) and e.errno else 0
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            os.write(errw, f"{err}\0{step}: {msg}".encode())
        finally:
            os._exit(127)
    os._exit(127)


#: RLIMIT_NOFILE as the keeper got it: it raises its own soft limit (it holds up to three
#: descriptors per program), and its children get the one they would have had from nsinitd.
_NOFILE: tuple[int, int] | None = None


def _raise_nofile() -> None:
    global _NOFILE
    import resource

    _NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_NOFILE[1], _NOFILE[1]))
    except (OSError, ValueError):
        pass


def _restore_nofile() -> None:
    if _NOFILE is not None:
        import resource

        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, _NOFILE)
        except (OSError, ValueError):
            pass


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), split after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[19])


def enlarge_pipe(fd: int) -> None:
    """Best effort: a smaller pipe only means a smaller bound (see PIPE_SIZE)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError):
        pass


# -- messages -------------------------------------------------------------------------------------


def send(sock: socket.socket, msg: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its descriptors (close-on-exec); (None, []) at EOF."""
    data, anc, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds += struct.unpack(f"{n}i", payload[: n * 4])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    msg = json.loads(data)
    return (msg if isinstance(msg, dict) else {}), fds


# -- the keeper -----------------------------------------------------------------------------------


class Held:
    """One program the keeper is the parent of."""

    def __init__(self, name: str, kind: str, pid: int, start: int | None, digest: str,
                 logs: dict[str, str], fds: dict[str, int]) -> None:
        self.name = name
        self.kind = kind  # "plain" | "container"
        self.pid = pid
        self.start = start
        self.digest = digest  # of the program's config when it was started: a changed one is restarted
        self.spawned_at = time.time()
        self.logs = logs  # stream -> capture file, drained into while no nsinitd is attached
        self.fds = fds  # out, err (pipe read ends), ctl (a container's control socket)
        self.status: int | None = None

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "pid": self.pid, "start": self.start,
                "digest": self.digest, "spawned_at": self.spawned_at, "status": self.status}

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}


class Keeper:
    def __init__(self, state_dir: str, client: socket.socket | None, cgroup_parent: str | None) -> None:
        self.state_dir = state_dir
        self.client = client
        self.held: dict[str, Held] = {}
        self.unclaimed: dict[int, int] = {}
        self.quitting = False
        self.cgroup = self._make_cgroup(cgroup_parent)
        self.listener = self._listen()
        self._sigr, sigw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(sigw, False)
        signal.set_wakeup_fd(sigw)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears it
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)

    def _make_cgroup(self, parent: str | None) -> str | None:
        """``PARENT/nsinit-keeper-<pid>-<start ticks>``: where the plain programs' cgroups go. Named
        after the keeper, so a later nsinitd removes it only once the keeper is gone."""
        if not parent:
            return None
        path = os.path.join(parent, f"nsinit-keeper-{os.getpid()}-{start_ticks(os.getpid())}")
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError as e:
            print(f"nsinit-keeper: no cgroup tracking: mkdir({path}): {e.strerror}", file=sys.stderr)
            return None
        return path

    def _listen(self) -> socket.socket:
        dfd = os.open(self.state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            path = f"/proc/self/fd/{dfd}/{SOCKET_NAME}"  # short, whatever the state_dir's length
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(4)
            return sock
        finally:
            os.close(dfd)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            self.reap()
            if (self.quitting or (self.client is None and not self.held)) and self._no_children():
                return  # told to, or detached with nothing left to keep
            poller = select.poll()
            poller.register(self._sigr, select.POLLIN)
            if self.client is not None:
                poller.register(self.client.fileno(), select.POLLIN)
            else:
                poller.register(self.listener.fileno(), select.POLLIN)
                for h in self.held.values():
                    for stream in ("out", "err"):
                        if stream in h.fds:
                            poller.register(h.fds[stream], select.POLLIN)
            for fd, _ev in poller.poll(2000 if self.quitting else None):
                if fd == self._sigr:
                    try:
                        while os.read(self._sigr, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif self.client is not None and fd == self.client.fileno():
                    self._serve_one()
                elif self.client is None and fd == self.listener.fileno():
                    self._accept()
                elif self.client is None:
                    self._drain(fd)

    def _no_children(self) -> bool:
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return False

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            h = next((h for h in self.held.values() if h.pid == pid and h.status is None), None)
            if h is None:
                self.unclaimed[pid] = status
                while len(self.unclaimed) > UNCLAIMED_MAX:
                    del self.unclaimed[next(iter(self.unclaimed))]
                continue
            self._exited(h, status)

    def _exited(self, h: Held, status: int) -> None:
        h.status = status
        if self.client is not None:
            try:
                send(self.client, {"exited": h.name, "pid": h.pid, "status": status})
            except OSError:
                self._detach()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.geteuid():
            conn.close()
            return
        self.client = conn

    def _detach(self) -> None:
        """nsinitd is gone (died, or left its programs running): the keeper drains from now on."""
        if self.client is not None:
            self.client.close()
            self.client = None

    def _drain(self, fd: int) -> None:
        for h in self.held.values():
            for stream in ("out", "err"):
                if h.fds.get(stream) != fd:
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:  # every writer is gone: nothing more will come
                    os.close(h.fds.pop(stream))
                    return
                path = h.logs.get(stream)
                if path:
                    try:
                        out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                        try:
                            os.write(out, data)
                        finally:
                            os.close(out)
                    except OSError as e:
                        print(f"nsinit-keeper: {h.name}: {path}: {e.strerror}", file=sys.stderr)
                return

    # -- requests ---------------------------------------------------------------------------------

    def _serve_one(self) -> None:
        assert self.client is not None
        try:
            msg, fds = receive(self.client)
        except (OSError, ValueError):
            msg, fds = None, []
        if msg is None:
            self._detach()
            return
        op = msg.get("op")
        handler = OPS.get(op) if isinstance(op, str) else None
        out: list[int] = []
        owned: list[int] = []  # sent, then closed here: the receiver has its own copies
        try:
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            reply, out, owned = handler(self, msg, fds)
        except Exception as e:  # one bad request must not take every program's parent down
            reply = {"ok": False, "error": f"{op}: {type(e).__name__}: {e}"}
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            send(self.client, reply, out)
        except OSError:
            self._detach()
        finally:
            for fd in owned:
                os.close(fd)

    def op_hello(self, msg: dict[str, Any], fds: list[int]) -> Answer:
        return {"ok": True, "version": PROTOCOL, "pid": os.getpid(), "start": start_ticks(os.getpid()),
                "cgroup": self.cgroup}, [], []

    def op_list(self, msg: dict[str, Any], fds: list[int]) -> Answer:
        return {"ok": True, "programs": [h.record() for h in self.held.values()]}, [], []

    def op_take(self, msg: dict[str, Any], fds: list[int]) -> Answer:
        h = self.held.get(str(msg.get("name")))
        if h is None:
            return {"ok": False, "error": f"no program {msg.get('name')!r} held"}, [], []
        names, out = [], []
        if h.status is None:
            try:
                out.append(os.pidfd_open(h.pid))  # our unreaped child: this pid is that process
                names.append("pidfd")
            except OSError:
                pass
        for key in ("out", "err", "ctl"):
            if key in h.fds:
                names.append(key)
                out.append(h.fds[key])
        return {"ok": True, **h.record(), "fds": names}, out, out[:1] if names[:1] == ["pidfd"] else []

    def op_forget(self, msg: dict[str, Any], fds: list[int]) -> Answer:
        h = self.held.pop(str(msg.get("name")), None)
        if h is not None:
            h.close()
        return {"ok": True}, [], []

    def _logs(self, msg: dict[str, Any]) -> dict[str, str]:
        logs = msg.get("logs")
        return {str(k): str(v) for k, v in logs.items()} if isinstance(logs, dict) else {}

    def _replace(self, name: str) -> None:
        old = self.held.pop(name, None)
        if old is not None:
            old.close()

    def op_spawn(self, msg: dict[str, Any], fds: list[int]) -> Answer:
        """fds: stdin, stdout, stderr (closed here once the child has them), then the read ends."""
        name = str(msg["name"])
        stdio, keep = fds[:3], fds[3:]
        cgroup_fd = -1
        try:
            if msg.get("cgroup"):
                os.makedirs(msg["cgroup"], exist_ok=True)
                cgroup_fd = os.open(os.path.join(msg["cgroup"], "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
            errr, errw = os.pipe2(os.O_CLOEXEC)
            try:
                pid = os.fork()
                if pid == 0:
                    _restore_nofile()
                    exec_child(msg["argv"], msg["env"], (stdio[0], stdio[1], stdio[2]), cgroup_fd, errw,
                               msg.get("cwd"))
            finally:
                os.close(errw)
            pidfd = os.pidfd_open(pid)  # before anything can reap it: this is that process
            report = b""
            while chunk := os.read(errr, 4096):
                report += chunk
            os.close(errr)
        finally:
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
            for fd in stdio:
                os.close(fd)
        if report:
            os.close(pidfd)
            for fd in keep:
                os.close(fd)
            os.waitpid(pid, 0)
            return {"ok": False, "error": report.decode(errors="replace").partition("\0")[2]}, [], []
        self._replace(name)
        held = dict(zip(("out", "err"), keep, strict=False))
        self.held[name] = Held(name, "plain", pid, start_ticks(pid), str(msg.get("digest", "")), self._logs(msg), held)
        return {"ok": True, "pid": pid, "start": self.held[name].start}, [pidfd], [pidfd]

    def op_hold(self, msg: dict[str, Any], fds: list[int]) -> Answer:
        """A container's PID 1 (cloned as our child by the zygote); fds named by ``fds``."""
        name, pid = str(msg["name"]), int(msg["pid"])
        names = [str(n) for n in msg.get("fds", [])]
        self._replace(name)
        h = Held(name, "container", pid, start_ticks(pid), str(msg.get("digest", "")), self._logs(msg),
                 dict(zip(names, fds, strict=False)))
        self.held[name] = h
        if pid in self.unclaimed:  # it died before we were told whose it is
            self._exited(h, self.unclaimed.pop(pid))
        return {"ok": True, "start": h.start}, [], []

    def op_zygote(self, msg: dict[str, Any], fds: list[int]) -> Answer:
        (fd,) = fds
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    _restore_nofile()
                    os.set_inheritable(fd, True)
                    os.closerange(3, fd)
                    os.closerange(fd + 1, 1 << 20)
                    signal.pthread_sigmask(signal.SIG_SETMASK, ())
                    for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
                        signal.signal(sig, signal.SIG_DFL)
                    os.execv(sys.executable, [sys.executable, "-m", "nsruntime.zygote", str(fd)])
                finally:
                    os._exit(127)
        finally:
            os.close(fd)
        return {"ok": True, "pid": pid}, [], []

    def op_quit(self, msg: dict[str, Any], fds: list[int]) -> Answer:
        """After nsinitd's ordered shutdown every program is gone; one still running is one nsinitd
        lost track of (a spawn cut short), and the keeper would wait for it forever: it is killed."""
        self.quitting = True
        for h in self.held.values():
            if h.status is None:  # our unreaped child: this pid is that process
                try:
                    os.kill(h.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        root = self.cgroup or ""
        for sub in os.listdir(root) if root else []:
            try:
                with open(os.path.join(root, sub, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:  # not a directory, or no cgroup.kill
                pass
        return {"ok": True}, [], []

    def close(self) -> None:
        try:
            os.unlink(os.path.join(self.state_dir, SOCKET_NAME))
        except OSError:
            pass
        if self.cgroup is not None:
            try:
                for sub in os.listdir(self.cgroup):
                    if os.path.isdir(os.path.join(self.cgroup, sub)):
                        os.rmdir(os.path.join(self.cgroup, sub))
                os.rmdir(self.cgroup)
            except OSError:
                pass


#: A reply, the descriptors sent with it, and those of them the keeper closes once sent.
Answer = tuple[dict[str, Any], list[int], list[int]]
OPS: dict[str, Callable[[Keeper, dict[str, Any], list[int]], Answer]] = {
    "hello": Keeper.op_hello, "list": Keeper.op_list, "take": Keeper.op_take, "forget": Keeper.op_forget,
    "spawn": Keeper.op_spawn, "hold": Keeper.op_hold, "zygote": Keeper.op_zygote, "quit": Keeper.op_quit,
}  # fmt: skip


def main(argv: Sequence[str]) -> None:
    """``python -m supervisor.keeper STATE_DIR FD [CGROUP_PARENT]``; FD: nsinitd's socketpair end."""
    from nsruntime import set_subreaper  # the one owner of prctl

    try:
        set_subreaper()
    except OSError as e:
        print(f"nsinit-keeper: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        with open("/proc/self/comm", "w") as f:
            f.write("nsinit-keeper")
    except OSError:
        pass
    _raise_nofile()
    state_dir, fd = argv[0], int(argv[1])
    keeper = Keeper(state_dir, socket.socket(fileno=fd), argv[2] if len(argv) > 2 else None)
    try:
        keeper.run()
    finally:
        keeper.close()


if __name__ == "__main__":
    main(sys.argv[1:])
