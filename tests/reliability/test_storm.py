"""A restart storm through a real nsinitd (issue 8, "Load"): 50 programs crash-looping at once.

tests/supervisor/test_daemon_storm.py already shows that the event loop of an in-process daemon
stays responsive in a storm; this test checks what a user sees from outside: ``status`` through
the real control socket, ``nsinitctl events -f`` as a subprocess (it keeps receiving and loses
nothing), and the spacing of the restarts against the configured backoff.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability.conftest import CTL, Daemon, LineReader

N = 50
INITIAL, FACTOR, MAX = 0.2, 2.0, 1.0
STORM_SECONDS = 6.0
EARLY = 0.005  # s: a restart may not come sooner than its delay by more than timestamp rounding
LATE = 0.5  # s: nor later than this past it, with 50 programs on 2 cores
STATUS_MEDIAN, STATUS_MAX = 0.100, 0.250


def _ts(e: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(e["ts"]).timestamp()


def _expected_delay(attempt: int) -> float:
    return min(INITIAL * FACTOR ** (attempt - 1), MAX)


@pytest.mark.slow
def test_restart_storm_socket_stream_and_backoff(nsinitd: Callable[..., Daemon],
                                                 line_reader: Callable[[list[str]], LineReader]) -> None:
    names = [f"crash{i:02d}" for i in range(N)]
    d = nsinitd("".join(f"""
[programs.{name}]
command = ["sh", "-c", "exit 1"]
startsecs = 1
startretries = 100000
backoff = {{ initial = {INITIAL}, factor = {FACTOR}, max = {MAX} }}
""" for name in names))
    d.wait_answering()
    follower = line_reader([*CTL, "-s", str(d.socket), "events", "-f"])
    lat = []
    t_end = time.monotonic() + STORM_SECONDS
    while time.monotonic() < t_end:
        result, took = d.call("status")
        lat.append(took)
        # STOPPED: not yet started (the 50 start one after another as the storm begins)
        assert {s["state"] for s in result} <= {"STOPPED", "STARTING", "BACKOFF"}, result
        time.sleep(0.05)
    assert d.terminate() == 0
    rc, err = follower.finish()
    events = d.events()
    assert events[-1]["event"] == "supervisor.stopped"

    starts = [e for e in events if e["event"] == "program.starting"]
    print(f"\nstorm: {len(starts)} starts in {STORM_SECONDS} s; status median "
          f"{statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms; "
          f"events -f got {len(follower.lines)} lines")
    assert len(starts) >= N * 4  # a storm: on average every program went round at least 4 times
    assert statistics.median(lat) < STATUS_MEDIAN and max(lat) < STATUS_MAX, sorted(lat)

    # the live stream: a contiguous run of what nsinitd wrote, nothing dropped, up to the shutdown
    assert rc == 0, err
    got = [json.loads(line) for _, line in follower.lines]
    assert got and not [e for e in got if e["event"] == "subscriber.dropped"]
    first = events.index(got[0])
    assert got == events[first : first + len(got)]
    assert "supervisor.stopping" in [e["event"] for e in got]
    during = [t for (t, _), e in zip(follower.lines, got, strict=True) if e["event"] != "supervisor.stopping"]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert max(gaps) < MAX + LATE, max(gaps)  # it kept receiving all along

    # backoff: delays as configured, and each restart no sooner (and not much later) than its delay
    for name in names:
        mine = [e for e in events if e.get("program") == name
                and e["event"] in ("program.starting", "program.backoff")]
        backoffs = [e for e in mine if e["event"] == "program.backoff"]
        assert len(backoffs) >= 3, (name, mine)
        assert [b["delay"] for b in backoffs] == [_expected_delay(b["attempt"]) for b in backoffs]
        assert [b["attempt"] for b in backoffs] == list(range(1, len(backoffs) + 1))
        for prev, nxt in itertools.pairwise(mine):
            if prev["event"] == "program.backoff" and nxt["event"] == "program.starting":
                waited = _ts(nxt) - _ts(prev)
                assert prev["delay"] - EARLY <= waited <= prev["delay"] + LATE, (name, prev, nxt, waited)
        starting = [_ts(e) for e in mine if e["event"] == "program.starting"]
        for k, (a, b) in enumerate(itertools.pairwise(starting), start=1):
            assert b - a >= _expected_delay(k) - EARLY, (name, k, b - a)
