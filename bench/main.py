"""The benchmark driver: builds the helpers, runs every part in a bounded child, prints one report.

    python -m bench.main          (bench/run installs the peers first and then calls this)

Environment: BENCH_QUICK=1 for fewer repetitions (about 3 minutes); BENCH_KEEP=1 keeps the work
directory; BENCH_PARTS=cold,reap,supervisors,events,imports picks parts. The report goes to stdout
and, with every sample, to bench/out/ (ignored by git).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .lib import (
    BENCH_DIR,
    PREFIX,
    QUICK,
    REPO,
    RUN_BASE,
    WORK_BASE,
    Skip,
    file_create_ms,
    host_diff,
    host_state,
    kill_leftovers,
    log,
    make_rootfs,
    remove_our_cgroups,
    resolve,
    set_subreaper,
    settle,
    write_json,
    write_nsinit_config,
)

OUT = BENCH_DIR / "out"
PARTS = os.environ.get("BENCH_PARTS", "cold,reap,supervisors,events,imports").split(",")
# a part that runs past its bound is killed, and the report says so
# they add up to under 15 minutes (full) and 3 minutes (quick), the venv install aside
BOUND = {"cold": 100, "reap": 100, "supervisors": 540, "events": 90, "imports": 40}
QUICK_BOUND = {"cold": 25, "reap": 25, "supervisors": 90, "events": 20, "imports": 10}


def build_helpers(work: Path) -> dict[str, str]:
    gcc = shutil.which("gcc")
    if not gcc:
        raise Skip("gcc not found (apt-get install gcc libc6-dev)")
    out = {}
    for name in ("floor", "zombies", "stamp"):
        exe = work / "bin" / name
        exe.parent.mkdir(exist_ok=True)
        # static: they run inside busybox rootfs that have no libc
        subprocess.run([gcc, "-O2", "-Wall", "-static", "-o", str(exe), str(BENCH_DIR / f"{name}.c")], check=True,
                       capture_output=True)
        out[name] = str(exe)
    return out


def run_part(name: str, argv: list[str], out: Path) -> tuple[dict[str, Any] | None, str | None]:
    bound = (QUICK_BOUND if QUICK else BOUND)[name]
    t = time.monotonic()
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=None, start_new_session=True)
    late = False
    try:
        p.wait(bound)
    except subprocess.TimeoutExpired:
        late = True
        log(f"{name}: still running after its bound of {bound}s: stopping it")
        os.killpg(p.pid, signal.SIGTERM)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        assert p.stdout is not None
        p.stdout.close()
        leaked = kill_leftovers()
    log(f"{name}: {time.monotonic() - t:.1f}s" + (f", killed leftovers {leaked}" if leaked else ""))
    if out.exists():
        res = json.loads(out.read_text())
        if late:
            res.setdefault("skipped", {})["the rest"] = f"the part was stopped at its time bound of {bound}s"
        return res, None
    if late:
        return None, f"stopped at its time bound of {bound}s before any result"
    if p.returncode and p.returncode < 0:
        return None, f"signal {-p.returncode}"
    return None, f"exited {p.returncode} without a result (see the log above)"


def imports_breakdown(work: Path) -> dict[str, Any]:
    """`python -X importtime` of what `nsinit exec` imports, grouped: ours, third-party, stdlib, site."""
    root = make_rootfs(work / f"{PREFIX}imports", resolve("busybox"))
    write_nsinit_config(root)
    from .coldstart import IMPORTS

    per: dict[str, list[int]] = {}
    for _ in range(7):
        p = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTS], cwd=root, capture_output=True,
                           text=True, check=True)
        stack: list[tuple[int, str]] = []
        # importtime prints a module after the modules it imported: read it backwards to see parents first
        for line in reversed(p.stderr.splitlines()):
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, _cum, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip(" "))) // 2
            mod = name.strip()
            while stack and stack[-1][0] >= depth:
                stack.pop()
            top = stack[0][1] if stack else mod
            stack.append((depth, mod))
            key = f"{mod}\t{top}"
            per.setdefault(key, []).append(int(self_us))
    groups: dict[str, float] = {}
    modules = []
    third = ("pyroute2", "trio", "structlog", "cgroupspy", "certifi", "_distutils_hack", "__editable__", "setuptools")
    for key, v in per.items():
        mod, top = key.split("\t")
        us = statistics.median(v)
        if top in ("site", "sitecustomize", "usercustomize", "encodings") or top.startswith("__editable__"):
            g = "interpreter start (site, .pth files, encodings)"
        elif mod.split(".")[0] == "nsruntime":
            g = "nsruntime modules (their own code)"
        elif mod.split(".")[0] in third:
            g = "third-party"
        else:
            g = "stdlib pulled in by nsruntime"
        groups[g] = groups.get(g, 0) + us
        modules.append((us, mod, g))
    modules.sort(reverse=True)
    return {"groups_ms": {g: us / 1000 for g, us in groups.items()},
            "top": [{"module": m, "self_ms": us / 1000, "group": g} for us, m, g in modules[:15]]}


def machine() -> dict[str, str]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) // 1024} MiB"

    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            return "missing"

    commit = version(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            commit += f" (+ uncommitted changes in {len(dirty.splitlines())} files)"
    return {
        "nproc": str(os.cpu_count()), "kernel": platform.release(), "cpu": cpu, "memory": mem,
        "python": platform.python_version(), "os": version(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "runc": version(["runc", "--version"]), "crun": version(["crun", "--version"]),
        "tini": version(["tini", "--version"]), "supervisord": version(["supervisord", "--version"]),
        "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": "quick (BENCH_QUICK=1)" if QUICK else "full",
        "work_dir": WORK_BASE,
        "file_create_ms": {d: round(file_create_ms(d), 3) for d in dict.fromkeys([WORK_BASE, "/tmp"])},
    }  # fmt: skip


def main() -> int:
    if os.geteuid() != 0:
        print("bench: run me as root (namespaces, mounts, cgroups)", file=sys.stderr)
        return 2
    set_subreaper()
    before = host_state()
    work = Path(tempfile.mkdtemp(prefix="nsinit-bench.", dir=WORK_BASE))
    run_dir = Path(tempfile.mkdtemp(prefix="nsinit-bench.", dir=RUN_BASE))
    os.environ["BENCH_WORK"] = str(work)
    os.environ["BENCH_RUN"] = str(run_dir)
    results: dict[str, Any] = {"machine": machine(), "parts": {}, "skipped": {}}
    py = sys.executable
    try:
        try:
            helpers = build_helpers(work)
        except (Skip, subprocess.CalledProcessError) as e:
            helpers = {}
            results["skipped"]["helpers"] = f"C helpers not built: {e}"
        plan: dict[str, list[str]] = {}
        if "cold" in PARTS and helpers:
            plan["cold"] = ["unshare", "-m", "--propagation", "private", py, "-m", "bench.coldstart",
                            str(work / "cold"), str(work / "cold.json"), helpers["floor"]]
        if "reap" in PARTS and helpers:
            plan["reap"] = [py, "-m", "bench.reap", str(work / "reap"), str(work / "reap.json"), helpers["zombies"]]
        if "supervisors" in PARTS:
            plan["supervisors"] = [py, "-m", "bench.supervise", "supervisors", str(work / "sup"),
                                   str(work / "supervisors.json")]
        if "events" in PARTS and helpers:
            plan["events"] = [py, "-m", "bench.supervise", "events", str(work / "ev"), str(work / "events.json"),
                              helpers["zombies"], helpers["stamp"]]
        for name, argv in plan.items():
            (work / ("sup" if name == "supervisors" else "ev" if name == "events" else name)).mkdir()
            log(f"part {name} (after {settle():.1f} s for the machine to settle)")
            res, why = run_part(name, argv, work / f"{name}.json")
            if res is None:
                results["skipped"][name] = why
            else:
                results["parts"][name] = res
        if "imports" in PARTS:
            try:
                results["parts"]["imports"] = imports_breakdown(work)
            except (Skip, subprocess.CalledProcessError, ValueError) as e:
                results["skipped"]["imports"] = str(e)
    finally:
        kill_leftovers()
        daemons: list[int] = []
        with contextlib.suppress(OSError, ValueError):
            daemons = [int(x) for x in (work / "daemons").read_text().split()]
        cleaned = remove_our_cgroups(before["cgroups"], daemons)
        if cleaned:
            results["cleaned_cgroups"] = cleaned
        if os.environ.get("BENCH_KEEP"):
            log(f"kept {work} and {run_dir}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    results["host_diff"] = host_diff(before, host_state())
    from .report import render

    text = render(results)
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "results.json", results)
    (OUT / "report.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
