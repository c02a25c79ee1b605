"""A Kubernetes pod's shape, as containerd's CRI gives it to a runc-compatible runtime, driven with
nsrun directly (issue 16): a pause container in a network namespace made by the test (the CNI's),
with a read-only root; an app container joining the pause's net, ipc and uts namespaces by path
while making its own pid and mount namespaces, with the pod's /etc/hosts, /etc/hostname and
/etc/resolv.conf bound as single files, a read-only cgroup mount, and a cgroup nested under the
pod's (the parents made, only its leaf removed: the pod's parent is the kubelet's, here the test's)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.oci.test_nsrun import Bundle

pytestmark = pytest.mark.privileged


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace made for the pod (as the CNI plugin does), named by a path."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "1000"])
    try:
        path = f"/proc/{holder.pid}/ns/net"
        wait_for(lambda: os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino, what="the pod's netns")
        yield path
    finally:
        holder.kill()
        holder.wait(timeout=10)


def cgroup_leaves(b: Bundle, cid: str) -> list[str]:
    return [p for p in json.loads((b.root / cid / "state.json").read_text())["cgroups"] if p.endswith("/" + cid)]


def test_a_pod_of_a_pause_and_an_app_container(bundle: Bundle, tmp_path: Path, netns: str) -> None:
    pod_cgroup = f"nsrun-k8s-{os.getpid()}/pod1"
    pause = bundle
    pause.spec["process"]["args"] = ["sleep", "1000"]
    pause.spec["root"]["readonly"] = True
    pause.spec["hostname"] = "pod1"
    pause.spec["linux"]["namespaces"] = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                                         {"type": "network", "path": netns}]
    pause.spec["linux"]["cgroupsPath"] = f"{pod_cgroup}/pause"
    pause.write()

    app = Bundle(tmp_path / "app")
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    (pod_dir / "hosts").write_text("127.0.0.1 localhost\n10.1.2.3 pod1\n")
    (pod_dir / "hostname").write_text("pod1\n")
    (pod_dir / "resolv.conf").write_text("nameserver 10.96.0.10\n")
    for name in ("hosts", "hostname", "resolv.conf"):
        (app.rootfs / "etc" / name).unlink(missing_ok=True)  # not in the image
    app.spec["process"]["args"] = ["sh", "-c", "echo ready > /tmp/marker; exec sleep 1000"]
    del app.spec["hostname"]
    app.spec["mounts"] += [
        {"destination": f"/etc/{name}", "type": "bind", "source": str(pod_dir / name),
         "options": ["rbind", "rprivate", "ro" if name == "hostname" else "rw"]}
        for name in ("hosts", "hostname", "resolv.conf")]
    app.spec["mounts"].append({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]})
    app.spec["linux"]["cgroupsPath"] = f"{pod_cgroup}/app1"
    app.spec["linux"]["resources"]["pids"] = {"limit": 77}

    pause_pid = pause.create("pause")
    leaves = cgroup_leaves(pause, "pause")
    parents = sorted({os.path.dirname(p) for p in leaves} | {os.path.dirname(os.path.dirname(p)) for p in leaves},
                     key=len, reverse=True)
    try:
        assert pause.nsrun("start", "pause").returncode == 0
        p = pause.nsrun("exec", "pause", "sh", "-c", "touch /x 2>/dev/null || echo read-only root; hostname")
        assert (p.returncode, p.stdout) == (0, "read-only root\npod1\n")
        assert os.readlink(f"/proc/{pause_pid}/ns/net") == os.readlink(netns)

        app.spec["linux"]["namespaces"] = [
            {"type": "pid"}, {"type": "mount"}, {"type": "network", "path": f"/proc/{pause_pid}/ns/net"},
            {"type": "ipc", "path": f"/proc/{pause_pid}/ns/ipc"}, {"type": "uts", "path": f"/proc/{pause_pid}/ns/uts"}]
        app.write()
        app_pid = app.create("app1")
        assert app.nsrun("start", "app1").returncode == 0
        wait_for(app.marker, what="the app to run")
        for ns in ("net", "ipc", "uts"):
            assert os.readlink(f"/proc/{app_pid}/ns/{ns}") == os.readlink(f"/proc/{pause_pid}/ns/{ns}"), ns
        for ns in ("pid", "mnt"):
            assert os.readlink(f"/proc/{app_pid}/ns/{ns}") != os.readlink(f"/proc/{pause_pid}/ns/{ns}"), ns
        p = app.nsrun("exec", "app1", "sh", "-c",
                      "hostname; cat /etc/hosts /etc/hostname /etc/resolv.conf; "
                      "(echo x >> /etc/hostname) 2>/dev/null || echo hostname ro; "
                      "cat /sys/fs/cgroup/pids/pids.max; "
                      "mkdir /sys/fs/cgroup/pids/x 2>/dev/null || echo cgroup ro")
        assert (p.returncode, p.stdout.splitlines()) == (0, [
            "pod1", "127.0.0.1 localhost", "10.1.2.3 pod1", "pod1", "nameserver 10.96.0.10", "hostname ro",
            "77", "cgroup ro"])  # the app's own cgroup, its limit

        leaves = cgroup_leaves(app, "app1")
        assert leaves and all(f"/{pod_cgroup}/app1" in p for p in leaves)
        assert app.nsrun("kill", "app1", "KILL").returncode == 0
        app.reap(app_pid)
        p = app.nsrun("kill", "--all", "app1", "9")
        assert (p.returncode, p.stdout) == (0, ""), "kill --all of a stopped container is done at once"
        assert app.nsrun("delete", "app1").returncode == 0
        assert not any(os.path.exists(p) for p in leaves), "the app's leaf goes"
        assert all(os.path.isdir(os.path.dirname(p)) for p in leaves), "the pod's cgroup stays"
        assert all(f"/{pod_cgroup}/pause" in p for p in cgroup_leaves(pause, "pause"))
    finally:
        for cid, b in (("app1", app), ("pause", pause)):
            if (b.root / cid).exists():
                b.nsrun("delete", "--force", cid)
        for pid in list(app.pids):
            app.reap(pid)
        for pid in list(pause.pids):
            pause.reap(pid)
        for p in parents:  # the kubelet's: the pod's cgroup, then the test's
            os.rmdir(p)
