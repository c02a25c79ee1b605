"""Signals by name and number, and how a process ended: one owner for the runtime and nsinitd.

A process ends with an exit code or a killing signal; nsinit reports both as the shell does
(``exit_code`` is 128+N when signal N killed it) in one record, ExitStatus, whoever waited for
it: PID 1 for the command, the creator for PID 1, nsinitd for a plain program. The signal table
is read from the C module ``_signal`` (the ``signal`` module builds enums at import, a cost on
every ``nsinit exec``).
"""

from __future__ import annotations

import os

from .lean import frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

_NAMES: dict[int, str] = {}
_NUMBERS: dict[str, int] = {}


def _table() -> dict[int, str]:
    if not _NAMES:
        for name, value in vars(_signal).items():
            if name.startswith("SIG") and not name.startswith("SIG_") and isinstance(value, int):
                _NUMBERS[name] = value
                if name not in ("SIGIOT", "SIGCLD", "SIGPOLL"):  # aliases: the usual name wins
                    _NAMES.setdefault(value, name)
        lo, hi = getattr(_signal, "SIGRTMIN", 34), getattr(_signal, "SIGRTMAX", 64)
        for n in range(lo + 1, hi):
            _NAMES.setdefault(n, f"SIGRTMIN+{n - lo}")
    return _NAMES


def signal_name(signum: int) -> str:
    """SIGTERM for 15, SIGRTMIN+3 for 37, SIG99 for what has no name."""
    return _table().get(signum, f"SIG{signum}")


def signal_number(text: str) -> int | None:
    """15 for "TERM", "SIGTERM", "term" or "15"; None for what names no signal of this system."""
    _table()
    if text.isdigit():
        n = int(text)
        return n if n in _signal.valid_signals() else None
    name = text.upper()
    return _NUMBERS.get(name if name.startswith("SIG") else "SIG" + name)


def status_to_code(status: int) -> tuple[int, int | None]:
    """waitpid status -> (exit code, killing signal or None), 128+N for signal N."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), None


@frozen
class ExitStatus:
    exit_code: int  # the command's exit code, 128+N when killed by signal N
    signal: int | None  # the killing signal, None on a normal exit
    oom_killed: bool = False

    @property
    def signal_name(self) -> str | None:
        if self.signal is None:
            return None
        return signal_name(self.signal)

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        """The record of a waitpid(2) status."""
        return cls(*status_to_code(status))
