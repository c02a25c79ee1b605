"""Write the figures of the last run (bench/out/) into docs/performance.md, between its markers.

    python -m bench.docs

The document is never edited by hand where it quotes the report: what it says is what the
last run printed, the machine it ran on, and the targets of issues 7 and 18 checked against it.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from typing import Any

from .lib import REPO
from .main import OUT
from .report import CRUN_TARGET, RUNC_TARGET

DOC = REPO / "docs" / "performance.md"


def _med(part: dict[str, Any], name: str) -> float | None:
    s = part.get("stats", {}).get(name)
    return s.get("median") if s else None


def _sup(res: dict[str, Any], key: str, field: str) -> float | None:
    runs = res["parts"].get("supervisors", {}).get("runs", {}).get(key, [])
    vals = [r[field] for r in runs if field in r]
    return statistics.median(vals) if vals else None


def _pss(res: dict[str, Any], key: str, n: int) -> float | None:
    runs = res["parts"].get("supervisors", {}).get("runs", {}).get(key, [])
    vals = [r["memory"]["pss_kib"] / n / 1024 for r in runs if "memory" in r]
    return statistics.median(vals) if vals else None


def _status(res: dict[str, Any], key: str) -> float | None:
    runs = res["parts"].get("supervisors", {}).get("runs", {}).get(key, [])
    vals = [r["status_raw"]["median"] for r in runs if "status_raw" in r]
    return statistics.median(vals) if vals else None


def targets(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "missed")

    cold = res["parts"].get("cold", {})
    n, runc, crun = _med(cold, "nsinit"), _med(cold, "runc"), _med(cold, "crun")
    for peer, v, lim in (("runc", runc, RUNC_TARGET), ("crun", crun, CRUN_TARGET)):
        r = n / v if n and v else None
        rows.append((f"cold start: nsinit <= {lim}x {peer} (issue 18)", "-" if r is None else f"{r:.2f}x "
                     f"({n * 1000:.0f} ms vs {v * 1000:.0f} ms)", verdict(None if r is None else r <= lim)))
    skipped = res["parts"].get("supervisors", {}).get("skipped", {})
    c50, s50 = _sup(res, "nsinitd containers N=50", "start_s"), _sup(res, "supervisord N=50", "start_s")
    r = c50 / s50 if c50 and s50 else None
    rows.append(("50 containers to RUNNING <= 1.0x supervisord's 50 processes",
                 "-" if r is None else f"{r:.2f}x ({c50:.2f} s vs {s50:.2f} s)",
                 verdict(None if r is None else r <= 1)))
    c500 = _sup(res, "nsinitd containers N=500", "start_s")
    why = skipped.get("nsinitd containers N=500", "")
    rows.append(("500 containers to RUNNING within 10 s",
                 f"{c500:.2f} s" if c500 else f"not measured: {why[:160]}",
                 verdict(None if c500 is None else c500 <= 10)))
    st = _status(res, "nsinitd containers N=500")
    plain = _status(res, "nsinitd plain N=500")
    rows.append(("status within 100 ms while 500 run",
                 f"{st * 1000:.1f} ms" if st else "containers not measured (above); with 500 plain programs: "
                 + (f"{plain * 1000:.1f} ms" if plain else "-"), verdict(None if st is None else st <= 0.1)))
    p50, p500 = _pss(res, "nsinitd containers N=50", 50), _pss(res, "nsinitd containers N=500", 500)
    p = p500 or p50
    rows.append(("<= 2 MiB PSS overhead per container",
                 "-" if p is None else f"{p:.2f} MiB (N={500 if p500 else 50})",
                 verdict(None if p is None else p <= 2)))
    ctl_runs = res["parts"].get("supervisors", {}).get("runs", {}).get("nsinitd containers N=500", [])
    ctl_meds = [r["status_nsinitctl"]["median"] for r in ctl_runs if r.get("status_nsinitctl", {}).get("median")]
    ctl = statistics.median(ctl_meds) if ctl_meds else None
    rows.append(("`nsinitctl status` with 500 running < 20 ms, whole process (issue 18)",
                 "-" if ctl is None else f"{ctl * 1000:.1f} ms", verdict(None if ctl is None else ctl < 0.02)))
    reap = res["parts"].get("reap", {})
    ours, tini = _med(reap, "nsinit PID 1"), _med(reap, "tini -s under nsinit")
    r = tini / ours if ours and tini else None
    rows.append(("reaping: at least half of tini's rate", "-" if r is None else f"{r:.2f}x tini's rate",
                 verdict(None if r is None else r >= 0.5)))
    ev = res["parts"].get("events", {})
    bursts = sorted((k for k in ev if k.startswith("burst ")), key=lambda k: int(k.split()[1]))
    parts, fast, kept = [], True, True
    for k in bursts:
        b = ev[k]
        parts.append(f"{b['reader_events_per_s']:.0f}/s over a burst of {b['expected']}"
                     + ("" if b["events"] >= b["expected"] else f" (reader dropped after {b['events']})"))
        fast = fast and b["reader_events_per_s"] >= 10000
        kept = kept and b["events"] >= b["expected"]
    v = verdict(fast if parts else None)
    if parts and fast and not kept:
        v = "rate met; a large burst drops the reader"
    rows.append((">= 10,000 events/s to a reader", "; ".join(parts) or "-", v))
    d = [ev.get(f"exit_to_event {p}") for p in ("stamp", "stampc")]
    labelled = zip(("plain process", "container"), d, strict=True)
    txt = ", ".join(f"{lab} {x['reader']['median'] * 1000:.1f} ms" for lab, x in labelled if x)
    worst = max((x["reader"]["median"] for x in d if x), default=None)
    rows.append(("exit-to-event delay under 10 ms", txt or "-", verdict(None if worst is None else worst < 0.01)))
    return rows


def main() -> None:
    res = json.loads((OUT / "results.json").read_text())
    missing = {"cold", "reap", "supervisors", "events", "imports"} - set(res["parts"])
    if missing and "--partial" not in sys.argv:
        raise SystemExit(f"the last run lacks {', '.join(sorted(missing))}: run `bash bench/run` first "
                         "(or pass --partial)")
    report = (OUT / "report.txt").read_text().rstrip("\n")
    m = res["machine"]
    doc = DOC.read_text()
    table = ["| target | measured (median) | |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in targets(res)]
    block = "\n".join([
        f"Run of {m['date']}, {m['mode']} mode, commit {m['commit']}.",
        f"Machine: {m['cpu']}, {m['nproc']} cores, {m['memory']}, Linux {m['kernel']}, {m['os']}, "
        f"Python {m['python']}. Peers: {m['runc']}, {m['crun']}, {m['tini']}, supervisord {m['supervisord']}.",
        "",
        "```",
        report,
        "```",
        "",
        "### Against the targets (issue 7's, and issue 18's where it set new ones)",
        "",
        *table,
    ])  # fmt: skip
    new, count = re.subn(r"(<!-- figures:begin -->\n).*?(<!-- figures:end -->)",
                         lambda mt: mt.group(1) + block + "\n" + mt.group(2), doc, flags=re.S)
    if count != 1:
        raise SystemExit(f"{DOC}: no <!-- figures:begin --> ... <!-- figures:end --> block")
    DOC.write_text(new)
    print(f"wrote the figures of {m['date']} into {DOC}")


if __name__ == "__main__":
    main()
