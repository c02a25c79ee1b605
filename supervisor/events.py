"""Lifecycle events: frozen values, turned into JSON lines in one place, fanned out.

An :class:`Event` is a value (name, program, facts, time). :func:`render` is the one place that
turns it into a JSON object, through structlog: ``{"ts": "...Z", "event": ..., "program": ...,
facts...}`` with ``ts`` in RFC 3339, UTC, microseconds. :class:`EventBus` sends each line to

* a text stream (nsinitd's stdout): the same JSON lines, or with ``--log-format text`` one
  readable line per event (:func:`render_text`),
* the event log file (appended; a failing write, e.g. a full disk, is reported on stderr once per
  failure streak, kept in a bounded backlog and retried on the next event or tick; supervision and
  the live stream carry on meanwhile),
* every subscriber's trio memory channel: bounded; a subscriber that falls ``max_buffer`` behind
  gets a final ``subscriber.dropped`` notice and its channel is closed. Emitting never blocks.

``supervisor.stopped`` is always the last event: the bus closes after it.

:data:`SCHEMA` lists each event's facts and their types; :func:`validate` checks one object
against it (the test-suite checks every line nsinitd writes).
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import json
import os
import queue
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog
import trio

# -- schema ---------------------------------------------------------------------------------------

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_LIST = (list,)
_DICT = (dict,)
_NONE = (type(None),)

#: event name -> {fact: accepted JSON types}. Every event also has ts and event; program-scoped
#: events have program. Extra facts are allowed (forward compatible), missing ones are not.
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "supervisor.started": {"pid": _INT, "config": _STR, "version": _STR},
    "supervisor.stopping": {"reason": _STR},
    "supervisor.stopped": {"exit_code": _INT},
    "program.starting": {"attempt": _INT},
    "program.running": {"pid": _INT},
    "program.adopted": {"pid": _INT, "started": _NUM},
    "program.not_adopted": {"pid": _INT, "reason": _STR},
    "program.backoff": {"attempt": _INT, "delay": _NUM},
    "program.exited": {
        "pid": _INT,
        "exit_code": _INT,
        "signal": _STR + _NONE,
        "expected": _BOOL,
        "oom_killed": _BOOL + _NONE,
    },
    "program.fatal": {"reason": _STR},
    "program.stopping": {"pid": _INT + _NONE, "signal": _STR},
    "program.stopped": {},
    "program.killing": {"pid": _INT + _NONE},
    "program.stuck": {"pid": _INT, "state": _STR, "reason": _STR},
    "program.teardown_failed": {"pid": _INT, "error": _STR},
    "container.created": {"host_pid": _INT, "namespaces": _LIST, "container": _STR},
    "container.destroyed": {"released": _DICT},
    "container.reclaimed": {"host_pid": _INT, "action": _STR, "reason": _STR},
    "config.reloaded": {"added": _LIST, "removed": _LIST, "changed": _LIST},
    "config.error": {"error": _STR},
    "subscriber.dropped": {"reason": _STR},
    "control.refused": {},
    "web.started": {"listen": _STR},
    "web.refused": {"method": _STR, "path": _STR, "reason": _STR},
    "stranger.reaped": {"pid": _INT, "exit_code": _INT},
}
PROGRAM_EVENTS = frozenset(n for n in SCHEMA if n.startswith(("program.", "container.")))


class SchemaError(ValueError):
    pass


def validate(obj: Mapping[str, Any]) -> None:
    """Raise SchemaError unless ``obj`` is a well-formed event object."""
    ts = obj.get("ts")
    if not isinstance(ts, str):
        raise SchemaError(f"ts missing or not a string: {obj!r}")
    try:
        parsed = _dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise SchemaError(f"ts not RFC 3339 UTC with microseconds: {ts!r}") from None
    if len(ts.split(".")[1]) != 7 or parsed.year < 2000:
        raise SchemaError(f"ts must have 6 fractional digits: {ts!r}")
    name = obj.get("event")
    if not isinstance(name, str) or (name not in SCHEMA and not name.startswith(("control.", "web."))):
        raise SchemaError(f"unknown event {name!r}")
    if name in PROGRAM_EVENTS and not isinstance(obj.get("program"), str):
        raise SchemaError(f"{name}: program missing")
    for key, types in SCHEMA.get(name, {}).items():
        if key not in obj:
            raise SchemaError(f"{name}: {key} missing in {obj!r}")
        v = obj[key]
        if isinstance(v, bool) and bool not in types:
            raise SchemaError(f"{name}: {key} has wrong type: {v!r}")
        if not isinstance(v, types):
            raise SchemaError(f"{name}: {key} has wrong type: {v!r}")


# -- values and rendering -------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    name: str
    program: str | None = None
    facts: tuple[tuple[str, Any], ...] = ()
    ts: float = field(default_factory=time.time)

    @classmethod
    def make(cls, name: str, program: str | None = None, **facts: Any) -> Event:
        return cls(name, program, tuple(facts.items()))


def format_ts(ts: float) -> str:
    # isoformat() drops the fraction when it is zero: format by hand so it never does.
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Capture:
    """A structlog "logger" that hands the rendered line back instead of printing it."""

    def msg(self, line: str) -> str:
        return line


def _order(logger: Any, method: str, ed: MutableMapping[str, Any]) -> dict[str, Any]:
    head = {"ts": ed.pop("ts"), "event": ed.pop("event")}
    if "program" in ed:
        head["program"] = ed.pop("program")
    head.update(ed)
    return head


_logger = structlog.wrap_logger(
    _Capture(),
    processors=[_order, structlog.processors.JSONRenderer(default=str)],
    wrapper_class=structlog.BoundLogger,
    cache_logger_on_first_use=True,
)


def to_dict(ev: Event) -> dict[str, Any]:
    d: dict[str, Any] = {"ts": format_ts(ev.ts), "event": ev.name}
    if ev.program is not None:
        d["program"] = ev.program
    d.update(ev.facts)
    return d


def render(ev: Event) -> str:
    """The one place an event becomes a JSON line (no trailing newline)."""
    d = to_dict(ev)
    name = d.pop("event")
    line: str = _logger.msg(name, **d)
    return line


def _text_value(v: Any) -> str:
    if isinstance(v, str):
        return v if v and all(ch.isprintable() and not ch.isspace() and ch not in '"=' for ch in v) else json.dumps(v)
    if isinstance(v, list):
        return ",".join(_text_value(x) for x in v) or "-"
    return json.dumps(v, default=str, separators=(",", ":"))


def _released_text(released: Mapping[str, Any]) -> dict[str, Any]:
    """What a teardown released, without the noise: one cgroup path per hierarchy (each under its
    own mount point, ~9 of them) says one fact, the container's cgroup, and how many there were."""
    out: dict[str, Any] = {}
    cgroups = [Path(p).parts for p in released.get("cgroups") or []]
    if cgroups:
        common: list[str] = []
        for part in zip(*(reversed(c) for c in cgroups), strict=False):
            if len(set(part)) != 1:
                break
            common.insert(0, part[0])
        name = "/".join(common) if common else ",".join("/".join(c) for c in cgroups)
        out["cgroup"] = f"{name} ({len(cgroups)} hierarchies)" if len(cgroups) > 1 else name
    if released.get("links"):
        out["links"] = released["links"]
    if released.get("files"):
        out["files"] = [Path(f).name for f in released["files"]]
    for k, v in released.items():
        if k not in ("cgroups", "links", "files"):
            out[k] = v  # error, and whatever else a runtime reports: facts, kept whole
    return out


def render_text(ev: Event) -> str:
    """One readable line for a terminal: local time, event, program, then the facts as key=value
    (unknown ones skipped, strings quoted only when they must be). Not for machines: the JSON
    line (:func:`render`) is the format with a schema."""
    when = _dt.datetime.fromtimestamp(ev.ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    facts = dict(ev.facts)
    if ev.name == "container.destroyed" and isinstance(facts.get("released"), dict):
        facts = {**{k: v for k, v in facts.items() if k != "released"}, **_released_text(facts["released"])}
    details = " ".join(f"{k}={_text_value(v)}" for k, v in facts.items() if v is not None)
    return f"{when}  {ev.name:<20} {ev.program or '-':<12} {details}".rstrip()


# -- the bus --------------------------------------------------------------------------------------


class _EventLog:
    """Appends lines to a file; never raises, never blocks supervision on a failing disk."""

    MAX_BACKLOG = 100_000  # lines kept while the disk refuses writes

    def __init__(self, path: Path, stderr: TextIO) -> None:
        self.path = path
        self.stderr = stderr
        self.fd: int | None = None
        self.backlog: deque[bytes] = deque()
        self.dropped = 0
        self.failing = False

    def _open(self) -> int:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return self.fd

    def reopen(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        self.flush()

    def write(self, line: str) -> None:
        self.backlog.append(line.encode() + b"\n")
        while len(self.backlog) > self.MAX_BACKLOG:
            self.backlog.popleft()
            self.dropped += 1
        self.flush()

    def flush(self) -> None:
        try:
            fd = self._open()
            while self.backlog:
                chunk = b"".join(list(self.backlog)[:256])
                n = os.write(fd, chunk)
                # drop what was fully written; a partial line stays at the head of the backlog
                while n > 0 and self.backlog:
                    head = self.backlog[0]
                    if n >= len(head):
                        n -= len(head)
                        self.backlog.popleft()
                    else:
                        self.backlog[0] = head[n:]
                        n = 0
        except OSError as e:
            if not self.failing:
                self.failing = True
                name = errno.errorcode.get(e.errno or 0, str(e.errno))
                self._warn(f"event log {self.path}: write failed: {name} ({e.strerror}); "
                           f"keeping events and retrying")
            return
        if self.failing:
            self.failing = False
            extra = f", {self.dropped} events lost (backlog full)" if self.dropped else ""
            self._warn(f"event log {self.path}: writing again{extra}")
            self.dropped = 0

    def _warn(self, msg: str) -> None:
        try:
            print(f"nsinitd: {msg}", file=self.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class _StreamSink:
    """Writes lines to a text stream (nsinitd's stdout).

    A pipe or socket may stop being read (``nsinitd | less``, paused): then the lines go through
    a bounded queue to a writer thread, so a stuck reader never blocks supervision; lines that
    don't fit are counted and reported on stderr. Other streams (files, terminals, StringIO in
    tests) are written directly.
    """

    MAX_QUEUED = 10_000

    def __init__(self, stream: TextIO, stderr: TextIO) -> None:
        self.stream = stream
        self.stderr = stderr
        self.queue: queue.Queue[str | None] | None = None
        self.thread: threading.Thread | None = None
        self.dropped = 0
        try:
            mode = os.fstat(stream.fileno()).st_mode
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            self.queue = queue.Queue(self.MAX_QUEUED)
            self.thread = threading.Thread(target=self._run, name="nsinitd-stdout", daemon=True)
            self.thread.start()

    def write(self, line: str) -> None:
        if self.queue is None:
            self._write(line)
            return
        try:
            self.queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        assert self.queue is not None
        while (line := self.queue.get()) is not None:
            self._write(line)
            if self.dropped and self.queue.empty():
                n, self.dropped = self.dropped, 0
                try:
                    print(f"nsinitd: stdout was not read: {n} events not written there "
                          f"(the event log and live subscribers have them)", file=self.stderr, flush=True)
                except (OSError, ValueError):
                    pass

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded by timeout: a reader that never comes back is let go)."""
        if self.queue is not None and self.thread is not None:
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self.thread.join(timeout)
            self.queue = None


#: What a subscriber reads: each event as the JSON object of the event log, until it is dropped.
Subscription = trio.MemoryReceiveChannel[dict[str, Any]]


class _Subscriber:
    def __init__(self, max_buffer: int) -> None:
        self.max_buffer = max(1, max_buffer)
        # one slot more than max_buffer: room for the final subscriber.dropped notice
        self.send, self.recv = trio.open_memory_channel[dict[str, Any]](self.max_buffer + 1)


class EventBus:
    """Fan-out of events to a stream, an event log and subscribers. Call from the trio thread."""

    def __init__(self, stream: TextIO | None = None, event_log: Path | None = None,
                 stderr: TextIO | None = None, stream_format: str = "json") -> None:
        self.stderr = stderr or sys.stderr
        #: "json" or "text" (render_text) for the stream; the event log is always JSON
        self.stream_format = stream_format
        self.stream = _StreamSink(stream, self.stderr) if stream is not None else None
        self.log = _EventLog(event_log, self.stderr) if event_log else None
        self.subscribers: list[_Subscriber] = []
        self.closed = False
        #: synchronous observers, called in order with each event object (must not block)
        self.taps: list[Callable[[dict[str, Any]], None]] = []

    def emit(self, name: str, program: str | None = None, **facts: Any) -> None:
        self.publish(Event.make(name, program, **facts))

    def publish(self, ev: Event) -> None:
        if self.closed:
            return
        line = render(ev)
        obj = json.loads(line)
        if self.stream is not None:
            self.stream.write(render_text(ev) if self.stream_format == "text" else line)
        if self.log is not None:
            self.log.write(line)
        for tap in self.taps:
            tap(obj)
        for sub in list(self.subscribers):
            self._deliver(sub, obj)
        if ev.name == "supervisor.stopped":
            self.close()

    def _deliver(self, sub: _Subscriber, obj: dict[str, Any]) -> None:
        try:
            if sub.send.statistics().current_buffer_used >= sub.max_buffer:
                reason = f"fell {sub.max_buffer} events behind"
                notice = to_dict(Event.make("subscriber.dropped", reason=reason))
                sub.send.send_nowait(notice)
                self._drop(sub)
                return
            sub.send.send_nowait(obj)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._drop(sub)

    def _drop(self, sub: _Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        sub.send.close()

    def busiest(self) -> float:
        """How full the fullest subscriber's buffer is (0..1): producers of bursts pace on it."""
        return max((sub.send.statistics().current_buffer_used / sub.max_buffer for sub in self.subscribers),
                   default=0.0)

    def subscribe(self, max_buffer: int = 1000) -> Subscription:
        sub = _Subscriber(max_buffer)
        if self.closed:
            sub.send.close()
        else:
            self.subscribers.append(sub)
        return sub.recv

    def retry(self) -> None:
        """Retry a failing event log (called on a tick)."""
        if self.log is not None and self.log.backlog:
            self.log.flush()

    def reopen(self) -> None:
        if self.log is not None:
            self.log.reopen()

    def close(self) -> None:
        self.closed = True
        for sub in list(self.subscribers):
            self._drop(sub)
        if self.log is not None:
            self.log.close()
        if self.stream is not None:
            self.stream.close()
