"""What stands on disk while a container lives: ``pid``, ``start`` and ``state.json``.

``pid`` holds the host pid of the container's PID 1 and ``start`` that process's start time
(field 22 of /proc/PID/stat): a pid whose start time differs belongs to somebody else, so a reused
pid is never taken for the container. ``state.json`` records what the container holds on the host
(cgroup directories, host-side links) so that whoever finds it stale can release them.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import fcntl
import os

from .lean import dumps, loads, suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike
    from types import TracebackType
    from typing import Any

PID_FILE = "pid"
START_FILE = "start"
STATE_FILE = "state.json"


def start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] == b"Z"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


class _DirLock:
    """flock on a directory for the length of a with block."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        os.close(self._fd)


class StateDir:
    """The directory where a container's pid/start/state.json stand (an absolute or relative path)."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = os.fspath(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def pid_file(self) -> str:
        return self.file(PID_FILE)

    def locked(self) -> _DirLock:
        """Serialise create/join decisions on this directory (flock on the directory itself)."""
        return _DirLock(self.path)

    def read_pid(self) -> tuple[int, int] | None:
        """(pid, start) as written, or None when no pid file stands (or it is unreadable)."""
        try:
            pid = int(_read(self.file(PID_FILE)).strip())
            start = int(_read(self.file(START_FILE)).strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid, start

    def live_pid(self) -> int | None:
        """The pid of the container's PID 1 if the pid file names a live process with the same start time."""
        rec = self.read_pid()
        if rec is None:
            return None
        pid, start = rec
        if start_time(pid) != start or is_zombie(pid):
            return None
        return pid

    def has_files(self) -> bool:
        return any(os.path.exists(self.file(n)) for n in (PID_FILE, START_FILE, STATE_FILE))

    def write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.file(STATE_FILE), dumps(state) + "\n", 0o600)

    def read_state(self) -> dict[str, Any]:
        try:
            data = loads(_read(self.file(STATE_FILE)))
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_pid(self, pid: int, start: int) -> None:
        # start first: a reader that sees pid must be able to check it
        write_atomic(self.file(START_FILE), f"{start}\n")
        write_atomic(self.file(PID_FILE), f"{pid}\n")

    def remove(self) -> list[str]:
        removed = []
        for name in (PID_FILE, START_FILE, STATE_FILE):
            with suppress(FileNotFoundError):
                os.unlink(self.file(name))
                removed.append(self.file(name))
        return removed
