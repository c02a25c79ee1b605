"""Reading what nsinitd appends to files, once or following it: the JSON-lines event log, and
programs' captured output (``logs``); and choosing events by program, name and time.

:class:`Follower` is ``tail -F`` for one path: it survives rotation (a new inode at the path) and
truncation, waits for a file that doesn't exist yet, and sleeps on inotify rather than a clock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from supervisor.ctl.errors import USAGE, CtlError


def tail_bytes(f: IO[bytes], lines: int) -> bytes:
    """The last ``lines`` lines of a file, reading backwards in blocks."""
    if lines <= 0:
        f.seek(0, os.SEEK_END)
        return b""
    end = f.seek(0, os.SEEK_END)
    pos, data = end, b""
    while pos > 0 and data.count(b"\n") <= lines:
        step = min(pos, 64 * 1024)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
    f.seek(end)
    keep = data.splitlines(keepends=True)[-lines:]
    return b"".join(keep)


class Follower:
    """``tail -F`` for one path: reads what is appended, reopens when the file is rotated
    (replaced by a new inode) or truncated, and waits for a file that doesn't exist yet.

    :meth:`wait` sleeps until the kernel says something changed in the file's directory (inotify
    on the directory reports writes to the files in it, and renames and creations: appends,
    truncation and rotation alike). The watch is made before the first read, so a write between
    a read that found nothing and the wait still wakes it."""

    # inotify sees every local write; the re-check covers what it can't see (a network
    # filesystem written from another machine), or a watch that couldn't be made
    RECHECK = 2.0
    POLL = 0.2  # without inotify at all

    def __init__(self, path: Path, f: IO[bytes] | None) -> None:
        self.path = path
        self.f = f
        self._inotify: int | None = None
        try:
            from nsruntime import libc  # only a follower pays for it

            fd = libc.inotify_init1()
            try:
                mask = libc.IN_MODIFY | libc.IN_ATTRIB | libc.IN_CREATE | libc.IN_MOVED_TO | libc.IN_MOVED_FROM
                libc.inotify_add_watch(fd, os.fspath(path.parent), mask | libc.IN_DELETE)
            except OSError:
                os.close(fd)
                raise
            self._inotify = fd
        except OSError:
            pass

    @property
    def inotify_fd(self) -> int | None:
        """The inotify descriptor :meth:`wait` sleeps on (None without inotify), for a caller that
        waits on it in its own event loop and then calls :meth:`drain`."""
        return self._inotify

    def drain(self) -> None:
        """Consume what the inotify descriptor reported (it then sleeps until the next change)."""
        if self._inotify is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._inotify, 64 * 1024):
                    pass

    def wait(self) -> None:
        """Until the file may have changed (bounded by RECHECK)."""
        if self._inotify is None:
            time.sleep(self.POLL)
            return
        import select

        poller = select.poll()
        poller.register(self._inotify, select.POLLIN)
        if poller.poll(self.RECHECK * 1000):
            self.drain()

    def _reopen(self) -> bool:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open across calls
        except OSError:
            return False
        if self.f is not None:
            self.f.close()
        self.f = f
        return True

    def read(self, limit: int = -1) -> bytes:
        """What was appended since the last read (at most ``limit`` bytes; all of it with -1)."""
        if self.f is None:
            return self.read_reopened(limit)
        data = self.f.read(limit)
        if data:
            return data
        try:
            st = os.stat(self.path)
        except OSError:
            return b""
        current = os.fstat(self.f.fileno())
        if (st.st_dev, st.st_ino) != (current.st_dev, current.st_ino):
            rest = self.f.read(limit)  # the old file's last words first
            if rest and limit >= 0:
                return rest  # the next read finds the rest, or the end and reopens
            return rest + self.read_reopened(limit)
        if st.st_size < self.f.tell():
            self.f.seek(0)  # truncated in place
            return self.f.read(limit)
        return b""

    def read_reopened(self, limit: int = -1) -> bytes:
        if not self._reopen():
            return b""
        assert self.f is not None
        return self.f.read(limit)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self._inotify is not None:
            os.close(self._inotify)
            self._inotify = None


def read_lines(path: Path, f: IO[bytes], *, follow: bool) -> Iterator[bytes]:
    """The lines of an open file, then, following, the lines appended to it (through rotation),
    without end. A last line still being written is held back until its newline when following,
    and given as it is when not."""
    pending = b""
    for raw in f:
        if raw.endswith(b"\n"):
            yield raw
        else:
            pending = raw  # a line still being written
    if not follow:
        yield pending
        return
    follower = Follower(path, f)
    try:
        while True:
            data = follower.read()
            if not data:
                follower.wait()
                continue
            *complete, pending = (pending + data).split(b"\n")
            yield from complete
    finally:
        follower.close()


# -- choosing events --------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """RFC 3339 (``2026-11-28T00:10:00Z``; without an offset, local time) or relative to now
    (``90s``, ``10m``, ``1h30m``, ``2d``). Returns a POSIX timestamp."""
    now = time.time() if now is None else now
    text = text.strip()
    if text and _RELATIVE.sub("", text) == "":
        return now - sum(float(n) * _UNITS[u] for n, u in _RELATIVE.findall(text))
    try:
        when = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise CtlError(USAGE, f"--since: expected RFC 3339 (2026-11-28T00:10:00Z) or 10m/2h/1d, got {text!r}") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def event_time(event: dict[str, Any]) -> float | None:
    ts = event.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return dt.datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class EventFilter:
    programs: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()
    since: float | None = None

    def __call__(self, event: dict[str, Any]) -> bool:
        if self.programs and event.get("program") not in self.programs:
            return False
        name = str(event.get("event", ""))
        if self.patterns and not any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            return False
        if self.since is not None:
            when = event_time(event)
            if when is None or when < self.since:
                return False
        return True
