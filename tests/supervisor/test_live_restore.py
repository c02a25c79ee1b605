"""Live restore (issue 17): programs outlive nsinitd, and the next nsinitd takes them back.

Every test runs the real ``nsinitd`` (a process of its own, as in production), kills or stops it,
and starts another on the same config. The keeper (supervisor/keeper.py) is what the programs
hang on meanwhile; each test ends with an ordered shutdown, after which nothing of it is left
(the suite's leak checks look for processes, keepers included, and cgroups).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor import keeper as keeper_proto
from supervisor.process import cgroup2_mount, own_cgroup2, proc_start_time
from tests.conftest import live_pid, make_busybox_rootfs, nsinit, records, wait_for
from tests.supervisor.test_daemon_process import Nsinitd, program_cgroup

pytestmark = [pytest.mark.slow, pytest.mark.privileged,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for containers and cgroups")]

ConfigWriter = Any
Start = Callable[..., Awaitable[Nsinitd]]


def _subreaper(value: int | None = None) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    old = ctypes.c_int(0)
    libc.prctl(37, ctypes.byref(old), 0, 0, 0)
    if value is not None:
        libc.prctl(36, ctypes.c_ulong(value), 0, 0, 0)
    return old.value


@pytest.fixture
def orphans_go_to_init() -> Iterator[None]:
    """What a killed nsinitd orphans (its keeper) must go to init, not become this test's zombies."""
    was = _subreaper(0)
    yield
    _subreaper(was)


@pytest.fixture
async def nsinitd(nursery: trio.Nursery, orphans_go_to_init: None,  # type: ignore[no-untyped-def]
                  cfg: ConfigWriter) -> AsyncIterator[Start]:
    """``await nsinitd(config)``: a real nsinitd with its control socket. At the end every one
    still running gets SIGTERM; and if a test failed after killing one, its keeper and programs
    are taken back and stopped by one more nsinitd, so nothing outlives the test."""
    procs: list[trio.Process] = []
    configs: list[Path] = []

    async def start(config: Path) -> Nsinitd:
        proc = await trio.lowlevel.open_process([sys.executable, "-m", "supervisor.nsinitd", "-c", str(config)],
                                                stdout=subprocess.PIPE)
        procs.append(proc)
        configs.append(config)
        return Nsinitd(proc)

    async def stop(p: trio.Process) -> None:
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await p.wait()
        if p.returncode is None:
            p.kill()
            with trio.move_on_after(5):
                await p.wait()

    yield start
    for p in procs:
        await stop(p)
    if (cfg.root / "state" / keeper_proto.SOCKET_NAME).exists() and configs:
        cfg.path.write_text(configs[-1].read_text().replace("on_exit", "# on_exit"))
        last = await start(cfg.path)
        with trio.move_on_after(20):
            await last.wait_for("supervisor.started")
        await stop(last.proc)


async def ctl(cfg: ConfigWriter, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        r = await trio.run_process([sys.executable, "-m", "supervisor.ctl", "-c", str(cfg.path), *argv],
                                   capture_stdout=True, capture_stderr=True, check=False)
    if check:
        assert r.returncode == 0, r.stderr.decode()
    return r


async def status(cfg: ConfigWriter) -> dict[str, dict[str, Any]]:
    out = json.loads((await ctl(cfg, "--json", "status")).stdout)
    return {s["name"]: s for s in out}


async def killed(d: Nsinitd) -> None:
    d.proc.kill()
    with trio.fail_after(5):
        await d.proc.wait()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def until(pred: Callable[[], bool], what: str, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)
    assert pred(), what


def cgroup_procs(path: Path) -> list[int]:
    return [int(p) for p in (path / "cgroup.procs").read_text().split()]


def _cgroup(pid: int) -> Path:
    """The cgroup2 directory of a plain program, under its keeper's."""
    path = program_cgroup(pid)
    assert path is not None and path.parent.name.startswith("nsinit-keeper-"), path
    return path


BOTH = """
    [programs.box]
    container = "{rootfs}"
    command = ["sh", "-c", "trap 'exit 7' USR1; while :; do sleep 0.1; done"]
    startsecs = 0.2
    [programs.plain]
    command = ["sh", "-c", "sleep 300 & exec sleep 301"]
    startsecs = 0.2
    autorestart = "always"
"""


async def test_sigkilled_nsinitd_leaves_its_programs_running_and_the_next_one_adopts_them(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    conf = cfg.write(BOTH.format(rootfs=host_rootfs))
    first = await nsinitd(conf)
    box = await first.wait_for("program.running", "box")
    plain = await first.wait_for("program.running", "plain")
    before = {name: (s["pid"], s["since"]) for name, s in (await status(cfg)).items()}
    plain_cgroup = _cgroup(plain["pid"])
    grandchild = next(p for p in cgroup_procs(plain_cgroup) if p != plain["pid"])
    starts = {pid: proc_start_time(pid) for pid in (box["pid"], plain["pid"], grandchild)}
    await killed(first)

    # the same processes run on, with no nsinitd at all
    assert all(alive(pid) for pid in starts)
    second = await nsinitd(conf)
    adopted = {e["program"]: e for e in [await second.wait_for("program.adopted", n) for n in ("box", "plain")]}
    assert {n: e["pid"] for n, e in adopted.items()} == {"box": box["pid"], "plain": plain["pid"]}
    now = await status(cfg)
    assert {n: (s["state"], s["pid"]) for n, s in now.items()} == \
        {"box": ("RUNNING", box["pid"]), "plain": ("RUNNING", plain["pid"])}
    for name in ("box", "plain"):  # uptime counts from the original start, not from the adoption
        assert abs(now[name]["since"] - before[name][1]) < 0.5
    assert {pid: proc_start_time(pid) for pid in starts} == starts
    # exactly one instance of each: nothing was started or reclaimed, the cgroup holds the same two
    assert [e for e in second.events if e["event"] in ("program.starting", "container.reclaimed",
                                                       "container.created")] == []
    assert sorted(cgroup_procs(plain_cgroup)) == sorted([plain["pid"], grandchild])

    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0
    assert not any(alive(pid) for pid in starts)
    assert not plain_cgroup.exists() and not plain_cgroup.parent.exists()  # the keeper's cgroup too
    assert not (cfg.root / "state" / keeper_proto.SOCKET_NAME).exists()


async def test_an_adopted_programs_exit_is_seen_with_its_real_status_and_restarted_per_policy(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    conf = cfg.write(BOTH.format(rootfs=host_rootfs))
    first = await nsinitd(conf)
    box = await first.wait_for("program.running", "box")
    plain = await first.wait_for("program.running", "plain")
    await killed(first)
    second = await nsinitd(conf)
    await second.wait_for("program.adopted", "plain")
    await second.wait_for("program.adopted", "box")

    os.kill(plain["pid"], signal.SIGKILL)
    exited = await second.wait_for("program.exited", "plain")
    assert (exited["pid"], exited["exit_code"], exited["signal"]) == (plain["pid"], 137, "SIGKILL")
    again = await second.wait_for("program.running", "plain")  # autorestart = "always"
    assert again["pid"] != plain["pid"]

    await ctl(cfg, "signal", "USR1", "box")  # the command's own status, told by the container's PID 1
    exited = await second.wait_for("program.exited", "box")
    assert (exited["pid"], exited["exit_code"], exited["signal"], exited["expected"]) == (box["pid"], 7, None, False)
    destroyed = await second.wait_for("container.destroyed", "box")
    assert "error" not in destroyed["released"] and destroyed["released"]["cgroups"]
    box2 = await second.wait_for("program.running", "box")  # on-failure: 7 is not an expected code
    assert box2["pid"] != box["pid"]

    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0


async def test_stop_start_signal_exec_and_logs_work_on_adopted_programs(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    conf = cfg.write(f"""
        [programs.box]
        container = "{host_rootfs}"
        command = ["sh", "-c", "echo box says hello; exec sleep 300"]
        startsecs = 0.2
        [programs.plain]
        command = ["sh", "-c", "trap 'echo got HUP' HUP; echo plain says hello; while :; do sleep 0.05; done"]
        startsecs = 0.2
    """)
    first = await nsinitd(conf)
    box = await first.wait_for("program.running", "box")
    plain = await first.wait_for("program.running", "plain")
    await killed(first)
    second = await nsinitd(conf)
    await second.wait_for("program.adopted", "box")
    await second.wait_for("program.adopted", "plain")

    joined = await ctl(cfg, "exec", "box", "--", "cat", "/proc/1/comm")
    assert joined.stdout == b"nsinit-init\n"
    await ctl(cfg, "signal", "HUP", "plain")
    await until(lambda: "got HUP" in (cfg.root / "logs" / "plain.out").read_text(), "the trap's line")
    logs = await ctl(cfg, "logs", "plain")
    assert logs.stdout.decode().splitlines() == ["plain says hello", "got HUP"]
    assert (await ctl(cfg, "logs", "box")).stdout == b"box says hello\n"

    await ctl(cfg, "stop", "box")
    stopped = await second.wait_for("program.exited", "box")
    assert (stopped["pid"], stopped["expected"]) == (box["pid"], True)
    assert not alive(box["pid"])
    await ctl(cfg, "restart", "plain")
    restarted = await second.wait_for("program.running", "plain")
    assert restarted["pid"] != plain["pid"] and not alive(plain["pid"])
    await ctl(cfg, "start", "box")
    assert (await status(cfg))["box"]["state"] == "RUNNING"

    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0


async def test_lines_written_while_nsinitd_is_down_are_in_the_log_none_lost(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    # a plain program and a container, each writing numbered lines quickly, to stdout and stderr
    writer = 'i=0; while :; do i=$((i+1)); echo "out $i"; echo "err $i" >&2; sleep 0.01; done'
    conf = cfg.write(f"""
        [programs.box]
        container = "{host_rootfs}"
        command = ["sh", "-c", '{writer}']
        startsecs = 0.2
        [programs.plain]
        command = ["sh", "-c", '{writer}']
        startsecs = 0.2
    """)
    logs = cfg.root / "logs"

    def count(path: Path) -> int:
        return len(path.read_text().splitlines()) if path.exists() else 0

    first = await nsinitd(conf)
    pids = {n: (await first.wait_for("program.running", n))["pid"] for n in ("box", "plain")}
    await killed(first)
    at_death = {n: count(logs / f"{n}.out") for n in pids}
    # nobody but the keeper reads the pipes now: the programs keep writing, and it is all kept
    await until(lambda: all(count(logs / f"{n}.out") > at_death[n] + 50 for n in pids), "lines while down")
    second = await nsinitd(conf)
    for n in pids:
        assert (await second.wait_for("program.adopted", n))["pid"] == pids[n]
    seen = {n: count(logs / f"{n}.out") for n in pids}
    await until(lambda: all(count(logs / f"{n}.out") > seen[n] + 50 for n in pids), "lines after adoption")
    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0
    for n in pids:
        for stream in ("out", "err"):
            lines = (logs / f"{n}.{stream}").read_text().splitlines()
            numbers = [int(line.split()[1]) for line in lines if line.startswith(stream)]
            # every line, in order, none lost or doubled, across both nsinitds and the gap between
            assert numbers == list(range(1, len(numbers) + 1)), f"{n}.{stream}"
            assert all(line == f"{stream} {k}" for k, line in zip(numbers, lines, strict=False))
    exits = {e["program"]: e for e in second.events if e["event"] == "program.exited"}
    assert {n: exits[n]["pid"] for n in pids} == pids  # the same processes to the end: no SIGPIPE
    assert {n: exits[n]["signal"] for n in pids} == {"box": "SIGTERM", "plain": "SIGTERM"}


async def test_removed_programs_are_stopped_and_changed_ones_restarted_on_adoption(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    programs = f"""
        [programs.same]
        command = ["sleep", "300"]
        startsecs = 0.2
        [programs.changed]
        command = ["sleep", "301"]
        startsecs = 0.2
        [programs.removed]
        command = ["sleep", "302"]
        startsecs = 0.2
        [programs.gone_box]
        container = "{host_rootfs}"
        command = ["sleep", "303"]
        startsecs = 0.2
    """
    first = await nsinitd(cfg.write(programs))
    old = {n: (await first.wait_for("program.running", n))["pid"] for n in ("same", "changed", "removed", "gone_box")}
    await killed(first)
    edited = programs.replace('"301"', '"304"')
    edited = edited[: edited.index("[programs.removed]")]
    second = await nsinitd(cfg.write(edited))
    assert (await second.wait_for("program.adopted", "same"))["pid"] == old["same"]
    for name in ("changed", "removed", "gone_box"):  # adopted only to be stopped, in order
        stopped = await second.wait_for("program.exited", name)
        assert (stopped["pid"], stopped["expected"]) == (old[name], True)
        await second.wait_for("program.stopped", name)
        assert not alive(old[name])
    destroyed = await second.wait_for("container.destroyed", "gone_box")
    assert "error" not in destroyed["released"]
    changed = await second.wait_for("program.running", "changed")
    assert changed["pid"] != old["changed"]
    assert Path(f"/proc/{changed['pid']}/cmdline").read_bytes() == b"sleep\x00304\x00"
    now = await status(cfg)
    assert sorted(now) == ["changed", "same"]
    assert now["same"]["pid"] == old["same"] and now["same"]["state"] == "RUNNING"
    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0


async def test_shutdown_keep_running_and_on_exit_keep_leave_programs_for_the_next_nsinitd(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    conf = cfg.write(BOTH.format(rootfs=host_rootfs))
    first = await nsinitd(conf)
    pids = {n: (await first.wait_for("program.running", n))["pid"] for n in ("box", "plain")}
    said = await ctl(cfg, "shutdown", "--keep-running", "--wait")
    assert said.stdout.decode() == f"nsinitd (pid {first.proc.pid}) shut down, programs left running\n"
    assert await first.finish() == 0
    assert [e["event"] for e in first.events[-2:]] == ["supervisor.stopping", "supervisor.stopped"]
    assert first.events[-2]["reason"] == "shutdown --keep-running"
    assert not [e for e in first.events if e["event"] in ("program.stopping", "program.exited")]
    assert all(alive(pid) for pid in pids.values())

    # the upgraded nsinitd: adopts them, and leaves them again on SIGTERM (on_exit = "keep")
    conf = cfg.write(BOTH.format(rootfs=host_rootfs), supervisor='on_exit = "keep"')
    second = await nsinitd(conf)
    for n, pid in pids.items():
        assert (await second.wait_for("program.adopted", n))["pid"] == pid
    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0
    assert second.events[-2]["reason"] == "SIGTERM (on_exit = keep)"
    assert all(alive(pid) for pid in pids.values())

    conf = cfg.write(BOTH.format(rootfs=host_rootfs))
    third = await nsinitd(conf)
    for n, pid in pids.items():
        assert (await third.wait_for("program.adopted", n))["pid"] == pid
    third.proc.send_signal(signal.SIGTERM)  # on_exit = "stop": the ordered shutdown, the keeper leaves
    assert await third.finish() == 0
    assert not any(alive(pid) for pid in pids.values())
    assert not (cfg.root / "state" / keeper_proto.SOCKET_NAME).exists()


def _forge_record(state_dir: Path, name: str, pid: int) -> None:
    """Tell the keeper (as an nsinitd would) that ``name``'s container PID 1 is pid: a record
    naming a process that is not the program's, as a reused pid would."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dfd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.settimeout(10)
        sock.connect(f"/proc/self/fd/{dfd}/{keeper_proto.SOCKET_NAME}")
        keeper_proto.send(sock, {"op": "hello"})
        while (msg := keeper_proto.receive(sock)[0]) is not None and "exited" in msg:
            pass
        spare_r, spare_w = os.pipe()
        keeper_proto.send(sock, {"op": "hold", "name": name, "pid": pid, "digest": "", "fds": ["ctl"]}, [spare_r])
        os.close(spare_r)
        os.close(spare_w)
        reply, _ = keeper_proto.receive(sock)
        assert reply is not None and reply["ok"], reply
    finally:
        os.close(dfd)
        sock.close()


async def test_a_stranger_named_by_a_record_is_neither_adopted_nor_signalled(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    conf = cfg.write(BOTH.format(rootfs=host_rootfs))
    first = await nsinitd(conf)
    await first.wait_for("program.running", "box")
    await first.wait_for("program.running", "plain")
    await killed(first)
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _forge_record(cfg.root / "state", "box", stranger.pid)
        second = await nsinitd(conf)
        refused = await second.wait_for("program.not_adopted", "box")
        assert refused["pid"] == stranger.pid
        await second.wait_for("program.adopted", "plain")
        box = await second.wait_for("program.running", "box")  # a box of its own, not the stranger
        assert box["pid"] != stranger.pid
        second.proc.send_signal(signal.SIGTERM)
        assert await second.finish() == 0
        assert stranger.poll() is None and alive(stranger.pid)  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


async def test_a_state_dir_of_another_nsinitd_version_is_refused_with_a_clear_message(
        cfg: ConfigWriter, nsinitd: Start) -> None:
    conf = cfg.write('[programs.a]\ncommand = ["sleep", "300"]\n')
    state = cfg.root / "state"
    state.mkdir()
    (state / "layout").write_text("nsinitd-state 0\n")
    d = await nsinitd(conf)
    with trio.fail_after(20):
        assert await d.proc.wait() == 1
    assert d.proc.stdout is not None
    assert await d.proc.stdout.receive_some(1000) == b""  # refused before anything started
    result = subprocess.run([sys.executable, "-m", "supervisor.nsinitd", "-c", str(conf)], capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"nsinitd: state_dir {state} was written by another nsinitd version (layout "
                             f"'nsinitd-state 0', this one reads 'nsinitd-state {keeper_proto.PROTOCOL}'): stop "
                             f"its programs with that version, or use another state_dir\n")


async def test_after_the_keeper_dies_too_the_next_nsinitd_reclaims_and_runs_one_of_each(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    conf = cfg.write(BOTH.format(rootfs=host_rootfs))
    first = await nsinitd(conf)
    box = await first.wait_for("program.running", "box")
    plain = await first.wait_for("program.running", "plain")
    plain_cgroup = _cgroup(plain["pid"])
    old_plain = cgroup_procs(plain_cgroup)
    keeper_pid = int(Path(f"/proc/{box['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    await killed(first)
    os.kill(keeper_pid, signal.SIGKILL)  # the whole supervision gone: only the programs are left
    await until(lambda: not alive(keeper_pid), "the keeper to die")
    second = await nsinitd(conf)
    reclaimed = await second.wait_for("container.reclaimed", "box")
    assert reclaimed["host_pid"] == box["pid"]
    await second.wait_for("program.running", "box")
    await second.wait_for("program.running", "plain")
    await until(lambda: not any(alive(p) for p in [box["pid"], *old_plain]), "the old instances to go")
    assert not plain_cgroup.parent.exists()  # the dead keeper's cgroup, removed with what it held
    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0


def test_a_killed_nsinit_execs_cgroups_are_released_by_the_next_exec(tmp_path: Path) -> None:
    rootfs = make_busybox_rootfs(tmp_path / "bb")
    proc = subprocess.Popen([sys.executable, "-m", "nsruntime.cli", "exec", "sleep", "300"], cwd=rootfs,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid = wait_for(lambda: live_pid(rootfs), what="the container to be up")
        state = json.loads((records(rootfs) / "state.json").read_text())
        cgroups = [d for d in state["cgroups"] if Path(d).name == state["id"]]  # the leaves
        assert cgroups and all(Path(d).is_dir() for d in cgroups)
    finally:
        proc.kill()  # nsinit itself: its container dies with it, its cgroups and records stay
        proc.wait(timeout=10)
    wait_for(lambda: not alive(pid), what="PID 1 to die with nsinit")
    assert all(Path(d).is_dir() for d in cgroups)
    r = nsinit(rootfs, "exec", "true")
    assert r.returncode == 0, r.stderr
    assert not any(Path(d).exists() for d in cgroups)
    assert not records(rootfs).exists()


def test_the_keepers_cgroup_names_its_owner_so_only_a_dead_ones_is_cleaned() -> None:
    from supervisor.daemon import _owner_alive

    me = os.getpid()
    ticks = proc_start_time(me)
    assert _owner_alive(f"nsinit-keeper-{me}-{ticks}")
    assert not _owner_alive(f"nsinit-keeper-{me}-{(ticks or 0) + 1}")
    mount = cgroup2_mount()
    assert mount is None or own_cgroup2(mount).exists()


async def test_a_held_process_outside_the_programs_cgroup_is_neither_adopted_nor_signalled(
        cfg: ConfigWriter, nsinitd: Start) -> None:
    conf = cfg.write('[programs.plain]\ncommand = ["sleep", "300"]\nstartsecs = 0.2\n')
    first = await nsinitd(conf)
    old = await first.wait_for("program.running", "plain")
    await killed(first)
    # the keeper is told (as by an nsinitd) to run a stranger under the program's name, outside
    # the program's cgroup: the record looks like the program's, the process is not it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dfd = os.open(cfg.root / "state", os.O_PATH | os.O_DIRECTORY)
    try:
        sock.settimeout(10)
        sock.connect(f"/proc/self/fd/{dfd}/{keeper_proto.SOCKET_NAME}")
        keeper_proto.send(sock, {"op": "hello"})
        while (msg := keeper_proto.receive(sock)[0]) is not None and "exited" in msg:
            pass
        devnull = os.open(os.devnull, os.O_RDWR)
        keeper_proto.send(sock, {"op": "spawn", "name": "plain", "argv": ["sleep", "299"], "env": {},
                                 "cgroup": None, "digest": ""}, [devnull] * 3)
        os.close(devnull)
        reply, fds = keeper_proto.receive(sock)
        for fd in fds:
            os.close(fd)
    finally:
        os.close(dfd)
        sock.close()
    assert reply is not None and reply["ok"], reply
    stranger = int(reply["pid"])
    try:
        second = await nsinitd(conf)
        refused = await second.wait_for("program.not_adopted", "plain")
        assert refused["pid"] == stranger
        new = await second.wait_for("program.running", "plain")
        assert new["pid"] not in (stranger, old["pid"]) and alive(stranger)
    finally:
        os.kill(stranger, signal.SIGKILL)  # (the test's own: it must not outlive it)
    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0
    assert not any(e["event"] == "program.exited" and e["pid"] == stranger for e in second.events)
    assert not alive(old["pid"])  # the one replaced in the keeper's records went with the keeper


async def test_if_the_keeper_is_killed_nsinitd_still_sees_its_programs_go_and_shuts_down(
        cfg: ConfigWriter, nsinitd: Start) -> None:
    conf = cfg.write('[programs.plain]\ncommand = ["sleep", "300"]\nstartsecs = 0.2\nstopwaitsecs = 5\n')
    d = await nsinitd(conf)
    plain = await d.wait_for("program.running", "plain")
    keeper = int(Path(f"/proc/{plain['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert Path(f"/proc/{keeper}/comm").read_text() == "nsinit-keeper\n"
    cgroup = _cgroup(plain["pid"])
    os.kill(keeper, signal.SIGKILL)
    await ctl(cfg, "stop", "plain")  # through the pidfd the keeper gave: still that process
    exited = await d.wait_for("program.exited", "plain")
    # the status died with the keeper: reported as SIGKILL, as for a PID 1 that left no word
    assert (exited["pid"], exited["exit_code"], exited["signal"]) == (plain["pid"], 137, "SIGKILL")
    await d.wait_for("program.stopped", "plain")
    d.proc.send_signal(signal.SIGTERM)
    assert await d.finish() == 0
    assert not cgroup.exists() and not cgroup.parent.exists()


async def test_exits_while_nsinitd_is_down_are_seen_with_their_real_status_by_the_next_one(
        cfg: ConfigWriter, nsinitd: Start, host_rootfs: Path) -> None:
    conf = cfg.write(BOTH.format(rootfs=host_rootfs).replace('autorestart = "always"', 'autorestart = "never"'))
    first = await nsinitd(conf)
    box = await first.wait_for("program.running", "box")
    plain = await first.wait_for("program.running", "plain")
    command = int(Path(f"/proc/{box['pid']}/task/{box['pid']}/children").read_text().split()[0])
    await killed(first)
    os.kill(plain["pid"], signal.SIGKILL)
    os.kill(command, signal.SIGTERM)  # the box's command: PID 1 reports "killed by SIGTERM", then leaves
    await until(lambda: not alive(plain["pid"]) and not alive(box["pid"]), "both to end while nsinitd is down")
    second = await nsinitd(conf)
    exits = {n: await second.wait_for("program.exited", n) for n in ("box", "plain")}
    assert {n: (e["pid"], e["exit_code"], e["signal"], e["expected"]) for n, e in exits.items()} == {
        "box": (box["pid"], 143, "SIGTERM", False), "plain": (plain["pid"], 137, "SIGKILL", False)}
    destroyed = await second.wait_for("container.destroyed", "box")  # what the box held, released
    assert "error" not in destroyed["released"] and destroyed["released"]["cgroups"]
    restarted = await second.wait_for("program.running", "box")  # on-failure
    assert restarted["pid"] != box["pid"]
    assert (await status(cfg))["plain"]["state"] == "EXITED"  # autorestart = never
    second.proc.send_signal(signal.SIGTERM)
    assert await second.finish() == 0


async def test_a_program_the_keeper_cannot_exec_fails_with_one_line(cfg: ConfigWriter, nsinitd: Start) -> None:
    conf = cfg.write('[programs.nope]\ncommand = ["/nonexistent/prog"]\nstartretries = 0\n')
    d = await nsinitd(conf)
    fatal = await d.wait_for("program.fatal", "nope")
    assert fatal["reason"] == "exec /nonexistent/prog: No such file or directory (1 times, startretries=0)"
    d.proc.send_signal(signal.SIGTERM)
    assert await d.finish() == 0
