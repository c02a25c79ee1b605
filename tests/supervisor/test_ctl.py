"""nsinitctl through the real socket: against the fake supervisor of test_server.py (in-process
server, client in a thread or as a real `nsinitctl` subprocess), and end to end against a real
`nsinitd -c` running plain processes."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor import __version__, ctl, server
from supervisor import protocol as proto
from supervisor.ctl import client, errors, eventlog, fast, render

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def _load_fake() -> Any:
    # The fake supervisor lives with the server tests; load it by path so this works whatever
    # pytest's import mode.
    spec = importlib.util.spec_from_file_location("_nsinit_fake_api", Path(__file__).with_name("test_server.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fake = _load_fake()
FakeAPI = _fake.FakeAPI
LIMITS = server.Limits(request_timeout=1.0, idle_timeout=5.0, send_timeout=1.0, event_buffer=100)


@pytest.fixture
def api(tmp_path: Path) -> Any:
    fake = FakeAPI(tmp_path)
    (tmp_path / "logs").mkdir()
    return fake


@pytest.fixture
async def sock(api: Any, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Path]:
    path = tmp_path / "nsinitd.sock"
    await nursery.start(lambda task_status: server.serve(api, path, task_status, limits=LIMITS))
    yield path
    nursery.cancel_scope.cancel()


async def nsinitctl(*argv: str) -> tuple[int, str, str]:
    """ctl.run in a thread (its blocking socket must not block the server's trio loop)."""
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(20):
        status = await trio.to_thread.run_sync(ctl.run, list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.ctl", *argv]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


async def run_real(*argv: str, timeout: float = 20, user: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real nsinitctl, as a subprocess (optionally as another user, through setpriv)."""
    args = command(*argv)
    if user is not None:
        args = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *args]
    with trio.fail_after(timeout):
        return await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False, env=ENV,
                                      cwd=REPO)


#: How long a follower (a fresh interpreter importing nsinitctl, then connecting) may take to come
#: up: a full suite on two loaded CPUs has taken more than 5 s. Only its start is bounded so
#: loosely; each event after it gets the usual bound.
STARTUP = 30.0


async def until_read_to(pid: int, path: Path, offset: int, timeout: float = 10) -> None:
    """Until process pid has read the file at path up to offset (its descriptor's pos in fdinfo):
    the follower has seen what was written, no clock guessing how long that takes."""
    with trio.fail_after(timeout):
        while True:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                        continue
                    info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                except OSError:
                    continue
                if int(info.split("pos:")[1].split()[0]) >= offset:
                    return
            await trio.sleep(0.02)


class Background:
    """A long-running nsinitctl (-f) whose output is read line by line."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                                     cwd=REPO)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buffer = b""

    async def line(self, timeout: float = 5) -> str:
        assert self.proc.stdout is not None
        with trio.fail_after(timeout):
            while b"\n" not in self.buffer:
                await trio.lowlevel.wait_readable(self.proc.stdout.fileno())
                try:
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise EOFError(self.proc.stderr.read().decode() if self.proc.stderr else "")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    async def interrupt(self) -> tuple[int, str]:
        # A SIGINT the follower can't receive would look like a hang: say so instead. Blocked or
        # ignored signals are inherited through fork and exec, from whatever set them in pytest.
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        masks = dict(line.split(":\t") for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn")))
        bit = 1 << (signal.SIGINT - 1)
        assert not int(masks["SigBlk"], 16) & bit, f"the follower inherited SIGINT blocked: {masks}"
        assert not int(masks["SigIgn"], 16) & bit, f"the follower inherited SIGINT ignored: {masks}"
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            self.proc.send_signal(signal.SIGINT)
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self.proc.wait()
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def background() -> Iterator[Any]:
    started: list[Background] = []

    def start(*argv: str) -> Background:
        b = Background(*argv)
        started.append(b)
        return b

    yield start
    for b in started:
        b.kill()


# -- status and actions ------------------------------------------------------------------------------


async def test_status_prints_one_line_per_program(sock: Path) -> None:
    status, out, _ = await nsinitctl("-s", str(sock), "status")
    assert status == 0
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [["db", "RUNNING"], ["web", "RUNNING"], ["worker", "RUNNING"]]
    assert "pid 1001, uptime 1:02:0" in lines[1]


async def _fast_and_full(argv: list[str], capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[int | None, str], tuple[int, str, str]]:
    """(status, stdout) of ctl/fast.py and (status, stdout, stderr) of the full client, at one instant."""
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # the uptimes are printed from it
    capsys.readouterr()
    with trio.fail_after(20):
        quick = await trio.to_thread.run_sync(fast.status, argv)
    fast_out = capsys.readouterr().out
    return (quick, fast_out), await nsinitctl(*argv)


@pytest.mark.parametrize("names", [[], ["web"], ["worker", "db", "worker"]])
async def test_the_status_fast_path_prints_what_the_full_client_prints(
        sock: Path, api: Any, names: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    await nsinitctl("-s", str(sock), "stop", "web")
    await nsinitctl("-s", str(sock), "start", "web")
    (quick, fast_out), full = await _fast_and_full(["-s", str(sock), "status", *names], capsys, monkeypatch)
    assert full[0] == 0 and full[2] == ""
    assert (quick, fast_out) == (0, full[1])


@pytest.mark.parametrize("argv", [
    ["status", "web"],  # stopped: the full path says so and exits 3
    ["status", "nope"],  # unknown: exit 2 and a message
    ["status", "--json"],
    ["--timeout", "3", "status"],
])
async def test_the_status_fast_path_leaves_the_rest_to_the_full_client(
        sock: Path, api: Any, argv: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    await nsinitctl("-s", str(sock), "stop", "web")
    (quick, fast_out), _ = await _fast_and_full(["-s", str(sock), *argv], capsys, monkeypatch)
    assert (quick, fast_out) == (None, "")


def test_the_status_fast_path_reads_only_its_own_command_lines() -> None:
    assert fast.parse(["status"]) == (client.DEFAULT_SOCKET, [])
    assert fast.parse(["-s", "/x", "status", "a", "b"]) == ("/x", ["a", "b"])
    assert fast.parse(["status", "a", "--socket", "/y"]) == ("/y", ["a"])
    assert fast.parse(["--socket=/z", "status"]) == ("/z", [])
    for argv in ([], ["-s", "/x"], ["stop", "a"], ["-s", "-x", "status"], ["-s"], ["-c", "f", "status"],
                 ["--sock", "/x", "status"], ["status", "--", "a"], ["-s/x", "status"], ["status", ""],
                 ["status", "-h"]):
        assert fast.parse(argv) is None, argv
    assert fast.MAX_ANSWER == proto.MAX_RESPONSE_BYTES


async def test_the_status_fast_path_imports_no_argparse_json_re_or_dataclasses(sock: Path) -> None:
    def imported(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
        # -S: no site, so no .pth file (an editable install's finder imports re, pathlib...) hides ours
        p = subprocess.run([sys.executable, "-S", "-X", "importtime", *argv], env=ENV, cwd=REPO,
                           capture_output=True, text=True, timeout=30)
        return p, {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}

    _, startup = await trio.to_thread.run_sync(imported, "-c", "pass")
    p, mods = await trio.to_thread.run_sync(imported, "-m", "supervisor.ctl", "-s", str(sock), "status")
    assert p.returncode == 0 and p.stdout.split()[:2] == ["db", "RUNNING"], p.stderr[-600:]
    assert "supervisor.ctl.fast" in mods
    heavy = {"argparse", "json", "re", "dataclasses", "enum", "typing", "pathlib", "datetime", "socket",
             "supervisor.protocol", "supervisor.ctl.commands"}
    assert not (mods - startup) & heavy, sorted((mods - startup) & heavy)


async def test_status_named_not_running_is_3(sock: Path, api: Any) -> None:
    await nsinitctl("-s", str(sock), "stop", "web")
    status, out, _ = await nsinitctl("-s", str(sock), "status", "web")
    assert status == 3
    assert out.split()[:2] == ["web", "STOPPED"]
    status, _, _ = await nsinitctl("-s", str(sock), "status", "db")
    assert status == 0
    status, _, _ = await nsinitctl("-s", str(sock), "status")  # unnamed: informational only
    assert status == 0


async def test_status_unknown_program_is_2(sock: Path) -> None:
    status, out, err = await nsinitctl("-s", str(sock), "status", "nope", "web")
    assert status == 2
    assert "nope: ERROR (no such program)" in err
    assert out.split()[:2] == ["web", "RUNNING"]


async def test_status_json(sock: Path, api: Any) -> None:
    status, out, _ = await nsinitctl("-s", str(sock), "status", "--json")
    assert status == 0
    parsed = json.loads(out)
    assert [p["name"] for p in parsed] == ["db", "web", "worker"]
    assert set(parsed[0]) >= {"name", "state", "pid", "since", "exit_code", "signal", "restarts"}
    assert parsed[1] == api.programs["web"].to_json()


async def test_start_stop_restart(sock: Path, api: Any) -> None:
    s = str(sock)
    assert await nsinitctl("-s", s, "stop", "web", "db") == (0, "web: stopped\ndb: stopped\n", "")
    assert api.programs["web"].state == "STOPPED"
    assert await nsinitctl("-s", s, "stop", "web") == (1, "web: ERROR (not running)\n", "")
    assert await nsinitctl("-s", s, "start", "worker") == (1, "worker: ERROR (already started)\n", "")
    assert await nsinitctl("-s", s, "start", "web") == (0, "web: started\n", "")
    assert await nsinitctl("-s", s, "restart", "web") == (0, "web: restarted\n", "")
    status, out, _ = await nsinitctl("-s", s, "start", "nope")
    assert status == 2 and "nope: ERROR (no such program: nope)" in out


async def test_all_picks_the_programs_in_the_right_state(sock: Path, api: Any) -> None:
    s = str(sock)
    await nsinitctl("-s", s, "stop", "web")
    status, out, _ = await nsinitctl("-s", s, "start", "all")
    assert (status, out) == (0, "web: started\n")
    status, out, _ = await nsinitctl("-s", s, "stop", "all")
    assert (status, out) == (0, "worker: stopped\nweb: stopped\ndb: stopped\n")  # reverse order


async def test_start_that_ends_fatal_is_1(sock: Path, api: Any) -> None:
    api.fail_start.add("web")
    await nsinitctl("-s", str(sock), "stop", "web")
    status, out, _ = await nsinitctl("-s", str(sock), "start", "web")
    assert status == 1
    assert out == "web: ERROR (FATAL: exited too quickly (exit status 1))\n"
    status, out, _ = await nsinitctl("-s", str(sock), "--json", "start", "web", "db")
    assert status == 1
    assert [r.get("state") or r["error"]["code"] for r in json.loads(out)] == ["FATAL", "bad_state"]


async def test_signal(sock: Path, api: Any) -> None:
    s = str(sock)
    assert await nsinitctl("-s", s, "signal", "HUP", "web") == (0, "web: signalled SIGHUP\n", "")
    assert await nsinitctl("-s", s, "signal", "sigusr1", "db") == (0, "db: signalled SIGUSR1\n", "")
    assert (await nsinitctl("-s", s, "signal", "15", "all"))[0] == 0
    assert api.signals == [("web", 1), ("db", 10), ("db", 15), ("web", 15), ("worker", 15)]
    status, _, err = await nsinitctl("-s", s, "signal", "BOGUS", "web")
    assert status == 2 and "no such signal: BOGUS" in err
    await nsinitctl("-s", s, "stop", "web")
    status, out, _ = await nsinitctl("-s", s, "signal", "HUP", "web")
    assert status == 3 and "not running" in out


async def test_pid(sock: Path) -> None:
    s = str(sock)
    assert await nsinitctl("-s", s, "pid") == (0, f"{os.getpid()}\n", "")
    assert await nsinitctl("-s", s, "pid", "web") == (0, "1001\n", "")
    await nsinitctl("-s", s, "stop", "web")
    status, out, err = await nsinitctl("-s", s, "pid", "web")
    assert (status, out) == (3, "")  # no "0" a script could pass to kill
    assert "not running" in err
    assert (await nsinitctl("-s", s, "pid", "nope"))[0] == 2


# -- exec --------------------------------------------------------------------------------------------


async def test_exec_errors(sock: Path) -> None:
    s = str(sock)
    status, _, err = await nsinitctl("-s", s, "exec", "worker", "--", "true")
    assert status == 1 and "plain process" in err
    await nsinitctl("-s", s, "stop", "web")
    status, _, err = await nsinitctl("-s", s, "exec", "web", "--", "true")
    assert status == 3 and "not running" in err
    status, _, err = await nsinitctl("-s", s, "exec", "db")
    assert status == 2 and "no command" in err


async def test_exec_returns_the_commands_status(sock: Path, api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import nsruntime

    calls: list[tuple[Path, list[str], bool]] = []

    def join(state_dir: Path, command: list[str], tty: bool = False) -> int:
        calls.append((state_dir, command, tty))
        return 7

    monkeypatch.setattr(nsruntime, "join", join)
    status, _, _ = await nsinitctl("-s", str(sock), "exec", "-t", "db", "--", "sh", "-c", "exit 7")
    assert status == 7
    assert calls == [(api.tmp / "state" / "db", ["sh", "-c", "exit 7"], True)]

    def failing(state_dir: Path, command: list[str], tty: bool = False) -> int:
        raise OSError("setns(/proc/1/ns/mnt): EPERM")

    monkeypatch.setattr(nsruntime, "join", failing)
    status, _, err = await nsinitctl("-s", str(sock), "exec", "db", "--", "true")
    assert (status, err) == (125, "nsinitctl: exec db: setns(/proc/1/ns/mnt): EPERM\n")


# -- logs --------------------------------------------------------------------------------------------


async def test_logs_last_lines(sock: Path, api: Any) -> None:
    (api.tmp / "logs" / "web.stdout.log").write_text("".join(f"out {i}\n" for i in range(50)))
    (api.tmp / "logs" / "web.stderr.log").write_text("oops\n")
    result = await run_real("-s", str(sock), "logs", "-n", "3", "web")
    assert (result.returncode, result.stdout) == (0, b"out 47\nout 48\nout 49\n")
    result = await run_real("-s", str(sock), "logs", "--stderr", "web")
    assert result.stdout == b"oops\n"
    result = await run_real("-s", str(sock), "logs", "db")
    assert result.returncode == 0 and b"no stdout captured yet" in result.stderr
    result = await run_real("-s", str(sock), "logs", "nope")
    assert result.returncode == 2


async def test_logs_follow_across_rotation(sock: Path, api: Any, background: Any) -> None:
    log = api.tmp / "logs" / "web.stdout.log"
    log.write_text("old 1\nold 2\n")
    follower = background("-s", str(sock), "logs", "-f", "-n", "1", "web")
    assert await follower.line(timeout=STARTUP) == "old 2"
    with log.open("a") as f:
        f.write("new 1\n")
    assert await follower.line() == "new 1"
    with log.open("a") as f:
        f.write("last words\n")
    log.rename(log.with_suffix(".log.1"))  # rotation: the old file moves, a new one appears
    log.write_text("after rotation\n")
    assert await follower.line() == "last words"
    assert await follower.line() == "after rotation"
    status, err = await follower.interrupt()
    assert status == 0 and "Traceback" not in err


async def test_a_follower_is_woken_by_the_change_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventlog.Follower, "RECHECK", 3600.0)  # no timer may be what wakes it
    monkeypatch.setattr(eventlog.Follower, "POLL", 3600.0)
    log = tmp_path / "web.stdout.log"
    log.write_bytes(b"")
    follower = eventlog.Follower(log, log.open("rb"))
    try:
        assert follower.read() == b""

        async def woken_by(change: Any) -> bytes:
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: trio.to_thread.run_sync(follower.wait, abandon_on_cancel=True))
                    change()
            return follower.read()

        assert await woken_by(lambda: log.write_bytes(b"appended\n")) == b"appended\n"
        assert await woken_by(lambda: log.write_bytes(b"")) == b""  # truncated: nothing new yet
        assert await woken_by(lambda: log.write_bytes(b"after truncation\n")) == b"after truncation\n"

        def rotate() -> None:
            log.rename(log.with_suffix(".log.1"))
            log.write_bytes(b"a new file\n")

        assert await woken_by(rotate) == b"a new file\n"
    finally:
        follower.close()


def test_tail_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"".join(b"%d\n" % i for i in range(100_000)))
    with path.open("rb") as f:
        assert eventlog.tail_bytes(f, 2) == b"99998\n99999\n"
        assert eventlog.tail_bytes(f, 0) == b""
    path.write_bytes(b"a\nb")  # no final newline
    with path.open("rb") as f:
        assert eventlog.tail_bytes(f, 1) == b"b"
        assert eventlog.tail_bytes(f, 10) == b"a\nb"


# -- events ------------------------------------------------------------------------------------------

EVENTS = [
    {"ts": "2026-11-28T00:00:01.000000Z", "event": "supervisor.started", "pid": 1},
    {"ts": "2026-11-28T00:00:02.000000Z", "event": "program.starting", "program": "web"},
    {"ts": "2026-11-28T00:00:03.000000Z", "event": "program.running", "program": "web", "pid": 5},
    {"ts": "2026-11-28T00:00:04.000000Z", "event": "program.exited", "program": "db", "pid": 6, "exit_code": 1,
     "signal": None, "expected": False},
    {"ts": "2026-11-28T00:00:05.000000Z", "event": "container.created", "program": "web", "host_pid": 9},
]


@pytest.fixture
def event_log(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(e) for e in EVENTS]
    lines.insert(2, "{not json")  # a torn line must not stop the reader
    path.write_text("\n".join(lines) + "\n")
    return path


async def events(*argv: str) -> tuple[int, list[dict[str, Any]], str]:
    status, out, err = await nsinitctl("events", *argv)
    return status, [json.loads(line) for line in out.splitlines()], err


async def test_events_file_filters_combine(event_log: Path) -> None:
    f = str(event_log)
    status, got, err = await events("--file", f)
    assert status == 0 and got == EVENTS
    assert "skipped 1 malformed line" in err
    assert (await events("--file", f, "--program", "web"))[1] == [EVENTS[1], EVENTS[2], EVENTS[4]]
    assert (await events("--file", f, "--event", "program.*"))[1] == EVENTS[1:4]
    assert (await events("--file", f, "--event", "*.created", "--event", "supervisor.*"))[1] == [EVENTS[0], EVENTS[4]]
    got = (await events("--file", f, "--program", "web", "--event", "program.*", "--since", "2026-11-28T00:00:03Z"))[1]
    assert got == [EVENTS[2]]
    assert (await events("--file", f, "--since", "2026-11-28T01:00:00+01:00"))[1] == EVENTS
    assert (await events("--file", f, "--since", "10m"))[1] == []  # they are from long ago


async def test_events_file_lines_are_printed_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    raw = '{"ts": "2026-11-28T00:00:01.000000Z",  "event": "x.y", "note": "spaces kept"}'
    path.write_text(raw + "\n")
    assert (await nsinitctl("events", "--file", str(path)))[1] == raw + "\n"


async def test_events_pretty(event_log: Path) -> None:
    status, out, _ = await nsinitctl("events", "--file", str(event_log), "--pretty", "--program", "db")
    lines = out.splitlines()
    assert status == 0
    assert lines[0].split() == ["TIME", "EVENT", "PROGRAM", "DETAILS"]
    assert "program.exited" in lines[1] and "db" in lines[1]
    assert "exit_code=1" in lines[1] and "signal=null" in lines[1]


async def test_events_needs_a_source(tmp_path: Path) -> None:
    status, _, err = await nsinitctl("-s", str(tmp_path / "none"), "events")
    assert (status, err) == (
        2,
        f"nsinitctl: events: nothing to read: no nsinitd answers at {tmp_path / 'none'} to say where its event "
        "log is; use -f for the live stream, or --file PATH (or -c CONFIG with [supervisor] event_log)\n",
    )
    status, _, err = await nsinitctl("events", "--file", str(tmp_path / "missing.jsonl"))
    assert status == 2 and "cannot read" in err
    status, _, err = await nsinitctl("events", "--file", "x", "--since", "yesterday")
    assert status == 2 and "RFC 3339" in err


async def test_events_read_the_config_event_log(tmp_path: Path, event_log: Path) -> None:
    config = tmp_path / "nsinitd.toml"
    config.write_text(f'[supervisor]\nevent_log = "{event_log.name}"\n')
    status, got, _ = await events("-c", str(config), "--program", "db")
    assert status == 0 and got == [EVENTS[3]]


async def test_events_without_a_file_read_the_log_of_the_daemon_that_answers(
    sock: Path, api: Any, event_log: Path
) -> None:
    api.event_log = event_log
    status, got, _ = await events("-s", str(sock), "--program", "db")
    assert (status, got) == (0, [EVENTS[3]])
    api.event_log = None
    status, out, err = await nsinitctl("-s", str(sock), "events")
    assert (status, out) == (2, "")
    assert err == (
        f"nsinitctl: events: nsinitd at {sock} keeps no event log ([supervisor] event_log): "
        "use -f for the live stream\n"
    )


async def test_events_file_follow(event_log: Path, background: Any) -> None:
    follower = background("events", "-f", "--file", str(event_log), "--program", "db")
    assert json.loads(await follower.line(timeout=STARTUP)) == EVENTS[3]
    new = {"ts": "2026-11-28T00:00:09.000000Z", "event": "program.stopped", "program": "db"}
    with event_log.open("a") as f:
        f.write(json.dumps({**new, "program": "web"}) + "\n")
        f.write(json.dumps(new)[:20])  # half a line: printed once it is complete
        f.flush()
        await until_read_to(follower.proc.pid, event_log, event_log.stat().st_size)
        f.write(json.dumps(new)[20:] + "\n")
    assert json.loads(await follower.line()) == new
    status, _ = await follower.interrupt()
    assert status == 0


async def test_events_live_follow_sees_a_new_event(sock: Path, api: Any, background: Any) -> None:
    follower = background("-s", str(sock), "events", "-f", "--program", "web")
    with trio.fail_after(STARTUP):  # the follower's interpreter starts, imports and connects
        await api.subscribed.wait()
    api.emit("program.stopping", program="db")
    api.emit("program.stopping", program="web", pid=4)
    got = json.loads(await follower.line())
    assert (got["event"], got["program"], got["pid"]) == ("program.stopping", "web", 4)
    status, err = await follower.interrupt()
    assert status == 0 and "Traceback" not in err


async def test_events_live_stream_dropped_is_1(sock: Path, api: Any) -> None:
    async def drop_soon() -> None:
        with trio.fail_after(5):
            await api.subscribed.wait()
        send, _ = api.subscribers.pop()
        send.send_nowait({"event": "subscriber.dropped", "reason": "fell 100 events behind"})
        send.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drop_soon)
        status, out, err = await nsinitctl("-s", str(sock), "events", "-f")
    assert status == 1
    assert json.loads(out)["event"] == "subscriber.dropped"
    assert "dropped" in err


def test_parse_since() -> None:
    now = 1_800_000_000.0
    assert eventlog.parse_since("10m", now) == now - 600
    assert eventlog.parse_since("1h30m", now) == now - 5400
    assert eventlog.parse_since("2d", now) == now - 172800
    assert eventlog.parse_since("1.5s", now) == now - 1.5
    assert eventlog.parse_since("2026-11-28T00:00:00Z") == 1795824000.0
    assert eventlog.parse_since("2026-11-28T01:00:00+01:00") == 1795824000.0
    for bad in ("", "10x", "m", "yesterday"):
        with pytest.raises(errors.CtlError):
            eventlog.parse_since(bad, now)


def test_format_duration() -> None:
    assert render.format_duration(0) == "0:00:00"
    assert render.format_duration(3725) == "1:02:05"
    assert render.format_duration(86400 + 61) == "1 day, 0:01:01"
    assert render.format_duration(3 * 86400) == "3 days, 0:00:00"


# -- top, reload, shutdown, version ------------------------------------------------------------------


async def test_top_batch_output(sock: Path, api: Any) -> None:
    await nsinitctl("-s", str(sock), "stop", "worker")
    status, out, _ = await nsinitctl("-s", str(sock), "top", "-n", "2", "-d", "0.2")
    assert status == 0
    frames = out.split("\n\n")
    assert len(frames) == 2
    header, *rows = frames[1].splitlines()
    assert header.split() == ["NAME", "STATE", "CPU", "%", "MEM", "PIDS", "RESTARTS"]
    db = rows[0].split()
    assert db[0] == "db" and db[1] == "RUNNING" and db[2].endswith("%") and db[3] == "12.0MiB" and db[4] == "3"
    assert rows[2].split() == ["worker", "STOPPED", "-", "-", "-", "0"]


async def test_top_json_and_refresh_in_place(sock: Path) -> None:
    status, out, _ = await nsinitctl("-s", str(sock), "--json", "top", "-n", "1", "-d", "0.2")
    frame = json.loads(out)
    assert status == 0
    assert [p["name"] for p in frame["programs"]] == ["db", "web", "worker"]
    assert frame["programs"][0]["cpu_percent"] > 0 and frame["programs"][0]["pids"] == 3

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out_tty = Tty()
    with trio.fail_after(10):
        status = await trio.to_thread.run_sync(ctl.run, ["-s", str(sock), "top", "-n", "2", "-d", "0.2"], out_tty)
    screen = out_tty.getvalue()
    assert status == 0
    assert screen.count("\x1b[H") == 2 and screen.count("\x1b[J") == 2  # home, draw, clear below
    assert screen.endswith("\x1b[?25h")  # the cursor comes back


async def test_top_when_the_daemon_cannot_read_usage(sock: Path, api: Any) -> None:
    def unreadable(name: str) -> dict[str, Any]:
        raise NotImplementedError

    api.stats = unreadable
    assert await nsinitctl("-s", str(sock), "top", "-n", "1") == (
        1,
        "",
        "nsinitctl: top: this nsinitd doesn't report resource usage\n",
    )


async def test_reread_says_what_a_reload_would_change(sock: Path, api: Any) -> None:
    assert await nsinitctl("-s", str(sock), "reread") == (0, "new: available\ndb: changed\nworker: disappeared\n", "")
    status, out, _ = await nsinitctl("-s", str(sock), "--json", "reread")
    assert (status, json.loads(out)) == (0, {"added": ["new"], "changed": ["db"], "removed": ["worker"]})
    api.reread = lambda: {"added": [], "removed": [], "changed": []}
    assert await nsinitctl("-s", str(sock), "reread") == (0, "no config updates to programs\n", "")


async def test_reload_shutdown_version(sock: Path, api: Any) -> None:
    s = str(sock)
    assert await nsinitctl("-s", s, "reload") == (0, "new: added\n", "")
    status, out, _ = await nsinitctl("-s", s, "--json", "version")
    assert status == 0
    assert json.loads(out) == {"nsinitctl": "0.1.0", "nsinitd": {"version": "0.1.0", "protocol": 1,
                                                                  "pid": os.getpid()}}
    assert await nsinitctl("-s", s, "shutdown", "--keep-running") == \
        (0, f"nsinitd (pid {os.getpid()}) is shutting down, programs left running\n", "")
    assert (api.shutdown_requested, api.keep_running) == (True, True)
    assert await nsinitctl("-s", s, "shutdown") == (0, f"nsinitd (pid {os.getpid()}) is shutting down\n", "")
    assert (api.shutdown_requested, api.keep_running) == (True, False)


# -- the socket, access, usage --------------------------------------------------------------------------


async def test_socket_from_config(sock: Path, tmp_path: Path) -> None:
    config = tmp_path / "conf" / "nsinitd.toml"
    config.parent.mkdir()
    config.write_text('[supervisor]\nsocket = "../nsinitd.sock"\n')  # relative to the config file
    status, out, _ = await nsinitctl("-c", str(config), "pid")
    assert (status, out) == (0, f"{os.getpid()}\n")
    status, _, err = await nsinitctl("-c", str(tmp_path / "missing.toml"), "pid")
    assert status == 2 and "cannot read config" in err


async def test_a_config_with_a_typo_elsewhere_still_names_the_socket(sock: Path, tmp_path: Path) -> None:
    config = tmp_path / "conf" / "nsinitd.toml"
    config.parent.mkdir()
    config.write_text(
        '[supervisor]\nsocket = "../nsinitd.sock"  # next to the config\nlog_dir = "logs"\n\n'
        '[programs.web]\ncommand = ["sleep", 1000\n'  # unclosed: nsinitd would refuse it, nsinitctl needn't
    )
    assert await nsinitctl("-c", str(config), "pid") == (0, f"{os.getpid()}\n", "")


async def test_a_config_whose_socket_line_is_broken_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "nsinitd.toml"
    config.write_text('[supervisor]\nsocket = "run/nsinitd.sock\n')
    status, _, err = await nsinitctl("-c", str(config), "pid")
    assert (status, err) == (
        2,
        f"nsinitctl: config {config}: Illegal character '\\n' (at line 2, column 27); "
        "no [supervisor] socket could be read from it\n",
    )


async def test_a_socket_path_that_is_not_a_socket_says_so(tmp_path: Path) -> None:
    regular = tmp_path / "nsinitd.sock"
    regular.write_text("")
    assert await nsinitctl("-s", str(regular), "status") == (
        4, "", f"nsinitctl: cannot connect to {regular}: not a socket (a regular file)\n"
    )
    assert await nsinitctl("-s", str(tmp_path), "status") == (
        4, "", f"nsinitctl: cannot connect to {tmp_path}: not a socket (a directory)\n"
    )


async def test_unreachable_socket_is_4(tmp_path: Path) -> None:
    result = await run_real("-s", str(tmp_path / "none.sock"), "status")
    assert result.returncode == 4
    assert result.stderr.decode() == (
        f"nsinitctl: cannot connect to {tmp_path / 'none.sock'}: No such file or directory (is nsinitd running?)\n"
    )
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    result = await run_real("-s", str(stale), "status")
    assert result.returncode == 4 and b"Connection refused" in result.stderr


@pytest.fixture
async def stuck_daemon(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Path]:
    """A socket whose listener accepts every connection and never answers: a stuck nsinitd."""
    path = tmp_path / "stuck.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen()
    accepted: list[trio.socket.SocketType] = []

    async def accept_and_say_nothing() -> None:
        while True:
            conn, _ = await listener.accept()
            accepted.append(conn)

    nursery.start_soon(accept_and_say_nothing)
    yield path
    nursery.cancel_scope.cancel()
    for conn in accepted:
        conn.close()
    listener.close()


async def test_a_daemon_that_never_answers_is_given_up_on_by_default(
    stuck_daemon: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "QUICK_TIMEOUT", 0.3)  # the real default, 10 s, is too long for a test
    status, out, err = await nsinitctl("-s", str(stuck_daemon), "status")
    assert (status, out, err) == (4, "", f"nsinitctl: no answer from nsinitd at {stuck_daemon} within 0.3 s\n")


async def test_actions_on_programs_wait_longer_by_default(stuck_daemon: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "QUICK_TIMEOUT", 0.1)
    monkeypatch.setattr(client, "ACTION_TIMEOUT", 0.4)  # the real default, 30 s: a stop waits on stopwaitsecs
    status, out, err = await nsinitctl("-s", str(stuck_daemon), "stop", "web")
    assert (status, out, err) == (4, "", f"nsinitctl: no answer from nsinitd at {stuck_daemon} within 0.4 s\n")


async def test_timeout_overrides_the_default(stuck_daemon: Path) -> None:
    status, _, err = await nsinitctl("-s", str(stuck_daemon), "pid", "--timeout", "0.2")
    assert (status, err) == (4, f"nsinitctl: no answer from nsinitd at {stuck_daemon} within 0.2 s\n")


async def test_a_daemon_whose_backlog_is_full_is_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "CONNECT_TIMEOUT", 0.3)
    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as queued:
        listener.bind(str(path))
        listener.listen(0)  # room for one connection that nobody accepts: the next connect blocks
        queued.connect(str(path))
        status, _, err = await nsinitctl("-s", str(path), "status", "--timeout", "60")
    assert (status, err) == (4, f"nsinitctl: nsinitd at {path} accepts no connection within 0.3 s\n")


async def test_a_live_event_stream_may_stay_quiet_longer_than_the_timeout(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "quiet.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen()

    async def answer_then_wait() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(65536)
            await conn.send(b'{"id":1,"ok":true,"result":{"stream":true}}\n')
            await trio.sleep(1.0)  # quiet for longer than --timeout: a quiet stream is not a stuck daemon
            await conn.send(b'{"id":1,"item":{"event":"program.running","program":"web"}}\n')
            await conn.send(b'{"id":1,"end":{"reason":"closed","message":"nsinitd is stopping"}}\n')

    nursery.start_soon(answer_then_wait)
    status, out, err = await nsinitctl("-s", str(path), "events", "-f", "--timeout", "0.2")
    listener.close()
    assert (status, out) == (0, '{"event": "program.running", "program": "web"}\n')
    assert err == "nsinitctl: the event stream ended: nsinitd is stopping\n"


def test_help_documents_the_default_timeouts() -> None:
    text = " ".join(ctl.build_parser().format_help().split())
    assert ("--timeout S seconds to wait for an answer from nsinitd (default 30 for start, stop, restart, "
            "reload, shutdown; 10 for the rest; a following -f waits without limit after the first answer)") in text


async def test_global_options_after_the_command(sock: Path) -> None:
    status, out, _ = await nsinitctl("status", "web", "-s", str(sock), "--json")
    assert status == 0 and json.loads(out)[0]["name"] == "web"


async def test_help_and_version_exit_0() -> None:
    result = await run_real("--help")
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith(b"usage: nsinitctl [-h]")
    result = await run_real("status", "--help")
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith(b"usage: nsinitctl status [-h]")
    result = await run_real("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"nsinitctl {__version__}\n".encode(), b"")


async def test_nsinitctl_starts_without_the_daemons_libraries() -> None:
    # trio costs ~100 ms to import and structlog ~60: nsinitctl speaks the protocol over a plain socket
    with trio.fail_after(20):
        result = await trio.run_process([sys.executable, "-X", "importtime", *command("--version")[1:]],
                                        capture_stdout=True, capture_stderr=True, env=ENV, cwd=REPO)
    imported = {line.split("|")[2].strip() for line in result.stderr.decode().splitlines() if line.count("|") == 2}
    assert "supervisor.ctl.commands" in imported
    heavy = {name for name in imported if name.split(".")[0] in {"trio", "structlog", "pyroute2", "cgroupspy"}}
    assert (result.returncode, heavy) == (0, set())


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        ((), "nsinitctl", "the following arguments are required: COMMAND"),
        (("status", "--bogus"), "nsinitctl", "unrecognized arguments: --bogus"),
        (("version", "extra"), "nsinitctl", "unrecognized arguments: extra"),
        (("reload", "extra"), "nsinitctl", "unrecognized arguments: extra"),
        (("reread", "extra"), "nsinitctl", "unrecognized arguments: extra"),
        (("shutdown", "now"), "nsinitctl", "unrecognized arguments: now"),
        (("pid", "web", "db"), "nsinitctl", "unrecognized arguments: db"),
        (("logs", "web", "db"), "nsinitctl", "unrecognized arguments: db"),
        (("start",), "nsinitctl start", "the following arguments are required: NAME"),
        (("signal", "HUP"), "nsinitctl signal", "the following arguments are required: NAME"),
        (("--timeout",), "nsinitctl", "argument --timeout: expected one argument"),
        (("status", "--timeout", "0"), "nsinitctl status", "argument --timeout: must be > 0"),
        (("logs", "-n", "-1", "web"), "nsinitctl logs", "argument -n/--lines: expected a whole number >= 0, got '-1'"),
        (("top", "-n", "0"), "nsinitctl top", "argument -n/--iterations: expected a whole number >= 1, got '0'"),
        (("top", "-d", "0"), "nsinitctl top", "argument -d/--delay: must be > 0"),
        (("exec", "web", "--bogus"), "nsinitctl exec",
         "exec: options go before NAME, the command after --: '--bogus'"),
        (("exec", "web", "-t", "--", "sh"), "nsinitctl exec",
         "exec: options go before NAME, the command after --: '-t'"),
        (("exec", "web"), "nsinitctl exec", "exec: no command given (nsinitctl exec NAME -- CMD...)"),
    ],
)
async def test_usage_errors_exit_2_with_the_usage_and_one_error_line(
    argv: tuple[str, ...], usage: str, message: str, tmp_path: Path
) -> None:
    result = await run_real("-s", str(tmp_path / "none.sock"), *argv)
    err = result.stderr.decode()
    assert (result.returncode, result.stdout) == (2, b"")
    assert err.startswith(f"usage: {usage} [-h]")
    assert err.endswith(f"\nnsinitctl: error: {message}\n")
    assert err.count("nsinitctl: error:") == 1


async def test_usage_errors_are_2(sock: Path) -> None:
    assert (await nsinitctl())[0] == 2
    assert (await nsinitctl("-s", str(sock), "frobnicate"))[0] == 2
    assert (await nsinitctl("-s", str(sock), "start"))[0] == 2
    assert (await nsinitctl("-s", str(sock), "top", "-d", "0"))[0] == 2


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """Traversable by every user: tmp_path is 0700 and would refuse `nobody` before SO_PEERCRED."""
    path = Path(tempfile.mkdtemp(prefix="nsinitctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to another user)")
async def test_non_root_user_is_refused_with_5(api: Any, open_dir: Path, nursery: trio.Nursery) -> None:
    path = open_dir / "nsinitd.sock"
    await nursery.start(server.serve, api, path)
    result = await run_real("-s", str(path), "status", user=NOBODY)
    assert result.returncode == 5  # the 0600 file mode refuses first
    assert b"permission denied" in result.stderr
    os.chmod(path, 0o666)  # now only SO_PEERCRED stands in the way
    result = await run_real("-s", str(path), "status", user=NOBODY)
    assert result.returncode == 5
    assert result.stderr.decode() == (
        f"nsinitctl: permission denied: uid {NOBODY} may not use the control socket (only root)\n"
    )
    assert result.stdout == b""
    refused = [e for e in api.emitted if e["event"] == "control.refused"]
    assert [e["uid"] for e in refused] == [NOBODY]
    nursery.cancel_scope.cancel()


async def test_output_to_a_closed_pipe_is_quiet(event_log: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text((json.dumps(EVENTS[1]) + "\n") * 20000)
    with trio.fail_after(20):
        proc = await trio.run_process(
            f"{sys.executable} -m supervisor.ctl events --file {big} | head -n 1", shell=True,
            capture_stdout=True, capture_stderr=True, env=ENV, cwd=REPO,
        )
    assert json.loads(proc.stdout) == EVENTS[1]
    assert proc.stderr == b""


# -- end to end: a real nsinitd ----------------------------------------------------------------------


@pytest.mark.slow
async def test_end_to_end_with_a_real_nsinitd(tmp_path: Path, background: Any) -> None:
    config = tmp_path / "nsinitd.toml"
    config.write_text(
        '[supervisor]\nsocket = "run/nsinitd.sock"\nevent_log = "events.jsonl"\nlog_dir = "logs"\n'
        'state_dir = "state"\n\n'
        '[programs.sleeper]\ncommand = ["sleep", "1000"]\nstartsecs = 0.2\n\n'
        '[programs.talker]\ncommand = ["sh", "-c", "echo hello from talker; echo oops >&2; exec sleep 1000"]\n'
        "startsecs = 0.2\n\n"
        '[programs.manual]\ncommand = ["sleep", "1000"]\nautostart = false\n'
    )
    c = str(config)
    daemon = subprocess.Popen([sys.executable, "-c", "from supervisor.daemon import main; main()", "-c", c],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    try:
        with trio.fail_after(15):
            while True:
                result = await run_real("-c", c, "status", "sleeper", "talker")
                if result.returncode == 0:
                    break
                assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
                await trio.sleep(0.2)
        sock = tmp_path / "run" / "nsinitd.sock"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        result = await run_real("-c", c, "status")
        lines = result.stdout.decode().splitlines()
        assert [line.split()[:2] for line in lines] == [["manual", "STOPPED"], ["sleeper", "RUNNING"],
                                                          ["talker", "RUNNING"]]
        assert result.returncode == 0
        assert (await run_real("-c", c, "status", "manual")).returncode == 3
        assert (await run_real("-c", c, "status", "nope")).returncode == 2
        pid = int((await run_real("-c", c, "pid", "sleeper")).stdout)
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00"
        assert int((await run_real("-c", c, "pid")).stdout) == daemon.pid

        follower = background("-c", c, "events", "-f", "--program", "manual")
        await trio.sleep(0.5)  # subscribed
        result = await run_real("-c", c, "start", "manual")
        assert (result.returncode, result.stdout) == (0, b"manual: started\n")
        assert json.loads(await follower.line())["event"] == "program.starting"

        result = await run_real("-c", c, "logs", "talker")
        assert result.stdout == b"hello from talker\n"
        assert (await run_real("-c", c, "logs", "--stderr", "talker")).stdout == b"oops\n"

        result = await run_real("-c", c, "signal", "TERM", "sleeper")
        assert result.returncode == 0
        result = await run_real("-c", c, "--json", "status", "sleeper")
        assert json.loads(result.stdout)[0]["name"] == "sleeper"

        result = await run_real("-c", c, "stop", "all")
        assert result.returncode == 0 and b"talker: stopped" in result.stdout
        assert (await run_real("-c", c, "status", "talker")).returncode == 3
        result = await run_real("-c", c, "events", "--program", "talker", "--event", "program.stopped")
        assert [json.loads(line)["event"] for line in result.stdout.splitlines()] == ["program.stopped"]

        result = await run_real("-c", c, "shutdown", "--wait", "--timeout", "15")
        assert result.returncode == 0
        with trio.fail_after(15):
            while daemon.poll() is None:
                await trio.sleep(0.05)
        assert daemon.returncode == 0
        assert not sock.exists()
        assert not sock.with_name("nsinitd.sock.lock").exists()
        assert (await run_real("-c", c, "status")).returncode == 4
        with trio.fail_after(5):  # the live follower was told the stream ended, and exits 0
            while follower.proc.poll() is None:
                await trio.sleep(0.05)
        assert follower.proc.returncode == 0
        assert follower.proc.stderr is not None
        assert b"the event stream ended: nsinitd is stopping" in follower.proc.stderr.read()
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        if daemon.stderr is not None:
            daemon.stderr.close()
    # give the follower's end a moment, then it is killed by its fixture
    time.sleep(0.05)


@pytest.mark.slow
async def test_a_real_nsinitd_refuses_to_start_a_running_program_and_to_stop_a_stopped_one(tmp_path: Path) -> None:
    config = tmp_path / "nsinitd.toml"
    head = '[supervisor]\nsocket = "run/nsinitd.sock"\nlog_dir = "logs"\nstate_dir = "state"\n\n'
    config.write_text(
        head + '[programs.sleeper]\ncommand = ["sleep", "1000"]\nstartsecs = 0.2\n\n'
        '[programs.manual]\ncommand = ["sleep", "1000"]\nautostart = false\n'
    )
    c = str(config)
    daemon = _start_daemon(config)
    try:
        with trio.fail_after(15):
            while (await run_real("-c", c, "status", "sleeper")).returncode != 0:
                assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
                await trio.sleep(0.1)
        result = await run_real("-c", c, "start", "sleeper")
        assert (result.returncode, result.stdout, result.stderr) == (1, b"sleeper: ERROR (already started)\n", b"")
        result = await run_real("-c", c, "stop", "manual")
        assert (result.returncode, result.stdout, result.stderr) == (1, b"manual: ERROR (not running)\n", b"")
        result = await run_real("-c", c, "--json", "start", "sleeper", "manual")
        assert result.returncode == 1
        assert [r.get("state") or r["error"] for r in json.loads(result.stdout)] == [
            {"code": "bad_state", "message": "already started"}, "RUNNING"
        ]
        assert (await run_real("-c", c, "stop", "manual")).stdout == b"manual: stopped\n"

        # reread says what a reload would do, and does none of it
        config.write_text(
            head + '[programs.sleeper]\ncommand = ["sleep", "2000"]\nstartsecs = 0.2\n\n'
            '[programs.extra]\ncommand = ["sleep", "1000"]\n'
        )
        result = await run_real("-c", c, "reread")
        assert (result.returncode, result.stdout) == (0, b"extra: available\nsleeper: changed\nmanual: disappeared\n")
        result = await run_real("-c", c, "status")
        assert [line.split()[:2] for line in result.stdout.decode().splitlines()] == [
            ["manual", "STOPPED"], ["sleeper", "RUNNING"]
        ]
        pid = int((await run_real("-c", c, "pid", "sleeper")).stdout)
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00"  # not restarted

        # a config with a typo: nsinitctl still reaches nsinitd, and reread reports the error
        config.write_text(config.read_text() + "startsecs = \n")
        assert (await run_real("-c", c, "pid")).stdout == f"{daemon.pid}\n".encode()
        result = await run_real("-c", c, "reread")
        assert result.returncode == 1
        assert result.stderr.startswith(f"nsinitctl: reread: {config}".encode())
        assert result.stderr.count(b"\n") == 1
    finally:
        _stop_daemon(daemon)


def _start_daemon(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "from supervisor.daemon import main; main()", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=REPO)


async def _wait_answering(config: Path, daemon: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(15):
        while (await run_real("-c", str(config), "version")).returncode != 0:
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            await trio.sleep(0.1)


def _stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    if daemon.stderr is not None:
        daemon.stderr.close()


@pytest.mark.slow
async def test_a_live_socket_is_never_taken_over_and_a_stale_one_is(tmp_path: Path) -> None:
    """A second nsinitd on the same socket refuses to start; after a SIGKILLed nsinitd the socket
    file it left is replaced by the next one."""
    config = tmp_path / "nsinitd.toml"
    config.write_text(
        '[supervisor]\nsocket = "run/nsinitd.sock"\nlog_dir = "logs"\nstate_dir = "state"\n\n'
        '[programs.manual]\ncommand = ["sleep", "1000"]\nautostart = false\n'
    )
    first = _start_daemon(config)
    try:
        await _wait_answering(config, first)
        second = _start_daemon(config)
        try:
            with trio.fail_after(15):
                while second.poll() is None:
                    await trio.sleep(0.05)
            assert second.returncode != 0
            assert second.stderr is not None
            assert b"in use by a live nsinitd" in second.stderr.read()
        finally:
            _stop_daemon(second)
        result = await run_real("-c", str(config), "pid")
        assert int(result.stdout) == first.pid  # still the first one answering

        first.kill()
        first.wait()
        assert (tmp_path / "run" / "nsinitd.sock").exists()  # left behind
        assert (await run_real("-c", str(config), "status")).returncode == 4
        third = _start_daemon(config)
        try:
            await _wait_answering(config, third)
            assert int((await run_real("-c", str(config), "pid")).stdout) == third.pid
        finally:
            _stop_daemon(third)
    finally:
        _stop_daemon(first)


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv to another user)")
@pytest.mark.slow
async def test_exec_in_a_real_container(tmp_path: Path) -> None:
    """exec joins the program's container: its hostname, stdin relayed, the exit status passed
    through, and with -t a terminal."""
    import pexpect

    config = tmp_path / "nsinitd.toml"
    config.write_text(
        '[supervisor]\nsocket = "run/nsinitd.sock"\nlog_dir = "logs"\nstate_dir = "state"\n\n'
        f'[programs.box]\ncontainer = "{REPO / "configs" / "host"}"\ncommand = ["sleep", "1000"]\n'
        "startsecs = 0.5\n\n"
        '[programs.plain]\ncommand = ["sleep", "1000"]\nstartsecs = 0.5\n'
    )
    c = str(config)
    daemon = _start_daemon(config)
    try:
        with trio.fail_after(20):
            while (await run_real("-c", c, "status", "box")).returncode != 0:
                assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
                await trio.sleep(0.2)
        result = await run_real("-c", c, "exec", "box", "--", "sh", "-c", "hostname; exit 7")
        assert (result.returncode, result.stdout) == (7, b"nsinit-host\n")
        with trio.fail_after(20):
            piped = await trio.run_process(command("-c", c, "exec", "box", "--", "cat"), stdin=b"relayed\n",
                                           capture_stdout=True, env=ENV, cwd=REPO, check=False)
        assert (piped.returncode, piped.stdout) == (0, b"relayed\n")
        result = await run_real("-c", c, "exec", "plain", "--", "true")
        assert result.returncode == 1 and b"not a container" in result.stderr

        def with_tty() -> tuple[int | None, bytes]:
            child = pexpect.spawn(sys.executable, ["-m", "supervisor.ctl", "-c", c, "exec", "-t", "box", "--",
                                                   "sh", "-c", "tty; exit 3"], timeout=15, env=ENV, cwd=str(REPO))
            child.expect(pexpect.EOF)
            child.close()
            return child.exitstatus, child.before

        status, output = await trio.to_thread.run_sync(with_tty)
        assert status == 3
        assert output.startswith(b"/dev/pts/")
        result = await run_real("-c", c, "shutdown", "--wait", "--timeout", "20", timeout=30)
        assert result.returncode == 0
    finally:
        _stop_daemon(daemon)


@pytest.mark.slow
async def test_a_real_nsinitd_shrugs_off_bad_clients(tmp_path: Path) -> None:
    """Against the real daemon: an event reader that never reads, 300 connections of valid,
    malformed, oversized and half-written requests, while a program crash-loops (events flowing).
    Status keeps answering within 100 ms and the daemon shuts down cleanly afterwards."""
    config = tmp_path / "nsinitd.toml"
    config.write_text(
        '[supervisor]\nsocket = "run/nsinitd.sock"\nlog_dir = "logs"\nstate_dir = "state"\n\n'
        '[programs.web]\ncommand = ["sleep", "1000"]\nstartsecs = 0.2\n\n'
        '[programs.crashy]\ncommand = ["false"]\nstartsecs = 1\nstartretries = 1000\n'
        "backoff = { initial = 0.01, factor = 1.0, max = 0.01 }\n"
    )
    c = str(config)
    sock = tmp_path / "run" / "nsinitd.sock"
    daemon = _start_daemon(config)
    stuck = None
    try:
        await _wait_answering(config, daemon)
        stuck = await trio.open_unix_socket(str(sock))
        await stuck.send_all(b'{"id":1,"cmd":"events"}\n')  # and never read again
        latencies: list[float] = []
        flood: dict[str, Any] = {}

        async def run_flood() -> None:
            await trio.sleep(0.2)
            proc = await trio.run_process([sys.executable, "-c", _fake._FLOOD, str(sock)], capture_stdout=True)
            flood.update(json.loads(proc.stdout.splitlines()[-1]))

        async def probe() -> None:
            latencies.extend(await _fake.probe_status(sock, 4.0))

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_flood)
                nursery.start_soon(probe)
        assert flood == {"answered": 100, "errors": 200}
        _fake.assert_fast(latencies, blocked=1.0)
        result = await run_real("-c", c, "status", "web")
        assert result.returncode == 0
        result = await run_real("-c", c, "shutdown", "--wait", "--timeout", "20", timeout=30)
        assert result.returncode == 0
        with trio.fail_after(20):
            while daemon.poll() is None:
                await trio.sleep(0.05)
        assert daemon.returncode == 0
    finally:
        if stuck is not None:
            await stuck.aclose()
        _stop_daemon(daemon)
