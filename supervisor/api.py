"""The contract between the supervisor core (daemon.py) and the control server (server.py).

The server only ever talks to the daemon through this protocol, so either side can be tested
with a fake of the other. Every method is called from the daemon's trio loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the contract alone loads neither trio nor structlog
    from .events import Subscription


class ControlError(Exception):
    """A request the supervisor refuses; ``code`` is a stable machine-readable word.

    Codes: ``no_such_program``, ``bad_state``, ``bad_request``, ``failed``, ``not_a_container``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ProgramStatus:
    name: str
    state: str  # STOPPED | STARTING | RUNNING | BACKOFF | STOPPING | EXITED | FATAL
    pid: int | None  # host pid (a container's PID 1 for containers)
    since: float  # time.time() when the state was entered
    exit_code: int | None  # last exit: code, 128+N for signal N
    signal: str | None  # last exit: signal name ("SIGKILL") or None
    restarts: int
    container: str | None  # container directory, None for a plain process
    description: str = ""  # "pid 12, uptime 0:01:02" / "exited 1 (expected)" ...

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "since": self.since,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "restarts": self.restarts,
            "container": self.container,
            "description": self.description,
        }


class SupervisorAPI(Protocol):
    """What nsinitd offers its control socket."""

    def status(self, names: Sequence[str] = ()) -> list[ProgramStatus]:
        """All programs (sorted by name) or the named ones; ControlError(no_such_program)."""

    async def start(self, name: str) -> ProgramStatus:
        """Start and wait until RUNNING (or BACKOFF/FATAL/EXITED: returned, caller decides)."""

    async def stop(self, name: str) -> ProgramStatus:
        """Stop and wait until STOPPED (stopsignal, KILL after stopwaitsecs, teardown)."""

    async def restart(self, name: str) -> ProgramStatus:
        """stop then start."""

    async def start_many(self, names: Sequence[str]) -> list[ProgramStatus | ControlError]:
        """start of each name at once, by ascending priority groups (a group leaves STARTING
        before the next is started); one answer per name (each once), in their order: the
        status, or the ControlError start would raise (no_such_program, bad_state)."""

    async def stop_many(self, names: Sequence[str]) -> list[ProgramStatus | ControlError]:
        """stop of each name at once, by descending priority groups (a group is down, or past
        its programs' stop bounds, before the next is signalled); answers as start_many."""

    async def restart_many(self, names: Sequence[str]) -> list[ProgramStatus | ControlError]:
        """stop_many, then start_many of those that stopped; answers as restart would give:
        ControlError(failed) for a program that did not stop."""

    def signal(self, name: str, signum: int) -> None:
        """Send signum to the program's command; ControlError(bad_state) when not running."""

    def exec_target(self, name: str) -> Path:
        """The state directory of the program's live container (holding pid/start), for
        ``nsruntime.join``; ControlError(not_a_container | bad_state)."""

    def log_path(self, name: str, stream: str) -> Path:
        """Captured output file of a program, stream is "stdout" or "stderr"."""

    def subscribe(self, max_buffer: int) -> Subscription:
        """A trio MemoryReceiveChannel of event dicts (the same JSON objects as the event log),
        starting with the next event. When the subscriber falls max_buffer behind it is dropped:
        the channel then yields a final {"event": "subscriber.dropped", ...} and closes."""

    async def reload(self) -> dict[str, list[str]]:
        """Reread the config; returns {"added": [...], "removed": [...], "changed": [...]}."""

    def reread(self) -> dict[str, list[str]]:
        """What reload() would change, changing nothing: the same dict. ControlError(failed) when
        the config can't be loaded."""

    def request_shutdown(self, reason: str = "requested", *, keep_running: bool = False) -> None:
        """Begin the ordered shutdown (as SIGTERM); returns at once. keep_running: nsinitd leaves
        and its programs go on running under the keeper, for the next nsinitd to adopt."""

    def stats(self, name: str) -> dict[str, int]:
        """Resource usage of a program, read from its cgroup: any of ``cpu_usage_ns`` (int,
        cumulative), ``memory_bytes`` (int), ``pids`` (int); keys that can't be read are left
        out. ControlError(no_such_program). For ``nsinitctl top``; NotImplementedError where the
        daemon can't read usage at all, which the control server answers ``unsupported``."""

    def emit(self, event: str, **fields: object) -> None:
        """Emit an event (the server reports e.g. control.refused through this)."""

    @property
    def pid(self) -> int: ...

    @property
    def event_log(self) -> Path | None:
        """The JSON-lines file nsinitd appends its events to, None when it keeps none."""

    @property
    def socket_group(self) -> int | None:
        """gid allowed on the control socket besides root, from the config."""
