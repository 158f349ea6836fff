#!/usr/bin/env python3
"""Markdown tables from the JSON in benchmarks/results/ (pasted into benchmarks/README.md).

    python benchmarks/report.py   # every results/*.json below, in this order
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def overhead(d: dict) -> str:
    s = d["summary"]
    out = [f"Prefect {d['versions']['prefect']}, {d['date_utc']} UTC, load average before/after "
           f"{d['load_average_before'][0]} / {d['load_average_after'][0]}, "
           f"{d['workload']['reps']} interleaved repetitions (medians){stolen(d)}", "",
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
    out += cpu_rows(d, (("W", "floor", "subflows"), ("one run alone", "floor_single",
                                                     "subflows_single")))
    if d.get("ratio_dask_wall"):
        out += ["", "The same runs through stock dask-jobqueue alone (a `SLURMCluster`, a `Client`, "
                "the srun task, the close; no Prefect, no askap_flows run machinery):", "",
                "| workload | bare sbatch (floor) | stock dask-jobqueue | ratio | askap_flows over it "
                "| failures |", "|---|---|---|---|---|---|"]
        for label, kind, floor, sub in (("W, wall time", "dask", "floor", "subflows"),
                                        ("one run alone", "dask_single", "floor_single",
                                         "subflows_single")):
            if kind in s and sub in s:
                a_, f_, d_ = (s[k]["median_wall_seconds"] for k in (sub, floor, kind))
                out.append(f"| {label} | {_f(f_, 2)} s | {_f(d_, 2)} s | {_f(d_ / f_, 2)}x | "
                           f"{_f(a_ / d_, 2)}x | {s[kind]['failures']} |")
    out += ["", "Where a sub-flow's time goes (median seconds per phase, `MPIRunResult.timings`):", "",
            f"| phase | in W ({d['workload']['runs']} at once) | alone |", "|---|---|---|"]
    single = d.get("subflow_single_breakdown") or {}
    for phase, v in d["subflow_breakdown"].items():
        out.append(f"| {phase} | {_f(v, 2)} | {_f(single.get(phase), 2)} |")
    dask = d.get("dask_breakdown") or {}
    if dask:
        out += ["", "Stock dask-jobqueue alone (median seconds per phase: `start` until the job's "
                "worker connected, `task` the srun task, `close` until SLURM no longer lists the "
                "job):", "", f"| phase | in W ({d['workload']['runs']} at once) | alone |",
                "|---|---|---|"]
        for phase in ("start", "task", "close", "total"):
            out.append(f"| {phase} | {_f(dask['dask'].get(phase), 2)} | "
                       f"{_f(dask['dask_single'].get(phase), 2)} |")
    return "\n".join(out)


def stolen(d: dict) -> str:
    """The CPU seconds the hypervisor took over the samples whose CPU was measured, if any."""
    steal = [v["steal_seconds"] for v in d["summary"].values() if v.get("steal_seconds")]
    return (f"; CPU stolen by the hypervisor during the samples measured: {sum(steal):.1f} s"
            if steal else "")


def busy_cell(d: dict, kind: str) -> str:
    """A kind's median busy CPU seconds, and the median over its samples of their share of the
    time the cores were there to run it (the cores' time less what the hypervisor stole)."""
    cpus, c = d["workload"].get("cpus"), d["summary"][kind].get("median_cpu_seconds")
    shares = [r[kind]["cpu_seconds"] / (cpus * r[kind]["wall_seconds"]
                                        - r[kind].get("steal_seconds", 0.0))
              for r in d.get("repetitions", []) if "cpu_seconds" in r.get(kind, {})] if cpus else []
    if c is None or not shares:
        return "-"
    return f"{c:.1f} s ({statistics.median(shares):.0%})"


def cpu_rows(d: dict, rows) -> list[str]:
    """The machine's busy CPU seconds (all processes, all cores) over each measurement, and their
    share of the cores' time: a measurement near 100 % is bound by the 2 cores, not by waiting."""
    cells = [(label, busy_cell(d, a), busy_cell(d, b)) for label, a, b in rows
             if a in d["summary"] and b in d["summary"]]
    shown = [c for c in cells if "-" not in c[1:]]
    if not shown:
        return []
    return ["", "CPU busy meanwhile (median CPU seconds of the whole machine, "
            f"{d['workload']['cpus']} cores; median share of the cores' time not stolen by the "
            "hypervisor):", "", "| workload | floor | askap_flows |", "|---|---|---|",
            *(f"| {label} | {a} | {b} |" for label, a, b in shown)]


def pool(d: dict) -> str:
    """overhead.py --pool: the pool's rows against the floor and against bare srun."""
    s = d["summary"]
    if "pool_warm" not in s:
        return "(no pool rows: run overhead.py with --pool)"

    def busy(key, what):
        """The machine's busy CPU seconds over the measurement (not over one call's latency)."""
        return busy_cell(d, key) if what == "median_wall_seconds" else "-"

    def row(label, key, floor_key, target, what="median_wall_seconds"):
        a, b = s[key][what], s[floor_key]["median_wall_seconds"]
        r = round(a / b, 2) if a and b else None
        return (f"| {label} | {_f(a, 2)} s | {_f(b, 2)} s ({floor_key}) | {_f(r, 2)}x | "
                f"{target} | {s[key]['failures']} | {busy(key, what)} |")

    out = [f"Prefect {d['versions']['prefect']}, {d['date_utc']} UTC, load average before/after "
           f"{d['load_average_before'][0]} / {d['load_average_after'][0]}, "
           f"{d['workload']['reps']} repetition(s) (medians){stolen(d)}", "",
           "| workload | askap_flows | floor | ratio | target | failures | CPU busy (all cores) |",
           "|---|---|---|---|---|---|---|",
           row("the floor: W as bare sbatch jobs", "floor", "floor", "-"),
           row(f"W = {d['workload']['runs']} runs, warm pool", "pool_warm", "floor", "<= 0.5x"),
           row("W, pool started cold (its start and end counted)", "pool_cold", "floor",
               "<= 1.2x")]
    if "srun_single" in s:
        out += [row("one sub-flow in a warm pool (the call)", "pool_warm_single", "srun_single",
                    "<= 1.5x", "median_latency_seconds"),
                row("the same, with its parent flow run", "pool_warm_single", "srun_single", "-"),
                row("W by hand: 8 bare srun in a held salloc", "srun_w", "floor", "-"),
                *([row("W's 8 sub-flow runs with an empty body (Prefect alone)", "prefect_w",
                       "floor", "-")] if "prefect_w" in s else []),
                last_row(d, "pool_warm"),
                row("W, warm pool, against W by hand", "pool_warm", "srun_w", "-")]
    bd = d.get("pool_breakdown") or {}
    if bd:
        out += ["", "A pooled step's own timings (median seconds, `MPIRunResult.timings`):", "",
                "| | queue_wait | srun | total |", "|---|---|---|---|"]
        for k, v in bd.items():
            out.append(f"| {k} | {_f(v.get('queue_wait'), 2)} | {_f(v.get('srun'), 2)} | "
                       f"{_f(v.get('total'), 2)} |")
    return "\n".join(out)


def last_row(d: dict, key: str) -> str:
    """W's time until its last sub-flow call returned (median over the repetitions), without its
    parent flow run's creation and end (Prefect 3 joins the parent's heartbeat thread: 0-1 s)."""
    lasts = [max(r[key]["latencies"]) for r in d["repetitions"] if r.get(key, {}).get("latencies")]
    a, b = (statistics.median(lasts) if lasts else None), d["summary"]["floor"]["median_wall_seconds"]
    r = round(a / b, 2) if a and b else None
    return (f"| W, warm pool, until its last sub-flow returned | {_f(a, 2)} s | {_f(b, 2)} s "
            f"(floor) | {_f(r, 2)}x | - | {d['summary'][key]['failures']} | - |")


def throughput(d: dict) -> str:
    w = d["workload"]
    out = [f"Prefect {d['versions']['prefect']}, {d['date_utc']} UTC, load average before/after "
           f"{d['load_average_before'][0]} / {d['load_average_after'][0]}; N = {w['n']} sub-flows "
           f"of {w['mpi']['ntasks']} ranks on 1 node, max_concurrent {w['max_concurrent']}"
           + (f"; the cold path in processes of {w['cold_chunk']}" if w.get("cold_chunk") else ""),
           "", "| mode | processes | completed | failed | wall [s] | sub-flows/min | "
           "peak RSS pipeline [MB] |", "|---|---|---|---|---|---|---|"]
    for mode, v in d["summary"].items():
        out.append(f"| {mode} | {v['runs']} | {v['completed']} | {v['failures']} | "
                   f"{_f(v['wall_seconds'])} | {_f(v['subflows_per_minute'])} | "
                   f"{_f(v['peak_rss_mb'])} |")
    out += ["", f"pool over cold: {_f(d.get('speedup_pool_over_cold'), 2)}x the sub-flows per "
                f"minute (target >= {d.get('target_speedup')}x)"]
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


def controller_load(d: dict) -> str:
    w, t, lat = d["workload"], d["targets"], d["latency"]
    out = [f"Prefect {d['versions']['prefect']}, {d['date_utc']} UTC, load average before/after "
           f"{d['load_average_before'][0]} / {d['load_average_after'][0]}; 1-node 1-rank jobs, "
           f"programs: short = hello, long = sleep {w['long_seconds']} s then hello; board poll "
           f"{w['board_poll']}", "",
           "| program | N | kind | wall [s] | jobs seen PENDING | query RPCs | per job | /s while running "
           "| /s whole phase | failures |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in d["phases"]:
        out.append(f"| {p['program']} | {p['n']} | {p['kind']} | {_f(p['wall_seconds'])} | "
                   f"{p['jobs_pended']} | {p['queries']} | {_f(p['queries_per_job'], 2)} | "
                   f"{_f(p.get('queries_per_second_running'), 2)} | "
                   f"{_f(p['queries_per_second_phase'], 2)} | {p['failures']} |")
    types = sorted({k for p in d["phases"] for k in p["queries_by_type"]},
                   key=lambda k: (-sum(p["queries_by_type"].get(k, 0) for p in d["phases"]), k))
    out += ["", "Query RPCs by type over each phase (`sdiag`, \"by message type\"):", "",
            "| program | N | kind | " + " | ".join(k.removeprefix("REQUEST_") for k in types) + " |",
            "|---|---|---|" + "---|" * len(types)]
    for p in d["phases"]:
        out.append(f"| {p['program']} | {p['n']} | {p['kind']} | "
                   + " | ".join(str(p["queries_by_type"].get(k, 0)) for k in types) + " |")
    out += ["", "RPCs of one call of each command (`sdiag -r` before each):", "",
            "| command | RPCs |", "|---|---|"]
    for cmd, rpcs in d["command_costs"].items():
        text = ", ".join(f"{k.removeprefix('REQUEST_')} {v}" for k, v in rpcs.items()) or "none"
        out.append(f"| `{cmd}` | {text} |")
    out += ["", f"Detection latency: {lat['m']} sub-flows, each job cancelled (`scancel ID`) "
            "1.5 / 4 / 7 / 10 s after its MPI step started:", "",
            "| seconds from scancel to | p50 | p95 | samples | JobLost CANCELLED |",
            "|---|---|---|---|---|",
            f"| the watch logging the new state | {_f(lat['p50_seconds_to_seen'], 2)} | "
            f"{_f(lat['p95_seconds_to_seen'], 2)} | "
            f"{sum(s.get('seconds_to_seen') is not None for s in lat['samples'])} | |",
            f"| the sub-flow call raising | {_f(lat['p50_seconds_to_fail'], 2)} | "
            f"{_f(lat['p95_seconds_to_fail'], 2)} | {lat['m']} | {lat['joblost_cancelled']} |",
            "", "| target | result | met? |", "|---|---|---|"]
    rates = ", ".join(f"N={n}: {_f(r, 2)}" for n, r in t["pipeline_queries_per_second_running"].items())
    rates += "; without the jobs' own srun lookups (HET_JOB_ALLOC_INFO): " + ", ".join(
        f"N={n}: {_f(r, 2)}" for n, r in t["own_queries_per_second_running"].items())
    change = t["rate_change_largest_vs_smallest_n"]
    out.append(f"| query RPCs/s from the pipeline while sub-flows run ({t['rate_program']}) <= 1 | "
               f"{rates} | {'yes' if t['rate_at_most_1'] else 'no'} |")
    own_change = t["own_rate_change_largest_vs_smallest_n"]
    out.append(f"| ... independent of N (largest N within 10 % of smallest), judged without "
               f"srun's own lookup in each job, which the floor's jobs make too | "
               f"{'-' if own_change is None else f'{own_change * 100:+.0f} %'} "
               f"(all queries: {'-' if change is None else f'{change * 100:+.0f} %'}) | "
               f"{'yes' if t['rate_independent_of_n'] else 'no'} |")
    extra = ", ".join(f"{k}: {_f(v, 2)}" for k, v in t["per_subflow_over_floor"].items())
    out.append(f"| query RPCs per sub-flow over its life <= 3 on top of the floor's | {extra} | "
               f"{'yes' if t['per_subflow_over_floor_at_most_3'] else 'no'} |")
    out.append(f"| a job's end reaches its sub-flow in <= 5 s (p95) | "
               f"{_f(t['latency_p95_seconds'], 2)} s | {'yes' if t['latency_p95_at_most_5'] else 'no'} |")
    return "\n".join(out)


def main() -> int:
    for name, render in (("overhead.json", overhead), ("sweep.json", sweep),
                         ("sweep_prefect2.json", sweep), ("sweep_prefect2_capped.json", sweep),
                         ("sweep_testbed.json", sweep), ("controller_load.json", controller_load),
                         ("overhead_pool.json", pool), ("throughput.json", throughput)):
        path = RESULTS / name
        if path.exists():
            print(f"### {name}\n\n{render(json.loads(path.read_text()))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
