"""What podman's config.json asks of nsrun beyond the plain spec (issue 16), one runtime behaviour
per test, on a bundle driven as conmon drives it. tests/oci/test_podman.py runs real podman."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsruntime import cgroups, libc
from nsruntime.cgroups.v2 import V2Dir
from nsruntime.config import MAX_MEMORY, Cgroups
from nsruntime.consts import MNT_DETACH, MS_BIND, MS_SHARED
from nsruntime.errors import SetupError
from tests.oci.test_nsrun import Bundle
from tests.runtime.test_cgroups import _fake_v2

pytestmark = pytest.mark.privileged


def test_a_tmpfs_with_tmpcopyup_starts_with_what_the_image_had_there(bundle: Bundle) -> None:
    """podman's --read-only and --tmpfs mounts say tmpcopyup (a runc extension): the tmpfs starts
    as a copy of the directory it covers, and what is written there never reaches the image."""
    data = bundle.rootfs / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "file").write_text("from the image\n")
    (data / "link").symlink_to("sub/file")
    os.chown(data / "sub" / "file", 1000, 1000)
    os.chmod(data / "sub", 0o710)
    os.chmod(data, 0o751)
    bundle.spec["mounts"].append({"destination": "/data", "type": "tmpfs", "source": "tmpfs",
                                  "options": ["rw", "rprivate", "nosuid", "nodev", "tmpcopyup"]})
    bundle.spec["process"]["args"] = [
        "sh", "-c", "grep -c ' /data tmpfs ' /proc/mounts; cat /data/link; readlink /data/link; "
        "stat -c '%a %u' /data /data/sub /data/sub/file; echo new > /data/new; cat /data/new"]
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), "cu")
    assert p.returncode == 0, p.stdout
    assert p.stdout.splitlines() == ["1", "from the image", "sub/file", "751 0", "710 0", "644 1000", "new"]
    assert sorted(os.listdir(data)) == ["link", "sub"], "the writes went to the tmpfs"


def test_a_read_only_tmpfs_with_tmpcopyup_is_filled_then_made_read_only(bundle: Bundle) -> None:
    (bundle.rootfs / "data").mkdir()
    (bundle.rootfs / "data" / "file").write_text("kept\n")
    bundle.spec["mounts"].append({"destination": "/data", "type": "tmpfs", "source": "tmpfs",
                                  "options": ["ro", "tmpcopyup", "size=1m"]})
    bundle.spec["process"]["args"] = ["sh", "-c", "cat /data/file; touch /data/x 2>/dev/null || echo ro"]
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), "cu")
    assert (p.returncode, p.stdout) == (0, "kept\nro\n")


def test_tmpcopyup_is_refused_on_anything_but_a_tmpfs(bundle: Bundle) -> None:
    bundle.spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(bundle.rootfs / "tmp"),
                                  "options": ["rbind", "tmpcopyup"]})
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stdout) == (1, 'nsrun: mounts[6].options[1]: "tmpcopyup" only applies to a tmpfs\n')


@pytest.fixture
def open_bundle(tmp_path: Path) -> Iterator[Bundle]:
    """A bundle whose rootfs an unprivileged host id can reach (pytest's own tmp dir is 0700),
    as podman makes its rootfs for --uidmap."""
    libc.set_subreaper()
    top = Path(tempfile.mkdtemp(prefix="nsrun-userns-", dir="/tmp"))
    try:
        top.chmod(0o711)
        b = Bundle(top)
        b.root = tmp_path / "state"  # the records stay root's only
        yield b
        for cid in os.listdir(b.root) if b.root.exists() else []:
            b.nsrun("delete", "--force", cid)
        for pid in list(b.pids):
            b.reap(pid)
    finally:
        shutil.rmtree(top)


def test_a_container_with_a_user_namespace_is_created_then_started(open_bundle: Bundle) -> None:
    """podman --uidmap: the command's process waits for start as root of its user namespace (an
    unprivileged id on the host), yet start.fifo lies in nsrun's root-only state directory."""
    bundle = open_bundle
    bundle.spec["linux"]["namespaces"].append({"type": "user"})
    bundle.spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    bundle.spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    bundle.spec["process"]["args"] = ["sh", "-c", "cat /proc/self/uid_map > /tmp/marker"]
    os.chmod(bundle.rootfs / "tmp", 0o1777)
    bundle.write()
    cid = f"userns-{os.getpid()}"  # its cgroup nsrun/ID: apart from other test runs' c1
    pid = bundle.create(cid)
    assert bundle.state(cid)["status"] == "created"
    assert bundle.nsrun("start", cid).returncode == 0
    status = bundle.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert (bundle.rootfs / "tmp" / "marker").read_text().split() == ["0", "100000", "65536"]
    assert bundle.nsrun("delete", cid).returncode == 0


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A host directory that is a shared mount (its own peer group): what the host mounts below it
    reaches every slave copy of it."""
    src = tmp_path / "shared"
    (src / "sub").mkdir(parents=True)
    libc.mount(str(src), str(src), None, MS_BIND)
    try:
        libc.mount(None, str(src), None, MS_SHARED)
        yield src
    finally:
        with contextlib.suppress(OSError):
            libc.umount2(str(src / "sub"), MNT_DETACH)
        libc.umount2(str(src), MNT_DETACH)


def test_rslave_root_propagation_lets_the_hosts_later_mounts_reach_an_rslave_bind(bundle: Bundle,
                                                                                    shared_dir: Path) -> None:
    """podman's --mount ...,bind-propagation=rslave sets rootfsPropagation rslave: the host's
    mounts below the bind's source, even those made after create, show in the container; the
    container's own mounts never reach the host."""
    bundle.spec["linux"]["rootfsPropagation"] = "rslave"
    bundle.spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(shared_dir),
                                  "options": ["rbind", "rslave"]})
    bundle.spec["process"]["args"] = ["sh", "-c", "grep -c ' /data/sub tmpfs ' /proc/mounts > /tmp/marker; "
                                      "mount -t tmpfs own /data/own"]
    caps = ["CAP_SYS_ADMIN"]
    bundle.spec["process"]["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}
    (shared_dir / "own").mkdir()
    bundle.write()
    cid = f"rslave-{os.getpid()}"
    pid = bundle.create(cid)
    libc.mount("tmpfs", str(shared_dir / "sub"), "tmpfs", 0, "size=1m")  # on the host, after create
    assert bundle.nsrun("start", cid).returncode == 0
    status = bundle.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert bundle.marker() and (bundle.rootfs / "tmp" / "marker").read_text() == "1\n"
    assert not os.path.ismount(shared_dir / "own"), "the container's mount stayed in the container"
    assert bundle.nsrun("delete", cid).returncode == 0


@pytest.mark.parametrize("propagation", ["shared", "rshared", "unbindable"])
def test_a_root_propagation_that_would_reach_the_host_is_refused(bundle: Bundle, propagation: str) -> None:
    bundle.spec["linux"]["rootfsPropagation"] = propagation
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stdout) == (1, f'nsrun: linux.rootfsPropagation: "{propagation}": not supported (private, '
                                           'rprivate, slave or rslave: the container\'s mounts never reach the host)\n')


def test_podmans_memory_reservation_swappiness_oom_killer_and_cpuset_mems_reach_the_cgroups(bundle: Bundle) -> None:
    """--memory-reservation, --memory-swappiness, --oom-kill-disable and --cpuset-mems."""
    cid = f"res-{os.getpid()}"
    bundle.spec["linux"]["resources"] = {
        "memory": {"limit": 64 << 20, "reservation": 32 << 20, "swappiness": 10, "disableOOMKiller": True},
        "cpu": {"mems": "0"}}
    bundle.write()
    bundle.create(cid)
    memory = Path(f"/sys/fs/cgroup/memory{_own_cgroup('memory')}/nsrun/{cid}")
    assert (memory / "memory.soft_limit_in_bytes").read_text() == f"{32 << 20}\n"
    assert (memory / "memory.swappiness").read_text() == "10\n"
    assert (memory / "memory.oom_control").read_text().splitlines()[0] == "oom_kill_disable 1"
    assert Path(f"/sys/fs/cgroup/cpuset{_own_cgroup('cpuset')}/nsrun/{cid}/cpuset.mems").read_text() == "0\n"


def _own_cgroup(controller: str) -> str:
    """This process's cgroup in the v1 hierarchy of controller ('' at the root): nsrun's parent."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _n, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return "" if path == "/" else path
    raise AssertionError(f"no v1 {controller} hierarchy")


@pytest.mark.parametrize(("memory", "message"), [
    ({"swappiness": 101}, "linux.resources.memory.swappiness: 101 out of range (0..100)\n"),
    ({"reservation": -2}, f"linux.resources.memory.reservation: -2 out of range (-1..{MAX_MEMORY})\n"),
])
def test_podmans_memory_settings_out_of_range_are_refused(bundle: Bundle, memory: dict[str, int],
                                                          message: str) -> None:
    bundle.spec["linux"]["resources"] = {"memory": memory}
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stdout) == (1, f"nsrun: {message}")


def test_on_cgroup_v2_reservation_mems_and_throttles_go_to_their_files_v1_only_ones_are_refused(
        tmp_path: Path) -> None:
    layout, leaf = _fake_v2(tmp_path)
    for name in ("memory.low", "cpuset.mems", "io.max"):
        (leaf / name).write_text("")
    cfg = Cgroups(memory_reservation=32 << 20, cpuset_mems="0", blkio_throttle=(("write_iops", 8, 0, 300),))
    plan = cgroups._plan(cfg, layout)
    assert plan == {layout.unified: {"memory", "cpuset", "io"}}
    V2Dir(str(leaf), frozenset(plan[layout.unified])).apply(cfg)  # type: ignore[index]
    got = {name: (leaf / name).read_text() for name in ("memory.low", "cpuset.mems", "io.max")}
    assert got == {"memory.low": str(32 << 20), "cpuset.mems": "0", "io.max": "8:0 wiops=300"}
    for field in ({"memory_swappiness": 10}, {"oom_kill_disable": True}):
        name = next(iter(field))
        with pytest.raises(SetupError) as e:
            cgroups._plan(Cgroups(**field), layout)
        assert str(e.value) == f"cgroups: {name}: cgroup v2 has no such setting (the memory controller here is v2's)"


def _a_disk() -> tuple[int, int]:
    """A whole disk's major and minor (throttles take disks, not partitions)."""
    for name in sorted(os.listdir("/sys/block")):
        with contextlib.suppress(OSError):
            major, minor = (Path("/sys/block") / name / "dev").read_text().split(":")
            return int(major), int(minor)
    pytest.skip("no block device in /sys/block")


def test_podmans_device_read_and_write_limits_reach_the_blkio_throttles(bundle: Bundle) -> None:
    """--device-read-bps, --device-write-bps, --device-read-iops, --device-write-iops."""
    major, minor = _a_disk()
    cid = f"blk-{os.getpid()}"
    bundle.spec["linux"]["resources"] = {"blockIO": {
        "throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1 << 20}],
        "throttleWriteBpsDevice": [{"major": major, "minor": minor, "rate": 2 << 20}],
        "throttleReadIOPSDevice": [{"major": major, "minor": minor, "rate": 300}],
        "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 400}]}}
    bundle.write()
    bundle.create(cid)
    blkio = Path(f"/sys/fs/cgroup/blkio{_own_cgroup('blkio')}/nsrun/{cid}")
    got = {kind: (blkio / f"blkio.throttle.{kind}_device").read_text()
           for kind in ("read_bps", "write_bps", "read_iops", "write_iops")}
    assert got == {"read_bps": f"{major}:{minor} {1 << 20}\n", "write_bps": f"{major}:{minor} {2 << 20}\n",
                   "read_iops": f"{major}:{minor} 300\n", "write_iops": f"{major}:{minor} 400\n"}


def test_a_throttle_on_a_device_the_kernel_does_not_know_is_refused_naming_the_file(bundle: Bundle) -> None:
    bundle.spec["linux"]["resources"] = {"blockIO": {
        "throttleReadBpsDevice": [{"major": 4095, "minor": 4095, "rate": 1 << 20}]}}
    bundle.write()
    cid = f"blk-{os.getpid()}"
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), cid)
    assert p.returncode == 1
    want = f"nsrun: cgroups: blkio_throttle: write '4095:4095 {1 << 20}' to /sys/fs/cgroup/blkio"
    assert p.stdout.startswith(want), p.stdout
    assert not (bundle.root / cid).exists()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="LINUX32 on x86_64 says i686")
def test_podmans_personality_linux32_makes_the_command_see_a_32_bit_machine(bundle: Bundle) -> None:
    """--personality LINUX32: linux.personality's domain, set right before the command's execve."""
    bundle.spec["linux"]["personality"] = {"domain": "LINUX32"}
    bundle.spec["process"]["args"] = ["uname", "-m"]
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), f"pers-{os.getpid()}")
    assert (p.returncode, p.stdout) == (0, "i686\n")


@pytest.mark.parametrize(("personality", "message"), [
    ({"domain": "LINUX64"}, 'linux.personality.domain: "LINUX64" is not LINUX or LINUX32'),
    ({"domain": "LINUX", "flags": ["ADDR_NO_RANDOMIZE"]}, "linux.personality.flags: not supported"),
])
def test_a_personality_nsrun_cannot_honour_is_refused(bundle: Bundle, personality: dict[str, object],
                                                      message: str) -> None:
    bundle.spec["linux"]["personality"] = personality
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stdout) == (1, f"nsrun: {message}\n")


def test_pid1_of_a_created_container_shows_no_host_paths_in_its_command_line(bundle: Bundle) -> None:
    """PID 1 is forked from `nsrun create`, whose command line names the bundle and log paths of
    the host: podman top and /proc/1/cmdline inside show nsinit-init instead."""
    bundle.spec["process"]["args"] = ["sh", "-c", "cat /proc/1/cmdline > /tmp/marker"]
    bundle.write()
    pid = bundle.create(f"title-{os.getpid()}")
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"nsinit-init\0"
    assert bundle.nsrun("start", f"title-{os.getpid()}").returncode == 0
    bundle.reap(pid)
    assert (bundle.rootfs / "tmp" / "marker").read_bytes() == b"nsinit-init\0"
