"""Program output capture: pipes read by trio, written to files under log_dir, rotated by size.

``<log_dir>/<program>.out`` and ``.err`` (with ``redirect_stderr`` both streams go to ``.out``).
Rotation renames files (``.out`` -> ``.out.1`` -> ... -> ``.out.N``, the oldest deleted) and
opens a fresh one; it never seeks or truncates anything, so it works whatever the reader is, and
the read side is always a pipe (never seeked). ``stdout_maxbytes = 0`` disables rotation;
``stdout_backups = 0`` discards the old file on rotation. ``reopen()`` (SIGUSR2) closes and
reopens the file, for an external logrotate.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio


class RotatingFile:
    """An append-only file rotated by renaming once it would exceed ``maxbytes``."""

    def __init__(self, path: Path, maxbytes: int, backups: int) -> None:
        self.path = path
        self.maxbytes = maxbytes
        self.backups = backups
        self.fd: int | None = None
        self.size = 0

    def _open(self) -> int:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self.size = os.fstat(self.fd).st_size
        return self.fd

    def write(self, data: bytes) -> None:
        while data:
            fd = self._open()
            if self.maxbytes > 0 and self.size > 0 and self.size + len(data) > self.maxbytes:
                # fill the current file with whole lines that fit; a line that doesn't starts the next
                cut = data.rfind(b"\n", 0, max(0, self.maxbytes - self.size)) + 1
                if cut > 0:
                    self._write_all(fd, data[:cut])
                    data = data[cut:]
                self.rotate()
                continue
            if self.maxbytes > 0 and len(data) > self.maxbytes:
                chunk, data = data[: self.maxbytes], data[self.maxbytes :]
            else:
                chunk, data = data, b""
            self._write_all(fd, chunk)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            self.size += n
            view = view[n:]

    def rotate(self) -> None:
        self.close()
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            if self.path.exists():
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.size = 0

    def reopen(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ProgramLogs:
    """The capture files of one program; survives restarts (one instance per program)."""

    def __init__(self, log_dir: Path, name: str, maxbytes: int, backups: int, redirect_stderr: bool) -> None:
        self.stdout = RotatingFile(log_dir / f"{name}.out", maxbytes, backups)
        self.stderr = (self.stdout if redirect_stderr
                       else RotatingFile(log_dir / f"{name}.err", maxbytes, backups))
        self.redirect_stderr = redirect_stderr

    def ensure(self) -> None:
        """Create the files now, so they exist (empty) before the program writes anything."""
        self.stdout._open()
        self.stderr._open()

    def path(self, stream: str) -> Path:
        return (self.stderr if stream == "stderr" else self.stdout).path

    def reopen(self) -> None:
        self.stdout.reopen()
        self.stderr.reopen()

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()


async def pump(read_fd: int, sink: RotatingFile) -> None:
    """Copy a pipe into ``sink`` until EOF; owns and closes ``read_fd``.

    A write error (disk full) drops that chunk rather than stalling the program on a full pipe.
    """
    stream = trio.lowlevel.FdStream(read_fd)
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            try:
                sink.write(data)
            except OSError:
                pass
