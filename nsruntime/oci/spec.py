"""An OCI bundle's config.json (runtime-spec 1.0 to 1.2) -> the runtime's ContainerConfig.

Every field is either carried over to what the runtime does, or refused with one line naming its
JSON path (``linux.resources.memory.reservation: not supported``): nothing is accepted and then
ignored. Empty values of a field that is not supported (``"hugepageLimits": []``,
``"intelRdt": {}``) are accepted, since they ask for nothing. docs/oci.md lists what is taken and what is refused.

Where the spec and container.json differ:
- capabilities: OCI lists, set by set, what the process *keeps* (container.json's
  capabilities_mask lists what it loses);
- maskedPaths / readonlyPaths / noNewPrivileges: absent means none / false (container.json has
  runc's lists and true as defaults);
- the mounts of /proc, /sys, /dev, /dev/pts, /dev/shm and /dev/mqueue are the runtime's own
  (with its options: see docs/nsinit.md "Always"); a spec entry of the matching type there is
  taken as asking for it.
"""

from __future__ import annotations

import os

from .. import capabilities
from ..config import (
    MAX_MEMORY,
    MAX_PIDS,
    NAMESPACE_FLAGS,
    CapabilitySets,
    Cgroups,
    ContainerConfig,
    Device,
    DeviceRule,
    IdMap,
    Mount,
    Network,
    Rlimit,
    _abs_path,
    _cgroup_name,
    _hostname,
    _is_cpu_list,
    _memory,
)
from ..config import _idmaps as _config_idmaps
from ..consts import (
    MS_DIRSYNC,
    MS_LAZYTIME,
    MS_MANDLOCK,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_NOSYMFOLLOW,
    MS_RDONLY,
    MS_RELATIME,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
)
from ..errors import ConfigError
from ..fields import _bool, _cap, _int, _list, _obj, _q, _str, decode_json
from ..lean import frozen, replace
from . import hooks as oci_hooks
from .hooks import Hook

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SPEC_VERSION = "1.2.0"  # the newest runtime-spec this reads
SUPPORTED_VERSIONS = ("1.0.", "1.1.", "1.2.")
CONFIG_NAME = "config.json"
MAX_SPEC_BYTES = 4 << 20

# spec namespace type -> container.json's name for it
NAMESPACE_TYPES = {"pid": "NEWPID", "network": "NEWNET", "mount": "NEWNS", "ipc": "NEWIPC", "uts": "NEWUTS",
                   "user": "NEWUSER", "cgroup": "NEWCGROUP"}
# namespaces that can be joined by path (others are refused with their path)
# (pid: PID 1 stays where it is born, the command's process and what it forks go into the pid
# namespace joined; a mount or user namespace joined would leave no root or ids of the container's own)
JOINABLE = ("network", "ipc", "uts", "pid", "cgroup")

# mount options that set (or clear) a flag; the rest of a mount's options are its filesystem's data
_SET_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "sync": MS_SYNCHRONOUS,
              "dirsync": MS_DIRSYNC, "mand": MS_MANDLOCK, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
              "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME, "lazytime": MS_LAZYTIME,
              "nosymfollow": MS_NOSYMFOLLOW}
_CLEAR_FLAGS = {"rw": MS_RDONLY, "suid": MS_NOSUID, "dev": MS_NODEV, "exec": MS_NOEXEC, "async": MS_SYNCHRONOUS,
                "nomand": MS_MANDLOCK, "atime": MS_NOATIME, "diratime": MS_NODIRATIME, "norelatime": MS_RELATIME,
                "nostrictatime": MS_STRICTATIME, "nolazytime": MS_LAZYTIME, "symfollow": MS_NOSYMFOLLOW,
                "defaults": 0}
_PROPAGATION = {"private": True, "rprivate": True, "slave": False, "rslave": False}  # -> Mount.private
# linux.rootfsPropagation -> ContainerConfig.root_propagation: always recursive, so that no mount
# below the root stays shared with the host (runc would apply a plain "slave" to / alone)
_ROOT_PROPAGATION = {"private": "rprivate", "rprivate": "rprivate", "slave": "rslave", "rslave": "rslave"}
MOUNT_OPTIONS = sorted([*_SET_FLAGS, *_CLEAR_FLAGS, *_PROPAGATION, "bind", "rbind", "tmpcopyup"])

# (destination, type) the runtime always mounts itself
PROVIDED_MOUNTS = {("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "tmpfs"), ("/dev/pts", "devpts"),
                   ("/dev/shm", "tmpfs"), ("/dev/mqueue", "mqueue")}

# sysctl names that belong to a namespace, and which one (the others would change the host)
_SYSCTL_IPC = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall", "kernel.shmmax",
               "kernel.shmmni", "kernel.shm_rmid_forced")

RLIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
           "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_RSS",
           "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK")
_RLIM_INFINITY = 2**64 - 1


@frozen
class Spec:
    """What `nsrun create` needs of a bundle: the config, the command, the root, the rest of the state."""

    config: ContainerConfig
    args: tuple[str, ...]
    rootfs: str  # absolute
    bundle: str  # absolute
    terminal: bool
    annotations: tuple[tuple[str, str], ...]
    oci_version: str
    hooks: dict[str, tuple[Hook, ...]]  # kind -> hooks, in order (nsruntime/oci/hooks.py runs them)


def _refuse(path: str, why: str = "not supported") -> ConfigError:
    return ConfigError(path, why)


def _empty(v: object) -> bool:
    return v is None or v == [] or v == {} or v == ""


def _only_empty(d: dict[str, Any], path: str, keys: tuple[str, ...], why: str = "not supported") -> None:
    for k in keys:
        if not _empty(d.get(k)):
            raise _refuse(f"{path}.{k}" if path else k, why)


def load(bundle: str) -> Spec:
    """Read and translate bundle/config.json; ConfigError names the file or the JSON path."""
    bundle = os.path.abspath(bundle)
    path = os.path.join(bundle, CONFIG_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(path, (e.strerror or "cannot open").lower()) from None
    try:
        raw = os.read(fd, MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, f"cannot read: {(e.strerror or '').lower()}") from None
    finally:
        os.close(fd)
    data = decode_json(path, raw, MAX_SPEC_BYTES)
    return parse(data, bundle)


def parse(data: object, bundle: str) -> Spec:
    """Translate a decoded config.json whose bundle directory is bundle (absolute)."""
    d = _obj("", data, {"ociVersion", "process", "root", "hostname", "domainname", "mounts", "hooks", "annotations",
                        "linux"})
    if "ociVersion" not in d:
        raise ConfigError("ociVersion", "missing")
    version = _str("ociVersion", d["ociVersion"])
    if not version.startswith(SUPPORTED_VERSIONS):
        raise ConfigError("ociVersion", f"{_q(version)} is not a runtime-spec version this reads (1.0 to 1.2)")
    hooks = oci_hooks.parse(d["hooks"]) if d.get("hooks") is not None else {}
    _only_empty(d, "", ("domainname",))
    if "process" not in d:
        raise ConfigError("process", "missing (nsrun runs a process)")
    if "root" not in d:
        raise ConfigError("root", "missing")
    root = _obj("root", d["root"], {"path", "readonly"})
    if "path" not in root:
        raise ConfigError("root.path", "missing")
    rootfs = os.path.join(bundle, _str("root.path", root["path"]))
    if not os.path.isdir(rootfs):
        raise ConfigError("root.path", f"{rootfs}: no such directory")
    linux = _obj("linux", d.get("linux") or {}, {
        "namespaces", "uidMappings", "gidMappings", "devices", "cgroupsPath", "resources", "sysctl", "seccomp",
        "maskedPaths", "readonlyPaths", "rootfsPropagation", "mountLabel", "intelRdt", "personality",
        "timeOffsets", "memoryPolicy", "netDevices"})
    seccomp_filter = None
    if not _empty(linux.get("seccomp")):
        from .. import seccomp  # opens libseccomp: only for a profile, and before pivot_root

        seccomp_filter = seccomp.compile(linux["seccomp"], "linux.seccomp")
    _only_empty(linux, "linux", ("intelRdt", "timeOffsets", "memoryPolicy", "netDevices"))
    if not _empty(linux.get("mountLabel")):
        raise _refuse("linux.mountLabel", "SELinux is not supported")
    prop = linux.get("rootfsPropagation")
    if not _empty(prop) and prop not in _ROOT_PROPAGATION:
        raise _refuse("linux.rootfsPropagation", f"{_q(str(prop))}: not supported (private, rprivate, slave or "
                      "rslave: the container's mounts never reach the host)")
    namespaces, joins, netns = _namespaces("linux.namespaces", linux.get("namespaces") or [])
    uid_maps = _idmaps("linux.uidMappings", linux.get("uidMappings") or [])
    gid_maps = _idmaps("linux.gidMappings", linux.get("gidMappings") or [])
    if "NEWUSER" in namespaces and not uid_maps:
        raise ConfigError("linux.uidMappings", "required with a user namespace (who is root inside?)")
    if (uid_maps or gid_maps) and "NEWUSER" not in namespaces:
        raise ConfigError("linux.uidMappings", "only meaningful with a user namespace")
    if "NEWUSER" in namespaces and "NEWPID" not in namespaces:
        raise ConfigError("linux.namespaces", "a user namespace needs a pid namespace too: in a user namespace, "
                          "/proc can be mounted only for a pid namespace of its own")
    hostname = None
    if not _empty(d.get("hostname")):
        hostname = _hostname("hostname", d["hostname"])
        if "NEWUTS" not in namespaces:
            raise ConfigError("hostname", "needs a uts namespace of the container's own (not the host's, not "
                              "joined by path)")
    proc = _process("process", d["process"])
    devices = _device_nodes("linux.devices", linux.get("devices") or [])
    cgroups = _resources("linux.resources", linux.get("resources") or {}, linux.get("cgroupsPath"))
    if devices:  # as runc: each node made is also allowed in the devices cgroup
        allowed = tuple(DeviceRule(True, "c" if d.type == "u" else d.type, d.major, d.minor, "rwm")
                        for d in devices if d.type != "p")
        cgroups = replace(cgroups, devices=cgroups.devices + allowed)
    sysctl = _sysctl("linux.sysctl", linux.get("sysctl") or {}, namespaces, joins, netns)
    cfg = ContainerConfig(
        hostname=hostname,
        environment=proc["env"],
        tty=False,
        namespaces=namespaces,
        capabilities_mask=frozenset(),
        mounts=_mounts("mounts", d.get("mounts") or [], bundle),
        networks=(Network("netns", path=netns),) if netns else (),
        cgroups=cgroups,
        apparmor_profile=proc["apparmor"],
        user=proc["user"],
        working_dir=proc["cwd"],
        readonly_fs=_bool("root.readonly", root["readonly"]) if root.get("readonly") is not None else False,
        no_pivot_root=False,
        no_new_privileges=proc["nnp"],
        uid_mappings=uid_maps,
        gid_mappings=gid_maps,
        masked_paths=_paths("linux.maskedPaths", linux.get("maskedPaths") or []),
        readonly_paths=_paths("linux.readonlyPaths", linux.get("readonlyPaths") or []),
        capability_sets=proc["caps"],
        additional_gids=proc["gids"],
        rlimits=proc["rlimits"],
        sysctl=sysctl,
        oom_score_adj=proc["oom"],
        devices=devices,
        root_propagation=_ROOT_PROPAGATION[str(prop)] if not _empty(prop) else "rprivate",
        personality=_personality("linux.personality", linux["personality"]) if not _empty(linux.get("personality"))
        else None,
        namespace_joins=joins,
        seccomp=seccomp_filter,
        source=data,
    )
    annotations = _obj("annotations", d.get("annotations") or {}, set(d.get("annotations") or {}))
    return Spec(cfg, proc["args"], rootfs, bundle, proc["terminal"],
                tuple((k, _str(f"annotations.{_cap(k)}", v, empty=True)) for k, v in annotations.items()), version,
                hooks)


def exec_process(spec: Spec, value: object, path: str = "process") -> tuple[ContainerConfig, tuple[str, ...], bool]:
    """An OCI process (`nsrun exec --process F`) to run in spec's container: the container's config
    with the process's fields in place of its own, the command, and whether it asks for a terminal."""
    proc = _process(path, value)
    cfg = replace(spec.config, environment=proc["env"], apparmor_profile=proc["apparmor"], user=proc["user"],
                  working_dir=proc["cwd"], no_new_privileges=proc["nnp"], capability_sets=proc["caps"],
                  additional_gids=proc["gids"], rlimits=proc["rlimits"], oom_score_adj=proc["oom"])
    return cfg, proc["args"], proc["terminal"]


def _process(path: str, value: object) -> dict[str, Any]:
    d = _obj(path, value, {"terminal", "consoleSize", "user", "args", "commandLine", "env", "cwd", "capabilities",
                           "rlimits", "noNewPrivileges", "apparmorProfile", "oomScoreAdj", "selinuxLabel",
                           "ioPriority", "scheduler", "execCPUAffinity"})
    _only_empty(d, path, ("commandLine", "ioPriority", "scheduler", "execCPUAffinity"))
    if not _empty(d.get("selinuxLabel")):
        raise _refuse(f"{path}.selinuxLabel", "SELinux is not supported")
    terminal = _bool(f"{path}.terminal", d["terminal"]) if d.get("terminal") is not None else False
    if "consoleSize" in d:
        _obj(f"{path}.consoleSize", d["consoleSize"], {"height", "width"})
    args = tuple(_str(f"{path}.args[{i}]", a, empty=i > 0) for i, a in enumerate(_list(f"{path}.args",
                                                                                         d.get("args") or [])))
    if not args:
        raise ConfigError(f"{path}.args", "missing or empty (the command to run)")
    if "cwd" not in d:
        raise ConfigError(f"{path}.cwd", "missing")
    cwd = _abs_path(f"{path}.cwd", d["cwd"])
    env: list[tuple[str, str]] = []
    for i, item in enumerate(_list(f"{path}.env", d.get("env") or [])):
        s = _str(f"{path}.env[{i}]", item)
        name, sep, val = s.partition("=")
        if not sep or not name:
            raise ConfigError(f"{path}.env[{i}]", f"{_q(s)} is not NAME=VALUE")
        env.append((name, val))
    user = _obj(f"{path}.user", d.get("user") or {}, {"uid", "gid", "umask", "additionalGids", "username"})
    _only_empty(user, f"{path}.user", ("username",))
    if user.get("umask") is not None and _int(f"{path}.user.umask", user["umask"], 0, 0o777) != 0o022:
        raise _refuse(f"{path}.user.umask", "only 18 (0022, the runtime's umask) is supported")
    uid = _int(f"{path}.user.uid", user.get("uid", 0), 0, 2**32 - 2)
    gid = _int(f"{path}.user.gid", user.get("gid", 0), 0, 2**32 - 2)
    gids = tuple(_int(f"{path}.user.additionalGids[{i}]", g, 0, 2**32 - 2)
                 for i, g in enumerate(_list(f"{path}.user.additionalGids", user.get("additionalGids") or [])))
    oom = None
    if d.get("oomScoreAdj") is not None:
        oom = _int(f"{path}.oomScoreAdj", d["oomScoreAdj"], -1000, 1000)
    return {
        "terminal": terminal, "args": args, "cwd": cwd, "env": tuple(env),
        "user": f"{uid}:{gid}", "gids": gids,
        "caps": _capabilities(f"{path}.capabilities", d["capabilities"]) if d.get("capabilities") is not None
        else None,
        "rlimits": _rlimits(f"{path}.rlimits", d.get("rlimits") or []),
        "nnp": _bool(f"{path}.noNewPrivileges", d["noNewPrivileges"]) if d.get("noNewPrivileges") is not None
        else False,
        "apparmor": _str(f"{path}.apparmorProfile", d["apparmorProfile"]) if not _empty(d.get("apparmorProfile"))
        else None,
        "oom": oom,
    }


def _capabilities(path: str, value: object) -> CapabilitySets:
    sets = ("bounding", "effective", "permitted", "inheritable", "ambient")
    d = _obj(path, value, set(sets))
    got: dict[str, frozenset[int]] = {}
    for name in sets:
        nums = set()
        for i, item in enumerate(_list(f"{path}.{name}", d.get(name) or [])):
            s = _str(f"{path}.{name}[{i}]", item)
            n = capabilities.number(s) if s.upper().startswith("CAP_") else None
            if n is None:
                raise ConfigError(f"{path}.{name}[{i}]", f"unknown capability {_q(s)} (this kernel knows CAP_CHOWN "
                                  f"to CAP_{capabilities.NAMES[capabilities.last_cap()]})")
            nums.add(n)
        got[name] = frozenset(nums)
    if not got["effective"] <= got["permitted"]:
        extra = capabilities.names(set(got["effective"] - got["permitted"]))
        raise ConfigError(f"{path}.effective", f"{', '.join(extra)} not in permitted (the kernel refuses that)")
    return CapabilitySets(**got)


def _rlimits(path: str, value: object) -> tuple[Rlimit, ...]:
    import resource  # (the host side only: this module is never imported inside a container)

    out: list[Rlimit] = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"type", "soft", "hard"})
        for req in ("type", "soft", "hard"):
            if req not in d:
                raise ConfigError(f"{p}.{req}", "missing")
        kind = _str(f"{p}.type", d["type"])
        if kind not in RLIMITS or not hasattr(resource, kind):
            raise ConfigError(f"{p}.type", f"unknown resource limit {_q(kind)}")
        if any(r.name == kind for r in out):
            raise ConfigError(f"{p}.type", f"{kind} listed twice")
        soft = _int(f"{p}.soft", d["soft"], 0, _RLIM_INFINITY)
        hard = _int(f"{p}.hard", d["hard"], 0, _RLIM_INFINITY)
        if soft > hard:
            raise ConfigError(f"{p}.soft", f"{soft} is above hard ({hard})")

        def inf(n: int) -> int:
            return resource.RLIM_INFINITY if n == _RLIM_INFINITY else n

        out.append(Rlimit(getattr(resource, kind), kind, inf(soft), inf(hard)))
    return tuple(out)


def _namespaces(path: str, value: object) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], str | None]:
    """(namespaces made, (kind, path) joined, the network namespace joined); a type absent is the host's."""
    made: list[str] = []
    joins: list[tuple[str, str]] = []
    netns = None
    seen: set[str] = set()
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"type", "path"})
        if "type" not in d:
            raise ConfigError(f"{p}.type", "missing")
        kind = _str(f"{p}.type", d["type"])
        if kind not in NAMESPACE_TYPES:
            raise ConfigError(f"{p}.type", f"unknown namespace type {_q(kind)}" + (
                " (time namespaces are not supported)" if kind == "time" else ""))
        if kind in seen:
            raise ConfigError(f"{p}.type", f"namespace {_q(kind)} listed twice")
        seen.add(kind)
        name = NAMESPACE_TYPES[kind]
        if _empty(d.get("path")):
            made.append(name)
            continue
        ns_path = _abs_path(f"{p}.path", d["path"])
        if kind not in JOINABLE:
            raise _refuse(f"{p}.path", f"joining a {kind} namespace by path is not supported (only "
                          f"{', '.join(JOINABLE)})")
        if kind == "network":
            made.append(name)  # as container.json's netns network: NEWNET, joined instead of made
            netns = ns_path
        else:
            joins.append((name, ns_path))
    if "NEWNS" not in made:
        raise ConfigError(path, "a mount namespace of the container's own is required (type mount, no path)")
    order = list(NAMESPACE_FLAGS)  # container.json's order: user first
    return tuple(sorted(made, key=order.index)), tuple(joins), netns


_PERSONALITY_DOMAINS = {"LINUX": 0x0000, "LINUX32": 0x0008}  # PER_LINUX, PER_LINUX32 (linux/personality.h)


def _personality(path: str, value: object) -> int:
    """podman's --personality: the domain only, as runc takes it."""
    d = _obj(path, value, {"domain", "flags"})
    _only_empty(d, path, ("flags",))
    if "domain" not in d:
        raise ConfigError(f"{path}.domain", "missing")
    domain = _str(f"{path}.domain", d["domain"])
    if domain not in _PERSONALITY_DOMAINS:
        raise ConfigError(f"{path}.domain", f"{_q(domain)} is not LINUX or LINUX32")
    return _PERSONALITY_DOMAINS[domain]


def _idmaps(path: str, value: object) -> tuple[IdMap, ...]:
    return _config_idmaps(path, value, ("containerID", "hostID", "size"))


def _paths(path: str, value: object) -> tuple[str, ...]:
    return tuple(_abs_path(f"{path}[{i}]", v) for i, v in enumerate(_list(path, value)))


def _mounts(path: str, value: object, bundle: str) -> tuple[Mount, ...]:
    out = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"destination", "type", "source", "options", "uidMappings", "gidMappings"})
        _only_empty(d, p, ("uidMappings", "gidMappings"), "id-mapped mounts are not supported")
        if "destination" not in d:
            raise ConfigError(f"{p}.destination", "missing")
        dest = _str(f"{p}.destination", d["destination"])
        dest = "/" + dest.lstrip("/") if not dest.startswith("/") else dest  # (1.0 allowed relative: runc's way)
        dest = os.path.normpath(dest)
        if dest == "/":
            raise ConfigError(f"{p}.destination", "cannot mount over the container's root")
        kind = _str(f"{p}.type", d["type"]) if not _empty(d.get("type")) else ""
        opts = [_str(f"{p}.options[{j}]", o) for j, o in enumerate(_list(f"{p}.options", d.get("options") or []))]
        if (dest, kind) in PROVIDED_MOUNTS and "bind" not in opts and "rbind" not in opts:
            continue  # the runtime's own, with its own options: see the module's docstring
        flags = 0
        data: list[str] = []
        private = False
        bind = kind == "bind"
        recursive = False
        copy_up = False
        for j, o in enumerate(opts):
            if o == "tmpcopyup":  # runc's extension, in podman's --read-only and --tmpfs mounts
                if kind != "tmpfs" or "bind" in opts or "rbind" in opts:
                    raise ConfigError(f"{p}.options[{j}]", f"{_q(o)} only applies to a tmpfs")
                copy_up = True
            elif o in _SET_FLAGS:
                flags |= _SET_FLAGS[o]
            elif o in _CLEAR_FLAGS:
                flags &= ~_CLEAR_FLAGS[o]
            elif o in _PROPAGATION:
                private = _PROPAGATION[o]
            elif o in ("bind", "rbind"):
                bind = True
                recursive = recursive or o == "rbind"
            elif "=" in o and kind == "tmpfs":
                data.append(o)
            else:
                raise ConfigError(f"{p}.options[{j}]", f"unsupported mount option {_q(o)}")
        if bind:
            if _empty(d.get("source")):
                raise ConfigError(f"{p}.source", "missing (a bind mount binds a source)")
            source = os.path.join(bundle, _str(f"{p}.source", d["source"]))
            out.append(Mount(source, dest, writable=not flags & MS_RDONLY, private=private, type="bind",
                             flags=flags & ~MS_RDONLY, recursive=recursive))
        elif kind == "tmpfs":
            out.append(Mount(None, dest, writable=True, private=private, type="tmpfs", flags=flags,
                             data=",".join(data) or None, copy_up=copy_up))
        elif kind in ("cgroup", "cgroup2") and dest == "/sys/fs/cgroup":
            # the container's own cgroups, whichever of the two types is asked: the host's layout decides
            out.append(Mount(None, dest, writable=not flags & MS_RDONLY, private=private, type="cgroup",
                             flags=flags & ~MS_RDONLY))
        else:
            raise _refuse(f"{p}.type", f"unsupported mount type {_q(kind)} at {_q(dest)} (bind, tmpfs; proc, sysfs, "
                          "devpts and mqueue only where the runtime mounts them itself)")
    return tuple(out)


def _resources(path: str, value: object, cgroups_path: object) -> Cgroups:
    d = _obj(path, value, {"devices", "memory", "cpu", "pids", "blockIO", "hugepageLimits", "network", "rdma",
                           "unified"})
    _only_empty(d, path, ("hugepageLimits", "network", "rdma", "unified"))
    fields: dict[str, Any] = {}
    mem = _obj(f"{path}.memory", d.get("memory") or {}, {"limit", "reservation", "swap", "kernel", "kernelTCP",
                                                          "swappiness", "disableOOMKiller", "useHierarchy",
                                                          "checkBeforeUpdate"})
    _only_empty(mem, f"{path}.memory", ("kernel", "kernelTCP", "useHierarchy", "checkBeforeUpdate"))
    if mem.get("reservation") is not None:
        reservation = _int(f"{path}.memory.reservation", mem["reservation"], -1, MAX_MEMORY)
        if reservation >= 0:
            fields["memory_reservation"] = reservation
    if mem.get("swappiness") is not None:
        fields["memory_swappiness"] = _int(f"{path}.memory.swappiness", mem["swappiness"], 0, 100)
    if mem.get("disableOOMKiller") is not None and _bool(f"{path}.memory.disableOOMKiller", mem["disableOOMKiller"]):
        fields["oom_kill_disable"] = True
    if mem.get("limit") is not None and mem["limit"] != -1:
        fields["memory"] = _memory(f"{path}.memory.limit", mem["limit"])
    if mem.get("swap") is not None:
        swap = _int(f"{path}.memory.swap", mem["swap"], -1, MAX_MEMORY)
        if swap != -1 and ("memory" not in fields or swap < fields["memory"]):
            raise ConfigError(f"{path}.memory.swap", "must be -1 or at least memory.limit (memory + swap)")
        fields["memory_swap"] = swap
    cpu = _obj(f"{path}.cpu", d.get("cpu") or {}, {"shares", "quota", "burst", "period", "realtimeRuntime",
                                                    "realtimePeriod", "cpus", "mems", "idle"})
    _only_empty(cpu, f"{path}.cpu", ("burst", "realtimeRuntime", "realtimePeriod"))
    if cpu.get("idle"):
        raise _refuse(f"{path}.cpu.idle")
    if cpu.get("shares"):
        fields["cpu_shares"] = _int(f"{path}.cpu.shares", cpu["shares"], 2, 262144)
    if cpu.get("quota") is not None and cpu["quota"] not in (0, -1):
        fields["cpu_quota"] = _int(f"{path}.cpu.quota", cpu["quota"], 1000, 2**44 - 1)
    if cpu.get("period"):
        fields["cpu_period"] = _int(f"{path}.cpu.period", cpu["period"], 1000, 1000000)
    if not _empty(cpu.get("cpus")):
        s = _str(f"{path}.cpu.cpus", cpu["cpus"])
        if not _is_cpu_list(s):
            raise ConfigError(f"{path}.cpu.cpus", f'{_q(s)} is not a cpu list like "0-1,3"')
        fields["cpuset_cpus"] = s
    if not _empty(cpu.get("mems")):
        s = _str(f"{path}.cpu.mems", cpu["mems"])
        if not _is_cpu_list(s):
            raise ConfigError(f"{path}.cpu.mems", f'{_q(s)} is not a node list like "0-1,3"')
        fields["cpuset_mems"] = s
    pids = _obj(f"{path}.pids", d.get("pids") or {}, {"limit"})
    if pids.get("limit") is not None:
        n = _int(f"{path}.pids.limit", pids["limit"], -1, MAX_PIDS)
        if n > 0:
            if n < 2:
                raise ConfigError(f"{path}.pids.limit", f"{n} is too low: PID 1 and the command need 2 (0 or -1 for "
                                  "no limit)")
            fields["pids_limit"] = n
    blkio = _obj(f"{path}.blockIO", d.get("blockIO") or {}, {"weight", "leafWeight", "weightDevice",
                                                             "throttleReadBpsDevice", "throttleWriteBpsDevice",
                                                             "throttleReadIOPSDevice", "throttleWriteIOPSDevice"})
    _only_empty(blkio, f"{path}.blockIO", ("leafWeight", "weightDevice"))
    throttle = []
    for key, kind in (("throttleReadBpsDevice", "read_bps"), ("throttleWriteBpsDevice", "write_bps"),
                      ("throttleReadIOPSDevice", "read_iops"), ("throttleWriteIOPSDevice", "write_iops")):
        for i, item in enumerate(_list(f"{path}.blockIO.{key}", blkio.get(key) or [])):
            p = f"{path}.blockIO.{key}[{i}]"
            dev = _obj(p, item, {"major", "minor", "rate"})
            for k in ("major", "minor", "rate"):
                if k not in dev:
                    raise ConfigError(f"{p}.{k}", "missing")
            throttle.append((kind, _int(f"{p}.major", dev["major"], 0, 4095), _int(f"{p}.minor", dev["minor"], 0,
                             2**20 - 1), _int(f"{p}.rate", dev["rate"], 0, 2**64 - 1)))
    if throttle:
        fields["blkio_throttle"] = tuple(throttle)
    if blkio.get("weight"):
        fields["blkio_weight"] = _int(f"{path}.blockIO.weight", blkio["weight"], 10, 1000)
    rules = list(_devices(f"{path}.devices", d.get("devices") or []))
    # a leading "deny all" (runc's spec starts so) is the runtime's own baseline, which then allows
    # the devices its /dev holds (cgroups/v1.py DEFAULT_DEVICE_RULES); a leading "allow all" lifts it
    if rules and (rules[0].type, rules[0].major, rules[0].minor) == ("a", None, None) and rules[0].access == "rwm":
        fields["allow_all_devices"] = rules.pop(0).allow
    if rules:
        fields["devices"] = tuple(rules)
    parent, name, keep = "nsrun", None, False
    if not _empty(cgroups_path):
        s = _str("linux.cgroupsPath", cgroups_path)
        if s.count(":") == 2 and not s.startswith("/"):  # systemd's "slice:prefix:name" (see docs/oci.md)
            slice_, prefix, unit = s.split(":")
            s = f"{slice_}/{prefix}-{unit}" if prefix else f"{slice_}/{unit}"
        rel = _cgroup_name("linux.cgroupsPath", s)
        parent, _, name = rel.rpartition("/")
        keep = True
        # absolute: from each hierarchy's root (runc's reading, which podman's /libpod_parent/libpod-ID
        # and containerd's /default/ID expect); relative: below nsrun's own cgroup
        fields["from_root"] = s.startswith("/")
    return Cgroups(name=name, parent=parent, keep_parents=keep, **fields)


_DEVICE_TYPES = ("c", "u", "b", "p")
_MOUNTED_IN_DEV = ("pts", "shm", "mqueue")  # the runtime's mounts in /dev: no node goes below them


def _device_nodes(path: str, value: object) -> tuple[Device, ...]:
    out: list[Device] = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"path", "type", "major", "minor", "fileMode", "uid", "gid"})
        for req in ("path", "type"):
            if req not in d:
                raise ConfigError(f"{p}.{req}", "missing")
        where = os.path.normpath(_abs_path(f"{p}.path", d["path"]))
        parts = where.split("/")
        if len(parts) < 3 or parts[1] != "dev" or parts[2] in _MOUNTED_IN_DEV:
            raise _refuse(f"{p}.path", f"{_q(where)}: only below /dev (nodes go in the runtime's /dev tmpfs, not "
                          "in /dev/pts, /dev/shm or /dev/mqueue)")
        kind = _str(f"{p}.type", d["type"])
        if kind not in _DEVICE_TYPES:
            raise ConfigError(f"{p}.type", f"{_q(kind)} is not one of c, u, b, p")
        numbers = [0, 0]
        for j, k in enumerate(("major", "minor")):
            if kind != "p" and d.get(k) is None:
                raise ConfigError(f"{p}.{k}", f"missing (a {kind} device has one)")
            numbers[j] = _int(f"{p}.{k}", d.get(k) or 0, 0, 2**32 - 1)
        mode = _int(f"{p}.fileMode", d["fileMode"], 0, 2**32 - 1) & 0o7777 if d.get("fileMode") is not None \
            else 0o666
        uid = _int(f"{p}.uid", d.get("uid") or 0, 0, 2**32 - 2)
        gid = _int(f"{p}.gid", d.get("gid") or 0, 0, 2**32 - 2)
        if any(o.path == where for o in out):
            raise ConfigError(f"{p}.path", f"{_q(where)} listed twice")
        out.append(Device(where, kind, numbers[0], numbers[1], mode, uid, gid))
    return tuple(out)


def resources(path: str, value: object) -> Cgroups:
    """An OCI LinuxResources object alone (`nsrun update --resources`): the limits it sets."""
    return _resources(path, value, None)


def _devices(path: str, value: object) -> tuple[DeviceRule, ...]:
    out = []
    for i, item in enumerate(_list(path, value)):
        p = f"{path}[{i}]"
        d = _obj(p, item, {"allow", "type", "major", "minor", "access"})
        if "allow" not in d:
            raise ConfigError(f"{p}.allow", "missing")
        kind = _str(f"{p}.type", d["type"]) if not _empty(d.get("type")) else "a"
        if kind not in ("a", "b", "c"):
            raise ConfigError(f"{p}.type", f"{_q(kind)} is not one of a, b, c")
        access = _str(f"{p}.access", d["access"]) if not _empty(d.get("access")) else "rwm"
        if set(access) - set("rwm"):
            raise ConfigError(f"{p}.access", f"{_q(access)} is not made of r, w, m")

        def num(k: str, d: dict[str, Any] = d, p: str = p) -> int | None:
            v = d.get(k)
            return None if v is None or v == -1 else _int(f"{p}.{k}", v, 0)

        major, minor = num("major"), num("minor")
        if kind == "a" and (major is not None or minor is not None):
            raise ConfigError(p, 'a major or minor number with type "a" (all devices)')
        out.append(DeviceRule(_bool(f"{p}.allow", d["allow"]), kind, major, minor, access))
    return tuple(out)


def _sysctl(path: str, value: object, namespaces: tuple[str, ...], joins: tuple[tuple[str, str], ...],
            netns: str | None) -> tuple[tuple[str, str], ...]:
    d = _obj(path, value, set(value) if isinstance(value, dict) else set())
    own_ipc = "NEWIPC" in namespaces or any(k == "NEWIPC" for k, _p in joins)
    out = []
    for key, v in d.items():
        p = f"{path}.{_cap(key)}"
        val = _str(p, v, empty=True)
        if not key or key.strip("abcdefghijklmnopqrstuvwxyz0123456789_.-/") or ".." in key or key.startswith("."):
            raise ConfigError(p, "not a sysctl name")
        if key in _SYSCTL_IPC or key.startswith("fs.mqueue."):
            if not own_ipc:
                raise ConfigError(p, "needs an ipc namespace of the container's (else it would change the host)")
        elif key.startswith("net."):
            if "NEWNET" not in namespaces or netns is not None:
                raise ConfigError(p, "needs a network namespace made for the container (else it would change the "
                                  "host or the namespace joined)")
        elif key in ("kernel.hostname", "kernel.domainname"):
            if "NEWUTS" not in namespaces:
                raise ConfigError(p, "needs a uts namespace of the container's own")
        else:
            raise ConfigError(p, "not in a namespace the container has: it would change the host")
        out.append((key, val))
    return tuple(out)
