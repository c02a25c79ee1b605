"""Everything that decides a program's state lives here: a transition table and a pure ``step``.

No clock, no I/O, no processes: ``step(status, event, policy)`` returns the next status and the
actions the caller (``program.py``) must carry out, in order. An unknown (state, event) pair raises
:class:`InvalidTransition` and changes nothing, so a caller bug can never put a program in a state
the table does not know.

Wanted and observed state are kept apart (as s6-supervise does): ``Status.wanted`` is what the
operator asked for, ``Status.state`` what the process is doing.

Retry counting follows supervisord: a start fails when the process exits (whatever its code) or
cannot be spawned while STARTING. Each failure bumps ``attempt``; the program goes to BACKOFF for
``initial * factor ** (attempt - 1)`` seconds (capped at ``max``) and is retried, until ``attempt``
exceeds ``startretries``: then FATAL. So ``startretries = 3`` allows the first start plus three
retries. Reaching RUNNING (up for ``startsecs``) resets the count, and with it the backoff delay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from .states import ProcessState as S
from .states import Wanted

AutoRestart = Literal["always", "on-failure", "never"]


class InvalidTransition(Exception):
    """``step`` was fed an event its table has no entry for in the current state."""

    def __init__(self, state: S, event: Event) -> None:
        super().__init__(f"no transition from {state.value} on {type(event).__name__}")
        self.state = state
        self.event = event


@dataclass(frozen=True)
class Policy:
    autorestart: AutoRestart = "on-failure"
    startretries: int = 3
    backoff_initial: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 60.0


@dataclass(frozen=True)
class Status:
    state: S = S.STOPPED
    wanted: Wanted = Wanted.DOWN
    attempt: int = 0  # failed starts since the last time the program reached RUNNING


# -- events (inputs) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class Start(Event):
    """The operator (autostart, control socket, reload) wants the program up."""


@dataclass(frozen=True)
class Stop(Event):
    """The operator wants the program down."""


@dataclass(frozen=True)
class Started(Event):
    """The process has stayed up for startsecs."""


@dataclass(frozen=True)
class SpawnFailed(Event):
    reason: str = ""
    #: a config error (a container.json that can't be parsed): no retry can mend it
    fatal: bool = False


@dataclass(frozen=True)
class Exited(Event):
    """The process exited (and was reaped, and its container or cgroup released)."""

    expected: bool = False


@dataclass(frozen=True)
class BackoffElapsed(Event):
    pass


@dataclass(frozen=True)
class Adopted(Event):
    """A previous nsinitd started the process and left it running; this one proved it its own and
    takes it over as it is: up for good (its startsecs are long past), wanted up."""


@dataclass(frozen=True)
class StopTimeout(Event):
    """stopwaitsecs passed in STOPPING without the process exiting."""


# -- actions (outputs) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    pass


@dataclass(frozen=True)
class Spawn(Action):
    """Spawn the process; on success arm the startsecs timer."""


@dataclass(frozen=True)
class SignalStop(Action):
    """Send stopsignal and arm the stopwaitsecs timer."""


@dataclass(frozen=True)
class Kill(Action):
    """SIGKILL every process of the program (its cgroup / container)."""


@dataclass(frozen=True)
class ScheduleRetry(Action):
    delay: float


@dataclass(frozen=True)
class Emit(Action):
    """Emit a lifecycle event; the caller adds the facts it owns (pid, ...)."""

    event: str
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # immutable

    def __hash__(self) -> int:  # a record holding a dict: hash on the name only
        return hash(self.event)


def backoff_delay(attempt: int, policy: Policy) -> float:
    """Delay before retry number ``attempt`` (1-based), capped at ``backoff_max``."""
    if attempt < 1:
        return 0.0
    delay = policy.backoff_initial * policy.backoff_factor ** (attempt - 1)
    return float(min(delay, policy.backoff_max))


def should_restart(expected: bool, policy: Policy) -> bool:
    if policy.autorestart == "always":
        return True
    if policy.autorestart == "on-failure":
        return not expected
    return False


Result = tuple[Status, list[Action]]
Rule = Callable[[Status, Any, Policy], Result]


def _start(st: Status, ev: Start, p: Policy) -> Result:
    return (Status(S.STARTING, Wanted.UP, 0), [Emit("program.starting", {"attempt": 1}), Spawn()])


def _stop_live(st: Status, ev: Stop, p: Policy) -> Result:
    return (replace(st, state=S.STOPPING, wanted=Wanted.DOWN), [Emit("program.stopping"), SignalStop()])


def _stop_backoff(st: Status, ev: Stop, p: Policy) -> Result:
    return (replace(st, state=S.STOPPED, wanted=Wanted.DOWN), [Emit("program.stopped")])


def _stop_again(st: Status, ev: Stop, p: Policy) -> Result:
    return (replace(st, wanted=Wanted.DOWN), [])


def _failed_start(st: Status, ev: Exited | SpawnFailed, p: Policy) -> Result:
    attempt = st.attempt + 1
    if isinstance(ev, SpawnFailed) and ev.fatal:  # at once: retrying a bad config only repeats it
        return (Status(S.FATAL, Wanted.DOWN, attempt), [Emit("program.fatal", {"reason": ev.reason})])
    if attempt > p.startretries:
        reason = f"exited too quickly {attempt} times (startretries={p.startretries})"
        if isinstance(ev, SpawnFailed) and ev.reason:
            reason = f"{ev.reason} ({attempt} times, startretries={p.startretries})"
        return (Status(S.FATAL, Wanted.DOWN, attempt), [Emit("program.fatal", {"reason": reason})])
    delay = backoff_delay(attempt, p)
    fields: dict[str, Any] = {"attempt": attempt, "delay": delay}
    if isinstance(ev, SpawnFailed) and ev.reason:
        fields["reason"] = ev.reason
    new = replace(st, state=S.BACKOFF, attempt=attempt)
    return (new, [Emit("program.backoff", fields), ScheduleRetry(delay)])


def _started(st: Status, ev: Started, p: Policy) -> Result:
    return (replace(st, state=S.RUNNING, attempt=0), [Emit("program.running")])


def _exited_running(st: Status, ev: Exited, p: Policy) -> Result:
    if st.wanted is Wanted.UP and should_restart(ev.expected, p):
        return (Status(S.STARTING, Wanted.UP, 0), [Emit("program.starting", {"attempt": 1}), Spawn()])
    return (Status(S.EXITED, Wanted.DOWN, 0), [])


def _retry(st: Status, ev: BackoffElapsed, p: Policy) -> Result:
    return (replace(st, state=S.STARTING), [Emit("program.starting", {"attempt": st.attempt + 1}), Spawn()])


def _adopted(st: Status, ev: Adopted, p: Policy) -> Result:
    return (Status(S.RUNNING, Wanted.UP, 0), [Emit("program.adopted")])


def _stopped(st: Status, ev: Exited, p: Policy) -> Result:
    return (replace(st, state=S.STOPPED, wanted=Wanted.DOWN, attempt=0), [Emit("program.stopped")])


def _kill(st: Status, ev: StopTimeout, p: Policy) -> Result:
    return (st, [Kill()])


TRANSITIONS: dict[tuple[S, type[Event]], Rule] = {
    (S.STOPPED, Start): _start,
    (S.STOPPED, Adopted): _adopted,  # only at nsinitd's start, before anything else happened to it
    (S.EXITED, Start): _start,
    (S.FATAL, Start): _start,
    (S.BACKOFF, Start): _start,  # an explicit start skips the wait and resets the count
    (S.STARTING, Stop): _stop_live,
    (S.RUNNING, Stop): _stop_live,
    (S.BACKOFF, Stop): _stop_backoff,
    (S.STOPPING, Stop): _stop_again,
    (S.STARTING, Started): _started,
    (S.STARTING, Exited): _failed_start,
    (S.STARTING, SpawnFailed): _failed_start,
    (S.RUNNING, Exited): _exited_running,
    (S.BACKOFF, BackoffElapsed): _retry,
    (S.STOPPING, Exited): _stopped,
    (S.STOPPING, StopTimeout): _kill,
}


def allowed(state: S, event: type[Event]) -> bool:
    return (state, event) in TRANSITIONS


def step(status: Status, event: Event, policy: Policy) -> Result:
    """Apply ``event`` to ``status``; raise InvalidTransition (changing nothing) if it is unknown."""
    rule = TRANSITIONS.get((status.state, type(event)))
    if rule is None:
        raise InvalidTransition(status.state, event)
    return rule(status, event, policy)
