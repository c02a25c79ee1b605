"""nsrun update and events (issue 16): a live container's limits changed in its cgroups, its stats
in runc's shape, and a stream of events that reports the OOM killer and ends with the container."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.oci.test_nsrun import ENV, NSRUN, Bundle
from tests.oci.test_nsrun_exec import started

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def leaf(b: Bundle, controller: str) -> Path:
    """The container's directory in the v1 hierarchy of controller."""
    paths = json.loads((b.root / "c1" / "state.json").read_text())["cgroups"]
    mine = [Path(p) for p in paths if p.endswith("/c1") and f"/{controller}/" in p]
    assert len(mine) == 1, paths
    return mine[0]


def read(p: Path) -> str:
    return p.read_text().strip()


def test_update_from_a_resources_file_changes_the_live_limits(bundle: Bundle, tmp_path: Path) -> None:
    bundle.spec["linux"]["resources"]["memory"] = {"limit": 64 * MiB}
    bundle.write()
    started(bundle)
    assert read(leaf(bundle, "memory") / "memory.memsw.limit_in_bytes") == str(128 * MiB)
    res = {"memory": {"limit": 256 * MiB, "swap": 512 * MiB}, "pids": {"limit": 77},
           "cpu": {"shares": 512, "quota": 50000, "period": 200000}}
    (tmp_path / "r.json").write_text(json.dumps(res))
    p = bundle.nsrun("update", "--resources", str(tmp_path / "r.json"), "c1")
    assert (p.returncode, p.stdout) == (0, "")
    mem, pids, cpu = leaf(bundle, "memory"), leaf(bundle, "pids"), leaf(bundle, "cpu")
    assert read(mem / "memory.limit_in_bytes") == str(256 * MiB), "raised above the old memory+swap: memsw first"
    assert read(mem / "memory.memsw.limit_in_bytes") == str(512 * MiB)
    assert read(pids / "pids.max") == "77"
    assert (read(cpu / "cpu.shares"), read(cpu / "cpu.cfs_quota_us"), read(cpu / "cpu.cfs_period_us")) == (
        "512", "50000", "200000")

    p = subprocess.run([*NSRUN, "--root", str(bundle.root), "update", "-r", "-", "c1"], input='{"memory": '
                       f'{{"limit": {32 * MiB}, "swap": {32 * MiB}}}}}', capture_output=True, text=True, env=ENV,
                       timeout=30)
    assert (p.returncode, p.stderr) == (0, "")
    assert read(mem / "memory.limit_in_bytes") == str(32 * MiB), "lowered below the old one: memory first"
    assert read(mem / "memory.memsw.limit_in_bytes") == str(32 * MiB)


def test_update_takes_runcs_flags(bundle: Bundle) -> None:
    started(bundle)
    p = bundle.nsrun("update", "--memory", "100m", "--pids-limit", "50", "--cpu-share", "300", "c1")
    assert (p.returncode, p.stdout) == (0, "")
    assert read(leaf(bundle, "memory") / "memory.limit_in_bytes") == str(100 * MiB)
    assert read(leaf(bundle, "pids") / "pids.max") == "50"
    assert read(leaf(bundle, "cpu") / "cpu.shares") == "300"
    assert bundle.nsrun("update", "--pids-limit", "-1", "c1").returncode == 0
    assert read(leaf(bundle, "pids") / "pids.max") == "max", "-1 lifts the limit"


@pytest.mark.parametrize(("args", "message"), [
    (["--memory", "lots"], "--memory 'lots': not a number (k, m, g allowed)"),
    (["--pids-limit", "1"], "update.pids.limit: 1 is too low: PID 1 and the command need 2 (0 or -1 for no limit)"),
    ([], "update: --resources F or a limit flag (--memory, --pids-limit...) is required"),
])  # fmt: skip
def test_update_refuses_what_it_cannot_apply_naming_it(bundle: Bundle, args: list[str], message: str) -> None:
    started(bundle)
    p = bundle.nsrun("update", *args, "c1")
    assert (p.returncode, p.stdout) == (1, f"nsrun: {message}\n")


def test_update_refuses_an_unsupported_resource_naming_its_path(bundle: Bundle, tmp_path: Path) -> None:
    started(bundle)
    (tmp_path / "r.json").write_text(json.dumps({"memory": {"kernel": 1 << 30}}))
    p = bundle.nsrun("update", "-r", str(tmp_path / "r.json"), "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: resources.memory.kernel: not supported\n")


def test_update_of_a_stopped_container_is_refused(bundle: Bundle) -> None:
    pid = bundle.create()
    bundle.nsrun("kill", "c1", "KILL")
    bundle.reap(pid)
    p = bundle.nsrun("update", "--memory", "10m", "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: cannot update a container that is stopped\n")


def test_events_stats_prints_one_stats_event_in_runcs_shape(bundle: Bundle) -> None:
    bundle.spec["linux"]["resources"]["memory"] = {"limit": 64 * MiB}
    bundle.spec["linux"]["resources"]["pids"] = {"limit": 40}
    bundle.write()
    started(bundle)
    p = subprocess.run([*NSRUN, "--root", str(bundle.root), "events", "--stats", "c1"], capture_output=True,
                       text=True, env=ENV, timeout=30)
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.splitlines()
    event = json.loads(line)
    assert (event["type"], event["id"]) == ("stats", "c1")
    data = event["data"]
    assert data["pids"] == {"current": 2, "limit": 40}, "PID 1 and sh"
    assert data["memory"]["usage"]["limit"] == 64 * MiB and data["memory"]["usage"]["usage"] > 0
    assert data["memory"]["swap"]["limit"] == 128 * MiB
    assert data["cpu"]["usage"]["total"] > 0 and len(data["cpu"]["usage"]["percpu"]) == os.cpu_count()
    assert {"cpu", "memory", "pids", "blkio", "hugetlb"} <= set(data)


class Lines:
    """A process's stdout, read line by line with a bound on each wait."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.buf = b""

    def next(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next JSON line, or None at end of output."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], f"no event within {timeout} s"
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]


def test_events_streams_stats_reports_the_oom_killer_and_ends_with_the_container(bundle: Bundle) -> None:
    bundle.spec["linux"]["resources"]["memory"] = {"limit": 32 * MiB, "swap": 32 * MiB}
    bundle.write()
    pid = started(bundle)
    with subprocess.Popen([*NSRUN, "--root", str(bundle.root), "events", "--interval", "200ms", "c1"],
                          stdout=subprocess.PIPE, env=ENV) as proc:
        try:
            lines = Lines(proc)
            first = lines.next()
            assert first is not None and (first["type"], first["id"]) == ("stats", "c1")
            p = bundle.nsrun("exec", "c1", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1")
            assert p.returncode == 137, "the OOM killer took dd"
            while (event := lines.next()) is not None and event["type"] == "stats":
                pass
            assert event == {"type": "oom", "id": "c1"}
            assert bundle.nsrun("kill", "c1", "KILL").returncode == 0
            bundle.reap(pid)
            while (event := lines.next()) is not None:
                assert event["type"] in ("stats", "oom")
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()  # (already gone when the test passes)
