"""A real ``nsinitd`` process: signals, exit status, systemd notification, the event log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor.daemon import cgroup_root_name
from supervisor.events import validate
from supervisor.process import cgroup2_mount, proc_start_time

ConfigWriter = Any


def program_cgroup(pid: int) -> Path | None:
    """The cgroup2 directory of a live program (under its keeper's: nsinit-keeper-<pid>-<ticks>/NAME)."""
    mount = cgroup2_mount()
    if mount is None:
        return None
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::"))
    return mount / line[3:].lstrip("/")


async def wait_for_output(path: Path, text: str, timeout: float = 10) -> None:
    """Until a program's captured output holds text (e.g. its TERM trap is in place)."""
    with trio.fail_after(timeout):
        while not path.exists() or text not in path.read_text():
            await trio.sleep(0.01)


class Nsinitd:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._buf = b""

    async def _next(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                raise EOFError("nsinitd closed its stdout")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj: dict[str, Any] = json.loads(line)
        validate(obj)
        self.events.append(obj)
        return obj

    async def wait_for(self, event: str, program: str | None = None, timeout: float = 10,
                       count: int = 1) -> dict[str, Any]:
        def matches() -> list[dict[str, Any]]:
            return [e for e in self.events if e["event"] == event and (program is None or e.get("program") == program)]

        with trio.fail_after(timeout):
            while len(matches()) < count:
                await self._next()
        return matches()[count - 1]

    async def finish(self, timeout: float = 15) -> int:
        try:
            await self.wait_for("supervisor.stopped", timeout=timeout)
        except EOFError:
            pass
        with trio.fail_after(timeout):
            return await self.proc.wait()


@pytest.fixture
async def nsinitd(nursery: trio.Nursery):  # type: ignore[no-untyped-def]
    procs: list[trio.Process] = []

    async def start(config: Path, env: dict[str, str] | None = None, socket: bool = False) -> Nsinitd:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "supervisor.nsinitd", "-c", str(config), *([] if socket else ["--no-socket"])],
            stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
        procs.append(proc)
        return Nsinitd(proc)

    yield start
    for p in procs:  # a failed test still stops its nsinitd in order (containers outlive SIGKILL)
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await p.wait()
        if p.returncode is None:
            p.kill()
            with trio.move_on_after(5):
                await p.wait()


PROGRAMS = """
    [programs.web]
    command = ["sh", "-c", "sleep 300 & exec sleep 300"]
    startsecs = 0.2
    priority = 10
    [programs.stubborn]
    command = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]
    startsecs = 0.2
    stopwaitsecs = 0.5
    priority = 5
    [programs.crash]
    command = ["false"]
    startsecs = 1
    startretries = 100
    backoff = { initial = 0.1, factor = 1.5, max = 0.5 }
"""


@pytest.mark.slow
async def test_sigterm_stops_everything_and_exits_0(cfg: ConfigWriter, nsinitd) -> None:  # type: ignore[no-untyped-def]
    d = await nsinitd(cfg.write(PROGRAMS))
    web = await d.wait_for("program.running", "web")
    await d.wait_for("program.running", "stubborn")
    await d.wait_for("program.backoff", "crash")
    await wait_for_output(cfg.root / "logs" / "stubborn.out", "ready")
    web_cgroup = program_cgroup(web["pid"])
    grandchildren = [int(p) for p in (web_cgroup / "cgroup.procs").read_text().split()] if web_cgroup else []
    d.proc.send_signal(signal.SIGTERM)
    assert await d.finish() == 0
    names = [e["event"] for e in d.events]
    assert names[-1] == "supervisor.stopped" and d.events[-1]["exit_code"] == 0
    assert "supervisor.stopping" in names
    stopped = [e["program"] for e in d.events if e["event"] == "program.stopped"]
    assert stopped == ["crash", "web", "stubborn"]  # descending priority (999, 10, 5)
    assert any(e["event"] == "program.killing" and e["program"] == "stubborn" for e in d.events)
    for pid in [web["pid"], *grandchildren]:
        assert not Path(f"/proc/{pid}").exists()
    if web_cgroup is not None:  # the program's cgroup, and its keeper's (the keeper is gone too)
        assert not web_cgroup.exists() and not web_cgroup.parent.exists()
    assert not (cfg.root / "state" / "keeper.sock").exists()
    log = [json.loads(x) for x in (cfg.root / "events.jsonl").read_text().splitlines()]
    for obj in log:
        validate(obj)
    assert log == d.events


@pytest.mark.slow
async def test_sighup_reloads_and_sigint_stops(cfg: ConfigWriter, nsinitd) -> None:  # type: ignore[no-untyped-def]
    d = await nsinitd(cfg.write('[programs.a]\ncommand = ["sleep", "300"]\nstartsecs = 0.1\n'))
    await d.wait_for("program.running", "a")
    cfg.write('[programs.a]\ncommand = ["sleep", "300"]\nstartsecs = 0.1\n'
              '[programs.b]\ncommand = ["sleep", "300"]\nstartsecs = 0.1\n')
    d.proc.send_signal(signal.SIGHUP)
    reloaded = await d.wait_for("config.reloaded")
    assert reloaded["added"] == ["b"] and reloaded["changed"] == [] and reloaded["removed"] == []
    await d.wait_for("program.running", "b")
    cfg.write("[programs.a]\ncommand = 3\n")
    d.proc.send_signal(signal.SIGHUP)
    err = await d.wait_for("config.error")
    assert err["error"].startswith("programs.a.command")
    d.proc.send_signal(signal.SIGUSR2)
    d.proc.send_signal(signal.SIGINT)
    assert await d.finish() == 0
    assert d.events[-1]["event"] == "supervisor.stopped"


@pytest.mark.slow
async def test_sd_notify_ready_and_stopping(cfg: ConfigWriter, nsinitd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    addr = tmp_path / "notify.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(addr))
    with sock:
        d = await nsinitd(cfg.write('[programs.a]\ncommand = ["sh", "-c", "echo ${NOTIFY_SOCKET:-unset}; '
                                    'exec sleep 300"]\nstartsecs = 0.3\n'),
                          env={"NOTIFY_SOCKET": str(addr)})
        with trio.fail_after(10):
            msg = await sock.recv(1024)
        assert msg == b"READY=1"
        assert any(e["event"] == "program.running" for e in d.events) or await d.wait_for("program.running")
        assert (cfg.root / "logs" / "a.out").read_text() == "unset\n"  # only nsinitd may notify
        d.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await sock.recv(1024) == b"STOPPING=1"
        assert await d.finish() == 0


@pytest.mark.slow
@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a pid namespace")
async def test_as_pid1_it_reaps_every_orphan_and_keeps_going(cfg: ConfigWriter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = cfg.write("""
        [programs.orphaner]
        command = ["sh", "-c", "for i in 1 2 3; do (sleep 0.1 &); done; exec sleep 300"]
        startsecs = 0.3
    """)
    proc = await trio.lowlevel.open_process(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "supervisor.daemon",
         "-c", str(conf), "--no-socket"], stdout=subprocess.PIPE, cwd=str(Path(__file__).parents[2]))
    d = Nsinitd(proc)
    try:
        started = await d.wait_for("supervisor.started")
        assert started["pid"] == 1
        orphaner = await d.wait_for("program.running", "orphaner")
        nsinitd_host_pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        # the orphaner's three orphaned sleeps go to its keeper (the nearest child subreaper), which
        # reaps them: at last the keeper's only child is the orphaner itself, with no zombie beside it
        keeper = int(Path(f"/proc/{nsinitd_host_pid}/task/{nsinitd_host_pid}/children").read_text().split()[0])
        assert Path(f"/proc/{keeper}/comm").read_text() == "nsinit-keeper\n"

        def keepers_children() -> list[str]:
            pids = Path(f"/proc/{keeper}/task/{keeper}/children").read_text().split()
            return [Path(f"/proc/{p}/comm").read_text().strip() for p in pids]

        with trio.fail_after(10):
            while keepers_children() != ["sleep"]:  # (the in-namespace pid of the orphaner differs)
                await trio.sleep(0.05)
        assert orphaner["pid"] > 1
        os.kill(nsinitd_host_pid, signal.SIGTERM)
        assert await d.finish() == 0
        assert d.events[-1]["event"] == "supervisor.stopped"
        assert [e for e in d.events if e["event"] == "program.stopped"]
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(5):
                await proc.wait()


@pytest.mark.slow
async def test_a_second_nsinitd_on_a_live_socket_exits_1(cfg: ConfigWriter, nsinitd) -> None:  # type: ignore[no-untyped-def]
    conf = cfg.write('[programs.a]\ncommand = ["sleep", "300"]\nstartsecs = 0.1\n')
    first = await nsinitd(conf, socket=True)
    await first.wait_for("program.running", "a")
    with trio.fail_after(20):
        second = await trio.run_process([sys.executable, "-m", "supervisor.daemon", "-c", str(conf)],
                                        capture_stdout=True, capture_stderr=True, check=False)
    assert second.returncode == 1
    assert b"in use" in second.stderr
    assert b"program.starting" not in second.stdout  # nothing was started
    first.proc.send_signal(signal.SIGTERM)
    assert await first.finish() == 0
    assert not (cfg.root / "nsinitd.sock").exists()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_reused_pid_does_not_keep_a_dead_nsinitds_cgroup_alive() -> None:
    from supervisor.daemon import _owner_alive

    owner = subprocess.Popen(["sleep", "30"])
    try:
        ticks = proc_start_time(owner.pid)
        assert ticks is not None
        assert _owner_alive(cgroup_root_name(owner.pid, ticks))
        # the same pid with other start ticks: a process that merely reuses a dead nsinitd's pid,
        # however close in time (whole-second clocks could not tell these apart)
        assert not _owner_alive(cgroup_root_name(owner.pid, ticks - 1))
        assert not _owner_alive(cgroup_root_name(owner.pid, ticks + 1))
    finally:
        owner.kill()
        owner.wait()
    assert not _owner_alive(cgroup_root_name(owner.pid, ticks))
    assert _owner_alive("nsinitd-test-1")  # not a name nsinitd makes: never removed


def test_one_parser_reads_the_command_line_plain_spellings_without_argparse() -> None:
    from supervisor.options import Options, _fast, parse_args

    assert _fast(["-c", "a.toml"]) == Options("a.toml")
    assert _fast(["-ca.toml", "--log-format=json"]) == Options("a.toml", log_format="json")
    assert _fast(["--config=a.toml", "--no-socket", "--check", "--log-format", "text"]) == \
        Options("a.toml", no_socket=True, check=True, log_format="text")
    for odd in ([], ["--check"], ["-c"], ["-c", "--check"], ["-h"], ["--help"], ["--version"], ["-c", "a", "--bogus"],
                ["-c", "a", "--log-format", "xml"], ["-c", "a", "--log-format"], ["--conf", "a"]):
        assert _fast(odd) is None, odd
    # what the fast path leaves to argparse comes out the same
    assert parse_args(["--no-socket", "--config", "a.toml", "--log-format", "text"]) == \
        Options("a.toml", no_socket=True, log_format="text")


NSINITD = [sys.executable, "-m", "supervisor.nsinitd"]


@pytest.mark.parametrize(("argv", "error"), [
    (["--check"], "the following arguments are required: -c/--config"),
    (["-c", "x.toml", "--bogus"], "unrecognized arguments: --bogus"),
    (["--conf", "x.toml"], "the following arguments are required: -c/--config"),  # no abbreviations
    (["-c", "x.toml", "--log-format", "xml"],
     "argument --log-format: invalid choice: 'xml' (choose from 'text', 'json')"),
    (["-c"], "argument -c/--config: expected one argument"),
])
def test_a_usage_error_exits_2_with_the_usage_and_one_error_line(argv: list[str], error: str) -> None:
    result = subprocess.run([*NSINITD, *argv], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("usage: nsinitd ")
    assert result.stderr.endswith(f"\nnsinitd: error: {error}\n")


def test_help_and_version_exit_0() -> None:
    import supervisor

    helped = subprocess.run([*NSINITD, "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: nsinitd ")
    assert "--log-format {text,json}" in helped.stdout and "exit status: 0 ordered shutdown" in helped.stdout
    version = subprocess.run([*NSINITD, "--version"], capture_output=True, text=True, timeout=30)
    assert (version.returncode, version.stdout) == (0, f"nsinitd {supervisor.__version__}\n")


def test_check_says_ok_and_a_missing_config_exits_2(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[programs.p]\ncommand = ["true"]\n')
    ok = subprocess.run([*NSINITD, "-c", str(conf), "--check"], capture_output=True, text=True, timeout=30)
    assert (ok.returncode, ok.stdout) == (0, f"nsinitd: {conf}: ok, 1 programs\n")
    bad = subprocess.run([*NSINITD, "-c", str(tmp_path / "missing.toml"), "--check"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2
    assert bad.stderr == f"nsinitd: {tmp_path / 'missing.toml'}: cannot read: No such file or directory\n"


async def _read_until(fd: int, text: bytes, timeout: float = 15) -> bytes:
    """What a terminal's master side shows, until it holds text."""
    seen = b""
    with trio.fail_after(timeout):
        while text not in seen:
            await trio.lowlevel.wait_readable(fd)
            try:
                seen += os.read(fd, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
    return seen


@pytest.mark.slow
async def test_on_a_terminal_events_are_readable_lines_and_the_event_log_stays_json(cfg: ConfigWriter) -> None:
    conf = cfg.write('[programs.a]\ncommand = ["sleep", "300"]\nstartsecs = 0.1\n')
    master, slave = os.openpty()
    try:
        proc = await trio.lowlevel.open_process([*NSINITD, "-c", str(conf), "--no-socket"], stdout=slave)
        os.close(slave)
        slave = -1
        try:
            shown = await _read_until(master, b"program.running")
            proc.send_signal(signal.SIGTERM)
            shown += await _read_until(master, b"supervisor.stopped")
            with trio.fail_after(15):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    lines = shown.decode().splitlines()
    log = [json.loads(x) for x in (cfg.root / "events.jsonl").read_text().splitlines()]
    assert len(lines) == len(log) and not any(line.startswith("{") for line in lines)
    running = next(e for e in log if e["event"] == "program.running")
    text = next(line for line in lines if "program.running" in line)
    assert text.split()[2:] == ["program.running", "a", f"pid={running['pid']}"]
    assert lines[-1].split()[2:] == ["supervisor.stopped", "-", "exit_code=0"]


def test_a_destroyed_container_is_one_short_line_of_facts() -> None:
    from supervisor.events import Event, render, render_text

    mounts = ["blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "memory/process_api/0d95e404edaee12b5f",
              "pids", "unified"]
    released = {"cgroups": [f"/sys/fs/cgroup/{m}/nsinit/host-3b1c7780d7" for m in mounts], "links": [],
                "files": ["/run/nsinit/web/pid", "/run/nsinit/web/start", "/run/nsinit/web/state.json"]}
    ev = Event.make("container.destroyed", "web", released=released)
    assert len(render(ev)) > 600  # the JSON line keeps every path: its schema says so
    text = render_text(ev)
    assert text.split("  ", 1)[1] == ("container.destroyed  web          "
                                      'cgroup="nsinit/host-3b1c7780d7 (9 hierarchies)" files=pid,start,state.json')
    failed = render_text(Event.make("container.destroyed", "web", released={"error": "rmdir(/x): EBUSY"}))
    assert failed.endswith('web          error="rmdir(/x): EBUSY"')


TWO_DAEMONS = """
    [programs.box]
    container = "{rootfs}"
    command = ["sleep", "300"]
    startsecs = 0.2
    [programs.plain]
    command = ["sleep", "300"]
    startsecs = 0.2
"""


@pytest.mark.slow
@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a container")
@pytest.mark.parametrize("second", ["--no-socket", "another socket"])
async def test_a_second_nsinitd_on_the_same_state_dir_is_refused_and_touches_nothing(  # type: ignore[no-untyped-def]
        cfg: ConfigWriter, nsinitd, host_rootfs: Path, second: str) -> None:
    conf = cfg.write(TWO_DAEMONS.format(rootfs=host_rootfs))
    first = await nsinitd(conf)
    started = await first.wait_for("supervisor.started")
    box = await first.wait_for("program.running", "box")
    plain = await first.wait_for("program.running", "plain")
    if second == "--no-socket":
        argv = ["-c", str(conf), "--no-socket"]
    else:  # a copy of the config that differs only in its socket: same state_dir
        copy = cfg.root / "copy.toml"
        copy.write_text(conf.read_text().replace('socket = "nsinitd.sock"', 'socket = "other.sock"'))
        argv = ["-c", str(copy)]
    with trio.fail_after(20):
        result = await trio.run_process([sys.executable, "-m", "supervisor.nsinitd", *argv],
                                        capture_stdout=True, capture_stderr=True, check=False)
    state_dir = cfg.root / "state"
    assert result.stderr.decode() == (f"nsinitd: state_dir {state_dir} is in use by a live nsinitd "
                                      f"(pid {started['pid']}): one nsinitd per state_dir\n")
    assert result.returncode == 1
    assert result.stdout == b""  # refused before it started, reclaimed or created anything
    assert not (cfg.root / "other.sock").exists()
    # the first one's programs were left alone: same pids, alive, nothing exited
    for pid in (box["pid"], plain["pid"]):
        assert not _gone(pid)
    assert [e for e in first.events if e["event"] in ("program.exited", "container.reclaimed")] == []
    with trio.fail_after(15):  # and the first one still obeys SIGTERM: nothing blocks its loop
        first.proc.send_signal(signal.SIGTERM)
        assert await first.finish() == 0
    exits = {e["program"]: e["pid"] for e in first.events if e["event"] == "program.exited"}
    assert exits == {"box": box["pid"], "plain": plain["pid"]}
