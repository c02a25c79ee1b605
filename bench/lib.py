"""What every benchmark part shares: timing, statistics, children that can't outlive us, host checks.

Nothing here imports the project: the harness measures nsinit from the outside, the way a user
runs it, so its own imports never count against the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
# every rootfs directory we make starts with this, and nsinit names a container's cgroups after its
# rootfs directory: what the cleanup may remove is recognisable by name (runc/crun ids: nsinit-bench-)
PREFIX = "nsb-"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


# Where a run keeps its files (rootfs trees, both supervisors' logs): a disk. Creating a file
# there costs 0.02-0.5 ms on the machine this was written on, depending on what the disk's
# journal is busy with (the report gives the cost, file_create_ms). BENCH_WORKDIR overrides it.
WORK_BASE = os.environ.get("BENCH_WORKDIR", "/var/tmp")
# nsinitd's per-program state (pid, start, state.json) goes where nsinitd keeps it by default,
# on tmpfs under /run (DEFAULT_STATE_DIR is /run/nsinit): a directory of this run's, below here.
RUN_BASE = "/run"


def file_create_ms(directory: str, n: int = 200) -> float:
    """Median cost of creating (and writing one byte to) a new file in directory."""
    d = tempfile.mkdtemp(prefix="nsinit-bench-fs.", dir=directory)
    try:
        times = []
        for i in range(n):
            t = time.perf_counter()
            fd = os.open(os.path.join(d, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.write(fd, b"x")
            os.close(fd)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000
    finally:
        shutil.rmtree(d, ignore_errors=True)


def settle(max_wait: float = 15.0, idle_share: float = 0.8, window: float = 0.3) -> float:
    """Wait (bounded) until the machine is quiet again: the kernel finishes a run's deferred work
    after it (500 network namespaces to clean up, cgroups to release) and must not bill it to
    whichever contender runs next. Quiet: at least idle_share of all CPU time idle over window.
    Returns how long it waited."""
    def idle_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, all

    t0 = time.monotonic()
    while time.monotonic() - t0 < max_wait:
        i0, a0 = idle_total()
        time.sleep(window)
        i1, a1 = idle_total()
        if a1 > a0 and (i1 - i0) / (a1 - a0) >= idle_share:
            break
    return time.monotonic() - t0


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class Skip(Exception):
    """A part (or a contender) that can't run here; the message says why, and the report prints it."""


# -- statistics -----------------------------------------------------------------------------------


def summary(samples: Sequence[float]) -> dict[str, Any]:
    s = sorted(samples)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "median": statistics.median(s),
        "min": s[0],
        "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
        "max": s[-1],
    }


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "median") -> float | None:
    if not a or not b or not a.get(key) or not b.get(key):
        return None
    return float(a[key]) / float(b[key])


# -- running things -------------------------------------------------------------------------------


def resolve(name: str) -> str:
    """A console script next to our interpreter first: pyenv's shims are bash scripts that would
    add tens of milliseconds to every start and have nothing to do with the program measured."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise Skip(f"{name} not found")
    return found


def run_timed(argv: Sequence[str], cwd: str | None = None, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> tuple[float, int]:
    """Wall time of one whole process (spawn to reaped), and its exit status.

    posix_spawn, then a bounded wait for its pidfd to become readable (the exit itself, not a
    polling loop: waking every 0.2 ms to poll took CPU from the contender on a 2-core machine)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], list(argv), env if env is not None else os.environ,
                             file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1)])
    finally:
        os.chdir(old)
        os.close(devnull)
    pidfd = os.pidfd_open(pid)
    try:
        waiter = select.poll()
        waiter.register(pidfd, select.POLLIN)
        if not waiter.poll(timeout * 1000):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"{argv[0]}: still running after {timeout:.0f}s")
        _, status = os.waitpid(pid, 0)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(pidfd)
    return elapsed, os.waitstatus_to_exitcode(status)


def interleave(contenders: dict[str, Callable[[], float]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run every contender once per round, in a fresh random order each round, so that drift in the
    machine (other load, caches, frequency) is spread over all of them alike."""
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        random.shuffle(names)
        for n in names:
            out[n].append(contenders[n]())
    return out


class Children:
    """Every long-lived process a part starts, so that `close()` (from a finally block) leaves none."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("start_new_session", True)  # a group of its own: killable as a whole
        p = subprocess.Popen(list(argv), **kw)
        self.procs.append(p)
        return p

    def close(self, grace: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # leftovers of its session
        self.procs.clear()


def set_subreaper() -> None:
    """Orphans of whatever we start come to us, so that nothing escapes the cleanup."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.01, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- /proc ----------------------------------------------------------------------------------------


def ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(root: int, include_root: bool = True) -> list[int]:
    pm = ppid_map()
    kids: dict[int, list[int]] = {}
    for pid, pp in pm.items():
        kids.setdefault(pp, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p != root or include_root:
            out.append(p)
        todo.extend(kids.get(p, []))
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- the host before and after --------------------------------------------------------------------


def host_state() -> dict[str, list[str]]:
    """What a run must leave as it found: links, mounts, cgroup directories, runc/crun state, our temp dirs."""
    links = sorted(os.listdir("/sys/class/net"))
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f)
    cg: list[str] = []
    for base in Path("/sys/fs/cgroup").iterdir():
        with contextlib.suppress(OSError):
            for dirpath, dirnames, _ in os.walk(base):
                cg.extend(str(Path(dirpath) / d) for d in dirnames)
    rt = []
    for d in ("/run/runc", "/run/crun"):
        with contextlib.suppress(OSError):
            rt.extend(f"{d}/{x}" for x in os.listdir(d))
    tmp = sorted(str(p) for base in (WORK_BASE, RUN_BASE) for p in Path(base).glob("nsinit-bench.*"))
    return {"links": links, "mounts": mounts, "cgroups": sorted(cg), "runtime_state": sorted(rt), "tmp": tmp}


def host_diff(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, list[str]]:
    out = {}
    for k, v in after.items():
        extra = sorted(set(v) - set(before.get(k, [])))
        if extra:
            out[k] = extra
    return out


def note_daemon(pid: int) -> None:
    """Record an nsinitd we started: killed at a time bound, it would leave its nsinitd-PID-TICKS cgroup."""
    work = os.environ.get("BENCH_WORK")
    if work:
        with open(Path(work) / "daemons", "a") as f:
            f.write(f"{pid}\n")


def remove_our_cgroups(before: list[str], daemons: Iterable[int] = ()) -> list[str]:
    """Kill what is left in, and remove, the cgroup directories that appeared during the run and
    are ours by name (a runtime that failed halfway may leave some); deepest first, bounded."""
    import re

    names = [re.escape(PREFIX) + "[^/]*", "nsinit-bench-[^/]*", *(f"nsinitd-{int(p)}-[0-9]+" for p in daemons)]
    ours = re.compile(rf"/({'|'.join(names)})(/|$)")
    old = set(before)
    dirs = [d for d in host_state()["cgroups"] if d not in old and ours.search(d)]
    removed = []
    for d in sorted(dirs, key=lambda x: -x.count("/")):
        for _ in range(40):
            with contextlib.suppress(OSError, ValueError), open(f"{d}/cgroup.procs") as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                os.rmdir(d)
                removed.append(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
    return removed


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.rename(path)


# -- the rootfs every part uses -------------------------------------------------------------------

BUSYBOX_APPLETS = ("sh", "true", "false", "sleep", "cat", "ls", "echo", "hostname", "mount", "ps")


def make_rootfs(root: Path, busybox: str, extra_bins: Iterable[str] = (), link: bool = False) -> Path:
    """A busybox rootfs: /bin/busybox with its applets, the helper binaries, empty mount points.

    link=True hardlinks the binaries instead of copying them (hundreds of containers then share one
    page cache copy, as they would share an image's layers)."""
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for src in (busybox, *extra_bins):
        dst = root / "bin" / Path(src).name
        if link:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
    for a in BUSYBOX_APPLETS:
        os.symlink("busybox", root / "bin" / a)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


NSINIT_CONFIG = {
    "hostname": "bench",
    "tty": False,
    "environment": ["PATH=/bin", "HOME=/"],
    "namespaces": ["NEWNS", "NEWUTS", "NEWIPC", "NEWPID", "NEWNET"],
    "readonly_fs": True,
}


def write_nsinit_config(root: Path, **over: Any) -> None:
    (root / "container.json").write_text(json.dumps({**NSINIT_CONFIG, **over}, indent=1))


def kill_leftovers() -> list[str]:
    """We are a child subreaper: anything a part leaked is one of our descendants now."""
    killed = []
    for _ in range(50):
        left = [p for p in descendants(os.getpid(), include_root=False)]
        if not left:
            break
        for p in left:
            killed.append(f"{p} {comm(p)}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        time.sleep(0.05)
    return killed
