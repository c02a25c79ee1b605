"""The runtime's errors. Each one renders as a single line that names what failed.

Exit statuses of ``nsinit``: the command's own status when it ran (128+N when killed by signal N),
125 when nsinit itself failed (config error, setup error), 126 when the command is not executable,
127 when it is not found.
"""

from __future__ import annotations

import errno as _errno
import os

EXIT_RUNTIME_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class NsRuntimeError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(NsRuntimeError):
    """container.json is missing, malformed or holds a bad value. ``path`` is the field path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class SyscallError(NsRuntimeError, OSError):
    """A system call failed: ``mount('/a' -> '/b'): EPERM (Operation not permitted)``."""

    def __init__(self, call: str, err: int) -> None:
        name = _errno.errorcode.get(err, str(err))
        OSError.__init__(self, err, f"{call}: {name} ({os.strerror(err)})")
        self.call = call

    def __str__(self) -> str:
        return str(self.strerror)


class SetupError(NsRuntimeError):
    """A step of container setup failed: names the step, the path and the cause."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step


class StateError(NsRuntimeError):
    """The pid/start files disagree with the system (no such container, not running...)."""


class TeardownError(NsRuntimeError):
    """Teardown could not release something within its bounds: names the resource."""
