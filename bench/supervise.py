"""Parts 2, 3 and 5: nsinitd against supervisord (start, restart all, shutdown, memory), and events.

Each contender runs N `sleep` programs with startsecs 0:

* nsinitd, containers: every program in a container of its own (a busybox rootfs per program, the
  binaries hardlinked so they share one page-cache copy).
* nsinitd, plain: the same programs as plain processes (the like-for-like with supervisord).
* supervisord: N `[program:x]` sections.

Times are taken from the outside: start = process spawned until every program reports RUNNING
(polled every 20 ms through each daemon's own control socket); restart = "restart all" until every
program is RUNNING again; shutdown = the shutdown request until the daemon and every process it
started are gone. Memory = PSS of the daemon and of every process it adds (container inits
included; the `sleep` workloads excluded), divided by N.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from .clients import Ctl, CtlError, EventReader, concurrently, raw_event_stream, supervisord_rpc
from .lib import (
    PREFIX,
    QUICK,
    Children,
    Skip,
    comm,
    descendants,
    kill_leftovers,
    log,
    make_rootfs,
    note_daemon,
    pss_kib,
    resolve,
    set_subreaper,
    settle,
    summary,
    wait_for,
    write_json,
    write_nsinit_config,
)

POLL = 0.02
# quick mode stops at 200 programs, to stay within about a minute
NS = (50, 200) if QUICK else (50, 500)
REPS = 1 if QUICK else 3
REPS_AT = {500: 2}  # a run of 500 containers costs 15-20 s (start, restart, shutdown): two
WORKLOAD = "sleep"


def _overhead(root: int) -> dict[str, Any]:
    """PSS of root and its descendants, workloads apart."""
    procs = descendants(root)
    kib = 0
    by_comm: dict[str, int] = {}
    pss_by_comm: dict[str, int] = {}
    workloads = 0
    for pid in procs:
        c = comm(pid)
        if c == WORKLOAD:
            workloads += 1
            continue
        p = pss_kib(pid)
        if p is None:
            continue
        kib += p
        by_comm[c] = by_comm.get(c, 0) + 1
        pss_by_comm[c] = pss_by_comm.get(c, 0) + p
    return {"pss_kib": kib, "processes": by_comm, "pss_kib_by_comm": pss_by_comm, "workloads": workloads}


def _gone(pids: list[int]) -> bool:
    for p in pids:
        try:
            os.kill(p, 0)
        except ProcessLookupError:
            continue
        with open(f"/proc/{p}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                return False
    return True


def _time_cmd(argv: list[str], runs: int = 5) -> dict[str, Any]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, timeout=60)
        if p.returncode != 0:
            return {"error": f"exit {p.returncode}: {p.stderr.decode(errors='replace').strip()[-200:]}"}
        out.append(time.perf_counter() - t)
    return summary(out)


def state_dir(work: Path) -> str:
    """nsinitd's state dir for this work dir: on tmpfs, in this run's directory under /run (as
    nsinitd's own default, /run/nsinit); the logs of both supervisors stay in the work dir."""
    run = os.environ.get("BENCH_RUN")
    if not run:
        return f"{work}/state"
    d = Path(run) / str(work).strip("/").replace("/", "_")
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


class Nsinitd:
    def __init__(self, work: Path, n: int, kind: str, sleep: str, containers: list[Path]) -> None:
        self.work = work
        self.n = n
        self.kind = kind
        self.names = [f"p{i:03d}" for i in range(n)]
        self.sock = str(work / "nsinitd.sock")
        lines = ["[supervisor]", f'socket = "{self.sock}"', f'state_dir = "{state_dir(work)}"',
                 f'log_dir = "{work}/logs"', f'event_log = "{work}/events.log"', ""]
        for i, name in enumerate(self.names):
            lines.append(f"[programs.{name}]")
            if kind == "container":
                lines += [f'container = "{containers[i]}"', 'command = ["/bin/sleep", "100000"]']
            else:
                lines.append(f'command = ["{sleep}", "100000"]')
            lines += ["startsecs = 0", "stopwaitsecs = 10", ""]
        self.conf = work / "nsinitd.toml"
        self.conf.write_text("\n".join(lines))

    def launch(self, kids: Children) -> None:
        self.out = open(self.work / "nsinitd.out", "wb")  # noqa: SIM115
        self.proc = kids.popen([resolve("nsinitd"), "-c", str(self.conf)], stdout=self.out, stderr=subprocess.STDOUT)
        note_daemon(self.proc.pid)

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "nsinitd.out").read_text(errors="replace").strip()[-400:]
        return ""

    def connect(self) -> Ctl:
        def attempt() -> Ctl | None:
            if self.proc.poll() is not None:
                raise Skip(f"nsinitd exited {self.proc.returncode}: {self._tail()}")
            try:
                return Ctl(self.sock)
            except OSError:
                return None

        return wait_for(attempt, 30, POLL, "nsinitd's socket")

    def states(self, ctl: Ctl) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in ctl.call("status"):
            out[s["state"]] = out.get(s["state"], 0) + 1
        return out

    def wait_running(self, ctl: Ctl, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            st = self.states(ctl)
            if st.get("RUNNING", 0) == self.n:
                return
            if st.get("FATAL") or st.get("BACKOFF"):
                raise Skip(f"programs failing to start ({st}): {self._why()}")
            if time.monotonic() > deadline:
                raise Skip(f"not all RUNNING after {timeout:.0f}s: {st}")
            time.sleep(POLL)

    def _why(self) -> str:
        with contextlib.suppress(OSError):
            for line in reversed((self.work / "events.log").read_text().splitlines()):
                ev = json.loads(line)
                if ev.get("reason") and ev.get("event") in ("program.backoff", "program.fatal"):
                    return str(ev["reason"])[:300]
        return self._tail()

    def run(self, kids: Children) -> dict[str, Any]:
        r: dict[str, Any] = {}
        t0 = time.perf_counter()
        self.launch(kids)
        ctl = self.connect()
        try:
            self.wait_running(ctl, 30 + 0.2 * self.n)
            r["start_s"] = time.perf_counter() - t0
            time.sleep(0.5)
            r["memory"] = _overhead(self.proc.pid)
            lat = []
            for _ in range(20):
                t = time.perf_counter()
                ctl.call("status")
                lat.append(time.perf_counter() - t)
            r["status_raw"] = summary(lat)
            try:
                r["status_nsinitctl"] = _time_cmd([resolve("nsinitctl"), "-s", self.sock, "status"], 5)
            except Skip as e:
                r["status_nsinitctl"] = {"error": str(e)}
            t = time.perf_counter()
            p = subprocess.run([resolve("nsinitctl"), "-s", self.sock, "--timeout", "600", "restart", "all"],
                               capture_output=True, timeout=600)
            if p.returncode != 0:
                # the documented CLI failed: say so, and restart through the socket so the rest still runs
                r["restart_error"] = f"nsinitctl restart all exited {p.returncode}: " + \
                    p.stderr.decode(errors="replace").strip()[-200:]
                replies = concurrently(self.sock, "restart", self.names)
                bad = [n for n, rep in replies.items() if not rep.get("ok")]
                if bad:
                    r["restart_error"] += f"; {len(bad)} socket restarts refused, e.g. {replies[bad[0]]}"
            self.wait_running(ctl, 30 + 0.2 * self.n)
            r["restart_s"] = time.perf_counter() - t
            pids = descendants(self.proc.pid)
            t = time.perf_counter()
            ctl.call("shutdown")
            self.proc.wait(60 + 0.1 * self.n)
            wait_for(lambda: _gone(pids), 60, POLL, "nsinitd's processes to go")
            r["shutdown_s"] = time.perf_counter() - t
        finally:
            ctl.close()
        return r


class Supervisord:
    def __init__(self, work: Path, n: int, sleep: str) -> None:
        self.work = work
        self.n = n
        self.sock = str(work / "supervisord.sock")
        (work / "childlogs").mkdir()
        lines = [
            "[unix_http_server]", f"file={self.sock}", "",
            "[supervisord]", "nodaemon=true", f"logfile={work}/supervisord.log", f"pidfile={work}/supervisord.pid",
            f"childlogdir={work}/childlogs", "minfds=8192", "minprocs=2048", "loglevel=warn", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "", "[supervisorctl]", f"serverurl=unix://{self.sock}", "",
        ]  # fmt: skip
        for i in range(n):
            lines += [f"[program:p{i:03d}]", f"command={sleep} 100000", "startsecs=0", "stopwaitsecs=10", ""]
        self.conf = work / "supervisord.conf"
        self.conf.write_text("\n".join(lines))

    def running(self, rpc: Any) -> bool:
        return sum(1 for p in rpc.supervisor.getAllProcessInfo() if p["statename"] == "RUNNING") == self.n

    def run(self, kids: Children) -> dict[str, Any]:
        r: dict[str, Any] = {}
        t0 = time.perf_counter()
        proc = kids.popen([resolve("supervisord"), "-n", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        rpc = supervisord_rpc(self.sock)

        def up() -> bool:
            if proc.poll() is not None:
                raise Skip(f"supervisord exited {proc.returncode}")
            try:
                return self.running(rpc)
            except OSError:
                return False

        wait_for(up, 30 + 0.2 * self.n, POLL, "supervisord's programs")
        r["start_s"] = time.perf_counter() - t0
        time.sleep(0.5)
        r["memory"] = _overhead(proc.pid)
        lat = []
        for _ in range(20):
            t = time.perf_counter()
            rpc.supervisor.getAllProcessInfo()
            lat.append(time.perf_counter() - t)
        r["status_raw"] = summary(lat)
        r["status_supervisorctl"] = _time_cmd([resolve("supervisorctl"), "-c", str(self.conf), "status"], 3)
        t = time.perf_counter()
        p = subprocess.run([resolve("supervisorctl"), "-c", str(self.conf), "restart", "all"], capture_output=True,
                           timeout=600)
        if p.returncode != 0:
            r["restart_error"] = f"supervisorctl restart all exited {p.returncode}"
        wait_for(lambda: self.running(rpc), 30 + 0.2 * self.n, POLL, "supervisord's programs")
        r["restart_s"] = time.perf_counter() - t
        pids = descendants(proc.pid)
        t = time.perf_counter()
        rpc.supervisor.shutdown()
        proc.wait(60 + 0.1 * self.n)
        wait_for(lambda: _gone(pids), 60, POLL, "supervisord's processes to go")
        r["shutdown_s"] = time.perf_counter() - t
        return r


def containers_for(work: Path, n: int, busybox: str) -> list[Path]:
    out = []
    for i in range(n):
        root = make_rootfs(work / f"{PREFIX}c{i:03d}", busybox, link=True)
        write_nsinit_config(root, hostname=f"c{i:03d}")
        out.append(root)
    return out


def supervisors(work: Path, out: Path) -> None:
    busybox = resolve("busybox")
    shared = make_rootfs(work / "plain", busybox)
    sleep = str(shared / "bin" / "sleep")
    # one hardlinked copy for every container: the page cache holds busybox once
    bb = work / "busybox"
    os.link(shared / "bin" / "busybox", bb)
    result: dict[str, Any] = {"reps": REPS, "reps_at": {str(n): REPS_AT.get(n, REPS) for n in NS}, "runs": {},
                              "skipped": {}}
    kinds = ["nsinitd containers", "nsinitd plain", "supervisord"]
    roots = {n: containers_for(work / f"roots{n}", n, str(bb)) for n in NS}
    run_no = 0
    for rep in range(REPS):
        for n in NS:
            if rep >= REPS_AT.get(n, REPS):
                continue
            order = kinds[:]
            random.shuffle(order)
            for kind in order:
                key = f"{kind} N={n}"
                if key in result["skipped"]:
                    continue
                run_no += 1
                d = work / f"run{run_no}"
                d.mkdir()
                kids = Children()
                waited = settle()
                result.setdefault("settled_s", []).append(round(waited, 2))
                log(f"supervisors: rep {rep + 1}/{REPS}: {key} (after {waited:.1f} s for the machine to settle)")
                try:
                    if kind == "supervisord":
                        r = Supervisord(d, n, sleep).run(kids)
                    else:
                        k = "container" if kind.startswith("nsinitd containers") else "plain"
                        r = Nsinitd(d, n, k, sleep, roots[n]).run(kids)
                    result["runs"].setdefault(key, []).append(r)
                except (Skip, CtlError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                    result["skipped"][key] = f"{type(e).__name__}: {e}"
                    log(f"supervisors: {key} skipped: {e}")
                finally:
                    kids.close()
                    kill_leftovers()
                # after every run: a part stopped at its time bound still reports what it measured
                write_json(out, result)


# -- part 5 ---------------------------------------------------------------------------------------

BURST = 2000 if QUICK else 10000
SMALL_BURST = 800  # under the daemon's per-subscriber buffer of 1000 events


def _reaped(ev: dict[str, Any]) -> bool:
    return bool(ev["event"] == "stranger.reaped")


def _count_log(work: Path, event: str) -> int:
    with contextlib.suppress(OSError):
        return (work / "events.log").read_text().count(f'"{event}"')
    return 0
EXITS = 10 if QUICK else 30


def _ts(ev: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(ev["ts"].replace("Z", "+00:00")).timestamp()


def events(work: Path, out: Path, zombies: str, stamp: str) -> None:
    result: dict[str, Any] = {"skipped": {}}
    stamps = work / "stamps"
    roots = containers_for(work / "eroots", 1, resolve("busybox"))
    write_nsinit_config(roots[0], readonly_fs=False)  # the stamp is written to the rootfs' /tmp
    for extra in (stamp,):
        subprocess.run(["cp", extra, str(roots[0] / "bin" / "stamp")], check=True)
    conf = work / "events.toml"
    sock = str(work / "ev.sock")
    conf.write_text("\n".join([
        "[supervisor]", f'socket = "{sock}"', f'state_dir = "{state_dir(work)}"', f'log_dir = "{work}/logs"',
        f'event_log = "{work}/events.log"', "",
        "[programs.orphans]", f'command = ["{zombies}", "orphans", "{BURST}"]',
        "startsecs = 0", "autostart = false", 'autorestart = "never"', "",
        "[programs.orphans_small]", f'command = ["{zombies}", "orphans", "{SMALL_BURST}"]',
        "startsecs = 0", "autostart = false", 'autorestart = "never"', "",
        "[programs.stamp]", f'command = ["{stamp}", "{stamps}", "20", "0"]',
        "startsecs = 0", "autostart = false", 'autorestart = "never"', "",
        "[programs.stampc]", f'container = "{roots[0]}"', 'command = ["/bin/stamp", "/tmp/x", "20", "0"]',
        "startsecs = 0", "autostart = false", 'autorestart = "never"', "",
    ]))  # fmt: skip
    kids = Children()
    try:
        outf = open(work / "nsinitd.out", "wb")  # noqa: SIM115
        proc = kids.popen([resolve("nsinitd"), "-c", str(conf)], stdout=outf, stderr=subprocess.STDOUT)
        note_daemon(proc.pid)

        def attempt() -> Ctl | None:
            if proc.poll() is not None:
                raise Skip(f"nsinitd exited {proc.returncode}: "
                           f"{(work / 'nsinitd.out').read_text(errors='replace')[-300:]}")
            try:
                return Ctl(sock)
            except OSError:
                return None

        ctl = wait_for(attempt, 30, POLL, "nsinitd's socket")
        reader_proc = kids.popen([resolve("nsinitctl"), "-s", sock, "events", "-f"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        reader = EventReader(reader_proc.stdout)
        result["reader"] = "nsinitctl events -f"
        time.sleep(1.0)
        ctl.call("start", name="stamp")
        if reader.wait(lambda e: e["event"] == "program.exited" and e.get("program") == "stamp", 10) is None:
            err = b""
            if reader_proc.poll() is not None:
                err = reader_proc.stderr.read() if reader_proc.stderr else b""
            result["skipped"]["nsinitctl events -f"] = (
                f"no event reached it (exit {reader_proc.poll()}): {err.decode(errors='replace').strip()[-300:]}")
            reader = EventReader(raw_event_stream(sock), raw=True)
            result["reader"] = "the control socket, read by the bench (JSON lines, as nsinitctl would)"
            time.sleep(0.5)
        # exit -> event
        for prog, stampfile in (("stamp", stamps), ("stampc", None)):
            delays, daemon = [], []
            for _ in range(EXITS):
                if stampfile is None:
                    stampfile = roots[0] / "tmp" / "x"  # the container's /tmp is its rootfs' (readonly_fs off)
                with contextlib.suppress(CtlError):
                    ctl.call("start", name=prog)
                got = reader.wait(lambda e, p=prog: e["event"] == "program.exited" and e.get("program") == p, 15)
                if got is None:
                    result["skipped"][f"exit-to-event {prog}"] = f"no program.exited for {prog}: {_why(work)}"
                    break
                with contextlib.suppress(OSError, ValueError):
                    exited = int(Path(stampfile).read_text().split()[-1]) / 1e9
                    delays.append(got[0] - exited)
                    daemon.append(_ts(got[1]) - exited)
                time.sleep(0.05)
            if delays:
                result[f"exit_to_event {prog}"] = {"reader": summary(delays), "daemon_ts": summary(daemon)}
        # bursts: one that fits in a subscriber's buffer, then a big one
        for prog, size in (("orphans_small", SMALL_BURST), ("orphans", BURST)):
            if reader.closed:
                result["skipped"][f"burst {size}"] = "the reader's stream had already ended"
                continue
            emitted_before = _count_log(work, "stranger.reaped")
            before = reader.count(lambda e: e["event"] == "stranger.reaped")
            t = time.time()
            ctl.call("start", name=prog)
            wait_for(lambda b=before, n=size: reader.count(_reaped) - b >= n or reader.closed, 60, 0.05,
                     f"{size} stranger.reaped events")
            got = [(a, e) for a, e in reader.events if e["event"] == "stranger.reaped" and a >= t]
            wait_for(lambda b=emitted_before, n=size: _count_log(work, "stranger.reaped") - b >= n, 10, 0.05,
                     "the event log")
            reader_err = ""
            if reader_proc.poll() is not None and reader_proc.stderr is not None:
                reader_err = reader_proc.stderr.read().decode(errors="replace").strip()[-300:]
            if len(got) >= 2:
                span = got[-1][0] - got[0][0]
                result[f"burst {size}"] = {
                    "emitted": _count_log(work, "stranger.reaped") - emitted_before, "reader_closed": reader.closed,
                    "reader_stderr": reader_err, "events": len(got), "expected": size,
                    "reader_events_per_s": (len(got) - 1) / span if span > 0 else None,
                    "daemon_events_per_s": (len(got) - 1) / max(1e-9, _ts(got[-1][1]) - _ts(got[0][1])),
                    "start_to_last_s": got[-1][0] - t,
                }
            else:
                result["skipped"][f"burst {size}"] = f"{len(got)} stranger.reaped events reached the reader"
            time.sleep(0.5)
        with contextlib.suppress(CtlError, OSError):
            ctl.call("shutdown")
        proc.wait(30)
    except (Skip, CtlError, TimeoutError, OSError, subprocess.SubprocessError) as e:
        result["skipped"]["events"] = f"{type(e).__name__}: {e}"
    finally:
        kids.close()
        kill_leftovers()
    write_json(out, result)


def _why(work: Path) -> str:
    with contextlib.suppress(OSError):
        txt = (work / "nsinitd.out").read_text(errors="replace")
        for line in reversed(txt.splitlines()):
            if '"reason"' in line:
                return line[-300:]
    return ""


if __name__ == "__main__":
    import sys

    set_subreaper()
    if sys.argv[1] == "supervisors":
        supervisors(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        events(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5])
