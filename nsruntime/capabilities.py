"""Capability names and numbers, and dropping them (bounding, effective, permitted, inheritable, ambient).

``capabilities_mask`` follows the libcontainer sample: every capability named there is taken away
from the container; every other one the runtime has stays.
"""

from __future__ import annotations

NAMES: tuple[str, ...] = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(NAMES) - 1


def number(name: str) -> int | None:
    """CAP_SYS_ADMIN / SYS_ADMIN / sys_admin -> 21; None when this kernel doesn't know the name."""
    key = name.upper().removeprefix("CAP_")
    try:
        n = NAMES.index(key)
    except ValueError:
        return None
    return n if n <= last_cap() else None


def drop(numbers: frozenset[int] | set[int]) -> None:
    """Remove the given capabilities from every set of the calling thread; the others stay.

    Order matters. The bounding set first: PR_CAPBSET_DROP needs CAP_SETPCAP in the effective
    set, and SETPCAP may itself be in the list. Then effective, permitted and inheritable in one
    capset. Then ambient: the kernel already clears an ambient capability that leaves permitted or
    inheritable, but it is lowered by name too so that no kernel version is relied upon. Without the
    inheritable and ambient steps root would regain a capability at execve.
    """
    if not numbers:
        return
    from . import libc  # here: reading a config (names and numbers) loads no ctypes

    last = last_cap()
    for n in sorted(numbers):
        if n <= last and libc.prctl(libc.PR_CAPBSET_READ, n) == 1:
            libc.prctl(libc.PR_CAPBSET_DROP, n)
    mask = 0
    for n in numbers:
        mask |= 1 << n
    eff, prm, inh = libc.capget()
    if (eff | prm | inh) & mask:
        libc.capset(eff & ~mask, prm & ~mask, inh & ~mask)
    for n in sorted(numbers):
        if n <= last and libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_IS_SET, n) == 1:
            libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_LOWER, n)


def limit_bounding(kept: frozenset[int]) -> None:
    """Drop from the bounding set every capability not in kept (OCI's lists name what stays).
    Before the user switches: dropping needs CAP_SETPCAP."""
    from . import libc

    for n in range(last_cap() + 1):
        if n not in kept and libc.prctl(libc.PR_CAPBSET_READ, n) == 1:
            libc.prctl(libc.PR_CAPBSET_DROP, n)


def set_sets(effective: frozenset[int], permitted: frozenset[int], inheritable: frozenset[int],
             ambient: frozenset[int]) -> None:
    """The thread's effective, permitted and inheritable sets become exactly these, and the ambient
    set exactly ambient (a capability is raised there only when permitted and inheritable hold it,
    as the kernel demands). After a switch to another user (with PR_SET_KEEPCAPS): permitted
    survives it, effective does not."""
    from . import libc

    def bits(caps: frozenset[int]) -> int:
        mask = 0
        for n in caps:
            mask |= 1 << n
        return mask

    libc.capset(bits(effective), bits(permitted), bits(inheritable))
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    for n in sorted(ambient & permitted & inheritable):
        libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_RAISE, n)


def set_no_new_privs() -> None:
    """From here on, execve never grants privileges (setuid bits, file capabilities). Inherited by
    children and kept across execve; cannot be undone."""
    from . import libc

    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)


def names(numbers: frozenset[int] | set[int]) -> list[str]:
    """Numbers -> CAP_ names, for messages and docs."""
    return [f"CAP_{NAMES[n]}" if n < len(NAMES) else f"CAP_{n}" for n in sorted(numbers)]
