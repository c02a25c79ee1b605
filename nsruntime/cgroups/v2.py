"""cgroup v2 (unified): limits through its files; tracking and killing through cgroup.procs,
cgroup.events and cgroup.kill.

Device rules are not enforced here: cgroup v2 has no devices files, only a BPF program attached to
the cgroup, which nsinit does not load. Setup refuses explicit ``devices`` rules when no v1 devices
hierarchy exists, and documents that the default policy is then not enforced.
"""

from __future__ import annotations

import errno as _errno
import os

from ..errors import SetupError, TeardownError
from .base import CgroupDir, describe, read, read_int, read_keyed, write, write_raw

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..config import Cgroups


def shares_to_weight(shares: int) -> int:
    """cpu.shares 2..262144 (default 1024) -> cpu.weight 1..10000 (default 100), linearly."""
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_to_io_weight(weight: int) -> int:
    """blkio.weight 10..1000 (default 500) -> io.weight 1..10000 (default 100), linearly."""
    return 1 + ((weight - 10) * 9999) // 990


def enable(base: str, leaf: str, controllers: frozenset[str]) -> None:
    """Pass ``controllers`` down from ``base`` to ``leaf``: each directory above the leaf must list
    them in cgroup.subtree_control. The kernel refuses (EBUSY) in a non-root cgroup that holds
    processes itself (the no-internal-process rule): run nsinit from a cgroup of its own."""
    rel = os.path.relpath(leaf, base)
    dirs = [base]
    for comp in rel.split("/")[:-1]:
        dirs.append(os.path.join(dirs[-1], comp))
    for d in dirs:
        have = set((read(os.path.join(d, "cgroup.subtree_control")) or "").split())
        for c in sorted(controllers - have):
            path = os.path.join(d, "cgroup.subtree_control")
            try:
                write_raw(path, f"+{c}")
            except OSError as e:
                hint = ""
                if e.errno == _errno.EBUSY:
                    hint = (f": {d} holds processes, and cgroup v2 passes controllers down only from cgroups that "
                            "don't; run nsinit from a cgroup of its own")
                raise SetupError("cgroups: enable controllers",
                                 f"write '+{c}' to {path}: {describe(e)}{hint}") from None


# v1's blkio.throttle.KIND_device -> v2's io.max key
_IO_MAX = {"read_bps": "rbps", "write_bps": "wbps", "read_iops": "riops", "write_iops": "wiops"}


class V2Dir(CgroupDir):
    version = 2

    def apply(self, cfg: Cgroups) -> None:
        if "memory" in self.limits:
            if cfg.memory is not None:
                write(self.file("memory.max"), cfg.memory, "cgroups: memory")
            # v1's memory_swap counts memory + swap; v2's memory.swap.max counts swap alone
            if cfg.memory_swap is not None:
                swap = "max" if cfg.memory_swap < 0 else str(cfg.memory_swap - (cfg.memory or 0))
                write(self.file("memory.swap.max"), swap, "cgroups: memory_swap")
            elif cfg.memory is not None and os.path.exists(self.file("memory.swap.max")):
                write(self.file("memory.swap.max"), cfg.memory, "cgroups: memory_swap")
        if "cpu" in self.limits:
            if cfg.cpu_shares is not None:
                write(self.file("cpu.weight"), shares_to_weight(cfg.cpu_shares), "cgroups: cpu_shares")
            if cfg.cpu_quota is not None or cfg.cpu_period is not None:
                quota = "max" if cfg.cpu_quota is None or cfg.cpu_quota < 0 else str(cfg.cpu_quota)
                write(self.file("cpu.max"), f"{quota} {cfg.cpu_period or 100000}", "cgroups: cpu_quota")
        if "cpuset" in self.limits and cfg.cpuset_cpus is not None:
            write(self.file("cpuset.cpus"), cfg.cpuset_cpus, "cgroups: cpuset_cpus")
        if "pids" in self.limits and cfg.pids_limit is not None:
            write(self.file("pids.max"), "max" if cfg.pids_limit < 0 else cfg.pids_limit, "cgroups: pids_limit")
        if "io" in self.limits and cfg.blkio_weight is not None:
            write(self.file("io.weight"), f"default {blkio_to_io_weight(cfg.blkio_weight)}", "cgroups: blkio_weight")
        if "memory" in self.limits and cfg.memory_reservation is not None:
            write(self.file("memory.low"), cfg.memory_reservation, "cgroups: memory_reservation")
        if "cpuset" in self.limits and cfg.cpuset_mems is not None:
            write(self.file("cpuset.mems"), cfg.cpuset_mems, "cgroups: cpuset_mems")
        if "io" in self.limits:
            for kind, major, minor, rate in cfg.blkio_throttle or ():
                write(self.file("io.max"), f"{major}:{minor} {_IO_MAX[kind]}={rate}", "cgroups: blkio_throttle")

    def kill_all(self) -> bool:
        try:
            fd = os.open(self.file("cgroup.kill"), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # before Linux 5.14
        except OSError as e:
            raise TeardownError(f"cgroups: kill: open {self.file('cgroup.kill')}: {describe(e)}") from None
        try:
            os.write(fd, b"1")
        except OSError as e:
            if e.errno != _errno.ENOENT:
                raise TeardownError(f"cgroups: kill: write '1' to {self.file('cgroup.kill')}: {describe(e)}") from None
        finally:
            os.close(fd)
        return True

    def populated(self) -> bool:
        return read_keyed(self.file("cgroup.events")).get("populated", 0) == 1

    def oom_kills(self) -> int | None:
        return read_keyed(self.file("memory.events")).get("oom_kill")

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, name in (("memory_bytes", "memory.current"), ("memory_peak_bytes", "memory.peak"),
                          ("pids", "pids.current")):
            v = read_int(self.file(name))
            if v is not None:
                out[key] = v
        events = read_keyed(self.file("memory.events"))
        if "oom_kill" in events:
            out["oom_kills"] = events["oom_kill"]
        cpu = read_keyed(self.file("cpu.stat"))
        if "usage_usec" in cpu:
            out["cpu_usage_ns"] = cpu["usage_usec"] * 1000
        return out
