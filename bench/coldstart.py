"""Part 1, cold start: `nsinit exec /bin/true` against runc, crun and the C floor, interleaved.

Run by bench/main.py as ``unshare -m --propagation private python -m bench.coldstart WORK OUT``: in
that private mount namespace /dev/null is bind-mounted over the cgroup2 root's cgroup.controllers
(crun 1.8 refuses a hybrid layout whose cgroup2 lists a controller), so every runtime sees the same
thing and the host's mount table never changes.

Besides the four contenders the same rounds time the interpreter alone (``python -S``, and with
site), and the interpreter plus the imports `nsinit exec` makes: the difference between those and
the full start is what nsinit's own work costs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
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
IMPORTS = "import nsruntime.cli, nsruntime.creator, nsruntime.joiner, nsruntime.config"


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


def checked(name: str, argv: list[str], cwd: str | None = None) -> Any:
    """A contender that must exit 0; probed once, with its stderr kept for the skip reason."""
    p = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60)
    if p.returncode != 0:
        raise Skip(f"{name} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()[-300:]}")

    def one() -> float:
        t, code = run_timed(argv, cwd=cwd)
        if code != 0:
            raise RuntimeError(f"{name} exited {code} during the run")
        return t

    return one


def main(work: Path, out: Path, floor: str) -> None:
    mask_controllers()
    rootfs = make_rootfs(work / f"{PREFIX}rootfs", resolve("busybox"))
    write_nsinit_config(rootfs)
    python = sys.executable
    nsinit = resolve("nsinit")
    result: dict[str, Any] = {"skipped": {}, "rounds": ROUNDS, "argv": {}}
    todo: dict[str, list[str]] = {
        "nsinit": [nsinit, "exec", "/bin/true"],
        "floor": [floor, str(rootfs), "/bin/true"],
        "python -S -c pass": [python, "-S", "-c", "pass"],
        "python -c pass": [python, "-c", "pass"],
        "python + nsinit imports": [python, "-c", IMPORTS],
        # the same, leaving through os._exit: the difference is the interpreter's finalization of those modules
        "python + imports, os._exit": [python, "-c", IMPORTS + ", os; os._exit(0)"],
    }
    for rt in ("runc", "crun"):
        try:
            exe = resolve(rt)
            runc_bundle(work / f"bundle-{rt}", rootfs, exe)
            todo[rt] = [exe, "run", "--bundle", str(work / f"bundle-{rt}"), f"nsinit-bench-{rt}-{os.getpid()}"]
        except (Skip, subprocess.CalledProcessError) as e:
            result["skipped"][rt] = str(e)
    contenders = {}
    for name, argv in todo.items():
        try:
            contenders[name] = checked(name, argv, cwd=str(rootfs))
            result["argv"][name] = argv
        except Skip as e:
            result["skipped"][name] = str(e)
    log(f"cold start: {ROUNDS} interleaved rounds of {', '.join(contenders)}")
    try:
        samples = interleave(contenders, ROUNDS)
    finally:
        for rt in ("runc", "crun"):
            if rt in todo:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run([todo[rt][0], "delete", "--force", todo[rt][-1]], capture_output=True, timeout=30)
    result["stats"] = {n: summary(s) for n, s in samples.items()}
    result["samples"] = samples
    write_json(out, result)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
