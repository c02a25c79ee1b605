"""What nsinitctl prints: the status table, events (JSON lines or a table), ``top``'s table, and the
``--json`` form of every answer. Functions of the daemon's answers; :class:`Output` holds the two
streams and :class:`EventPrinter` what it has printed so far (the table's header, malformed lines).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from supervisor.ctl.eventlog import EventFilter, event_time
from supervisor.ctl.table import describe as describe
from supervisor.ctl.table import format_duration as format_duration
from supervisor.ctl.table import status_lines as status_lines


@dataclass
class Output:
    out: IO[str]
    err: IO[str]
    json: bool

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def dump(self, value: Any) -> None:
        self.line(json.dumps(value, indent=None if isinstance(value, dict) and "event" in value else 2))

    def error(self, text: str) -> None:
        self.err.write(f"nsinitctl: {text}\n")
        self.err.flush()


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


# -- events --------------------------------------------------------------------------------

_PRETTY_SKIP = ("ts", "event", "program")


def pretty(event: dict[str, Any]) -> str:
    when = event_time(event)
    stamp = (
        dt.datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        if when is not None
        else str(event.get("ts", "-"))
    )
    details = " ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in event.items() if k not in _PRETTY_SKIP
    )
    return f"{stamp}  {event.get('event', '?')!s:<22} {event.get('program') or '-'!s:<16} {details}".rstrip()


class EventPrinter:
    def __init__(self, o: Output, keep: EventFilter, as_table: bool) -> None:
        self.o = o
        self.keep = keep
        self.as_table = as_table
        self.malformed = 0
        self._header = False

    def line(self, raw: bytes | str) -> None:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        text = text.strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except ValueError:
            self.malformed += 1
            return
        if not isinstance(event, dict):
            self.malformed += 1
            return
        self.event(event, text)

    def event(self, event: dict[str, Any], raw: str | None = None) -> None:
        if not self.keep(event):
            return
        if not self.as_table:
            # Live events are printed the way nsinitd writes its event log, so both read alike.
            self.o.line(raw if raw is not None else json.dumps(event))
            return
        if not self._header:
            self.o.line(f"{'TIME':<23}  {'EVENT':<22} {'PROGRAM':<16} DETAILS")
            self._header = True
        self.o.line(pretty(event))


# -- top --------------------------------------------------------------------------------


@dataclass
class Sample:
    when: float
    data: dict[str, Any]


def top_rows(previous: Sample | None, current: Sample) -> list[dict[str, Any]]:
    rows = []
    for name, entry in sorted(current.data.items()):
        stats = entry.get("stats") or {}
        status = entry.get("status") or {}
        cpu: float | None = None
        usage = stats.get("cpu_usage_ns")
        if previous is not None and isinstance(usage, int):
            before = (previous.data.get(name) or {}).get("stats") or {}
            elapsed = current.when - previous.when
            if isinstance(before.get("cpu_usage_ns"), int) and elapsed > 0:
                cpu = max(0.0, (usage - before["cpu_usage_ns"]) / (elapsed * 1e9) * 100)
        rows.append(
            {
                "name": name,
                "state": status.get("state", "?"),
                "cpu_percent": None if cpu is None else round(cpu, 2),
                "memory_bytes": stats.get("memory_bytes"),
                "pids": stats.get("pids"),
                "restarts": status.get("restarts"),
            }
        )
    return rows


def top_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    width = max([len(r["name"]) for r in rows] + [16]) + 2
    lines = [f"{'NAME':<{width}}{'STATE':<10}{'CPU %':>8}{'MEM':>12}{'PIDS':>7}{'RESTARTS':>10}"]
    for r in rows:
        cpu = "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.2f}%"
        pids = "-" if r["pids"] is None else str(r["pids"])
        restarts = "-" if r["restarts"] is None else str(r["restarts"])
        lines.append(
            f"{r['name']:<{width}}{r['state']:<10}{cpu:>8}{format_bytes(r['memory_bytes']):>12}{pids:>7}{restarts:>10}"
        )
    return lines
