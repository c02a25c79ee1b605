"""Fixtures for the whole suite, and the check that every test leaves the host as it found it.

Around each test the host's mounts, cgroup directories, network links, named network namespaces
and our processes are read before and after; anything new afterwards fails the test (as an
error in its teardown) and is named.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def _cgroups() -> set[str]:
    found = set()
    for base in Path("/sys/fs/cgroup").iterdir():
        for dirpath, dirnames, _files in os.walk(base):
            depth = dirpath[len(str(base)) :].count("/")
            if depth >= 5:
                dirnames[:] = []
            found.add(dirpath)
    return found


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _our_processes() -> set[str]:
    """Processes that look like ours: our init anywhere, and any descendant of this test run."""
    me = os.getpid()
    out = set()
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        pid = int(d)
        comm = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
        fields = data[data.rindex(b")") + 2 :].split()
        parents[pid] = int(fields[1])
        names[pid] = f"{comm} ({fields[0].decode()})"
    for pid, name in names.items():
        p, hops = pid, 0
        while p > 1 and hops < 50:
            p = parents.get(p, 0)
            hops += 1
            if p == me:
                out.add(f"{pid} {name}")
                break
        else:
            if name.startswith(("nsinit-init", "nsinit-keeper")):  # wherever they were reparented
                out.add(f"{pid} {name}")
    return out


def snapshot() -> dict[str, set[str]]:
    return {"mounts": _mounts(), "cgroups": _cgroups(), "links": _links(), "netns": _netns(),
            "processes": _our_processes()}


def leftovers(before: dict[str, set[str]], deadline: float = 5.0) -> dict[str, set[str]]:
    """What is new since before; processes and cgroups get a bounded moment to go."""
    end = time.monotonic() + deadline
    while True:
        after = snapshot()
        new = {k: after[k] - before[k] for k in after if after[k] - before[k]}
        if not new or time.monotonic() > end:
            return new
        time.sleep(0.05)


def _subreaper() -> int:
    import ctypes

    from nsruntime import libc

    flag = ctypes.c_int(0)
    libc.prctl(37, ctypes.addressof(flag))  # PR_GET_CHILD_SUBREAPER
    return flag.value


@pytest.fixture(autouse=True)
def host_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    before = snapshot()
    was_subreaper = _subreaper()
    yield
    # nsruntime.create() makes its caller a child subreaper: a test that called it in-process must
    # not leave pytest adopting (and never reaping) the orphans of every later test
    from nsruntime import libc

    libc.prctl(libc.PR_SET_CHILD_SUBREAPER, was_subreaper)
    new = leftovers(before)
    if new:
        pytest.fail(f"the test left things on the host: {json.dumps({k: sorted(v) for k, v in new.items()})}")


# ------------------------------------------------------------------ rootfs


def make_busybox_rootfs(path: Path, config: dict[str, object] | None = None) -> Path:
    """A rootfs holding busybox-static and its applets, plus container.json."""
    (path / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        link = path / "bin" / a
        if not link.exists():
            link.symlink_to("busybox")
    for d in ("etc", "tmp", "root"):
        (path / d).mkdir(exist_ok=True)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:a:/home/alice:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\nalice:x:1000:\nstaff:x:50:alice\n")
    cfg: dict[str, object] = {
        "hostname": "koye",
        "environment": ["HOME=/root", "PATH=/bin", "TERM=xterm"],
        "namespaces": ["NEWNS", "NEWUTS", "NEWIPC", "NEWPID", "NEWNET"],
    }
    if config:
        cfg.update(config)
    (path / "container.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def busybox_rootfs(tmp_path: Path) -> Path:
    return make_busybox_rootfs(tmp_path / "bb")


@pytest.fixture
def host_rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    root.mkdir()
    shutil.copy2(REPO / "configs" / "host" / "container.json", root / "container.json")
    return root


def write_config(root: Path, **changes: object) -> None:
    p = root / "container.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


NSINIT = [sys.executable, "-m", "nsruntime.cli"]


def nsinit(root: Path, *args: str, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run `nsinit ARGS...` in root and wait (bounded)."""
    return subprocess.run([*NSINIT, *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)  # type: ignore[call-overload]


def nsinit_bg(root: Path, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([*NSINIT, *args], cwd=root, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def records(root: Path) -> Path:
    """Where `nsinit exec` (without --root) keeps the records (pid, start, state.json) of the
    container of rootfs root: outside it, in $NSINIT_STATE_ROOT/ID."""
    from nsruntime.state import derive_id, state_root

    return Path(state_root()) / derive_id(os.path.realpath(root))


def live_pid(root: Path) -> int | None:
    """PID 1 of the container whose pid file (the courtesy copy in a rootfs, or the record in a
    --root directory) names a live process."""
    try:
        pid = int((root / "pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None
