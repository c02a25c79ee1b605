"""The event log on a full disk, through a real nsinitd (issue 8, "Faults").

tests/supervisor/test_events.py shows the event bus's part with /dev/full in place of the log's
descriptor. Here the disk is real: the event log lives on a small tmpfs that the test fills up
while nsinitd runs, then empties again.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.conftest import CTL, Daemon, LineReader

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "disk"
    d.mkdir()
    if _libc.mount(b"tmpfs", str(d).encode(), b"tmpfs", 0, b"size=1m,mode=0755") != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount tmpfs on {d}: {os.strerror(e)}")
    try:
        yield d
    finally:
        _libc.umount2(str(d).encode(), MNT_DETACH)


def _fill(disk: Path) -> Path:
    """Write until the disk takes not one byte more."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_full_disk_event_log_supervision_goes_on(small_disk: Path, nsinitd: Callable[..., Daemon],
                                                 line_reader: Callable[[list[str]], LineReader]) -> None:
    log = small_disk / "events.jsonl"
    d = nsinitd("""
        [programs.steady]
        command = ["sleep", "100000"]
        startsecs = 0
        [programs.churn]
        command = ["sh", "-c", "exit 1"]
        startsecs = 1
        startretries = 100000
        backoff = { initial = 0.05, factor = 1.0, max = 0.05 }
    """, supervisor=f'event_log = "{log}"')
    d.wait_answering()
    follower = line_reader([*CTL, "-s", str(d.socket), "events", "-f"])
    steady = d.wait_for("program.running", "steady")["pid"]
    d.wait_for("program.backoff", "churn", count=3)

    filler = _fill(small_disk)
    while "write failed: ENOSPC" not in d.err_path.read_text():  # bounded by the wait_for below
        d.wait_for("program.backoff", "churn", count=len(d.find("program.backoff", "churn")) + 1)
    full_from = len(log.read_text().splitlines())  # events from here on found no room
    # supervision went on: churn kept restarting, steady kept running, status answers
    n_before = len(d.find("program.starting", "churn"))
    d.wait_for("program.starting", "churn", count=n_before + 5)
    states = d.states()
    assert states["steady"]["state"] == "RUNNING" and states["steady"]["pid"] == steady
    assert len(log.read_text().splitlines()) == full_from < len(d.events()) - 10
    assert d.err_path.read_text().count("write failed") == 1  # once, not once per event

    filler.unlink()
    n_before = len(d.find("program.starting", "churn"))
    d.wait_for("program.starting", "churn", count=n_before + 3)
    end = time.monotonic() + 5
    while "writing again" not in d.err_path.read_text():
        assert time.monotonic() < end, d.err_path.read_text()
        time.sleep(0.05)
    assert d.terminate() == 0
    events = d.events()
    written = [json.loads(x) for x in log.read_text().splitlines()]
    assert written == events  # every event, in order, none torn, none twice
    rc, err = follower.finish()
    assert rc == 0, err
    got = [json.loads(line) for _, line in follower.lines]
    first = events.index(got[0])
    assert got == events[first : first + len(got)] and first < full_from  # the live stream lost nothing
    assert len(got) > len(events) - full_from
