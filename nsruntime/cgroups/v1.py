"""cgroup v1: one directory per hierarchy, limits written through cgroupspy's controllers.

cgroupspy is imported only when a limit it covers (memory, cpu, cpuset, blkio) is set: a
container with no limits pays nothing for it. It has no pids controller and no device rule
parser we need, so pids.max and the device lists are written directly.
"""

from __future__ import annotations

import os
import time

from ..errors import SetupError
from .base import CgroupDir, describe, read, read_int, read_keyed, write, write_each, write_raw

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..config import Cgroups, DeviceRule

# docker's default device policy: mknod of any node (opening it is still checked), and read/write
# of the devices every program expects.
DEFAULT_DEVICE_RULES: tuple[str, ...] = (
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:1 rwm",  # console
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pts/*
)


def rule_line(rule: DeviceRule) -> str:
    if rule.type == "a":
        return "a"
    major = "*" if rule.major is None else str(rule.major)
    minor = "*" if rule.minor is None else str(rule.minor)
    return f"{rule.type} {major}:{minor} {rule.access}"


def prepare(path: str, *, fresh: bool = False) -> None:
    """Make a new cpuset directory usable: v1 creates it with empty cpuset.cpus and cpuset.mems,
    and joining such a cgroup fails with ENOSPC. Copy the parent's values down.

    fresh: path was just made by us, so its own values need no reading; a parent found without
    values (made by a concurrent setup that hasn't given it any yet) gets them first.
    """
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not fresh:
            mine = read(os.path.join(path, name))
            if mine is None or mine.strip():
                continue
        up = os.path.dirname(path)
        parent = read(os.path.join(up, name)) or ""
        if fresh and not parent.strip():
            prepare(up)
            parent = read(os.path.join(up, name)) or ""
        write(os.path.join(path, name), parent.strip() or "\n", "cgroups: cpuset init")


class V1Dir(CgroupDir):
    version = 1

    def apply(self, cfg: Cgroups) -> None:
        if self.devices:
            self._devices(cfg)
        if "pids" in self.limits and cfg.pids_limit is not None:
            write(self.file("pids.max"), "max" if cfg.pids_limit < 0 else cfg.pids_limit, "cgroups: pids_limit")
        wanted = {"memory": cfg.memory is not None or cfg.memory_swap is not None,
                  "cpu": any(v is not None for v in (cfg.cpu_shares, cfg.cpu_quota, cfg.cpu_period)),
                  "cpuset": cfg.cpuset_cpus is not None,
                  "blkio": cfg.blkio_weight is not None}  # fmt: skip
        if any(wanted[c] for c in self.limits & wanted.keys()):
            self._limits(cfg)
        self._oci_limits(cfg)

    def _oci_limits(self, cfg: Cgroups) -> None:
        """What only an OCI config sets (podman's --memory-reservation, --memory-swappiness,
        --oom-kill-disable, --cpuset-mems)."""
        if "memory" in self.limits:
            if cfg.memory_reservation is not None:
                write(self.file("memory.soft_limit_in_bytes"), cfg.memory_reservation, "cgroups: memory_reservation")
            if cfg.memory_swappiness is not None:
                write(self.file("memory.swappiness"), cfg.memory_swappiness, "cgroups: memory_swappiness")
            if cfg.oom_kill_disable:
                write(self.file("memory.oom_control"), 1, "cgroups: oom_kill_disable")
        if "cpuset" in self.limits and cfg.cpuset_mems is not None:
            write(self.file("cpuset.mems"), cfg.cpuset_mems, "cgroups: cpuset_mems")
        if "blkio" in self.limits:
            for kind, major, minor, rate in cfg.blkio_throttle or ():
                write(self.file(f"blkio.throttle.{kind}_device"), f"{major}:{minor} {rate}", "cgroups: blkio_throttle")

    def _limits(self, cfg: Cgroups) -> None:
        from cgroupspy import controllers
        from cgroupspy.nodes import Node

        node = Node(os.fsencode(self.path))
        if "memory" in self.limits:
            mem = controllers.MemoryController(node)
            swap = cfg.memory_swap
            if swap is None and cfg.memory is not None:
                # docker's default: as much swap as memory, or a memory limit only moves pages to swap
                swap = 2 * cfg.memory if os.path.exists(self.file("memory.memsw.limit_in_bytes")) else None
            # the kernel keeps memory <= memory+swap at every write: a live container's (update)
            # limits that grow take memsw first, those that shrink take memory first
            memsw_now = read_int(self.file("memory.memsw.limit_in_bytes"))
            swap_first = swap is not None and memsw_now is not None and memsw_now < (cfg.memory or 0)
            if swap_first and swap is not None:
                self._set(mem, "memsw_limit_in_bytes", swap, "memory_swap", "memory.memsw.limit_in_bytes")
            if cfg.memory is not None:
                self._set(mem, "limit_in_bytes", cfg.memory, "memory", "memory.limit_in_bytes")
            if swap is not None and not swap_first:
                self._set(mem, "memsw_limit_in_bytes", swap, "memory_swap", "memory.memsw.limit_in_bytes")
        if "cpu" in self.limits:
            cpu = controllers.CpuController(node)
            if cfg.cpu_shares is not None:
                self._set(cpu, "shares", cfg.cpu_shares, "cpu_shares", "cpu.shares")
            # period before quota: a quota is checked against the period in place
            if cfg.cpu_period is not None:
                self._set(cpu, "cfs_period_us", cfg.cpu_period, "cpu_period", "cpu.cfs_period_us")
            if cfg.cpu_quota is not None:
                self._set(cpu, "cfs_quota_us", cfg.cpu_quota, "cpu_quota", "cpu.cfs_quota_us")
        if "cpuset" in self.limits and cfg.cpuset_cpus is not None:
            cs = controllers.CpuSetController(node)
            self._call(lambda: cs.set_property(b"cpuset.cpus", cfg.cpuset_cpus), cfg.cpuset_cpus,
                       "cpuset_cpus", "cpuset.cpus")
        if "blkio" in self.limits and cfg.blkio_weight is not None:
            blk = controllers.BlkIOController(node)
            if os.path.exists(self.file("blkio.weight")):
                self._set(blk, "weight", cfg.blkio_weight, "blkio_weight", "blkio.weight")
            elif os.path.exists(self.file("blkio.bfq.weight")):
                # CFQ is gone from current kernels; BFQ has the same 1..1000 weight under its own name
                w = cfg.blkio_weight
                self._call(lambda: blk.set_property(b"blkio.bfq.weight", w), w, "blkio_weight", "blkio.bfq.weight")
            else:
                raise SetupError("cgroups: blkio_weight", f"neither blkio.weight nor blkio.bfq.weight in {self.path}: "
                                 "no io scheduler with weights (cfq, bfq) on this kernel")

    def _set(self, ctrl: Any, attr: str, value: int, field: str, filename: str) -> None:
        self._call(lambda: setattr(ctrl, attr, value), value, field, filename)

    def _call(self, fn: Any, value: object, field: str, filename: str) -> None:
        try:
            fn()
        except OSError as e:
            raise SetupError(f"cgroups: {field}",
                             f"write {str(value)!r} to {self.file(filename)}: {describe(e)}") from None

    def _devices(self, cfg: Cgroups) -> None:
        allow, deny = self.file("devices.allow"), self.file("devices.deny")
        if cfg.allow_all_devices:
            write(allow, "a", "cgroups: allow_all_devices")
        else:
            write(deny, "a", "cgroups: devices")
            write_each(allow, DEFAULT_DEVICE_RULES, "cgroups: devices")  # one open, a write(2) per rule
        for rule in cfg.devices:
            write(allow if rule.allow else deny, rule_line(rule), "cgroups: devices")

    def freeze(self, frozen: bool) -> bool:
        state = self.file("freezer.state")
        if not os.path.exists(state):
            return False
        try:
            write_raw(state, "FROZEN" if frozen else "THAWED")
        except OSError:
            return False
        if frozen:
            # FREEZING until every task has stopped: bounded, a task in D state may never stop
            deadline = time.monotonic() + 0.5
            while (read(state) or "").strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.002)
        return True

    def oom_kills(self) -> int | None:
        return read_keyed(self.file("memory.oom_control")).get("oom_kill")

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, name in (("memory_bytes", "memory.usage_in_bytes"), ("memory_peak_bytes", "memory.max_usage_in_bytes"),
                          ("cpu_usage_ns", "cpuacct.usage"), ("pids", "pids.current")):
            v = read_int(self.file(name))
            if v is not None:
                out[key] = v
        oom = read_keyed(self.file("memory.oom_control"))
        if "oom_kill" in oom:
            out["oom_kills"] = oom["oom_kill"]
        return out
