"""Which cgroup hierarchies this process sees, and where its own cgroup is in each.

Read from /proc/self/mountinfo and /proc/self/cgroup rather than assumed: v1 controllers may be
mounted one per hierarchy (``cpu`` and ``cpuacct`` apart) or co-mounted (``cpu,cpuacct``), under
any mount point, and a mount's root need not be the hierarchy's root (a cgroup namespace, or a
bind mount of a sub-tree).

Three layouts come out of it:

- ``v1``: only v1 hierarchies.
- ``v2``: only the unified (cgroup2) hierarchy.
- ``hybrid``: v1 hierarchies carrying the controllers, plus a cgroup2 tree, used here for tracking
  and killing (cgroup.procs, cgroup.events, cgroup.kill) and for any controller v1 doesn't carry.
"""

from __future__ import annotations

import os

from ..lean import frozen, read_file

MOUNTINFO = "/proc/self/mountinfo"
PROC_CGROUP = "/proc/self/cgroup"
NETNS_DIR = "/run/netns"


@frozen
class Hierarchy:
    """One mounted cgroup hierarchy.

    ``base`` is the directory of the calling process's own cgroup in it: container cgroups are
    made below it, so a nested runtime stays inside the limits its caller lives under.
    """

    version: int  # 1 or 2
    mountpoint: str
    controllers: frozenset[str]  # v1: from the mount options (name=... excluded); v2: empty, see available()
    base: str
    name: str | None = None  # v1 named hierarchy (name=systemd)

    def available(self) -> frozenset[str]:
        """Controllers a child of ``base`` can use: v1 all of the mount's; v2 those in cgroup.controllers."""
        if self.version == 1:
            return self.controllers
        try:
            with open(os.path.join(self.base, "cgroup.controllers")) as f:
                return frozenset(f.read().split())
        except OSError:
            return frozenset()


@frozen
class Layout:
    hierarchies: tuple[Hierarchy, ...]

    @property
    def kind(self) -> str:
        v1 = any(h.version == 1 and h.controllers for h in self.hierarchies)
        v2 = self.unified is not None
        if v1 and v2:
            return "hybrid"
        if v2:
            return "v2"
        if v1:
            return "v1"
        return "none"

    @property
    def unified(self) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.version == 2), None)

    def v1(self, controller: str) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.version == 1 and controller in h.controllers), None)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@frozen
class _Mount:
    root: str
    mountpoint: str
    fstype: str
    options: frozenset[str]


def parse_mountinfo(text: str) -> list[_Mount]:
    """The cgroup and cgroup2 mounts, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        opts = frozenset(fields[sep + 3].split(",")) if len(fields) > sep + 3 else frozenset()
        mounts.append(_Mount(_unescape(fields[3]), _unescape(fields[4]), fstype, opts))
    return mounts


def parse_proc_cgroup(text: str) -> dict[frozenset[str] | None, str]:
    """hierarchy key -> this process's cgroup path. The key is the v1 controller set
    (``name=systemd`` included as such) or None for the unified hierarchy."""
    out: dict[frozenset[str] | None, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, ctrls, path = parts
        out[frozenset(ctrls.split(",")) if ctrls else None] = path
    return out


def _below(own: str, root: str, mountpoint: str) -> str | None:
    """The directory of cgroup ``own`` through a mount of hierarchy sub-tree ``root``."""
    if root == "/":
        rel = own
    elif own == root or own.startswith(root.rstrip("/") + "/"):
        rel = own[len(root) :]
    else:
        return None  # this mount doesn't show our cgroup
    return os.path.normpath(mountpoint + "/" + rel.lstrip("/"))


def parse(mountinfo: str, proc_cgroup: str, *, any_root: bool = False) -> Layout:
    """The hierarchies that show this process's cgroup. With any_root (a process in a cgroup
    namespace of its own, which sees its cgroups as "/" and the host's mounts rooted above that)
    every mounted hierarchy it is in counts, and base is only its mountpoint."""
    own = parse_proc_cgroup(proc_cgroup)
    seen: set[frozenset[str] | None] = set()
    hierarchies = []
    for m in parse_mountinfo(mountinfo):
        key: frozenset[str] | None
        if m.fstype == "cgroup2":
            key = None
        else:
            matches = [k for k in own if k is not None and k <= m.options]
            if not matches:
                continue
            key = max(matches, key=len)
        if key in seen or key not in own:
            continue  # the same hierarchy mounted twice: the first mount that shows our cgroup wins
        base = m.mountpoint if any_root else _below(own[key], m.root, m.mountpoint)
        if base is None:
            continue
        seen.add(key)
        if key is None:
            hierarchies.append(Hierarchy(2, m.mountpoint, frozenset(), base))
        else:
            names = [k for k in key if k.startswith("name=")]
            hierarchies.append(Hierarchy(1, m.mountpoint, frozenset(k for k in key if not k.startswith("name=")),
                                         base, names[0][5:] if names else None))
    return Layout(tuple(hierarchies))


def detect(mountinfo_path: str = MOUNTINFO, proc_cgroup_path: str = PROC_CGROUP, *, any_root: bool = False) -> Layout:
    return parse(read_file(mountinfo_path).decode(), read_file(proc_cgroup_path).decode(), any_root=any_root)


def named_netns(netns_dir: str = NETNS_DIR) -> str | None:
    """The name under /run/netns of the network namespace this process is in, if it has one."""
    try:
        own = os.stat("/proc/self/ns/net")
        names = sorted(os.listdir(netns_dir))
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(os.path.join(netns_dir, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return name
    return None


def why_no_hierarchy() -> str:
    """What to tell when no cgroup hierarchy is mounted. The usual cause: `ip netns exec` runs its
    command in a mount namespace of its own with /sys remounted for the network namespace, and
    the cgroup mounts below /sys/fs/cgroup go with the old /sys."""
    name = named_netns()
    if name is None:
        return "no cgroup hierarchy is mounted (see /proc/self/mountinfo)"
    return (f"no cgroup hierarchy is mounted: /sys was remounted for network namespace {name} (as `ip netns exec` "
            f"does), hiding /sys/fs/cgroup; run `nsenter --net=/run/netns/{name} nsinit ...` instead")


def hierarchy_of(path: str, mountinfo_path: str = MOUNTINFO) -> tuple[int, frozenset[str]] | None:
    """(version, v1 controllers) of the cgroup mount holding ``path``, or None when no cgroup
    mount does. Used to rebuild a CgroupSet from the paths in a state file."""
    with open(mountinfo_path) as f:
        mounts = parse_mountinfo(f.read())
    path = os.path.normpath(path)
    best: _Mount | None = None
    for m in mounts:
        mp = m.mountpoint.rstrip("/") or "/"
        if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best.mountpoint)):
            best = m
    if best is None:
        return None
    if best.fstype == "cgroup2":
        return 2, frozenset()
    return 1, frozenset(o for o in best.options if o not in _V1_NON_CONTROLLER_OPTS and "=" not in o)


# mount options of a v1 cgroup mount that are not controller names
_V1_NON_CONTROLLER_OPTS = frozenset(
    {"rw", "ro", "nosuid", "nodev", "noexec", "relatime", "noatime", "strictatime", "nodiratime",
     "xattr", "noprefix", "clone_children", "cpuset_v2_mode", "all", "none", "favordynmods"}
)  # fmt: skip
