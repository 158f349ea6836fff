#!/usr/bin/env python3
"""Markdown tables from the JSON in benchmarks/results/ (pasted into benchmarks/README.md).

    python benchmarks/report.py   # every results/*.json below, in this order
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def overhead(d: dict) -> str:
    s = d["summary"]
    out = [f"Prefect {d['versions']['prefect']}, {d['date_utc']} UTC, load average before/after "
           f"{d['load_average_before'][0]} / {d['load_average_after'][0]}, "
           f"{d['workload']['reps']} interleaved repetitions (medians)", "",
           "| workload | bare sbatch (floor) | askap_flows sub-flows | ratio | failures |",
           "|---|---|---|---|---|",
           f"| W = {d['workload']['runs']} runs, wall time | {_f(s['floor']['median_wall_seconds'], 2)} s"
           f" | {_f(s['subflows']['median_wall_seconds'], 2)} s | {_f(d['ratio_wall'], 2)}x | "
           f"{s['floor']['failures']} / {s['subflows']['failures']} |",
           f"| W, per-run latency | {_f(s['floor']['median_latency_seconds'], 2)} s | "
           f"{_f(s['subflows']['median_latency_seconds'], 2)} s | {_f(d['ratio_latency'], 2)}x | |"]
    if d.get("ratio_single"):
        out.append(f"| one run alone | {_f(s['floor_single']['median_wall_seconds'], 2)} s | "
                   f"{_f(s['subflows_single']['median_wall_seconds'], 2)} s | "
                   f"{_f(d['ratio_single'], 2)}x | {s['floor_single']['failures']} / "
                   f"{s['subflows_single']['failures']} |")
    out += ["", "Where a sub-flow's time goes (median seconds per phase, `MPIRunResult.timings`):", "",
            f"| phase | in W ({d['workload']['runs']} at once) | alone |", "|---|---|---|"]
    single = d.get("subflow_single_breakdown") or {}
    for phase, v in d["subflow_breakdown"].items():
        out.append(f"| {phase} | {_f(v, 2)} | {_f(single.get(phase), 2)} |")
    return "\n".join(out)


def sweep(d: dict) -> str:
    out = [f"{d['backend']} backend, Prefect {d['versions']['prefect']}, {d['date_utc']} UTC, "
           f"load average before/after {d['load_average_before'][0]} / "
           f"{d['load_average_after'][0]}", "",
           "| pattern | N | completed | failed | wall [s] | sub-flows/min | peak RSS pipeline [MB] "
           "| per sub-flow [MB] | peak RSS tree [MB] | first error |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        name = "askap_flows" if r["pattern"] == "askap" else "seed"
        if "skipped" in r:
            out.append(f"| {name} | {r['n']} | - | - | - | - | - | - | - | not run: {r['skipped']} |")
            continue
        err = (r.get("error_examples") or [""])[0].replace("|", "/")[:120]
        out.append(f"| {name} | {r['n']} | {r['completed']} | {r['failures']} | "
                   f"{_f(r['wall_seconds'])} | {_f(r['subflows_per_minute'])} | "
                   f"{_f(r.get('peak_rss_mb'))} | {_f(r.get('rss_per_subflow_mb'))} | "
                   f"{_f(r.get('peak_tree_rss_mb'))} | {err} |")
    return "\n".join(out)


def main() -> int:
    for name, render in (("overhead.json", overhead), ("sweep.json", sweep),
                         ("sweep_prefect2.json", sweep), ("sweep_prefect2_capped.json", sweep),
                         ("sweep_testbed.json", sweep)):
        path = RESULTS / name
        if path.exists():
            print(f"### {name}\n\n{render(json.loads(path.read_text()))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
