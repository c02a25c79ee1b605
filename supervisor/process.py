"""Spawning and reaping plain processes; cgroup2 tracking; what every started program is (Child).

A plain program (no ``container`` key) is forked here, not through ``subprocess``: the child
needs to join the program's cgroup *before* exec (so nothing it forks can escape), start a new
session, and reset what CPython leaves behind (ignored SIGPIPE/SIGXFSZ, the signal mask,
inherited descriptors). An exec failure comes back through a close-on-exec pipe, so a missing
binary is a spawn error, not a mysterious exit 127.

Every child is waited for through a pidfd (readable once it exited), then reaped with
``waitpid(pid)``: never ``waitpid(-1)``, which would steal other waiters' statuses. The only
exception is :class:`Reaper`: nsinitd is a child subreaper (and may be PID 1), so orphans are
reparented to it; the reaper reaps exactly the children that no program owns.

Exit codes follow the shell: ``exit_code`` is the status, or 128+N when killed by signal N. The
record is the runtime's ``ExitStatus``, the same for a plain process and a container: one
definition of how a process ended, one table of signal names (both in nsruntime.signals).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import trio

from nsruntime import ExitStatus, Hierarchy, detect_cgroups, set_subreaper

from .keeper import exec_child

#: What a teardown released, by kind: ``cgroups`` (and, for a container, ``links``, ``files``).
Released = Mapping[str, Sequence[str]]


class SpawnError(Exception):
    """The program could not be started; ``str()`` is one line."""


# -- subreaper and strangers ----------------------------------------------------------------------


def set_child_subreaper() -> None:
    """SyscallError (an OSError) naming prctl when the kernel refuses."""
    set_subreaper()


def children() -> set[int]:
    """Our direct children (zombies included), from /proc/self/task/*/children."""
    pids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


class Reaper:
    """Knows which children are owned (waited for by someone) and reaps all the others.

    An owner registers a pid in the same synchronous step that forked it (no checkpoint in
    between), so the reaper, which runs in the same trio thread, can never see it unowned.
    """

    def __init__(self) -> None:
        self.owned: set[int] = set()
        self.on_reaped: Callable[[int, ExitStatus], None] | None = None
        self.pressure: Callable[[], bool] | None = None

    def own(self, pid: int) -> None:
        self.owned.add(pid)

    def disown(self, pid: int) -> None:
        self.owned.discard(pid)

    def reap_strangers(self) -> list[tuple[int, ExitStatus]]:
        reaped = []
        for pid in children() - self.owned:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == pid:
                info = ExitStatus.from_wait_status(status)
                reaped.append((pid, info))
                if self.on_reaped is not None:
                    self.on_reaped(pid, info)
        return reaped

    async def reap_strangers_yielding(self, max_pause: float = 2.0) -> None:
        """reap_strangers, letting other tasks run every few reaps, and pausing while a live
        subscriber's buffer is more than half full (``pressure``): 10,000 orphans dying at once
        would otherwise emit 10,000 events before any stream task could send one, and drop every
        reader. A reader that doesn't read at all only delays reaping by max_pause in all."""
        deadline = trio.current_time() + max_pause
        n = 0
        for pid in children() - self.owned:
            if pid in self.owned:  # owned while we let others run
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == pid and self.on_reaped is not None:
                self.on_reaped(pid, ExitStatus.from_wait_status(status))
            n += 1
            if n % 16 == 0:  # let the stream tasks run; less often costs readers, more often costs rate
                await trio.lowlevel.checkpoint()
            while self.pressure is not None and self.pressure() and trio.current_time() < deadline:
                await trio.sleep(0.001)

    async def run(self, interval: float = 2.0) -> None:
        """Reap on every SIGCHLD, and on a slow tick as a safety net (signals coalesce)."""
        with trio.open_signal_receiver(signal.SIGCHLD) as sigs:
            while True:
                await self.reap_strangers_yielding()
                with trio.move_on_after(interval):
                    await sigs.__anext__()


# -- cgroup2 --------------------------------------------------------------------------------------


def _unified() -> Hierarchy | None:
    # the runtime's detection is the one reading of mountinfo
    try:
        unified = detect_cgroups().unified
    except OSError:
        return None
    if unified is None or not os.path.exists(os.path.join(unified.mountpoint, "cgroup.procs")):
        return None
    return unified


def cgroup2_mount() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup/unified here), or None."""
    unified = _unified()
    return Path(unified.mountpoint) if unified is not None else None


def own_cgroup2(mount: Path) -> Path:
    """nsinitd's own cgroup2 directory (the ``0::`` line of /proc/self/cgroup, through mount)."""
    unified = _unified()
    return Path(unified.base) if unified is not None and Path(unified.mountpoint) == mount else mount


class Cgroup:
    """One cgroup2 directory: enough to track, kill and remove every process of a program."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self) -> None:
        self.path.mkdir(parents=False, exist_ok=True)

    def procs(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            return []

    def populated(self) -> bool:
        try:
            for line in (self.path / "cgroup.events").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "populated":
                    return v.strip() == "1"
        except FileNotFoundError:
            return False
        return bool(self.procs())

    def stats(self) -> dict[str, int]:
        """pids, cpu_usage_ns, memory_bytes: those whose files can be read (cgroup2 has no
        controllers enabled here, so often only pids)."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            out["pids"] = len((self.path / "cgroup.procs").read_text().split())
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    out["cpu_usage_ns"] = int(value) * 1000
        with contextlib.suppress(OSError, ValueError):
            out["memory_bytes"] = int((self.path / "memory.current").read_text())
        return out

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (cgroup.kill, else one by one)."""
        try:
            (self.path / "cgroup.kill").write_text("1")
            return
        except FileNotFoundError:
            if not self.path.exists():
                return
        except OSError:
            pass
        for pid in self.procs():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def remove(self, reaper: Reaper | None, timeout: float = 5.0) -> list[str]:
        """Kill what is left, wait for it to empty, rmdir (EBUSY until reaped: bounded retries).

        Returns the released paths; raises OSError naming the cgroup and its remaining pids.
        """
        if not self.path.exists():
            return []
        with trio.move_on_after(timeout):
            delay = 0.005
            while True:
                if self.populated():
                    self.kill()
                if reaper is not None:
                    await reaper.reap_strangers_yielding()
                try:
                    self.path.rmdir()
                    return [str(self.path)]
                except FileNotFoundError:
                    return []
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise OSError(e.errno, f"rmdir({self.path!s}): {e.strerror}") from None
                await trio.sleep(delay)
                delay = min(delay * 2, 0.1)
        raise OSError(errno.EBUSY, f"rmdir({self.path!s}): still busy after {timeout:g}s, "
                                   f"pids {self.procs()}")


# -- children -------------------------------------------------------------------------------------


class Child(Protocol):
    """A started program: a plain process (PlainChild) or a container's PID 1 (program.ContainerChild)."""

    @property
    def pid(self) -> int: ...

    @property
    def pidfd(self) -> int:
        """Readable once the process has exited (wait_exit)."""

    def signal(self, signum: int) -> None: ...
    def kill(self) -> None: ...

    def reap(self) -> ExitStatus | None:
        """How it ended, once it has (reaping it); None while it runs. Never blocks."""

    async def wait(self) -> None:
        """Return once reap() can tell how it ended."""

    def stats(self) -> Mapping[str, int]:
        """Resource usage from its cgroup(s), where readable: see SupervisorAPI.stats."""

    async def teardown(self) -> Released:
        """Kill what it left behind and release its cgroup (or container); bounded."""


class PlainChild:
    def __init__(self, pid: int, pidfd: int, cgroup: Cgroup | None, reaper: Reaper) -> None:
        self.teardown_timeout = 5.0  # for the cgroup to empty after cgroup.kill
        self.pid = pid
        self.pidfd = pidfd
        self.cgroup = cgroup
        self.reaper = reaper
        self.exit: ExitStatus | None = None

    def signal(self, signum: int) -> None:
        if self.exit is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill()
        if self.exit is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.signal(signal.SIGKILL)

    def reap(self) -> ExitStatus | None:
        if self.exit is None:
            try:
                got, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # someone stole it: should never happen
                got, status = self.pid, 255 << 8
            if got == 0:
                return None
            self.exit = ExitStatus.from_wait_status(status)
            self.reaper.disown(self.pid)
            try:
                os.close(self.pidfd)
            except OSError:
                pass
            self.pidfd = -1
        return self.exit

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self.pidfd)

    def stats(self) -> Mapping[str, int]:
        return self.cgroup.stats() if self.cgroup is not None else {}

    async def teardown(self) -> Released:
        """Kill whatever the program left running (grandchildren) and release its cgroup."""
        if self.cgroup is not None:
            return {"cgroups": await self.cgroup.remove(self.reaper, timeout=self.teardown_timeout)}
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its session's process group, if any is left
        except (ProcessLookupError, PermissionError):
            pass
        return {"cgroups": []}


def spawn_plain(argv: Sequence[str], env: Mapping[str, str], stdio: tuple[int, int, int],
                reaper: Reaper, cgroup: Cgroup | None = None, cwd: str | None = None) -> PlainChild:
    """Fork and exec ``argv``; raise SpawnError (reaping the child) if exec fails.

    Synchronous and quick: returns once the child has exec'd (the error pipe hit EOF).
    """
    cgroup_fd = -1
    if cgroup is not None:
        cgroup.create()
        cgroup_fd = os.open(cgroup.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    try:
        errr, errw = os.pipe2(os.O_CLOEXEC)
    except OSError:
        if cgroup_fd >= 0:
            os.close(cgroup_fd)
        raise
    try:
        try:
            pid = os.fork()  # EAGAIN here is a SpawnError-like OSError for the caller
            if pid == 0:
                exec_child(argv, env, stdio, cgroup_fd, errw, cwd)
            reaper.own(pid)
        finally:
            os.close(errw)
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        # A pidfd before anything can reap it; it can't fail for our own unreaped child short
        # of running out of descriptors, and then the child is killed and reaped right here.
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            reaper.disown(pid)
            raise
        report = b""
        while chunk := os.read(errr, 4096):
            report += chunk
    finally:
        os.close(errr)
    if report:
        os.waitpid(pid, 0)
        reaper.disown(pid)
        os.close(pidfd)
        _, _, msg = report.decode(errors="replace").partition("\0")
        raise SpawnError(msg)
    return PlainChild(pid, pidfd, cgroup, reaper)


async def wait_exit(child: Child) -> None:
    """Return once the child has exited; does not reap."""
    await child.wait()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot); split after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()
    return int(fields[19])


def write_pid_files(state_dir: Path, pid: int) -> None:
    """state_dir/pid and state_dir/start, each written to a temporary name and renamed."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, value in (("pid", pid), ("start", proc_start_time(pid))):
        tmp = state_dir / f".{name}.tmp"
        tmp.write_text(f"{value}\n")
        os.replace(tmp, state_dir / name)


def remove_pid_files(state_dir: Path, names: Iterable[str] = ("pid", "start")) -> None:
    for name in names:
        (state_dir / name).unlink(missing_ok=True)
