"""Program states, with supervisord's names so users recognise them.

This module imports nothing from the rest of the package: everyone else imports it.

    STOPPED   not running, and not wanted (initial state, or stopped on request)
    STARTING  spawned; must stay up ``startsecs`` to count as started
    RUNNING   up for at least ``startsecs``
    BACKOFF   a start failed (exited during STARTING, or could not spawn); waiting to retry
    STOPPING  stopsignal sent; SIGKILL follows after ``stopwaitsecs``
    EXITED    exited from RUNNING and the restart policy says stay down
    FATAL     ``startretries`` retries failed; stays down until started by hand
"""

from __future__ import annotations

import enum


class ProcessState(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"

    def __str__(self) -> str:
        return self.value


class Wanted(enum.Enum):
    """What the operator (config, control socket) wants, kept apart from what is observed (as s6)."""

    UP = "up"
    DOWN = "down"


#: A process exists or will be spawned without anyone asking again.
RUNNING_STATES = frozenset({ProcessState.STARTING, ProcessState.RUNNING, ProcessState.BACKOFF})
#: Nothing runs and nothing will until someone starts the program.
STOPPED_STATES = frozenset({ProcessState.STOPPED, ProcessState.EXITED, ProcessState.FATAL})
#: A live process exists that signals can reach.
SIGNALLABLE_STATES = frozenset({ProcessState.STARTING, ProcessState.RUNNING, ProcessState.STOPPING})
