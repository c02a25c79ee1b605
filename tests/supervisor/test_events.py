"""Event values, their one rendering, the schema, fan-out and a failing event log."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import trio

from supervisor.events import Event, EventBus, SchemaError, format_ts, render, to_dict, validate


def test_render_orders_keys_and_keeps_microseconds() -> None:
    ev = Event("program.exited", "web", (("pid", 7), ("exit_code", 137), ("signal", "SIGKILL"),
                                          ("expected", False), ("oom_killed", None)), ts=1_700_000_000.0)
    line = render(ev)
    assert line.startswith('{"ts": "2023-11-14T22:13:20.000000Z", "event": "program.exited", "program": "web"')
    obj = json.loads(line)
    assert obj == to_dict(ev)
    validate(obj)


def test_ts_is_rfc3339_utc_with_microseconds() -> None:
    assert format_ts(0.25) == "1970-01-01T00:00:00.250000Z"


@pytest.mark.parametrize(
    "obj",
    [
        {"event": "supervisor.stopping", "reason": "x"},
        {"ts": "2023-11-14T22:13:20Z", "event": "supervisor.stopping", "reason": "x"},
        {"ts": "2023-11-14T22:13:20.000000Z", "event": "no.such.event"},
        {"ts": "2023-11-14T22:13:20.000000Z", "event": "program.running", "pid": 3},
        {"ts": "2023-11-14T22:13:20.000000Z", "event": "program.running", "program": "a", "pid": "3"},
        {"ts": "2023-11-14T22:13:20.000000Z", "event": "program.exited", "program": "a", "pid": 3,
         "exit_code": 1, "signal": None, "expected": 0, "oom_killed": None},
        {"ts": "2023-11-14T22:13:20.000000Z", "event": "program.backoff", "program": "a", "attempt": 1},
    ],
)
def test_validate_rejects(obj: dict[str, object]) -> None:
    with pytest.raises(SchemaError):
        validate(obj)


async def test_subscribers_get_every_event_and_the_stream_too(tmp_path: Path) -> None:
    out = io.StringIO()
    bus = EventBus(out, tmp_path / "events.jsonl")
    rx = bus.subscribe(10)
    bus.emit("program.running", "a", pid=1)
    bus.emit("program.stopped", "a")
    got = [await rx.receive(), await rx.receive()]
    assert [g["event"] for g in got] == ["program.running", "program.stopped"]
    assert [json.loads(x) for x in out.getvalue().splitlines()] == got
    bus.close()
    assert [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()] == got


async def test_a_slow_subscriber_is_dropped_with_a_notice_and_never_blocks() -> None:
    bus = EventBus(None)
    slow = bus.subscribe(3)
    fast = bus.subscribe(1000)
    with trio.fail_after(1):
        for i in range(50):
            bus.emit("stranger.reaped", pid=i, exit_code=0)
    got = [e async for e in slow]
    assert [e["event"] for e in got] == ["stranger.reaped"] * 3 + ["subscriber.dropped"]
    validate(got[-1])
    assert len(bus.subscribers) == 1
    assert sum(1 for _ in iter(lambda: fast.receive_nowait() if fast.statistics().current_buffer_used else None,
                               None)) == 50


async def test_a_closed_subscriber_is_forgotten() -> None:
    bus = EventBus(None)
    rx = bus.subscribe(5)
    await rx.aclose()
    bus.emit("supervisor.stopping", reason="x")
    assert bus.subscribers == []


async def test_stopped_is_the_last_event() -> None:
    out = io.StringIO()
    bus = EventBus(out)
    rx = bus.subscribe(5)
    bus.emit("supervisor.stopped", exit_code=0)
    bus.emit("program.stopped", "late")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["supervisor.stopped"]
    assert [e["event"] async for e in rx] == ["supervisor.stopped"]


async def test_full_disk_is_reported_once_retried_and_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    err = io.StringIO()
    bus = EventBus(None, log, stderr=err)
    live = bus.subscribe(100)
    bus.emit("supervisor.stopping", reason="before")
    assert bus.log is not None and bus.log.fd is not None
    real_fd = bus.log.fd
    full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    bus.log.fd = full
    for i in range(5):
        bus.emit("stranger.reaped", pid=i, exit_code=0)
    assert err.getvalue().count("write failed: ENOSPC") == 1  # once per failure streak
    assert len([e async for e in _take(live, 6)]) == 6  # the live stream lost nothing
    bus.log.fd = real_fd  # space is back
    os.close(full)
    bus.retry()
    assert "writing again" in err.getvalue()
    bus.emit("supervisor.stopped", exit_code=0)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["supervisor.stopping"] + ["stranger.reaped"] * 5 + ["supervisor.stopped"]
    assert [x["pid"] for x in lines[1:6]] == list(range(5))


async def _take(rx: trio.MemoryReceiveChannel[dict[str, object]], n: int):  # type: ignore[no-untyped-def]
    for _ in range(n):
        yield await rx.receive()


async def test_reopen_follows_an_external_rotation(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    bus = EventBus(None, log)
    bus.emit("supervisor.stopping", reason="one")
    log.rename(tmp_path / "events.jsonl.1")
    bus.reopen()
    bus.emit("supervisor.stopped", exit_code=0)
    assert json.loads(log.read_text())["event"] == "supervisor.stopped"
    assert json.loads((tmp_path / "events.jsonl.1").read_text())["event"] == "supervisor.stopping"


async def test_a_stdout_pipe_nobody_reads_never_blocks() -> None:
    r, w = os.pipe()
    out = os.fdopen(w, "w")
    err = io.StringIO()
    bus = EventBus(out, stderr=err)
    with trio.fail_after(5):
        for i in range(30_000):  # far more than a pipe buffer and the queue hold
            bus.emit("stranger.reaped", pid=i, exit_code=0)
    reader = os.fdopen(r, "rb")
    got: list[bytes] = []

    async def read_all() -> None:
        got.append(await trio.to_thread.run_sync(reader.read))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(read_all)  # the reader comes back: the queue drains, the drops are reported
            await trio.sleep(0.1)
            bus.emit("supervisor.stopped", exit_code=0)  # closes the bus: waits for the queue
            out.close()
    lines = got[0].decode().splitlines()
    assert 1000 < len(lines) < 30_001
    assert json.loads(lines[-1])["event"] == "supervisor.stopped"
    assert [json.loads(x)["pid"] for x in lines[:100]] == list(range(100))  # in order, from the start
    assert "events not written there" in err.getvalue()
    reader.close()
