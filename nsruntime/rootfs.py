"""The container's filesystem: runs in the container's PID 1, inside its new mount namespace.

Order matters and is the kernel's, not ours: propagation private (or slave) first (or every
mount below reaches the host), the rootfs bound onto itself (pivot_root wants a mount point), /proc, /sys,
/dev, then the config's mounts (on top of those three, not hidden below them), then pivot_root,
then masks and read-only remounts from inside (/container.json among them).

Everything under the rootfs is the container's to replace by a symlink, even while we set it up
(its earlier run, or another container on the same rootfs). So no path below the rootfs is ever
used as a string before pivot_root: each is looked up inside the root (openat2 RESOLVE_IN_ROOT)
to an fd, and mounted on through /proc/self/fd/N or filled with *at() calls on that fd.
"""

from __future__ import annotations

import errno
import os
import stat

from . import libc
from .config import ContainerConfig, Device, Mount
from .errors import SetupError, SyscallError
from .lean import suppress

#: The config at the rootfs's top (libcontainer's layout): the next `nsinit exec` there reads it,
#: so the container sees it read-only (a container that keeps CAP_SYS_ADMIN can still unmount it).
CONFIG_FILE = "container.json"
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_O_PATH = getattr(os, "O_PATH", 0o10000000)


def _step(step: str, err: OSError) -> SetupError:
    """One line: the step (naming its path) and the failed call."""
    if isinstance(err, SyscallError):
        return SetupError(step, str(err))
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    call = f"{err.filename}: " if err.filename else ""
    return SetupError(step, f"{call}{name} ({err.strerror})")


def resolve_in_root(root: str, dest: str, *, make: str | None) -> int:
    """Open dest inside root as O_PATH, resolving every symlink and '..' as if root were '/'.

    A destination that is, or passes through, a symlink pointing outside the rootfs lands inside
    it instead of on the host (the class of CVE-2021-30465). Missing components are created when
    ``make`` is "dir" or "file". Returns an fd; mount onto /proc/self/fd/N to hit exactly it.
    """
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            return libc.openat2(rootfd, dest, _O_PATH | os.O_CLOEXEC, libc.RESOLVE_IN_ROOT)
        except SyscallError as e:
            if e.errno != errno.ENOENT or make is None:
                raise
        _make_in_root(rootfd, dest, make)
        return libc.openat2(rootfd, dest, _O_PATH | os.O_CLOEXEC, libc.RESOLVE_IN_ROOT)
    finally:
        os.close(rootfd)


def _make_in_root(rootfd: int, dest: str, make: str) -> None:
    """Create the missing components of dest, following symlinks the way RESOLVE_IN_ROOT does:
    an absolute link target restarts at the rootfs, '..' never climbs above it."""
    parts = dest.split("/")[::-1]  # a stack: the next component last
    cur = "/"
    hops = 0
    while parts:
        part = parts.pop()
        if part in ("", "."):
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        parent = libc.openat2(rootfd, cur, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, libc.RESOLVE_IN_ROOT)
        try:
            try:
                target = os.readlink(part, dir_fd=parent)
            except FileNotFoundError:
                try:
                    if any(p not in ("", ".") for p in parts) or make == "dir":
                        os.mkdir(part, 0o755, dir_fd=parent)
                    else:
                        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                        os.close(os.open(part, flags, 0o644, dir_fd=parent))
                except FileExistsError:
                    # another container on this rootfs made it meanwhile: look at it again (it may
                    # be a symlink), a bounded number of times
                    hops += 1
                    if hops > 40:
                        raise SyscallError(f"resolve {dest!r} in the rootfs", errno.ELOOP) from None
                    parts.append(part)
                    continue
                cur = os.path.join(cur, part)
                continue
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: it exists and is not a symlink
                    raise
                cur = os.path.join(cur, part)
                continue
        finally:
            os.close(parent)
        hops += 1
        if hops > 40:
            raise SyscallError(f"resolve {dest!r} in the rootfs", errno.ELOOP)
        if target.startswith("/"):
            cur = "/"
        parts.extend(reversed(target.split("/")))


def _mount_fd(fd: int, dest: str, source: str | None, fstype: str | None, flags: int,
              data: str | None = None) -> None:
    """mount(2) onto what fd names (through /proc/self/fd); a failure names dest, not the fd."""
    try:
        libc.mount(source, f"/proc/self/fd/{fd}", fstype, flags, data)
    except SyscallError as e:
        what = f"{source!r} -> {dest!r}" if source else repr(dest)
        raise SyscallError(f"mount({what}, type={fstype}, flags={flags:#x})", e.errno or 0) from None


def _mount_at(root: str, dest: str, make: str | None, source: str | None, fstype: str | None, flags: int,
              data: str | None = None) -> None:
    """Mount onto dest resolved inside root: through the fd, so a symlink swapped in after the
    lookup changes nothing."""
    fd = resolve_in_root(root, dest, make=make)
    try:
        _mount_fd(fd, dest, source, fstype, flags, data)
    finally:
        os.close(fd)


def _remount_at(root: str, dest: str, flags: int) -> None:
    """Change the flags of the mount now on top of dest, looked up inside root again: the fd a
    mount was made through names the directory underneath it, not the new mount."""
    _mount_at(root, dest, None, None, None, flags)


def _mount_in_dev(dirfd: int, name: str, source: str | None, fstype: str | None, flags: int,
              data: str | None = None, *, where: str = "/dev") -> None:
    """Mount onto the entry ``name`` of /dev (or ``where``), open as dirfd, never following a symlink there."""
    fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        _mount_fd(fd, f"{where}/{name}", source, fstype, flags, data)
    finally:
        os.close(fd)


def _mount_tmpfs_copy_up(root: str, dest: str, flags: int, data: str | None) -> None:
    """A tmpfs on dest that starts as a copy of the directory it covers (OCI's "tmpcopyup", a runc
    extension podman uses for --read-only and --tmpfs), with that directory's mode and owner unless
    data names them. The directory is opened before the mount hides it and read through that fd;
    the copy is written through an fd of the new tmpfs, so no path of the rootfs is followed. A
    read-only tmpfs is filled first, then made read-only."""
    below = resolve_in_root(root, dest, make="dir")
    try:
        src = os.open(f"/proc/self/fd/{below}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _mount_fd(below, dest, "tmpfs", "tmpfs", flags & ~libc.MS_RDONLY, data)
            top = resolve_in_root(root, dest, make=None)
            try:
                dst = os.open(f"/proc/self/fd/{top}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            finally:
                os.close(top)
            try:
                _copy_tree(src, dst)
                st = os.fstat(src)
                opts = [o.partition("=")[0] for o in (data or "").split(",")]
                if "uid" not in opts and "gid" not in opts:
                    os.fchown(dst, st.st_uid, st.st_gid)
                if "mode" not in opts:
                    os.fchmod(dst, stat.S_IMODE(st.st_mode))
            finally:
                os.close(dst)
        finally:
            os.close(src)
    finally:
        os.close(below)
    if flags & libc.MS_RDONLY:
        _remount_at(root, dest, flags | libc.MS_REMOUNT | libc.MS_BIND)


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_tree(src: int, dst: int) -> None:
    """Copy the entries of directory src into directory dst (both fds; *at() calls only, symlinks
    copied as symlinks, never followed), with their modes, owners and times."""
    for name in os.listdir(src):
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFLNK:
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
            continue
        if kind == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=dst)
            s, d = os.open(name, _NOFOLLOW_DIR, dir_fd=src), os.open(name, _NOFOLLOW_DIR, dir_fd=dst)
        elif kind == stat.S_IFREG:
            s = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
            d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst)
        else:  # fifo, device, socket: the node itself
            os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dst)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
            continue
        try:
            if kind == stat.S_IFDIR:
                _copy_tree(s, d)
            else:
                while os.sendfile(d, s, None, 1 << 20):
                    pass
            os.fchown(d, st.st_uid, st.st_gid)  # before the mode: chown clears set-id bits
            os.fchmod(d, stat.S_IMODE(st.st_mode))
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(s)
            os.close(d)


_CGROUP_ROOT = "/sys/fs/cgroup"


def _mount_cgroups(root: str, m: Mount, own_ns: bool) -> None:
    """/sys/fs/cgroup as the container's own cgroups, laid out as the host's are.

    With a cgroup namespace of its own each hierarchy is mounted afresh: the kernel roots it at
    the namespace's root, the container's cgroup. Without one a fresh mount would show the host's
    whole tree, so the container's own directories are bound instead (found from
    /proc/self/cgroup: this process already sits in them). On the hybrid and v1 layouts a tmpfs
    holds one directory per hierarchy, named as on the host, with the host's links between them
    (cpu -> cpu,cpuacct).
    """
    from .cgroups.detect import detect  # (forked: already loaded by the creator)

    base = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC | (m.flags or 0)
    ro = 0 if m.writable else libc.MS_RDONLY
    targets = [h for h in detect(any_root=own_ns).hierarchies if h.version == 2 or h.controllers]
    if len(targets) == 1 and targets[0].version == 2 and targets[0].mountpoint == _CGROUP_ROOT:
        h = targets[0]
        if own_ns:
            _mount_at(root, m.destination, "dir", "cgroup2", "cgroup2", base | ro)
        else:
            _mount_at(root, m.destination, "dir", h.base, None, libc.MS_BIND)
            _remount_at(root, m.destination, libc.MS_BIND | libc.MS_REMOUNT | base | ro)
        return
    _mount_at(root, m.destination, "dir", "tmpfs", "tmpfs", base, "mode=755")
    dirfd = resolve_in_root(root, m.destination, make=None)
    try:
        names = set()
        for h in targets:
            parent, name = os.path.split(h.mountpoint)
            if parent != _CGROUP_ROOT:  # mounted elsewhere on the host: name it by what it carries
                name = ",".join(sorted(h.controllers)) or "unified"
            os.mkdir(name, 0o555, dir_fd=dirfd)
            names.add(name)
            if own_ns:
                kind = "cgroup" if h.version == 1 else "cgroup2"
                _mount_in_dev(dirfd, name, kind, kind, base | ro, ",".join(sorted(h.controllers)) or None,
                              where=m.destination)
            else:
                _mount_in_dev(dirfd, name, h.base, None, libc.MS_BIND, where=m.destination)
                _mount_in_dev(dirfd, name, None, None, libc.MS_BIND | libc.MS_REMOUNT | base | ro,
                              where=m.destination)
        with suppress(OSError), os.scandir(_CGROUP_ROOT) as it:
            for entry in it:
                if entry.is_symlink() and os.readlink(entry.path) in names and entry.name not in names:
                    os.symlink(os.readlink(entry.path), entry.name, dir_fd=dirfd)
    finally:
        os.close(dirfd)
    if ro:
        _remount_at(root, m.destination, libc.MS_REMOUNT | base | ro)


def _bind(root: str, m: Mount) -> None:
    assert m.source is not None
    try:
        st = os.stat(m.source)
    except FileNotFoundError:
        if m.optional:
            return
        raise SetupError("bind mount", f"{m.source}: no such file or directory (mounts: source)") from None
    make = "dir" if stat.S_ISDIR(st.st_mode) else "file"
    rec = libc.MS_REC if m.recursive else 0
    _mount_at(root, m.destination, make, m.source, None, libc.MS_BIND | rec)
    _remount_at(root, m.destination, libc.MS_PRIVATE if m.private else libc.MS_SLAVE)
    # (a bind takes its flags only from a remount: nosuid, nodev, noexec, ro all come here)
    flags = (m.flags or 0) | (0 if m.writable else libc.MS_RDONLY)
    if flags:
        _remount_at(root, m.destination, libc.MS_BIND | libc.MS_REMOUNT | rec | flags)


def _setup_dev(root: str, tty: bool, devices: tuple[Device, ...] = ()) -> None:
    """A fresh tmpfs on /dev, filled through an fd of it: every node, directory and link is made
    with *at() calls relative to that fd, never by a path a symlink in the rootfs could redirect."""
    nosuid = libc.MS_NOSUID
    _mount_at(root, "/dev", "dir", "tmpfs", "tmpfs", nosuid | libc.MS_NOEXEC, "mode=755,size=65536k")
    dev = resolve_in_root(root, "/dev", make=None)
    try:
        for name in _DEV_NODES:
            # bind the host's nodes: works in a user namespace too, where mknod is refused
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(name, flags, 0o666, dir_fd=dev))
            _mount_in_dev(dev, name, f"/dev/{name}", None, libc.MS_BIND)
        for sub in ("pts", "shm", "mqueue"):
            os.mkdir(sub, 0o755, dir_fd=dev)
        _mount_in_dev(dev, "pts", "devpts", "devpts", nosuid | libc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
        os.symlink("pts/ptmx", "ptmx", dir_fd=dev)
        _mount_in_dev(dev, "shm", "shm", "tmpfs", nosuid | libc.MS_NODEV | libc.MS_NOEXEC, "mode=1777,size=65536k")
        with suppress(SyscallError):  # mqueue needs NEWIPC; without it the dir stays empty
            _mount_in_dev(dev, "mqueue", "mqueue", "mqueue", nosuid | libc.MS_NODEV | libc.MS_NOEXEC)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, name, dir_fd=dev)
        for i, d in enumerate(devices):
            _make_device(dev, d, f"linux.devices[{i}] ({d.path})")
    finally:
        os.close(dev)


def _make_device(dev: int, d: Device, step: str) -> None:
    """d's node in /dev (open as dev), its directories made on the way, never through a symlink.

    mknod is refused in a user namespace: there, as runc does, the host's node of the same path
    is bound onto an empty file instead (it must exist on the host)."""
    *dirs, name = d.path.removeprefix("/dev/").split("/")
    if not dirs and (name in _DEV_NODES or name == "ptmx"):
        # the runtime's own: bound from the host's, or (ptmx, as runc) the link to the container's
        # devpts; containerd's --privileged lists them all, as every node of the host's /dev
        return
    fd = os.dup(dev)
    try:
        for part in dirs:
            with suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[d.type]
        try:
            os.mknod(name, kind | d.mode, os.makedev(d.major, d.minor), dir_fd=fd)
        except PermissionError:
            if not os.path.exists(d.path):
                raise SetupError(step, f"mknod: permission denied (a user namespace?), and no {d.path} on the host "
                                 "to bind") from None
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=fd))
            _mount_in_dev(fd, name, d.path, None, libc.MS_BIND, where=os.path.dirname(d.path))
            return
        os.chmod(name, d.mode, dir_fd=fd)  # as asked, whatever the umask took away
        os.chown(name, d.uid, d.gid, dir_fd=fd, follow_symlinks=False)
    except OSError as e:
        raise _step(step, e) from None
    finally:
        os.close(fd)


_SPECIAL = ("/proc", "/sys", "/dev")


def _below_special(dest: str) -> bool:
    return any(os.path.normpath(dest).startswith(d + "/") for d in _SPECIAL)


def make_mount_points(cfg: ContainerConfig, rootfs: str) -> None:
    """Create every mount point while still root of the host's user namespace.

    Root of a new user namespace is an unprivileged id on the host and may not write into a
    rootfs owned by the host's root: with NEWUSER this runs before the unshare. Destinations
    below /proc, /sys and /dev are looked up once those are mounted (/dev's tmpfs is the new
    root's to write; in /proc and /sys they must exist).
    """
    step = "mount points"
    try:
        for d in _SPECIAL:
            step = f"mount {d}"
            os.close(resolve_in_root(rootfs, d, make="dir"))
        for i, m in enumerate(cfg.mounts):
            if (m.type == "bind" and m.source and not os.path.exists(m.source)) or _below_special(m.destination):
                continue
            step = f"mounts[{i}] ({m.destination})"
            make = "dir" if m.type == "tmpfs" or (m.source and os.path.isdir(m.source)) else "file"
            os.close(resolve_in_root(rootfs, m.destination, make=make))
    except OSError as e:
        raise _step(step, e) from None


def prepare(cfg: ContainerConfig, rootfs: str) -> None:
    """Everything up to (not including) the switch of root. ``rootfs`` is an absolute host path.

    /proc, /sys and /dev before the config's mounts: a mount below one of them (/proc/sys/kernel,
    /dev/fuse) lands on top of it instead of on the rootfs's directory underneath, hidden.
    """
    step = "make / private" if cfg.root_propagation == "rprivate" else "make / slave"
    try:
        # a slave receives the host's mount events and sends none: either way nothing reaches the host
        libc.mount(None, "/", None, libc.MS_REC | (libc.MS_SLAVE if cfg.root_propagation == "rslave" else
                                                   libc.MS_PRIVATE))
        step = "bind rootfs"
        libc.mount(rootfs, rootfs, None, libc.MS_BIND | libc.MS_REC)
        step = "mount /proc"
        _mount_at(rootfs, "/proc", "dir", "proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
        step = "mount /sys"
        ro = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC | libc.MS_RDONLY
        if "NEWNET" in cfg.namespaces:
            _mount_at(rootfs, "/sys", "dir", "sysfs", "sysfs", ro)
        else:  # sysfs belongs to the network namespace: without our own, show the host's read-only
            _mount_at(rootfs, "/sys", "dir", "/sys", None, libc.MS_BIND | libc.MS_REC)
            _remount_at(rootfs, "/sys", libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_REC)
        step = "mount /dev"
        _setup_dev(rootfs, cfg.tty, cfg.devices)
        for i, m in enumerate(cfg.mounts):
            step = f"mounts[{i}] ({m.destination})"
            if m.type == "tmpfs":
                flags = libc.MS_NOSUID | libc.MS_NODEV if m.flags is None else m.flags  # (ro among m.flags)
                if m.copy_up:
                    _mount_tmpfs_copy_up(rootfs, m.destination, flags, m.data)
                else:
                    _mount_at(rootfs, m.destination, "dir", "tmpfs", "tmpfs", flags, m.data or "mode=1777")
            elif m.type == "cgroup":
                _mount_cgroups(rootfs, m, "NEWCGROUP" in cfg.namespaces)
            else:
                _bind(rootfs, m)
    except SetupError:
        raise
    except OSError as e:
        raise _step(step, e) from None


def switch_root(cfg: ContainerConfig, rootfs: str) -> None:
    try:
        os.chdir(rootfs)
        if cfg.no_pivot_root:
            libc.mount(rootfs, "/", None, libc.MS_MOVE)
            os.chroot(".")
        else:
            # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only ours
            libc.pivot_root(".", ".")
            libc.umount2(".", libc.MNT_DETACH)
        os.chdir("/")
    except OSError as e:
        raise _step("pivot_root" if not cfg.no_pivot_root else "chroot", e) from None


def _open_existing(path: str) -> int | None:
    """An O_PATH fd of path (symlinks followed: we are inside the container's root now), or None."""
    try:
        return os.open(path, _O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _open_config_file() -> int | None:
    """An O_PATH fd of /container.json when it is a regular file (not through a symlink), or None."""
    try:
        fd = os.open("/" + CONFIG_FILE, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None


def finish(cfg: ContainerConfig) -> None:
    """Masks and read-only parts, from inside the new root: through an fd each, so what is
    looked at is what gets mounted on."""
    path = "/"
    try:
        for path in cfg.masked_paths:
            fd = _open_existing(path)
            if fd is None:
                continue  # mask only what exists (this kernel has no /proc/kcore)
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    _mount_fd(fd, path, "tmpfs", "tmpfs", libc.MS_RDONLY, "size=0")
                else:
                    _mount_fd(fd, path, "/dev/null", None, libc.MS_BIND)
            finally:
                os.close(fd)
        for path in cfg.readonly_paths:
            fd = _open_existing(path)
            if fd is None:
                continue
            try:
                _mount_fd(fd, path, f"/proc/self/fd/{fd}", None, libc.MS_BIND | libc.MS_REC)
            finally:
                os.close(fd)
            fd = os.open(path, _O_PATH | os.O_CLOEXEC)  # the bind just made, on top of what fd named
            try:
                _mount_fd(fd, path, None, None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_REC)
            finally:
                os.close(fd)
        path = "/" + CONFIG_FILE
        fd = _open_config_file()
        if fd is not None:
            try:  # the config of the container's next run: read-only for this one
                _mount_fd(fd, path, f"/proc/self/fd/{fd}", None, libc.MS_BIND)
            finally:
                os.close(fd)
            fd = os.open(path, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)  # the bind just made
            try:
                _mount_fd(fd, path, None, None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY)
            finally:
                os.close(fd)
        if cfg.readonly_fs:
            path = "/"
            libc.mount(None, "/", None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY)
    except OSError as e:
        raise _step(f"mask/readonly paths ({path})", e) from None
