"""The only module that talks to libc through ctypes (its C half, _ctypes, at run time).

Every function declares argtypes/restype, and every failure raises SyscallError naming the call
and its arguments, e.g. ``mount('/src' -> '/rootfs/dst'): EPERM (Operation not permitted)``.
Nothing here returns -1 upward.
"""

from __future__ import annotations

import _socket
import _struct as struct  # struct.py only re-exports it
import errno
import fcntl
import os
import select

from .consts import *  # noqa: F403  # (libc.CLONE_NEWNS...: the numbers live in consts, which has no ctypes)
from .consts import CLONE_PARENT, PR_SET_CHILD_SUBREAPER
from .errors import SetupError, SyscallError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes as _c
    from typing import Any

    def _open_lib(name: str | None, *, python_api: bool = False) -> _c.CDLL:
        """A shared object's functions by name (``lib.mount``), errno kept for get_errno(); with
        python_api, called with the GIL held (ctypes.PyDLL). None: the running program itself."""
        ...
else:  # the C half of ctypes, without ctypes/__init__.py (2 ms of the 30 an `nsinit exec` takes)
    import _ctypes

    class _c:  # stands in for the ctypes module: only what this file uses
        class c_int(_ctypes._SimpleCData):
            _type_ = "i"

        class c_uint(_ctypes._SimpleCData):
            _type_ = "I"

        class c_long(_ctypes._SimpleCData):
            _type_ = "l"

        class c_ulong(_ctypes._SimpleCData):
            _type_ = "L"

        class c_char_p(_ctypes._SimpleCData):
            _type_ = "z"

        class c_void_p(_ctypes._SimpleCData):
            _type_ = "P"

        c_uint32 = c_uint
        c_uint64 = c_size_t = c_ulong  # LP64: x86_64 and aarch64
        Structure = _ctypes.Structure
        byref = _ctypes.byref
        sizeof = _ctypes.sizeof
        get_errno = _ctypes.get_errno

    def _open_lib(name, *, python_api=False):
        flags = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        if python_api:
            flags |= _ctypes.FUNCFLAG_PYTHONAPI

        class Function(_ctypes.CFuncPtr):
            _flags_ = flags
            _restype_ = _c.c_int

        class Library:
            def __init__(self):
                self._handle = _ctypes.dlopen(name, os.RTLD_NOW)

            def __getattr__(self, symbol):
                return Function((symbol, self))

            __getitem__ = __getattr__

        return Library()


try:
    _libc = _open_lib("libc.so.6")
except OSError:  # not glibc: ask the linker (ctypes.util runs subprocesses, so only here)
    import ctypes.util

    _libc = _open_lib(ctypes.util.find_library("c"))

# numbers of the calls glibc doesn't wrap everywhere: the old ones differ by architecture
_SYS = {
    "x86_64": {"pivot_root": 155, "capget": 125, "capset": 126, "close_range": 436, "openat2": 437, "clone3": 435},
    "aarch64": {"pivot_root": 41, "capget": 90, "capset": 91, "close_range": 436, "openat2": 437, "clone3": 435},
}[os.uname().machine]

_mount = _libc.mount
_mount.argtypes = [_c.c_char_p, _c.c_char_p, _c.c_char_p, _c.c_ulong, _c.c_char_p]
_mount.restype = _c.c_int
_umount2 = _libc.umount2
_umount2.argtypes = [_c.c_char_p, _c.c_int]
_umount2.restype = _c.c_int
_unshare = _libc.unshare
_unshare.argtypes = [_c.c_int]
_unshare.restype = _c.c_int
_setns = _libc.setns
_setns.argtypes = [_c.c_int, _c.c_int]
_setns.restype = _c.c_int
_prctl = _libc.prctl
_prctl.argtypes = [_c.c_int, _c.c_ulong, _c.c_ulong, _c.c_ulong, _c.c_ulong]
_prctl.restype = _c.c_int
_prctl_name = _libc["prctl"]  # a second prototype of prctl: PR_SET_NAME takes a string
_prctl_name.argtypes = [_c.c_int, _c.c_char_p, _c.c_ulong, _c.c_ulong, _c.c_ulong]
_prctl_name.restype = _c.c_int
_syscall = _libc.syscall
_syscall.restype = _c.c_long
_personality = _libc.personality
_personality.argtypes = [_c.c_ulong]
_personality.restype = _c.c_int
_signalfd = _libc.signalfd
_signalfd.argtypes = [_c.c_int, _c.c_char_p, _c.c_int]  # the sigset's bytes
_signalfd.restype = _c.c_int


def _fail(call: str) -> SyscallError:
    return SyscallError(call, _c.get_errno())


def _b(path: str | bytes | None) -> bytes | None:
    if path is None or isinstance(path, bytes):
        return path
    return os.fsencode(path)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        what = f"{source!r} -> {target!r}" if source else repr(target)
        raise _fail(f"mount({what}, type={fstype}, flags={flags:#x})")


def umount2(target: str, flags: int = 0) -> None:
    if _umount2(_b(target), flags) != 0:
        raise _fail(f"umount2({target!r})")


def unshare(flags: int) -> None:
    if _unshare(flags) != 0:
        raise _fail(f"unshare({flags:#x})")


def setns(fd: int, nstype: int, what: str = "") -> None:
    if _setns(fd, nstype) != 0:
        raise _fail(f"setns({what or fd!r}, {nstype:#x})")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    rc = _prctl(option, arg2, arg3, arg4, arg5)
    if rc < 0:
        raise _fail(f"prctl({option}, {arg2})")
    return int(rc)


def personality(persona: int) -> None:
    """personality(2): the execution domain the next execve keeps (PER_LINUX32: uname says i686)."""
    if _personality(persona) < 0:
        raise _fail(f"personality({persona:#x})")


def set_process_name(name: str) -> None:
    """PR_SET_NAME: the name ps and /proc/PID/comm show (15 bytes at most)."""
    if _prctl_name(15, name.encode()[:15], 0, 0, 0) != 0:
        raise _fail(f"prctl(PR_SET_NAME, {name!r})")


def pivot_root(new_root: str, put_old: str) -> None:
    if _syscall(_SYS["pivot_root"], _b(new_root), _b(put_old)) != 0:
        raise _fail(f"pivot_root({new_root!r}, {put_old!r})")


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    """Close every fd from first on; falls back to closerange where the call is missing."""
    if _syscall(_SYS["close_range"], _c.c_uint(first), _c.c_uint(last), _c.c_uint(0)) != 0:
        os.closerange(first, min(last, os.sysconf("SC_OPEN_MAX")))


# capabilities (version 3: two 32-bit words per set)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(_c.Structure):
    _fields_ = [("version", _c.c_uint32), ("pid", _c.c_int)]


class _CapData(_c.Structure):
    _fields_ = [("effective", _c.c_uint32), ("permitted", _c.c_uint32), ("inheritable", _c.c_uint32)]


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _syscall(_SYS["capget"], _c.byref(hdr), _c.byref(data)) != 0:
        raise _fail("capget()")
    eff, prm, inh = (
        int(getattr(data[0], f)) | (int(getattr(data[1], f)) << 32) for f in ("effective", "permitted", "inheritable")
    )
    return eff, prm, inh


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _syscall(_SYS["capset"], _c.byref(hdr), _c.byref(data)) != 0:
        raise _fail(f"capset(eff={effective:#x}, prm={permitted:#x}, inh={inheritable:#x})")


# openat2(2)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class _OpenHow(_c.Structure):
    _fields_ = [("flags", _c.c_uint64), ("mode", _c.c_uint64), ("resolve", _c.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags, mode, resolve)
    fd = _syscall(_SYS["openat2"], _c.c_int(dirfd), _b(path), _c.byref(how), _c.c_size_t(24))
    if fd < 0:
        raise _fail(f"openat2({path!r})")
    return int(fd)


# signals
_SIGSET_BYTES = 128  # the kernel uses 8, glibc's sigset_t is 128
SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = os.O_CLOEXEC
SIGNALFD_SIGINFO_SIZE = 128


def _sigset(signals: list[int]) -> bytes:
    mask = 0
    for s in signals:
        mask |= 1 << (s - 1)
    return mask.to_bytes(_SIGSET_BYTES, "little")


def signalfd(signals: list[int], flags: int = SFD_CLOEXEC) -> int:
    fd = _signalfd(-1, _sigset(signals), flags)
    if fd < 0:
        raise _fail("signalfd()")
    return int(fd)


def read_signalfd(fd: int) -> tuple[int, int, int] | None:
    """(signo, sender pid, code) of one queued signal, or None when the fd would block."""
    try:
        data = os.read(fd, SIGNALFD_SIGINFO_SIZE)
    except BlockingIOError:
        return None
    signo, _errno, code, pid = struct.unpack_from("<IiiI", data)
    return signo, pid, code


# inotify(7): for nsinitctl's `logs -f` / `events -f --file`, which wait for a file to grow
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_inotify_init1 = _libc.inotify_init1
_inotify_init1.argtypes = [_c.c_int]
_inotify_init1.restype = _c.c_int
_inotify_add_watch = _libc.inotify_add_watch
_inotify_add_watch.argtypes = [_c.c_int, _c.c_char_p, _c.c_uint32]
_inotify_add_watch.restype = _c.c_int


def inotify_init1(flags: int = IN_CLOEXEC | IN_NONBLOCK) -> int:
    fd = _inotify_init1(flags)
    if fd < 0:
        raise _fail("inotify_init1()")
    return int(fd)


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    wd = _inotify_add_watch(fd, _b(path), mask)
    if wd < 0:
        raise _fail(f"inotify_add_watch({path!r})")
    return int(wd)


# clone3(2) into a cgroup: a child born inside a cgroup2 directory. Moving a process in by writing
# cgroup.procs takes the kernel's threadgroup rwsem for writing, and the first writer after a quiet
# spell waits out an RCU grace period (5-20 ms here); CLONE_INTO_CGROUP only takes it for reading.
CLONE_INTO_CGROUP = 0x200000000
_SIGCHLD = 17


class _CloneArgs(_c.Structure):
    _fields_ = [(name, _c.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls", "set_tid",
        "set_tid_size", "cgroup")]


# through PyDLL, so that the GIL stays held across the call, as os.fork() holds it across fork()
_pythonapi = _open_lib(None, python_api=True)
_py_syscall = _pythonapi.syscall
_py_syscall.restype = _c.c_long
_py_syscall.argtypes = [_c.c_long, _c.c_void_p, _c.c_size_t]


def clone3(flags: int, cgroup_fd: int = -1) -> int:
    """os.fork() through clone3: the child starts in the new namespaces of ``flags`` (CLONE_NEW*)
    and, given cgroup_fd, in that cgroup2 directory (CLONE_INTO_CGROUP). 0 in the child, its pid
    in the parent; the parent's own namespaces and cgroups don't change.

    The interpreter is told about the fork as os.fork() tells it (PyOS_BeforeFork, PyOS_AfterFork_*,
    which run os.register_at_fork's hooks too). glibc's own fork bookkeeping is skipped: only for
    single-threaded callers. SyscallError when the kernel refuses (ENOSYS before 5.3, EINVAL for
    CLONE_INTO_CGROUP before 5.7, EBUSY for a directory with controllers enabled below it...).
    """
    if cgroup_fd >= 0:
        flags |= CLONE_INTO_CGROUP
    # with CLONE_PARENT the child inherits the caller's exit signal, and the kernel wants 0 here
    args = _CloneArgs(flags=flags, exit_signal=0 if flags & CLONE_PARENT else _SIGCHLD, cgroup=max(cgroup_fd, 0))
    _pythonapi.PyOS_BeforeFork()
    pid = _py_syscall(_SYS["clone3"], _c.byref(args), _c.sizeof(args))
    if pid == 0:
        _pythonapi.PyOS_AfterFork_Child()
        return 0
    err = _c.get_errno()
    _pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        what = f", cgroup fd {cgroup_fd}" if cgroup_fd >= 0 else ""
        raise SyscallError(f"clone3(flags={flags:#x}{what})", err)
    return int(pid)


def set_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


# prctl(PR_CAP_AMBIENT, ...) sub-operations (capabilities.drop lowers each dropped capability)
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3


def pidfd_send_signal(pidfd: int, signum: int) -> bool:
    """Signal the process a pidfd names: never another one that took its pid meanwhile.

    True when the signal went, False when the process has exited (ESRCH); SyscallError otherwise.
    """
    if TYPE_CHECKING:
        import signal
    else:  # the C module: signal.py builds enums at import (see lean.py)
        import _signal as signal

    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        return False
    except OSError as e:
        raise SyscallError(f"pidfd_send_signal({pidfd}, {signum})", e.errno or 0) from None
    return True


def wait_readable(fd: int, timeout: float | None) -> bool:
    """poll(2), not select(2): a daemon holding hundreds of containers has fds above 1023."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000))))


# lo: two ioctls on any socket of the namespace (no netlink: this runs in every container with NEWNET)
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq on 64-bit: name + ifr_flags in a 24-byte union


def loopback_up() -> None:
    """Bring ``lo`` up in the calling process's network namespace (two ioctls, stdlib only).

    A fresh network namespace has ``lo`` down: without this even 127.0.0.1 is unreachable.
    """
    try:
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            got = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
            flags = _IFREQ.unpack(got)[1]
            if not flags & _IFF_UP:
                fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))
        finally:
            s.close()
    except OSError as e:
        raise SetupError("loopback", f"lo up: {errno.errorcode.get(e.errno or 0, e.errno)} ({e.strerror})") from None


# libseccomp (seccomp.py compiles OCI profiles with it): opened on first use only, so a container
# without a profile never maps it. Its calls return -errno rather than setting errno.
LIBSECCOMP = "libseccomp.so.2"
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_TSYNC = 4
SCMP_FLTATR_CTL_LOG = 6
SCMP_FLTATR_CTL_SSB = 7
SCMP_FLTATR_CTL_OPTIMIZE = 8
SCMP_FLTATR_API_SYSRAWRC = 9
_NR_SCMP_ERROR = -1


class ScmpArgCmp(_c.Structure):
    """struct scmp_arg_cmp: one condition on one argument of a call."""

    _fields_ = [("arg", _c.c_uint), ("op", _c.c_int), ("datum_a", _c.c_uint64), ("datum_b", _c.c_uint64)]


class _ScmpVersion(_c.Structure):
    _fields_ = [("major", _c.c_uint), ("minor", _c.c_uint), ("micro", _c.c_uint)]


_seccomp_fns: dict[str, _c._NamedFuncPointer] = {}  # name -> the declared function; empty until first use


def _libseccomp(name: str) -> _c._NamedFuncPointer:
    """A libseccomp function, declared (argtypes/restype) on the first call of any. SetupError
    when the library can't be opened."""
    if not _seccomp_fns:
        try:
            lib = _open_lib(LIBSECCOMP)
        except OSError as e:
            raise SetupError("seccomp", f"{LIBSECCOMP}: cannot be loaded ({e}); install libseccomp2") from None
        ctx, u32 = _c.c_void_p, _c.c_uint32
        table: tuple[tuple[str, list[type[_c._SimpleCData[Any]]], type[_c._SimpleCData[Any]] | None], ...] = (
            ("seccomp_init", [u32], ctx),
            ("seccomp_release", [ctx], None),
            ("seccomp_arch_resolve_name", [_c.c_char_p], u32),
            ("seccomp_arch_add", [ctx, u32], _c.c_int),
            ("seccomp_attr_set", [ctx, _c.c_int, u32], _c.c_int),
            ("seccomp_syscall_resolve_name", [_c.c_char_p], _c.c_int),
            ("seccomp_rule_add_array", [ctx, u32, _c.c_int, _c.c_uint, _c.c_void_p], _c.c_int),
            ("seccomp_load", [ctx], _c.c_int),
            ("seccomp_api_get", [], _c.c_uint),
            ("seccomp_version", [], ctx),
        )
        for fname, args, res in table:
            fn = lib[fname]
            fn.argtypes = args
            fn.restype = res
            _seccomp_fns[fname] = fn
    return _seccomp_fns[name]


def _scmp_check(rc: int, call: str) -> None:
    if rc < 0:
        raise SyscallError(call, -rc)


def seccomp_version() -> str:
    """libseccomp's version, "2.5.4"."""
    v = _ScmpVersion.from_address(_libseccomp("seccomp_version")())
    return f"{v.major}.{v.minor}.{v.micro}"


def seccomp_api_get() -> int:
    """The API level libseccomp finds in this kernel (3: KILL_PROCESS and LOG; 5: NOTIFY...)."""
    return int(_libseccomp("seccomp_api_get")())


def seccomp_init(default_action: int) -> int:
    """A new filter context (libseccomp's memory; nothing in the kernel until seccomp_load)."""
    ctx = _libseccomp("seccomp_init")(default_action)
    if not ctx:  # libseccomp says no more than NULL: a bad action or no memory
        raise SyscallError(f"seccomp_init({default_action:#x})", errno.EINVAL)
    return int(ctx)


def seccomp_release(ctx: int) -> None:
    _libseccomp("seccomp_release")(ctx)


def seccomp_arch_resolve_name(name: str) -> int:
    """libseccomp's token for an architecture ("x86_64"); 0 when it knows no such name."""
    return int(_libseccomp("seccomp_arch_resolve_name")(name.encode()))


def seccomp_arch_add(ctx: int, token: int) -> None:
    rc = _libseccomp("seccomp_arch_add")(ctx, token)
    if rc != -errno.EEXIST:  # the native architecture is in every new context already
        _scmp_check(rc, f"seccomp_arch_add({token:#x})")


def seccomp_attr_set(ctx: int, attr: int, value: int) -> None:
    _scmp_check(_libseccomp("seccomp_attr_set")(ctx, attr, value), f"seccomp_attr_set({attr}, {value})")


def seccomp_syscall_resolve_name(name: str) -> int | None:
    """The call's number for libseccomp (negative for one the native architecture lacks but
    another has), or None when libseccomp knows no call of that name."""
    nr = int(_libseccomp("seccomp_syscall_resolve_name")(name.encode()))
    return None if nr == _NR_SCMP_ERROR else nr


def seccomp_rule_add(ctx: int, action: int, nr: int, conditions: list[tuple[int, int, int, int]],
                     what: str = "") -> None:
    """Add a rule: ``action`` for call ``nr`` when every (arg, op, datum_a, datum_b) holds."""
    arr = (ScmpArgCmp * max(1, len(conditions)))(*(ScmpArgCmp(*c) for c in conditions))
    rc = _libseccomp("seccomp_rule_add_array")(ctx, action, nr, len(conditions), _c.byref(arr))
    _scmp_check(rc, f"seccomp_rule_add({what or nr}, action={action:#x})")


def seccomp_load(ctx: int) -> None:
    """Install the filter in the kernel for the calling thread: from here on, every call is checked."""
    _scmp_check(_libseccomp("seccomp_load")(ctx), "seccomp_load()")
