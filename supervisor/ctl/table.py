"""The status table, one line per program: what `nsinitctl status` prints.

Apart from render.py (json, datetime, dataclasses) so that the fast path of ``status``
(:mod:`supervisor.ctl.fast`) prints it without importing those; render.py re-exports it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    if days:
        return f"{days} day{'s' if days > 1 else ''}, {clock}"
    return clock


def describe(program: dict[str, Any], now: float) -> str:
    state = program.get("state")
    if state == "RUNNING" and program.get("pid"):
        return f"pid {program['pid']}, uptime {format_duration(now - float(program.get('since') or now))}"
    if program.get("description"):
        return str(program["description"])
    if program.get("exit_code") is not None:
        text = f"exit status {program['exit_code']}"
        if program.get("signal"):
            text += f" ({program['signal']})"
        return text
    return ""


def status_lines(programs: Sequence[dict[str, Any]], now: float) -> list[str]:
    width = max([len(str(p["name"])) for p in programs] + [16]) + 2
    return [f"{p['name']:<{width}}{p['state']:<10}{describe(p, now)}".rstrip() for p in programs]
