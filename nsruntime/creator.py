"""The host side of create: from a ContainerConfig to a Container whose command waits for start.

Processes (host view)::

    creator ──clone3(CLONE_NEW*, CLONE_INTO_CGROUP)──► PID 1 (init.py) ──fork──► command's process
       └── over a socketpair (channel.py): Go ──►, ◄── Ready (+ pty master), Start ──►, ◄── Exited

PID 1 is born in its namespaces and cgroup2 directory, enters the v1 hierarchies itself, forks
the command's process at once and from then on only forwards signals and reaps (init.serve).
The command's process sets the container up (root, /proc, /dev, hostname, lo, masks), says
Ready, waits for Start and execs the command: PID 1 then writes few pages of its own, and
pivot_root, done by its child, moves PID 1's root and working directory along with it.
With a zygote (nsinitd's containers, see zygote.py), the zygote makes PID 1 the same way, with
CLONE_PARENT so that it is the caller's child. With NEWUSER (the id maps are written between
the user namespace and the others) or on a kernel without clone3 into a cgroup, a setup child
makes PID 1 in two steps:

    creator ──fork──► setup child ──unshare(...)──fork──► PID 1
       ▲                 └── says Pid and exits; PID 1 is reparented to the creator (a child subreaper)

Everything the children do is in spawn.py; this module is the creator's half: the records and
cgroups made before any fork, the id maps and the network between the fork and Go, the pid file
once Ready says the root is in place, and abort, which releases all of it whatever step failed.
The creator stays single-threaded across fork (trio's loop is), and no namespace of the creator
ever changes. Creating and starting are separate steps, as the OCI runtime commands will need.
"""

from __future__ import annotations

import os
import time

from . import apparmor, cgroups, channel, libc, spawn
from .config import NAMESPACE_FILES, ContainerConfig
from .container import Container
from .errors import NsRuntimeError, SetupError, StateError, TeardownError
from .lean import recv_fds, suppress
from .state import StateDir, cgroup_line, derive_id, is_within, namespace_inodes, resolve, start_time, write_courtesy

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from collections.abc import Sequence
    from os import PathLike
    from typing import Any, NoReturn

    from .cgroups.base import CgroupSet
    from .spawn import Lifecycle
    from .zygote import Zygote
else:  # the C modules: signal.py and socket.py build enums at import (see lean.py)
    import _signal as signal
    import _socket as socket

SETUP_TIMEOUT = 30.0


def container_id(rootfs: str, state_dir: str) -> str:
    """The id of the container of rootfs whose records are in state_dir: names its cgroups."""
    return derive_id(rootfs, state_dir)


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
    start_fifo: str | None = None,
    lifecycle: Lifecycle | None = None,
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
                          wait_lock=wait_lock, pid_file=pid_file, start_fifo=start_fifo, lifecycle=lifecycle)
    while True:
        left = making.deadline - time.monotonic()
        if left <= 0:
            making.time_out()
        if libc.wait_readable(making.fd, left):
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
    start_fifo: str | None = None,
    lifecycle: Lifecycle | None = None,
) -> Creating:
    """create()'s first half: cgroups made, PID 1 on its way; the caller drives the rest.

    Wait until ``making.fd`` is readable and call ``making.step()``, until it returns the Container;
    past ``making.deadline`` call ``making.time_out()``. step() and time_out() raise NsRuntimeError
    having released everything; ``abort()`` does the same for a caller that gives up (cancelled).
    The state dir stays locked until then.

    start=True (without a terminal): Start goes with Go, so the command runs as soon as the
    root is in place, without waiting for the pid files; the Container comes back started. For a
    caller that starts at once anyway (`nsinit exec`): one round trip and two file writes less.

    state_dir holds the container's records (see nsruntime.state): it must not be the rootfs or
    inside it, where the container could rewrite them (refused with StateError). Its lock is
    waited for; with wait_lock=False a held lock raises StateError at once (an event loop must
    never block on it). pid_file: also write PID 1's host pid there once the root is in place, a
    copy for users that nsinit never reads (removed with the records).

    start_fifo: a FIFO on the host (the OCI runtime's, in its state dir) through which the
    command is started instead of Start (see spawn._setup_and_exec): Container.start() is then
    not the way, and die_with_parent=False lets the container outlive its creator. Not with a
    zygote.

    lifecycle: the OCI hooks' calls (spawn.Lifecycle): the creator runs lifecycle.runtime when
    the command's process says Prestart (its namespaces and mounts made, its root not yet
    switched) and answers Prestarted; a failure there aborts the create. Not with a zygote nor
    start=True.
    """
    if start_fifo is not None and (zygote is not None or start):
        raise NsRuntimeError("start_fifo: not with a zygote nor start=True")
    if lifecycle is not None and (zygote is not None or start):
        raise NsRuntimeError("lifecycle: not with a zygote nor start=True")
    if not command:
        raise NsRuntimeError("command: empty")
    root = os.path.realpath(rootfs_dir)
    if not os.path.isdir(root):
        raise SetupError("rootfs", f"{root}: not a directory")
    if root == "/":
        raise SetupError("rootfs", "/ is the host's root: a container needs a directory of its own")
    sdir = resolve(state_dir)
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
        making = Creating(cfg, root, sdir, cid, raw_config, lock, start and not use_tty, pid_file, lifecycle)
        # recorded before anything exists: whoever finds it stale releases what was made
        making._record(planned)
    except BaseException:
        sdir.release(locked=True)
        lock.__exit__(None, None, None)
        raise
    try:
        making._launch(layout, planned, list(command), env, stdio, use_tty, die_with_parent, zygote, start_fifo)
    except BaseException:
        making.abort()
        raise
    return making


class Creating:
    """A container on its way up (see begin_create): the host side of the handshake with PID 1.

    Messages from the setup child (or the zygote), then from PID 1's side (channel.py): Userns
    (write the id maps, answer Mapped), Pid (then the network is set up and Go sent), Ready with
    the pty master, or Error.
    """

    def __init__(self, cfg: ContainerConfig, root: str, sdir: StateDir, cid: str, raw_config: Any,
                 lock: Any, start: bool = False, pid_file: str | None = None,
                 lifecycle: Lifecycle | None = None) -> None:
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
        self._reader = channel.Reader("container setup")
        self._fds: list[int] = []
        self._over = False
        self._start = start
        self._pid_file = pid_file
        self._lifecycle = lifecycle
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
                zygote: Zygote | None, start_fifo: str | None = None) -> None:
        cfg = self.cfg
        self.cgroups = cg = cgroups.setup(cfg.cgroups, self.id, layout=layout)
        if cg.paths != planned:
            self._record()
        full_env = cfg.env_dict()
        if env:
            full_env.update(env)
        if zygote is None and not cfg.clone_flags & libc.CLONE_NEWUSER:
            self.pid = spawn.clone_pid1(cfg, self.root, command, full_env, stdio, use_tty, cg, self._child_sock,
                                   self._sock, die_with_parent, start_fifo, self._lifecycle)
        if self.pid == 0 and zygote is None:
            self._child = os.fork()
            if self._child == 0:
                spawn.setup_child(cfg, self.root, command, full_env, stdio, use_tty, cg, self._child_sock, self._sock,
                             die_with_parent, start_fifo, self._lifecycle)
        elif self.pid == 0:
            assert zygote is not None
            zygote.spawn(spawn.zygote_header(cfg, cg, die_with_parent),
                         {"source": cfg.source, "root": self.root, "command": command, "env": full_env,
                          "tty": use_tty, "cgroups": list(cg.paths)},
                         [self._child_sock.fileno(), *(stdio or (0, 1, 2))])
        self._child_sock.close()
        if self.pid:
            self._go()

    def _go(self) -> None:
        """PID 1 exists: the host side of its network, then let it set up its root."""
        self.pidfd = os.pidfd_open(self.pid)
        self._reader.who = "container init"
        if self.cfg.needs_pyroute2:
            from . import network  # pyroute2 only for configs that need more than lo

            self.links = list(network.setup(self.cfg, self.id, self.pid).links)
            self._record()
        channel.send(self._sock, *((channel.Go(), channel.Start()) if self._start else (channel.Go(),)))

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
        self._reader.feed(data)
        while (m := self._reader.next()) is not None:
            c = self._message(m)
            if c is not None:
                return c
        return None

    def _message(self, m: channel.Message) -> Container | None:
        if not self.pid:  # the setup child (or the zygote) speaks: PID 1 is on its way
            if isinstance(m, channel.Userns):
                _write_id_maps(self.cfg, m.pid)
                channel.send(self._sock, channel.Mapped())
                return None
            if isinstance(m, channel.Pid):
                if self._child:
                    os.waitpid(self._child, 0)  # it exits right after saying so
                    self._child = 0
                self.pid = m.pid
                self._go()
                return None
            raise channel.expected("container setup", "pid", m)
        if isinstance(m, channel.Prestart) and self._lifecycle is not None:
            state = self._lifecycle.runtime(self.pid)  # (a failure: step() aborts, PID 1 and all)
            # the hooks took their time; the container's own (createContainer) may take theirs
            self.deadline = time.monotonic() + SETUP_TIMEOUT + self._lifecycle.setup_time
            channel.send(self._sock, channel.Prestarted(state))
            return None
        if not isinstance(m, channel.Ready):
            raise channel.expected("container init", "ready", m)
        st = start_time(self.pid)
        if st is None:
            raise SetupError("container init", f"pid {self.pid} vanished during setup")
        # what tells this PID 1 from any process that may take its pid later (state.open_live)
        try:
            self._identity = {"namespaces": namespace_inodes(self.pid, list(NAMESPACE_FILES.values())),
                              "pid1_cgroup": cgroup_line(self.pid)}
        except OSError:  # a command started with Go may be done already: PID 1 is a zombie
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
                      console, self._sock, started=self._start, reader=self._reader)
        self._release()
        return c

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


def _abort(pid: int, pidfd: int, cg: CgroupSet | None, links: list[str], sdir: StateDir, sock: socket.socket) -> None:
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
