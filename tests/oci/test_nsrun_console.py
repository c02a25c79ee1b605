"""nsrun's terminals (issue 16): process.terminal and exec --tty hand the pty master to
--console-socket over SCM_RIGHTS, as conmon and containerd's shim expect of runc. The test plays
the caller: it listens on the socket, takes the master and types into it."""

from __future__ import annotations

import os
import socket
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsruntime import libc
from nsruntime.lean import recv_fds
from tests.oci.test_nsrun import Bundle
from tests.oci.test_nsrun_exec import started

pytestmark = pytest.mark.privileged

# no prompt and no line editing: what comes back from the master is exactly the command's output
READ_AND_RUN = ["sh", "-c", 'read -r line; eval "$line"']


@pytest.fixture
def console_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "console.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    yield listener, path
    listener.close()


def receive_master(listener: socket.socket) -> tuple[bytes, int]:
    """The one message nsrun sent: the name it carries and the master that came with it (bounded)."""
    listener.settimeout(10)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        name, fds = recv_fds(conn, 4096, 4)
        assert conn.recv(1) == b"", "one message, then the end: no process of the container holds the socket"
    assert len(fds) == 1, f"one descriptor, got {fds}"
    return name, fds[0]


def type_and_read(master: int, line: bytes) -> str:
    """Type line (no echo) and read what the terminal shows until the command's side hangs up."""
    attrs = termios.tcgetattr(master)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(master, termios.TCSANOW, attrs)
    os.write(master, line)
    out = b""
    while libc.wait_readable(master, 10):
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the last holder of the slave has gone, after everything it wrote
            break
        if not data:
            break
        out += data
    else:
        raise AssertionError(f"the terminal did not hang up within 10 s; read so far {out!r}")
    return out.decode().replace("\r\n", "\n")


def test_create_sends_the_pty_master_to_the_console_socket_and_start_runs_the_command_on_it(
        bundle: Bundle, console_socket: tuple[socket.socket, Path]) -> None:
    listener, path = console_socket
    bundle.spec["process"]["terminal"] = True
    bundle.spec["process"]["args"] = READ_AND_RUN
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "--pid-file", str(bundle.dir / "pid"),
                     "--console-socket", str(path), "c1")
    assert (p.returncode, p.stdout) == (0, "")
    pid = int((bundle.dir / "pid").read_text())
    bundle.pids.append(pid)
    name, master = receive_master(listener)
    try:
        assert name == b"/dev/ptmx"
        assert bundle.nsrun("start", "c1").returncode == 0
        assert type_and_read(master, b"tty; echo hi; exit 3\n") == "/dev/pts/0\nhi\n"
    finally:
        os.close(master)
    status = bundle.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert bundle.nsrun("delete", "c1").returncode == 0


def test_a_short_lived_terminal_command_loses_no_output(
        bundle: Bundle, console_socket: tuple[socket.socket, Path]) -> None:
    listener, path = console_socket
    bundle.spec["process"]["terminal"] = True
    bundle.spec["process"]["args"] = ["sh", "-c", "seq 1 2000"]
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "--pid-file", str(bundle.dir / "pid"),
                     "--console-socket", str(path), "c1")
    assert p.returncode == 0, p.stdout
    pid = int((bundle.dir / "pid").read_text())
    bundle.pids.append(pid)
    _name, master = receive_master(listener)
    try:
        assert bundle.nsrun("start", "c1").returncode == 0
        status = bundle.reap(pid)  # gone before anyone read a byte of its output
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert type_and_read(master, b"") == "".join(f"{i}\n" for i in range(1, 2001))
    finally:
        os.close(master)


def test_a_terminal_without_a_console_socket_is_refused_and_nothing_is_made(bundle: Bundle) -> None:
    bundle.spec["process"]["terminal"] = True
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stdout) == (
        1, "nsrun: cannot allocate tty if nsrun will detach without setting console socket\n")
    assert not (bundle.root / "c1").exists()


def test_a_console_socket_without_a_terminal_is_refused(
        bundle: Bundle, console_socket: tuple[socket.socket, Path]) -> None:
    _listener, path = console_socket
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "--console-socket", str(path), "c1")
    assert (p.returncode, p.stdout) == (
        1, "nsrun: cannot use console socket if nsrun will not detach or allocate tty\n")
    assert not (bundle.root / "c1").exists()


def test_a_console_socket_nobody_listens_on_fails_create_and_leaves_nothing(bundle: Bundle, tmp_path: Path) -> None:
    bundle.spec["process"]["terminal"] = True
    bundle.write()
    missing = tmp_path / "nobody.sock"
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "--console-socket", str(missing), "c1")
    assert (p.returncode, p.stdout) == (1, f"nsrun: --console-socket {missing}: connect: no such file or directory\n")
    assert not (bundle.root / "c1").exists()


def test_exec_detach_tty_sends_the_master_to_the_console_socket(
        bundle: Bundle, console_socket: tuple[socket.socket, Path]) -> None:
    listener, path = console_socket
    started(bundle)
    pidfile = bundle.dir / "exec.pid"
    p = bundle.nsrun("exec", "--detach", "--tty", "--console-socket", str(path), "--pid-file", str(pidfile),
                     "c1", *READ_AND_RUN)
    assert (p.returncode, p.stdout) == (0, "")
    pid = int(pidfile.read_text())
    bundle.pids.append(pid)
    name, master = receive_master(listener)
    try:
        assert name == b"/dev/ptmx"
        assert type_and_read(master, b"tty; echo hi; exit 3\n") == "/dev/pts/0\nhi\n"
    finally:
        os.close(master)
    status = bundle.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3


def test_exec_console_socket_needs_detach_and_tty(bundle: Bundle,
                                                  console_socket: tuple[socket.socket, Path]) -> None:
    _listener, path = console_socket
    started(bundle)
    p = bundle.nsrun("exec", "--tty", "--console-socket", str(path), "c1", "true")
    assert (p.returncode, p.stdout) == (
        1, "nsrun: cannot use console socket if nsrun will not detach or allocate tty\n")
    p = bundle.nsrun("exec", "--detach", "--tty", "c1", "true")
    assert (p.returncode, p.stdout) == (
        1, "nsrun: cannot allocate tty if nsrun will detach without setting console socket\n")



def test_run_relays_the_terminal_in_the_foreground(bundle: Bundle) -> None:
    import pexpect

    from tests.oci.test_nsrun import ENV, NSRUN

    bundle.spec["process"]["terminal"] = True
    bundle.spec["process"]["args"] = ["sh"]
    bundle.write()
    c = pexpect.spawn(NSRUN[0], [*NSRUN[1:], "--root", str(bundle.root), "run", "--bundle", str(bundle.dir), "t1"],
                      dimensions=(30, 100), timeout=10, env=ENV)
    try:
        c.expect(r"# ")
        c.sendline("tty; stty size; echo $((6*7))")
        c.expect(r"/dev/pts/0\s+30 100\s+42")
        c.sendline("exit 3")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    assert c.exitstatus == 3
    assert os.listdir(bundle.root) == []


def test_run_relays_all_of_a_short_lived_terminal_commands_output_without_a_terminal_of_its_own(
        bundle: Bundle) -> None:
    import subprocess

    from tests.oci.test_nsrun import ENV, NSRUN

    bundle.spec["process"]["terminal"] = True
    bundle.spec["process"]["args"] = ["sh", "-c", "tty; seq 1 2000; exit 4"]
    bundle.write()
    p = subprocess.run([*NSRUN, "--root", str(bundle.root), "run", "--bundle", str(bundle.dir), "t1"],
                       stdin=subprocess.DEVNULL, capture_output=True, env=ENV, timeout=30)
    assert p.returncode == 4, p.stderr
    assert p.stdout.decode().replace("\r\n", "\n") == "/dev/pts/0\n" + "".join(f"{i}\n" for i in range(1, 2001))


def test_run_takes_a_console_socket_only_when_detached_with_a_terminal(
        bundle: Bundle, console_socket: tuple[socket.socket, Path]) -> None:
    _listener, path = console_socket
    bundle.spec["process"]["terminal"] = True
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), "--console-socket", str(path), "t1")
    assert (p.returncode, p.stdout) == (
        1, "nsrun: cannot use console socket if nsrun will not detach or allocate tty\n")
    p = bundle.nsrun("run", "--detach", "--bundle", str(bundle.dir), "t1")
    assert (p.returncode, p.stdout) == (
        1, "nsrun: cannot allocate tty if nsrun will detach without setting console socket\n")
    assert os.listdir(bundle.root) == [] if bundle.root.exists() else True


def test_run_detach_leaves_the_container_running_with_its_pid1_the_callers_child(bundle: Bundle) -> None:
    p = bundle.nsrun("run", "--detach", "--bundle", str(bundle.dir), "--pid-file", str(bundle.dir / "pid"), "d1")
    assert (p.returncode, p.stdout) == (0, "")
    pid = int((bundle.dir / "pid").read_text())
    bundle.pids.append(pid)
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == os.getpid(), "PID 1 is reparented to the caller, a subreaper"
    assert bundle.state("d1")["status"] == "running"
    from tests.conftest import wait_for

    wait_for(bundle.marker, what="the command to run")
    assert bundle.nsrun("delete", "--force", "d1").returncode == 0
    bundle.reap(pid)


def test_run_detach_with_a_terminal_sends_the_master_to_the_console_socket(
        bundle: Bundle, console_socket: tuple[socket.socket, Path]) -> None:
    listener, path = console_socket
    bundle.spec["process"]["terminal"] = True
    bundle.spec["process"]["args"] = READ_AND_RUN
    bundle.write()
    p = bundle.nsrun("run", "--detach", "--bundle", str(bundle.dir), "--pid-file", str(bundle.dir / "pid"),
                     "--console-socket", str(path), "d1")
    assert (p.returncode, p.stdout) == (0, "")
    pid = int((bundle.dir / "pid").read_text())
    bundle.pids.append(pid)
    _name, master = receive_master(listener)
    try:
        assert type_and_read(master, b"tty; exit 6\n") == "/dev/pts/0\n"
    finally:
        os.close(master)
    assert os.WEXITSTATUS(bundle.reap(pid)) == 6
    assert bundle.nsrun("delete", "d1").returncode == 0
