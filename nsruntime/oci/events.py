"""`nsrun events` and `nsrun update`: a live container's cgroups, read and changed.

Stats come in runc's shape (its ``types.Stats``: cpu, memory, pids, blkio, hugetlb...), which
containerd's shim decodes, read straight from each leaf's files: a v1 directory answers for the
controllers its hierarchy carries, the cgroup2 directory for those it has enabled and no v1
hierarchy took. Where no directory has a controller its entry keeps its zero values.

An ``oom`` event is the memory controller's own notice, never a guess from a poll: on v1 an
eventfd registered on memory.oom_control through cgroup.event_control, on cgroup2 a change of
memory.events (POLLPRI) whose oom_kill count grew.
"""

from __future__ import annotations

import os
import select
import time

from ..cgroups import base as cgroups_base
from ..cgroups.detect import hierarchy_of
from ..errors import NsRuntimeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..cgroups.base import CgroupSet

_MAX = 2**64 - 1  # what runc reports for "no limit"
_NS_PER_TICK = 10**9 // os.sysconf("SC_CLK_TCK")


def controller_dirs(cg: CgroupSet) -> dict[str, tuple[int, str]]:
    """controller -> (version, directory): each controller in the one leaf that carries it."""
    out: dict[str, tuple[int, str]] = {}
    v2: str | None = None
    for d in cg.leaves:
        where = hierarchy_of(d.path)
        if where is None:
            continue
        if where[0] == 1:
            for c in where[1]:
                out.setdefault(c, (1, d.path))
        else:
            v2 = d.path
    if v2 is not None:
        for c in (cgroups_base.read(os.path.join(v2, "cgroup.controllers")) or "").split():
            out.setdefault(c, (2, v2))
        out.setdefault("cpuacct", (2, v2))  # cgroup2's cpu.stat counts usage with or without its controller
    return out


def _int(path: str) -> int:
    v = cgroups_base.read(path)
    if v is None:
        return 0
    v = v.strip()
    if v == "max":
        return _MAX
    try:
        return int(v)
    except ValueError:
        return 0


def _keyed(path: str) -> dict[str, int]:
    return cgroups_base.read_keyed(path)


def stats(cg: CgroupSet) -> dict[str, Any]:
    """runc's Stats of the container's cgroups."""
    dirs = controller_dirs(cg)
    cpu: dict[str, Any] = {"usage": {"kernel": 0, "user": 0}, "throttling": {}}
    memory: dict[str, Any] = {"usage": {"limit": 0, "failcnt": 0}, "swap": {"limit": 0, "failcnt": 0},
                              "kernel": {"limit": 0, "failcnt": 0}, "kernelTCP": {"limit": 0, "failcnt": 0}}
    pids: dict[str, int] = {}
    usage = cpu["usage"]
    if "cpuacct" in dirs:
        version, d = dirs["cpuacct"]
        if version == 1:
            usage["total"] = _int(os.path.join(d, "cpuacct.usage"))
            per = (cgroups_base.read(os.path.join(d, "cpuacct.usage_percpu")) or "").split()
            usage["percpu"] = [int(x) for x in per if x.isdigit()]
            ticks = _keyed(os.path.join(d, "cpuacct.stat"))
            usage["kernel"] = ticks.get("system", 0) * _NS_PER_TICK
            usage["user"] = ticks.get("user", 0) * _NS_PER_TICK
        else:
            st = _keyed(os.path.join(d, "cpu.stat"))
            usage["total"] = st.get("usage_usec", 0) * 1000
            usage["kernel"] = st.get("system_usec", 0) * 1000
            usage["user"] = st.get("user_usec", 0) * 1000
    if "cpu" in dirs:
        version, d = dirs["cpu"]
        st = _keyed(os.path.join(d, "cpu.stat"))
        throttled = st.get("throttled_time", 0) if version == 1 else st.get("throttled_usec", 0) * 1000
        cpu["throttling"] = {k: v for k, v in (("periods", st.get("nr_periods", 0)),
                                                ("throttledPeriods", st.get("nr_throttled", 0)),
                                                ("throttledTime", throttled)) if v}
    for k in ("total", "percpu"):
        if not usage.get(k):
            usage.pop(k, None)
    if "memory" in dirs:
        version, d = dirs["memory"]
        raw = _keyed(os.path.join(d, "memory.stat"))
        if version == 1:
            def entry(prefix: str) -> dict[str, int]:
                f = os.path.join(d, prefix)
                return {k: v for k, v in (("limit", _int(f + "limit_in_bytes")), ("usage", _int(f + "usage_in_bytes")),
                                          ("max", _int(f + "max_usage_in_bytes")), ("failcnt", _int(f + "failcnt")))
                        if v or k in ("limit", "failcnt")}

            memory.update(usage=entry("memory."), swap=entry("memory.memsw."), kernel=entry("memory.kmem."),
                          kernelTCP=entry("memory.kmem.tcp."))
            memory["cache"] = raw.get("cache", 0)
        else:
            events = _keyed(os.path.join(d, "memory.events"))
            memory["usage"] = {"limit": _int(os.path.join(d, "memory.max")),
                               "usage": _int(os.path.join(d, "memory.current")),
                               "max": _int(os.path.join(d, "memory.peak")), "failcnt": events.get("max", 0)}
            memory["swap"] = {"limit": _int(os.path.join(d, "memory.swap.max")),
                              "usage": _int(os.path.join(d, "memory.swap.current")), "failcnt": 0}
            memory["cache"] = raw.get("file", 0)
        if raw:
            memory["raw"] = raw
        for k in ("usage", "swap", "kernel", "kernelTCP"):
            memory[k] = {n: v for n, v in memory[k].items() if v or n in ("limit", "failcnt")}
        if not memory.get("cache"):
            memory.pop("cache", None)
    if "pids" in dirs:
        _version, d = dirs["pids"]
        current, limit = _int(os.path.join(d, "pids.current")), _int(os.path.join(d, "pids.max"))
        pids = {k: v for k, v in (("current", current), ("limit", 0 if limit == _MAX else limit)) if v}
    elif cg.leaves:
        pids = {"current": len(cg.pids())}
    return {"cpu": cpu, "cpuset": {"cpu_exclusive": 0, "mem_hardwall": 0, "mem_exclusive": 0, "memory_migrate": 0,
                                   "memory_spread_page": 0, "memory_spread_slab": 0, "memory_pressure": 0,
                                   "sched_load_balance": 0, "sched_relax_domain_level": 0},
            "memory": memory, "pids": pids, "blkio": {}, "hugetlb": {}, "intel_rdt": {}, "network_interfaces": None}


class OomWatch:
    """Readable (``fd``) when the OOM killer acts in the container's memory cgroup; ``fired()``
    says whether it did since the last call (a cgroup2 notice may also be another change)."""

    def __init__(self, version: int, fd: int, events: str | None, directory: str = "") -> None:
        self.version = version
        self.fd = fd
        self._events = events
        self._dir = directory
        self._kills = self._count()

    @classmethod
    def open(cls, cg: CgroupSet) -> OomWatch | None:
        where = controller_dirs(cg).get("memory")
        if where is None:
            return None
        version, d = where
        if version == 2:
            try:
                fd = os.open(os.path.join(d, "memory.events"), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            return cls(2, fd, os.path.join(d, "memory.events"))
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(os.path.join(d, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                cgroups_base.write_raw(os.path.join(d, "cgroup.event_control"), f"{efd} {control}")
            finally:
                os.close(control)
        except OSError as e:
            os.close(efd)
            raise NsRuntimeError(f"events: {d}/cgroup.event_control: {cgroups_base.describe(e)}") from None
        return cls(1, efd, None, d)

    def _count(self) -> int:
        return _keyed(self._events).get("oom_kill", 0) if self._events else 0

    def fired(self) -> bool:
        if self.version == 1:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                return False
            return os.path.isdir(self._dir)  # v1 also signals the eventfd when the cgroup is removed
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.read(self.fd, 4096)  # re-arms POLLPRI
        kills = self._count()
        grew, self._kills = kills > self._kills, kills
        return grew

    def close(self) -> None:
        os.close(self.fd)


def stream(cid: str, cg: CgroupSet, pidfd: int, interval: float, emit: Callable[[dict[str, Any]], None]) -> None:
    """A stats event every interval and an oom event when the OOM killer acts, until PID 1 (pidfd) exits."""
    oom = OomWatch.open(cg)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if oom is not None:
        poller.register(oom.fd, select.POLLPRI if oom.version == 2 else select.POLLIN)
    try:
        due = time.monotonic() + interval
        while True:
            left = due - time.monotonic()
            ready = {fd for fd, _ev in poller.poll(max(0, int(left * 1000 + 0.999)))} if left > 0 else set()
            if oom is not None and oom.fd in ready and oom.fired():
                emit({"type": "oom", "id": cid})
            if pidfd in ready:
                return
            if time.monotonic() >= due:
                emit({"type": "stats", "id": cid, "data": stats(cg)})
                due = time.monotonic() + interval
    finally:
        if oom is not None:
            oom.close()
