"""nsruntime.seccomp: OCI profiles compiled through libseccomp, loaded in a forked child (what the
kernel then refuses, or the signal it kills with) and in busybox containers through container.json's
``seccomp`` field; and every refusal, as its exact line."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nsruntime import libc, seccomp
from nsruntime.config import parse
from nsruntime.errors import ConfigError, SetupError
from tests.conftest import nsinit, write_config

ARCHS = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}[os.uname().machine]
NEW_NAMESPACES = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_personality = ctypes.CDLL(None, use_errno=True).personality
_personality.argtypes = [ctypes.c_ulong]
_personality.restype = ctypes.c_int


def realistic_profile(*, deny: tuple[str, ...] = ("mkdir", "mkdirat")) -> dict[str, Any]:
    """A container profile shaped like the distributions' defaults: refuse everything, allow a
    list (here, what busybox needs, minus ``deny``), personality only for the common personas,
    clone without namespace flags, clone3 answered ENOSYS so that libc falls back to clone. It
    names calls some kernels lack and one no kernel has: those are skipped."""
    allowed = [
        "access", "arch_prctl", "brk", "capget", "chdir", "chmod", "chown", "clock_gettime", "clock_nanosleep",
        "close", "close_range", "dup", "dup2", "dup3", "epoll_create1", "epoll_ctl", "epoll_pwait",
        "execve", "execveat", "exit", "exit_group", "faccessat", "faccessat2", "fchdir", "fchmod", "fcntl",
        "fstat", "fstatfs", "futex", "futex_waitv", "getcwd", "getdents64", "getegid", "geteuid", "getgid",
        "getgroups", "getpgid", "getpgrp", "getpid", "getppid", "getrandom", "getrlimit", "getsid", "gettid",
        "getuid", "ioctl", "kill", "landlock_create_ruleset", "lseek", "lstat", "madvise", "mmap", "mprotect",
        "munmap", "nanosleep", "newfstatat", "open", "openat", "openat2", "pipe", "pipe2", "poll", "ppoll",
        "prctl", "pread64", "prlimit64", "read", "readlink", "readlinkat", "readv", "rmdir", "rseq",
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "sched_getaffinity", "sched_yield",
        "sendfile", "set_robust_list", "set_tid_address", "setpgid", "setsid", "sigaltstack", "stat",
        "statfs", "statx", "sysinfo", "tgkill", "umask", "uname", "unlink", "unlinkat", "vfork", "wait4",
        "waitid", "write", "writev", "no_such_call_in_any_kernel",
    ]  # fmt: skip
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EPERM,
        "architectures": ARCHS,
        "syscalls": [
            {"names": [n for n in allowed if n not in deny], "action": "SCMP_ACT_ALLOW"},
            *({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]} for v in (0, 8, 0x20000, 0xFFFFFFFF)),
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": NEW_NAMESPACES, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
        ],
    }


def in_child(fn: Callable[[], object], timeout: float = 10.0) -> tuple[object, int]:
    """Run fn in a forked child; (what it returned, as JSON, or None; its wait status)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            out = json.dumps({"ok": fn()})
        except BaseException as e:
            out, code = json.dumps({"error": f"{type(e).__name__}: {e}"}), 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    data = b""
    try:
        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"child silent for {timeout} s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if not data:
        return None, status
    res = json.loads(data)
    if "error" in res:
        raise AssertionError(f"in the child: {res['error']}")
    return res["ok"], status


def errno_of(call: Callable[[], object]) -> int:
    """0 when call succeeds, else the errno it failed with."""
    try:
        call()
    except OSError as e:
        return e.errno or -1
    return 0


def personality(persona: int) -> int:
    """0 when personality(persona) succeeds, else its errno."""
    return 0 if _personality(persona) != -1 else ctypes.get_errno()


def allow_but(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": list(rules)}


# ------------------------------------------------------------------ in a forked child


def test_errno_denies_mkdir_with_eperm_or_the_given_errno(tmp_path: Path) -> None:
    for rule, expected in (({"action": "SCMP_ACT_ERRNO"}, errno.EPERM),
                           ({"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS}, errno.EROFS)):
        f = seccomp.compile(allow_but({"names": ["mkdir", "mkdirat"], **rule}))

        def probe(f: seccomp.Filter = f) -> list[int]:
            f.load()
            return [errno_of(lambda: os.mkdir(tmp_path / "d")), errno_of(lambda: (tmp_path / "f").write_text("x"))]

        got, status = in_child(probe)
        assert got == [expected, 0] and os.waitstatus_to_exitcode(status) == 0
        assert not (tmp_path / "d").exists()


def test_kill_process_kills_the_child_with_sigsys(tmp_path: Path) -> None:
    f = seccomp.compile(allow_but({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}))

    def probe() -> None:
        f.load()
        os.mkdir(tmp_path / "d")

    got, status = in_child(probe)
    assert got is None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
    assert not (tmp_path / "d").exists()


def test_a_filter_loads_in_each_forked_child_and_never_in_the_parent(tmp_path: Path) -> None:
    f = seccomp.compile(allow_but({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}))
    for _ in range(2):
        assert in_child(lambda: (f.load(), errno_of(lambda: os.mkdir(tmp_path / "d")))[1])[0] == errno.EPERM
    os.mkdir(tmp_path / "d")  # the parent built the filter, never loaded it
    f.release()
    f.release()
    with pytest.raises(SetupError, match=r"^seccomp: the filter was released$"):
        f.load()


def test_personality_is_allowed_for_the_query_only() -> None:
    """The query personality(0xffffffff) allowed, any other persona refused: one condition."""
    f = seccomp.compile(allow_but({"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                                   "args": [{"index": 0, "value": 0xFFFFFFFF, "op": "SCMP_CMP_NE"}]}))
    got, _ = in_child(lambda: (f.load(), [personality(p) for p in (0xFFFFFFFF, 0, 8, 0x20000)])[1])
    assert got == [0, errno.EPERM, errno.EPERM, errno.EPERM]


def test_conditions_on_distinct_arguments_must_all_hold() -> None:
    """setpriority(which, who, prio): refused only for PRIO_PROCESS *and* prio 5."""
    f = seccomp.compile(allow_but({"names": ["setpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES,
                                   "args": [{"index": 0, "value": os.PRIO_PROCESS, "op": "SCMP_CMP_EQ"},
                                            {"index": 2, "value": 5, "op": "SCMP_CMP_EQ"}]}))

    def probe() -> list[int]:
        os.setpgid(0, 0)  # a group of its own: PRIO_PGRP 0 is this child alone
        f.load()
        return [errno_of(lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)),
                errno_of(lambda: os.setpriority(os.PRIO_PROCESS, 0, 6)),
                errno_of(lambda: os.setpriority(os.PRIO_PGRP, 0, 5))]

    assert in_child(probe)[0] == [errno.EACCES, 0, 0]


def test_a_repeated_argument_makes_one_rule_per_condition_like_runc() -> None:
    """Two conditions on argument 0: either one refuses (OR), as runc compiles them."""
    f = seccomp.compile(allow_but({"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                                   "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                                            {"index": 0, "value": 0x20000, "op": "SCMP_CMP_EQ"}]}))
    got, _ = in_child(lambda: (f.load(), [personality(p) for p in (8, 0x20000, 0, 0xFFFFFFFF)])[1])
    assert got == [errno.EPERM, errno.EPERM, 0, 0]


def test_masked_eq_compares_the_masked_argument_with_value_two() -> None:
    f = seccomp.compile(allow_but({"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EINVAL,
                                   "args": [{"index": 0, "value": 0xFF00, "valueTwo": 0x0400,
                                             "op": "SCMP_CMP_MASKED_EQ"}]}))
    got, _ = in_child(lambda: (f.load(), [personality(p) for p in (0x0400, 0x0408, 0x0C00, 0)])[1])
    assert got == [errno.EINVAL, errno.EINVAL, 0, 0]


def test_unknown_syscall_names_are_skipped_like_runc(tmp_path: Path) -> None:
    f = seccomp.compile(allow_but({"names": ["no_such_call", "mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}))
    assert f.skipped == ("no_such_call",)
    assert [r[0] for r in f.rules] == ["mkdir", "mkdirat"]
    assert in_child(lambda: (f.load(), errno_of(lambda: os.mkdir(tmp_path / "d")))[1])[0] == errno.EPERM


def test_rules_with_the_default_action_are_dropped_and_filters_compare_by_content() -> None:
    a = seccomp.compile(allow_but({"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},
                                  {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}))
    b = seccomp.compile(allow_but({"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}))
    assert a == b and hash(a) == hash(b) and a.rules == (("mkdir", b.rules[0][1], 0x00050001, ()),)


def test_the_realistic_profile_compiles_and_skips_what_it_must() -> None:
    f = seccomp.compile(realistic_profile())
    assert "no_such_call_in_any_kernel" in f.skipped
    assert not {"mkdir", "mkdirat"} & {r[0] for r in f.rules}
    assert {r[0] for r in f.rules} >= {"execve", "personality", "clone", "clone3"}


# ------------------------------------------------------------------ refusals, each one line

REFUSALS = [
    ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]},
     "linux.seccomp.defaultAction: required"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"},
     "linux.seccomp.defaultAction: SCMP_ACT_NOTIFY is not supported (it needs a seccomp agent; listenerPath is "
     "refused)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}] * 3
      + [{"names": ["ioctl"], "action": "SCMP_ACT_NOTIFY"}]},
     "linux.seccomp.syscalls[3].action: SCMP_ACT_NOTIFY is not supported (it needs a seccomp agent; listenerPath "
     "is refused)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"},
     "linux.seccomp.listenerPath: a seccomp agent (SCMP_ACT_NOTIFY) is not supported"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_DENY"}]},
     'linux.seccomp.syscalls[0].action: "SCMP_ACT_DENY" is not a seccomp action (SCMP_ACT_KILL, '
     "SCMP_ACT_KILL_THREAD, SCMP_ACT_KILL_PROCESS, SCMP_ACT_TRAP, SCMP_ACT_ERRNO, SCMP_ACT_TRACE, SCMP_ACT_LOG, "
     "SCMP_ACT_ALLOW)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1},
     "linux.seccomp.defaultErrnoRet: SCMP_ACT_ALLOW returns no errno (only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take "
     "one)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "errnoRet": 70000}]},
     "linux.seccomp.syscalls[0].errnoRet: 70000 out of range (0..65535)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_VAX"]},
     f'linux.seccomp.architectures[1]: "SCMP_ARCH_VAX" is not an architecture libseccomp '
     f"{libc.seccomp_version()} knows"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]},
     "linux.seccomp.flags[0]: SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV is not supported (only meaningful with a "
     "seccomp agent, which is refused)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_FAST"]},
     'linux.seccomp.flags[1]: "SECCOMP_FILTER_FLAG_FAST" is not a seccomp flag nsinit knows '
     "(SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_FILTER_FLAG_LOG, SECCOMP_FILTER_FLAG_SPEC_ALLOW)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_IN"}]}]},
     'linux.seccomp.syscalls[0].args[0].op: "SCMP_CMP_IN" is not a seccomp operator (SCMP_CMP_NE, SCMP_CMP_LT, '
     "SCMP_CMP_LE, SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     "linux.seccomp.syscalls[0].args[0].index: 6 out of range (0..5)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "args": [{"index": 0, "op": "SCMP_CMP_EQ"}]}]},
     "linux.seccomp.syscalls[0].args[0].value: required"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}]},
     "linux.seccomp.syscalls[0].names: must not be empty"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "read", "action": "SCMP_ACT_ERRNO"}]},
     "linux.seccomp.syscalls[0].name: unknown field"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                                                       "includes": {"caps": ["CAP_SYS_ADMIN"]}}]},
     "linux.seccomp.syscalls[0].includes: unknown field"),
    ("SCMP_ACT_ALLOW", "linux.seccomp: expected an object, got string"),
]


@pytest.mark.parametrize(("profile", "line"), REFUSALS, ids=[line.split(":")[0] for _p, line in REFUSALS])
def test_what_cannot_be_honoured_is_refused_naming_the_json_path(profile: object, line: str) -> None:
    with pytest.raises(ConfigError) as ei:
        seccomp.compile(profile)
    assert str(ei.value) == line


def test_an_action_the_kernel_lacks_is_refused_not_downgraded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel older than 4.14 has no SECCOMP_RET_KILL_PROCESS (libseccomp API level 2): refused,
    never replaced by a weaker action. The level is faked: this kernel has them all."""
    monkeypatch.setattr(libc, "seccomp_api_get", lambda: 2)
    with pytest.raises(ConfigError) as ei:
        seccomp.compile(allow_but({"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"}))
    assert str(ei.value) == (f"linux.seccomp.syscalls[0].action: SCMP_ACT_KILL_PROCESS cannot be honoured: "
                             f"libseccomp {libc.seccomp_version()} on this kernel is at API level 2, "
                             "SCMP_ACT_KILL_PROCESS needs 3")


def test_container_json_names_its_own_field_path() -> None:
    with pytest.raises(ConfigError) as ei:
        parse({"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "NOTIFY"}]}})
    assert str(ei.value).startswith('seccomp.syscalls[0].action: "NOTIFY" is not a seccomp action (')
    assert parse({}).seccomp is None


def test_features_lists_what_compile_accepts() -> None:
    feats = seccomp.features()
    assert feats["enabled"] is True and "SCMP_ACT_NOTIFY" not in feats["actions"]
    assert set(feats["operators"]) == set(seccomp.OPERATORS) and set(ARCHS) <= set(feats["archs"])


# ------------------------------------------------------------------ in a container, through container.json

@pytest.mark.privileged
def test_a_container_with_an_errno_rule_cannot_mkdir(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, seccomp=allow_but({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                                                   "errnoRet": errno.EACCES}))
    p = nsinit(busybox_rootfs, "exec", "mkdir", "/tmp/d")
    assert (p.returncode, p.stderr) == (1, "mkdir: can't create directory '/tmp/d': Permission denied\n")
    assert not (busybox_rootfs / "tmp" / "d").exists()


@pytest.mark.privileged
def test_the_realistic_profile_runs_busybox_and_refuses_what_it_does_not_list(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, seccomp=realistic_profile())
    p = nsinit(busybox_rootfs, "exec", "true")
    assert (p.returncode, p.stderr) == (0, "")
    p = nsinit(busybox_rootfs, "exec", "sh", "-c", "echo hi; mkdir /tmp/d; echo $?; ls -d /tmp")
    assert (p.returncode, p.stdout, p.stderr) == (
        0, "hi\n1\n/tmp\n", "mkdir: can't create directory '/tmp/d': Operation not permitted\n")


@pytest.mark.privileged
def test_kill_process_in_a_container_ends_it_with_sigsys(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, seccomp=allow_but({"names": ["mkdir", "mkdirat"],
                                                   "action": "SCMP_ACT_KILL_PROCESS"}))
    p = nsinit(busybox_rootfs, "exec", "mkdir", "/tmp/d")
    assert p.returncode == 128 + signal.SIGSYS, p.stderr
    assert not (busybox_rootfs / "tmp" / "d").exists()


@pytest.mark.privileged
def test_without_no_new_privileges_the_filter_loads_before_capabilities_drop(busybox_rootfs: Path) -> None:
    """Without no_new_privs the kernel takes a filter only from CAP_SYS_ADMIN: it is loaded before
    the capability mask drops it."""
    write_config(busybox_rootfs, no_new_privileges=False, capabilities_mask=["SYS_ADMIN"],
                 seccomp=allow_but({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}))
    p = nsinit(busybox_rootfs, "exec", "sh", "-c", "grep NoNewPrivs /proc/self/status; mkdir /tmp/d")
    assert (p.returncode, p.stdout, p.stderr) == (
        1, "NoNewPrivs:\t0\n", "mkdir: can't create directory '/tmp/d': Operation not permitted\n")


@pytest.mark.privileged
def test_a_refused_profile_stops_nsinit_before_anything_runs(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, seccomp={"defaultAction": "SCMP_ACT_ALLOW",
                                          "syscalls": [{"names": ["ioctl"], "action": "SCMP_ACT_NOTIFY"}]})
    p = nsinit(busybox_rootfs, "exec", "touch", "/ran")
    assert (p.returncode, p.stderr) == (125, "nsinit: seccomp.syscalls[0].action: SCMP_ACT_NOTIFY is not supported "
                                             "(it needs a seccomp agent; listenerPath is refused)\n")
    assert not (busybox_rootfs / "ran").exists()


@pytest.mark.privileged
@pytest.mark.parametrize("via_zygote", [False, True], ids=["direct", "zygote"])
def test_the_filter_holds_for_the_first_command_and_for_a_joined_one(busybox_rootfs: Path, tmp_path: Path,
                                                                     via_zygote: bool) -> None:
    """The zygote (nsinitd's way) parses the config inside the container's process, before its
    root is switched; a join builds the filter from the recorded config: all of them filter."""
    import nsruntime
    from nsruntime.zygote import Zygote

    write_config(busybox_rootfs, seccomp=allow_but({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}))
    cfg = nsruntime.load_config(busybox_rootfs / "container.json")
    z = Zygote.start() if via_zygote else None
    r, w = os.pipe()
    c = None
    try:
        command = ["sh", "-c", "mkdir /tmp/a 2>&1; echo done; exec sleep 60"]
        c = nsruntime.create(cfg, busybox_rootfs, command, tmp_path / "s", die_with_parent=False, stdio=(0, w, w),
                             zygote=z)
        os.close(w)
        w = -1
        c.start()
        said = b""
        while not said.endswith(b"done\n") and select.select([r], [], [], 10)[0]:
            said += os.read(r, 4096)
        assert said == b"mkdir: can't create directory '/tmp/a': Operation not permitted\ndone\n"
        assert nsruntime.join(tmp_path / "s", ["mkdir", "/tmp/b"]) == 1
        assert not (busybox_rootfs / "tmp" / "a").exists() and not (busybox_rootfs / "tmp" / "b").exists()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        if c is not None:
            c.destroy()
        if z is not None:
            z.close()
