"""Container programs through the real nsruntime, on the real kernel."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.spawner import NsRuntime

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

ConfigWriter = Any


async def wait_for_output(path: Path, text: str, timeout: float = 10) -> None:
    """Until a program's captured output holds text (e.g. its TERM trap is in place)."""
    with trio.fail_after(timeout):
        while not path.exists() or text not in path.read_text():
            await trio.sleep(0.01)


def _unified_cgroup(state_dir: Path) -> Path:
    state = json.loads((state_dir / "state.json").read_text())
    return max((Path(p) for p in state["cgroups"] if "/unified/" in p), key=lambda p: len(p.parts))


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


async def test_container_lifecycle_and_sigkilled_pid1(cfg: ConfigWriter, run_daemon, host_rootfs: Path) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load(f"""
        [programs.web]
        container = "{host_rootfs}"
        command = ["sh", "-c", "echo hello from $(hostname) $GREETING; exec sleep 300"]
        environment = {{ GREETING = "hi" }}
        startsecs = 0.3
    """))
    created = await r.watcher.wait("container.created", "web")
    running = await r.watcher.wait("program.running", "web")
    assert created["host_pid"] == running["pid"] and "NEWPID" in created["namespaces"]
    state_dir = cfg.root / "state" / "web"
    assert r.daemon.exec_target("web") == state_dir
    assert (state_dir / "pid").read_text().split()[0] == str(running["pid"])
    cgroup = _unified_cgroup(state_dir)
    assert cgroup.exists()
    with trio.fail_after(5):
        while b"hello" not in (cfg.root / "logs" / "web.out").read_bytes():
            await trio.sleep(0.02)
    assert (cfg.root / "logs" / "web.out").read_text() == "hello from nsinit-host hi\n"

    os.kill(running["pid"], signal.SIGKILL)  # the container's PID 1, from outside
    exited = await r.watcher.wait("program.exited", "web")
    assert (exited["signal"], exited["exit_code"], exited["expected"]) == ("SIGKILL", 137, False)
    destroyed = await r.watcher.wait("container.destroyed", "web")
    assert str(cgroup) in destroyed["released"]["cgroups"]
    assert _proc_state(running["pid"]) is None  # reaped, not a zombie
    again = await r.watcher.wait("program.running", "web", count=2)
    assert again["pid"] != running["pid"]
    names = r.watcher.names("web")
    i = names.index("program.exited")
    assert names[i:i + 3] == ["program.exited", "container.destroyed", "program.starting"]

    stats = r.daemon.stats("web")  # what `nsinitctl top` shows, from the container's cgroups
    assert stats["pids"] == 2 and stats["memory_bytes"] > 0 and stats["cpu_usage_ns"] > 0, stats

    st = await r.daemon.stop("web")
    assert st.state == "STOPPED" and st.signal == "SIGTERM"
    assert not (state_dir / "pid").exists()


async def test_orphans_inside_a_container_are_reaped(cfg: ConfigWriter, run_daemon, host_rootfs: Path) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load(f"""
        [programs.orphans]
        container = "{host_rootfs}"
        command = ["sh", "-c", "for i in 1 2 3 4 5; do (sleep 0.05 &); done; exec sleep 300"]
        startsecs = 0.5
    """))
    await r.watcher.wait("program.running", "orphans")
    cgroup = _unified_cgroup(cfg.root / "state" / "orphans")
    with trio.fail_after(5):
        while True:
            procs = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
            if len(procs) == 2:  # our init and the sleep: the five orphans are gone, not zombies
                break
            await trio.sleep(0.05)
    assert all(_proc_state(p) != "Z" for p in procs)
    assert r.watcher.find("program.exited", "orphans") == []


async def test_stop_and_shutdown_tear_containers_down(cfg: ConfigWriter, run_daemon, host_rootfs: Path) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load(f"""
        [programs.stubborn]
        container = "{host_rootfs}"
        command = ["sh", "-c", "trap '' TERM; echo ready; sleep 300 & while :; do sleep 0.05; done"]
        startsecs = 0.2
        stopwaitsecs = 0.5
        [programs.crash]
        container = "{host_rootfs}"
        command = ["sh", "-c", "exit 4"]
        startsecs = 1
        startretries = 1
        backoff = {{ initial = 0.05 }}
    """))
    fatal = await r.watcher.wait("program.fatal", "crash")
    assert "2 times" in fatal["reason"]
    assert [e["exit_code"] for e in r.watcher.find("program.exited", "crash")] == [4, 4]
    assert len(r.watcher.find("container.destroyed", "crash")) == 2
    await r.watcher.wait("program.running", "stubborn")
    await wait_for_output(cfg.root / "logs" / "stubborn.out", "ready")
    cgroup = _unified_cgroup(cfg.root / "state" / "stubborn")
    r.daemon.request_shutdown()
    with trio.fail_after(15):
        await r.daemon.done.wait()
    assert r.watcher.find("program.killing", "stubborn")
    assert r.watcher.find("program.exited", "stubborn")[0]["signal"] == "SIGKILL"
    assert not cgroup.exists()
    assert r.watcher.events[-1]["event"] == "supervisor.stopped"


async def test_shutdown_while_containers_come_up_leaves_nothing(cfg: ConfigWriter, run_daemon,  # type: ignore[no-untyped-def]
                                                                 host_rootfs: Path) -> None:
    names = [f"c{i}" for i in range(8)]
    r = await run_daemon(cfg.load("".join(f"""
        [programs.{n}]
        container = "{host_rootfs}"
        command = ["sleep", "300"]
        startsecs = 0
    """ for n in names)), wait_ready=False)
    await r.watcher.wait("program.starting", "c0")
    r.daemon.request_shutdown()  # most are still on their way up: created, half-created or queued
    assert len(r.watcher.find("program.running")) < len(names)
    with trio.fail_after(20):
        await r.daemon.done.wait()
    assert r.watcher.events[-1]["event"] == "supervisor.stopped"
    for n in names:
        state = cfg.root / "state" / n
        assert not (state / "pid").exists(), n
        if (state / "state.json").exists():
            planned = json.loads((state / "state.json").read_text())["cgroups"]
            leaves = [p for p in planned if not any(q.startswith(p + "/") for q in planned)]
            assert not any(Path(p).exists() for p in leaves), (n, leaves)
        # every container made was destroyed, once
        assert len(r.watcher.find("container.created", n)) == len(r.watcher.find("container.destroyed", n)), n


async def test_a_containers_pid1_is_named_nsinit_init_not_the_hosts_python(cfg: ConfigWriter, run_daemon,  # type: ignore[no-untyped-def]
                                                                          host_rootfs: Path) -> None:
    r = await run_daemon(cfg.load(f"""
        [programs.web]
        container = "{host_rootfs}"
        command = ["sleep", "300"]
        startsecs = 0.2
    """))
    running = await r.watcher.wait("program.running", "web")
    spawner = r.daemon.ctx.spawner  # forked from the zygote, the path that showed the venv:
    assert isinstance(spawner, NsRuntime) and spawner.zygote is not None
    pid1 = running["pid"]
    assert Path(f"/proc/{pid1}/cmdline").read_bytes() == b"nsinit-init\0"
    assert Path(f"/proc/{pid1}/comm").read_text() == "nsinit-init\n"
