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
