"""nsruntime.oci.hooks: small shell-script hooks written by each test; what they receive (stdin,
argv, environment, signals), how they fail (one line), and that no process of theirs outlives a
timeout."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsruntime import libc
from nsruntime.errors import ConfigError
from nsruntime.oci import hooks
from nsruntime.oci.hooks import Hook, HookError

STATE = {"ociVersion": "1.2.0", "id": "c1", "status": "creating", "pid": 4242, "bundle": "/b", "annotations": {}}


@pytest.fixture
def adopt_orphans() -> Iterator[None]:
    """This process adopts what the hooks' children leave (a child subreaper), so that the test
    reaps them itself rather than waiting on whoever PID 1 is here."""
    libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 0)


def reap(pid: int, timeout: float = 5.0) -> int:
    """Wait (at most timeout) for an adopted orphan to end; its exit status."""
    fd = os.pidfd_open(pid)
    try:
        assert libc.wait_readable(fd, timeout), f"pid {pid} still alive after {timeout} s"
    finally:
        os.close(fd)
    return os.waitpid(pid, 0)[1]


def script(tmp_path: Path, name: str, body: str, mode: int = 0o755) -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(mode)
    return str(p)


def test_a_hook_reads_the_state_on_stdin_with_its_argv_and_only_its_env(tmp_path: Path) -> None:
    path = script(tmp_path, "h.sh", 'echo "$0|$1|$2"; cat > "$1"; env | sort >&2\n'
                                     "grep -E '^Sig(Blk|Ign)' /proc/self/status >&2; ls /proc/self/fd >&2\n")
    hook = Hook(path, (path, str(tmp_path / "state"), "two words"), ("A=1", "B=x=y"))
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})
    old_pipe = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        out = hooks.run("createRuntime", 0, hook, json.dumps(STATE).encode())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGUSR2, old_pipe)
    assert json.loads((tmp_path / "state").read_text()) == STATE
    assert out.stdout == f"{path}|{tmp_path / 'state'}|two words\n".encode()
    lines = out.stderr.decode().splitlines()
    assert [x for x in lines if "=" in x and not x.startswith("PWD=")] == ["A=1", "B=x=y"]
    # default dispositions and an empty mask whatever the caller's; stdio only (and ls's own directory)
    assert "SigBlk:\t0000000000000000" in lines and "SigIgn:\t0000000000000000" in lines
    assert lines[-4:] == ["0", "1", "2", "3"]


def test_without_args_argv_is_the_path_and_without_env_the_callers_environment(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSRUN_HOOK_PROBE", "inherited")
    path = script(tmp_path, "h.sh", 'echo "$0 $# $NSRUN_HOOK_PROBE"\n')
    assert hooks.run("poststop", 0, Hook(path), b"{}").stdout == f"{path} 0 inherited\n".encode()
    assert hooks.run("poststop", 0, Hook(path, env=()), b"{}").stdout == f"{path} 0 \n".encode()


def test_a_hook_that_never_reads_a_large_state_is_not_blocked_on(tmp_path: Path) -> None:
    path = script(tmp_path, "h.sh", "echo done\n")
    big = json.dumps({**STATE, "annotations": {"x": "y" * (4 << 20)}}).encode()
    assert hooks.run("prestart", 0, Hook(path, timeout=10), big).stdout == b"done\n"


def test_a_failing_hook_is_one_line_with_its_kind_index_path_and_last_stderr_line(tmp_path: Path) -> None:
    path = script(tmp_path, "h.sh", "echo partial; echo 'first' >&2; echo 'no route to \"db\"' >&2; exit 3\n")
    with pytest.raises(HookError) as ei:
        hooks.run("prestart", 0, Hook(path), b"{}")
    assert str(ei.value) == f'hooks.prestart[0] {path}: exited 3 (stderr: "no route to \\"db\\"")'
    assert (ei.value.stdout, ei.value.stderr) == (b"partial\n", b'first\nno route to "db"\n')
    quiet = script(tmp_path, "q.sh", "exit 1\n")
    with pytest.raises(HookError) as ei:
        hooks.run("poststop", 2, Hook(quiet), b"{}")
    assert str(ei.value) == f"hooks.poststop[2] {quiet}: exited 1"


def test_a_hook_killed_by_a_signal_says_which(tmp_path: Path) -> None:
    path = script(tmp_path, "h.sh", "kill -TERM $$\n")
    with pytest.raises(HookError) as ei:
        hooks.run("createContainer", 1, Hook(path), b"{}")
    assert str(ei.value) == f"hooks.createContainer[1] {path}: killed by SIGTERM"


@pytest.mark.parametrize(("mode", "exists", "reason"), [
    (0o644, True, "Permission denied"),
    (0o755, False, "No such file or directory"),
])
def test_a_hook_that_cannot_be_executed_says_why(tmp_path: Path, mode: int, exists: bool, reason: str) -> None:
    path = script(tmp_path, "h.sh", "exit 0\n", mode) if exists else str(tmp_path / "missing")
    with pytest.raises(HookError) as ei:
        hooks.run("startContainer", 0, Hook(path), b"{}")
    assert str(ei.value) == f"hooks.startContainer[0] {path}: cannot execute: {reason}"


@pytest.mark.usefixtures("adopt_orphans")
def test_on_timeout_the_hooks_whole_process_group_is_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path, "h.sh", f'sleep 60 & echo $$ $! > {pids}; echo waiting >&2; wait\n')
    start = time.monotonic()
    with pytest.raises(HookError) as ei:
        hooks.run("createRuntime", 0, Hook(path, timeout=1), b"{}")
    assert 1 <= time.monotonic() - start < 5
    assert str(ei.value) == (f"hooks.createRuntime[0] {path}: timed out after 1 s (its process group was killed) "
                             '(stderr: "waiting")')
    hook_pid, child_pid = map(int, pids.read_text().split())
    assert not os.path.exists(f"/proc/{hook_pid}")  # killed and reaped by run()
    assert os.waitstatus_to_exitcode(reap(child_pid)) == -signal.SIGKILL  # killed with its group


@pytest.mark.usefixtures("adopt_orphans")
def test_a_hook_returns_when_it_exits_even_if_its_child_keeps_stdout_open(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    path = script(tmp_path, "h.sh", f"sleep 60 & echo $! > {pidfile}; echo out; echo err >&2\n")
    start = time.monotonic()
    out = hooks.run("poststart", 0, Hook(path, timeout=30), b"{}")
    assert time.monotonic() - start < 5 and (out.stdout, out.stderr) == (b"out\n", b"err\n")
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGKILL)  # the hook's own business, left running; ours to clean up here
    assert os.waitstatus_to_exitcode(reap(pid)) == -signal.SIGKILL


def test_an_interrupted_caller_still_kills_and_reaps_the_hook(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    path = script(tmp_path, "h.sh", f"echo $$ > {pidfile}; exec sleep 60\n")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            hooks.run("poststop", 0, Hook(path), b"{}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pid = int(pidfile.read_text())
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped before run() let go


def test_fatal_kinds_stop_at_the_first_failure_and_post_kinds_run_all(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    ok = script(tmp_path, "ok.sh", f"echo ok >> {ran}\n")
    bad = script(tmp_path, "bad.sh", f"echo bad >> {ran}; exit 2\n")
    for kind in ("prestart", "createRuntime", "createContainer", "startContainer"):
        ran.write_text("")
        with pytest.raises(HookError) as ei:
            hooks.run_kind(kind, [Hook(ok), Hook(bad), Hook(ok)], STATE)
        assert str(ei.value) == f"hooks.{kind}[1] {bad}: exited 2"
        assert ran.read_text() == "ok\nbad\n"
    for kind in ("poststart", "poststop"):
        ran.write_text("")
        failed = hooks.run_kind(kind, [Hook(bad), Hook(ok), Hook(bad)], STATE)
        assert [str(e) for e in failed] == [f"hooks.{kind}[0] {bad}: exited 2", f"hooks.{kind}[2] {bad}: exited 2"]
        assert ran.read_text() == "bad\nok\nbad\n"


def test_parse_reads_every_kind_in_order() -> None:
    parsed = hooks.parse({"prestart": [{"path": "/bin/a", "args": ["a", "-x"], "env": ["K=V"], "timeout": 5}],
                          "poststop": [{"path": "/bin/b"}, {"path": "/bin/c", "args": []}]})
    assert parsed == {"prestart": (Hook("/bin/a", ("a", "-x"), ("K=V",), 5),),
                      "poststop": (Hook("/bin/b"), Hook("/bin/c"))}


@pytest.mark.parametrize(("obj", "line"), [
    ({"prestart": [{"args": ["x"]}]}, "hooks.prestart[0].path: required"),
    ({"prestart": [{"path": "bin/x"}]}, 'hooks.prestart[0].path: "bin/x" is not an absolute path'),
    ({"poststop": [{"path": "/x"}, {"path": "/x", "timeout": 0}]}, "hooks.poststop[1].timeout: 0 out of range (>= 1)"),
    ({"poststop": [{"path": "/x", "timeout": "5"}]}, "hooks.poststop[0].timeout: expected an integer, got string"),
    ({"createRuntime": [{"path": "/x", "env": ["PATH"]}]}, 'hooks.createRuntime[0].env[0]: "PATH" is not NAME=VALUE'),
    ({"prestop": []}, "hooks.prestop: unknown field"),
    ({"poststart": [{"path": "/x", "timout": 1}]}, "hooks.poststart[0].timout: unknown field"),
    ({"poststart": {"path": "/x"}}, "hooks.poststart: expected a list, got object"),
])
def test_parse_refuses_a_bad_hook_naming_the_field(obj: object, line: str) -> None:
    with pytest.raises(ConfigError) as ei:
        hooks.parse(obj)
    assert str(ei.value) == line
