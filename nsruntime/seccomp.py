"""Seccomp: an OCI ``linux.seccomp`` profile (runtime-spec 1.0-1.2) compiled to a libseccomp filter.

Two steps, like apparmor.py. ``compile(obj)`` runs before the container exists (on the host, or in
the container's process before its root is switched, where the host's libseccomp.so.2 is still
in reach): it validates every field, asks libseccomp for every number and builds the filter in
libseccomp's memory, so that anything that cannot be honoured is refused there, as one line
naming the JSON path. Nothing reaches the kernel yet. ``Filter.load()`` runs in the command's
process just before execve and only hands the built filter to the kernel: it opens no file, so
it works after pivot_root. A forked child inherits the built filter and may load it itself.

What runc does, done the same way here (a profile written for runc means the same):
- A syscall name that this libseccomp does not know is skipped (``Filter.skipped`` lists them):
  profiles name calls of newer kernels and other architectures, and a call the library cannot
  name is one it cannot filter either.
- A rule whose action is the default action is skipped: it changes nothing.
- Conditions on distinct arguments are ANDed in one rule; when an argument index repeats, each
  condition becomes a rule of its own (ORed). SCMP_CMP_MASKED_EQ compares ``arg & value`` with
  ``valueTwo``.
- SCMP_ACT_KILL is SCMP_ACT_KILL_THREAD; errnoRet defaults to EPERM for ERRNO and TRACE.
- The native architecture is always filtered, whether listed or not; a call from an architecture
  the profile doesn't list kills the thread (libseccomp's default).
- The filter does not set no_new_privs itself: the container's own setting decides, and without
  it the kernel wants CAP_SYS_ADMIN to load a filter (see init.exec_command for the order).

Refused (never a silent pass): SCMP_ACT_NOTIFY and listenerPath (no seccomp agent is run), the
flag SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (only meaningful with a listener), and any action,
operator, architecture or flag this module, libseccomp or the kernel doesn't know.
"""

from __future__ import annotations

from . import libc
from .errors import ConfigError, NsRuntimeError, SetupError
from .fields import _int, _list, _obj, _q, _str
from .lean import suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# SCMP_ACT_* of seccomp.h: the kernel's SECCOMP_RET_* with the 16-bit data in the low bits
ACTIONS: dict[str, int] = {
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_TAKES_ERRNO = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")
# libseccomp refuses these below an API level (seccomp_api_get): the kernel lacks the return value
_MIN_API = {"SCMP_ACT_KILL_PROCESS": 3, "SCMP_ACT_LOG": 3}
EPERM = 1

OPERATORS: dict[str, int] = {  # enum scmp_compare
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

FLAGS: dict[str, int] = {  # filter flag -> the libseccomp attribute that sets it
    "SECCOMP_FILTER_FLAG_TSYNC": libc.SCMP_FLTATR_CTL_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": libc.SCMP_FLTATR_CTL_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": libc.SCMP_FLTATR_CTL_SSB,
}

# the spec's names; libseccomp's own name is the lower-case tail (SCMP_ARCH_X86_64 -> "x86_64")
ARCHITECTURES = (
    "SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC", "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X", "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64",
    "SCMP_ARCH_M68K", "SCMP_ARCH_SH", "SCMP_ARCH_SHEB",
)  # fmt: skip

_FIELDS = {"defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath", "listenerMetadata",
           "syscalls"}
_SYSCALL_FIELDS = {"names", "action", "errnoRet", "args"}
_ARG_FIELDS = {"index", "value", "valueTwo", "op"}
_MAX_ARGS = 6  # a Linux system call has at most 6 arguments
_U64 = (1 << 64) - 1
_OPTIMIZE_ABOVE = 32  # rules: past this, libseccomp's binary tree beats a linear scan of every call

Condition = tuple[int, int, int, int]  # (argument index, operator, datum_a, datum_b): scmp_arg_cmp
Rule = tuple[str, int, int, tuple[Condition, ...]]  # (name, number, action, conditions ANDed)


class Filter:
    """A profile built in libseccomp's memory, ready for load(). Compares by what it filters."""

    def __init__(self, ctx: int, default_action: int, architectures: tuple[int, ...], flags: tuple[str, ...],
                 rules: tuple[Rule, ...], skipped: tuple[str, ...]) -> None:
        self._ctx = ctx
        self.default_action = default_action
        self.architectures = architectures  # libseccomp's tokens of those listed (the native one is implied)
        self.flags = flags
        self.rules = rules
        self.skipped = skipped  # syscall names this libseccomp doesn't know (see the module's docstring)

    def _key(self) -> tuple[object, ...]:
        return self.default_action, self.architectures, self.flags, self.rules, self.skipped

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filter) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Filter(default={self.default_action:#x}, {len(self.architectures)} architectures, "
                f"{len(self.rules)} rules, {len(self.skipped)} names skipped)")

    def load(self) -> None:
        """Hand the filter to the kernel for the calling thread, for good: from here on every
        system call of this process and its children is checked, execve included.

        Needs no_new_privs or CAP_SYS_ADMIN (SetupError otherwise). Opens no file. May be
        called again (in another forked child, or to stack the same filter twice)."""
        if not self._ctx:
            raise SetupError("seccomp", "the filter was released")
        try:
            libc.seccomp_load(self._ctx)
        except OSError as e:
            hint = ""
            if e.errno == 13:  # EACCES
                hint = ": without no_new_privileges, loading a filter needs CAP_SYS_ADMIN"
            raise SetupError("seccomp", f"{e}{hint}") from None

    def release(self) -> None:
        """Free libseccomp's memory (load() refuses afterwards). Idempotent."""
        ctx, self._ctx = self._ctx, 0
        if ctx:
            libc.seccomp_release(ctx)

    def __del__(self) -> None:
        with suppress(Exception):
            self.release()


def _action(path: str, name: object, errno_ret: object, errno_path: str, api: int) -> int:
    s = _str(path, name)
    if s == "SCMP_ACT_NOTIFY":
        raise ConfigError(path, "SCMP_ACT_NOTIFY is not supported (it needs a seccomp agent; listenerPath is "
                          "refused)")
    if s not in ACTIONS:
        raise ConfigError(path, f"{_q(s)} is not a seccomp action ({', '.join(ACTIONS)})")
    if api < _MIN_API.get(s, 0):
        raise ConfigError(path, f"{s} cannot be honoured: libseccomp {libc.seccomp_version()} on this kernel "
                          f"is at API level {api}, {s} needs {_MIN_API[s]}")
    if errno_ret is None:
        return ACTIONS[s] | (EPERM if s in _TAKES_ERRNO else 0)
    if s not in _TAKES_ERRNO:
        raise ConfigError(errno_path, f"{s} returns no errno (only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take one)")
    return ACTIONS[s] | _int(errno_path, errno_ret, 0, 0xFFFF)


def _architecture(path: str, value: object) -> int:
    s = _str(path, value)
    token = 0
    if s.startswith("SCMP_ARCH_") and s != "SCMP_ARCH_NATIVE":
        token = libc.seccomp_arch_resolve_name(s[len("SCMP_ARCH_"):].lower())
    if not token:
        raise ConfigError(path, f"{_q(s)} is not an architecture libseccomp {libc.seccomp_version()} knows")
    return token


def _conditions(path: str, value: object) -> list[Condition]:
    out: list[Condition] = []
    for j, item in enumerate(_list(path, value)):
        p = f"{path}[{j}]"
        a = _obj(p, item, _ARG_FIELDS)
        for required in ("index", "value", "op"):
            if a.get(required) is None:
                raise ConfigError(f"{p}.{required}", "required")
        op = _str(f"{p}.op", a["op"])
        if op not in OPERATORS:
            raise ConfigError(f"{p}.op", f"{_q(op)} is not a seccomp operator ({', '.join(OPERATORS)})")
        value_two = a.get("valueTwo")
        out.append((_int(f"{p}.index", a["index"], 0, _MAX_ARGS - 1), OPERATORS[op],
                    _int(f"{p}.value", a["value"], 0, _U64),
                    0 if value_two is None else _int(f"{p}.valueTwo", value_two, 0, _U64)))
    return out


def _rules_of(path: str, names: list[str], action: int, conds: list[Condition],
              skipped: list[str]) -> list[Rule]:
    indexes = [c[0] for c in conds]
    # one rule ANDs its conditions; libseccomp takes one condition per argument in a rule
    groups = [tuple(conds)] if len(set(indexes)) == len(indexes) else [(c,) for c in conds]
    out: list[Rule] = []
    for name in names:
        nr = libc.seccomp_syscall_resolve_name(name)
        if nr is None:
            skipped.append(name)
            continue
        out.extend((name, nr, action, g) for g in groups)
    return out


def compile(obj: object, path: str = "linux.seccomp") -> Filter:
    """Validate an OCI seccomp object and build its filter; ConfigError naming the JSON path
    (``linux.seccomp.syscalls[3].action: ...``) for anything that can't be honoured. ``path`` is
    where the object sits in its document (``seccomp`` in a container.json)."""
    d = _obj(path, obj, _FIELDS)
    for refused in ("listenerPath", "listenerMetadata"):
        if d.get(refused) not in (None, ""):
            raise ConfigError(f"{path}.{refused}", "a seccomp agent (SCMP_ACT_NOTIFY) is not supported")
    if d.get("defaultAction") is None:
        raise ConfigError(f"{path}.defaultAction", "required")
    api = libc.seccomp_api_get()
    default = _action(f"{path}.defaultAction", d["defaultAction"], d.get("defaultErrnoRet"),
                      f"{path}.defaultErrnoRet", api)
    arch_values = _list(f"{path}.architectures", d.get("architectures") or [])
    arches = [_architecture(f"{path}.architectures[{i}]", a) for i, a in enumerate(arch_values)]
    flags: list[tuple[str, str, int]] = []
    for i, f in enumerate(_list(f"{path}.flags", d.get("flags") or [])):
        p = f"{path}.flags[{i}]"
        s = _str(p, f)
        if s == "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV":
            raise ConfigError(p, f"{s} is not supported (only meaningful with a seccomp agent, which is refused)")
        if s not in FLAGS:
            raise ConfigError(p, f"{_q(s)} is not a seccomp flag nsinit knows ({', '.join(FLAGS)})")
        flags.append((p, s, FLAGS[s]))
    rules: list[Rule] = []
    rule_paths: list[str] = []
    skipped: list[str] = []
    for i, entry in enumerate(_list(f"{path}.syscalls", d.get("syscalls") or [])):
        p = f"{path}.syscalls[{i}]"
        e = _obj(p, entry, _SYSCALL_FIELDS)
        for required in ("names", "action"):
            if e.get(required) is None:
                raise ConfigError(f"{p}.{required}", "required")
        names = [_str(f"{p}.names[{j}]", n) for j, n in enumerate(_list(f"{p}.names", e["names"]))]
        if not names:
            raise ConfigError(f"{p}.names", "must not be empty")
        action = _action(f"{p}.action", e["action"], e.get("errnoRet"), f"{p}.errnoRet", api)
        conds = _conditions(f"{p}.args", e.get("args") or [])
        if action == default:
            continue  # changes nothing (and libseccomp refuses it)
        new = _rules_of(p, names, action, conds, skipped)
        rules.extend(new)
        rule_paths.extend([p] * len(new))
    return _build(path, default, arches, flags, rules, rule_paths, skipped)


def _build(path: str, default: int, arches: list[int], flags: list[tuple[str, str, int]], rules: list[Rule],
           rule_paths: list[str], skipped: list[str]) -> Filter:
    try:
        ctx = libc.seccomp_init(default)
    except OSError as e:
        raise ConfigError(f"{path}.defaultAction", f"libseccomp refused it: {e}") from None
    try:
        libc.seccomp_attr_set(ctx, libc.SCMP_FLTATR_CTL_NNP, 0)  # no_new_privs is the container's to set
        with suppress(OSError):  # before libseccomp 2.5: seccomp_load's errors say ECANCELED only
            libc.seccomp_attr_set(ctx, libc.SCMP_FLTATR_API_SYSRAWRC, 1)
        if len(rules) > _OPTIMIZE_ABOVE:
            with suppress(OSError):  # speed only: the linear filter checks the same
                libc.seccomp_attr_set(ctx, libc.SCMP_FLTATR_CTL_OPTIMIZE, 2)
        for i, token in enumerate(arches):
            try:
                libc.seccomp_arch_add(ctx, token)
            except OSError as e:
                raise ConfigError(f"{path}.architectures[{i}]", f"cannot be honoured: {e}") from None
        for p, name, attr in flags:
            try:
                libc.seccomp_attr_set(ctx, attr, 1)
            except OSError as e:
                raise ConfigError(p, f"{name} cannot be honoured by libseccomp {libc.seccomp_version()} on "
                                  f"this kernel: {e}") from None
        for (name, nr, action, conds), p in zip(rules, rule_paths, strict=True):
            try:
                libc.seccomp_rule_add(ctx, action, nr, list(conds), name)
            except OSError as e:
                raise ConfigError(p, f"{name}: libseccomp refused the rule: {e}") from None
    except BaseException:
        libc.seccomp_release(ctx)
        raise
    return Filter(ctx, default, tuple(sorted(set(arches))), tuple(sorted(n for _p, n, _a in flags)),
                  tuple(rules), tuple(skipped))


def features() -> dict[str, Any]:
    """The ``linux.seccomp`` part of the runtime-spec features document (`nsrun features`)."""
    try:
        ctx = libc.seccomp_init(ACTIONS["SCMP_ACT_ALLOW"])
    except NsRuntimeError:  # no libseccomp here: every profile is refused
        return {"enabled": False}
    supported = []
    try:
        for name, attr in FLAGS.items():
            with suppress(OSError):
                libc.seccomp_attr_set(ctx, attr, 1)
                supported.append(name)
    finally:
        libc.seccomp_release(ctx)
    return {
        "enabled": True,
        "actions": [a for a in ACTIONS if libc.seccomp_api_get() >= _MIN_API.get(a, 0)],
        "operators": [*OPERATORS],
        "archs": [a for a in ARCHITECTURES if libc.seccomp_arch_resolve_name(a[len("SCMP_ARCH_"):].lower())],
        "knownFlags": [*FLAGS],
        "supportedFlags": supported,
    }
