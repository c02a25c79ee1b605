"""container.json -> typed, frozen objects. Every error names the field path.

The format is libcontainer's (the sample in configs/libcontainer-sample/container.json) plus
the fields later libcontainer added (user, working_dir, readonly_fs, no_pivot_root). docs/nsinit.md's
"container.json reference" documents every field; keep the two in step.
"""

from __future__ import annotations

import errno
import os
import stat

from . import capabilities
from .consts import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
)
from .errors import ConfigError
from .fields import _bool, _cap, _expect, _int, _list, _obj, _q, _str, decode_json
from .lean import dumps, frozen

NAMESPACE_FLAGS: dict[str, int] = {
    "NEWUSER": CLONE_NEWUSER,
    "NEWNS": CLONE_NEWNS,
    "NEWUTS": CLONE_NEWUTS,
    "NEWIPC": CLONE_NEWIPC,
    "NEWPID": CLONE_NEWPID,
    "NEWNET": CLONE_NEWNET,
    "NEWCGROUP": CLONE_NEWCGROUP,
}
# /proc/PID/ns/<file> for each, in the order a joining process must enter them (user first).
NAMESPACE_FILES: dict[str, str] = {
    "NEWUSER": "user",
    "NEWIPC": "ipc",
    "NEWUTS": "uts",
    "NEWNET": "net",
    "NEWPID": "pid",
    "NEWCGROUP": "cgroup",
    "NEWNS": "mnt",
}
DEFAULT_NAMESPACES = ("NEWNS", "NEWUTS", "NEWIPC", "NEWPID", "NEWNET")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# runc's defaults
DEFAULT_MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# character classes for the validators (str methods, not re: its import is a few ms of every start)
_DIGITS = "0123456789"
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" + _DIGITS


def _made_of(s: str, chars: str) -> bool:
    """s is not empty and every character of s is in chars."""
    return bool(s) and not s.strip(chars)


def _is_hostname(s: str) -> bool:
    # labels of letters, digits and '-', each starting with a letter or digit, at most 63 long
    return all(1 <= len(label) <= 63 and label[0] in _ALNUM and _made_of(label, _ALNUM + "-")
               for label in s.split("."))


def _is_cpu_list(s: str) -> bool:
    # "0-1,3": numbers and ranges separated by commas
    return all(1 <= len(r.split("-")) <= 2 and all(_made_of(n, _DIGITS) for n in r.split("-"))
               for r in s.split(","))


def _is_user(s: str) -> bool:
    # uid[:gid] or name[:group]: each part starts with [A-Za-z0-9_.] and goes on with [A-Za-z0-9_.-]
    parts = s.split(":")
    return len(parts) <= 2 and all(p[:1] != "-" and _made_of(p, _ALNUM + "_.-") for p in parts)


@frozen
class Mount:
    source: str | None  # None for tmpfs
    destination: str
    writable: bool = False
    private: bool = False
    type: str = "bind"  # bind | tmpfs | cgroup (OCI only: the container's own cgroups at /sys/fs/cgroup)
    optional: bool = False  # skip a bind whose source is missing
    # OCI mounts (nsruntime.oci.spec) say more than container.json can; the defaults are container.json's
    flags: int | None = None  # MS_NOSUID|MS_NODEV|MS_NOEXEC... of the mount; None: nosuid,nodev for a tmpfs
    data: str | None = None  # a tmpfs's options ("size=64m,mode=755"); None: mode=1777
    recursive: bool = True  # a bind takes the mounts below its source along (rbind)
    copy_up: bool = False  # a tmpfs starts as a copy of the directory it covers (OCI "tmpcopyup", runc's)


@frozen
class Route:
    destination: str | None
    source: str | None
    gateway: str | None
    interface_name: str | None


@frozen
class Network:
    type: str  # loopback | veth | netns
    address: str | None = None  # CIDR
    gateway: str | None = None
    mtu: int | None = None
    bridge: str | None = None  # veth: host bridge (context.bridge)
    prefix: str = "veth"  # veth: host-side name prefix (context.prefix)
    path: str | None = None  # netns: namespace file to join (context.path)


@frozen
class DeviceRule:
    allow: bool
    type: str  # a | c | b
    major: int | None  # None = any
    minor: int | None
    access: str  # subset of rwm


@frozen
class Device:
    """A node the runtime makes in the container's /dev (OCI linux.devices)."""

    path: str  # below /dev
    type: str  # c (or u) | b | p
    major: int
    minor: int
    mode: int  # permission bits
    uid: int
    gid: int


@frozen
class Cgroups:
    name: str | None = None
    parent: str = "nsinit"
    memory: int | None = None
    memory_swap: int | None = None
    # OCI only (podman's --memory-reservation, --memory-swappiness, --oom-kill-disable, --cpuset-mems)
    memory_reservation: int | None = None  # a soft limit: v1 memory.soft_limit_in_bytes, v2 memory.low
    memory_swappiness: int | None = None  # v1 only
    oom_kill_disable: bool | None = None  # v1 only (True; None: the kernel's OOM killer as usual)
    cpuset_mems: str | None = None
    # (read_bps | write_bps | read_iops | write_iops, major, minor, rate) per device; None: none
    blkio_throttle: tuple[tuple[str, int, int, int], ...] | None = None
    cpu_shares: int | None = None
    cpu_quota: int | None = None
    cpu_period: int | None = None
    cpuset_cpus: str | None = None
    pids_limit: int | None = None
    blkio_weight: int | None = None
    allow_all_devices: bool = False
    devices: tuple[DeviceRule, ...] = ()
    # the directories of parent are someone else's (a pod's, made by the kubelet's runtime):
    # made when missing, never removed; only the container's own leaf is (OCI cgroupsPath)
    keep_parents: bool = False
    # parent is a path from each hierarchy's root, not from the runtime's own cgroup (an absolute
    # OCI cgroupsPath)
    from_root: bool = False


@frozen
class IdMap:
    container_id: int
    host_id: int
    size: int


@frozen
class Rlimit:
    resource: int  # RLIMIT_NOFILE...
    name: str  # as the config names it, for errors
    soft: int
    hard: int


@frozen
class CapabilitySets:
    """The capabilities the command keeps, set by set (OCI process.capabilities), as numbers."""

    bounding: frozenset[int] = frozenset()
    effective: frozenset[int] = frozenset()
    permitted: frozenset[int] = frozenset()
    inheritable: frozenset[int] = frozenset()
    ambient: frozenset[int] = frozenset()


@frozen
class ContainerConfig:
    hostname: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    tty: bool = False
    namespaces: tuple[str, ...] = DEFAULT_NAMESPACES
    capabilities_mask: frozenset[int] = frozenset()
    mounts: tuple[Mount, ...] = ()
    networks: tuple[Network, ...] = ()
    routes: tuple[Route, ...] = ()
    cgroups: Cgroups = Cgroups()
    apparmor_profile: str | None = None
    user: str | None = None
    working_dir: str = "/"
    readonly_fs: bool = False
    no_pivot_root: bool = False
    no_new_privileges: bool = True
    uid_mappings: tuple[IdMap, ...] = ()
    gid_mappings: tuple[IdMap, ...] = ()
    masked_paths: tuple[str, ...] = DEFAULT_MASKED_PATHS
    readonly_paths: tuple[str, ...] = DEFAULT_READONLY_PATHS
    seccomp: Filter | None = None  # built at parse time, loaded just before execve (seccomp.py)
    # Set only from an OCI config.json (nsruntime.oci.spec); container.json leaves them at these defaults.
    capability_sets: CapabilitySets | None = None  # kept sets; when set, capabilities_mask is not used
    additional_gids: tuple[int, ...] | None = None  # the supplementary groups; None: from /etc/group
    rlimits: tuple[Rlimit, ...] = ()
    sysctl: tuple[tuple[str, str], ...] = ()  # (kernel.msgmax, "4096"): written inside, before the masks
    oom_score_adj: int | None = None
    devices: tuple[Device, ...] = ()  # nodes made in /dev besides the runtime's own
    preserve_fds: int = 0  # the caller's fds 3..3+N-1 go on to the command (OCI --preserve-fds)
    # the propagation of the container's mounts from the host: "rprivate" (none) or "rslave" (the
    # host's mount events reach the container, never the other way: OCI rootfsPropagation)
    root_propagation: str = "rprivate"
    # personality(2) set right before execve (OCI linux.personality: PER_LINUX 0, PER_LINUX32 8)
    personality: int | None = None
    # namespaces joined by path instead of made (NEWIPC, NEWUTS); a network namespace is a Network("netns")
    namespace_joins: tuple[tuple[str, str], ...] = ()
    # the decoded container.json this was parsed from: recorded in state.json for joins and cleanup
    source: Any = None
    _uncompared = ("source",)

    @property
    def clone_flags(self) -> int:
        flags = 0
        for ns in self.namespaces:
            flags |= NAMESPACE_FLAGS[ns]
        if any(n.type == "netns" for n in self.networks):
            flags &= ~CLONE_NEWNET
        return flags

    def env_dict(self) -> dict[str, str]:
        env = dict(self.environment)
        env.setdefault("PATH", DEFAULT_PATH)
        return env

    @property
    def netns_paths(self) -> list[str]:
        """The network namespaces to join (networks of type netns), in order."""
        return [n.path for n in self.networks if n.type == "netns" and n.path]

    @property
    def joins(self) -> list[tuple[str, int]]:
        """(path, CLONE_NEW*) of every namespace PID 1 enters instead of making: the network
        namespace of a netns network, and the namespace_joins."""
        return [(p, CLONE_NEWNET) for p in self.netns_paths] + [(p, NAMESPACE_FLAGS[k])
                                                                 for k, p in self.namespace_joins]

    @property
    def needs_pyroute2(self) -> bool:
        return any(n.type != "loopback" for n in self.networks) or bool(self.routes)


TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from os import PathLike
    from typing import Any, TypeVar

    from .seccomp import Filter

    T = TypeVar("T")



def _abs_path(path: str, value: object) -> str:
    s = _str(path, value)
    if not s.startswith("/"):
        raise ConfigError(path, f'{_q(s)} is not an absolute path')
    return s


def _opt(d: Mapping[str, Any], key: str, path: str, conv: Callable[[str, Any], T], default: T) -> T:
    if key not in d or d[key] is None:
        return default
    return conv(f"{path}.{key}" if path else key, d[key])


def _environment(path: str, value: object) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    items = value.items() if isinstance(value, dict) else None
    if items is not None:
        for k, v in items:
            if not k or "=" in k or "\x00" in k:
                raise ConfigError(f"{path}.{_cap(dumps(k))}", "bad variable name")
            out.append((k, _str(f"{path}.{_cap(k)}", v, empty=True)))
        return tuple(out)
    for i, item in enumerate(_list(path, value)):
        s = _str(f"{path}[{i}]", item)
        name, sep, val = s.partition("=")
        if not sep or not name:
            raise ConfigError(f"{path}[{i}]", f'{_q(s)} is not NAME=VALUE')
        out.append((name, val))
    return tuple(out)


def _namespaces(path: str, value: object) -> tuple[str, ...]:
    names: list[str] = []
    if isinstance(value, dict):  # later libcontainer: {"NEWNET": true, ...}
        for k, v in value.items():
            if k not in NAMESPACE_FLAGS:
                raise ConfigError(f"{path}.{_cap(k)}", f"unknown namespace {_q(k)}")
            if _bool(f"{path}.{k}", v):
                names.append(k)
    else:
        for i, item in enumerate(_list(path, value)):
            s = _str(f"{path}[{i}]", item)
            if s not in NAMESPACE_FLAGS:
                raise ConfigError(f"{path}[{i}]", f'unknown namespace {_q(s)}')
            if s in names:
                raise ConfigError(f"{path}[{i}]", f'namespace {_q(s)} listed twice')
            names.append(s)
    if "NEWNS" not in names:
        raise ConfigError(path, "NEWNS is required (the container's root is set up in its own mount namespace)")
    return tuple(names)


def _capabilities(path: str, value: object) -> frozenset[int]:
    nums: set[int] = set()
    for i, item in enumerate(_list(path, value)):
        s = _str(f"{path}[{i}]", item)
        n = capabilities.number(s)
        if n is None:
            raise ConfigError(f"{path}[{i}]", f'unknown capability {_q(s)} (this kernel knows up to '
                              f"{capabilities.NAMES[capabilities.last_cap()]})")
        nums.add(n)
    return frozenset(nums)


def _mounts(path: str, value: object) -> tuple[Mount, ...]:
    out = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"type", "source", "destination", "writable", "private", "readonly", "optional"})
        kind = _opt(d, "type", p, _str, "bind")
        if kind not in ("bind", "tmpfs"):
            raise ConfigError(f"{p}.type", f'unsupported mount type {_q(kind)} (bind, tmpfs)')
        for req in ("source", "destination") if kind == "bind" else ("destination",):
            if req not in d:
                raise ConfigError(f"{p}.{req}", "missing")
        writable = _opt(d, "writable", p, _bool, kind == "tmpfs")
        if "readonly" in d:
            writable = not _bool(f"{p}.readonly", d["readonly"])
        dest = _abs_path(f"{p}.destination", d["destination"])
        if dest.rstrip("/") == "":
            raise ConfigError(f"{p}.destination", "cannot mount over the container's root")
        source = _abs_path(f"{p}.source", d["source"]) if kind == "bind" else None
        out.append(Mount(source, dest, writable, _opt(d, "private", p, _bool, False), kind,
                         _opt(d, "optional", p, _bool, False)))
    return tuple(out)


def _cidr(path: str, value: object) -> str:
    import ipaddress  # only configs with networks pay for it
    s = _str(path, value)
    try:
        ipaddress.ip_interface(s)
    except ValueError:
        raise ConfigError(path, f'{_q(s)} is not an address in CIDR form (198.18.0.2/24, fd00::2/64)') from None
    if "/" not in s:
        raise ConfigError(path, f'{_q(s)} has no prefix length (198.18.0.2/24)')
    return s


def _ip(path: str, value: object) -> str:
    import ipaddress  # only configs with networks pay for it
    s = _str(path, value)
    try:
        ipaddress.ip_address(s)
    except ValueError:
        raise ConfigError(path, f'{_q(s)} is not an IP address') from None
    return s


def _ifname_prefix(path: str, value: object) -> str:
    s = _str(path, value)
    if len(s) > 7 or not _made_of(s, _ALNUM + "_-"):
        raise ConfigError(path, f'{_q(s)} must be 1..7 characters of [A-Za-z0-9_-] (a unique suffix is added)')
    return s


def _networks(path: str, value: object) -> tuple[Network, ...]:
    import ipaddress  # only configs with networks pay for it
    out = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"type", "address", "gateway", "mtu", "context"})
        if "type" not in d:
            raise ConfigError(f"{p}.type", "missing")
        kind = _str(f"{p}.type", d["type"])
        if kind not in ("loopback", "veth", "netns"):
            raise ConfigError(f"{p}.type", f'unknown network type {_q(kind)} (loopback, veth, netns)')
        ctx = _obj(f"{p}.context", d.get("context") or {}, {"bridge", "prefix", "path"})
        mtu = _opt(d, "mtu", p, lambda q, v: _int(q, v, 68, 65535), None)
        if kind == "loopback":
            # the sample's loopback entry carries "address": "127.0.0.1/0", "gateway": "localhost":
            # neither means anything for lo, so they are accepted and not used.
            out.append(Network("loopback", mtu=mtu))
            continue
        if kind == "netns":
            if "path" not in ctx:
                raise ConfigError(f"{p}.context.path", "missing (the network namespace file to join)")
            out.append(Network("netns", path=_abs_path(f"{p}.context.path", ctx["path"])))
            continue
        if "bridge" not in ctx:
            raise ConfigError(f"{p}.context.bridge", "missing")
        addr = _opt(d, "address", p, _cidr, None)
        gw = _opt(d, "gateway", p, _ip, None)
        if addr and gw and ipaddress.ip_interface(addr).version != ipaddress.ip_address(gw).version:
            raise ConfigError(f"{p}.gateway", f'{_q(gw)} is not of the same IP version as address {_q(addr)}')
        if gw and not addr:
            raise ConfigError(f"{p}.gateway", f'{_q(gw)} needs an address to reach it from')
        if addr and gw:
            iface = ipaddress.ip_interface(addr)
            if ipaddress.ip_address(gw) not in iface.network or ipaddress.ip_address(gw) == iface.ip:
                raise ConfigError(f"{p}.gateway", f'{_q(gw)} is not another host on {iface.network} '
                                  f'(the network of address {_q(addr)})')
        if addr and mtu is not None and mtu < 1280 and ipaddress.ip_interface(addr).version == 6:
            raise ConfigError(f"{p}.mtu", f"{mtu} is below IPv6's minimum of 1280 (address {_q(addr)})")
        out.append(Network("veth", addr, gw, mtu, _str(f"{p}.context.bridge", ctx["bridge"]),
                           _opt(ctx, "prefix", f"{p}.context", _ifname_prefix, "veth")))
    if sum(1 for n in out if n.type == "netns") > 1:
        raise ConfigError(path, "at most one network of type netns")
    return tuple(out)


def _routes(path: str, value: object) -> tuple[Route, ...]:
    import ipaddress  # only configs with networks pay for it
    out = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"destination", "source", "gateway", "interface_name"})

        def cidr_or_default(q: str, v: object) -> str:
            return "default" if v == "default" else _cidr(q, v)

        route = Route(_opt(d, "destination", p, cidr_or_default, None), _opt(d, "source", p, _ip, None),
                      _opt(d, "gateway", p, _ip, None), _opt(d, "interface_name", p, _str, None))
        if route.gateway is None and route.interface_name is None:
            raise ConfigError(p, "needs a gateway or an interface_name")
        versions = {k: ipaddress.ip_interface(v).version for k, v in
                    (("destination", route.destination), ("source", route.source), ("gateway", route.gateway))
                    if v is not None and v != "default"}
        if len(set(versions.values())) > 1:
            raise ConfigError(p, "mixes IPv4 and IPv6 (" + ", ".join(f"{k} IPv{v}" for k, v in versions.items())
                              + ")")
        if route.interface_name is not None and len(route.interface_name.encode()) > 15:
            raise ConfigError(f"{p}.interface_name", f'{_q(route.interface_name)} is longer than 15 bytes')
        out.append(route)
    return tuple(out)


def _devices(path: str, value: object) -> tuple[DeviceRule, ...]:
    out = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"allow", "type", "major", "minor", "access"})
        kind = _opt(d, "type", p, _str, "a")
        if kind not in ("a", "b", "c"):
            raise ConfigError(f"{p}.type", f'{_q(kind)} is not one of a, b, c')
        access = _opt(d, "access", p, _str, "rwm")
        if not access or set(access) - set("rwm"):
            raise ConfigError(f"{p}.access", f'{_q(access)} is not made of r, w, m')
        if kind == "a":  # "a" means every device: a number would be ignored by the kernel, so refuse it
            for num in ("major", "minor"):
                if d.get(num) is not None:
                    raise ConfigError(f"{p}.{num}", 'not allowed with type "a" (all devices)')
        out.append(DeviceRule(_opt(d, "allow", p, _bool, True), kind,
                              _opt(d, "major", p, lambda q, v: _int(q, v, 0), None),
                              _opt(d, "minor", p, lambda q, v: _int(q, v, 0), None), access))
    return tuple(out)


def _cgroup_name(path: str, value: object) -> str:
    s = _str(path, value)
    parts = s.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts) or not _made_of(s, _ALNUM + "_.:/@-"):
        raise ConfigError(path, f'{_q(s)} is not a relative cgroup path of [A-Za-z0-9_.:@-] names')
    return s.strip("/")


# The least memory limit a container can be set up in: nsinit's own setup process (forked from
# the caller, a Python process) runs in the container's cgroup and writes pages of its own there
# before the command exists. `nsinit exec true` in a busybox rootfs needs 2 MiB here (at 1.5 MiB
# the setup is OOM-killed); twice that, for margin.
MIN_MEMORY = 4 << 20
# The kernel keeps a memory limit as a count of pages up to LONG_MAX bytes: above that a value
# is clamped to "no limit", and above 2**64 it wraps (1e29 bytes became 7.9 EB).
_PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_MEMORY = (2**63 - 1) // _PAGE * _PAGE - _PAGE
# PID 1 and the command's process; with NEWUSER, the setup child that makes PID 1 as well.
MIN_PIDS = 2
MIN_PIDS_NEWUSER = 3
MAX_PIDS = 4194304  # PID_MAX_LIMIT: pids.max refuses more
MAX_CPU_QUOTA = 2**44 - 1  # microseconds: cpu.cfs_quota_us refuses more


def _memory(path: str, value: object) -> int:
    n = _expect(path, value, int, "an integer (bytes)")
    if n < MIN_MEMORY:
        raise ConfigError(path, f"{_cap(str(n))} is below the {MIN_MEMORY} bytes (4 MiB) nsinit needs to set the "
                          "container up (its own setup process runs in the container's cgroup)")
    if n > MAX_MEMORY:
        raise ConfigError(path, f"{_cap(str(n))} is more than the kernel can hold as a limit (at most "
                          f"{MAX_MEMORY}; leave the field out for no limit)")
    return n


def _pids_limit(path: str, value: object) -> int:
    n = _int(path, value, -1, MAX_PIDS)
    if 0 <= n < MIN_PIDS:
        raise ConfigError(path, f"{n} is too low: PID 1 and the command need {MIN_PIDS} (-1 for no limit)")
    return n


def _cgroups(path: str, value: object) -> Cgroups:
    d = _obj(path, value, {"name", "parent", "memory", "memory_swap", "cpu_shares", "cpu_quota", "cpu_period",
                           "cpuset_cpus", "pids_limit", "blkio_weight", "allow_all_devices", "devices"})
    mem = _opt(d, "memory", path, _memory, None)
    swap = _opt(d, "memory_swap", path, lambda q, v: _int(q, v, -1, MAX_MEMORY), None)
    if swap is not None and swap != -1 and (mem is None or swap < mem):
        raise ConfigError(f"{path}.memory_swap", "must be -1 or at least memory (memory + swap)")

    def cpuset(q: str, v: object) -> str:
        s = _str(q, v)
        if not _is_cpu_list(s):
            raise ConfigError(q, f'{_q(s)} is not a cpu list like "0-1,3"')
        return s

    def cpu_quota(q: str, v: object) -> int:
        n = _int(q, v, -1, MAX_CPU_QUOTA)
        if 0 <= n < 1000:  # the kernel's minimum quota is 1 ms
            raise ConfigError(q, f"{_cap(str(n))} out of range (-1 for no quota, or >= 1000 microseconds)")
        return n

    return Cgroups(
        name=_opt(d, "name", path, _cgroup_name, None),
        parent=_opt(d, "parent", path, _cgroup_name, "nsinit"),
        memory=mem,
        memory_swap=swap,
        cpu_shares=_opt(d, "cpu_shares", path, lambda q, v: _int(q, v, 2, 262144), None),
        cpu_quota=_opt(d, "cpu_quota", path, cpu_quota, None),
        cpu_period=_opt(d, "cpu_period", path, lambda q, v: _int(q, v, 1000, 1000000), None),
        cpuset_cpus=_opt(d, "cpuset_cpus", path, cpuset, None),
        pids_limit=_opt(d, "pids_limit", path, _pids_limit, None),
        blkio_weight=_opt(d, "blkio_weight", path, lambda q, v: _int(q, v, 10, 1000), None),
        allow_all_devices=_opt(d, "allow_all_devices", path, _bool, False),
        devices=_opt(d, "devices", path, _devices, ()),
    )


def _idmaps(path: str, value: object,
            keys: tuple[str, str, str] = ("container_id", "host_id", "size")) -> tuple[IdMap, ...]:
    """Id mappings; keys name the container id, host id and size fields (an OCI spec spells them
    containerID, hostID, size)."""
    cid, hid, size = keys
    out = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, set(keys))
        for req in keys:
            if req not in d:
                raise ConfigError(f"{p}.{req}", "missing")
        out.append(IdMap(_int(f"{p}.{cid}", d[cid], 0, 2**32 - 2), _int(f"{p}.{hid}", d[hid], 0, 2**32 - 2),
                         _int(f"{p}.{size}", d[size], 1, 2**32 - 1)))
    return tuple(out)


def _user(path: str, value: object) -> str:
    s = _str(path, value)
    if not _is_user(s):
        raise ConfigError(path, f'{_q(s)} is not uid[:gid] or a user name')
    return s


def _hostname(path: str, value: object) -> str:
    s = _str(path, value)
    if len(s) > 64 or not _is_hostname(s):
        raise ConfigError(path, f'{_q(s)} is not a valid host name')
    return s


def _seccomp(path: str, value: object) -> Filter:
    from . import seccomp  # only for a profile: it opens libseccomp, which nothing else needs

    return seccomp.compile(value, path)


def _path_list(path: str, value: object) -> tuple[str, ...]:
    return tuple(_abs_path(f"{path}[{i}]", v) for i, v in enumerate(_list(path, value)))


_FIELDS = {
    "hostname", "environment", "tty", "namespaces", "capabilities_mask", "mounts", "networks", "routes",
    "cgroups", "context", "user", "working_dir", "readonly_fs", "no_pivot_root", "no_new_privileges",
    "uid_mappings", "gid_mappings", "masked_paths", "readonly_paths", "seccomp",
}  # fmt: skip


def parse(data: object) -> ContainerConfig:
    """Validate a decoded container.json; raises ConfigError naming the field path."""
    d = _obj("", data, _FIELDS)
    ctx = _obj("context", d.get("context") or {}, {"apparmor_profile"})
    namespaces: tuple[str, ...] = _opt(d, "namespaces", "", _namespaces, DEFAULT_NAMESPACES)
    networks: tuple[Network, ...] = _opt(d, "networks", "", _networks, ())
    if networks and "NEWNET" not in namespaces and any(n.type == "veth" for n in networks):
        raise ConfigError("networks", "veth networks need the NEWNET namespace")
    no_maps: tuple[IdMap, ...] = ()
    uid_maps = _opt(d, "uid_mappings", "", _idmaps, no_maps)
    gid_maps = _opt(d, "gid_mappings", "", _idmaps, no_maps)
    if "NEWUSER" in namespaces and not uid_maps:
        raise ConfigError("uid_mappings", "required with NEWUSER (who is root inside?)")
    if (uid_maps or gid_maps) and "NEWUSER" not in namespaces:
        raise ConfigError("uid_mappings", "only meaningful with the NEWUSER namespace")
    if "NEWUSER" in namespaces and "NEWPID" not in namespaces:
        # proc may be mounted only by a user namespace that owns the pid namespace it shows
        raise ConfigError("namespaces", "NEWUSER needs NEWPID too: in a user namespace, /proc can be mounted only "
                          "for a pid namespace of its own")
    cgroups = _opt(d, "cgroups", "", _cgroups, Cgroups())
    if "NEWUSER" in namespaces and cgroups.pids_limit is not None and 0 <= cgroups.pids_limit < MIN_PIDS_NEWUSER:
        raise ConfigError("cgroups.pids_limit", f"{cgroups.pids_limit} is too low with NEWUSER: PID 1, the command "
                          f"and the setup process that makes them need {MIN_PIDS_NEWUSER} (-1 for no limit)")
    wd = _opt(d, "working_dir", "", _abs_path, "/")
    return ContainerConfig(
        hostname=_opt(d, "hostname", "", _hostname, None),
        environment=_opt(d, "environment", "", _environment, ()),
        tty=_opt(d, "tty", "", _bool, False),
        namespaces=namespaces,
        capabilities_mask=_opt(d, "capabilities_mask", "", _capabilities, frozenset()),
        mounts=_opt(d, "mounts", "", _mounts, ()),
        networks=networks,
        routes=_opt(d, "routes", "", _routes, ()),
        cgroups=cgroups,
        apparmor_profile=_opt(ctx, "apparmor_profile", "context", _str, None),
        user=_opt(d, "user", "", _user, None),
        working_dir=wd,
        readonly_fs=_opt(d, "readonly_fs", "", _bool, False),
        no_pivot_root=_opt(d, "no_pivot_root", "", _bool, False),
        no_new_privileges=_opt(d, "no_new_privileges", "", _bool, True),
        uid_mappings=uid_maps,
        gid_mappings=gid_maps,
        masked_paths=_opt(d, "masked_paths", "", _path_list, DEFAULT_MASKED_PATHS),
        readonly_paths=_opt(d, "readonly_paths", "", _path_list, DEFAULT_READONLY_PATHS),
        seccomp=_opt(d, "seccomp", "", _seccomp, None),
        source=data,
    )


MAX_CONFIG_BYTES = 1 << 20


def load(path: str | PathLike[str]) -> ContainerConfig:
    """Read and validate a container.json file."""
    p = os.fspath(path)
    try:
        # the file may stand in a rootfs, the container's to replace: a symlink is not followed
        # (onto a host file), and a FIFO or device does not hang or feed the read
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(p, "no such file (a container directory holds a container.json)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(p, "a symbolic link: refused (it is read without following links)") from None
        raise ConfigError(p, f"cannot read: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(p, "not a regular file")
        raw = b""
        while len(raw) <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except OSError as e:
        raise ConfigError(p, f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    data = decode_json(p, raw, MAX_CONFIG_BYTES)
    return parse(data)
