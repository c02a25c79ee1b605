"""nsinitctl's exit statuses, and the two ways a command ends early.

Every module of the package raises these; :func:`supervisor.ctl.run` turns them into a message on
stderr and the status. The table of statuses is in the package's docstring (and ``nsinitctl -h``).
"""

from __future__ import annotations

from supervisor import protocol as proto

OK, FAILED, USAGE, NOT_RUNNING, UNREACHABLE, REFUSED = 0, 1, 2, 3, 4, 5
EXEC_FAILED = 125
INTERRUPTED = 130


class CtlError(Exception):
    """Ends the command with ``status`` after printing ``message`` on stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RemoteError(Exception):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_for(code: str, *, not_running: int = FAILED) -> int:
    """Exit status for a daemon error code; ``not_running`` is what bad_state means here."""
    if code in ("no_such_program", "bad_request"):
        return USAGE
    if code == "bad_state":
        return not_running
    if code == proto.REFUSED:
        return REFUSED
    return FAILED
