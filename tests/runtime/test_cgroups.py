"""nsruntime.cgroups against the real kernel, with plain forked processes (no container).

Each test makes its cgroups under its own parent, and the fixtures kill and remove whatever a test
left, so a failing test doesn't leak into the next one (the suite's host_unchanged check would
name it anyway).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nsruntime import cgroups
from nsruntime.cgroups import detect as det
from nsruntime.cgroups.base import CgroupSet
from nsruntime.cgroups.v1 import DEFAULT_DEVICE_RULES, prepare
from nsruntime.cgroups.v2 import V2Dir, blkio_to_io_weight, enable, shares_to_weight
from nsruntime.config import Cgroups, DeviceRule, parse
from nsruntime.errors import ConfigError, SetupError, StateError, TeardownError

REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0 and os.path.isdir("/sys/fs/cgroup")


def _layout() -> det.Layout:
    return det.detect()


def _blkio_weight_file() -> str | None:
    """The v1 weight file this kernel offers: blkio.weight (CFQ), blkio.bfq.weight (BFQ), or None."""
    blkio = _layout().v1("blkio")
    if blkio is None:
        return None
    return next((f for f in ("blkio.weight", "blkio.bfq.weight") if os.path.exists(os.path.join(blkio.base, f))),
                None)


def _uid() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def parent() -> str:
    return f"nsinit-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def made() -> Iterator[Callable[..., CgroupSet]]:
    """setup() whose result is killed and destroyed after the test, whatever happened."""
    sets: list[CgroupSet] = []

    def make(cfg: Cgroups, cid: str | None = None) -> CgroupSet:
        cg = cgroups.setup(cfg, cid or _uid())
        sets.append(cg)
        return cg

    yield make
    for cg in sets:
        try:
            cg.kill(timeout=5)
        finally:
            cg.destroy(timeout=5)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a command already inside a CgroupSet (joined between fork and exec)."""
    procs: list[subprocess.Popen[str]] = []

    def start(cg: CgroupSet | None, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        pre = (lambda: cg.join(0)) if cg is not None else None
        p = subprocess.Popen(argv, preexec_fn=pre, text=True, **kw)  # type: ignore[call-overload]
        procs.append(p)
        return p  # type: ignore[no-any-return]

    yield start
    for p in procs:
        with p:  # leaving closes its pipes
            if p.poll() is None:
                p.kill()
            p.wait(timeout=5)


def _wait(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _readline(p: subprocess.Popen[str], timeout: float = 10.0) -> str:
    assert p.stdout is not None
    r, _, _ = select.select([p.stdout], [], [], timeout)
    assert r, f"no output within {timeout} s"
    return p.stdout.readline()


def _leaf(cg: CgroupSet, controller: str) -> str:
    h = _layout().v1(controller)
    for d in cg.leaves:
        if d.version == 1 and h is not None and d.path.startswith(h.mountpoint + "/"):
            return d.path
    raise AssertionError(f"no {controller} directory in {cg.paths}")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _dead(pid: int) -> bool:
    try:
        return _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _gone(paths: list[str]) -> None:
    assert [p for p in paths if os.path.exists(p)] == []


# ------------------------------------------------------------------ layout detection (no privilege)

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
77 60 0:32 /process_api /mnt/mem\\040x rw,relatime - cgroup cgroup rw,memory
"""
HYBRID_CGROUP = "4:memory:/process_api/abc\n2:cpu,cpuacct:/\n1:name=systemd:/user.slice\n0::/user.slice/x.scope\n"


def test_detect_parses_hybrid_comounted_and_nested() -> None:
    lay = det.parse(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert lay.kind == "hybrid"
    cpu = lay.v1("cpuacct")
    assert cpu is not None and cpu.controllers == {"cpu", "cpuacct"} and cpu.base == "/sys/fs/cgroup/cpu,cpuacct"
    mem = lay.v1("memory")
    assert mem is not None and mem.base == "/sys/fs/cgroup/memory/process_api/abc"  # first mount wins
    assert lay.unified is not None and lay.unified.base == "/sys/fs/cgroup/unified/user.slice/x.scope"
    named = [h for h in lay.hierarchies if h.name == "systemd"]
    assert named and not named[0].controllers


def test_detect_parses_pure_v2_and_a_namespaced_mount_root() -> None:
    mi = "30 23 0:26 /ctr /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    lay = det.parse(mi, "0::/ctr/inner\n")
    assert lay.kind == "v2" and lay.unified is not None
    assert lay.unified.base == "/sys/fs/cgroup/inner"
    # a mount that doesn't show our cgroup is not used
    assert det.parse(mi, "0::/elsewhere\n").kind == "none"


def test_detect_parses_pure_v1_with_escaped_mountpoint() -> None:
    mi = "77 60 0:32 / /mnt/c\\040g rw - cgroup cgroup rw,pids\n"
    lay = det.parse(mi, "8:pids:/a\n")
    assert lay.kind == "v1"
    h = lay.v1("pids")
    assert h is not None and h.base == "/mnt/c g/a"


@pytest.mark.parametrize("shares,weight", [(2, 1), (1024, 39), (262144, 10000)])
def test_cpu_shares_to_weight(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == weight


def test_blkio_weight_to_io_weight() -> None:
    assert (blkio_to_io_weight(10), blkio_to_io_weight(1000)) == (1, 10000)


# ------------------------------------------------------------------ v2 files against a fake tree
# This machine's cgroup2 tree has no controllers, so the v2 limit files can't be shown by the kernel:
# the values written are checked on plain files instead.

V2_FILES = ("memory.max", "memory.swap.max", "cpu.weight", "cpu.max", "cpuset.cpus", "pids.max", "io.weight")


def _fake_v2(tmp_path: Path) -> tuple[det.Layout, Path]:
    base = tmp_path / "unified"
    leaf = base / "nsinit" / "c1"
    leaf.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for d in (base, base / "nsinit"):
        (d / "cgroup.subtree_control").write_text("")
    for name in V2_FILES:
        (leaf / name).write_text("")
    return det.Layout((det.Hierarchy(2, str(base), frozenset(), str(base)),)), leaf


def test_v2_limits_written_to_their_files(tmp_path: Path) -> None:
    layout, leaf = _fake_v2(tmp_path)
    cfg = Cgroups(memory=64 << 20, memory_swap=96 << 20, cpu_shares=1024, cpu_quota=50000, cpu_period=100000,
                  cpuset_cpus="0", pids_limit=-1, blkio_weight=500)
    plan = cgroups._plan(cfg, layout)
    assert plan == {layout.unified: {"memory", "cpu", "cpuset", "pids", "io"}}
    V2Dir(str(leaf), frozenset(plan[layout.unified])).apply(cfg)  # type: ignore[index]
    got = {n: (leaf / n).read_text() for n in V2_FILES}
    assert got == {"memory.max": str(64 << 20), "memory.swap.max": str(32 << 20), "cpu.weight": "39",
                   "cpu.max": "50000 100000", "cpuset.cpus": "0", "pids.max": "max", "io.weight": "default 4950"}
    base = layout.hierarchies[0].base
    enable(base, str(leaf), frozenset({"memory"}))
    # in every directory above the leaf, none in the leaf
    assert (leaf.parent / "cgroup.subtree_control").read_text() == "+memory"
    assert (leaf.parent.parent / "cgroup.subtree_control").read_text() == "+memory"
    assert not (leaf / "cgroup.subtree_control").exists()
    # a controller already passed down is not written again
    (leaf.parent / "cgroup.subtree_control").write_text("memory")
    (leaf.parent.parent / "cgroup.subtree_control").write_text("memory")
    enable(base, str(leaf), frozenset({"memory"}))
    assert (leaf.parent / "cgroup.subtree_control").read_text() == "memory"


def test_v2_refuses_device_rules_and_missing_controllers(tmp_path: Path) -> None:
    layout, _leaf = _fake_v2(tmp_path)
    with pytest.raises(SetupError, match="devices: device rules need the v1 devices controller"):
        cgroups._plan(Cgroups(devices=(DeviceRule(True, "c", 1, 3, "r"),)), layout)
    (Path(layout.hierarchies[0].base) / "cgroup.controllers").write_text("cpu\n")
    with pytest.raises(SetupError, match="cgroups: pids_limit: no cgroup hierarchy offers the pids controller"):
        cgroups._plan(Cgroups(pids_limit=10), layout)
    # the default policy alone is not an error on v2 (documented as not enforced there)
    assert cgroups._plan(Cgroups(), layout) == {}


def test_config_validation_of_cgroup_fields() -> None:
    with pytest.raises(ConfigError, match=r"cgroups.cpu_quota"):
        parse({"cgroups": {"cpu_quota": 10}})
    with pytest.raises(ConfigError, match=r"cgroups.devices\[0\].major"):
        parse({"cgroups": {"devices": [{"type": "a", "major": 1}]}})
    cfg = parse({"cgroups": {"cpu_quota": -1, "devices": [{"type": "c", "major": 1, "minor": 11, "access": "r"}]}})
    assert cfg.cgroups.devices == (DeviceRule(True, "c", 1, 11, "r"),)


# ------------------------------------------------------------------ the real kernel

@pytest.mark.privileged
@pytest.mark.skipif(not ROOT, reason="needs root and mounted cgroups")
class TestKernel:
    def test_this_machine_layout_bases_are_our_own_cgroups(self) -> None:
        lay = _layout()
        assert lay.kind in ("v1", "v2", "hybrid")
        own = det.parse_proc_cgroup(_read("/proc/self/cgroup"))
        for h in lay.hierarchies:
            assert os.path.isdir(h.base)
            key = None if h.version == 2 else frozenset(h.controllers | ({f"name={h.name}"} if h.name else set()))
            assert h.base.endswith(own[key].rstrip("/")) or own[key] == "/"

    def test_defaults_make_one_dir_per_hierarchy_below_our_own_cgroup(
            self, made: Callable[..., CgroupSet], parent: str, spawn: Callable[..., subprocess.Popen[str]]) -> None:
        cid = _uid()
        cg = made(Cgroups(parent=parent), cid)
        lay = _layout()
        expect = [os.path.join(h.base, parent, cid) for h in lay.hierarchies if h.version == 2 or h.controllers]
        assert [d.path for d in cg.leaves] == expect
        assert all(os.path.isdir(p) for p in cg.paths)
        # the parent's directories are recorded too, before the leaves
        assert cg.parents == [os.path.join(h.base, parent) for h in lay.hierarchies if h.version == 2 or h.controllers]
        mem = lay.v1("memory")
        if mem is not None:  # nothing written: no limit
            assert int(_read(os.path.join(_leaf(cg, "memory"), "memory.limit_in_bytes"))) > 1 << 60
        p = spawn(cg, ["sleep", "30"])
        _wait(lambda: cg.pids() == {p.pid}, what="the child in every cgroup")
        inside = _read(f"/proc/{p.pid}/cgroup").splitlines()
        for line in inside:
            _hid, ctrls, path = line.split(":", 2)
            if ctrls.startswith("name="):
                assert not path.endswith(cid)  # named hierarchies are left alone
            else:
                assert path.endswith(f"/{parent}/{cid}"), line
        paths = cg.paths
        cg.kill()
        p.wait(timeout=5)
        assert sorted(cg.destroy()) == sorted(paths)
        _gone(paths)

    def test_cgroupspy_is_imported_only_for_limits(self, parent: str) -> None:
        code = ("import sys; from nsruntime import cgroups; from nsruntime.config import Cgroups\n"
                f"cg = cgroups.setup(Cgroups(parent={parent!r}), 'a'); cg.destroy()\n"
                "print('cgroupspy' in sys.modules)\n"
                f"cg = cgroups.setup(Cgroups(parent={parent!r}, memory=1<<26), 'b'); cg.destroy()\n"
                "print('cgroupspy' in sys.modules)\n")
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["False", "True"]

    def test_limits_read_back_while_running_and_gone_after(self, made: Callable[..., CgroupSet], parent: str,
                                                           spawn: Callable[..., subprocess.Popen[str]]) -> None:
        lay = _layout()
        needed = ["memory", "cpu", "cpuset", "pids", "blkio"]
        if any(lay.v1(c) is None for c in needed):
            pytest.skip("this test reads v1 files")
        wfile = _blkio_weight_file()
        cfg = Cgroups(parent=parent, memory=64 << 20, memory_swap=128 << 20, cpu_shares=512, cpu_quota=50000,
                      cpu_period=100000, cpuset_cpus="0", pids_limit=50, blkio_weight=300 if wfile else None)
        cg = made(cfg)
        p = spawn(cg, [sys.executable, "-c", "import time; x = b'x' * (8 << 20); time.sleep(30)"])
        _wait(lambda: cg.pids() == {p.pid}, what="the child inside")
        want = {("memory", "memory.limit_in_bytes"): str(64 << 20),
                ("memory", "memory.memsw.limit_in_bytes"): str(128 << 20),
                ("cpu", "cpu.shares"): "512", ("cpu", "cpu.cfs_quota_us"): "50000",
                ("cpu", "cpu.cfs_period_us"): "100000", ("cpuset", "cpuset.cpus"): "0", ("pids", "pids.max"): "50"}
        for (ctrl, name), value in want.items():
            assert _read(os.path.join(_leaf(cg, ctrl), name)) == value, name
        if wfile:
            assert _read(os.path.join(_leaf(cg, "blkio"), wfile)).split()[-1] == "300"
        # the kernel enforces the cpuset on the process itself
        assert _read(f"/proc/{p.pid}/status").split("Cpus_allowed_list:")[1].split()[0] == "0"
        st = _wait(lambda: (s := cg.stats()) and s.get("memory_bytes", 0) >= 8 << 20 and s, what="memory charged")
        assert isinstance(st, dict)
        assert st["pids"] == 1 and st["oom_kills"] == 0 and st["cpu_usage_ns"] > 0
        assert st["memory_peak_bytes"] >= st["memory_bytes"]
        paths = cg.paths
        cg.kill()
        assert p.wait(timeout=5) == -signal.SIGKILL
        cg.destroy()
        _gone(paths)

    def test_a_blkio_weight_without_a_weighted_io_scheduler_is_refused_naming_the_field(
            self, parent: str) -> None:
        if _layout().v1("blkio") is None or _blkio_weight_file():
            pytest.skip("this kernel has a v1 blkio weight file: the weight is applied, not refused")
        with pytest.raises(SetupError, match=r"^cgroups: blkio_weight: neither blkio.weight nor blkio.bfq.weight"):
            cgroups.setup(Cgroups(parent=parent, blkio_weight=300), _uid())
        # nothing half-made stays: the host check around the test fails on any directory left

    def test_memory_without_swap_gets_as_much_swap_as_memory(self, made: Callable[..., CgroupSet],
                                                               parent: str) -> None:
        cg = made(Cgroups(parent=parent, memory=32 << 20))
        memsw = os.path.join(_leaf(cg, "memory"), "memory.memsw.limit_in_bytes")
        if not os.path.exists(memsw):
            pytest.skip("no swap accounting")
        assert _read(memsw) == str(64 << 20)

    def test_a_parent_found_without_cpus_gets_them_and_so_does_the_leaf(
            self, made: Callable[..., CgroupSet], parent: str, spawn: Callable[..., subprocess.Popen[str]]) -> None:
        """A concurrent setup may have made the shared parent and not yet given it cpuset.cpus: the
        leaf, made first now, must still end up usable (joining an empty cpuset fails, ENOSPC)."""
        cpuset = _layout().v1("cpuset")
        if cpuset is None:
            pytest.skip("no v1 cpuset controller")
        os.mkdir(os.path.join(cpuset.base, parent))  # as a concurrent setup leaves it, cpus still empty
        assert not _read(os.path.join(cpuset.base, parent, "cpuset.cpus")).strip()
        first = made(Cgroups(parent=parent))
        second = made(Cgroups(parent=parent))  # parents there: the leaf goes first
        want = _read(os.path.join(cpuset.base, "cpuset.cpus")).strip()
        for cg in (first, second):
            assert _read(os.path.join(_leaf(cg, "cpuset"), "cpuset.cpus")).strip() == want
            assert os.path.join(cpuset.base, parent) in cg.parents
        p = spawn(second, ["sleep", "30"])
        _wait(lambda: second.pids() == {p.pid}, what="the child in every cgroup")
        second.kill()
        p.wait(timeout=5)

    def test_default_device_policy(self, made: Callable[..., CgroupSet], parent: str,
                                   spawn: Callable[..., subprocess.Popen[str]]) -> None:
        if _layout().v1("devices") is None:
            pytest.skip("no v1 devices controller")
        cg = made(Cgroups(parent=parent))
        assert _read(os.path.join(_leaf(cg, "devices"), "devices.list")).splitlines() == list(DEFAULT_DEVICE_RULES)
        probe = ("import os, sys\n"
                 "for dev in sys.argv[1:]:\n"
                 "    try:\n        os.close(os.open(dev, os.O_RDONLY | os.O_NONBLOCK)); print(dev, 'ok')\n"
                 "    except OSError as e:\n        print(dev, e.errno)\n")
        p = spawn(cg, [sys.executable, "-c", probe, "/dev/null", "/dev/urandom", "/dev/kmsg"],
                  stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=10)
        assert out.split("\n")[:3] == ["/dev/null ok", "/dev/urandom ok", f"/dev/kmsg {errno.EPERM}"]

    def test_allow_all_devices_and_explicit_rules(self, made: Callable[..., CgroupSet], parent: str,
                                                  spawn: Callable[..., subprocess.Popen[str]]) -> None:
        if _layout().v1("devices") is None:
            pytest.skip("no v1 devices controller")
        cg = made(Cgroups(parent=parent, allow_all_devices=True))
        assert _read(os.path.join(_leaf(cg, "devices"), "devices.list")) == "a *:* rwm"
        rules = (DeviceRule(True, "c", 1, 11, "r"), DeviceRule(False, "c", 1, 9, "rwm"))
        cg2 = made(Cgroups(parent=parent, devices=rules))
        listed = _read(os.path.join(_leaf(cg2, "devices"), "devices.list")).splitlines()
        assert "c 1:11 r" in listed and "c 1:9 rwm" not in listed
        probe = ("import os\nfor d in ('/dev/kmsg', '/dev/urandom'):\n"
                 "    try: os.close(os.open(d, os.O_RDONLY)); print('ok')\n"
                 "    except OSError as e: print(e.errno)\n")
        p = spawn(cg2, [sys.executable, "-c", probe], stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=10)
        assert out.split() == ["ok", str(errno.EPERM)]

    def test_join_moves_a_running_process_into_every_dir(self, made: Callable[..., CgroupSet], parent: str,
                                                         spawn: Callable[..., subprocess.Popen[str]]) -> None:
        cg = made(Cgroups(parent=parent))
        p = spawn(None, ["sleep", "30"])
        assert p.pid not in cg.pids()
        cg.join(p.pid)
        for d in cg.leaves:
            assert d.procs() == [p.pid], d.path
        assert cg.stats()["pids"] == 1

    def test_join_self_and_clone3_put_the_child_in_every_dir(self, made: Callable[..., CgroupSet]) -> None:
        # what the runtime's setup child does: "0" into each v1 tasks file, then a clone3 child born
        # in the cgroup2 directory; the helper itself stays outside the cgroup2 one
        cg = made(Cgroups(parent=f"nsinit-test-{uuid.uuid4().hex[:8]}"))
        if cg.v2_leaf() is None:
            pytest.skip("no cgroup2 tree")
        code = (
            "import json, os, sys, time\n"
            "from nsruntime import cgroups, libc\n"
            "cg = cgroups.from_paths(json.loads(sys.argv[1]))\n"
            "cg.join_self(v2=False)\n"
            "fd = os.open(cg.v2_leaf(), os.O_RDONLY | os.O_DIRECTORY)\n"
            "pid = libc.clone3(0, fd)\n"
            "if pid == 0:\n"
            "    time.sleep(30)\n"
            "    os._exit(0)\n"
            "print(pid, flush=True)\n"
            "os.waitpid(pid, 0)\n"
        )
        with subprocess.Popen([sys.executable, "-c", code, json.dumps(cg.paths)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) as helper:  # leaving closes its stdout
            try:
                assert helper.stdout is not None
                child = int(helper.stdout.readline())
                v2 = cg.v2_leaf()
                for d in cg.leaves:
                    procs = d.procs()
                    assert child in procs, d.path
                    assert (helper.pid in procs) == (d.path != v2), d.path
            finally:
                helper.kill()
                helper.wait(timeout=5)

    def test_clone3_into_a_bad_fd_names_the_call(self) -> None:
        from nsruntime import libc
        from nsruntime.errors import SyscallError

        r, w = os.pipe()  # not a cgroup directory
        try:
            with pytest.raises(SyscallError, match=r"clone3\(flags=0x200000000, cgroup fd \d+\): E"):
                libc.clone3(0, r)
        finally:
            os.close(r)
            os.close(w)

    def test_join_a_dead_pid_names_the_file(self, made: Callable[..., CgroupSet], parent: str) -> None:
        cg = made(Cgroups(parent=parent))
        p = subprocess.Popen(["true"])
        p.wait()
        with pytest.raises(SetupError, match=r"cgroups: join: write '\d+' to /sys/fs/cgroup/.*/cgroup.procs: ESRCH"):
            cg.join(p.pid)

    @pytest.mark.parametrize("with_cgroup_kill", [True, False], ids=["cgroup.kill", "sigkill-loop"])
    def test_kill_empties_the_cgroup_grandchildren_included(self, made: Callable[..., CgroupSet], parent: str,
                                                            spawn: Callable[..., subprocess.Popen[str]],
                                                            with_cgroup_kill: bool) -> None:
        cg = made(Cgroups(parent=parent))
        if with_cgroup_kill and not any(d.version == 2 for d in cg.leaves):
            pytest.skip("no cgroup2 directory")
        # a child, a background grandchild, and a daemonized great-grandchild that escaped to init
        p = spawn(cg, ["sh", "-c", "sleep 60 & (setsid sleep 60 &); sleep 60"])
        _wait(lambda: len(cg.pids()) >= 4, what="four processes inside")
        victims = cg.pids()
        target = cg if with_cgroup_kill else CgroupSet([d for d in cg.leaves if d.version == 1], [])
        t0 = time.monotonic()
        target.kill(timeout=5)
        assert time.monotonic() - t0 < 5
        assert cg.pids() == set()
        assert p.wait(timeout=5) == -signal.SIGKILL
        for pid in victims - {p.pid}:  # reaped by init; gone from the cgroup at once
            _wait(functools.partial(_dead, pid), what=f"pid {pid} dead")
        for d in cg.leaves:  # never left frozen
            state = os.path.join(d.path, "freezer.state")
            assert not os.path.exists(state) or _read(state) == "THAWED"

    def test_kill_without_cgroup_kill_catches_a_process_forking_all_the_time(
            self, made: Callable[..., CgroupSet], parent: str, spawn: Callable[..., subprocess.Popen[str]]) -> None:
        cg = made(Cgroups(parent=parent, pids_limit=300))
        spinner = ("import os, time\n"
                   "while True:\n"
                   "    try:\n        pid = os.fork()\n    except OSError:\n        time.sleep(0.001); continue\n"
                   "    if pid == 0:\n        continue\n")  # every process keeps forking
        p = spawn(cg, [sys.executable, "-c", spinner])
        _wait(lambda: len(cg.pids()) >= 50, what="the spinner to spread")
        v1_only = CgroupSet([d for d in cg.leaves if d.version == 1], [])
        v1_only.kill(timeout=5)
        assert cg.pids() == set()
        assert p.wait(timeout=5) == -signal.SIGKILL

    def test_pids_limit_caps_a_fork_bomb(self, made: Callable[..., CgroupSet], parent: str,
                                         spawn: Callable[..., subprocess.Popen[str]]) -> None:
        cg = made(Cgroups(parent=parent, pids_limit=16))
        bomb = ("import os, sys, time\nn = 0\nfor _ in range(500):\n"
                "    try:\n        pid = os.fork()\n"
                "    except OSError as e:\n        print(n, e.errno, flush=True); break\n"
                "    if pid == 0:\n        time.sleep(60); os._exit(0)\n"
                "    n += 1\nelse:\n    print(n, 0, flush=True)\ntime.sleep(60)\n")
        p = spawn(cg, [sys.executable, "-c", bomb], stdout=subprocess.PIPE)
        forks, err = map(int, _readline(p).split())
        assert err == errno.EAGAIN
        assert forks == 15  # 16 tasks: the bomb itself and 15 children
        assert cg.stats()["pids"] == 16
        cg.kill()
        assert cg.pids() == set()

    def test_oom_kill_is_counted(self, made: Callable[..., CgroupSet], parent: str,
                                 spawn: Callable[..., subprocess.Popen[str]]) -> None:
        lay = _layout()
        if lay.v1("memory") is None and (lay.unified is None or "memory" not in lay.unified.available()):
            pytest.skip("no memory controller")
        cg = made(Cgroups(parent=parent, memory=48 << 20, memory_swap=48 << 20))
        assert cg.stats()["oom_kills"] == 0
        p = spawn(cg, [sys.executable, "-c", "x = b'x' * (256 << 20); print('survived')"],
                  stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=20)
        assert p.returncode == -signal.SIGKILL and out == ""
        st = cg.stats()
        assert st["oom_kills"] >= 1
        assert st["memory_peak_bytes"] <= 48 << 20

    def test_destroy_with_a_process_inside_names_dir_and_pid(self, made: Callable[..., CgroupSet], parent: str,
                                                             spawn: Callable[..., subprocess.Popen[str]]) -> None:
        cg = made(Cgroups(parent=parent))
        p = spawn(cg, ["sleep", "30"])
        _wait(lambda: cg.pids() == {p.pid}, what="the child inside")
        t0 = time.monotonic()
        with pytest.raises(TeardownError) as ei:
            cg.destroy(timeout=0.3)
        assert time.monotonic() - t0 < 2
        msg = str(ei.value)
        assert cg.leaves[0].path in msg and f"pids: {p.pid}" in msg and "EBUSY" in msg
        assert all(os.path.isdir(d.path) for d in cg.leaves)  # nothing half-removed
        cg.kill()
        p.wait(timeout=5)
        cg.destroy()
        _gone(cg.paths)
        assert cg.destroy() == []  # idempotent

    def test_a_frozen_container_blocks_destroy_and_is_still_killed(
            self, made: Callable[..., CgroupSet], parent: str, spawn: Callable[..., subprocess.Popen[str]]) -> None:
        cg = made(Cgroups(parent=parent))
        frz = [d for d in cg.leaves if os.path.exists(os.path.join(d.path, "freezer.state"))]
        if not frz:
            pytest.skip("no v1 freezer")
        p = spawn(cg, ["sleep", "30"])
        _wait(lambda: cg.pids() == {p.pid}, what="the child inside")
        with open(os.path.join(frz[0].path, "freezer.state"), "w") as f:
            f.write("FROZEN")
        _wait(lambda: _read(os.path.join(frz[0].path, "freezer.state")) == "FROZEN", what="frozen")
        with pytest.raises(TeardownError, match=rf"{frz[0].path} \(EBUSY .*pids: {p.pid}\)"):
            cg.destroy(timeout=0.2)
        cg.kill(timeout=5)
        assert p.wait(timeout=5) == -signal.SIGKILL
        assert _read(os.path.join(frz[0].path, "freezer.state")) == "THAWED"
        cg.destroy()
        _gone(cg.paths)

    def test_cgroups_the_container_made_inside_are_killed_and_removed(
            self, made: Callable[..., CgroupSet], parent: str, spawn: Callable[..., subprocess.Popen[str]]) -> None:
        cg = made(Cgroups(parent=parent))
        for d in cg.leaves:
            os.makedirs(os.path.join(d.path, "inner", "deeper"))
            prepare(os.path.join(d.path, "inner"))  # a new v1 cpuset has no cpus until given some
            prepare(os.path.join(d.path, "inner", "deeper"))
        p = spawn(cg, ["sleep", "30"])
        for d in cg.leaves:  # as a container managing its own sub-cgroups would
            with open(os.path.join(d.path, "inner", "deeper", "cgroup.procs"), "w") as f:
                f.write(str(p.pid))
        assert cg.pids() == {p.pid}
        CgroupSet([d for d in cg.leaves if d.version == 1], []).kill()
        assert p.wait(timeout=5) == -signal.SIGKILL
        cg.destroy()
        _gone(cg.paths)

    def test_a_limit_the_kernel_refuses_leaves_nothing(self, parent: str) -> None:
        if _layout().v1("cpuset") is None:
            pytest.skip("no v1 cpuset")
        cid = _uid()
        bad = str((os.cpu_count() or 1) + 100)
        with pytest.raises(SetupError) as ei:
            cgroups.setup(Cgroups(parent=parent, cpuset_cpus=bad), cid)
        msg = str(ei.value)
        assert msg.startswith("cgroups: cpuset_cpus: write ") and "cpuset.cpus" in msg
        assert "ERANGE" in msg or "EINVAL" in msg
        _gone([os.path.join(h.base, parent) for h in _layout().hierarchies])

    def test_a_parent_that_refuses_children_leaves_nothing(self, parent: str) -> None:
        u = _layout().unified
        if u is None:
            pytest.skip("no cgroup2 tree")
        blocked = os.path.join(u.base, parent)
        os.mkdir(blocked)
        try:
            with open(os.path.join(blocked, "cgroup.max.descendants"), "w") as f:
                f.write("0")
            with pytest.raises(SetupError) as ei:
                cgroups.setup(Cgroups(parent=parent), _uid())
            assert str(ei.value).startswith(f"cgroups: mkdir: mkdir {blocked}/") and "EAGAIN" in str(ei.value)
            # every directory made before the failure is gone again, parents included (the parent's
            # directories are nsinit's: the one made here by hand goes too, being empty)
            _gone([os.path.join(h.base, parent) for h in _layout().hierarchies])
        finally:
            if os.path.isdir(blocked):
                os.rmdir(blocked)

    def test_an_existing_cgroup_of_that_name_is_refused_and_kept(self, made: Callable[..., CgroupSet],
                                                                 parent: str) -> None:
        cid = _uid()
        first = made(Cgroups(parent=parent), cid)
        with pytest.raises(SetupError, match="EEXIST"):
            cgroups.setup(Cgroups(parent=parent), cid)
        assert all(os.path.isdir(p) for p in first.paths)

    def test_from_paths_joins_counts_and_tears_down(self, parent: str,
                                                    spawn: Callable[..., subprocess.Popen[str]]) -> None:
        cg = cgroups.setup(Cgroups(parent=parent, pids_limit=10), _uid())
        paths = list(cg.paths)
        try:
            again = cgroups.from_paths(paths)
            assert sorted(again.paths) == sorted(paths)
            assert again.parents == cg.parents
            p = spawn(again, ["sleep", "30"])
            _wait(lambda: cg.pids() == {p.pid}, what="joined through the rebuilt set")
            assert again.stats()["pids"] == 1
            again.kill()
            p.wait(timeout=5)
            assert sorted(again.destroy()) == sorted(paths)
        finally:
            cg.kill()
            cg.destroy()
        _gone(paths)

    def test_from_paths_refuses_what_is_not_a_cgroup(self, tmp_path: Path) -> None:
        with pytest.raises(StateError, match="not on a cgroup filesystem"):
            cgroups.from_paths([str(tmp_path)])
        with pytest.raises(StateError, match="not absolute"):
            cgroups.from_paths(["nsinit/x"])


# ------------------------------------------------------------------ limits that end the setup


@pytest.mark.privileged
@pytest.mark.skipif(not ROOT, reason="needs root and mounted cgroups")
@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (Cgroups(memory=4096),
         "cgroups.memory: 4096 bytes: the container's setup process was OOM-killed during setup: raise it"),
        (Cgroups(memory=1 << 20),
         "cgroups.memory: 1048576 bytes: the container's setup process was OOM-killed during setup: raise it"),
        (Cgroups(pids_limit=1),
         "cgroups.pids_limit: 1: a fork was refused during setup (PID 1 and the command are 2 processes): raise it"),
    ],
)
def test_a_limit_that_ends_the_setup_is_named_by_its_field(tmp_path: Path, limits: Cgroups, message: str) -> None:
    """Past the parse-time floors (a config built in Python): what the counters tell when the
    setup dies in its cgroups, instead of ECONNRESET or EAGAIN."""
    import nsruntime
    from nsruntime.config import ContainerConfig
    from tests.conftest import make_busybox_rootfs

    root = make_busybox_rootfs(tmp_path / "bb")
    cfg = ContainerConfig(hostname="koye", cgroups=limits)
    (tmp_path / "s").mkdir()
    with pytest.raises(SetupError) as e:
        nsruntime.create(cfg, root, ["true"], tmp_path / "s", die_with_parent=False, stdio=(0, 1, 2))
    assert str(e.value) == message


@pytest.mark.privileged
@pytest.mark.skipif(not ROOT, reason="needs root and mounted cgroups")
def test_under_ip_netns_exec_nsinit_says_to_use_nsenter(tmp_path: Path) -> None:
    """`ip netns exec` remounts /sys for the network namespace, and /sys/fs/cgroup goes with the
    old one. The named netns is made in a private mount namespace (unshare -m), so that its
    mounts, and /run/netns's, never reach the host; `ip netns del` removes it and its file."""
    from tests.conftest import NSINIT, REPO, make_busybox_rootfs

    root = make_busybox_rootfs(tmp_path / "bb")
    name = f"nsinit-t-{uuid.uuid4().hex[:8]}"
    had_dir = os.path.isdir("/run/netns")
    nsinit = " ".join([*NSINIT, "exec", "true"])
    script = (f"ip netns add {name} || exit 90; ip netns exec {name} {nsinit}; rc=$?; "
              f"ip netns del {name}; exit $rc")
    try:
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=root,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        if not had_dir:
            with contextlib.suppress(OSError):  # left as found, unless another user's netns is in it now
                os.rmdir("/run/netns")
    assert (r.returncode, r.stderr) == (125, (
        "nsinit: cgroups: detect: no cgroup hierarchy is mounted: /sys was remounted for network namespace "
        f"{name} (as `ip netns exec` does), hiding /sys/fs/cgroup; run `nsenter --net=/run/netns/{name} "
        "nsinit ...` instead\n"))
    assert not os.path.exists(f"/run/netns/{name}")
