"""Faults under a real nsinitd: an OOM kill named in program.exited, a fork bomb kept to its own
container (issue 8, "Faults")."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.reliability.conftest import Daemon, alive

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

MIB = 1 << 20


def _memory_controller() -> bool:
    """A v1 memory hierarchy, or memory among the cgroup2 root's controllers."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fstype, _source, opts = line.split(" - ")[1].split()
            if fstype == "cgroup" and "memory" in opts.split(","):
                return True
            if fstype == "cgroup2":
                ctl = Path(line.split()[4]) / "cgroup.controllers"
                if ctl.exists() and "memory" in ctl.read_text().split():
                    return True
    return False


@pytest.mark.slow
def test_oom_kill_is_named_in_program_exited(host_rootfs: Path, nsinitd: Callable[..., Daemon]) -> None:
    if not _memory_controller():
        pytest.skip("no memory controller")
    write_config(host_rootfs, cgroups={"memory": 32 * MIB, "memory_swap": 32 * MIB})
    d = nsinitd(f"""
        [programs.hog]
        container = "{host_rootfs}"
        command = ["python3", "-c", "x = b'x' * (512 << 20); print('survived')"]
        startsecs = 0
        autorestart = "never"
        [programs.victim]
        container = "{host_rootfs}"
        command = ["sleep", "100000"]
        startsecs = 0
        autorestart = "never"
    """)
    hog = d.wait_for("program.exited", "hog", timeout=30)
    assert hog["oom_killed"] is True, hog
    assert hog["signal"] == "SIGKILL" and hog["exit_code"] == 137 and hog["expected"] is False
    assert "survived" not in (d.run / "log" / "nsinitd" / "hog.out").read_text()

    # the same limit, no OOM: a plain SIGKILL from outside is not called an OOM kill
    victim = d.wait_for("program.running", "victim")
    os.kill(victim["pid"], signal.SIGKILL)
    ex = d.wait_for("program.exited", "victim")
    assert ex["oom_killed"] is False, ex
    assert ex["signal"] == "SIGKILL" and ex["exit_code"] == 137
    assert d.states()["hog"]["state"] == "EXITED"
    assert d.terminate() == 0


BOMB_PIDS_LIMIT = 32


def _pids_cgroup(state_json: Path) -> Path:
    cgroups = json.loads(state_json.read_text())["cgroups"]
    # the container's own directory: the deepest one (its parents are listed too)
    found = [Path(c) for c in cgroups if (Path(c) / "pids.max").exists()]
    assert found, cgroups
    return max(found, key=lambda p: len(p.parts))


# Every process forks forever and shrugs off EAGAIN: the bomb never burns out by itself, so it is
# still pressing on the limit while status is asked and when the program is stopped. (A busybox sh
# bomb ends at its first failed fork, within a second: tests/runtime/test_isolation_e2e.py.)
BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.05)
"""


@pytest.mark.slow
def test_a_fork_bomb_stays_in_its_container(host_rootfs: Path, nsinitd: Callable[..., Daemon]) -> None:
    write_config(host_rootfs, namespaces=["NEWNS", "NEWPID", "NEWUTS", "NEWIPC"],
                 cgroups={"pids_limit": BOMB_PIDS_LIMIT})
    d = nsinitd(f"""
        [programs.bomb]
        container = "{host_rootfs}"
        command = ["python3", "-c", {json.dumps(BOMB)}]
        startsecs = 0
        stopwaitsecs = 2
        [programs.calm]
        container = "{host_rootfs}"
        command = ["sleep", "100000"]
        startsecs = 0
        [programs.plain]
        command = ["sleep", "100000"]
        startsecs = 0
    """)
    d.wait_answering()
    bomb = d.wait_for("program.running", "bomb")
    calm_pid = d.wait_for("program.running", "calm")["pid"]
    plain_pid = d.wait_for("program.running", "plain")["pid"]
    pids_cg = _pids_cgroup(d.run / "state" / "nsinitd" / "bomb" / "state.json")

    lat = []
    peak = 0
    samples: list[int] = []
    end = time.monotonic() + 4
    while time.monotonic() < end:
        states, took = d.call("status")
        lat.append(took)
        by_name = {s["name"]: s for s in states}
        assert by_name["calm"]["state"] == "RUNNING" and by_name["calm"]["pid"] == calm_pid
        assert by_name["plain"]["state"] == "RUNNING" and by_name["plain"]["pid"] == plain_pid
        assert by_name["bomb"]["state"] == "RUNNING" and by_name["bomb"]["pid"] == bomb["pid"]
        cur = int((pids_cg / "pids.current").read_text())
        samples.append(cur)
        peak = max(peak, cur)
        time.sleep(0.1)
    events = (pids_cg / "pids.events").read_text().split() if (pids_cg / "pids.events").exists() else []
    refused = int(events[events.index("max") + 1]) if "max" in events else None
    print(f"\nfork bomb: peak {peak} tasks, forks refused {refused}, status max {max(lat) * 1000:.1f} ms; "
          f"tasks over time {samples}")
    assert peak <= BOMB_PIDS_LIMIT
    assert refused is None or refused > 0  # it really was a bomb pressing on the limit
    assert samples[-1] >= BOMB_PIDS_LIMIT - 2, samples  # and it still is
    assert sorted(lat)[len(lat) // 2] < 0.1 and max(lat) < 0.25, sorted(lat)
    # host processes still fork
    assert os.waitpid(os.spawnvp(os.P_NOWAIT, "true", ["true"]), 0)[1] == 0

    result, _ = d.call("stop", name="bomb", timeout=30)
    assert result["state"] == "STOPPED"
    destroyed = d.wait_for("container.destroyed", "bomb")
    assert "error" not in destroyed["released"], destroyed
    assert not alive(bomb["pid"])
    assert not pids_cg.exists()
    assert not [c for c in destroyed["released"]["cgroups"] if Path(c).exists()]
    states = d.states()
    assert states["calm"]["state"] == "RUNNING" and states["calm"]["pid"] == calm_pid
    assert states["plain"]["state"] == "RUNNING" and states["plain"]["pid"] == plain_pid
    assert d.terminate() == 0
