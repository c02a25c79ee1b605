"""Nothing nsinitd writes is world-writable (issue 8, "Access").

nsinitd is started with umask 0, the worst an init system or a careless shell can hand it, so the
modes seen are the ones nsinitd chose, not ones a umask happened to mask. Every path it made is
walked while programs run (the socket exists only then) and again after an ordered shutdown.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_busybox_rootfs
from tests.reliability.conftest import Daemon

pytestmark = [pytest.mark.privileged, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _world_writable(top: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            if mode & stat.S_IWOTH:
                bad.append(f"{p} {stat.filemode(mode)}")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_nothing_nsinitd_writes_is_world_writable(tmp_path: Path, nsinitd: Callable[..., Daemon], umask: int) -> None:
    box = make_busybox_rootfs(tmp_path / "bb", {"namespaces": ["NEWNS", "NEWPID", "NEWUTS", "NEWIPC"]})
    d = nsinitd(f"""
        [programs.box]
        container = "{box}"
        command = ["sh", "-c", "echo out; echo err >&2; exec sleep 100000"]
        startsecs = 0
        [programs.plain]
        command = ["sh", "-c", "echo out; echo err >&2; exec sleep 100000"]
        startsecs = 0
    """, umask=umask)
    d.wait_answering()
    for name in ("box", "plain"):
        d.wait_for("program.running", name)
    run = d.run
    made = [run / "ctl", run / "state", run / "log"]  # everything nsinitd made (the config is ours)
    assert (run / "state" / "nsinitd" / "box" / "pid").exists()
    assert (run / "state" / "nsinitd" / "plain" / "pid").exists()
    assert (run / "log" / "nsinitd" / "box.out").exists() and (run / "log" / "events" / "events.jsonl").exists()
    sock = os.stat(d.socket)
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600 and sock.st_uid == 0
    while_running = [x for top in made for x in _world_writable(top)]
    assert d.terminate() == 0
    after = [x for top in made for x in _world_writable(top)]
    assert (while_running, after) == ([], [])
