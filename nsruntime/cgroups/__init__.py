"""A container's cgroups on v1, v2 and hybrid layouts.

    cg = setup(cfg.cgroups, container_id)  # host side, before fork: one directory per hierarchy
    cg.paths                               # for the state file
    cg.join(pid)                           # in the forked child, for itself, before unshare/fork
    cg.kill(); cg.stats(); cg.destroy()
    from_paths(paths)                      # rebuild from a state file

Where the directories go: ``<own>/<parent>/<name>`` in each hierarchy, ``<own>`` being the
runtime process's own cgroup there (/proc/self/cgroup). A runtime started inside a limited cgroup
keeps its containers inside those limits, and one that may only write below its own cgroup
(delegation) works unchanged. ``name`` defaults to the container id.

The directories of ``parent`` belong to nsinit: made when missing, removed by the teardown that
leaves one empty; with ``keep_parents`` (an OCI cgroupsPath under a pod's directory) they are
made when missing and never removed. A cgroup managed by hand (with its own limits) is the place to *run* nsinit
from, not to name as ``parent``.

Which hierarchies: every v1 hierarchy carrying a controller (named ones such as name=systemd
belong to their manager and are left alone) and the unified one. Each limit goes to the v1
hierarchy of its controller, or to the unified one when v1 doesn't carry that controller and
the unified tree offers it; when neither does, setup refuses rather than run without the limit.
"""

from __future__ import annotations

import os
import time

from ..errors import SetupError, StateError
from .base import STAT_KEYS, CgroupDir, CgroupSet, describe
from .detect import Hierarchy, Layout, hierarchy_of, why_no_hierarchy
from .detect import detect as detect_layout
from .v1 import V1Dir, prepare
from .v2 import V2Dir, enable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..config import Cgroups

__all__ = ["STAT_KEYS", "CgroupSet", "Layout", "detect_layout", "from_paths", "setup"]

# config field -> (v1 controller, v2 controller)
FIELD_CONTROLLERS: dict[str, tuple[str, str]] = {
    "memory": ("memory", "memory"),
    "memory_swap": ("memory", "memory"),
    "cpu_shares": ("cpu", "cpu"),
    "cpu_quota": ("cpu", "cpu"),
    "cpu_period": ("cpu", "cpu"),
    "cpuset_cpus": ("cpuset", "cpuset"),
    "pids_limit": ("pids", "pids"),
    "blkio_weight": ("blkio", "io"),
    "memory_reservation": ("memory", "memory"),
    "memory_swappiness": ("memory", ""),
    "oom_kill_disable": ("memory", ""),
    "cpuset_mems": ("cpuset", "cpuset"),
    "blkio_throttle": ("blkio", "io"),
}
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@-"


def _plan(cfg: Cgroups, layout: Layout) -> dict[Hierarchy, set[str]]:
    """Which hierarchy carries each limit. Decided before any mkdir, so a missing controller
    leaves nothing behind."""
    plan: dict[Hierarchy, set[str]] = {}
    unified = layout.unified
    for field, (c1, c2) in FIELD_CONTROLLERS.items():
        if getattr(cfg, field) is None:
            continue
        h = layout.v1(c1)
        if h is not None:
            plan.setdefault(h, set()).add(c1)
        elif unified is not None and c2 in unified.available():
            plan.setdefault(unified, set()).add(c2)
        elif not c2 and unified is not None and "memory" in unified.available():
            raise SetupError(f"cgroups: {field}", "cgroup v2 has no such setting (the memory controller here is "
                             "v2's)")
        else:
            raise SetupError(f"cgroups: {field}", f"no cgroup hierarchy offers the {c1 if c1 == c2 else c1 + '/' + c2} "
                             f"controller (layout: {layout.kind}; see /proc/self/mountinfo"
                             + (f", {unified.base}/cgroup.controllers" if unified else "") + ")")
    if cfg.devices and layout.v1("devices") is None:
        raise SetupError("cgroups: devices", "device rules need the v1 devices controller; on cgroup v2 they need a "
                         "BPF program, which nsinit does not load")
    return plan


def _mkdir(path: str, cpuset: bool) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as e:
        raise SetupError("cgroups: mkdir", f"mkdir {path}: {describe(e)}") from None
    if cpuset:
        # found or made: a concurrent setup may have made it and not yet given it cpus
        prepare(path)


def _make(h: Hierarchy, rel: list[str], parents: list[str]) -> str:
    """Make ``rel`` below ``h.base``; the directories above the leaf go to ``parents`` whether
    made now or found: they are nsinit's, removed by whichever container leaves them empty.

    The leaf first: its parents are there but for the first container (or after a teardown
    removed the last user's), and then they are made and the leaf tried again.
    """
    chain = []
    cur = h.base
    for comp in rel[:-1]:
        cur = os.path.join(cur, comp)
        chain.append(cur)
        if cur not in parents:
            parents.append(cur)
    cpuset = "cpuset" in h.controllers
    leaf = os.path.join(cur, rel[-1])
    for _attempt in range(5):
        try:
            os.mkdir(leaf, 0o755)
        except FileExistsError:
            raise SetupError("cgroups: mkdir", f"mkdir {leaf}: EEXIST (File exists): a cgroup of that name exists "
                             "(a live container, or one not torn down)") from None
        except FileNotFoundError:
            for d in chain:  # (another container's teardown may remove one again meanwhile: retry)
                _mkdir(d, cpuset)
            continue
        except OSError as e:
            raise SetupError("cgroups: mkdir", f"mkdir {leaf}: {describe(e)}") from None
        if cpuset:
            try:
                prepare(leaf, fresh=True)
            except SetupError:
                os.rmdir(leaf)
                raise
        return leaf
    raise SetupError("cgroups: mkdir", f"mkdir {os.path.join(h.base, *rel)}: ENOENT: its parent keeps disappearing")


def _detect() -> Layout:
    try:
        return detect_layout()
    except OSError as e:
        raise SetupError("cgroups: detect", f"{e.filename}: {describe(e)}") from None


def _targets(layout: Layout) -> list[Hierarchy]:
    return [h for h in layout.hierarchies if h.version == 2 or h.controllers]


def _rooted(cfg: Cgroups, layout: Layout) -> Layout:
    """The layout seen from where cfg's directories start: each hierarchy's root for a path
    from the root (cfg.from_root), else the runtime's own cgroup in it."""
    if not cfg.from_root:
        return layout
    return Layout(tuple(Hierarchy(h.version, h.mountpoint, h.controllers, h.mountpoint, h.name)
                        for h in layout.hierarchies))


def _rel(cfg: Cgroups, container_id: str) -> list[str]:
    # (an empty parent: the leaf right below the runtime's own cgroup)
    return [c for c in (*cfg.parent.split("/"), *(cfg.name or container_id).split("/")) if c not in ("", ".")]


_LAYOUT_TTL = 1.0  # seconds: a supervisor making many containers reads mountinfo once per burst
_layout_cache: tuple[float, Layout] | None = None


def plan(cfg: Cgroups, container_id: str) -> tuple[Layout, list[str]]:
    """The layout, and the directories setup(cfg, container_id, layout=layout) will use, parents
    first as CgroupSet.paths lists them: a state file can record them before they exist, so that
    a crash halfway through setup leaves nothing unrecorded (teardown skips what isn't there)."""
    global _layout_cache
    now = time.monotonic()
    if _layout_cache is not None and now - _layout_cache[0] < _LAYOUT_TTL:
        layout = _layout_cache[1]
    else:
        layout = _detect()
        _layout_cache = (now, layout)
    layout = _rooted(cfg, layout)
    rel = _rel(cfg, container_id)
    parents: list[str] = []
    leaves: list[str] = []
    for h in _targets(layout):
        cur = h.base
        for comp in rel[:-1]:
            cur = os.path.join(cur, comp)
            if cur not in parents:
                parents.append(cur)
        leaves.append(os.path.join(cur, rel[-1]))
    if cfg.keep_parents:
        parents = []  # someone else's: never recorded, so never removed
    return layout, parents + leaves


def setup(cfg: Cgroups, container_id: str, *, layout: Layout | None = None) -> CgroupSet:
    """Make the container's directory in each hierarchy and apply the limits.

    On any failure every directory made so far is removed and SetupError names the step, the path
    and the errno. With the default Cgroups() it only makes the directories: tracking, kill, stats.
    """
    if not container_id or container_id.strip(_ID_CHARS) or container_id in (".", ".."):
        raise SetupError("cgroups", f"container id {container_id!r} is not a cgroup name of [A-Za-z0-9_.:@-]")
    if layout is None:
        layout = _detect()
    layout = _rooted(cfg, layout)
    targets = _targets(layout)
    if not targets:
        raise SetupError("cgroups: detect", why_no_hierarchy())
    plan = _plan(cfg, layout)
    devices_h = layout.v1("devices")
    rel = _rel(cfg, container_id)
    parents: list[str] = []
    leaves: list[CgroupDir] = []
    try:
        for h in targets:
            leaf = _make(h, rel, parents)
            limits = frozenset(plan.get(h, ()))
            if h.version == 1:
                leaves.append(V1Dir(leaf, limits, devices=h == devices_h))
            else:
                leaves.append(V2Dir(leaf, limits))
                if limits:
                    enable(h.base, leaf, limits)
        for d in leaves:
            d.apply(cfg)
    except BaseException:
        _undo(leaves, [] if cfg.keep_parents else parents)
        raise
    return CgroupSet(leaves, [] if cfg.keep_parents else parents)


def _undo(leaves: list[CgroupDir], parents: list[str]) -> None:
    # nothing has joined yet: the leaves are empty; a parent still holding another container stays
    for path in [*(d.path for d in reversed(leaves)), *sorted(parents, key=len, reverse=True)]:
        try:
            os.rmdir(path)
        except OSError:
            pass


def from_paths(paths: list[str]) -> CgroupSet:
    """Rebuild the CgroupSet whose ``paths`` a state file recorded, to join, kill or tear down.

    The leaves are the paths with no other path below them; the rest are parents setup made.
    Each path must lie on a cgroup filesystem (StateError otherwise): a damaged state file must not
    turn teardown loose on other directories.
    """
    norm = [os.path.normpath(p) for p in paths]
    leaves: list[CgroupDir] = []
    parents: list[str] = []
    for p in norm:
        if not os.path.isabs(p):
            raise StateError(f"cgroup path {p!r} is not absolute")
        try:
            where = hierarchy_of(p)
        except OSError as e:
            raise StateError(f"cgroups: {e.filename}: {describe(e)}") from None
        if where is None:
            raise StateError(f"{p} is not on a cgroup filesystem")
        if any(q.startswith(p + "/") for q in norm):
            parents.append(p)
        elif where[0] == 1:
            leaves.append(V1Dir(p))
        else:
            leaves.append(V2Dir(p))
    return CgroupSet(leaves, parents)
