"""nsrun's linux.devices, namespaces joined by path, and what features says (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.oci.test_nsrun import ENV, NSRUN, Bundle

pytestmark = pytest.mark.privileged


def run(b: Bundle, script: str, cid: str = "r1") -> subprocess.CompletedProcess[str]:
    b.spec["process"]["args"] = ["sh", "-c", script]
    b.write()
    return b.nsrun("run", "--bundle", str(b.dir), cid)


def test_device_nodes_are_made_with_their_numbers_mode_and_owner_and_the_cgroup_allows_them(bundle: Bundle) -> None:
    bundle.spec["linux"]["devices"] = [
        {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200, "fileMode": 0o666, "uid": 1000, "gid": 5},
        {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
        {"path": "/dev/myfifo", "type": "p", "fileMode": 0o600},
    ]
    p = run(bundle, "stat -c '%F %t:%T %a %u:%g' /dev/net/tun /dev/myfifo; (exec 3<>/dev/net/tun) && echo opened; "
            "echo x > /dev/null && echo null")
    assert p.returncode == 0, p.stdout
    assert p.stdout.splitlines() == ["character special file a:c8 666 1000:5", "fifo 0:0 600 0:0", "opened", "null"]


def test_a_device_the_spec_does_not_list_stays_denied_by_the_devices_cgroup(bundle: Bundle) -> None:
    bundle.spec["linux"]["devices"] = [{"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 201}]
    del bundle.spec["process"]["capabilities"]  # all kept: CAP_MKNOD too, CAP_DAC_OVERRIDE too
    p = run(bundle, "mknod /dev/tun2 c 10 200 && echo made; (exec 3<>/dev/tun2) 2>/dev/null || echo refused")
    assert p.stdout.splitlines() == ["made", "refused"], p.stdout


@pytest.mark.parametrize(("device", "message"), [
    ({"path": "/tmp/x", "type": "c", "major": 1, "minor": 3},
     'linux.devices[0].path: "/tmp/x": only below /dev (nodes go in the runtime\'s /dev tmpfs, not in /dev/pts, '
     "/dev/shm or /dev/mqueue)"),
    ({"path": "/dev/x", "type": "c", "minor": 3}, "linux.devices[0].major: missing (a c device has one)"),
    ({"path": "/dev/x", "type": "z", "major": 1, "minor": 3}, 'linux.devices[0].type: "z" is not one of c, u, b, p'),
])  # fmt: skip
def test_a_device_that_cannot_be_made_is_refused_naming_its_path(bundle: Bundle, device: dict[str, Any],
                                                                  message: str) -> None:
    bundle.spec["linux"]["devices"] = [device]
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stdout) == (1, f"nsrun: {message}\n")


def nsrun_with_fds(b: Bundle, tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[Path]]:
    """nsrun ARGS with its fds 3, 4 and 5 open on three files (as a caller's preserved fds are);
    its stdout and stderr in files too (create hands them to the container, which keeps them)."""
    files = [tmp / f"fd{n}" for n in (3, 4, 5)]
    env = {**ENV, **{f"F{n}": str(f) for n, f in zip((3, 4, 5), files, strict=True)},
           "OUT": str(tmp / "out"), "ERR": str(tmp / "err")}
    p = subprocess.run(["sh", "-c", 'exec "$@" 3>"$F3" 4>"$F4" 5>"$F5" >"$OUT" 2>"$ERR"', "sh", *NSRUN, "--root",
                        str(b.root), *args], env=env, cwd=b.dir, timeout=30, text=True)
    p.stdout, p.stderr = (tmp / "out").read_text(), (tmp / "err").read_text()
    return p, files


FD_SCRIPT = "echo three >&3; echo four >&4; (echo five >&5) 2>/dev/null || echo no-five"


def test_run_preserve_fds_passes_exactly_those_fds(bundle: Bundle, tmp_path: Path) -> None:
    bundle.spec["process"]["args"] = ["sh", "-c", FD_SCRIPT]
    bundle.write()
    p, (f3, f4, f5) = nsrun_with_fds(bundle, tmp_path, "run", "--preserve-fds", "2", "--bundle", str(bundle.dir),
                                     "r1")
    assert (p.returncode, p.stdout, p.stderr) == (0, "no-five\n", "")
    assert (f3.read_text(), f4.read_text(), f5.read_text()) == ("three\n", "four\n", "")


def test_create_and_exec_preserve_fds(bundle: Bundle, tmp_path: Path) -> None:
    bundle.spec["process"]["args"] = ["sh", "-c", "echo created >&3; exec sleep 1000"]
    bundle.write()
    p, (f3, _f4, _f5) = nsrun_with_fds(bundle, tmp_path, "create", "--preserve-fds", "1", "--bundle",
                                       str(bundle.dir), "--pid-file", str(bundle.dir / "pid"), "pf1")
    assert p.returncode == 0, p.stderr
    bundle.pids.append(int((bundle.dir / "pid").read_text()))
    assert bundle.nsrun("start", "pf1").returncode == 0
    from tests.conftest import wait_for

    wait_for(lambda: f3.read_text() == "created\n", what="the command to write to its fd 3")
    p, (f3, f4, f5) = nsrun_with_fds(bundle, tmp_path, "exec", "--preserve-fds", "2", "pf1", "sh", "-c", FD_SCRIPT)
    assert (p.returncode, p.stdout, p.stderr) == (0, "no-five\n", "")
    assert (f3.read_text(), f4.read_text(), f5.read_text()) == ("three\n", "four\n", "")


def test_preserve_fds_refuses_an_fd_that_is_not_open(bundle: Bundle, tmp_path: Path) -> None:
    p, _files = nsrun_with_fds(bundle, tmp_path, "create", "--preserve-fds", "4", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stderr) == (1, "nsrun: --preserve-fds 4: fd 6 is not open\n")
    assert os.listdir(bundle.root) == [] if bundle.root.exists() else True


def test_joining_pid_and_cgroup_namespaces_by_path(bundle: Bundle) -> None:
    from tests.conftest import wait_for

    holder = subprocess.Popen(["unshare", "--pid", "--fork", "--cgroup", "sleep", "1000"])
    pod = None
    try:
        def inner() -> int | None:
            kids = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
            return int(kids[0]) if kids else None

        wait_for(inner, what="the holder's pid namespace")
        pod = inner()
        assert pod is not None
        bundle.spec["linux"]["namespaces"] = [{"type": "mount"}, {"type": "pid", "path": f"/proc/{pod}/ns/pid"},
                                              {"type": "cgroup", "path": f"/proc/{pod}/ns/cgroup"}]
        del bundle.spec["hostname"]
        bundle.spec["process"]["args"] = ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; "
                                          "readlink /proc/self/ns/pid; readlink /proc/self/ns/cgroup; sleep 1000"]
        bundle.write()
        pid = bundle.create("j1")
        assert bundle.nsrun("start", "j1").returncode == 0
        wait_for(lambda: len(bundle.out.read_text().splitlines()) >= 3, what="the command's output")
        assert bundle.out.read_text().splitlines() == [
            "sleep 1000 ", os.readlink(f"/proc/{pod}/ns/pid"), os.readlink(f"/proc/{pod}/ns/cgroup")]
        p = bundle.nsrun("exec", "j1", "sh", "-c", "readlink /proc/self/ns/pid; cat /proc/1/cmdline | tr '\\0' ' '")
        assert (p.returncode, p.stdout) == (0, f"{os.readlink(f'/proc/{pod}/ns/pid')}\nsleep 1000 ")
        # once PID 1 is gone its children (in the pod's namespace) come to us, the subreaper, as to conmon
        orphans = [q for q in json.loads(bundle.nsrun("ps", "--format", "json", "j1").stdout) if q != pid]
        assert bundle.nsrun("delete", "--force", "j1").returncode == 0
        bundle.reap(pid)
        for q in orphans:
            bundle.pids.append(q)
            bundle.reap(q)
    finally:
        if pod is not None:
            os.kill(pod, 9)  # the pod's init: unshare reaps it and exits
        else:
            holder.kill()
        holder.wait(timeout=10)


@pytest.mark.parametrize("kind", ["mount", "user"])
def test_joining_a_mount_or_user_namespace_is_refused_naming_the_path(bundle: Bundle, kind: str) -> None:
    path = f"/proc/1/ns/{'mnt' if kind == 'mount' else kind}"
    bundle.spec["linux"]["namespaces"] = [{"type": kind, "path": path}, {"type": "pid"}]
    bundle.write()
    p = bundle.nsrun("create", "--bundle", str(bundle.dir), "c1")
    assert (p.returncode, p.stdout) == (1, f"nsrun: linux.namespaces[0].path: joining a {kind} namespace by path is "
                                           "not supported (only network, ipc, uts, pid, cgroup)\n")


def test_features_reports_what_is_honoured_here() -> None:
    p = subprocess.run([*NSRUN, "features"], capture_output=True, text=True, env=ENV, timeout=30)
    assert p.returncode == 0, p.stderr
    feats = json.loads(p.stdout)
    assert feats["hooks"] == ["prestart", "createRuntime", "createContainer", "startContainer", "poststart",
                              "poststop"]
    linux = feats["linux"]
    assert linux["namespaces"] == ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"]
    assert linux["cgroup"] == {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False}
    assert linux["apparmor"] == {"enabled": False}, "no AppArmor on this machine"
    assert linux["selinux"] == {"enabled": False} and linux["mountExtensions"] == {"idmap": {"enabled": False}}
    seccomp = linux["seccomp"]
    assert seccomp["enabled"] and "SCMP_ACT_ERRNO" in seccomp["actions"] and "SCMP_ACT_NOTIFY" not in seccomp["actions"]
    assert "SCMP_ARCH_X86_64" in seccomp["archs"] and "SCMP_CMP_MASKED_EQ" in seccomp["operators"]
    assert {"bind", "rbind", "ro", "nosuid", "rprivate"} <= set(feats["mountOptions"])
    assert "idmap" not in feats["mountOptions"]


def test_create_and_start_with_a_user_namespace_and_hooks(tmp_path: Path) -> None:
    """The start and reply FIFOs are opened by the host's root before the user namespace exists:
    root of the container's user namespace may not open them in the 0700 state dir."""
    import shutil
    import tempfile

    from nsruntime import libc

    top = Path(tempfile.mkdtemp(prefix="nsrun-userns-"))
    top.chmod(0o755)  # the rootfs must be reachable by the container's root, an unprivileged host id
    libc.set_subreaper()
    b = Bundle(top)
    try:
        (b.rootfs / "start-hook").write_text("#!/bin/sh\ncat /proc/self/uid_map > /tmp/hook-saw\n")
        (b.rootfs / "start-hook").chmod(0o755)
        (b.rootfs / "tmp").chmod(0o1777)  # the container's root is not the host's owner of the image
        b.spec["process"]["args"] = ["sh", "-c", "cat /tmp/hook-saw; id -u; exec sleep 1000"]
        b.spec["linux"]["namespaces"].append({"type": "user"})
        b.spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        b.spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        b.spec["hooks"] = {"startContainer": [{"path": "/start-hook"}], "createRuntime": [{"path": "/bin/true"}]}
        b.write()
        pid = b.create("u1")
        assert b.nsrun("start", "u1").returncode == 0
        from tests.conftest import wait_for

        wait_for(lambda: len(b.out.read_text().splitlines()) >= 2, what="the command's output")
        assert [line.split() for line in b.out.read_text().splitlines()] == [["0", "100000", "65536"], ["0"]]
        assert b.nsrun("delete", "--force", "u1").returncode == 0
        b.reap(pid)
    finally:
        for pid in list(b.pids):
            b.nsrun("delete", "--force", "u1")
            b.reap(pid)
        shutil.rmtree(top)
