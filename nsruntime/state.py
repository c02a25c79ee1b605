"""A container's records on the host: ``pid``, ``start`` and ``state.json``, where the container cannot reach them.

``pid`` holds the host pid of the container's PID 1 and ``start`` that process's start time
(field 22 of /proc/PID/stat). ``state.json`` records what the container holds on the host
(cgroup directories, host-side links) so that whoever finds it stale can release them, and what
identifies its PID 1 besides the start time: the inode of each of its namespaces and its line
of /proc/PID/cgroup (the cgroup2 one when there is one).

Nothing a container can write is read as truth here. The records live in a directory outside
its root (root-only, 0700): the caller's ``state_dir`` (nsinitd: ``state_dir/PROGRAM``), for
``nsinit`` the directory of ``--root DIR``, or without it ``$NSINIT_STATE_ROOT/ID``
(``/run/nsinit-exec/ID`` when the variable is unset or empty), ID derived from the rootfs's real
path (``derive_id``). A directory of that last kind is removed with the container's records.
A pid is acted on (joined, signalled) only once ``open_live`` has opened a pidfd for it and
found its start time, namespaces and cgroup as recorded; signals then go through that pidfd,
so a pid reused in between is never signalled.

``nsinit`` also writes the pid to ``pid`` in the rootfs for whoever wants to read it: that file
is the container's to rewrite, so nsinit writes it without following anything found there (a
fresh random name made with O_EXCL, renamed into place, both relative to the directory's fd)
and never reads it.

Every record is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import fcntl
import os

from .errors import StateError
from .lean import dumps, loads, read_file, suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike
    from types import TracebackType
    from typing import Any

PID_FILE = "pid"
START_FILE = "start"
STATE_FILE = "state.json"
STATE_ROOT_ENV = "NSINIT_STATE_ROOT"
DEFAULT_STATE_ROOT = "/run/nsinit-exec"


def derive_id(path: str, salt: str = "") -> str:
    """A name for path (and salt) that is always valid as a cgroup or file name: the path's last
    component in ASCII letters, digits and ``-_.`` (anything else becomes ``-``), a dash and 12
    hex digits of a hash of both."""
    # FNV-1a, 64 bits, in Python: hashlib loads OpenSSL (~10 ms), zlib is one more .so (~0.3 ms)
    h = 0xCBF29CE484222325
    for byte in f"{path}\0{salt}".encode(errors="surrogateescape"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33  # then a finalizer (murmur3's): the last bytes reach the top bits too
    h = (h * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33
    base = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-"
                   for c in os.path.basename(path))[:32] or "root"
    return f"{base}-{h:016x}"[: len(base) + 13]


def state_root() -> str:
    """Where ``nsinit`` without --root keeps each container's records."""
    return os.path.abspath(os.environ.get(STATE_ROOT_ENV) or DEFAULT_STATE_ROOT)


def is_within(path: str, root: str) -> bool:
    """path is root or below it (both real paths)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot, or None when there is no such process."""
    try:
        data = read_file(f"/proc/{pid}/stat")
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


def proc_state(pid: int) -> str:
    """What /proc says of a process that won't die, for the message that reports it: the State line
    of /proc/PID/status (``D (disk sleep)``), then where it waits when the kernel tells
    (``D (disk sleep) waiting in __refrigerator``); ``gone`` once it is gone. One reading for the
    runtime's errors and nsinitd's ``program.stuck`` event."""
    state = "gone"
    with suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("State:"):
                state = line.split(":", 1)[1].strip()
                break
    if state == "gone":
        return state
    wchan = ""
    with suppress(OSError), open(f"/proc/{pid}/wchan") as f:
        wchan = f.read().strip()
    return state + (f" waiting in {wchan}" if wchan and wchan != "0" else "")


def namespace_inodes(pid: int, kinds: list[str]) -> dict[str, int]:
    """kind -> inode of /proc/PID/ns/KIND: what tells one namespace from another."""
    return {k: os.stat(f"/proc/{pid}/ns/{k}").st_ino for k in kinds}


def cgroup_line(pid: int) -> str:
    """pid's line of /proc/PID/cgroup for the cgroup2 hierarchy ("0::/path"), or every line where
    there is none (v1 only)."""
    text = read_file(f"/proc/{pid}/cgroup").decode()
    return next((line for line in text.splitlines() if line.startswith("0::")), text)


def _read(path: str) -> str:
    return read_file(path).decode()


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def write_courtesy(directory: str, name: str, text: str) -> None:
    """Write text to directory/name, a directory the container may write to: nothing it planted
    there (a symlink at name or at any temporary name) is followed. OSError when it can't."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for _attempt in range(3):
            tmp = f".{name}.{os.urandom(8).hex()}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=dfd)
            except FileExistsError:
                continue
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            try:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # replaces whatever stood at name
            except OSError:
                with suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            return
        raise FileExistsError(f"{directory}: no free temporary name for {name}")
    finally:
        os.close(dfd)


class _DirLock:
    """flock on a directory for the length of a with block; wait=False refuses a held lock at once.

    The directory is made (0700) when missing. One that is removed while we wait for its lock
    (StateDir.release) is made again and locked anew: the lock always covers the directory at path.
    """

    def __init__(self, path: str, wait: bool = True) -> None:
        self._path = path
        self._wait = wait
        self._fd = -1

    def __enter__(self) -> None:
        for _attempt in range(100):
            os.makedirs(self._path, mode=0o700, exist_ok=True)
            try:
                fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed between makedirs and open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if self._wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = os.fstat(fd)
                try:
                    now = os.stat(self._path)
                except FileNotFoundError:
                    now = None
            except BlockingIOError:
                os.close(fd)
                raise StateError(f"{self._path}: locked by another nsinit (a container is being made here)") from None
            except BaseException:
                os.close(fd)
                raise
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                self._fd = fd
                return
            os.close(fd)
        raise StateError(f"{self._path}: keeps being removed while nsinit waits for its lock")

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        os.close(self._fd)


class StateDir:
    """The directory of a container's records (never inside its rootfs).

    remove_dir: the directory is nsinit's own (``$NSINIT_STATE_ROOT/ID``): release() removes it
    once it holds no records.
    """

    def __init__(self, path: str | PathLike[str], *, remove_dir: bool = False) -> None:
        self.path = os.fspath(path)
        self.remove_dir = remove_dir

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def pid_file(self) -> str:
        return self.file(PID_FILE)

    def locked(self, wait: bool = True) -> _DirLock:
        """Serialise create/join decisions on this directory (flock on the directory itself);
        wait=False raises StateError at once when another process holds the lock."""
        return _DirLock(self.path, wait)

    def read_pid(self) -> tuple[int, int] | None:
        """(pid, start) as recorded, or None when no pid record stands (or it is unreadable)."""
        try:
            pid = int(_read(self.file(PID_FILE)).strip())
            start = int(_read(self.file(START_FILE)).strip())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return pid, start

    def open_live(self) -> tuple[int, int] | None:
        """(pid, pidfd) of the container's PID 1 when it lives, else None. The caller closes pidfd.

        The pidfd is opened first, then the process at pid must have the recorded start time,
        namespaces and cgroup: if it does, the pidfd is that process (a pid is reused only once
        its process is gone), and whatever is done through the pidfd reaches it or nothing.
        """
        rec = self.read_pid()
        if rec is None:
            return None
        pid, start = rec
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        try:
            if self._is_recorded_pid1(pid, start):
                return pid, pidfd
        except OSError:
            pass
        os.close(pidfd)
        return None

    def _is_recorded_pid1(self, pid: int, start: int) -> bool:
        if start_time(pid) != start or is_zombie(pid):
            return False
        st = self.read_state()
        namespaces, cgroup = st.get("namespaces"), st.get("pid1_cgroup")
        if not isinstance(namespaces, dict) or not namespaces or not isinstance(cgroup, str):
            return False  # no identity recorded: nothing to act on
        return namespace_inodes(pid, list(namespaces)) == namespaces and cgroup_line(pid) == cgroup

    def live_pid(self) -> int | None:
        """The pid of the container's PID 1 if it lives (see open_live), else None."""
        live = self.open_live()
        if live is None:
            return None
        os.close(live[1])
        return live[0]

    def has_files(self) -> bool:
        return any(os.path.exists(self.file(n)) for n in (PID_FILE, START_FILE, STATE_FILE))

    def write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.file(STATE_FILE), dumps(state) + "\n", 0o600)

    def read_state(self) -> dict[str, Any]:
        try:
            data = loads(_read(self.file(STATE_FILE)))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_pid(self, pid: int, start: int) -> None:
        # start first: a reader that sees pid must be able to check it
        write_atomic(self.file(START_FILE), f"{start}\n")
        write_atomic(self.file(PID_FILE), f"{pid}\n")

    def remove(self) -> list[str]:
        """Remove the records, and the courtesy pid file that state.json names (only that name:
        whatever the container left there, a symlink included, is unlinked, never followed)."""
        removed = []
        courtesy = self.read_state().get("pid_file")
        if isinstance(courtesy, str) and os.path.isabs(courtesy):
            with suppress(OSError):
                os.unlink(courtesy)
                removed.append(courtesy)
        for name in (PID_FILE, START_FILE, STATE_FILE):
            with suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(self.file(name))
                removed.append(self.file(name))
        return removed

    def release(self, *, locked: bool = False) -> None:
        """With remove_dir, remove the directory if it holds nothing (destroy and cleanup_stale call this).

        Under its lock, so that a creator never writes into a removed directory: with locked the
        caller holds it; otherwise it is taken without waiting, and a creator holding it keeps
        the directory.
        """
        if not self.remove_dir:
            return
        if locked:
            with suppress(OSError):
                os.rmdir(self.path)
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rmdir(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)


def resolve(state_dir: str | PathLike[str] | StateDir) -> StateDir:
    """state_dir as a StateDir at its real path (a path given by a caller may hold symlinks)."""
    sdir = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
    return StateDir(os.path.realpath(sdir.path), remove_dir=sdir.remove_dir)
