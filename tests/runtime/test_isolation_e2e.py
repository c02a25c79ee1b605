"""Isolation end to end through `nsinit exec`: capabilities, no_new_privs, cgroup limits, a fork bomb,
an OOM kill, AppArmor refusal. A busybox probe inside reports what the container sees; the host
reads the cgroup files named in the container's state.json while it runs, and finds them gone after.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from nsruntime import capabilities
from tests.conftest import NSINIT, REPO, nsinit, records, write_config

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

CAP = {name: i for i, name in enumerate(capabilities.NAMES)}


def _caps(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap") or key == "NoNewPrivs":
            out[key] = int(value.strip(), 16 if key.startswith("Cap") else 10)
    return out


def _host_caps() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return _caps(f.read())


def _bit(*names: str) -> int:
    m = 0
    for n in names:
        m |= 1 << CAP[n]
    return m


def _until(p: subprocess.Popen[bytes], marker: str, timeout: float = 15.0) -> list[str]:
    """Lines the container printed up to ``marker`` (bounded). Raw reads: a buffered readline
    would keep lines in its buffer where select can't see them."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        lines = data.decode(errors="replace").splitlines()
        if marker in lines:
            return lines
    p.kill()
    _, err = p.communicate(timeout=10)
    raise AssertionError(f"no {marker!r} within {timeout} s: {data!r} {err!r}")


def _stop(p: subprocess.Popen[bytes]) -> int:
    p.send_signal(signal.SIGTERM)  # forwarded to the command
    try:
        p.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate(timeout=10)
    return p.returncode


def _bg(root: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*NSINIT, *args], cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _state(root: Path) -> dict[str, object]:
    return json.loads((records(root) / "state.json").read_text())  # type: ignore[no-any-return]


def _file(paths: list[str], name: str) -> str:
    """``name`` from the container's own directories (the leaves), not from the parent's."""
    leaves = [p for p in paths if not any(q.startswith(p + "/") for q in paths)]
    for p in leaves:
        f = os.path.join(p, name)
        if os.path.exists(f):
            with open(f) as fh:
                return fh.read().strip()
    raise AssertionError(f"no {name} in {paths}")


def test_capabilities_mask_and_no_new_privs_inside(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, capabilities_mask=["MKNOD", "CAP_CHOWN", "net_raw"])
    r = nsinit(busybox_rootfs, "exec", "cat", "/proc/self/status")
    assert r.returncode == 0, r.stderr
    inside, host = _caps(r.stdout), _host_caps()
    gone = _bit("MKNOD", "CHOWN", "NET_RAW")
    for s in ("CapBnd", "CapEff", "CapPrm"):
        assert inside[s] & gone == 0, s
        assert inside[s] == host[s] & ~gone, s  # the others stay
    assert inside["CapInh"] & gone == 0 and inside["CapAmb"] & gone == 0
    assert inside["NoNewPrivs"] == 1


def test_newcgroup_roots_the_container_at_its_own_cgroups(busybox_rootfs: Path) -> None:
    # PID 1 unshares NEWCGROUP once it is inside every cgroup of the container (the cgroup2 one by
    # clone3): the container sees its cgroups as "/", and the host sees it in the container's own
    write_config(busybox_rootfs, namespaces=["NEWNS", "NEWUTS", "NEWIPC", "NEWPID", "NEWNET", "NEWCGROUP"])
    p = _bg(busybox_rootfs, "exec", "sh", "-c", "cat /proc/self/cgroup; echo DONE; exec sleep 30")
    try:
        lines = _until(p, "DONE")
        cgroup_lines = [line for line in lines if line.count(":") >= 2 and not line.split(":")[1].startswith("name=")]
        assert cgroup_lines and all(line.endswith(":/") for line in cgroup_lines), lines
        st = _state(busybox_rootfs)
        pid = int((busybox_rootfs / "pid").read_text())
        paths: list[str] = st["cgroups"]  # type: ignore[assignment]
        for leaf in [c for c in paths if not any(q.startswith(c + "/") for q in paths)]:
            with open(os.path.join(leaf, "cgroup.procs")) as f:
                assert str(pid) in f.read().split(), leaf
    finally:
        assert _stop(p) in (0, 137, 143)


def test_no_new_privileges_can_be_turned_off(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, no_new_privileges=False)
    r = nsinit(busybox_rootfs, "exec", "cat", "/proc/self/status")
    assert r.returncode == 0, r.stderr
    assert _caps(r.stdout)["NoNewPrivs"] == 0


def test_mknod_and_chown_fail_without_their_capabilities(busybox_rootfs: Path) -> None:
    probe = "mknod /tmp/null c 1 3; echo mknod=$?; touch /tmp/f; chown 1000 /tmp/f; echo chown=$?"
    write_config(busybox_rootfs, capabilities_mask=["MKNOD", "CHOWN"])
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", probe)
    assert "mknod=1" in r.stdout and "chown=1" in r.stdout, (r.stdout, r.stderr)
    assert not (busybox_rootfs / "tmp" / "null").exists() and (busybox_rootfs / "tmp" / "f").stat().st_uid == 0
    write_config(busybox_rootfs, capabilities_mask=[])
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", probe)
    assert "mknod=0" in r.stdout and "chown=0" in r.stdout, (r.stdout, r.stderr)


def test_unknown_capability_is_a_config_error(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, capabilities_mask=["MKNOD", "CAP_FLY"])
    r = nsinit(busybox_rootfs, "exec", "true")
    assert r.returncode == 125
    assert "capabilities_mask[1]" in r.stderr and "CAP_FLY" in r.stderr and r.stderr.count("\n") == 1


def test_limits_read_inside_and_outside_while_running_and_gone_after(busybox_rootfs: Path) -> None:
    parent = f"nsinit-e2e-{uuid.uuid4().hex[:8]}"
    write_config(busybox_rootfs, cgroups={"parent": parent, "memory": 64 << 20, "memory_swap": 64 << 20,
                                          "pids_limit": 40, "cpu_shares": 256, "cpu_quota": 20000,
                                          "cpu_period": 100000, "cpuset_cpus": "0"})
    p = _bg(busybox_rootfs, "exec", "sh", "-c",
                  "cat /proc/self/cgroup; grep Cpus_allowed_list /proc/self/status; echo ready; exec sleep 30")
    try:
        lines = _until(p, "ready")
        paths = [str(x) for x in _state(busybox_rootfs)["cgroups"]]  # type: ignore[attr-defined]
        assert paths and all(os.path.isdir(x) for x in paths)
        # inside: the command is in the container's cgroup of every hierarchy, on the allowed cpu only
        membership = [ln for ln in lines if ln.count(":") >= 2 and not ln.split(":")[1].startswith("name=")]
        assert membership and all(ln.endswith(f"/{parent}/" + ln.rsplit("/", 1)[1]) for ln in membership), lines
        assert "Cpus_allowed_list:\t0" in lines
        # outside: the files hold the limits, and PID 1 and the command are counted
        assert _file(paths, "memory.limit_in_bytes") == str(64 << 20)
        assert _file(paths, "pids.max") == "40"
        assert _file(paths, "cpu.shares") == "256"
        assert _file(paths, "cpu.cfs_quota_us") == "20000"
        assert _file(paths, "cpuset.cpus") == "0"
        assert int(_file(paths, "pids.current")) == 2  # nsinit-init and sleep
    finally:
        rc = _stop(p)
    assert rc == 128 + signal.SIGTERM
    assert [x for x in paths if os.path.exists(x)] == []


def test_fork_bomb_is_contained_by_pids_limit(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, cgroups={"pids_limit": 24})
    # each round forks a sleeper: busybox sh gives up (and exits) at the first fork that fails
    bomb = "i=0; while [ $i -lt 500 ]; do sleep 60 & i=$((i+1)); echo $i; done"
    t0 = time.monotonic()
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", bomb, timeout=30)
    assert time.monotonic() - t0 < 20
    forked = [int(x) for x in r.stdout.split()]
    # 24 tasks: nsinit-init, sh, and the sleepers
    assert forked and max(forked) <= 22, r.stdout
    assert "can't fork" in r.stderr


def test_classic_fork_bomb_ends(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, cgroups={"pids_limit": 32})
    t0 = time.monotonic()
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "b() { b | b & }; b; sleep 1", timeout=40)
    assert time.monotonic() - t0 < 30, r.stderr
    assert r.returncode in (0, 2), r.stderr


def test_oom_kill_is_counted_while_the_container_lives(busybox_rootfs: Path) -> None:
    from nsruntime import cgroups

    write_config(busybox_rootfs, cgroups={"memory": 32 << 20, "memory_swap": 32 << 20})
    # tail keeps a line in memory: /dev/zero has no newline, so it grows until the OOM killer ends it
    p = _bg(busybox_rootfs, "exec", "sh", "-c", "tail /dev/zero; echo status=$?; echo ready; exec sleep 30")
    try:
        lines = _until(p, "ready", timeout=30)
        assert "status=137" in lines
        cg = cgroups.from_paths([str(x) for x in _state(busybox_rootfs)["cgroups"]])  # type: ignore[attr-defined]
        st = cg.stats()
        assert st["oom_kills"] >= 1
        assert st["memory_peak_bytes"] <= 32 << 20
    finally:
        _stop(p)


def test_apparmor_profile_is_refused_without_apparmor(busybox_rootfs: Path) -> None:
    from nsruntime import apparmor

    if apparmor.enabled():
        pytest.skip("AppArmor is enabled here")
    write_config(busybox_rootfs, context={"apparmor_profile": "docker-default"})
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "echo ran unconfined")
    assert r.returncode == 125
    assert "ran unconfined" not in r.stdout
    assert "apparmor" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_refused_limit_leaves_nothing_and_names_step_path_errno(busybox_rootfs: Path) -> None:
    parent = f"nsinit-e2e-{uuid.uuid4().hex[:8]}"
    write_config(busybox_rootfs, cgroups={"parent": parent, "cpuset_cpus": str((os.cpu_count() or 1) + 100)})
    r = nsinit(busybox_rootfs, "exec", "true")
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and "cpuset_cpus" in r.stderr and "cpuset.cpus" in r.stderr, r.stderr
    assert "ERANGE" in r.stderr or "EINVAL" in r.stderr
    assert not (busybox_rootfs / "pid").exists()
    # os.walk, not rglob: a directory another container removes meanwhile is passed over, not an error
    left = [d for base in Path("/sys/fs/cgroup").iterdir() if base.name != "memory"
            for d, subdirs, _ in os.walk(base) if parent in subdirs]
    assert not left
