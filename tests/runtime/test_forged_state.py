"""Nothing a container writes is read as truth by the host (issue 14, hole 1).

A container's directory is its own ``/``: whatever nsinit finds there (pid, start, state.json)
may have been written by the container. Each test lets a container forge those files the way an
attacker inside would, naming a host process and a host cgroup, then runs the nsinit verbs an
admin would and checks that they act on the real container and leave the host's alone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import nsinit, nsinit_bg

pytestmark = pytest.mark.privileged


def _start_ticks(pid: int) -> int:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2 :].split()[19])


class Victim:
    """A host process (``sleep``) in a host cgroup of its own, both made by the test."""

    def __init__(self) -> None:
        from nsruntime.cgroups import detect_layout

        layout = detect_layout()
        h = layout.unified or next(h for h in layout.hierarchies if h.controllers)
        self.cgroup = os.path.join(h.base, f"forged-victim-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.cgroup)
        self.proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
        Path(self.cgroup, "cgroup.procs").write_text(str(self.proc.pid))
        self.start = _start_ticks(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def in_its_cgroup(self) -> bool:
        procs = Path(self.cgroup, "cgroup.procs")
        return procs.exists() and str(self.proc.pid) in procs.read_text().split()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        end = time.monotonic() + 5
        while os.path.isdir(self.cgroup):
            try:
                os.rmdir(self.cgroup)
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)  # EBUSY until the killed sleep is reaped by the kernel


@pytest.fixture
def victim() -> Iterator[Victim]:
    v = Victim()
    try:
        yield v
    finally:
        v.close()


class Output:
    """A background process's stdout, read line by line with a deadline."""

    def __init__(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        self.fd = p.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""

    def until(self, line: str, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while line.encode() not in self.buf.split(b"\n"):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line {line!r} within {timeout} s; got {self.buf!r}")
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    raise AssertionError(f"output ended without {line!r}; got {self.buf!r}")
                self.buf += chunk


def _pid1_of(nsinit_pid: int) -> int:
    """The container's real PID 1: the child of `nsinit exec` named nsinit-init."""
    for child in Path(f"/proc/{nsinit_pid}/task/{nsinit_pid}/children").read_text().split():
        if Path(f"/proc/{child}/comm").read_text().strip() == "nsinit-init":
            return int(child)
    raise AssertionError(f"nsinit (pid {nsinit_pid}) has no nsinit-init child")


def _forge(pid: int, start: int, cgroup: str) -> str:
    """Shell for inside the container: once nsinit has written its own /pid, put the forgery in
    place of /pid, /start and /state.json (naming the victim's pid, start time and cgroup)."""
    state = json.dumps({"id": "forged", "rootfs": "/", "config": {}, "cgroups": [cgroup], "links": []})
    return (f"i=0; while [ ! -s /pid ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; "
            f"echo {pid} > /pid; echo {start} > /start; echo '{state}' > /state.json; echo forged; ")


def _stop(p: subprocess.Popen[str]) -> None:
    """End a test's `nsinit exec` the way that lets it tear its container down (TERM, forwarded)."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate(timeout=10)


def test_a_forged_pid_naming_a_host_process_is_not_joined_signalled_reported_or_killed(
        busybox_rootfs: Path, victim: Victim) -> None:
    p = nsinit_bg(busybox_rootfs, "exec", "sh", "-c", _forge(victim.proc.pid, victim.start, victim.cgroup)
                  + 'trap "echo got USR1" USR1; while :; do sleep 0.05; done')
    try:
        out = Output(p)
        out.until("forged")
        pid1 = _pid1_of(p.pid)
        assert (busybox_rootfs / "pid").read_text() == f"{victim.proc.pid}\n"  # the forgery stands

        # exec joins the container, not the process the forged pid names
        r = nsinit(busybox_rootfs, "exec", "sh", "-c", "readlink /proc/self/ns/pid")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == os.readlink(f"/proc/{pid1}/ns/pid") != os.readlink("/proc/self/ns/pid")

        # state reports the real PID 1
        r = nsinit(busybox_rootfs, "state")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pid"] == pid1

        # kill signals the container's command, not the host process
        r = nsinit(busybox_rootfs, "kill", "USR1")
        assert r.returncode == 0, r.stderr
        out.until("got USR1")
        assert victim.alive()

        # delete --force kills the container, and neither the host process nor its cgroup
        r = nsinit(busybox_rootfs, "delete", "--force")
        assert r.returncode == 0, r.stderr
        assert victim.cgroup not in json.loads(r.stdout)["cgroups"]
        p.communicate(timeout=10)
        assert p.returncode == 137
        assert victim.alive() and victim.in_its_cgroup()
    finally:
        _stop(p)


def test_a_forged_state_left_by_an_ended_container_changes_nothing(busybox_rootfs: Path, victim: Victim) -> None:
    # a dead pid: the next exec finds no live container and cleans up what it takes for the records
    p = nsinit_bg(busybox_rootfs, "exec", "sh", "-c", _forge(2**22 - 7, 5, victim.cgroup) + "sleep 300")
    try:
        Output(p).until("forged")
        pid1 = _pid1_of(p.pid)
        p.kill()  # nsinit dies without teardown: its container goes with it, the forgery stays
        p.communicate(timeout=10)
        end = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid1}") and time.monotonic() < end:
            select.select([], [], [], 0.02)
        assert not os.path.exists(f"/proc/{pid1}")
    finally:
        _stop(p)
    assert json.loads((busybox_rootfs / "state.json").read_text())["cgroups"] == [victim.cgroup]

    r = nsinit(busybox_rootfs, "exec", "cat", "/proc/1/comm")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "nsinit-init\n"
    assert victim.alive() and victim.in_its_cgroup()

    r = nsinit(busybox_rootfs, "delete")
    assert r.returncode == 0, r.stderr
    assert victim.alive() and victim.in_its_cgroup()


def test_symlinks_planted_at_the_pid_file_and_its_temporary_names_are_not_written_through(
        busybox_rootfs: Path, tmp_path: Path) -> None:
    targets = {name: tmp_path / f"host-{name}" for name in ("pid", "pid-tmp", "start-tmp")}
    for t in targets.values():
        t.write_text("host data\n")
    (busybox_rootfs / "pid").symlink_to(targets["pid"])
    p = nsinit_bg(busybox_rootfs, "exec", "sh", "-c",
                  "i=0; while [ ! -f /pid ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; echo up; sleep 300")
    try:
        # the temporary names a writer would derive from nsinit's own pid, planted before it gets there
        (busybox_rootfs / f".pid.{p.pid}.tmp").symlink_to(targets["pid-tmp"])
        (busybox_rootfs / f".start.{p.pid}.tmp").symlink_to(targets["start-tmp"])
        Output(p).until("up")
        pid1 = _pid1_of(p.pid)
        assert {n: t.read_text() for n, t in targets.items()} == dict.fromkeys(targets, "host data\n")
        assert not (busybox_rootfs / "pid").is_symlink()
        assert (busybox_rootfs / "pid").read_text() == f"{pid1}\n"
    finally:
        _stop(p)
    assert {n: t.read_text() for n, t in targets.items()} == dict.fromkeys(targets, "host data\n")


# ------------------------------------------------------------------ the config in the rootfs


def test_the_container_sees_its_container_json_read_only(busybox_rootfs: Path) -> None:
    before = (busybox_rootfs / "container.json").read_text()
    r = nsinit(busybox_rootfs, "exec", "sh", "-c",
               'echo "{}" > /container.json; echo "write $?"; cat /container.json >/dev/null && echo read')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["write 1", "read"]
    assert "Read-only file system" in r.stderr
    assert (busybox_rootfs / "container.json").read_text() == before


def test_a_container_json_replaced_by_a_symlink_to_a_host_file_is_refused_not_followed(
        busybox_rootfs: Path, tmp_path: Path) -> None:
    host_file = tmp_path / "host-secret.json"
    host_file.write_text((busybox_rootfs / "container.json").read_text())  # valid: it would run
    (busybox_rootfs / "container.json").unlink()
    (busybox_rootfs / "container.json").symlink_to(host_file)
    r = nsinit(busybox_rootfs, "exec", "true")
    assert (r.returncode, r.stdout) == (125, "")
    assert r.stderr == (f"nsinit: {busybox_rootfs}/container.json: a symbolic link: refused "
                        "(it is read without following links)\n")


def test_a_container_json_replaced_by_a_fifo_is_refused_at_once(busybox_rootfs: Path) -> None:
    (busybox_rootfs / "container.json").unlink()
    os.mkfifo(busybox_rootfs / "container.json")
    r = nsinit(busybox_rootfs, "exec", "true", timeout=20)  # nobody ever writes the FIFO: no hang
    assert (r.returncode, r.stderr) == (125, f"nsinit: {busybox_rootfs}/container.json: not a regular file\n")
