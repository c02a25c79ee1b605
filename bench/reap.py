"""Part 4, reaping: 2000 orphans exit at once; how long until their reaper has reaped them all.

Contenders, on one busybox rootfs, interleaved:

* nsinit: ``nsinit exec /bin/zombies reap N``: nsinit's PID 1 is the reaper.
* tini: ``nsinit exec /bin/tini -s -- /bin/zombies reap N``: the same container, but tini (a child
  subreaper, as `-s` makes it) sits between PID 1 and the workload, so the orphans go to tini.
* tini as PID 1 (runc): ``runc run`` of the same rootfs with tini as the process: tini really is
  PID 1 here. It is the check that tini's figure doesn't depend on it being PID 2 under nsinit.

The timing is taken inside the container by bench/zombies.c (release to the reaper's last child
gone), so the runtime's own start and stop never enter it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .lib import PREFIX, QUICK, Skip, interleave, log, make_rootfs, resolve, summary, write_json, write_nsinit_config

ZOMBIES = 2000
ROUNDS = 5 if QUICK else 15


def main(work: Path, out: Path, zombies: str) -> None:
    result: dict[str, Any] = {"skipped": {}, "rounds": ROUNDS, "zombies": ZOMBIES}
    tini = "/usr/bin/tini-static"
    extra = [zombies] + ([tini] if Path(tini).exists() else [])
    rootfs = make_rootfs(work / f"{PREFIX}reap", resolve("busybox"), extra)
    write_nsinit_config(rootfs)
    nsinit = resolve("nsinit")
    todo: dict[str, tuple[list[str], str | None]] = {
        "nsinit PID 1": ([nsinit, "exec", "/bin/zombies", "reap", str(ZOMBIES)], str(rootfs)),
    }
    if Path(tini).exists():
        todo["tini -s under nsinit"] = ([nsinit, "exec", "/bin/tini-static", "-s", "--", "/bin/zombies", "reap",
                                         str(ZOMBIES)], str(rootfs))
        try:
            runc = resolve("runc")
            bundle = work / "bundle-reap"
            bundle.mkdir()
            subprocess.run([runc, "spec", "--bundle", str(bundle)], check=True, capture_output=True)
            spec = json.loads((bundle / "config.json").read_text())
            spec["process"].update(terminal=False, args=["/bin/tini-static", "--", "/bin/zombies", "reap",
                                                         str(ZOMBIES)])
            spec["root"] = {"path": str(rootfs), "readonly": True}
            (bundle / "config.json").write_text(json.dumps(spec))
            todo["tini PID 1 under runc"] = ([runc, "run", "--bundle", str(bundle), "nsinit-bench-reap"], None)
        except (Skip, subprocess.CalledProcessError) as e:
            result["skipped"]["tini PID 1 under runc"] = str(e)
    else:
        result["skipped"]["tini"] = f"{tini} not found (apt-get install tini)"

    def contender(name: str, argv: list[str], cwd: str | None) -> Any:
        def one() -> float:
            p = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=120)
            if p.returncode != 0:
                raise Skip(f"{name} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()[-300:]}")
            return int(p.stdout.split()[-1]) / 1e6

        return one

    contenders = {}
    for name, (argv, cwd) in todo.items():
        fn = contender(name, argv, cwd)
        try:
            fn()
            contenders[name] = fn
        except (Skip, subprocess.TimeoutExpired, ValueError, IndexError) as e:
            result["skipped"][name] = str(e)
    log(f"reaping: {ROUNDS} interleaved rounds of {ZOMBIES} zombies: {', '.join(contenders)}")
    samples = interleave(contenders, ROUNDS, warmup=1)
    result["stats"] = {n: summary(s) for n, s in samples.items()}
    result["samples"] = samples
    write_json(out, result)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
