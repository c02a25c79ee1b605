"""The child side of the fork: from a freshly forked (or cloned) process to the command's execve.

Three ways lead to PID 1, all ending in _be_init (PID 1) and _setup_and_exec (the command's
process, which sets the container up and execs the command):

- clone_pid1: the creator clones PID 1 straight into its namespaces and cgroup2 directory.
- setup_child: a forked setup child unshares (writing nothing itself: the creator writes the id
  maps of a user namespace between its Userns and Mapped) and forks PID 1, says Pid and exits.
- zygote_clone / zygote_child: the same two, run in the zygote (zygote.py) for a request it got
  as bytes: only the request's head is decoded in the zygote, the body (config, command,
  environment) in the container's own process, which parses the config once.

A child that already holds the ContainerConfig (forked from the creator) uses it as it is. Every
function here runs in a child and never returns: it execs or leaves with os._exit, reporting a
failure as an Error over the control socket first (init.main_fail). What each side says to the
other is in channel.py.
"""

from __future__ import annotations

import fcntl
import gc
import os
import select

from . import cgroups, channel, init, libc, rootfs
from .cgroups.base import write as write_cgroup_file
from .config import DEFAULT_PATH, parse
from .errors import EXIT_RUNTIME_FAILED, NsRuntimeError, SetupError, SyscallError
from .lean import loads, suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence
    from typing import Any, Protocol

    from .cgroups.base import CgroupSet
    from .config import ContainerConfig

    class Lifecycle(Protocol):
        """What runs at the OCI lifecycle's points (nsruntime.oci.hooks.SpecHooks gives it).

        runtime: on the host side (the creator), once the container's namespaces and mounts exist
        and before its root is switched, with PID 1's host pid; returns the state (one line of
        JSON) handed to the two others. creating: in the command's process, in the container's
        namespaces, before the switch of root. starting: there too, after the start and before
        execve, in the container's root. Each raises NsRuntimeError to fail its step.
        """

        reply_fifo: str | None  # a FIFO on the host: where `starting`'s failure is told to the starter
        setup_time: float  # seconds `creating` may take beyond the setup's own bound

        def runtime(self, pid: int) -> str: ...
        def creating(self, state: str) -> None: ...
        def starting(self, state: str) -> None: ...
else:  # the C module: socket.py builds enums at import (see lean.py)
    import _socket as socket


def _keep_only_fds(keep: Sequence[int]) -> None:
    """Close every descriptor but keep (and 0-2): nothing of the caller may reach the container."""
    prev = 2
    for fd in sorted({*keep, 2}):
        if fd > prev + 1:
            libc.close_range(prev + 1, fd - 1)
        prev = max(prev, fd)
    libc.close_range(prev + 1)


def preserved(cfg: ContainerConfig) -> range:
    """The caller's descriptors that go on to the command (OCI --preserve-fds): 3 and up."""
    return range(3, 3 + cfg.preserve_fds)


def child_prologue(stdio: tuple[int, int, int] | None, sock: socket.socket,
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


def setup_child(cfg: ContainerConfig, root: str, command: list[str], env: dict[str, str],
                 stdio: tuple[int, int, int] | None, use_tty: bool, cg: CgroupSet | None, sock: socket.socket,
                 parent_end: socket.socket | None, die_with_parent: bool, start_fifo: str | None = None,
                 lifecycle: Lifecycle | None = None) -> None:
    """In the forked setup child: namespaces, then fork PID 1. Never returns."""
    try:
        sock, sigfd = child_prologue(stdio, sock, parent_end, keep=preserved(cfg))
        fifos = _open_fifos(start_fifo, lifecycle)  # while host root: a user namespace's root may not
        flags = cfg.clone_flags
        userns = bool(flags & libc.CLONE_NEWUSER)
        if cg is not None:
            # in a user namespace the cgroup files may no longer be ours to write: all of it now
            cg.join_self(v2=userns)
        _join_namespaces(cfg.joins)
        if flags & libc.CLONE_NEWUSER:
            rootfs.make_mount_points(cfg, root)
            libc.unshare(libc.CLONE_NEWUSER)
            channel.send(sock, channel.Userns(os.getpid()))
            if not isinstance(channel.receive(sock, channel.Reader("creator")), channel.Mapped):
                os._exit(EXIT_RUNTIME_FAILED)  # the creator gave up
            if cfg.gid_mappings:
                os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        libc.unshare(flags & ~(libc.CLONE_NEWUSER | libc.CLONE_NEWCGROUP))  # PID 1 takes NEWCGROUP itself
        pid1 = os.fork() if userns else _fork_inside(cg)
        if pid1 == 0:
            _pid1(cfg, root, command, env, use_tty, sock, sigfd, die_with_parent, fifos, lifecycle)
        channel.send(sock, channel.Pid(pid1))
        os._exit(0)
    except BaseException as e:
        init.main_fail(sock, e)


def _open_fifos(start_fifo: str | None, lifecycle: Lifecycle | None) -> tuple[int, int]:
    """The start FIFO's reading end and the reply FIFO (read-write: see _starting), -1 for none;
    opened by the host's root before any user namespace, passed down to the command's process.

    A reader that is open makes the starter's non-blocking open succeed; with none (the command's
    process died) it fails with ENXIO: the starter learns at once that nobody waits."""
    fifo = os.open(start_fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if start_fifo is not None else -1
    reply = -1
    if lifecycle is not None and lifecycle.reply_fifo is not None:
        reply = os.open(lifecycle.reply_fifo, os.O_RDWR | os.O_CLOEXEC)
    return fifo, reply


def _join_namespaces(joins: Sequence[tuple[str, int]]) -> None:
    """Enter each (path, CLONE_NEW*) namespace: a network namespace of the config, or an OCI path join."""
    for path, kind in joins:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        libc.setns(nsfd, kind, path)
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


def clone_pid1(cfg: ContainerConfig, root: str, command: list[str], env: dict[str, str],
                stdio: tuple[int, int, int] | None, use_tty: bool, cg: CgroupSet | None, sock: socket.socket,
                parent_end: socket.socket, die_with_parent: bool, start_fifo: str | None = None,
                lifecycle: Lifecycle | None = None) -> int:
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
            sock, sigfd = child_prologue(stdio, sock, parent_end, keep=preserved(cfg))
            fifos = _open_fifos(start_fifo, lifecycle)
            if cg is not None:
                cg.join_self(v2=False)  # the v1 hierarchies (a lone thread moves itself without RCU wait)
            _join_namespaces(cfg.joins)
        except BaseException as e:
            init.main_fail(sock, e)
        _pid1(cfg, root, command, env, use_tty, sock, sigfd, die_with_parent, fifos, lifecycle)
    return pid


def zygote_header(cfg: ContainerConfig, cg: CgroupSet | None, die_with_parent: bool) -> dict[str, Any]:
    """What the zygote reads of a request to make PID 1 without decoding the rest (see
    zygote_clone): its clone flags, cgroup directories and the namespaces it joins."""
    return {"flags": cfg.clone_flags, "v2": cg.v2_leaf() if cg is not None else None,
            "v1": [d.path for d in cg.leaves if d.version == 1] if cg is not None else [],
            "joins": [list(j) for j in cfg.joins], "die_with_parent": die_with_parent}


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
            os.write(fds[0], channel.render(channel.Error(f"zygote: bad request: {type(e).__name__}: {e}")))
        return -1
    if pid == 0:
        sock = socket.socket(fileno=fds[0])
        try:
            for n in range(3):
                os.dup2(fds[n + 1], n)
            _keep_only_fds([fds[0], sigfd])
            for d in head["v1"]:
                write_cgroup_file(os.path.join(d, "tasks"), 0, "cgroups: join")  # as CgroupSet.join_self
            _join_namespaces(head["joins"])
        except BaseException as e:
            init.main_fail(sock, e)
        _be_init(sock, sigfd, head["die_with_parent"], flags, lambda: _decode_then_setup(body, sock, sigfd))
    with suppress(OSError):
        os.write(fds[0], channel.render(channel.Pid(pid)))
    return pid


def zygote_child(data: bytes, stdio: tuple[int, int, int], sock: socket.socket) -> None:
    """The setup child the zygote forks where zygote_clone can't make PID 1: decodes the whole
    request and takes setup_child's way (the user namespace's id maps, unshare, fork)."""
    try:
        head_bytes, _, body = data.partition(b"\n")
        head = loads(head_bytes)
        req = loads(body)
        cfg = parse(req["source"])
        cg = cgroups.from_paths(req["cgroups"]) if req["cgroups"] else None
    except BaseException as e:
        init.main_fail(sock, e)
    setup_child(cfg, req["root"], req["command"], req["env"], stdio, req["tty"], cg, sock, None,
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
          sock: socket.socket, sigfd: int, die_with_parent: bool, fifos: tuple[int, int],
          lifecycle: Lifecycle | None = None) -> None:
    _be_init(sock, sigfd, die_with_parent, cfg.clone_flags,
             lambda: _setup_and_exec(cfg, root, command, env, use_tty, sock, sigfd, fifos, lifecycle),
             [*preserved(cfg), *(fd for fd in fifos if fd >= 0)])


def _be_init(sock: socket.socket, sigfd: int, die_with_parent: bool, flags: int, setup: Callable[[], None],
             passed: Sequence[int] = ()) -> None:
    """PID 1, in the container's namespaces and cgroups; never returns.

    It forks the command's process at once, and that process sets the container up (the root,
    the hostname, lo, the terminal), tells the creator Ready, waits for Start and execs the
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
    for fd in passed:  # the command's, not PID 1's: a pipe's or FIFO's end held here would outlive it
        if fd not in (sock.fileno(), sigfd):
            with suppress(OSError):
                os.close(fd)
    init.serve(sock, sigfd, cmd, die_with_parent, bool(flags & libc.CLONE_NEWPID))


def _setup_and_exec(cfg: ContainerConfig, root: str, command: list[str], env: dict[str, str], use_tty: bool,
                    sock: socket.socket, sigfd: int, fifos: tuple[int, int] = (-1, -1),
                    lifecycle: Lifecycle | None = None) -> None:
    """The command's process, forked by PID 1: the container's setup, then the command; never returns.

    With a start FIFO (fifos[0]: the reading end of a FIFO in the host's state dir, see
    _open_fifos) the command waits for a byte there instead of Start on the socket: the start
    then comes from any process, long after the creator has gone (`nsrun start`).

    With a lifecycle (OCI hooks), once the mounts are made and before the root is switched, it
    says Prestart and waits for Prestarted (the creator runs the runtime's hooks meanwhile),
    then runs lifecycle.creating; after the start, lifecycle.starting. Without one, none of it.
    """
    creator = channel.Reader("creator")
    try:
        # wait for the host side (network) to be done with our namespaces (Start may come with it)
        if not isinstance(channel.receive(sock, creator), channel.Go):
            os._exit(EXIT_RUNTIME_FAILED)
        fifo, reply = fifos
        _process_limits(cfg)
        rootfs.prepare(cfg, root)
        state = ""
        if lifecycle is not None:
            state = _prestart(sock, creator, lifecycle)
        rootfs.switch_root(cfg, root)
        if cfg.hostname and "NEWUTS" in cfg.namespaces:
            socket.sethostname(cfg.hostname)
        if "NEWNET" in cfg.namespaces and not any(n.type == "netns" for n in cfg.networks):
            libc.loopback_up()
        _sysctl(cfg.sysctl)
        rootfs.finish(cfg)
        if fifo >= 0:  # the OCI create fails on a command it could never start (podman: 127, 126)
            _check_command(command[0], env)
        tty_path = None
        fds: list[int] = []
        if use_tty:
            master, slave = os.openpty()  # /dev/ptmx is now the container's own devpts; the slave
            tty_path = os.ttyname(slave)  # stays open until exec: the master reads EIO while none is
            fds = [master]
        channel.send(sock, channel.Ready(), fds=fds)
        for fd in fds:
            os.close(fd)
        if fifo >= 0:
            _wait_for_start(fifo, sigfd)
        elif not isinstance(channel.receive(sock, creator), channel.Start):
            os._exit(EXIT_RUNTIME_FAILED)  # the creator went away (or changed its mind) before start
        if lifecycle is not None:
            _starting(lifecycle, state, reply)
    except BaseException as e:
        init.main_fail(sock, e)
    os.close(sigfd)
    sock.close()
    init.exec_command(cfg, command, env, tty_path)


def _prestart(sock: socket.socket, creator: channel.Reader, lifecycle: Lifecycle) -> str:
    """The runtime's hooks (run by the creator while we wait), then the container's own; the state."""
    channel.send(sock, channel.Prestart())
    m = channel.receive(sock, creator)
    if not isinstance(m, channel.Prestarted):
        os._exit(EXIT_RUNTIME_FAILED)  # the creator gave up (its hooks failed): it is taking us down
    lifecycle.creating(m.state)
    return m.state


def _starting(lifecycle: Lifecycle, state: str, reply: int) -> None:
    """The hooks of the start, before execve. A failure is written to the reply FIFO, whose reader
    (the starter) then reads it; success is the FIFO's end of file when execve closes it (CLOEXEC)."""
    try:
        lifecycle.starting(state)
    except BaseException as e:
        if reply >= 0:
            with suppress(OSError):
                os.write(reply, str(e).replace("\n", " ").encode(errors="replace")[:4000])
        raise


def _process_limits(cfg: ContainerConfig) -> None:
    """rlimits and the OOM score, while the host's stdlib is still in reach: both survive execve."""
    if cfg.rlimits:
        import resource

        for r in cfg.rlimits:
            try:
                resource.setrlimit(r.resource, (r.soft, r.hard))
            except (OSError, ValueError) as e:
                why = e.strerror if isinstance(e, OSError) else str(e)
                raise SetupError("process.rlimits",
                                 f"setrlimit({r.name}, soft={r.soft}, hard={r.hard}): {why}") from None
    if cfg.oom_score_adj is not None:
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(cfg.oom_score_adj))
        except OSError as e:
            raise SetupError("process.oomScoreAdj", f"write {cfg.oom_score_adj} to /proc/self/oom_score_adj: "
                             f"{e.strerror}") from None


def _sysctl(settings: Sequence[tuple[str, str]]) -> None:
    """Each kernel parameter, written in the container's own /proc (its namespaces' copy)."""
    for key, value in settings:
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            raise SetupError("linux.sysctl", f"{key}: write {value!r} to {path}: {e.strerror}") from None


def _wait_for_start(fifo: int, sigfd: int) -> None:
    """Until a byte comes through the start FIFO. A signal meanwhile (`nsrun kill` of a created
    container, forwarded by PID 1) acts as it would on the command: its default action."""
    poller = select.poll()
    poller.register(fifo, select.POLLIN)
    poller.register(sigfd, select.POLLIN)
    while True:
        for fd, _ev in poller.poll():
            if fd == fifo:
                if not os.read(fifo, 1):  # POLLHUP: a writer came and went without a word
                    raise SetupError("start", "the start FIFO was closed without a start")
                os.close(fifo)
                return
            while (info := libc.read_signalfd(sigfd)) is not None:
                signo = info[0]
                init.reset_signals()  # the default action of signo, now, as the command would take it
                os.kill(os.getpid(), signo)
                init.block_signals()  # (still here: its default is to be ignored)


def _check_command(name: str, env: dict[str, str]) -> None:
    """SetupError unless name is an executable file of the container's, looked up as execvpe will;
    its text says "no such file or directory" or "permission denied" as the case is."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in env.get("PATH", DEFAULT_PATH).split(":")]
    denied = False
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return
            denied = True
    if denied:
        raise SetupError("process.args", f'exec "{name}": permission denied')
    where = "" if "/" in name else " in $PATH"
    raise SetupError("process.args", f'exec "{name}": executable file not found{where}: no such file or directory')
