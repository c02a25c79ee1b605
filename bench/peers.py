"""The experiment behind "Measuring the peers fairly" (docs/performance.md): one thing toggled.

    unshare -m --propagation private python -m bench.peers [ROUNDS]     (as root, from the clone)

Times `crun run` and `runc run` of the cold start's bundle in interleaved rounds, each sample
either right after moving a parked process of ours between two pids cgroups ("after a move") or
after 50 ms in which this process moved nothing ("quiet"). Nothing else differs: same bundle,
same ids, same spawn, same wait. A runtime whose pid write into cgroup.procs waits for an RCU
grace period shows it as the difference; on a host where other processes move tasks all the time
(a busy container host, another test suite), "quiet" is not quiet and both come out alike.
Nothing is mounted but the controllers mask of coldstart.py, in this private mount namespace.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .coldstart import mask_controllers, runc_bundle
from .lib import PREFIX, make_rootfs, resolve, run_timed

PIDS = "/sys/fs/cgroup/pids"


def main(rounds: int) -> None:
    mask_controllers()
    work = Path(tempfile.mkdtemp(prefix="nsinit-bench.peers.", dir="/var/tmp"))
    park = f"{PIDS}/{PREFIX}peers-{os.getpid()}"
    os.mkdir(park)
    r, w = os.pipe()
    parked = os.fork()
    if parked == 0:  # a process that only waits, for us to move around
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)

    def move() -> None:
        for d in (park, PIDS):
            with open(f"{d}/cgroup.procs", "w") as f:
                f.write(str(parked))

    try:
        rootfs = make_rootfs(work / f"{PREFIX}rootfs", resolve("busybox"))
        argv = {}
        for rt in ("crun", "runc"):
            exe = resolve(rt)
            runc_bundle(work / f"bundle-{rt}", rootfs, exe)
            argv[rt] = [exe, "run", "--bundle", str(work / f"bundle-{rt}"), f"nsinit-bench-peers-{rt}-{os.getpid()}"]
        cases = [(rt, cond) for rt in argv for cond in ("after a move", "quiet")]
        out: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
        for _ in range(rounds):
            for rt, cond in random.sample(cases, len(cases)):
                if cond == "quiet":
                    time.sleep(0.05)
                else:
                    move()
                t, code = run_timed(argv[rt], cwd=str(rootfs))
                if code != 0:
                    raise SystemExit(f"{rt} exited {code}")
                out[(rt, cond)].append(t * 1000)
        for (rt, cond), v in out.items():
            print(f"{rt} {cond:14} median {statistics.median(v):6.1f} ms  min {min(v):5.1f} ms  (n={len(v)})")
    finally:
        os.write(w, b"x")
        os.waitpid(parked, 0)
        os.rmdir(park)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 25)
