"""The one interface every cgroup directory answers to, and the set of them a container holds.

A container has one directory per hierarchy (``CgroupDir``); ``CgroupSet`` fans each verb out
to all of them. v1 and v2 directories differ only in how limits are written and which files hold
the statistics; joining, listing, killing and removing are the same everywhere but for
cgroup.kill, which only cgroup2 has.
"""

from __future__ import annotations

import errno as _errno
import os
import time
from abc import ABC, abstractmethod

from ..errors import SetupError, TeardownError
from ..lean import read_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import ClassVar

    from ..config import Cgroups

# statistics keys, as the supervisor reads them; each is present only where a file holds it
STAT_KEYS = ("memory_bytes", "memory_peak_bytes", "cpu_usage_ns", "pids", "oom_kills")


def describe(err: OSError) -> str:
    code = err.errno if err.errno is not None else 0
    return f"{_errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


def write_raw(path: str, value: str | int) -> None:
    """Write one value to a cgroup file in one write(2): cgroup files take a value per call."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def write(path: str, value: str | int, step: str) -> None:
    """write_raw, failing with SetupError(step, "write 'VALUE' to PATH: ERRNO (text)")."""
    try:
        write_raw(path, value)
    except OSError as e:
        raise SetupError(step, f"write {str(value)!r} to {path}: {describe(e)}") from None


def write_each(path: str, values: Sequence[str], step: str) -> None:
    """write() of each value in turn through one descriptor: a cgroup file takes one per write(2)."""
    value = ""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for value in values:
                os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise SetupError(step, f"write {value!r} to {path}: {describe(e)}") from None


def read(path: str) -> str | None:
    """A cgroup file's content, or None when the file is not there (controller not enabled)."""
    try:
        return read_file(path).decode()
    except FileNotFoundError:
        return None


def read_int(path: str) -> int | None:
    text = read(path)
    if text is None:
        return None
    text = text.strip()
    return None if text == "max" else int(text)


def read_keyed(path: str) -> dict[str, int]:
    """``key value`` lines (memory.events, memory.oom_control, cpu.stat) as a dict."""
    out: dict[str, int] = {}
    for line in (read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


class CgroupDir(ABC):
    """One directory of one hierarchy.

    ``limits`` are the controllers whose limits this directory carries (decided by setup: a
    controller is used in exactly one hierarchy); ``devices`` says it carries the device policy.
    """

    version: ClassVar[int]

    def __init__(self, path: str, limits: frozenset[str] = frozenset(), devices: bool = False) -> None:
        self.path = path
        self.limits = limits
        self.devices = devices

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @abstractmethod
    def apply(self, cfg: Cgroups) -> None:
        """Write the limits of the controllers in ``self.limits`` (and the device policy)."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Whatever of STAT_KEYS this directory's files hold."""

    def oom_kills(self) -> int | None:
        """How many processes the OOM killer killed here, if this directory counts them."""
        return None

    def _has_subdirs(self) -> bool:
        # cgroupfs keeps a directory's link count at 2 + its subdirectories: one stat, no listing
        try:
            return os.stat(self.path).st_nlink != 2
        except FileNotFoundError:
            return False

    def procs(self) -> list[int]:
        """Processes in this directory and in any cgroup the container made below it."""
        if not self._has_subdirs():
            try:
                return [int(p) for p in (read(self.file("cgroup.procs")) or "").split()]
            except OSError:
                return []
        out: list[int] = []
        for root, _dirs, files in os.walk(self.path):
            if "cgroup.procs" in files:
                try:
                    out.extend(int(p) for p in (read(os.path.join(root, "cgroup.procs")) or "").split())
                except OSError:
                    pass  # removed while we walk
        return out

    def join(self, pid: int) -> None:
        write(self.file("cgroup.procs"), pid, "cgroups: join")

    def kill_all(self) -> bool:
        """Kill every process at once if the kernel can (cgroup.kill); False when it can't."""
        return False

    def freeze(self, frozen: bool) -> bool:
        """Freeze (or thaw) every process, if this directory can; False when it can't."""
        return False

    def rmdir(self) -> None:
        """Remove the directory and any cgroups the container made below it, deepest first."""
        try:
            os.rmdir(self.path)
            return
        except OSError as e:
            if e.errno not in (_errno.EBUSY, _errno.ENOTEMPTY):
                raise
        for root, dirs, _files in os.walk(self.path, topdown=False):
            for d in dirs:
                try:
                    os.rmdir(os.path.join(root, d))
                except FileNotFoundError:
                    pass
        os.rmdir(self.path)


class CgroupSet:
    """Every cgroup directory of one container: ``leaves`` hold its processes, ``parents`` are
    the directories of the configured parent above them (removed on teardown when nothing else
    uses them; another container's directory below one keeps it)."""

    def __init__(self, leaves: list[CgroupDir], parents: list[str]) -> None:
        self.leaves = leaves
        self.parents = parents

    def __repr__(self) -> str:
        return f"CgroupSet({self.paths!r})"

    @property
    def paths(self) -> list[str]:
        """Every directory the container uses, parents first: what its state file records."""
        return [*self.parents, *(d.path for d in self.leaves)]

    def join(self, pid: int) -> None:
        """Move ``pid`` (0: the caller) into every directory."""
        for d in self.leaves:
            d.join(pid)

    def join_self(self, *, v2: bool = True) -> None:
        """Move the calling process, which must be single-threaded (a freshly forked helper), into
        every v1 directory, and into the cgroup2 one too unless v2 is False.

        A v1 directory takes "0" in ``tasks``: one thread moving itself is the only move the kernel
        makes without taking its threadgroup rwsem for writing, and that write lock costs an RCU
        grace period (5-20 ms here) whenever the lock has been quiet for a while. cgroup2 has no
        such move; the runtime puts the child it forks there with clone3 (libc.clone3).
        """
        for d in self.leaves:
            if d.version == 1:
                write(d.file("tasks"), 0, "cgroups: join")
            elif v2:
                write(d.file("cgroup.procs"), 0, "cgroups: join")

    def v2_leaf(self) -> str | None:
        """The container's cgroup2 directory, if it has one."""
        return next((d.path for d in self.leaves if d.version == 2), None)

    def pids(self) -> set[int]:
        """Every process in any of the container's directories."""
        out: set[int] = set()
        for d in self.leaves:
            out.update(d.procs())
        return out

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process of the container, grandchildren and escapees from PID 1 included.

        With cgroup.kill the kernel kills the whole cgroup at once, forks in flight included.
        Without it, each listed pid gets SIGKILL (under the v1 freezer when there is one, so that
        nothing forks meanwhile) and the list is read again until it is empty: a process forked
        between the read and the kill shows up in the next read.
        Raises TeardownError naming the pids still there after ``timeout`` (a process stuck in D state).
        """
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            killed = any(d.kill_all() for d in self.leaves)
            left = self.pids()
            if not left:
                return
            if killed:
                # a task frozen by the v1 freezer (a paused container) takes its SIGKILL only once thawed
                for d in self.leaves:
                    d.freeze(False)
            else:
                # frozen, nothing forks between the read and the kills; a SIGKILL lands at the thaw
                frozen = [d for d in self.leaves if d.freeze(True)]
                try:
                    for pid in self.pids() if frozen else left:
                        try:
                            os.kill(pid, 9)  # SIGKILL
                        except ProcessLookupError:
                            pass
                finally:
                    for d in frozen:
                        d.freeze(False)
            if time.monotonic() >= deadline:
                where = ", ".join(d.path for d in self.leaves)
                raise TeardownError(f"cgroups: kill: pids {_fmt(left)} still in {where} after {timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def stats(self) -> dict[str, int]:
        """memory_bytes, memory_peak_bytes, cpu_usage_ns, pids, oom_kills: each one present when
        some directory's files hold it. ``oom_kills`` counts processes the OOM killer killed in the
        container: it tells an exit by the OOM killer from any other SIGKILL."""
        out: dict[str, int] = {}
        for d in sorted(self.leaves, key=lambda d: d.version):  # v1 first: it carries the limits on hybrid
            for k, v in d.stats().items():
                out.setdefault(k, v)
        if "pids" not in out and self.leaves:
            out["pids"] = len(self.pids())
        return out

    def oom_kills(self) -> int:
        """Processes of the container the OOM killer killed (0 where no directory counts them):
        what tells an exit by the OOM killer from any other SIGKILL."""
        for d in sorted(self.leaves, key=lambda d: d.version):  # v1 first, as in stats()
            n = d.oom_kills()
            if n is not None:
                return n
        return 0

    def pids_refused(self) -> int:
        """Forks the pids limit refused (pids.events ``max``), 0 where no directory counts them."""
        for d in self.leaves:
            if "pids" in d.limits:
                return read_keyed(d.file("pids.events")).get("max", 0)
        return 0

    def setup_limit_error(self, cfg: Cgroups) -> SetupError | None:
        """The limit of cfg that killed or starved the container's setup, as an error naming the
        field; None when no counter says so. Read it before destroy(): the counters go with the
        directories. nsinit's own setup process runs in these cgroups before the command exists,
        so a limit too small for it ends the setup with a bare ECONNRESET or EAGAIN otherwise."""
        if cfg.memory is not None and self.oom_kills() > 0:
            return SetupError("cgroups.memory", f"{cfg.memory} bytes: the container's setup process was "
                              "OOM-killed during setup: raise it")
        if cfg.pids_limit is not None and self.pids_refused() > 0:
            return SetupError("cgroups.pids_limit", f"{cfg.pids_limit}: a fork was refused during setup "
                              "(PID 1 and the command are 2 processes): raise it")
        return None

    def destroy(self, timeout: float = 5.0) -> list[str]:
        """Remove every directory, once the last process is gone; returns those removed now.

        rmdir answers EBUSY while a process is inside (and, on some kernels, until it is reaped):
        retried with a growing pause until ``timeout``. Then TeardownError names each directory
        still there and the pids in it. Idempotent: a directory already gone is skipped.
        Parents are removed when empty; one still holding another container's cgroup stays.
        """
        deadline = time.monotonic() + timeout
        removed: list[str] = []
        stuck: list[str] = []
        for d in self.leaves:
            pause = 0.002
            while True:
                try:
                    d.rmdir()
                    removed.append(d.path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != _errno.EBUSY or time.monotonic() >= deadline:
                        pids = d.procs() if os.path.isdir(d.path) else []
                        stuck.append(f"{d.path} ({describe(e)}; pids: {_fmt(pids) or 'none'})")
                        break
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        for p in sorted(self.parents, key=len, reverse=True):
            try:
                os.rmdir(p)
                removed.append(p)
            except OSError as e:
                # in use by another container (a child cgroup: EBUSY or ENOTEMPTY), or gone
                if e.errno not in (_errno.EBUSY, _errno.ENOTEMPTY, _errno.ENOENT):
                    stuck.append(f"{p} ({describe(e)})")
        if stuck:
            raise TeardownError(f"cgroups: not removed after {timeout:g} s: " + "; ".join(stuck))
        return removed


def _fmt(pids: set[int] | list[int]) -> str:
    return ", ".join(str(p) for p in sorted(pids))
