"""A rootfs is the container's own: a symlink planted anywhere in it never leads nsinit onto the host.

Each case plants a symlink at a path nsinit creates, writes or mounts on (dev, proc, sys, etc,
a mount destination, a masked or read-only path), pointing at a host directory the test made
outside the rootfs. The host directory must keep exactly what it held, and the container must
work with the path resolved inside its own root.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import nsinit, write_config

pytestmark = pytest.mark.privileged


def _tree(path: Path) -> dict[str, str]:
    """Every entry below path with its content (files), its target (links) or "dir"."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_text()
    return out


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A directory of the host's, outside the rootfs, that no container may touch."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "keep").write_text("the host's\n")
    return d


def _plant(rootfs: Path, at: str, host_dir: Path, how: str) -> None:
    link = rootfs / at
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    if how == "absolute":
        link.symlink_to(host_dir)
    else:  # enough '..' to climb out of the rootfs, were they followed on the host
        link.symlink_to("../" * (at.count("/") + 12) + str(host_dir).lstrip("/"))


# (where the symlink goes, config changes, probe run in the container, what the probe prints)
CASES = {
    "dev": ("dev", {}, "head -c 4 /dev/zero | wc -c; echo x > /dev/null; readlink /dev/ptmx", "4\npts/ptmx\n"),
    "proc": ("proc", {}, "cat /proc/1/comm", "nsinit-init\n"),
    "sys": ("sys", {}, "ls /sys/class/net", "lo\n"),
    "etc": ("etc", {}, "hostname", "koye\n"),
    "bind mount destination": ("data", {"mounts": [{"source": "SRC", "destination": "/data"}]},
                               "cat /data/payload", "inside\n"),
    "tmpfs mount destination": ("scratch", {"mounts": [{"type": "tmpfs", "destination": "/scratch"}]},
                                "touch /scratch/new && ls /scratch", "new\n"),
    "masked path": ("secret", {"masked_paths": ["/secret"]}, "ls -A /secret | wc -l", "0\n"),
    "read-only path": ("shared", {"readonly_paths": ["/shared"]},
                       "touch /shared/new 2>/dev/null || echo read-only; cat /shared/keep", "read-only\ninside\n"),
}


@pytest.mark.parametrize("how", ["absolute", "relative"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_symlink_in_the_rootfs_never_leads_onto_the_host(busybox_rootfs: Path, host_dir: Path, tmp_path: Path,
                                                          case: str, how: str) -> None:
    at, changes, probe, expected = CASES[case]
    if "mounts" in changes:
        src = tmp_path / "src"
        src.mkdir()
        (src / "payload").write_text("inside\n")
        changes = json.loads(json.dumps(changes).replace('"SRC"', json.dumps(str(src))))
    if case in ("masked path", "read-only path"):
        # the same path inside the rootfs: where the link leads when resolved in the container's root
        inside = busybox_rootfs / str(host_dir).lstrip("/")
        inside.mkdir(parents=True)
        (inside / "keep").write_text("inside\n")
    _plant(busybox_rootfs, at, host_dir, how)
    if changes:
        write_config(busybox_rootfs, **changes)
    before = _tree(host_dir)

    r = nsinit(busybox_rootfs, "exec", "sh", "-c", probe)

    assert _tree(host_dir) == before
    assert str(host_dir) not in _mount_points()
    assert (r.returncode, r.stderr, r.stdout) == (0, "", expected)
