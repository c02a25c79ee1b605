"""The caller's side of a container's terminal: raw mode, relay both ways, window size.

The relay never blocks: both directions are buffered and written only when the other side is
ready, so a container that stops reading its terminal cannot stall the runtime (runc#1269).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import termios
import tty
from collections.abc import Iterator

_CHUNK = 65536
_MAX_PENDING = 1 << 20


def get_winsize(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    except OSError:
        return None


def copy_winsize(src: int, dst: int) -> None:
    ws = get_winsize(src)
    if ws is not None and ws != struct.pack("HHHH", 0, 0, 0, 0):
        with contextlib.suppress(OSError):
            fcntl.ioctl(dst, termios.TIOCSWINSZ, ws)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put a terminal in raw mode and give it back as it was on every way out."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


class Relay:
    """Moves bytes stdin -> master and master -> stdout without ever blocking."""

    def __init__(self, master: int, stdin: int = 0, stdout: int = 1) -> None:
        self.master = master
        self.stdin: int | None = stdin
        self.stdout = stdout
        self.to_master = bytearray()
        self.to_stdout = bytearray()
        self.master_open = True
        os.set_blocking(master, False)
        self._stdin_tty = os.isatty(stdin)

    def read_fds(self) -> list[int]:
        fds = []
        if self.stdin is not None and len(self.to_master) < _MAX_PENDING:
            fds.append(self.stdin)
        if self.master_open and len(self.to_stdout) < _MAX_PENDING:
            fds.append(self.master)
        return fds

    def write_fds(self) -> list[int]:
        fds = []
        if self.to_master and self.master_open:
            fds.append(self.master)
        if self.to_stdout:
            fds.append(self.stdout)
        return fds

    def pump(self, readable: list[int], writable: list[int]) -> None:
        if self.stdin is not None and self.stdin in readable:
            try:
                data = os.read(self.stdin, _CHUNK)
            except OSError:
                data = b""
            if data:
                self.to_master += data
            else:
                # end of input: a pipe's EOF becomes the terminal's EOF character for the command
                if not self._stdin_tty:
                    self.to_master += b"\x04"
                self.stdin = None
        if self.master_open and self.master in readable:
            self._read_master()
        if self.master in writable and self.to_master:
            try:
                n = os.write(self.master, self.to_master)
                del self.to_master[:n]
            except BlockingIOError:
                pass
            except OSError:
                self.to_master.clear()
        if self.stdout in writable and self.to_stdout:
            try:
                n = os.write(self.stdout, self.to_stdout)
                del self.to_stdout[:n]
            except BlockingIOError:
                pass
            except OSError:
                self.to_stdout.clear()

    def _read_master(self) -> None:
        try:
            data = os.read(self.master, _CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            data = b""
        if data:
            self.to_stdout += data
        else:  # EIO: every slave is closed
            self.master_open = False

    def drain(self) -> None:
        """After the command ended: take what the terminal still holds and write it out."""
        while self.master_open:
            before = len(self.to_stdout)
            self._read_master()
            if len(self.to_stdout) == before:
                break
        if self.to_stdout:
            os.set_blocking(self.stdout, True)
            with contextlib.suppress(OSError):
                os.write(self.stdout, self.to_stdout)
            self.to_stdout.clear()
