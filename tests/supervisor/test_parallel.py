"""Many programs stopped, started and restarted at once: each priority group together, the groups
in order (stop: descending priority, start: ascending), each program bounded by its own
stopwaitsecs, with the answers and events one program's stop/start/restart gives."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from typing import Any as ConfigWriter

import pytest
import trio

from supervisor.api import ControlError, ProgramStatus
from supervisor.server import CALLS


class Fifo:
    """A FIFO the test holds open for reading and writing: programs open it without blocking,
    the test reads their lines as they come (a wait on the descriptor) or writes lines to them."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buf = b""

    async def lines(self, count: int, timeout: float = 15) -> list[str]:
        """The next count lines written into the FIFO."""
        with trio.fail_after(timeout):
            while self._buf.count(b"\n") < count:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    self._buf += os.read(self.fd, 4096)
                except BlockingIOError:
                    pass
        *got, self._buf = self._buf.split(b"\n", count)
        return [line.decode() for line in got]

    def unread(self) -> bytes:
        """What was written and not read yet (nothing blocks)."""
        try:
            self._buf += os.read(self.fd, 4096)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
        return self._buf

    def write_lines(self, count: int) -> None:
        os.write(self.fd, b"go\n" * count)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def fifos(tmp_path: Path) -> Iterator[tuple[Fifo, Fifo]]:
    """report: where programs say they are up and that they got TERM; gate: one line lets one of
    them exit."""
    report, gate = Fifo(tmp_path / "report"), Fifo(tmp_path / "gate")
    yield report, gate
    report.close()
    gate.close()


def trapping(name: str, priority: int, report: Path, gate: Path, stopwaitsecs: float = 30) -> str:
    """A program that says it is up, and on TERM says so and waits for a line on the gate."""
    script = (f"trap 'echo term:{name} > {report}; read x < {gate}; kill $!; exit 0' TERM; "
              f"sleep 300 & echo up:{name} > {report}; wait")
    return f"""
        [programs.{name}]
        command = ["sh", "-c", "{script}"]
        priority = {priority}
        startsecs = 0
        stopwaitsecs = {stopwaitsecs}
        autostart = false
    """


def sequence(watcher: Any, program: str, start: int) -> list[str]:
    return [e["event"] for e in watcher.events[start:] if e.get("program") == program]


async def test_a_priority_group_is_signalled_together_and_the_next_waits_until_it_is_down(
        cfg: ConfigWriter, run_daemon, fifos: tuple[Fifo, Fifo]) -> None:  # type: ignore[no-untyped-def]
    report, gate = fifos
    r = await run_daemon(cfg.load("".join([
        trapping("db", 1, report.path, gate.path),
        trapping("web1", 2, report.path, gate.path),
        trapping("web2", 2, report.path, gate.path),
        trapping("web3", 2, report.path, gate.path),
    ])))
    names = ["db", "web1", "web2", "web3"]
    await r.daemon.start_many(names)
    assert sorted(await report.lines(4)) == ["up:db", "up:web1", "up:web2", "up:web3"]
    mark = len(r.watcher.events)
    async with trio.open_nursery() as n:
        answers: list[ProgramStatus | ControlError] = []

        async def stop() -> None:
            answers.extend(await r.daemon.stop_many(names))

        n.start_soon(stop)
        # every program of priority 2 has its TERM while none of them can exit (the gate is shut):
        # one after another, the second would never be signalled
        assert sorted(await report.lines(3)) == ["term:web1", "term:web2", "term:web3"]
        assert r.watcher.find("program.exited", start=mark) == []
        assert r.watcher.find("program.stopping", "db", start=mark) == []
        gate.write_lines(3)
        assert await report.lines(1) == ["term:db"]  # the lower priority only once they are down
        gate.write_lines(1)
    stopped = [(e["event"], e["program"]) for e in r.watcher.find("program.stopped", start=mark)]
    assert sorted(stopped[:3]) == [("program.stopped", "web1"), ("program.stopped", "web2"),
                                   ("program.stopped", "web3")]
    assert stopped[3] == ("program.stopped", "db")
    db_stopping = r.watcher.events.index(r.watcher.find("program.stopping", "db", start=mark)[0])
    assert all(r.watcher.events.index(e) < db_stopping for e in r.watcher.find("program.stopped", start=mark)[:3])
    assert [(a.name, a.state) for a in answers if isinstance(a, ProgramStatus)] == [
        ("db", "STOPPED"), ("web1", "STOPPED"), ("web2", "STOPPED"), ("web3", "STOPPED")]
    assert report.unread() == b""


async def test_a_program_ignoring_term_is_killed_at_its_own_stopwaitsecs_while_the_others_finish(
        cfg: ConfigWriter, run_daemon, fifos: tuple[Fifo, Fifo]) -> None:  # type: ignore[no-untyped-def]
    report, gate = fifos
    r = await run_daemon(cfg.load("".join([
        trapping("a", 1, report.path, gate.path),
        trapping("b", 1, report.path, gate.path),
        f"""
        [programs.stubborn]
        command = ["sh", "-c", "trap '' TERM; sleep 300 & echo up:stubborn > {report.path}; wait"]
        priority = 1
        startsecs = 0
        stopwaitsecs = 0.3
        autostart = false
        """,
    ])))
    await r.daemon.start_many(["a", "b", "stubborn"])
    assert sorted(await report.lines(3)) == ["up:a", "up:b", "up:stubborn"]
    mark = len(r.watcher.events)
    async with trio.open_nursery() as n:
        answers: list[ProgramStatus | ControlError] = []

        async def stop() -> None:
            answers.extend(await r.daemon.stop_many(["a", "b", "stubborn"]))

        n.start_soon(stop)
        assert sorted(await report.lines(2)) == ["term:a", "term:b"]
        # a and b wait at the gate, with 30 s to go: stubborn is killed at its own 0.3 s meanwhile
        await r.watcher.wait("program.stopped", "stubborn", start=mark)
        assert r.watcher.find("program.exited", "stubborn", start=mark)[0]["signal"] == "SIGKILL"
        assert r.watcher.find("program.exited", "a", start=mark) == []
        assert r.watcher.find("program.exited", "b", start=mark) == []
        gate.write_lines(2)
    for name in ("a", "b"):
        exited = r.watcher.find("program.exited", name, start=mark)
        assert [(e["exit_code"], e["signal"]) for e in exited] == [(0, None)]
        assert r.watcher.find("program.killing", name, start=mark) == []
    assert [(a.name, a.state) for a in answers if isinstance(a, ProgramStatus)] == [
        ("a", "STOPPED"), ("b", "STOPPED"), ("stubborn", "STOPPED")]


PLAIN = """
    [programs.{name}]
    command = ["sleep", "300"]
    priority = {priority}
    startsecs = 0
    stopwaitsecs = 5
"""


async def test_restart_many_gives_the_answers_and_events_of_one_restart_each(
        cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load("".join(PLAIN.format(name=n, priority=p)
                                          for n, p in [("a", 1), ("b", 2), ("c", 2), ("d", 3)])))
    mark = len(r.watcher.events)
    one = await r.daemon.restart("a")
    one_events = sequence(r.watcher, "a", mark)
    old_pids = {s.name: s.pid for s in r.daemon.status()}

    mark = len(r.watcher.events)
    answers = await r.daemon.restart_many(["d", "a", "c", "b"])
    assert [a.name for a in answers if isinstance(a, ProgramStatus)] == ["d", "a", "c", "b"]
    for a in answers:
        assert isinstance(a, ProgramStatus)
        assert (a.state, a.restarts) == (one.state, one.restarts) == ("RUNNING", 0)
        assert a.pid is not None and a.pid != old_pids[a.name]
        assert sequence(r.watcher, a.name, mark) == one_events == [
            "program.stopping", "program.exited", "program.stopped", "program.starting", "program.running"]
    # stops in descending priority, every one before any start; starts in ascending priority
    order = [(e["event"], e["program"]) for e in r.watcher.events[mark:]
             if e["event"] in ("program.stopped", "program.starting", "program.running")]
    stops, starts = order[:4], order[4:]
    assert stops[0] == ("program.stopped", "d") and stops[3] == ("program.stopped", "a")
    assert sorted(stops[1:3]) == [("program.stopped", "b"), ("program.stopped", "c")]
    assert starts[:2] == [("program.starting", "a"), ("program.running", "a")]
    assert sorted(starts[2:6]) == [("program.running", "b"), ("program.running", "c"),
                                   ("program.starting", "b"), ("program.starting", "c")]
    assert starts[6:] == [("program.starting", "d"), ("program.running", "d")]


async def test_the_control_socket_answers_each_name_in_order_with_the_one_program_refusals(
        cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    r = await run_daemon(cfg.load(PLAIN.format(name="up", priority=1) + """
        [programs.down]
        command = ["sleep", "300"]
        autostart = false
    """))
    started = await CALLS["start_many"](r.daemon, {"names": ["ghost", "down", "up", "down"]})
    assert [(s["name"], s.get("state"), s.get("error")) for s in started] == [
        ("ghost", None, {"code": "no_such_program", "message": "no such program: ghost"}),
        ("down", "RUNNING", None),
        ("up", None, {"code": "bad_state", "message": "already started"}),
    ]
    restarted = await CALLS["restart_many"](r.daemon, {"names": ["up", "ghost"]})
    assert [(s["name"], s.get("state")) for s in restarted] == [("up", "RUNNING"), ("ghost", None)]
    stopped = await CALLS["stop_many"](r.daemon, {"names": ["up", "down"]})
    assert [(s["name"], s["state"]) for s in stopped] == [("up", "STOPPED"), ("down", "STOPPED")]
    again = await CALLS["stop_many"](r.daemon, {"names": ["up"]})
    assert again == [{"name": "up", "error": {"code": "bad_state", "message": "not running"}}]
    r.daemon.request_shutdown("test")
    refused = await r.daemon.restart_many(["up", "ghost"])
    assert [(type(e).__name__, getattr(e, "code", None)) for e in refused] == [
        ("ControlError", "bad_state"), ("ControlError", "no_such_program")]


async def test_the_shutdown_signals_a_priority_group_together_and_the_next_once_it_is_down(
        cfg: ConfigWriter, run_daemon, fifos: tuple[Fifo, Fifo]) -> None:  # type: ignore[no-untyped-def]
    report, gate = fifos
    r = await run_daemon(cfg.load("".join(trapping(n, p, report.path, gate.path)
                                          for n, p in [("db", 1), ("web1", 2), ("web2", 2)])))
    await r.daemon.start_many(["db", "web1", "web2"])
    assert sorted(await report.lines(3)) == ["up:db", "up:web1", "up:web2"]
    r.daemon.request_shutdown("test")
    assert sorted(await report.lines(2)) == ["term:web1", "term:web2"]
    assert r.watcher.find("program.exited") == [] and r.watcher.find("program.stopping", "db") == []
    gate.write_lines(2)
    assert await report.lines(1) == ["term:db"]
    assert [e["program"] for e in r.watcher.find("program.stopped")] in (["web1", "web2"], ["web2", "web1"])
    gate.write_lines(1)
    with trio.fail_after(15):
        await r.daemon.done.wait()
    assert [e["program"] for e in r.watcher.find("program.stopped")][2:] == ["db"]


async def test_a_reload_stops_the_removed_programs_of_a_priority_together(
        cfg: ConfigWriter, run_daemon, fifos: tuple[Fifo, Fifo]) -> None:  # type: ignore[no-untyped-def]
    report, gate = fifos
    both = "".join(trapping(n, 1, report.path, gate.path) for n in ("a", "b"))
    r = await run_daemon(cfg.load(both + PLAIN.format(name="kept", priority=1)))
    await r.daemon.start_many(["a", "b"])
    assert sorted(await report.lines(2)) == ["up:a", "up:b"]
    cfg.write(PLAIN.format(name="kept", priority=1))
    async with trio.open_nursery() as n:
        changes: list[dict[str, list[str]]] = []

        async def reload() -> None:
            changes.append(await r.daemon.reload())

        n.start_soon(reload)
        assert sorted(await report.lines(2)) == ["term:a", "term:b"]  # both, before either is gone
        gate.write_lines(2)
    assert changes == [{"added": [], "removed": ["a", "b"], "changed": []}]
    assert sorted(r.daemon.programs) == ["kept"]
    assert sorted(e["program"] for e in r.watcher.find("program.stopped")) == ["a", "b"]
