"""nsrun, the OCI runtime command line (issue 16), driven as podman's conmon or containerd's shim
drive runc: a subprocess per verb, on a bundle built here (a busybox rootfs and a config.json),
the test being the child subreaper that reaps the container's PID 1.

Real clients drive it in test_podman.py and test_containerd.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nsruntime import libc
from nsruntime.oci.runtime import default_spec
from tests.conftest import REPO, make_busybox_rootfs, wait_for

pytestmark = pytest.mark.privileged

NSRUN = [sys.executable, str(REPO / "bin" / "nsrun")]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class Bundle:
    """A bundle directory (rootfs/ and config.json) and a state root, with nsrun at hand."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "bundle"
        self.rootfs = make_busybox_rootfs(self.dir / "rootfs")
        self.root = tmp / "state"
        self.out = tmp / "container.out"
        self.spec: dict[str, Any] = default_spec(["sh", "-c", "echo ran > /tmp/marker; exec sleep 1000"])
        self.spec["root"]["readonly"] = False
        self.spec["process"]["env"] = ["PATH=/bin", "HOME=/root"]
        self.pids: list[int] = []  # PID 1s made here: reaped by the test, as conmon would
        self.write()

    def write(self) -> None:
        (self.dir / "config.json").write_text(json.dumps(self.spec))

    def nsrun(self, *args: str, log: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`nsrun --root STATE ARGS...`; its stdout and stderr (the container's too, after create)
        go to a file, as create hands its stdio to the container and never closes it."""
        glob = ["--root", str(self.root)] + (["--log", str(log), "--log-format", "json"] if log else [])
        with open(self.out, "a+") as out:
            start = out.tell()
            p = subprocess.run([*NSRUN, *glob, *args], stdout=out, stderr=subprocess.STDOUT, text=True, env=ENV,
                               cwd=self.dir, timeout=timeout)
            out.seek(start)
            p.stdout = out.read()
        return p

    def create(self, cid: str = "c1") -> int:
        p = self.nsrun("create", "--bundle", str(self.dir), "--pid-file", str(self.dir / "pid"), cid)
        assert p.returncode == 0, p.stdout
        pid = int((self.dir / "pid").read_text())
        self.pids.append(pid)
        return pid

    def state(self, cid: str = "c1") -> dict[str, Any]:
        p = subprocess.run([*NSRUN, "--root", str(self.root), "state", cid], capture_output=True, text=True, env=ENV,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    def reap(self, pid: int, timeout: float = 10.0) -> int:
        """PID 1's wait status, once it has exited (bounded)."""
        pidfd = os.pidfd_open(pid)
        try:
            assert libc.wait_readable(pidfd, timeout), f"PID 1 ({pid}) did not exit within {timeout} s"
        finally:
            os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self.pids.remove(pid)
        return status

    def marker(self) -> bool:
        return (self.rootfs / "tmp" / "marker").exists()


def test_create_runs_no_user_code_until_start_and_the_lifecycle_ends_in_not_found(bundle: Bundle) -> None:
    pid = bundle.create()
    st = bundle.state()
    assert (st["status"], st["pid"], st["id"]) == ("created", pid, "c1")
    assert st["bundle"] == str(bundle.dir) and st["rootfs"] == str(bundle.rootfs)
    assert not bundle.marker()
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == os.getpid(), "PID 1 is the subreaper's child once create has exited"

    assert bundle.nsrun("start", "c1").returncode == 0
    wait_for(bundle.marker, what="the command to run after start")
    assert bundle.state()["status"] == "running"

    assert bundle.nsrun("kill", "c1").returncode == 0  # TERM by default, forwarded by PID 1 to sleep
    status = bundle.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + 15
    assert bundle.state()["status"] == "stopped"
    assert bundle.nsrun("delete", "c1").returncode == 0
    p = bundle.nsrun("state", "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: container c1 does not exist\n")
    assert bundle.nsrun("delete", "c1").returncode == 0, "a second delete (the shim's) is not an error"
    assert os.listdir(bundle.root) == []


def test_create_leaves_no_helper_behind_only_pid1_and_the_waiting_command(bundle: Bundle) -> None:
    pid = bundle.create()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, "PID 1 holds the command's process, nothing else stays"
    mine = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    assert mine == [str(pid)], "nsrun create has exited and PID 1 is the subreaper's own child"


def test_a_created_container_can_be_killed_before_start_and_its_command_never_runs(bundle: Bundle) -> None:
    pid = bundle.create()
    assert bundle.nsrun("kill", "c1", "TERM").returncode == 0
    status = bundle.reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + 15
    assert not bundle.marker()
    p = bundle.nsrun("start", "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: cannot start a container that is stopped\n")
    assert bundle.nsrun("delete", "c1").returncode == 0


def test_start_of_a_running_container_is_refused(bundle: Bundle) -> None:
    bundle.create()
    assert bundle.nsrun("start", "c1").returncode == 0
    p = bundle.nsrun("start", "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: cannot start a container that is running\n")


def test_delete_refuses_a_running_container_and_force_kills_it(bundle: Bundle) -> None:
    pid = bundle.create()
    bundle.nsrun("start", "c1")
    p = bundle.nsrun("delete", "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: cannot delete container c1 that is not stopped: running\n")
    assert bundle.nsrun("delete", "--force", "c1").returncode == 0
    assert os.WTERMSIG(bundle.reap(pid)) == 9
    assert os.listdir(bundle.root) == []


def test_kill_all_of_a_stopped_container_returns_at_once(bundle: Bundle) -> None:
    pid = bundle.create()
    bundle.nsrun("kill", "c1", "9")
    bundle.reap(pid)
    t = time.monotonic()
    assert bundle.nsrun("kill", "--all", "c1", "9").returncode == 0
    assert time.monotonic() - t < 5
    p = bundle.nsrun("kill", "c1", "9")
    assert (p.returncode, p.stdout) == (1, "nsrun: container c1 is not running\n")


def test_kill_names_an_unknown_signal(bundle: Bundle) -> None:
    bundle.create()
    p = bundle.nsrun("kill", "c1", "NOSUCH")
    assert (p.returncode, p.stdout) == (1, "nsrun: kill: unknown signal 'NOSUCH'\n")


@pytest.mark.parametrize(("script", "code"), [("exit 3", 3), ("true", 0), ("kill -9 $$", 137)])
def test_run_propagates_the_exit_status(bundle: Bundle, script: str, code: int) -> None:
    bundle.spec["process"]["args"] = ["sh", "-c", script]
    bundle.write()
    assert bundle.nsrun("run", "--bundle", str(bundle.dir), "r1").returncode == code
    assert os.listdir(bundle.root) == []


def test_a_missing_command_fails_create_saying_no_such_file_in_the_json_log(bundle: Bundle, tmp_path: Path) -> None:
    bundle.spec["process"]["args"] = ["nosuchcommand"]
    bundle.write()
    log = tmp_path / "log.json"
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1", log=log)
    assert p.returncode == 1
    entry = json.loads(log.read_text())
    assert set(entry) == {"level", "msg", "time"} and entry["level"] == "error"
    assert entry["msg"] == ('container init: process.args: exec "nosuchcommand": executable file not found in '
                            "$PATH: no such file or directory")
    assert os.listdir(bundle.root) == []


def test_a_missing_bundle_says_no_such_file_or_directory(bundle: Bundle, tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    p = bundle.nsrun("create", "--bundle", str(tmp_path / "nowhere"), "c1", log=log)
    assert p.returncode == 1
    assert json.loads(log.read_text())["msg"] == f"{tmp_path}/nowhere/config.json: no such file or directory"


def test_a_usage_error_reaches_the_json_log_too(bundle: Bundle, tmp_path: Path) -> None:
    """containerd's shim reads create's errors only from --log: a flag nsrun does not know is
    said there as well as on stderr, with the usage status."""
    log = tmp_path / "log.json"
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "--no-such-flag", "c1", log=log)
    assert p.returncode == 2
    assert p.stdout.endswith("nsrun: error: unrecognized arguments: --no-such-flag\n"), p.stdout
    entry = json.loads(log.read_text())
    assert (entry["level"], entry["msg"]) == ("error", "unrecognized arguments: --no-such-flag")


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["process"].update(foo=1), "process.foo: unknown field"),
    (lambda s: s["linux"].update(seccomp={"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/l.sock"}),
     "linux.seccomp.listenerPath: "),
    (lambda s: s.update(hooks={"prestart": [{"path": "true"}]}),
     'hooks.prestart[0].path: "true" is not an absolute path'),
    (lambda s: s["linux"]["namespaces"].append({"type": "pid", "path": "/proc/1/ns/pid"}),
     'linux.namespaces[5].type: namespace "pid" listed twice'),
    (lambda s: s["process"]["capabilities"].update(bounding=["CAP_NOPE"]),
     'process.capabilities.bounding[0]: unknown capability "CAP_NOPE" (this kernel knows CAP_CHOWN to CAP_'),
    (lambda s: s["mounts"].append({"destination": "/x", "type": "overlay", "source": "o"}),
     'mounts[6].type: unsupported mount type "overlay" at "/x"'),
    (lambda s: s["linux"].update(sysctl={"vm.swappiness": "1"}),
     "linux.sysctl.vm.swappiness: not in a namespace the container has: it would change the host"),
    (lambda s: s["process"].update(rlimits=[{"type": "RLIMIT_NOFILE", "soft": 20, "hard": 10}]),
     "process.rlimits[0].soft: 20 is above hard (10)"),
])
def test_what_is_not_supported_is_refused_naming_its_json_path(bundle: Bundle, change: Any, message: str) -> None:
    change(bundle.spec)
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert p.returncode == 1
    assert p.stdout.startswith("nsrun: " + message), p.stdout
    assert not (bundle.root / "c1").exists()


def test_the_container_sees_its_spec(bundle: Bundle, tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("10.0.0.1 pod\n")
    spec = bundle.spec
    spec["process"]["args"] = ["sh", "-c", "ulimit -n; id -G; cat /proc/sys/kernel/msgmax; cat /etc/hosts; "
                               "grep -c ' /data ' /proc/mounts; touch /data/x 2>/dev/null || echo ro; "
                               "grep Cap /proc/self/status; hostname; pwd"]
    spec["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [50, 4242]}
    spec["process"]["cwd"] = "/tmp"
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 512, "hard": 1024}]
    spec["process"]["capabilities"] = {"bounding": ["CAP_KILL", "CAP_CHOWN"], "permitted": ["CAP_KILL"],
                                       "effective": ["CAP_KILL"], "inheritable": ["CAP_KILL"],
                                       "ambient": ["CAP_KILL"]}
    spec["linux"]["sysctl"] = {"kernel.msgmax": "4321"}
    spec["mounts"] += [{"destination": "/etc/hosts", "type": "bind", "source": str(tmp_path / "hosts"),
                        "options": ["rbind", "ro"]},
                       {"destination": "/data", "type": "tmpfs", "source": "tmpfs", "options": ["ro", "size=1m"]}]
    (bundle.rootfs / "etc" / "hosts").unlink(missing_ok=True)
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), "see")
    assert p.returncode == 0, p.stdout
    lines = p.stdout.splitlines()
    assert lines[:6] == ["512", "1000 50 4242", "4321", "10.0.0.1 pod", "1", "ro"]
    caps = dict(line.split(":\t") for line in lines[6:11])
    kill = f"{1 << 5:016x}"
    assert caps == {"CapInh": kill, "CapPrm": kill, "CapEff": kill, "CapBnd": f"{(1 << 5) | 1:016x}",
                    "CapAmb": kill}
    assert lines[11:] == ["nsrun", "/tmp"]
    assert not (bundle.rootfs / "etc" / "hosts").read_text(), "the single-file bind's target was made empty"


def test_the_specs_seccomp_profile_is_applied(bundle: Bundle) -> None:
    bundle.spec["process"]["args"] = ["sh", "-c", "mkdir /tmp/d; echo mkdir=$?; echo still here"]
    bundle.spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
    }
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), "sc")
    assert p.returncode == 0, p.stdout
    assert p.stdout.splitlines()[-2:] == ["mkdir=1", "still here"]
    assert not (bundle.rootfs / "tmp" / "d").exists()


def test_without_a_cgroups_path_the_cgroup_is_named_by_the_container_id(bundle: Bundle) -> None:
    bundle.spec["linux"].pop("cgroupsPath", None)
    bundle.spec["process"]["args"] = ["true"]
    bundle.write()
    pid = bundle.create()
    made = json.loads((bundle.root / "c1" / "state.json").read_text())["cgroups"]  # leaves, and parents made
    leaves = [p for p in made if not p.endswith("/nsrun")]
    assert leaves and all(p.endswith("/nsrun/c1") for p in leaves), made
    bundle.nsrun("kill", "c1", "KILL")
    bundle.reap(pid)
    assert bundle.nsrun("delete", "c1").returncode == 0


def test_a_nested_cgroups_path_makes_its_parents_and_removes_only_the_leaf(bundle: Bundle) -> None:
    bundle.spec["linux"]["cgroupsPath"] = "nsrun-test-pod/ctr1"
    bundle.spec["process"]["args"] = ["true"]
    bundle.write()
    pid = bundle.create()
    state = json.loads((bundle.root / "c1" / "state.json").read_text())
    leaves = state["cgroups"]
    assert leaves and all(p.endswith("/nsrun-test-pod/ctr1") for p in leaves), "only the leaves are recorded"
    bundle.nsrun("kill", "c1", "KILL")
    bundle.reap(pid)
    assert bundle.nsrun("delete", "c1").returncode == 0
    parents = [os.path.dirname(p) for p in leaves]
    try:
        assert all(os.path.isdir(p) for p in parents) and not any(os.path.exists(p) for p in leaves)
    finally:
        for p in parents:
            os.rmdir(p)  # the pod's, made by create: the test is its kubelet


def test_joining_uts_and_ipc_namespaces_by_path(bundle: Bundle) -> None:
    holder = subprocess.Popen(["unshare", "--uts", "--ipc", "sh", "-c", "hostname podhost; exec sleep 1000"])
    try:
        uts = f"/proc/{holder.pid}/ns/uts"
        wait_for(lambda: os.stat(uts).st_ino != os.stat("/proc/self/ns/uts").st_ino, what="unshare")
        wait_for(lambda: subprocess.run(["nsenter", f"--uts={uts}", "hostname"], capture_output=True,
                                        text=True).stdout == "podhost\n", what="the pod's hostname")
        del bundle.spec["hostname"]
        bundle.spec["linux"]["namespaces"] = [{"type": "mount"}, {"type": "pid"},
                                              {"type": "uts", "path": uts},
                                              {"type": "ipc", "path": f"/proc/{holder.pid}/ns/ipc"}]
        bundle.spec["process"]["args"] = ["sh", "-c", "hostname; readlink /proc/self/ns/ipc"]
        bundle.write()
        p = bundle.nsrun("run", "--bundle", str(bundle.dir), "j1")
        assert p.returncode == 0, p.stdout
        assert p.stdout.splitlines() == ["podhost", os.readlink(f"/proc/{holder.pid}/ns/ipc")]
    finally:
        holder.kill()
        holder.wait()


def test_version_features_and_list(bundle: Bundle) -> None:
    p = subprocess.run([*NSRUN, "--version"], capture_output=True, text=True, env=ENV, timeout=30)
    assert p.returncode == 0 and p.stdout.splitlines()[0].startswith("nsrun version ")
    assert p.stdout.splitlines()[1] == "spec: 1.2.0"
    feats = json.loads(subprocess.run([*NSRUN, "features"], capture_output=True, text=True, env=ENV,
                                      timeout=30).stdout)
    assert feats["ociVersionMax"] == "1.2.0" and "network" in feats["linux"]["namespaces"]
    bundle.create("a1")
    p = bundle.nsrun("list", "--format", "json")
    assert [(s["id"], s["status"]) for s in json.loads(p.stdout)] == [("a1", "created")]


def test_an_absolute_cgroups_path_starts_at_each_hierarchys_root(bundle: Bundle) -> None:
    bundle.spec["linux"]["cgroupsPath"] = "/nsrun-test-abs/ctr1"  # podman's /libpod_parent/libpod-ID shape
    bundle.spec["process"]["args"] = ["true"]
    bundle.write()
    pid = bundle.create()
    leaves = json.loads((bundle.root / "c1" / "state.json").read_text())["cgroups"]
    mountpoints = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split(" - ")[1].startswith(("cgroup ", "cgroup2 "))}
    assert leaves and all(os.path.dirname(os.path.dirname(p)) in mountpoints for p in leaves), leaves
    bundle.nsrun("kill", "c1", "KILL")
    bundle.reap(pid)
    assert bundle.nsrun("delete", "c1").returncode == 0
    parents = [os.path.dirname(p) for p in leaves]
    try:
        assert all(os.path.isdir(p) for p in parents) and not any(os.path.exists(p) for p in leaves)
    finally:
        for p in parents:
            os.rmdir(p)


def _host_cgroup_layout() -> tuple[set[str], dict[str, str]]:
    """The names of /sys/fs/cgroup's hierarchies that carry a controller or are cgroup2, and its links."""
    names, links = set(), {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, fstype = line.split(), line.split(" - ")[1].split()[0]
        point, opts = fields[4], line.split(" - ")[1].split()[2]
        if os.path.dirname(point) != "/sys/fs/cgroup":
            continue
        if fstype == "cgroup2" or (fstype == "cgroup" and set(opts.split(",")) - {"rw", "ro", "nosuid", "nodev",
                                                                              "noexec", "relatime", "xattr"}
                                   - {o for o in opts.split(",") if o.startswith(("name=", "release_agent"))}):
            names.add(os.path.basename(point))
    for entry in os.scandir("/sys/fs/cgroup"):
        if entry.is_symlink() and os.readlink(entry.path) in names:
            links[entry.name] = os.readlink(entry.path)
    return names, links


@pytest.mark.parametrize("cgroupns", [False, True], ids=["host-cgroupns", "own-cgroupns"])
def test_a_cgroup_mount_shows_the_container_its_own_cgroups_read_only(bundle: Bundle, cgroupns: bool) -> None:
    names, links = _host_cgroup_layout()
    if "memory" not in names:
        pytest.skip("this host has no v1 memory hierarchy at /sys/fs/cgroup/memory")
    spec = bundle.spec
    spec["mounts"].append({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                           "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]})
    if cgroupns:
        spec["linux"]["namespaces"].append({"type": "cgroup"})
    spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}}
    spec["process"]["args"] = ["sh", "-c", "ls /sys/fs/cgroup; for l in /sys/fs/cgroup/*; do "
                               "[ -L $l ] && echo $l '->' $(readlink $l); done; "
                               "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
                               "wc -l < /sys/fs/cgroup/memory/cgroup.procs; "
                               "mkdir /sys/fs/cgroup/memory/x 2>/dev/null || echo memory ro; "
                               "touch /sys/fs/cgroup/y 2>/dev/null || echo tmpfs ro"]
    bundle.write()
    p = bundle.nsrun("run", "--bundle", str(bundle.dir), "cgm")
    assert p.returncode == 0, p.stdout
    lines = p.stdout.splitlines()
    listed = set(lines[:len(names) + len(links)])
    assert listed == names | set(links), lines
    assert {ln.split(" -> ")[0].removeprefix("/sys/fs/cgroup/"): ln.split(" -> ")[1]
            for ln in lines if " -> " in ln} == links
    rest = [ln for ln in lines[len(listed):] if " -> " not in ln]
    # the container's own memory cgroup (its limit), holding only its own processes: PID 1, sh, wc
    assert rest == [str(64 << 20), "3", "memory ro", "tmpfs ro"], lines
