"""nsrun runs the spec's hooks (issue 16) at their points of the lifecycle: prestart and
createRuntime on the host once the container's namespaces exist and before its root is switched,
createContainer in its namespaces at that point, startContainer inside its root after `start`,
poststart after it, poststop in `delete`. The hooks here are small scripts that write down what
they saw: the state on their stdin, their namespaces, whether the command had run yet."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.oci.test_nsrun import Bundle

pytestmark = pytest.mark.privileged

# a host-side hook: appends what it saw (its argv, the state, its namespaces and PID 1's) as one line
RECORDER = f"""#!{sys.executable}
import json, os, sys
state = json.load(sys.stdin)
pid = state["pid"]
seen = {{"argv": sys.argv[1:], "state": state, "pidns": os.readlink("/proc/self/ns/pid"),
        "mntns": os.readlink("/proc/self/ns/mnt")}}
if pid and os.path.exists(f"/proc/{{pid}}/ns/net"):
    seen["pid1_netns"] = os.readlink(f"/proc/{{pid}}/ns/net")
    seen["pid1_pidns"] = os.readlink(f"/proc/{{pid}}/ns/pid")
with open(os.environ["HOOK_LOG"], "a") as f:
    f.write(json.dumps(seen) + "\\n")
"""

# the startContainer hook, run inside the container (busybox): the state and whether the command ran
IN_CONTAINER = """#!/bin/sh
cat > /tmp/start-state
if [ -e /tmp/marker ]; then echo ran > /tmp/start-saw; else echo not-yet > /tmp/start-saw; fi
"""


class Hooked:
    def __init__(self, bundle: Bundle, tmp: Path) -> None:
        self.bundle = bundle
        self.log = tmp / "hooks.log"
        self.recorder = tmp / "recorder"
        self.recorder.write_text(RECORDER)
        self.recorder.chmod(0o755)
        (bundle.rootfs / "start-hook").write_text(IN_CONTAINER)
        (bundle.rootfs / "start-hook").chmod(0o755)

    def hook(self, kind: str, **extra: Any) -> dict[str, Any]:
        return {"path": str(self.recorder), "args": ["recorder", kind], "env": [f"HOOK_LOG={self.log}"], **extra}

    def failing(self, tmp: Path, code: int = 3) -> dict[str, Any]:
        p = tmp / f"fail{code}"
        p.write_text(f"#!/bin/sh\necho 'no luck' >&2\nexit {code}\n")
        p.chmod(0o755)
        return {"path": str(p)}

    def seen(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def kinds(self) -> list[str]:
        return [s["argv"][0] for s in self.seen()]


@pytest.fixture
def hooked(bundle: Bundle, tmp_path: Path) -> Hooked:
    return Hooked(bundle, tmp_path)


def test_each_hook_runs_at_its_point_with_the_state_it_should_see(hooked: Hooked) -> None:
    b = hooked.bundle
    b.spec["hooks"] = {kind: [hooked.hook(kind)] for kind in ("prestart", "createRuntime", "createContainer",
                                                               "poststart", "poststop")}
    b.spec["hooks"]["startContainer"] = [{"path": "/start-hook"}]
    b.write()
    pid = b.create()
    assert hooked.kinds() == ["prestart", "createRuntime", "createContainer"]
    host_pidns, host_mntns = os.readlink("/proc/self/ns/pid"), os.readlink("/proc/self/ns/mnt")
    container_pidns, container_netns = os.readlink(f"/proc/{pid}/ns/pid"), os.readlink(f"/proc/{pid}/ns/net")
    assert container_netns != os.readlink("/proc/self/ns/net")
    for seen in hooked.seen():
        assert seen["state"] == {"ociVersion": "1.2.0", "id": "c1", "status": "creating", "pid": pid,
                                 "bundle": str(b.dir), "annotations": {}}
        assert seen["pid1_netns"] == container_netns, "the container's network namespace exists already"
    prestart, create_runtime, create_container = hooked.seen()
    assert (prestart["pidns"], prestart["mntns"]) == (host_pidns, host_mntns)
    assert (create_runtime["pidns"], create_runtime["mntns"]) == (host_pidns, host_mntns)
    assert create_container["pidns"] == container_pidns, "createContainer runs in the container's namespaces"
    assert create_container["mntns"] == os.readlink(f"/proc/{pid}/ns/mnt") != host_mntns
    assert not b.marker() and not (b.rootfs / "tmp" / "start-state").exists()

    p = b.nsrun("start", "c1")
    assert (p.returncode, p.stdout) == (0, "")
    assert json.loads((b.rootfs / "tmp" / "start-state").read_text())["status"] == "created"
    assert json.loads((b.rootfs / "tmp" / "start-state").read_text())["pid"] == pid
    assert (b.rootfs / "tmp" / "start-saw").read_text() == "not-yet\n", "startContainer runs before the command"
    assert hooked.kinds()[3:] == ["poststart"]
    assert hooked.seen()[3]["state"]["status"] == "running"

    assert b.nsrun("delete", "--force", "c1").returncode == 0
    b.reap(pid)
    assert hooked.kinds()[4:] == ["poststop"]
    assert hooked.seen()[4]["state"]["status"] == "stopped"
    assert os.listdir(b.root) == []
    assert b.nsrun("delete", "c1").returncode == 0
    assert hooked.kinds()[5:] == [], "poststop runs once, not for the shim's second delete"


@pytest.mark.parametrize("kind", ["prestart", "createRuntime", "createContainer"])
def test_a_failing_setup_hook_fails_create_and_leaves_nothing(hooked: Hooked, tmp_path: Path, kind: str) -> None:
    b = hooked.bundle
    fail = hooked.failing(tmp_path)
    b.spec["hooks"] = {kind: [hooked.hook(kind), fail, hooked.hook(kind + "-after")],
                       "poststop": [hooked.hook("poststop")]}
    b.write()
    p = b.nsrun("create", "--bundle", str(b.dir), "c1")
    assert p.returncode == 1
    where = "container init: " if kind == "createContainer" else ""
    assert p.stdout == f'nsrun: {where}hooks.{kind}[1] {fail["path"]}: exited 3 (stderr: "no luck")\n'
    assert hooked.kinds() == [kind], "the hooks after the failing one do not run"
    assert os.listdir(b.root) == []


def test_a_failing_start_container_hook_fails_start_and_the_command_never_runs(hooked: Hooked,
                                                                                tmp_path: Path) -> None:
    b = hooked.bundle
    (b.rootfs / "fail-hook").write_text("#!/bin/sh\necho 'not today' >&2\nexit 4\n")
    (b.rootfs / "fail-hook").chmod(0o755)
    b.spec["hooks"] = {"startContainer": [{"path": "/fail-hook"}], "poststart": [hooked.hook("poststart")]}
    b.write()
    pid = b.create()
    p = b.nsrun("start", "c1")
    assert (p.returncode, p.stdout) == (1, 'nsrun: hooks.startContainer[0] /fail-hook: exited 4 (stderr: '
                                           '"not today")\n')
    assert b.state()["status"] == "stopped"
    assert not b.marker() and hooked.kinds() == []
    assert os.WEXITSTATUS(b.reap(pid)) == 125
    assert b.nsrun("delete", "c1").returncode == 0
    assert os.listdir(b.root) == []


def test_failing_poststart_and_poststop_hooks_are_warnings(hooked: Hooked, tmp_path: Path) -> None:
    b = hooked.bundle
    fail = hooked.failing(tmp_path, 1)
    b.spec["hooks"] = {"poststart": [fail, hooked.hook("poststart")], "poststop": [fail, hooked.hook("poststop")]}
    b.write()
    log = tmp_path / "log.json"
    pid = b.create()
    p = b.nsrun("start", "c1", log=log)
    assert (p.returncode, p.stdout) == (0, f'nsrun: warning: hooks.poststart[0] {fail["path"]}: exited 1 (stderr: '
                                           '"no luck")\n')
    entry = json.loads(log.read_text())
    assert (entry["level"], entry["msg"]) == ("warning", p.stdout.removeprefix("nsrun: warning: ").rstrip("\n"))
    assert b.nsrun("kill", "c1", "KILL").returncode == 0
    b.reap(pid)
    p = b.nsrun("delete", "c1")
    assert (p.returncode, p.stdout) == (0, f'nsrun: warning: hooks.poststop[0] {fail["path"]}: exited 1 (stderr: '
                                           '"no luck")\n')
    assert hooked.kinds() == ["poststart", "poststop"], "the hooks after a failing one still run"
    assert os.listdir(b.root) == []


def test_a_hook_past_its_timeout_fails_create(hooked: Hooked, tmp_path: Path) -> None:
    b = hooked.bundle
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 100\n")
    slow.chmod(0o755)
    b.spec["hooks"] = {"createRuntime": [{"path": str(slow), "timeout": 1}]}
    b.write()
    p = b.nsrun("create", "--bundle", str(b.dir), "c1")
    assert (p.returncode, p.stdout) == (1, f"nsrun: hooks.createRuntime[0] {slow}: timed out after 1 s (its "
                                           "process group was killed)\n")
    assert os.listdir(b.root) == []


def test_run_runs_every_hook_in_order_and_returns_the_commands_status(hooked: Hooked) -> None:
    b = hooked.bundle
    b.spec["process"]["args"] = ["sh", "-c", "cat /tmp/start-saw; exit 5"]
    b.spec["hooks"] = {kind: [hooked.hook(kind)] for kind in ("prestart", "createRuntime", "createContainer",
                                                               "poststart", "poststop")}
    b.spec["hooks"]["startContainer"] = [{"path": "/start-hook"}]
    b.write()
    p = b.nsrun("run", "--bundle", str(b.dir), "r1")
    assert (p.returncode, p.stdout) == (5, "not-yet\n")
    assert hooked.kinds() == ["prestart", "createRuntime", "createContainer", "poststart", "poststop"]
    assert os.listdir(b.root) == []
