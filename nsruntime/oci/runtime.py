"""The OCI verbs on a state root: create, start, state, kill, delete, run, list.

Each container has a directory ROOT/ID (0700, root's, refused inside the rootfs) holding
nsruntime.state's records (pid, start ticks, state.json with PID 1's namespaces and cgroup, the
cgroups and links to release) and, until it is started, the FIFO ``start.fifo``:

    nsrun create ──clone3──► PID 1 ──fork──► the command's process: sets the root up, says Ready,
         │ (exits 0; PID 1 is                 opens start.fifo for reading and waits for a byte
         │  reparented to the caller,
         │  a subreaper, and lives on)
    nsrun start ── opens start.fifo for writing (ENXIO: nobody waits), unlinks it, writes a byte ──►
                                              the command's process execs the command

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
from . import spec as oci_spec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..cgroups.base import CgroupSet
    from ..container import Container

DEFAULT_ROOT = "/run/nsrun"
FIFO = "start.fifo"
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
    for name in (FIFO,):
        with suppress(FileNotFoundError):
            os.unlink(os.path.join(rec.path, name))
    with suppress(FileNotFoundError):
        os.rmdir(rec.path)


def _load(bundle: str, cid: str) -> oci_spec.Spec:
    """The bundle's spec; without a cgroupsPath the container's cgroup is named by its id (nsrun/ID,
    as runc names it), not by a hash of its rootfs's path."""
    sp = oci_spec.load(bundle)
    if sp.config.cgroups.name is None:
        cfg = replace(sp.config, cgroups=replace(sp.config.cgroups, name=cid))
        sp = replace(sp, config=cfg)
    return sp


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
           console_socket: str | None = None) -> int:
    """Make the container, its command waiting for start; returns PID 1's host pid.

    PID 1 outlives this process (no death signal, no kill when our socket closes) and is
    reparented to our caller, a subreaper, when we exit. With process.terminal, the command's
    controlling terminal is a pty of the container's own devpts whose master goes to
    console_socket; the master is not kept here, so output waits in the pty for the caller
    however short-lived the command. On failure nothing is left: records, cgroups, directory.
    """
    rec = Record(root, cid)
    sp = _load(bundle, cid)
    check_console(sp.terminal, True, console_socket)
    _make_dir(rec)
    console = None
    try:
        if console_socket is not None:
            console = connect_console(console_socket)
        os.mkfifo(rec.fifo, 0o600)
        record = {"nsrun": {"id": cid, "bundle": sp.bundle, "created": _now(), "owner": "",
                            "annotations": dict(sp.annotations)}, "spec": sp.config.source}
        # PID 1 is forked from here and keeps our command line, the host's bundle and log paths
        # (podman top, /proc/1/cmdline inside): this process is about to exit, so it takes PID 1's
        from ..zygote import PID1_TITLE, retitle

        with suppress(OSError, ValueError, IndexError):
            retitle(PID1_TITLE)
        c = creator.create(sp.config, sp.rootfs, list(sp.args), rec.sdir, tty=sp.terminal, die_with_parent=False,
                           raw_config=record, start_fifo=rec.fifo)
    except BaseException:
        if console is not None:
            console.close()
        _remove_dir(rec)
        raise
    if console is not None and console_socket is not None:
        master, c.console = c.console, None
        try:
            if master is None:
                raise NsRuntimeError("process.terminal: the container's init sent no pty master")
            send_console(console, console_socket, master)
        except BaseException:
            _destroy(rec, c)
            raise
        finally:
            if master is not None:
                os.close(master)
    if pid_file is not None:
        try:
            write_pid_file(pid_file, c.pid)
        except OSError as e:
            _destroy(rec, c)
            raise NsRuntimeError(f"--pid-file {pid_file}: {(e.strerror or str(e)).lower()}") from None
    return c.pid


def _destroy(rec: Record, c: Container) -> None:
    with suppress(NsRuntimeError, OSError):
        c.destroy()
    _remove_dir(rec)


def start(root: str, cid: str) -> None:
    """Let the created container's command run (from any process)."""
    rec = Record(root, cid)
    rec.require()
    status, _pid = rec.status()
    if status != "created":
        raise StateError(f"cannot start a container that is {status}")
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


def delete(root: str, cid: str, *, force: bool = False) -> None:
    """Release what the container holds. Gone already: nothing to do (the shim calls it twice)."""
    rec = Record(root, cid)
    if not os.path.isdir(rec.path):
        return
    if rec.exists():
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


def run(root: str, cid: str, bundle: str, *, pid_file: str | None = None) -> int:
    """create + start in the foreground: the command's exit status (128+N when signal N killed it)."""
    import signal

    rec = Record(root, cid)
    sp = _load(bundle, cid)
    if sp.terminal:
        raise NsRuntimeError("process.terminal: run does not relay a terminal yet (use create --console-socket, "
                             "then start)")
    _make_dir(rec)
    try:
        record = {"nsrun": {"id": cid, "bundle": sp.bundle, "created": _now(), "owner": "",
                            "annotations": dict(sp.annotations)}, "spec": sp.config.source}
        c = creator.create(sp.config, sp.rootfs, list(sp.args), rec.sdir, raw_config=record, start=True)
    except BaseException:
        _remove_dir(rec)
        raise
    try:
        if pid_file is not None:
            write_pid_file(pid_file, c.pid)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, lambda signum, _frame: c.signal(signum))
        status = c.wait()
        assert status is not None
        return status.exit_code
    finally:
        _destroy(rec, c)


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
    """The runtime-spec features document: what this nsrun can do."""
    from .. import apparmor

    try:
        apparmor_on = apparmor.enabled()
    except (AttributeError, NsRuntimeError, OSError):
        apparmor_on = False
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": oci_spec.SPEC_VERSION,
        "hooks": [],
        "mountOptions": oci_spec.MOUNT_OPTIONS,
        "linux": {
            "namespaces": sorted(oci_spec.NAMESPACE_TYPES),
            "capabilities": [f"CAP_{n}" for n in capability_names()],
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": apparmor_on},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
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


def exec_(root: str, cid: str, args: list[str], *, process_file: str | None = None, tty: bool = False,
          cwd: str | None = None, env: list[str] | None = None, user: str | None = None, detach: bool = False,
          pid_file: str | None = None, console_socket: str | None = None) -> int:
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
    cfg, command, terminal = oci_spec.exec_process(sp, proc, where)
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
        if console is not None and console_socket is not None:
            master, j.console = j.console, None
            try:
                if master is None:
                    raise NsRuntimeError("exec --tty: the join sent no pty master")
                send_console(console, console_socket, master)
            except BaseException:
                import signal

                with suppress(ProcessLookupError):
                    os.kill(j.cmd_pid, signal.SIGKILL)
                raise
            finally:
                if master is not None:
                    os.close(master)
        if pid_file is not None:
            try:
                write_pid_file(pid_file, j.cmd_pid)
            except OSError as e:
                import signal

                with suppress(ProcessLookupError):
                    os.kill(j.cmd_pid, signal.SIGKILL)
                raise NsRuntimeError(f"--pid-file {pid_file}: {(e.strerror or str(e)).lower()}") from None
        return 0
    return joiner.join(rec.sdir, command, tty=terminal, config=cfg)
