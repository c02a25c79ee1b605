"""nsinitd in-process with real plain processes: lifecycle, restart, stop, reload, logs, cgroups."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any as ConfigWriter

import pytest
import trio

from nsruntime import ExitStatus
from supervisor.api import ControlError
from supervisor.events import EventBus
from supervisor.process import Reaper, cgroup2_mount
from supervisor.program import Context, Program
from supervisor.spawner import NsRuntime
from supervisor.states import ProcessState

HAS_CGROUP2 = cgroup2_mount() is not None


async def wait_for_output(path: Path, text: str, timeout: float = 10) -> None:
    """Until a program's captured output holds text (e.g. its TERM trap is in place)."""
    with trio.fail_after(timeout):
        while not path.exists() or text not in path.read_text():
            await trio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_lifecycle_events_in_order(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.sleeper]
        command = ["sleep", "60"]
        startsecs = 0.2
    """))
    running = await r.watcher.wait("program.running", "sleeper")
    [st] = r.daemon.status(["sleeper"])
    assert st.state == "RUNNING" and st.pid == running["pid"] and st.description.startswith(f"pid {st.pid}")
    pidfile = cfg.root / "state" / "sleeper" / "pid"
    assert pidfile.read_text().strip() == str(st.pid)
    st = await r.daemon.stop("sleeper")
    assert st.state == "STOPPED" and st.signal == "SIGTERM" and st.exit_code == 143
    assert r.watcher.names("sleeper") == ["program.starting", "program.running", "program.stopping",
                                          "program.exited", "program.stopped"]
    exited = r.watcher.find("program.exited", "sleeper")[0]
    assert exited["expected"] is True and exited["signal"] == "SIGTERM"
    assert not pidfile.exists()
    st = await r.daemon.start("sleeper")
    assert st.state == "RUNNING"
    with pytest.raises(ControlError) as e:
        r.daemon.status(["nope"])
    assert e.value.code == "no_such_program"


async def test_sigkilled_program_is_reported_and_restarted(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.victim]
        command = ["sleep", "60"]
        startsecs = 0.1
        autorestart = "on-failure"
    """))
    first = await r.watcher.wait("program.running", "victim")
    os.kill(first["pid"], signal.SIGKILL)
    exited = await r.watcher.wait("program.exited", "victim")
    assert exited == {**exited, "pid": first["pid"], "exit_code": 137, "signal": "SIGKILL", "expected": False}
    second = await r.watcher.wait("program.running", "victim", count=2)
    assert second["pid"] != first["pid"] and _alive(second["pid"])
    assert r.daemon.status(["victim"])[0].restarts == 1


async def test_expected_exit_is_not_restarted_on_failure(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.once]
        command = ["sh", "-c", "sleep 0.3; exit 3"]
        startsecs = 0.1
        exitcodes = [3]
    """))
    exited = await r.watcher.wait("program.exited", "once")
    assert exited["exit_code"] == 3 and exited["expected"] is True
    with trio.fail_after(5):
        await r.daemon.programs["once"].wait_until(lambda s: s is ProcessState.EXITED)
    assert r.daemon.status(["once"])[0].description == "exited 3"


async def test_fatal_after_startretries_with_real_processes(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.crash]
        command = ["sh", "-c", "echo dying >&2; exit 1"]
        startsecs = 1
        startretries = 2
        backoff = { initial = 0.05, factor = 2.0, max = 1.0 }
    """))
    fatal = await r.watcher.wait("program.fatal", "crash")
    assert "3 times" in fatal["reason"]
    assert [e["delay"] for e in r.watcher.find("program.backoff", "crash")] == [0.05, 0.1]
    assert len(r.watcher.find("program.exited", "crash")) == 3
    assert (cfg.root / "logs" / "crash.err").read_text() == "dying\n" * 3
    st = r.daemon.status(["crash"])[0]
    assert st.state == "FATAL" and "startretries=2" in st.description


async def test_spawn_error_is_reported(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.ghost]
        command = ["/no/such/binary"]
        startretries = 0
    """))
    fatal = await r.watcher.wait("program.fatal", "ghost")
    assert "exec /no/such/binary: No such file or directory" in fatal["reason"]
    assert r.watcher.find("program.exited", "ghost") == []


async def test_stop_kills_a_program_that_ignores_term(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.stubborn]
        command = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]
        startsecs = 0.2
        stopwaitsecs = 0.5
    """))
    await r.watcher.wait("program.running", "stubborn")
    await wait_for_output(cfg.root / "logs" / "stubborn.out", "ready")
    with trio.fail_after(5):
        t0 = trio.current_time()
        st = await r.daemon.stop("stubborn")
        waited = trio.current_time() - t0
    assert st.state == "STOPPED"
    assert 0.45 <= waited < 3
    assert r.watcher.names("stubborn")[-4:] == ["program.stopping", "program.killing", "program.exited",
                                                "program.stopped"]
    assert r.watcher.find("program.exited", "stubborn")[0]["signal"] == "SIGKILL"


@pytest.mark.skipif(not HAS_CGROUP2, reason="needs the cgroup2 tree")
async def test_grandchildren_die_with_their_program(cfg: ConfigWriter, run_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gc = tmp_path / "gc.pid"
    r = await run_daemon(cfg.load(f"""
        [programs.parent]
        command = ["sh", "-c", "sleep 300 & echo $! > {gc}; sleep 300 & wait"]
        startsecs = 0.2
    """))
    await r.watcher.wait("program.running", "parent")
    grandchild = int(gc.read_text())
    cg = r.daemon.ctx.cgroup_root / "parent"
    assert grandchild in [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    await r.daemon.stop("parent")
    assert not _alive(grandchild)
    assert not cg.exists()


async def test_orphans_are_reaped(cfg: ConfigWriter, run_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the subshell exits at once, orphaning its sleep: it is reparented to us (subreaper) and reaped
    r = await run_daemon(cfg.load("""
        [programs.orphaner]
        command = ["sh", "-c", "(sleep 0.2 &); exec sleep 60"]
        startsecs = 0.1
    """))
    reaped = await r.watcher.wait("stranger.reaped")
    assert reaped["exit_code"] == 0
    assert r.daemon.status(["orphaner"])[0].state == "RUNNING"


async def test_output_capture_redirect_and_rotation(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.split]
        command = ["sh", "-c", "echo out; echo err >&2; exec sleep 60"]
        startsecs = 0.1
        [programs.merged]
        command = ["sh", "-c", "echo out; echo err >&2; exec sleep 60"]
        startsecs = 0.1
        redirect_stderr = true
        [programs.chatty]
        command = ["sh", "-c", "i=0; while [ $i -lt 200 ]; do echo line-$i; i=$((i+1)); done; exec sleep 60"]
        startsecs = 0.1
        stdout_maxbytes = 500
        stdout_backups = 2
    """))
    logs = cfg.root / "logs"
    with trio.fail_after(5):
        while not (logs / "chatty.out.2").exists() or b"line-199" not in (logs / "chatty.out").read_bytes():
            await trio.sleep(0.02)
    assert (logs / "split.out").read_text() == "out\n"
    assert (logs / "split.err").read_text() == "err\n"
    assert sorted((logs / "merged.out").read_text().split()) == ["err", "out"]
    assert not (logs / "merged.err").exists()
    assert not (logs / "chatty.out.3").exists()
    assert all((logs / n).stat().st_size <= 500 for n in ["chatty.out", "chatty.out.1", "chatty.out.2"])
    assert r.daemon.log_path("merged", "stderr") == logs / "merged.out"
    with pytest.raises(ControlError):
        r.daemon.log_path("merged", "stdin")


async def test_reload_adds_removes_and_changes(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.keep]
        command = ["sleep", "60"]
        startsecs = 0.1
        [programs.gone]
        command = ["sleep", "60"]
        startsecs = 0.1
        [programs.edit]
        command = ["sleep", "60"]
        startsecs = 0.1
    """))
    keep_pid = r.daemon.status(["keep"])[0].pid
    edit_pid = r.daemon.status(["edit"])[0].pid
    gone_pid = r.daemon.status(["gone"])[0].pid
    cfg.write("""
        [programs.keep]
        command = ["sleep", "60"]
        startsecs = 0.1
        [programs.edit]
        command = ["sleep", "61"]
        startsecs = 0.1
        [programs.new]
        command = ["sleep", "60"]
        startsecs = 0.1
    """)
    with trio.fail_after(10):
        result = await r.daemon.reload()
    assert result == {"added": ["new"], "removed": ["gone"], "changed": ["edit"]}
    reloaded = await r.watcher.wait("config.reloaded")
    assert reloaded["added"] == ["new"] and reloaded["removed"] == ["gone"] and reloaded["changed"] == ["edit"]
    assert sorted(r.daemon.programs) == ["edit", "keep", "new"]
    await r.watcher.wait("program.running", "new")
    await r.watcher.wait("program.running", "edit", count=2)
    assert r.daemon.status(["keep"])[0].pid == keep_pid
    assert r.daemon.status(["edit"])[0].pid != edit_pid
    assert not _alive(gone_pid) and not _alive(edit_pid)
    assert r.watcher.find("program.stopped", "gone")

    cfg.write('[programs.keep]\ncommand = ["sleep", "60"]\nautorestart = "maybe"\n')
    with pytest.raises(ControlError) as e:
        await r.daemon.reload()
    assert e.value.code == "failed" and "programs.keep.autorestart" in e.value.message
    assert (await r.watcher.wait("config.error"))["error"].startswith("programs.keep.autorestart")
    assert sorted(r.daemon.programs) == ["edit", "keep", "new"]


async def test_signal_and_api_errors(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.a]
        command = ["sleep", "60"]
        startsecs = 0.1
        autorestart = "never"
        [programs.b]
        command = ["sleep", "60"]
        autostart = false
    """))
    assert [s.state for s in r.daemon.status()] == ["RUNNING", "STOPPED"]
    with pytest.raises(ControlError) as e:
        r.daemon.signal("b", signal.SIGTERM)
    assert e.value.code == "bad_state"
    with pytest.raises(ControlError) as e:
        r.daemon.exec_target("a")
    assert e.value.code == "not_a_container"
    r.daemon.signal("a", signal.SIGUSR1)
    exited = await r.watcher.wait("program.exited", "a")
    assert exited["signal"] == "SIGUSR1" and exited["exit_code"] == 128 + signal.SIGUSR1
    with trio.fail_after(5):
        await r.daemon.programs["a"].wait_until(lambda s: s is ProcessState.EXITED)
    st = await r.daemon.restart("b")
    assert st.state == "RUNNING"
    assert r.daemon.pid == os.getpid() and r.daemon.socket_group is None


async def test_priorities_order_start_and_stop(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.db]
        command = ["sleep", "60"]
        priority = 1
        startsecs = 0.1
        [programs.web]
        command = ["sleep", "60"]
        priority = 2
        startsecs = 0.1
    """))
    r.daemon.request_shutdown()
    with trio.fail_after(10):
        await r.daemon.done.wait()
    seq = [(e["event"], e.get("program")) for e in r.watcher.events
           if e["event"] in ("program.running", "program.stopped")]
    assert seq == [("program.running", "db"), ("program.running", "web"),
                   ("program.stopped", "web"), ("program.stopped", "db")]
    assert r.watcher.events[-1]["event"] == "supervisor.stopped"


async def test_plain_child_starts_clean(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    # CPython ignores SIGPIPE/SIGXFSZ and trio may block signals: none of it may reach the program,
    # and no descriptor of nsinitd's may leak into it.
    script = "grep -E '^Sig(Blk|Ign)' /proc/self/status; ls /proc/self/fd | tr '\\\\n' ' '; exec sleep 60"
    r = await run_daemon(cfg.load(f"""
        [programs.probe]
        command = ["sh", "-c", "{script}"]
        startsecs = 0.1
    """))
    await r.watcher.wait("program.running", "probe")
    out = cfg.root / "logs" / "probe.out"
    with trio.fail_after(5):
        while out.read_text().count("\n") < 2 or not out.read_text().rstrip().endswith("3"):
            await trio.sleep(0.02)
    lines = out.read_text().splitlines()
    assert lines[0].split() == ["SigBlk:", "0000000000000000"]
    assert lines[1].split() == ["SigIgn:", "0000000000000000"]
    assert lines[2].split() == ["0", "1", "2", "3"]  # 3: ls's own directory


async def test_cancellation_reaps(cfg: ConfigWriter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = cfg.load("""
        [programs.p]
        command = ["sh", "-c", "trap '' TERM; echo ready; exec sleep 60"]
        startsecs = 0
        stopwaitsecs = 0.3
    """)
    bus = EventBus(None)
    seen: list[dict[str, object]] = []
    bus.taps.append(seen.append)
    reaper = Reaper()
    prog = Program(config.programs["p"], Context(bus, reaper, tmp_path / "logs", tmp_path / "state", NsRuntime(reaper)))
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as n:
            await n.start(prog.run)
            await prog.start()  # until RUNNING (command() returns before the spawn it calls for)
            pid = prog.pid
            assert pid is not None and _alive(pid)
            while not (tmp_path / "logs" / "p.out").read_text():  # TERM is ignored from here on
                await trio.sleep(0.01)
            scope.cancel()  # e.g. the daemon's nursery dies: the program must still be reaped
    assert prog.done.is_set()
    assert not _alive(pid) and not Path(f"/proc/{pid}").exists()
    names = [e["event"] for e in seen]
    assert names[-4:] == ["program.stopping", "program.killing", "program.exited", "program.stopped"]


def test_the_reaper_never_steals_an_owned_status(tmp_path: Path) -> None:
    from supervisor.process import spawn_plain

    reaper = Reaper()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        owned = spawn_plain(["sh", "-c", "exit 7"], {"PATH": os.environ["PATH"]}, (devnull,) * 3, reaper)
        stranger = os.fork()
        if stranger == 0:
            os._exit(3)
        deadline = time.monotonic() + 5
        while _alive(owned.pid) or _alive(stranger):  # both zombies now, neither reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reaped = reaper.reap_strangers()
        assert [(pid, info.exit_code) for pid, info in reaped] == [(stranger, 3)]
        info = owned.reap()  # still there for its owner
        assert info is not None and info.exit_code == 7 and info.signal is None
        assert owned.pid not in reaper.owned
    finally:
        os.close(devnull)
    assert info == ExitStatus(7, None)  # the runtime's record: one for a plain process and a container


def test_spawn_error_names_the_step(tmp_path: Path) -> None:
    from supervisor.process import SpawnError, spawn_plain

    reaper = Reaper()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        with pytest.raises(SpawnError, match=r"exec /nonexistent/x: No such file or directory"):
            spawn_plain(["/nonexistent/x"], {}, (devnull,) * 3, reaper)
        (tmp_path / "noexec").write_text("#!/bin/sh\n")
        with pytest.raises(SpawnError, match="Permission denied"):
            spawn_plain([str(tmp_path / "noexec")], {}, (devnull,) * 3, reaper)
    finally:
        os.close(devnull)
    assert reaper.owned == set()


FREEZER_V1 = Path("/sys/fs/cgroup/freezer")


@pytest.mark.skipif(not (FREEZER_V1 / "cgroup.procs").exists() or not HAS_CGROUP2,
                    reason="needs the v1 freezer (SIGKILL waits for a thaw there) and cgroup2")
async def test_an_unkillable_program_does_not_hang_the_shutdown(cfg: ConfigWriter, run_daemon,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path) -> None:
    r = await run_daemon(cfg.load("""
        [programs.frozen]
        command = ["sleep", "300"]
        startsecs = 0.1
        stopwaitsecs = 0.2
        [programs.fine]
        command = ["sleep", "300"]
        startsecs = 0.1
        stopwaitsecs = 0.2
    """))
    r.daemon.ctx.kill_wait = 0.5
    pid = r.daemon.status(["frozen"])[0].pid
    freezer = FREEZER_V1 / f"nsinitd-test-{os.getpid()}"
    freezer.mkdir()
    cg2 = r.daemon.ctx.cgroup_root / "frozen"
    try:
        (freezer / "cgroup.procs").write_text(str(pid))
        (freezer / "freezer.state").write_text("FROZEN")
        r.daemon.request_shutdown()
        with trio.fail_after(6):  # bounded, however stuck the program is
            await r.daemon.done.wait()
        stuck = r.watcher.find("program.stuck", "frozen")[0]
        assert stuck["pid"] == pid and stuck["state"].startswith("D")
        assert r.watcher.find("program.teardown_failed", "frozen")[0]["error"].startswith(f"rmdir({cg2})")
        assert len(r.watcher.find("program.killing", "frozen")) == 1
        assert r.watcher.find("program.stopped", "fine")
        assert r.watcher.events[-1]["event"] == "supervisor.stopped"
    finally:
        (freezer / "freezer.state").write_text("THAWED")  # the pending SIGKILL lands now
        with trio.fail_after(5):
            while True:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    break
                await trio.sleep(0.02)
        freezer.rmdir()
        for d in (cg2, cg2.parent):
            with trio.fail_after(5):
                while d.exists():
                    try:
                        d.rmdir()
                    except OSError:
                        await trio.sleep(0.02)


ORPHAN_BURST = r"""
import os, sys, time
n = int(sys.argv[1])
r, w = os.pipe()
if os.fork() == 0:  # the middle process: forks the orphans-to-be, then leaves them to nsinitd
    for _ in range(n):
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)  # until every write end is closed: then all exit at once
            os._exit(0)
    os._exit(0)
os.close(r)
time.sleep(1.0)
print("release", flush=True)
os.close(w)
time.sleep(60)
"""


# forks n children that exit at once and exits itself without waiting: n zombies in its cgroup,
# reaped while nsinitd tears the program down
ZOMBIES_LEFT_BEHIND = r"""
import os, sys
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        os._exit(0)
"""


@pytest.mark.parametrize("script_text", [ORPHAN_BURST, ZOMBIES_LEFT_BEHIND], ids=["orphans", "teardown"])
async def test_an_orphan_burst_does_not_drop_a_live_subscriber(cfg: ConfigWriter, run_daemon, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               script_text: str) -> None:
    n = 3000
    script = tmp_path / "burst.py"
    script.write_text(script_text)
    r = await run_daemon(cfg.load(f"""
        [programs.burst]
        command = ["{sys.executable}", "{script}", "{n}"]
        startsecs = 0
        autorestart = "never"
    """))
    sub = r.daemon.subscribe(1000)
    reaped = 0
    with trio.fail_after(30):
        async for ev in sub:
            assert ev["event"] != "subscriber.dropped", f"dropped after {reaped} of {n}"
            if ev["event"] == "stranger.reaped":
                reaped += 1
                await trio.sleep(0)  # a reader that takes a moment per event, like a socket send
                if reaped == n:
                    break
    assert reaped == n


class _Making:
    """A stand-in for nsruntime.Creating whose PID 1 never answers."""

    def __init__(self, deadline: float) -> None:
        import time

        self.r, self.w = os.pipe()
        self.deadline = time.monotonic() + deadline
        self.calls: list[str] = []

    @property
    def fd(self) -> int:
        return self.r

    def step(self) -> None:
        self.calls.append("step")
        os.read(self.r, 1)

    def time_out(self) -> None:
        self.calls.append("time_out")
        raise RuntimeError("did not answer")

    def abort(self) -> None:
        self.calls.append("abort")


async def test_a_create_in_progress_is_aborted_when_cancelled_or_late() -> None:
    from supervisor.program import _finish_create

    making = _Making(deadline=30)
    with trio.move_on_after(0.1):
        await _finish_create(making)
    assert making.calls == ["abort"]  # cancelled (e.g. shutdown): the half-made container is released

    late = _Making(deadline=0.1)
    with trio.fail_after(5), pytest.raises(RuntimeError, match="did not answer"):
        await _finish_create(late)
    assert late.calls[0] == "time_out" and "step" not in late.calls

    chatty = _Making(deadline=30)
    os.write(chatty.w, b"x")
    with trio.move_on_after(0.1):
        await _finish_create(chatty)
    assert chatty.calls == ["step", "abort"]
    for m in (making, late, chatty):
        os.close(m.r)
        os.close(m.w)
