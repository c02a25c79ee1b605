"""The verbs: create, start, signal, kill, poll/wait, destroy, and join.

Processes (host view)::

    caller ──clone3(CLONE_NEW*, CLONE_INTO_CGROUP)──► PID 1 (init.py) ──fork──► command's process
       └── talks over a socketpair: "go" ──►, ◄── "ready" (+ pty master), "start" ──►, ◄── "exited C S"

PID 1 is born in its namespaces and cgroup2 directory, enters the v1 hierarchies itself, forks
the command's process at once and from then on only forwards signals and reaps (init.serve).
The command's process sets the container up (root, /proc, /dev, hostname, lo, masks), says
"ready", waits for "start" and execs the command: PID 1 then writes few pages of its own, and
pivot_root, done by its child, moves PID 1's root and working directory along with it.
With a zygote (nsinitd's containers, see zygote.py), the zygote makes PID 1 the same way, with
CLONE_PARENT so that it is the caller's child. With NEWUSER (the id maps are written between
the user namespace and the others) or on a kernel without clone3 into a cgroup, a setup child
makes PID 1 in two steps:

    caller ──fork──► setup child ──unshare(...)──fork──► PID 1
       ▲                 └── says "pid N" and exits; PID 1 is reparented to the caller (a child subreaper)

The caller stays single-threaded across fork (trio's loop is), and no namespace of the caller
ever changes. Creating (namespaces, cgroups, network, root in place, pid file written) and
starting the command are separate steps, as the OCI runtime commands will need. ``join`` enters
a live container's namespaces, root and cgroups from a new child and runs one more command there.
"""

from __future__ import annotations

import fcntl
import gc
import os
import select
import time

from . import apparmor, cgroups, init, libc, rootfs
from .cgroups import CgroupSet
from .cgroups.base import write as write_cgroup_file
from .config import NAMESPACE_FILES, ContainerConfig, parse
from .errors import EXIT_RUNTIME_FAILED, NsRuntimeError, SetupError, StateError, SyscallError, TeardownError
from .lean import frozen, loads, recv_fds, signal_name, suppress
from .state import StateDir, cgroup_line, derive_id, is_within, namespace_inodes, start_time, write_courtesy

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from collections.abc import Callable, Sequence
    from os import PathLike
    from typing import Any, NoReturn

    from .zygote import Zygote
else:  # the C modules: signal.py and socket.py build enums at import (see lean.py)
    import _signal as signal
    import _socket as socket

SETUP_TIMEOUT = 30.0


@frozen
class ExitStatus:
    exit_code: int  # the command's exit code, 128+N when killed by signal N
    signal: int | None  # the killing signal, None on a normal exit
    oom_killed: bool = False

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        return signal_name(self.signal)


def container_id(rootfs: str, state_dir: str) -> str:
    """The id of the container of rootfs whose records are in state_dir: names its cgroups."""
    return derive_id(rootfs, state_dir)


def _recv_line(sock: socket.socket, deadline: float, what: str) -> tuple[str, list[int]]:
    """One newline-terminated message (and any fds passed with it), bounded by deadline."""
    buf = b""
    fds: list[int] = []
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise SetupError(what, f"container init did not answer within {SETUP_TIMEOUT:.0f} s")
        if not wait_readable(sock.fileno(), left):
            continue
        data, got = recv_fds(sock, 4096, 4)
        fds += got
        if not data:
            raise SetupError(what, "container init exited during setup")
        buf += data
    return buf.decode().rstrip("\n"), fds


def _keep_only_fds(keep: Sequence[int]) -> None:
    """Close every descriptor but keep (and 0-2): nothing of the caller may reach the container."""
    prev = 2
    for fd in sorted({*keep, 2}):
        if fd > prev + 1:
            libc.close_range(prev + 1, fd - 1)
        prev = max(prev, fd)
    libc.close_range(prev + 1)


class Container:
    """A created container: PID 1 is up, its root in place, the command waiting for start()."""

    def __init__(self, id: str, config: ContainerConfig, rootfs: str, state: StateDir, pid: int, pidfd: int,
                 cgroups: CgroupSet | None, links: list[str], console: int | None, sock: socket.socket,
                 *, started: bool = False, pending: bytes = b"") -> None:
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
        self._started = started  # "start" went with "go" (begin_create(start=True))
        self._pending = pending  # what PID 1 said after "ready", read with it
        self._status: ExitStatus | None = None
        self._destroyed = False
        self._exit_msg: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"Container(id={self.id!r}, pid={self.pid}, rootfs={self.rootfs!r})"

    def start(self) -> None:
        if not self._started:
            self._started = True
            init.send(self._sock, "start")

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
        with suppress(OSError):
            self._sock.setblocking(False)
            data, self._pending = self._pending, b""
            while True:
                try:
                    chunk = self._sock.recv(4096)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                data += chunk
            for line in data.decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "exited":
                    self._exit_msg = (int(parts[1]), int(parts[2]))

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
            if not _pidfd_readable(self.pidfd):
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
        wait_readable(self.pidfd, timeout)
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


def proc_state(pid: int) -> str:
    """'in state D (wchan: ...)' for a process that won't die, as far as /proc tells."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        letter = data[data.rindex(b")") + 2 :].split()[0].decode()
    except OSError:
        return "gone"
    wchan = ""
    with suppress(OSError), open(f"/proc/{pid}/wchan") as f:
        wchan = f.read().strip()
    return f"in state {letter}" + (f" (waiting in {wchan})" if wchan and wchan != "0" else "")


def _pidfd_readable(pidfd: int) -> bool:
    return wait_readable(pidfd, 0)


def wait_readable(fd: int, timeout: float | None) -> bool:
    """poll(2), not select(2): a daemon holding hundreds of containers has fds above 1023."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000))))


def create(
    cfg: ContainerConfig,
    rootfs_dir: str | PathLike[str],
    command: Sequence[str],
    state_dir: str | PathLike[str] | StateDir,
    *,
    env: dict[str, str] | None = None,
    stdio: tuple[int, int, int] | None = None,
    tty: bool | None = None,
    die_with_parent: bool = True,
    raw_config: Any = None,
    zygote: Zygote | None = None,
    start: bool = False,
    wait_lock: bool = True,
    pid_file: str | None = None,
) -> Container:
    """Make the container and its PID 1, waiting to start ``command``.

    Quick and synchronous (a fork or two and a handshake, bounded by SETUP_TIMEOUT); on failure
    raises NsRuntimeError and leaves nothing behind. The caller becomes a child subreaper: PID 1 is
    its child (or is reparented to it when the setup child exits). With die_with_parent, the
    container is killed when the caller dies. With a zygote (nsruntime.zygote), PID 1 is forked from
    that small process instead of the caller, so that it keeps sharing its pages.
    An event loop that makes many containers at once drives begin_create() itself instead.
    """
    making = begin_create(cfg, rootfs_dir, command, state_dir, env=env, stdio=stdio, tty=tty,
                          die_with_parent=die_with_parent, raw_config=raw_config, zygote=zygote, start=start,
                          wait_lock=wait_lock, pid_file=pid_file)
    while True:
        left = making.deadline - time.monotonic()
        if left <= 0:
            making.time_out()
        if wait_readable(making.fd, left):
            c = making.step()
            if c is not None:
                return c


def begin_create(
    cfg: ContainerConfig,
    rootfs_dir: str | PathLike[str],
    command: Sequence[str],
    state_dir: str | PathLike[str] | StateDir,
    *,
    env: dict[str, str] | None = None,
    stdio: tuple[int, int, int] | None = None,
    tty: bool | None = None,
    die_with_parent: bool = True,
    raw_config: Any = None,
    zygote: Zygote | None = None,
    start: bool = False,
    wait_lock: bool = True,
    pid_file: str | None = None,
) -> Creating:
    """create()'s first half: cgroups made, PID 1 on its way; the caller drives the rest.

    Wait until ``making.fd`` is readable and call ``making.step()``, until it returns the Container;
    past ``making.deadline`` call ``making.time_out()``. step() and time_out() raise NsRuntimeError
    having released everything; ``abort()`` does the same for a caller that gives up (cancelled).
    The state dir stays locked until then.

    start=True (without a terminal): "start" goes with "go", so the command runs as soon as the
    root is in place, without waiting for the pid files; the Container comes back started. For a
    caller that starts at once anyway (`nsinit exec`): one round trip and two file writes less.

    state_dir holds the container's records (see nsruntime.state): it must not be the rootfs or
    inside it, where the container could rewrite them (refused with StateError). Its lock is
    waited for; with wait_lock=False a held lock raises StateError at once (an event loop must
    never block on it). pid_file: also write PID 1's host pid there once the root is in place, a
    copy for users that nsinit never reads (removed with the records).
    """
    if not command:
        raise NsRuntimeError("command: empty")
    root = os.path.realpath(rootfs_dir)
    if not os.path.isdir(root):
        raise SetupError("rootfs", f"{root}: not a directory")
    if root == "/":
        raise SetupError("rootfs", "/ is the host's root: a container needs a directory of its own")
    sdir = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    sdir = StateDir(os.path.realpath(sdir.path), remove_dir=sdir.remove_dir)
    if is_within(sdir.path, root):
        raise StateError(f"state dir {sdir.path} is inside the rootfs {root}: the container could rewrite its "
                         "records; keep them outside")
    use_tty = cfg.tty if tty is None else tty
    cid = container_id(root, sdir.path)
    if cfg.apparmor_profile:
        apparmor.check(cfg.apparmor_profile)  # refuse here, before anything exists: never run unconfined
    if raw_config is None:
        raw_config = cfg.source
    libc.set_subreaper()
    lock = sdir.locked(wait_lock)  # (makes the directory, 0700)
    lock.__enter__()
    try:
        live = sdir.open_live()
        if live is not None:
            os.close(live[1])
            raise StateError(f"{sdir.path}: a container is already running here (pid {live[0]})")
        cleanup_stale(sdir)
        layout, planned = cgroups.plan(cfg.cgroups, cid)
        making = Creating(cfg, root, sdir, cid, raw_config, lock, start and not use_tty, pid_file)
        # recorded before anything exists: whoever finds it stale releases what was made
        making._record(planned)
    except BaseException:
        sdir.release(locked=True)
        lock.__exit__(None, None, None)
        raise
    try:
        making._launch(layout, planned, list(command), env, stdio, use_tty, die_with_parent, zygote)
    except BaseException:
        making.abort()
        raise
    return making


class Creating:
    """A container on its way up (see begin_create): the host side of the handshake with PID 1.

    Messages from PID 1 (or the setup child before it): "userns N" (write the id maps, answer
    "mapped"), "pid N" (then the network is set up and "go" sent), "ready" with the pty master,
    or "error MESSAGE".
    """

    def __init__(self, cfg: ContainerConfig, root: str, sdir: StateDir, cid: str, raw_config: Any,
                 lock: Any, start: bool = False, pid_file: str | None = None) -> None:
        self.cfg = cfg
        self.root = root
        self.sdir = sdir
        self.id = cid
        self.raw_config = raw_config
        self.deadline = time.monotonic() + SETUP_TIMEOUT
        self.cgroups: CgroupSet | None = None
        self.pid = 0
        self.pidfd = -1
        self.links: list[str] = []
        self._lock = lock
        self._child = 0  # the setup child, when we forked it ourselves (a zygote reaps its own)
        self._sock, self._child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        self._fds: list[int] = []
        self._over = False
        self._start = start
        self._pid_file = pid_file
        self._identity: dict[str, Any] = {}

    @property
    def fd(self) -> int:
        """Readable when step() has something to do."""
        return self._sock.fileno()

    def _record(self, planned: list[str] | None = None) -> None:
        paths = planned if planned is not None else list(self.cgroups.paths) if self.cgroups else []
        state = {"id": self.id, "rootfs": self.root, "config": self.raw_config, "cgroups": paths,
                 "links": self.links, **self._identity}
        if self._pid_file is not None:
            state["pid_file"] = self._pid_file
        self.sdir.write_state(state)

    def _launch(self, layout: Any, planned: list[str], command: list[str], env: dict[str, str] | None,
                stdio: tuple[int, int, int] | None, use_tty: bool, die_with_parent: bool,
                zygote: Zygote | None) -> None:
        cfg = self.cfg
        self.cgroups = cg = cgroups.setup(cfg.cgroups, self.id, layout=layout)
        if cg.paths != planned:
            self._record()
        full_env = cfg.env_dict()
        if env:
            full_env.update(env)
        if zygote is None and not cfg.clone_flags & libc.CLONE_NEWUSER:
            self.pid = _clone_pid1(cfg, self.root, command, full_env, stdio, use_tty, cg, self._child_sock,
                                   self._sock, die_with_parent)
        if self.pid == 0 and zygote is None:
            self._child = os.fork()
            if self._child == 0:
                _setup_child(cfg, self.root, command, full_env, stdio, use_tty, cg, self._child_sock, self._sock,
                             die_with_parent)
        elif self.pid == 0:
            assert zygote is not None
            zygote.spawn(zygote_header(cfg, cg, die_with_parent),
                         {"source": cfg.source, "root": self.root, "command": command, "env": full_env,
                          "tty": use_tty, "cgroups": list(cg.paths)},
                         [self._child_sock.fileno(), *(stdio or (0, 1, 2))])
        self._child_sock.close()
        if self.pid:
            self._go()

    def _go(self) -> None:
        """PID 1 exists: the host side of its network, then let it set up its root."""
        self.pidfd = os.pidfd_open(self.pid)
        if self.cfg.needs_pyroute2:
            from . import network  # pyroute2 only for configs that need more than lo

            self.links = list(network.setup(self.cfg, self.id, self.pid).links)
            self._record()
        init.send(self._sock, "go\nstart" if self._start else "go")

    def step(self) -> Container | None:
        """Handle what PID 1 sent; the Container once it is ready, else None (wait for fd again)."""
        try:
            return self._step()
        except (NsRuntimeError, OSError) as e:
            limit = self._limit_error()
            self.abort()
            if limit is not None:
                raise limit from e
            raise
        except BaseException:
            self.abort()
            raise

    def _limit_error(self) -> SetupError | None:
        """The cgroup limit that ended the setup, if a counter says one did (see setup_limit_error)."""
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.setup_limit_error(self.cfg.cgroups)
        except (NsRuntimeError, OSError):
            return None

    def _step(self) -> Container | None:
        try:
            data, fds = recv_fds(self._sock, 4096, 4, nonblocking=True)
        except BlockingIOError:
            return None
        self._fds += fds
        if not data:
            raise SetupError("create", "container init exited during setup")
        self._buf += data
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            c = self._message(line.decode(errors="replace"))
            if c is not None:
                return c
        return None

    def _message(self, msg: str) -> Container | None:
        if msg.startswith("error "):
            raise SetupError("container init" if self.pidfd >= 0 else "container setup", msg[6:])
        if msg.startswith("userns ") and not self.pid:
            _write_id_maps(self.cfg, int(msg.split()[1]))
            init.send(self._sock, "mapped")
            return None
        if msg.startswith("pid ") and not self.pid:
            if self._child:
                os.waitpid(self._child, 0)  # it exits right after saying so
                self._child = 0
            self.pid = int(msg.split()[1])
            self._go()
            return None
        if msg == "ready" and self.pidfd >= 0:
            st = start_time(self.pid)
            if st is None:
                raise SetupError("container init", f"pid {self.pid} vanished during setup")
            # what tells this PID 1 from any process that may take its pid later (state.open_live)
            try:
                self._identity = {"namespaces": namespace_inodes(self.pid, list(NAMESPACE_FILES.values())),
                                  "pid1_cgroup": cgroup_line(self.pid)}
            except OSError:  # a command started with "go" may be done already: PID 1 is a zombie
                self._identity = {}
            self._record()
            # the pid file appears only now that the root is in place: a join can never land on the host's root
            self.sdir.write_pid(self.pid, st)
            if self._pid_file is not None:
                with suppress(OSError):  # a copy for users, in the container's reach: it may refuse it
                    write_courtesy(os.path.dirname(self._pid_file), os.path.basename(self._pid_file),
                                   f"{self.pid}\n")
            console = self._fds.pop(0) if self._fds else None
            c = Container(self.id, self.cfg, self.root, self.sdir, self.pid, self.pidfd, self.cgroups, self.links,
                          console, self._sock, started=self._start, pending=self._buf)
            self._release()
            return c
        raise SetupError("container init", f"unexpected message {msg!r}")

    def time_out(self) -> NoReturn:
        self.abort()
        raise SetupError("create", f"container init did not answer within {SETUP_TIMEOUT:.0f} s")

    def _release(self) -> None:
        self._over = True
        for fd in self._fds:
            with suppress(OSError):
                os.close(fd)
        self._fds = []
        self._lock.__exit__(None, None, None)

    def abort(self) -> None:
        """Undo the half-made container: nothing may stay behind. Idempotent."""
        if self._over:
            return
        if self._child:
            with suppress(ProcessLookupError):
                os.kill(self._child, signal.SIGKILL)
            with suppress(ChildProcessError):
                os.waitpid(self._child, 0)
            self._child = 0
        with suppress(OSError):
            self._child_sock.close()
        try:
            _abort(self.pid, self.pidfd, self.cgroups, self.links, self.sdir, self._sock)
        finally:
            self._release()


def _write_id_maps(cfg: ContainerConfig, pid: int) -> None:
    def fmt(maps: Any) -> str:
        return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)

    try:
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(fmt(cfg.uid_mappings))
        if cfg.gid_mappings:
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(fmt(cfg.gid_mappings))
    except OSError as e:
        raise SetupError("uid_mappings", f"/proc/{pid}/uid_map: {e.strerror}") from None


def _abort(pid: int, pidfd: int, cg: Any, links: list[str], sdir: StateDir, sock: socket.socket) -> None:
    """Undo a half-made container: nothing may stay behind."""
    if pid:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)
    if pidfd >= 0:
        os.close(pidfd)
    if cg is not None:
        with suppress(NsRuntimeError, OSError):
            cg.kill()
            cg.destroy(timeout=5.0)
    if links:
        from . import network

        with suppress(NsRuntimeError, OSError):
            network.teardown(links)
    sdir.remove()
    sdir.release(locked=True)  # (the creator holds the lock until it is done)
    sock.close()


def _child_prologue(stdio: tuple[int, int, int] | None, sock: socket.socket,
                    parent_end: socket.socket | None, keep: Sequence[int] = ()) -> tuple[socket.socket, int]:
    """The first steps of a freshly forked helper child (setup or join); returns its socket and signalfd.

    Signals are blocked before anything else: PID 1 inherits the mask, so nothing sent to it is
    lost before its signalfd exists. A session of its own: a terminal's ^C reaches the caller, which
    forwards it once. Then only stdio, the socket and the signalfd stay open.
    """
    init.block_signals()
    gc.disable()  # PID 1 makes no cycles; a collection would only dirty pages shared with the caller
    os.setsid()
    if parent_end is not None:
        parent_end.close()
    if sock.fileno() <= 2:  # out of the way of the stdio about to be installed
        sock = socket.socket(fileno=fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3))
    if stdio is not None:
        tmp = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in stdio]
        for n, fd in enumerate(tmp):
            os.dup2(fd, n)
            os.close(fd)
    sigfd = libc.signalfd(init.ALL_SIGNALS, libc.SFD_CLOEXEC | libc.SFD_NONBLOCK)
    _keep_only_fds([sock.fileno(), sigfd, *keep])
    return sock, sigfd


def _setup_child(cfg: ContainerConfig, root: str, command: list[str], env: dict[str, str],
                 stdio: tuple[int, int, int] | None, use_tty: bool, cg: Any, sock: socket.socket,
                 parent_end: socket.socket | None, die_with_parent: bool) -> None:
    """In the forked setup child: namespaces, then fork PID 1. Never returns."""
    try:
        sock, sigfd = _child_prologue(stdio, sock, parent_end)
        flags = cfg.clone_flags
        userns = bool(flags & libc.CLONE_NEWUSER)
        if cg is not None:
            # in a user namespace the cgroup files may no longer be ours to write: all of it now
            cg.join_self(v2=userns)
        _join_netns(cfg.netns_paths)
        if flags & libc.CLONE_NEWUSER:
            rootfs.make_mount_points(cfg, root)
            libc.unshare(libc.CLONE_NEWUSER)
            init.send(sock, f"userns {os.getpid()}")
            msg = sock.recv(64)
            if msg != b"mapped\n":
                os._exit(125)
            if cfg.gid_mappings:
                os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        libc.unshare(flags & ~(libc.CLONE_NEWUSER | libc.CLONE_NEWCGROUP))  # PID 1 takes NEWCGROUP itself
        pid1 = os.fork() if userns else _fork_inside(cg)
        if pid1 == 0:
            _pid1(cfg, root, command, env, use_tty, sock, sigfd, die_with_parent)
        init.send(sock, f"pid {pid1}")
        os._exit(0)
    except BaseException as e:
        init.main_fail(sock, e)


def _join_netns(paths: Sequence[str]) -> None:
    for path in paths:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        libc.setns(nsfd, libc.CLONE_NEWNET, path)
        os.close(nsfd)


def _clone_into(flags: int, v2_dir: str | None) -> int:
    """clone3 with these namespace flags, the child born in cgroup2 directory v2_dir (if any);
    SyscallError when the kernel can't."""
    cgfd = os.open(v2_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if v2_dir else -1
    try:
        return libc.clone3(flags & ~libc.CLONE_NEWCGROUP, cgfd)  # NEWCGROUP: PID 1 takes it itself
    finally:
        if cgfd >= 0:
            os.close(cgfd)


def _clone_pid1(cfg: ContainerConfig, root: str, command: list[str], env: dict[str, str],
                stdio: tuple[int, int, int] | None, use_tty: bool, cg: CgroupSet | None, sock: socket.socket,
                parent_end: socket.socket, die_with_parent: bool) -> int:
    """PID 1 straight from the caller: clone3 makes it in its new namespaces and in the cgroup2
    directory at once, so no setup child is needed. Returns its pid; 0 when the kernel can't
    (no clone3, no CLONE_INTO_CGROUP): then the caller takes the setup child's way.

    Not with NEWUSER: the id maps must be written between the user namespace and the others.
    """
    try:
        pid = _clone_into(cfg.clone_flags, cg.v2_leaf() if cg is not None else None)
    except SyscallError:
        return 0
    if pid == 0:
        try:
            sock, sigfd = _child_prologue(stdio, sock, parent_end)
            if cg is not None:
                cg.join_self(v2=False)  # the v1 hierarchies (a lone thread moves itself without RCU wait)
            _join_netns(cfg.netns_paths)
        except BaseException as e:
            init.main_fail(sock, e)
        _pid1(cfg, root, command, env, use_tty, sock, sigfd, die_with_parent)
    return pid


def zygote_header(cfg: ContainerConfig, cg: CgroupSet | None, die_with_parent: bool) -> dict[str, Any]:
    """What the zygote reads of a request to make PID 1 without decoding the rest (see
    zygote_clone): its clone flags, cgroup directories and network namespaces."""
    return {"flags": cfg.clone_flags, "v2": cg.v2_leaf() if cg is not None else None,
            "v1": [d.path for d in cg.leaves if d.version == 1] if cg is not None else [],
            "netns": list(cfg.netns_paths), "die_with_parent": die_with_parent}


def zygote_clone(data: bytes, fds: list[int], sigfd: int) -> int:
    """In the zygote, for one request: PID 1 straight from here, by clone3 with CLONE_PARENT (the
    zygote's caller becomes its parent, as if it had made it), in its namespaces and cgroup2
    directory. The zygote's own pages stay as they are, and PID 1 writes few of its own: the
    body (config, command, environment) is decoded inside the container by the command's process.

    The zygote has blocked every signal, left its session and made sigfd, a signalfd for them:
    PID 1 inherits all three (a signalfd reads the signals of whoever reads it) instead of
    paying for them with pages of its own.

    Returns PID 1's pid, told to the creator over fds[0]; -1 when the request was refused (the
    creator told why); 0 when the zygote must fork a setup child instead (zygote_child): with a
    user namespace, or where the kernel has no clone3 for this.
    """
    try:
        head_bytes, _, body = data.partition(b"\n")
        head = loads(head_bytes)
        flags = int(head["flags"])
        if flags & libc.CLONE_NEWUSER:
            return 0
        pid = _clone_into(flags | libc.CLONE_PARENT, head["v2"])
    except SyscallError:
        return 0
    except Exception as e:
        with suppress(OSError):
            os.write(fds[0], f"error zygote: bad request: {type(e).__name__}: {e}\n".encode(errors="replace"))
        return -1
    if pid == 0:
        sock = socket.socket(fileno=fds[0])
        try:
            for n in range(3):
                os.dup2(fds[n + 1], n)
            _keep_only_fds([fds[0], sigfd])
            for d in head["v1"]:
                write_cgroup_file(os.path.join(d, "tasks"), 0, "cgroups: join")  # as CgroupSet.join_self
            _join_netns(head["netns"])
        except BaseException as e:
            init.main_fail(sock, e)
        _be_init(sock, sigfd, head["die_with_parent"], flags, lambda: _decode_then_setup(body, sock, sigfd))
    with suppress(OSError):
        os.write(fds[0], f"pid {pid}\n".encode())
    return pid


def zygote_child(data: bytes, stdio: tuple[int, int, int], sock: socket.socket) -> None:
    """The setup child the zygote forks where zygote_clone can't make PID 1: decodes the whole
    request and takes _setup_child's way (the user namespace's id maps, unshare, fork)."""
    try:
        head_bytes, _, body = data.partition(b"\n")
        head = loads(head_bytes)
        req = loads(body)
        cfg = parse(req["source"])
        cg = cgroups.from_paths(req["cgroups"]) if req["cgroups"] else None
    except BaseException as e:
        init.main_fail(sock, e)
    _setup_child(cfg, req["root"], req["command"], req["env"], stdio, req["tty"], cg, sock, None,
                 head["die_with_parent"])


def _decode_then_setup(body: bytes, sock: socket.socket, sigfd: int) -> None:
    try:
        req = loads(body)
        cfg = parse(req["source"])
    except BaseException as e:
        init.main_fail(sock, e)
    _setup_and_exec(cfg, req["root"], req["command"], req["env"], req["tty"], sock, sigfd)


def _fork_inside(cg: CgroupSet | None) -> int:
    """os.fork(), the child born in cg's cgroup2 directory (clone3: no cgroup.procs write, no RCU
    wait); the caller has joined the v1 directories itself. Where clone3 can't, the caller joins
    the cgroup2 directory the slow way first."""
    path = cg.v2_leaf() if cg is not None else None
    if path is None:
        return os.fork()
    try:
        return _clone_into(0, path)
    except SyscallError:
        assert cg is not None
        cg.join_self()
        return os.fork()


def _pid1(cfg: ContainerConfig, root: str, command: list[str], env: dict[str, str], use_tty: bool,
          sock: socket.socket, sigfd: int, die_with_parent: bool) -> None:
    _be_init(sock, sigfd, die_with_parent, cfg.clone_flags,
             lambda: _setup_and_exec(cfg, root, command, env, use_tty, sock, sigfd))


def _be_init(sock: socket.socket, sigfd: int, die_with_parent: bool, flags: int, setup: Callable[[], None]) -> None:
    """PID 1, in the container's namespaces and cgroups; never returns.

    It forks the command's process at once, and that process sets the container up (the root,
    the hostname, lo, the terminal), tells the creator "ready", waits for "start" and execs the
    command. PID 1 itself only forwards signals and reaps: every page it writes is a page it no
    longer shares with whoever forked it, so it writes as few as it can (about 0.5 MiB, against
    2.2 MiB when it set up the container itself). pivot_root moves the root and working directory
    of every process of the mount namespace that stood at the old root: PID 1's too.
    """
    if flags & libc.CLONE_NEWCGROUP:
        try:
            # here, in PID 1, now inside the container's cgroups: they become the namespace's root
            libc.unshare(libc.CLONE_NEWCGROUP)
        except NsRuntimeError as e:
            init.main_fail(sock, e)
    with suppress(NsRuntimeError):
        libc.set_process_name("nsinit-init")
        # processes of the container may not ptrace PID 1 or open its /proc files (its socket to us)
        libc.prctl(libc.PR_SET_DUMPABLE, 0)
    try:
        os.chdir("/")  # at the old root, so that pivot_root takes this working directory along
        cmd = os.fork()
    except OSError as e:
        init.main_fail(sock, e)
    if cmd == 0:
        setup()
        os._exit(EXIT_RUNTIME_FAILED)  # (setup never returns)
    init.serve(sock, sigfd, cmd, die_with_parent, bool(flags & libc.CLONE_NEWPID))


def _read_line(sock: socket.socket, buf: bytearray) -> bytes | None:
    """The next line from the creator (without its newline), buf keeping what came after it;
    None at EOF."""
    while b"\n" not in buf:
        chunk = sock.recv(64)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def _setup_and_exec(cfg: ContainerConfig, root: str, command: list[str], env: dict[str, str], use_tty: bool,
                    sock: socket.socket, sigfd: int) -> None:
    """The command's process, forked by PID 1: the container's setup, then the command; never returns."""
    buf = bytearray()
    try:
        # wait for the host side (network) to be done with our namespaces ("start" may come with it)
        if _read_line(sock, buf) != b"go":
            os._exit(EXIT_RUNTIME_FAILED)
        rootfs.prepare(cfg, root)
        rootfs.switch_root(cfg, root)
        if cfg.hostname and "NEWUTS" in cfg.namespaces:
            socket.sethostname(cfg.hostname)
        if "NEWNET" in cfg.namespaces and not any(n.type == "netns" for n in cfg.networks):
            init.loopback_up()
        rootfs.finish(cfg)
        tty_path = None
        fds: list[int] = []
        if use_tty:
            master, slave = os.openpty()  # /dev/ptmx is now the container's own devpts; the slave
            tty_path = os.ttyname(slave)  # stays open until exec: the master reads EIO while none is
            fds = [master]
        init.send(sock, "ready", fds)
        for fd in fds:
            os.close(fd)
        if _read_line(sock, buf) != b"start":
            os._exit(EXIT_RUNTIME_FAILED)  # the creator went away (or changed its mind) before start
    except BaseException as e:
        init.main_fail(sock, e)
    os.close(sigfd)
    sock.close()
    init.exec_command(cfg, command, env, tty_path)


def cleanup_stale(sdir: StateDir) -> dict[str, list[str]]:
    """Release what a dead container recorded in its state dir (its PID 1 is gone, or not ours).

    Reads only the records in sdir, never anything in the rootfs. Raises TeardownError naming
    what would not go, and then keeps the files that record it.
    """
    released: dict[str, list[str]] = {"cgroups": [], "links": [], "files": []}
    if not sdir.has_files():
        return released
    live = sdir.open_live()
    if live is not None:
        os.close(live[1])
        return released
    st = sdir.read_state()
    errors: list[str] = []
    if st.get("cgroups"):
        try:
            cg = cgroups.from_paths(st["cgroups"])
            cg.kill()
            released["cgroups"] = list(cg.destroy(timeout=5.0))
        except (NsRuntimeError, OSError) as e:
            errors.append(str(e))
    if st.get("links"):
        from . import network

        try:
            released["links"] = network.teardown(list(st["links"]))
        except (NsRuntimeError, OSError) as e:
            errors.append(str(e))
    if errors:
        raise TeardownError(f"{sdir.path}: stale container: " + "; ".join(errors))
    released["files"] = sdir.remove()
    sdir.release()  # (kept while a creator holds its lock: begin_create, which calls this, does)
    return released


# ---------------------------------------------------------------- join


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
        code = os.waitstatus_to_exitcode(st)
        if code < 0:
            return ExitStatus(128 - code, -code)
        sig = code - 128 if code > 128 else None
        return ExitStatus(code, sig)


def load_state_config(sdir: StateDir) -> tuple[ContainerConfig, dict[str, Any]]:
    st = sdir.read_state()
    raw = st.get("config")
    if raw is None:
        raise StateError(f"{sdir.path}: state.json holds no config")
    return parse(raw), st


def _state_dir(state_dir: str | PathLike[str] | StateDir) -> StateDir:
    sdir = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    return StateDir(os.path.realpath(sdir.path), remove_dir=sdir.remove_dir)


def open_join(state_dir: str | PathLike[str] | StateDir, command: Sequence[str], *,
              stdio: tuple[int, int, int] | None = None, tty: bool | None = None,
              env: dict[str, str] | None = None) -> Joined:
    """Start ``command`` inside the live container whose records are in state_dir."""
    sdir = _state_dir(state_dir)
    live = sdir.open_live()
    if live is None:
        raise StateError(f"{sdir.path}: no live container")
    pid, pidfd = live
    try:
        cfg, st = load_state_config(sdir)
        use_tty = cfg.tty if tty is None else tty
        full_env = cfg.env_dict()
        if env:
            full_env.update(env)
        cg = cgroups.from_paths(st["cgroups"]) if st.get("cgroups") else None
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        helper = os.fork()
        if helper == 0:
            _join_child(cfg, pid, pidfd, list(command), full_env, stdio, use_tty, cg, child_sock, parent_sock)
    finally:
        os.close(pidfd)
    child_sock.close()
    try:
        msg, fds = _recv_line(parent_sock, time.monotonic() + SETUP_TIMEOUT, "join")
        if msg.startswith("error "):
            raise SetupError("join", msg[6:])
        return Joined(helper, int(msg.split()[1]), fds[0] if fds else None, parent_sock)
    except BaseException:
        with suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)
        os.waitpid(helper, 0)
        parent_sock.close()
        raise


def _join_child(cfg: ContainerConfig, pid: int, pidfd: int, command: list[str], env: dict[str, str],
                stdio: tuple[int, int, int] | None, use_tty: bool, cg: Any, sock: socket.socket,
                parent_end: socket.socket) -> None:
    try:
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        sock, sigfd = _child_prologue(stdio, sock, parent_end, keep=[pidfd])
        if cg is not None:
            cg.join_self()  # before setns and fork: the command counts against the pids limit
        nsfds = []
        for name, nsfile in NAMESPACE_FILES.items():
            if name not in cfg.namespaces and not (name == "NEWNET" and any(n.type == "netns" for n in cfg.networks)):
                continue
            path = f"/proc/{pid}/ns/{nsfile}"
            if os.stat(path).st_ino == os.stat(f"/proc/self/ns/{nsfile}").st_ino:
                continue
            nsfds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), path))
        rootfd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # pidfd names the PID 1 that was checked: alive now, it still held pid when we opened its files
        if _pidfd_readable(pidfd):
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
        init.send(sock, f"pid {cmd}", fds)
        for fd in [*fds, slave]:
            if fd >= 0:
                os.close(fd)
    except BaseException as e:
        init.main_fail(sock, e)
    # forward what reaches this helper to the command; leave with its status
    status = None
    while status is None:
        wait_readable(sigfd, None)
        while (info := libc.read_signalfd(sigfd)) is not None:
            if info[0] == signal.SIGCHLD:
                with suppress(ChildProcessError):
                    p, st_ = os.waitpid(cmd, os.WNOHANG)
                    if p == cmd:
                        status = st_
            else:
                with suppress(ProcessLookupError):
                    os.kill(cmd, info[0])
    code, _sig = init.status_to_code(status)
    os._exit(code)


def describe(state_dir: str | PathLike[str] | StateDir) -> dict[str, Any]:
    """The state of the container in state_dir, in the shape of the OCI ``state`` verb."""
    sdir = _state_dir(state_dir)
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


def join(state_dir: str | PathLike[str] | StateDir, command: Sequence[str], *, tty: bool | None = None,
         env: dict[str, str] | None = None) -> int:
    """Run ``command`` in the live container of state_dir with this process's stdio; its exit status.

    Blocks. Signals sent to the caller meanwhile are forwarded to the command; with a terminal the
    caller's stdin goes raw and is relayed (and restored on every way out).
    """
    init.block_signals()
    sigfd = libc.signalfd(init.ALL_SIGNALS, libc.SFD_CLOEXEC | libc.SFD_NONBLOCK)
    try:
        j = open_join(state_dir, command, tty=tty, env=env)
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
