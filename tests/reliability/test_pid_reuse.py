"""Pid reuse can't make nsinitd or `nsinit exec` kill, adopt or join a stranger (issue 8, "Crashes").

A pid file left behind names a live process that isn't ours: after a crash and a reboot-free pid
wrap, any process may hold that pid. What proves a container is ours is the pid *and* its start
time; here the start time is wrong, as it always is for a reused pid.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_busybox_rootfs, nsinit, records
from tests.reliability.conftest import Daemon, alive, proc_start_time

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _plant(state: Path, pid: int) -> int:
    """pid and start files naming pid with a start time that isn't its own; returns the wrong one."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    wrong = proc_start_time(pid) + 12345
    (state / "pid").write_text(f"{pid}\n")
    (state / "start").write_text(f"{wrong}\n")
    return wrong


@pytest.mark.slow
def test_nsinitd_neither_kills_nor_adopts_a_stranger(tmp_path: Path, nsinitd: Callable[..., Daemon],
                                                      stranger: subprocess.Popen[bytes]) -> None:
    box = make_busybox_rootfs(tmp_path / "bb", {"namespaces": ["NEWNS", "NEWPID", "NEWUTS", "NEWIPC"]})
    state = tmp_path / "run" / "state" / "nsinitd"
    for name in ("box", "plain"):
        _plant(state / name, stranger.pid)
    d = nsinitd(f"""
        [programs.box]
        container = "{box}"
        command = ["sleep", "100000"]
        startsecs = 0
        [programs.plain]
        command = ["sleep", "100000"]
        startsecs = 0
    """)
    running = {name: d.wait_for("program.running", name)["pid"] for name in ("box", "plain")}
    assert stranger.poll() is None and alive(stranger.pid)
    assert stranger.pid not in running.values()
    assert not d.find("container.reclaimed")
    for name, pid in running.items():  # the stale files were replaced by the new instance's
        assert (state / name / "pid").read_text().strip() == str(pid)
        assert int((state / name / "start").read_text()) == proc_start_time(pid)
    # the container is a new one, not the stranger entered: its PID 1 is our init
    assert Path(f"/proc/{running['box']}/comm").read_text().strip() == "nsinit-init"
    assert os.readlink(f"/proc/{running['box']}/ns/pid") != os.readlink(f"/proc/{stranger.pid}/ns/pid")
    assert d.terminate() == 0
    assert stranger.poll() is None and alive(stranger.pid)


def test_nsinit_exec_neither_kills_nor_joins_a_stranger(busybox_rootfs: Path,
                                                        stranger: subprocess.Popen[bytes]) -> None:
    _plant(records(busybox_rootfs), stranger.pid)  # stale records, where nsinit keeps them
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "cat /proc/1/comm; hostname")
    assert r.returncode == 0, r.stderr
    # a new container (our init as PID 1, its own host name), not a join into the stranger's namespaces
    assert r.stdout.split() == ["nsinit-init", "koye"]
    assert stranger.poll() is None and alive(stranger.pid)
    assert not (busybox_rootfs / "pid").exists() and not records(busybox_rootfs).exists()
