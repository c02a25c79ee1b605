"""Part 1, cold start: `nsinit exec /bin/true` against runc, crun and the C floor, interleaved.

Run by bench/main.py as ``unshare -m --propagation private python -m bench.coldstart WORK OUT``. In
that private mount namespace (the host's mount table never changes):

* /dev/null is bind-mounted over the cgroup2 root's cgroup.controllers: crun 1.8 refuses a hybrid
  layout whose cgroup2 lists a controller;
* every runtime keeps its state on a tmpfs of the run's (``--root`` for runc and crun,
  ``$NSINIT_STATE_ROOT`` for nsinit), as on a host whose /run is a tmpfs;
* while samples are taken, a thread moves a parked process of ours between two cgroups every 2 ms.
  Moving a process into a cgroup (runc and crun write its pid to ``cgroup.procs``) takes the
  kernel's global threadgroup lock for writing, which waits for an RCU grace period (5-15 ms here)
  unless another move happened within about the last grace period. Without the keeper, a peer's
  figure depended on which contender the random order put before it: 8 ms after a runc or crun,
  17 ms after a Python process. Kept warm, runc and crun are measured the way they run fastest
  (as on a host that starts containers all the time). nsinit never moves a process by pid (it
  clones into its cgroup2 directory and joins v1 hierarchies through ``tasks`` with "0"), so the
  keeper does not help it; its CPU (a write every 2 ms) is spread over every contender alike.
  (The kernel's own switch for this, a hierarchy mounted with ``favordynmods``, is not used: it
  would change the whole host's lock mode for as long as the hierarchy lives.)

Besides the four contenders the same rounds time the interpreter alone (``python -S``, and with
site), and the interpreter plus the imports `nsinit exec` makes: the difference between those and
the full start is what nsinit's own work costs.

A second, shorter set of rounds keeps the evidence: it times nsinit, runc and crun under the
conditions above and with one of them taken away (no keeper and 50 ms in which the bench moved
nothing; the state on the host's /run), so the report shows what each costs each runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .lib import (
    PREFIX,
    QUICK,
    Skip,
    interleave,
    log,
    make_rootfs,
    resolve,
    run_timed,
    summary,
    write_json,
    write_nsinit_config,
)

CONTROLLERS = "/sys/fs/cgroup/unified/cgroup.controllers"
ROUNDS = 15 if QUICK else 60
CONDITION_ROUNDS = 6 if QUICK else 20
IMPORTS = "import nsruntime.cli, nsruntime.creator, nsruntime.joiner, nsruntime.config"
RUNTIMES = ("runc", "crun")
# the conditions of the main rounds, and the same with one thing taken away
FAST = "moves kept warm, state on tmpfs"
NO_FDM = "no move for 50 ms before each"
ON_RUN = "moves kept warm, state in /run"
QUIET_S = 0.05  # a few RCU grace periods: the lock's fast mode comes back after about one


def runc_bundle(bundle: Path, rootfs: Path, runtime: str) -> None:
    """`runc spec`'s config, with the same namespaces as nsinit's, no terminal, and /bin/true."""
    bundle.mkdir(parents=True, exist_ok=True)
    subprocess.run([runtime, "spec", "--bundle", str(bundle)], check=True, capture_output=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/true"]
    spec["root"] = {"path": str(rootfs), "readonly": True}
    spec["hostname"] = "bench"
    spec["linux"]["namespaces"] = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))


def mask_controllers() -> None:
    if os.readlink("/proc/self/ns/mnt") == os.readlink(f"/proc/{os.getppid()}/ns/mnt"):
        raise SystemExit("coldstart: run me in a mount namespace of my own (main.py uses unshare -m)")
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4] == "/" and "shared:" in line for line in f):
            raise SystemExit("coldstart: / is shared here: a bind mount would reach the host")
    if os.path.exists(CONTROLLERS):
        subprocess.run(["mount", "--bind", "/dev/null", CONTROLLERS], check=True)


class Keeper:
    """A thread that moves a parked process of ours between two cgroups every ``period`` seconds,
    so that no contender's own move waits for an RCU grace period (see the module's docstring)."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.base = _cgroup_mount()
        self.park = os.path.join(self.base, f"{PREFIX}keeper-{os.getpid()}")
        os.mkdir(self.park)
        r, self._w = os.pipe()
        self.parked = os.fork()
        if self.parked == 0:  # a process that only waits, for us to move around
            os.close(self._w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _move(self) -> None:
        for d in (self.park, self.base):
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(self.parked))

    def start(self) -> None:
        if self._thread is None:
            self._stop = stop = threading.Event()
            self._move()

            def run() -> None:
                while not stop.wait(self.period):
                    self._move()

            self._thread = threading.Thread(target=run, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        os.write(self._w, b"x")
        os.waitpid(self.parked, 0)
        os.rmdir(self.park)


def _cgroup_mount() -> str:
    """A cgroup hierarchy to move the parked process in: v1 pids if mounted, else the first cgroup mount."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            kind, options = fields[fields.index("-") + 1], fields[-1]
            if kind in ("cgroup", "cgroup2"):
                found.append((not (kind == "cgroup" and "pids" in options.split(",")), fields[4]))
    if not found:
        raise Skip("no cgroup hierarchy mounted")
    return min(found)[1]


def checked(name: str, argv: list[str], cwd: str | None = None, env: dict[str, str] | None = None) -> Any:
    """A contender that must exit 0; probed once, with its stderr kept for the skip reason."""
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=60)
    if p.returncode != 0:
        raise Skip(f"{name} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()[-300:]}")

    def one() -> float:
        t, code = run_timed(argv, cwd=cwd, env=env)
        if code != 0:
            raise RuntimeError(f"{name} exited {code} during the run")
        return t

    return one


def conditions(keeper: Keeper, on_tmpfs: dict[str, Callable[[], float]], on_run: dict[str, Callable[[], float]],
               rounds: int) -> dict[str, dict[str, list[float]]]:
    """nsinit, runc and crun under the main rounds' conditions and with one taken away, interleaved."""
    out: dict[str, dict[str, list[float]]] = {c: {n: [] for n in on_tmpfs} for c in (FAST, NO_FDM, ON_RUN)}
    for _ in range(rounds):
        for cond in random.sample(list(out), len(out)):
            if cond == NO_FDM:
                keeper.stop()
            else:
                keeper.start()
            for name in random.sample(list(on_tmpfs), len(on_tmpfs)):
                if cond == NO_FDM:
                    time.sleep(QUIET_S)  # nothing of the bench's moved a process since the last sample
                out[cond][name].append((on_run if cond == ON_RUN else on_tmpfs)[name]())
    keeper.stop()
    return out


def main(work: Path, out: Path, floor: str) -> None:
    mask_controllers()
    rootfs = make_rootfs(work / f"{PREFIX}rootfs", resolve("busybox"))
    write_nsinit_config(rootfs)
    state = work / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700,size=64m", "nsinit-bench-state", str(state)], check=True)
    python = sys.executable
    nsinit = resolve("nsinit")
    result: dict[str, Any] = {"skipped": {}, "rounds": ROUNDS, "argv": {}, "conditions_rounds": CONDITION_ROUNDS,
                              "run_fs": fs_type("/run"), "conditions": {}, "conditions_order": [FAST, NO_FDM, ON_RUN]}
    env_tmpfs = {**os.environ, "NSINIT_STATE_ROOT": str(state / "nsinit")}
    todo: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "nsinit": ([nsinit, "exec", "/bin/true"], env_tmpfs),
        "floor": ([floor, str(rootfs), "/bin/true"], None),
        "python -S -c pass": ([python, "-S", "-c", "pass"], None),
        "python -c pass": ([python, "-c", "pass"], None),
        "python + nsinit imports": ([python, "-c", IMPORTS], None),
        # the same, leaving through os._exit: the difference is the interpreter's finalization of those modules
        "python + imports, os._exit": ([python, "-c", IMPORTS + ", os; os._exit(0)"], None),
    }
    on_run: dict[str, Callable[[], float]] = {}
    ids: list[tuple[str, str]] = []
    for rt in RUNTIMES:
        try:
            exe = resolve(rt)
            runc_bundle(work / f"bundle-{rt}", rootfs, exe)
            cid = f"nsinit-bench-{rt}-{os.getpid()}"
            ids.append((exe, cid))
            todo[rt] = ([exe, "--root", str(state / rt), "run", "--bundle", str(work / f"bundle-{rt}"), cid], None)
            on_run[rt] = checked(rt, [exe, "run", "--bundle", str(work / f"bundle-{rt}"), cid], cwd=str(rootfs))
        except (Skip, subprocess.CalledProcessError) as e:
            result["skipped"][rt] = str(e)
    contenders = {}
    for name, (argv, env) in todo.items():
        try:
            contenders[name] = checked(name, argv, cwd=str(rootfs), env=env)
            result["argv"][name] = argv
        except Skip as e:
            result["skipped"][name] = str(e)
    if "nsinit" in contenders:
        on_run["nsinit"] = checked("nsinit", [nsinit, "exec", "/bin/true"], cwd=str(rootfs))
    log(f"cold start: {ROUNDS} interleaved rounds of {', '.join(contenders)}")
    keeper = Keeper()
    try:
        keeper.start()
        samples = interleave(contenders, ROUNDS)
        keeper.stop()
        measured = {n: contenders[n] for n in ("nsinit", *RUNTIMES) if n in contenders and n in on_run}
        log(f"cold start: {CONDITION_ROUNDS} rounds of {', '.join(measured)} under {FAST}; {NO_FDM}; {ON_RUN}")
        cond = conditions(keeper, measured, on_run, CONDITION_ROUNDS)
    finally:
        for exe, cid in ids:
            for args in (["--root", str(state / Path(exe).name)], []):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run([exe, *args, "delete", "--force", cid], capture_output=True, timeout=30)
        keeper.close()
        subprocess.run(["umount", str(state)], check=False)
    result["stats"] = {n: summary(s) for n, s in samples.items()}
    result["samples"] = samples
    result["conditions"] = {c: {n: summary(s) for n, s in per.items()} for c, per in cond.items()}
    write_json(out, result)


def fs_type(path: str) -> str:
    """The type of the file system path is on (the last mount that covers it)."""
    best, kind = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt, fstype = fields[4], fields[fields.index("-") + 1]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fstype
    return kind


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
