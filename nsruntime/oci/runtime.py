"""The OCI verbs on a state root: create, start, state, kill, delete, run, exec, update, events, list.

Each container has a directory ROOT/ID (0700, root's, refused inside the rootfs) holding
nsruntime.state's records (pid, start ticks, state.json with PID 1's namespaces and cgroup, the
cgroups and links to release) and, until it is started, the FIFO ``start.fifo``:

    nsrun create ──clone3──► PID 1 ──fork──► the command's process: sets the root up, says Ready,
         │ (exits 0; PID 1 is                 opens start.fifo for reading and waits for a byte
         │  reparented to the caller,
         │  a subreaper, and lives on)
    nsrun start ── opens start.fifo for writing (ENXIO: nobody waits), unlinks it, writes a byte ──►
                                              the command's process execs the command

With startContainer hooks, ``started.fifo`` too: the command's process holds it open until its
execve closes it; a hook's failure is written there for `start` to read (spawn._starting).

Status, from the records alone: no live PID 1 (nsruntime.state.StateDir.open_live checks its
start time, namespaces and cgroup) is ``stopped``; a live one with start.fifo still there is
``created``; else ``running``, or ``paused`` when its cgroup is frozen.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time

from .. import cgroups, creator, joiner
from ..cgroups import base as cgroups_base
from ..errors import ConfigError, NsRuntimeError, StateError, TeardownError
from ..lean import replace, send_fds, suppress
from ..state import StateDir
from . import hooks as oci_hooks
from . import spec as oci_spec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..cgroups.base import CgroupSet
    from ..container import Container

DEFAULT_ROOT = "/run/nsrun"
FIFO = "start.fifo"
REPLY_FIFO = "started.fifo"  # with startContainer hooks: their failure, told to `start` (spawn._starting)
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
KILL_TIMEOUT = 10.0


class NotFound(StateError):
    """No container of that id in the state root."""


def check_id(cid: str) -> str:
    if not cid or cid.strip(_ID_CHARS) or cid in (".", "..") or len(cid) > 1024:
        raise NsRuntimeError(f"invalid container id {cid!r}: letters, digits, '_', '.' and '-' only")
    return cid


class Record:
    """One container's directory in the state root."""

    def __init__(self, root: str, cid: str) -> None:
        self.id = check_id(cid)
        self.path = os.path.join(os.path.abspath(root), cid)
        self.sdir = StateDir(self.path)
        self.fifo = os.path.join(self.path, FIFO)
        self.reply_fifo = os.path.join(self.path, REPLY_FIFO)

    def exists(self) -> bool:
        return os.path.isfile(self.sdir.file("state.json"))

    def require(self) -> None:
        if not self.exists():
            raise NotFound(f"container {self.id} does not exist")

    def oci(self) -> dict[str, Any]:
        """What create recorded besides the runtime's records (bundle, created, annotations)."""
        config = self.sdir.read_state().get("config")
        oci = config.get("nsrun") if isinstance(config, dict) else None
        return oci if isinstance(oci, dict) else {}

    def status(self) -> tuple[str, int]:
        """(created | running | paused | stopped, PID 1's host pid or 0)."""
        pid = self.sdir.live_pid()
        if pid is None:
            return "stopped", 0
        if os.path.exists(self.fifo):
            return "created", pid
        if self._frozen():
            return "paused", pid
        return "running", pid

    def _frozen(self) -> bool:
        for p in self.sdir.read_state().get("cgroups") or []:
            with suppress(OSError), open(os.path.join(p, "freezer.state")) as f:
                if f.read().strip() in ("FROZEN", "FREEZING"):
                    return True
            with suppress(OSError), open(os.path.join(p, "cgroup.freeze")) as f:
                if f.read().strip() == "1":
                    return True
        return False

    def hooks(self) -> dict[str, tuple[oci_hooks.Hook, ...]]:
        """The hooks of the config.json the container was created with."""
        config = self.sdir.read_state().get("config")
        spec = config.get("spec") if isinstance(config, dict) else None
        raw = spec.get("hooks") if isinstance(spec, dict) else None
        return oci_hooks.parse(raw) if raw is not None else {}

    def hook_state(self, status: str, pid: int) -> dict[str, Any]:
        """The state a hook reads on its stdin."""
        oci = self.oci()
        return {"ociVersion": oci_spec.SPEC_VERSION, "id": self.id, "status": status, "pid": pid,
                "bundle": oci.get("bundle", ""), "annotations": oci.get("annotations", {})}

    def cgroups(self) -> CgroupSet:
        return cgroups.from_paths(self.sdir.read_state().get("cgroups") or [])

    def freeze(self, frozen: bool) -> None:
        """Freeze or thaw every process: the v1 freezer where the container has one, else cgroup2's."""
        cg = self.cgroups()
        if any(d.freeze(frozen) for d in cg.leaves):
            return
        leaf = cg.v2_leaf()
        if leaf is None or not os.path.exists(os.path.join(leaf, "cgroup.freeze")):
            raise NsRuntimeError(f"container {self.id}: no freezer (neither a v1 freezer cgroup nor cgroup.freeze)")
        cgroups_base.write(os.path.join(leaf, "cgroup.freeze"), "1" if frozen else "0", "cgroups: freeze")

    def state(self) -> dict[str, Any]:
        """The OCI state of the container."""
        self.require()
        status, pid = self.status()
        oci = self.oci()
        st = self.sdir.read_state()
        return {"ociVersion": oci_spec.SPEC_VERSION, "id": self.id, "pid": pid, "status": status,
                "bundle": oci.get("bundle", ""), "rootfs": st.get("rootfs", ""), "created": oci.get("created", ""),
                "owner": oci.get("owner", ""), "annotations": oci.get("annotations", {})}


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def write_pid_file(path: str, pid: int) -> None:
    """pid to path, atomically: a temporary name in the same directory, renamed into place."""
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _make_dir(rec: Record) -> None:
    os.makedirs(os.path.dirname(rec.path), mode=0o700, exist_ok=True)
    try:
        os.mkdir(rec.path, 0o700)
    except FileExistsError:
        raise StateError(f"container with id {rec.id} exists already") from None


def _remove_dir(rec: Record) -> None:
    for name in (FIFO, REPLY_FIFO):
        with suppress(FileNotFoundError):
            os.unlink(os.path.join(rec.path, name))
    with suppress(FileNotFoundError):
        os.rmdir(rec.path)


def _load(bundle: str, cid: str, preserve_fds: int = 0) -> oci_spec.Spec:
    """The bundle's spec; without a cgroupsPath the container's cgroup is named by its id (nsrun/ID,
    as runc names it), not by a hash of its rootfs's path. preserve_fds: our fds 3..3+N-1 go on
    to the command (each must be open)."""
    sp = oci_spec.load(bundle)
    if sp.config.cgroups.name is None:
        cfg = replace(sp.config, cgroups=replace(sp.config.cgroups, name=cid))
        sp = replace(sp, config=cfg)
    if preserve_fds:
        sp = replace(sp, config=replace(sp.config, preserve_fds=check_preserved(preserve_fds)))
    return sp


def check_preserved(n: int) -> int:
    """n, once fds 3..3+n-1 are known to be open here (else one would be some later file of ours)."""
    if n < 0:
        raise NsRuntimeError(f"--preserve-fds {n}: not a count")
    for fd in range(3, 3 + n):
        try:
            os.fstat(fd)
        except OSError:
            raise NsRuntimeError(f"--preserve-fds {n}: fd {fd} is not open") from None
    return n


NO_CONSOLE_SOCKET = "cannot allocate tty if nsrun will detach without setting console socket"
NEEDLESS_CONSOLE_SOCKET = "cannot use console socket if nsrun will not detach or allocate tty"
PTY_NAME = b"/dev/ptmx"  # what runc sends alongside the master: the name it opened it by


def check_console(terminal: bool, detach: bool, console_socket: str | None) -> None:
    """A detached terminal goes to --console-socket, and --console-socket only takes one (runc's words)."""
    if detach and terminal and console_socket is None:
        raise NsRuntimeError(NO_CONSOLE_SOCKET)
    if (not detach or not terminal) and console_socket is not None:
        raise NsRuntimeError(NEEDLESS_CONSOLE_SOCKET)


def connect_console(path: str) -> socket.socket:
    """The caller's console socket (a unix stream socket it listens on), connected before anything
    is made, so that a wrong path leaves nothing behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise NsRuntimeError(f"--console-socket {path}: connect: {(e.strerror or str(e)).lower()}") from None
    return s


def send_console(sock: socket.socket, path: str, master: int) -> None:
    """runc's console protocol: one message, the pty's name, carrying the master (SCM_RIGHTS)."""
    try:
        send_fds(sock, PTY_NAME, [master])
    except OSError as e:
        raise NsRuntimeError(f"--console-socket {path}: sendmsg: {(e.strerror or str(e)).lower()}") from None
    finally:
        sock.close()


def create(root: str, cid: str, bundle: str, *, pid_file: str | None = None,
           console_socket: str | None = None, preserve_fds: int = 0) -> int:
    """Make the container, its command waiting for start; returns PID 1's host pid.

    PID 1 outlives this process (no death signal, no kill when our socket closes) and is
    reparented to our caller, a subreaper, when we exit. With process.terminal, the command's
    controlling terminal is a pty of the container's own devpts whose master goes to
    console_socket; the master is not kept here, so output waits in the pty for the caller
    however short-lived the command. On failure nothing is left: records, cgroups, directory.
    """
    rec = Record(root, cid)
    sp = _load(bundle, cid, preserve_fds)
    check_console(sp.terminal, True, console_socket)
    _make_dir(rec)
    console = None
    null = -1
    try:
        if console_socket is not None:
            console = connect_console(console_socket)
        os.mkfifo(rec.fifo, 0o600)
        lifecycle = _lifecycle(rec, sp)
        record = {"nsrun": {"id": cid, "bundle": sp.bundle, "created": _now(), "owner": "",
                            "annotations": dict(sp.annotations)}, "spec": sp.config.source}
        if sp.terminal:
            # the command's stdio is the pty; PID 1 and the waiting command keep none of ours:
            # containerd's shim reads create's output until EOF, which a copy held would never give
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        # PID 1 is forked from here and keeps our command line, the host's bundle and log paths
        # (podman top, /proc/1/cmdline inside): this process is about to exit, so it takes PID 1's
        from ..zygote import PID1_TITLE, retitle

        with suppress(OSError, ValueError, IndexError):
            retitle(PID1_TITLE)
        c = creator.create(sp.config, sp.rootfs, list(sp.args), rec.sdir, tty=sp.terminal, die_with_parent=False,
                           raw_config=record, start_fifo=rec.fifo, lifecycle=lifecycle,
                           stdio=(null, null, null) if null >= 0 else None)
    except BaseException:
        if console is not None:
            console.close()
        _remove_dir(rec)
        raise
    finally:
        if null >= 0:
            os.close(null)
    master, c.console = c.console, None
    _hand_over(console, console_socket, master, "process.terminal: the container's init sent no pty master",
               pid_file, c.pid, lambda: _destroy(rec, c))
    return c.pid


def _hand_over(console: socket.socket | None, console_socket: str | None, master: int | None, no_master: str,
               pid_file: str | None, pid: int, undo: Callable[[], None]) -> None:
    """The end of create and of a detached exec: the pty master to the console socket, then the
    pid file; on a failure of either, undo (kill what was made) and raise."""
    if console is not None and console_socket is not None:
        try:
            if master is None:
                raise NsRuntimeError(no_master)
            send_console(console, console_socket, master)
        except BaseException:
            undo()
            raise
        finally:
            if master is not None:
                os.close(master)
    elif master is not None:
        os.close(master)
    if pid_file is not None:
        try:
            write_pid_file(pid_file, pid)
        except OSError as e:
            undo()
            raise NsRuntimeError(f"--pid-file {pid_file}: {(e.strerror or str(e)).lower()}") from None


def _lifecycle(rec: Record, sp: oci_spec.Spec) -> oci_hooks.SpecHooks | None:
    """The hooks of the setup and the start, when the spec has any (else nsruntime adds no step);
    the reply FIFO made for startContainer's."""
    hooks = oci_hooks.SpecHooks(sp.hooks, {"ociVersion": oci_spec.SPEC_VERSION, "id": rec.id, "bundle": sp.bundle,
                                           "annotations": dict(sp.annotations)}, rec.reply_fifo)
    if not hooks.needed:
        return None
    if hooks.reply_fifo is not None:
        os.mkfifo(hooks.reply_fifo, 0o600)
    return hooks


def _destroy(rec: Record, c: Container) -> None:
    with suppress(NsRuntimeError, OSError):
        c.destroy()
    _remove_dir(rec)


def start(root: str, cid: str) -> list[str]:
    """Let the created container's command run (from any process); the poststart hooks' failures,
    which are warnings. A failing startContainer hook fails the start: the container is then
    stopped (its command never ran), for the caller to delete."""
    rec = Record(root, cid)
    rec.require()
    status, _pid = rec.status()
    if status != "created":
        raise StateError(f"cannot start a container that is {status}")
    hooks = rec.hooks()
    reply = -1
    if os.path.exists(rec.reply_fifo):  # read before the start: what the command's process says after it
        reply = os.open(rec.reply_fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(rec.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no reader: the command's process is gone
                raise StateError(f"cannot start container {cid}: its process no longer waits") from None
            if e.errno == errno.ENOENT:
                raise StateError(f"cannot start container {cid}: started already") from None
            raise
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise StateError(f"{rec.fifo}: not a FIFO")
            os.unlink(rec.fifo)  # first: from here on state says running
            os.write(fd, b"0")
        finally:
            os.close(fd)
        if reply >= 0:
            _started(rec, reply, hooks.get("startContainer", ()))
    finally:
        if reply >= 0:
            os.close(reply)
            with suppress(FileNotFoundError):
                os.unlink(rec.reply_fifo)
    if not hooks.get("poststart"):
        return []
    return [str(e) for e in oci_hooks.run_kind("poststart", hooks["poststart"],
                                               rec.hook_state("running", rec.sdir.live_pid() or 0))]


def _started(rec: Record, reply: int, hooks: tuple[oci_hooks.Hook, ...]) -> None:
    """Wait (bounded by the hooks' timeouts) for the startContainer hooks' outcome: end of file
    when the command's execve closed the FIFO, or a failure's text, after which PID 1 exits."""
    from .. import libc

    bound = creator.SETUP_TIMEOUT + sum(h.timeout or creator.SETUP_TIMEOUT for h in hooks)
    deadline = time.monotonic() + bound
    said = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not libc.wait_readable(reply, left):
            raise StateError(f"container {rec.id}: the startContainer hooks did not finish within {bound:g} s")
        try:
            chunk = os.read(reply, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            break
        said += chunk
    if not said:
        return
    live = rec.sdir.open_live()
    if live is not None:  # it exits once it has said why: `state` then says stopped
        try:
            libc.wait_readable(live[1], KILL_TIMEOUT)
        finally:
            os.close(live[1])
    raise StateError(said.decode(errors="replace"))


def kill(root: str, cid: str, signum: int, *, all_processes: bool = False) -> None:
    rec = Record(root, cid)
    rec.require()
    live = rec.sdir.open_live()
    if live is None:
        if all_processes:
            return  # nothing left to signal (containerd's `kill --all ID 9` after the exit)
        raise StateError(f"container {cid} is not running")
    _pid, pidfd = live
    import signal

    paused = rec.status()[0] == "paused"
    try:
        if all_processes:
            for p in rec.cgroups().pids():
                with suppress(ProcessLookupError):
                    os.kill(p, signum)
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signum)
        if paused and signum == signal.SIGKILL:
            rec.freeze(False)  # a frozen task takes its SIGKILL only once thawed
    finally:
        os.close(pidfd)


def _freeze(root: str, cid: str, frozen: bool) -> None:
    rec = Record(root, cid)
    rec.require()
    status, _pid = rec.status()
    if status != ("running" if frozen else "paused"):
        raise StateError(f"cannot {'pause' if frozen else 'resume'} a container that is {status}")
    rec.freeze(frozen)


def pause(root: str, cid: str) -> None:
    _freeze(root, cid, True)


def resume(root: str, cid: str) -> None:
    _freeze(root, cid, False)


def ps(root: str, cid: str) -> list[int]:
    """The host pids of every process in the container's cgroups, sorted."""
    rec = Record(root, cid)
    rec.require()
    if rec.status()[0] == "stopped":
        return []
    return sorted(rec.cgroups().pids())


def delete(root: str, cid: str, *, force: bool = False) -> list[str]:
    """Release what the container holds, then run its poststop hooks; their failures, which are
    warnings. Gone already: nothing to do (the shim calls it twice)."""
    rec = Record(root, cid)
    if not os.path.isdir(rec.path):
        return []
    poststop: tuple[oci_hooks.Hook, ...] = ()
    hook_state: dict[str, Any] = {}
    if rec.exists():
        poststop = rec.hooks().get("poststop", ())
        recorded = rec.sdir.read_pid()
        hook_state = rec.hook_state("stopped", recorded[0] if recorded else 0)
        status, _pid = rec.status()
        if status in ("running", "paused") and not force:
            raise StateError(f"cannot delete container {cid} that is not stopped: {status}")
        live = rec.sdir.open_live()
        if live is not None:
            pid, pidfd = live
            try:
                import signal

                with suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                if status == "paused":
                    rec.freeze(False)  # a frozen PID 1 takes its SIGKILL only once thawed
                from .. import libc

                if not libc.wait_readable(pidfd, KILL_TIMEOUT):
                    raise TeardownError(f"container {cid}: PID 1 ({pid}) still there {KILL_TIMEOUT:g} s after "
                                        "SIGKILL")
            finally:
                os.close(pidfd)
        creator.cleanup_stale(rec.sdir)
    _remove_dir(rec)
    return [str(e) for e in oci_hooks.run_kind("poststop", poststop, hook_state)] if poststop else []


def run(root: str, cid: str, bundle: str, *, pid_file: str | None = None, detach: bool = False,
        console_socket: str | None = None, warn: Callable[[str], None] | None = None, preserve_fds: int = 0) -> int:
    """create + start. In the foreground (runc's default): wait for the command, forwarding the
    signals we get and, with process.terminal, relaying its pty to and from our stdin and stdout
    (raw while it runs when stdin is a terminal); then delete; the command's exit status (128+N
    when signal N killed it). detach: create and start, then exit 0 leaving it running, its PID 1
    reparented to our caller (a subreaper), a terminal's master sent to console_socket.
    With hooks, the start goes through the start FIFO as `nsrun start` does (startContainer and
    poststart at their points); their warnings and poststop's go to warn."""
    from .. import init, joiner, libc

    sp = _load(bundle, cid, preserve_fds)
    check_console(sp.terminal, detach, console_socket)
    if detach:
        create(root, cid, bundle, pid_file=pid_file, console_socket=console_socket, preserve_fds=preserve_fds)
        try:
            for w in start(root, cid):
                if warn is not None:
                    warn(w)
        except BaseException:
            with suppress(NsRuntimeError, OSError):
                delete(root, cid, force=True)
            raise
        return 0
    rec = Record(root, cid)
    _make_dir(rec)
    # blocked from here on and read from a signalfd: nothing sent to us is lost or kills us halfway
    init.block_signals()
    sigfd = libc.signalfd(init.ALL_SIGNALS, libc.SFD_CLOEXEC | libc.SFD_NONBLOCK)
    try:
        try:
            record = {"nsrun": {"id": cid, "bundle": sp.bundle, "created": _now(), "owner": "",
                                "annotations": dict(sp.annotations)}, "spec": sp.config.source}
            lifecycle = None
            if any(sp.hooks.values()):
                os.mkfifo(rec.fifo, 0o600)
                lifecycle = _lifecycle(rec, sp)
            fifo = rec.fifo if os.path.exists(rec.fifo) else None
            # without a FIFO or a terminal, Start goes with Go: one round trip less
            c = creator.create(sp.config, sp.rootfs, list(sp.args), rec.sdir, raw_config=record, tty=sp.terminal,
                               start=fifo is None, start_fifo=fifo, lifecycle=lifecycle)
        except BaseException:
            _remove_dir(rec)
            raise
        poststop = sp.hooks.get("poststop", ())
        state = rec.hook_state("stopped", c.pid)
        try:
            if pid_file is not None:
                write_pid_file(pid_file, c.pid)

            def go() -> None:
                if fifo is None:
                    c.start()
                    return
                for w in start(root, cid):
                    if warn is not None:
                        warn(w)

            if c.console is not None:
                from .. import console  # termios and tty: only for a terminal

                with console.raw_mode(0):
                    console.copy_winsize(0, c.console)
                    go()
                    joiner.forward_until_exit(sigfd, c.pidfd, c.signal, c.console)
            else:
                go()
                joiner.forward_until_exit(sigfd, c.pidfd, c.signal, None)
            status = c.poll()
            assert status is not None
            return status.exit_code
        finally:
            _destroy(rec, c)
            for e in oci_hooks.run_kind("poststop", poststop, state) if poststop else []:
                if warn is not None:
                    warn(str(e))
    finally:
        os.close(sigfd)
        import signal

        signal.pthread_sigmask(signal.SIG_UNBLOCK, init.ALL_SIGNALS)


def update(root: str, cid: str, resources: object, where: str = "resources") -> None:
    """Apply an OCI LinuxResources object (memory, cpu, pids, blockIO weight) to the live
    container's cgroups, each controller in the directory that carries it. What config.json
    refuses is refused here too, naming its path; devices are not changed (as runc)."""
    from . import events as oci_events

    rec = Record(root, cid)
    rec.require()
    status, _pid = rec.status()
    if status == "stopped":
        raise StateError(f"cannot update a container that is {status}")
    wanted = oci_spec.resources(where, resources)
    pids = resources.get("pids") if isinstance(resources, dict) else None
    if isinstance(pids, dict) and pids.get("limit") == -1:
        wanted = replace(wanted, pids_limit=-1)  # lifted (config.json's -1 asks for none from the start)
    cg = rec.cgroups()
    dirs = oci_events.controller_dirs(cg)
    for leaf in cg.leaves:
        carried = frozenset(c for c, (_v, d) in dirs.items() if d == leaf.path)
        type(leaf)(leaf.path, limits=carried).apply(wanted)


def events(root: str, cid: str, *, stats_once: bool, interval: float,
           emit: Callable[[dict[str, Any]], None]) -> None:
    """runc's events: one stats event (stats_once), or a stats event every interval and an oom
    event when the OOM killer acts, until the container is gone."""
    from . import events as oci_events

    rec = Record(root, cid)
    rec.require()
    live = rec.sdir.open_live()
    if live is None:
        raise StateError(f"container {cid} is not running")
    _pid, pidfd = live
    try:
        cg = rec.cgroups()
        if stats_once:
            emit({"type": "stats", "id": cid, "data": oci_events.stats(cg)})
            return
        oci_events.stream(cid, cg, pidfd, interval, emit)
    finally:
        os.close(pidfd)


def ids(root: str) -> list[str]:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [n for n in names if not n.strip(_ID_CHARS) and os.path.isdir(os.path.join(root, n))]


def default_spec(args: list[str] | None = None) -> dict[str, Any]:
    """A config.json for a bundle whose root is ./rootfs, like `runc spec` writes (kept to what nsrun takes)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": oci_spec.SPEC_VERSION,
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": args or ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "nsrun",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec",
                                                                                               "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev",
                                                                                      "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def features() -> dict[str, Any]:
    """The runtime-spec features document: exactly what this nsrun honours on this machine."""
    from .. import apparmor, seccomp

    try:
        apparmor_on = apparmor.enabled()
    except (AttributeError, NsRuntimeError, OSError):
        apparmor_on = False
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": oci_spec.SPEC_VERSION,
        "hooks": list(oci_hooks.KINDS),
        "mountOptions": oci_spec.MOUNT_OPTIONS,
        "linux": {
            "namespaces": sorted(oci_spec.NAMESPACE_TYPES),
            "capabilities": [f"CAP_{n}" for n in capability_names()],
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": seccomp.features(),
            "apparmor": {"enabled": apparmor_on},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
            "mountExtensions": {"idmap": {"enabled": False}},
        },
        "annotations": {"org.opencontainers.runc.checkpoint.enabled": "false"},
    }


def capability_names() -> list[str]:
    from .. import capabilities

    return list(capabilities.NAMES[: capabilities.last_cap() + 1])


def spec_file(bundle: str, args: list[str] | None = None) -> str:
    """Write bundle/config.json (refusing to replace one); returns its path."""
    from ..lean import dumps

    path = os.path.join(bundle, oci_spec.CONFIG_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (dumps(default_spec(args)) + "\n").encode())
    finally:
        os.close(fd)
    return path



MAX_PROCESS_BYTES = 1 << 20


def _exec_flags(proc: dict[str, Any], caps: list[str], gids: list[int], no_new_privs: bool,
                apparmor: str | None) -> None:
    """runc exec's --cap, --additional-gids, --no-new-privs, --apparmor, on the process in place.

    A capability goes into the bounding, effective and permitted sets, and into ambient only
    where the process has an inheritable set (ambient needs it), as runc does; a process without
    capabilities (all kept) gains nothing from it."""
    if caps and proc.get("capabilities") is not None:
        sets = dict(proc["capabilities"])
        for name in ("bounding", "effective", "permitted", *(("ambient",) if sets.get("inheritable") else ())):
            sets[name] = [*(sets.get(name) or []), *caps]
        proc["capabilities"] = sets
    if gids:
        user = dict(proc.get("user") or {})
        user["additionalGids"] = [*(user.get("additionalGids") or []), *gids]
        proc["user"] = user
    if no_new_privs:
        proc["noNewPrivileges"] = True
    if apparmor is not None:
        proc["apparmorProfile"] = apparmor


def exec_(root: str, cid: str, args: list[str], *, process_file: str | None = None, tty: bool = False,
          cwd: str | None = None, env: list[str] | None = None, user: str | None = None, detach: bool = False,
          pid_file: str | None = None, console_socket: str | None = None, preserve_fds: int = 0,
          caps: list[str] | None = None, additional_gids: list[int] | None = None, no_new_privs: bool = False,
          apparmor: str | None = None) -> int:
    """Run one more process in a created or running container (nsruntime's join).

    The process is the container's own (config.json's) with args, cwd, env (added), user and
    terminal changed, or the OCI process in process_file. Returns its exit status (128+N when
    signal N killed it); detach: 0 once it runs, its host pid in pid_file, and our caller, a
    subreaper, reaps it; with a terminal, its pty master goes to console_socket (runc's protocol).
    """
    from ..fields import decode_json

    rec = Record(root, cid)
    rec.require()
    status, _pid = rec.status()
    if status not in ("created", "running"):
        raise StateError(f"cannot exec in a container that is {status}")
    recorded = rec.sdir.read_state().get("config")
    spec_data = recorded.get("spec") if isinstance(recorded, dict) else None
    if not isinstance(spec_data, dict):
        raise StateError(f"{rec.sdir.file('state.json')}: holds no config.json")
    sp = oci_spec.parse(spec_data, rec.oci().get("bundle") or "/")
    if process_file is not None:
        if args:
            raise NsRuntimeError("exec: --process and a command: give one of them")
        try:
            with open(process_file, "rb") as f:
                raw = f.read(MAX_PROCESS_BYTES + 1)
        except OSError as e:
            raise NsRuntimeError(f"--process {process_file}: {(e.strerror or str(e)).lower()}") from None
        proc = decode_json(process_file, raw, MAX_PROCESS_BYTES)
        where = "process"
    else:
        if not args:
            raise NsRuntimeError("exec: a command (ARGS...) or --process F is required")
        proc = dict(spec_data.get("process") or {})
        proc["args"] = list(args)
        where = "exec"
    if not isinstance(proc, dict):
        raise ConfigError(where, "not a JSON object (an OCI process)")
    proc = dict(proc)
    if tty:
        proc["terminal"] = True
    if cwd is not None:
        proc["cwd"] = cwd
    if env:
        proc["env"] = [*(proc.get("env") or []), *env]
    if user is not None:
        uid, sep, gid = user.partition(":")
        if not uid.isdigit() or (sep and not gid.isdigit()):
            raise NsRuntimeError(f"--user {user!r}: not UID[:GID] (numbers)")
        proc["user"] = {**(proc.get("user") or {}), "uid": int(uid), **({"gid": int(gid)} if sep else {})}
    _exec_flags(proc, caps or [], additional_gids or [], no_new_privs, apparmor)
    cfg, command, terminal = oci_spec.exec_process(sp, proc, where)
    if cfg.apparmor_profile:
        from .. import apparmor as aa

        aa.check(cfg.apparmor_profile)  # here, before the join: never run unconfined
    if preserve_fds:
        cfg = replace(cfg, preserve_fds=check_preserved(preserve_fds))
    check_console(terminal, detach, console_socket)
    if detach:
        console = connect_console(console_socket) if console_socket is not None else None
        try:
            j = joiner.open_join(rec.sdir, command, tty=terminal, config=cfg, detach=True)
        except BaseException:
            if console is not None:
                console.close()
            raise
        j.wait()  # the helper, gone as soon as the command runs

        def kill() -> None:
            with suppress(ProcessLookupError):
                os.kill(j.cmd_pid, 9)  # SIGKILL

        master, j.console = j.console, None
        _hand_over(console, console_socket, master, "exec --tty: the join sent no pty master", pid_file, j.cmd_pid,
                   kill)
        return 0
    return joiner.join(rec.sdir, command, tty=terminal, config=cfg)
