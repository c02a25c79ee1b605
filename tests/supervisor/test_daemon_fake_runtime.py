"""Container programs against a fake nsruntime: timing on trio's autojump clock, where the
timing is the point (backoff delays, startsecs, stopwaitsecs) and no real clock may flake."""

from __future__ import annotations

import itertools
import json
import signal
from typing import Any

import trio

from supervisor.states import ProcessState

ConfigWriter = Any


async def test_backoff_timing_on_a_fake_clock(cfg: ConfigWriter, run_daemon, fake_runtime,  # type: ignore[no-untyped-def]
                                              autojump_clock: trio.testing.MockClock) -> None:
    r = await run_daemon(cfg.load("""
        [programs.crashy]
        container = "box"
        command = ["crash", "2"]
        startsecs = 5
        startretries = 5
        backoff = { initial = 1.0, factor = 2.0, max = 5.0 }
    """), spawner=fake_runtime)
    await r.watcher.wait("program.fatal", "crashy", timeout=1000)
    starts = r.watcher.find("program.starting", "crashy")
    backoffs = r.watcher.find("program.backoff", "crashy")
    assert [b["delay"] for b in backoffs] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert [b["attempt"] for b in backoffs] == [1, 2, 3, 4, 5]
    assert [s["attempt"] for s in starts] == [1, 2, 3, 4, 5, 6]
    assert len(fake_runtime.created) == 6
    assert all(c.destroyed for c in fake_runtime.created)
    names = r.watcher.names("crashy")
    # every exit tears the container down before anything else happens
    for i, n in enumerate(names):
        if n == "program.exited":
            assert names[i + 1] == "container.destroyed"


async def test_backoff_delays_measured_on_the_clock(cfg: ConfigWriter, run_daemon, fake_runtime,  # type: ignore[no-untyped-def]
                                                    autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []
    r = await run_daemon(cfg.load("""
        [programs.crashy]
        container = "box"
        command = ["crash", "1"]
        startretries = 3
        backoff = { initial = 0.5, factor = 3.0, max = 60.0 }
    """), spawner=fake_runtime, wait_ready=False)
    r.daemon.bus.taps.append(lambda e: times.append(trio.current_time()) if e["event"] == "program.starting"
                             else None)
    await r.watcher.wait("program.fatal", "crashy", timeout=1000)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert gaps[-3:] == [0.5, 1.5, 4.5]


async def test_running_after_startsecs_resets_the_backoff(cfg: ConfigWriter, run_daemon, fake_runtime,  # type: ignore[no-untyped-def]
                                                          autojump_clock: trio.testing.MockClock) -> None:
    r = await run_daemon(cfg.load("""
        [programs.c]
        container = "box"
        command = ["run"]
        startsecs = 3
        autorestart = "always"
    """), spawner=fake_runtime, wait_ready=False)
    t0 = trio.current_time()
    running = await r.watcher.wait("program.running", "c", timeout=1000)
    assert trio.current_time() - t0 >= 3
    created = await r.watcher.wait("container.created", "c")
    assert created["host_pid"] == running["pid"] and created["container"].endswith("box")
    # killed from outside while RUNNING: reported with its signal, torn down, restarted at once
    fake_runtime.created[0].kill()
    exited = await r.watcher.wait("program.exited", "c")
    assert exited["signal"] == "SIGKILL" and exited["exit_code"] == 137 and exited["expected"] is False
    destroyed = await r.watcher.wait("container.destroyed", "c")
    assert destroyed["released"]["cgroups"] == [f"/fake/{running['pid']}"]
    await r.watcher.wait("program.running", "c", count=2, timeout=1000)
    assert r.watcher.find("program.backoff", "c") == []
    assert r.daemon.status(["c"])[0].restarts == 1
    assert r.daemon.exec_target("c") == cfg.root / "state" / "c"


async def test_stubborn_container_is_killed_after_stopwaitsecs(cfg: ConfigWriter, run_daemon, fake_runtime,  # type: ignore[no-untyped-def]
                                                               autojump_clock: trio.testing.MockClock) -> None:
    r = await run_daemon(cfg.load("""
        [programs.s]
        container = "box"
        command = ["stubborn"]
        startsecs = 1
        stopsignal = "INT"
        stopwaitsecs = 7
    """), spawner=fake_runtime)
    t0 = trio.current_time()
    await r.daemon.stop("s")
    assert trio.current_time() - t0 == 7
    c = fake_runtime.created[0]
    assert c.signals == [signal.SIGINT] and c.destroyed
    assert r.watcher.find("program.stopping", "s")[0]["signal"] == "SIGINT"
    assert r.watcher.find("program.exited", "s")[0]["signal"] == "SIGKILL"


async def test_oom_and_create_failure(cfg: ConfigWriter, run_daemon, fake_runtime,  # type: ignore[no-untyped-def]
                                      autojump_clock: trio.testing.MockClock) -> None:
    r = await run_daemon(cfg.load("""
        [programs.oom]
        container = "box"
        command = ["oom"]
        startretries = 0
        [programs.broken]
        container = "box"
        command = ["fail-create"]
        startretries = 1
    """), spawner=fake_runtime)
    exited = await r.watcher.wait("program.exited", "oom")
    assert exited["oom_killed"] is True
    fatal = await r.watcher.wait("program.fatal", "broken", timeout=1000)
    assert "clone(CLONE_NEWPID): EPERM" in fatal["reason"]
    assert r.watcher.find("program.backoff", "broken")[0]["reason"].startswith("FakeRuntimeError")
    assert r.daemon.status(["broken"])[0].state == ProcessState.FATAL.value


async def test_container_output_and_environment(cfg: ConfigWriter, run_daemon, fake_runtime) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.e]
        container = "box"
        command = ["run", "x"]
        startsecs = 0
        environment = { GREETING = "hi" }
    """), spawner=fake_runtime)
    await r.watcher.wait("program.running", "e")
    assert fake_runtime.created[0].env == {"GREETING": "hi"}
    with trio.fail_after(5):
        while (cfg.root / "logs" / "e.out").read_text() != "started run x\n":
            await trio.sleep(0.01)
    # shutdown with a live container: it is stopped and destroyed (checked by the fixture)
    r.daemon.request_shutdown()
    with trio.fail_after(5):
        await r.daemon.done.wait()
    last = json.loads(r.stream.getvalue().splitlines()[-1])
    assert last["event"] == "supervisor.stopped" and last["exit_code"] == 0


async def test_shutdown_during_startup(cfg: ConfigWriter, run_daemon, fake_runtime,  # type: ignore[no-untyped-def]
                                       autojump_clock: trio.testing.MockClock) -> None:
    r = await run_daemon(cfg.load("""
        [programs.slow]
        container = "box"
        command = ["run"]
        startsecs = 30
        priority = 1
        [programs.later]
        container = "box"
        command = ["run"]
        priority = 2
    """), spawner=fake_runtime, wait_ready=False)
    await r.watcher.wait("container.created", "slow")
    r.daemon.request_shutdown("SIGTERM")
    with trio.fail_after(60):
        await r.daemon.done.wait()
    assert not r.daemon.ready.is_set()
    assert r.watcher.find("program.starting", "later") == []  # the next priority level never started
    assert r.watcher.names("slow")[-3:] == ["program.exited", "container.destroyed", "program.stopped"]
    assert r.watcher.events[-2]["event"] == "program.stopped"
    assert r.watcher.find("supervisor.stopping")[0]["reason"] == "SIGTERM"


async def test_usr2_reopens_capture_files(cfg: ConfigWriter, run_daemon, fake_runtime) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("""
        [programs.a]
        container = "box"
        command = ["run", "one"]
        startsecs = 0
        autorestart = "always"
    """), spawner=fake_runtime)
    logs = cfg.root / "logs"
    with trio.fail_after(5):
        while (logs / "a.out").read_text() != "started run one\n":
            await trio.sleep(0.01)
    (logs / "a.out").rename(logs / "a.out.rotated")
    (cfg.root / "events.jsonl").rename(cfg.root / "events.jsonl.rotated")
    r.daemon.reopen_logs()
    fake_runtime.created[0].kill()  # restart: the new incarnation writes to the reopened file
    await r.watcher.wait("program.running", "a", count=2)
    with trio.fail_after(5):
        while not (logs / "a.out").exists() or (logs / "a.out").read_text() != "started run one\n":
            await trio.sleep(0.01)
    assert (logs / "a.out.rotated").read_text() == "started run one\n"
    assert "program.running" in (cfg.root / "events.jsonl").read_text()


async def test_a_container_json_broken_after_the_check_is_fatal_at_once(cfg: ConfigWriter, run_daemon,  # type: ignore[no-untyped-def]
                                                                       fake_runtime) -> None:
    config = cfg.load('[programs.b]\ncontainer = "box"\ncommand = ["run"]\nstartretries = 5\n')
    (cfg.root / "box" / "container.json").write_text("{not json")  # edited after nsinitd read its config
    r = await run_daemon(config, spawner=fake_runtime)
    fatal = await r.watcher.wait("program.fatal", "b")
    assert fatal["reason"] == (f"ConfigError: {cfg.root / 'box' / 'container.json'}: malformed JSON: "
                               "Expecting property name enclosed in double quotes at line 1 column 2")
    assert r.watcher.names("b") == ["program.starting", "program.fatal"]  # no backoff: no retry mends it
    assert fake_runtime.created == []
    assert r.daemon.status(["b"])[0].state == ProcessState.FATAL.value
