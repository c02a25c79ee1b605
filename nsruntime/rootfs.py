"""The container's filesystem: runs in the container's PID 1, inside its new mount namespace.

Order matters and is the kernel's, not ours: propagation private first (or every mount below
reaches the host), the rootfs bound onto itself (pivot_root wants a mount point), binds and
special filesystems under it, then pivot_root, then masks and read-only remounts from inside.
"""

from __future__ import annotations

import errno
import os
import stat

from . import libc
from .config import ContainerConfig, Mount
from .errors import SetupError, SyscallError
from .lean import suppress

_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_O_PATH = getattr(os, "O_PATH", 0o10000000)


def _step(step: str, path: str, err: OSError) -> SetupError:
    if isinstance(err, SyscallError):
        return SetupError(step, str(err))
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    return SetupError(step, f"{path}: {name} ({err.strerror})")


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


def _mount_at(root: str, dest: str, make: str, source: str | None, fstype: str | None, flags: int,
              data: str | None = None) -> str:
    """Mount onto dest resolved inside root; returns the host-side path actually mounted on."""
    fd = resolve_in_root(root, dest, make=make)
    try:
        target = f"/proc/self/fd/{fd}"
        real = os.readlink(target)
        libc.mount(source, target, fstype, flags, data)
        return real
    finally:
        os.close(fd)


def _bind(root: str, m: Mount) -> None:
    assert m.source is not None
    try:
        st = os.stat(m.source)
    except FileNotFoundError:
        if m.optional:
            return
        raise SetupError("bind mount", f"{m.source}: no such file or directory (mounts: source)") from None
    make = "dir" if stat.S_ISDIR(st.st_mode) else "file"
    real = _mount_at(root, m.destination, make, m.source, None, libc.MS_BIND | libc.MS_REC)
    libc.mount(None, real, None, libc.MS_PRIVATE if m.private else libc.MS_SLAVE)
    if not m.writable:
        libc.mount(None, real, None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_REC)


def _setup_dev(root: str, tty: bool) -> None:
    nosuid = libc.MS_NOSUID
    _mount_at(root, "/dev", "dir", "tmpfs", "tmpfs", nosuid | libc.MS_NOEXEC, "mode=755,size=65536k")
    dev = os.path.join(root, "dev")
    for name in _DEV_NODES:
        # bind the host's nodes: works in a user namespace too, where mknod is refused
        path = os.path.join(dev, name)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        libc.mount(f"/dev/{name}", path, None, libc.MS_BIND)
    for sub in ("pts", "shm", "mqueue"):
        os.mkdir(os.path.join(dev, sub), 0o755)
    libc.mount("devpts", os.path.join(dev, "pts"), "devpts", nosuid | libc.MS_NOEXEC,
               "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    libc.mount("shm", os.path.join(dev, "shm"), "tmpfs", nosuid | libc.MS_NODEV | libc.MS_NOEXEC,
               "mode=1777,size=65536k")
    with suppress(SyscallError):  # mqueue needs NEWIPC; without it the dir stays empty
        libc.mount("mqueue", os.path.join(dev, "mqueue"), "mqueue", nosuid | libc.MS_NODEV | libc.MS_NOEXEC)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))


def make_mount_points(cfg: ContainerConfig, rootfs: str) -> None:
    """Create every mount point while still root of the host's user namespace.

    Root of a new user namespace is an unprivileged id on the host and may not write into a
    rootfs owned by the host's root: with NEWUSER this runs before the unshare.
    """
    try:
        for m in cfg.mounts:
            if m.type == "bind" and m.source and not os.path.exists(m.source):
                continue
            make = "dir" if m.type == "tmpfs" or (m.source and os.path.isdir(m.source)) else "file"
            os.close(resolve_in_root(rootfs, m.destination, make=make))
        for d in ("/proc", "/sys", "/dev"):
            os.close(resolve_in_root(rootfs, d, make="dir"))
    except OSError as e:
        raise _step("mount points", rootfs, e) from None


def prepare(cfg: ContainerConfig, rootfs: str) -> None:
    """Everything up to (not including) the switch of root. ``rootfs`` is an absolute host path."""
    step = "make / private"
    try:
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
        step = "bind rootfs"
        libc.mount(rootfs, rootfs, None, libc.MS_BIND | libc.MS_REC)
        for i, m in enumerate(cfg.mounts):
            step = f"mounts[{i}] ({m.destination})"
            if m.type == "tmpfs":
                _mount_at(rootfs, m.destination, "dir", "tmpfs", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV,
                          "mode=1777")
            else:
                _bind(rootfs, m)
        step = "mount /proc"
        _mount_at(rootfs, "/proc", "dir", "proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
        step = "mount /sys"
        ro = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC | libc.MS_RDONLY
        if "NEWNET" in cfg.namespaces:
            _mount_at(rootfs, "/sys", "dir", "sysfs", "sysfs", ro)
        else:  # sysfs belongs to the network namespace: without our own, show the host's read-only
            real = _mount_at(rootfs, "/sys", "dir", "/sys", None, libc.MS_BIND | libc.MS_REC)
            libc.mount(None, real, None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_REC)
        step = "mount /dev"
        _setup_dev(rootfs, cfg.tty)
    except SetupError:
        raise
    except OSError as e:
        raise _step(step, rootfs, e) from None


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
        raise _step("pivot_root" if not cfg.no_pivot_root else "chroot", rootfs, e) from None


def finish(cfg: ContainerConfig) -> None:
    """Masks and read-only parts, from inside the new root."""
    path = "/"
    try:
        for path in cfg.masked_paths:
            if not os.path.lexists(path):
                continue  # mask only what exists (this kernel has no /proc/kcore)
            if os.path.isdir(path):
                libc.mount("tmpfs", path, "tmpfs", libc.MS_RDONLY, "size=0")
            else:
                libc.mount("/dev/null", path, None, libc.MS_BIND)
        for path in cfg.readonly_paths:
            if not os.path.lexists(path):
                continue
            libc.mount(path, path, None, libc.MS_BIND | libc.MS_REC)
            libc.mount(None, path, None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_REC)
        if cfg.readonly_fs:
            path = "/"
            libc.mount(None, "/", None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY)
    except OSError as e:
        raise _step("mask/readonly paths", path, e) from None
