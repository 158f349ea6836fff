#!/usr/bin/env python3
"""What a pipeline asks slurmctld: query RPCs (``sdiag``) of N concurrent sub-flows against the same
jobs submitted with bare ``sbatch``, and how soon a job's end reaches its sub-flow.

Workload: N concurrent MPI sub-flows (``run_subflows``, max_concurrent = N), each one 1-node,
1-rank, 1-CPU job on the test bed (3 nodes x 4 CPUs, no oversubscription: at most 12 run at once,
the rest pend and run in waves), with two programs: the hello program ("short", N = 4, 16, 48)
and a wrapper that sleeps 60 s, then execs it ("long", N = 4 and 48: the run holds the test bed
for about 15 min).

* pipeline: ``mpi_subflow(backend="slurm", profile="testbed")`` calls in one parent flow. Each phase
  starts with the per-process caches of ``sinfo`` / ``sbatch --test-only`` empty, as a fresh
  pipeline process would.
* floor: the same job scripts (``overhead.floor_script``: the library's sbatch header with the
  Dask worker line replaced by the ``srun`` line) submitted with ``sbatch --parsable`` and watched
  by one shared ``squeue`` per second from this script.
* Before each phase ``sdiag -r``; during it ``sdiag`` every second (its REQUEST_STATS_INFO is not
  counted). Query RPCs are the types that only read the controller's state (``*_INFO``,
  ``*_INFO_SINGLE``, REQUEST_JOB_WILL_RUN, REQUEST_PING, ...); everything else (sbatch, scancel,
  srun's step RPCs, the nodes' messages) is reported but not counted as a query. Figures: query
  RPCs by type, per job over the whole phase, and per second while the jobs run (from the first
  MPI step's start to the last one's end; the floor: first seen RUNNING to last seen ended).
* detection latency: M sub-flows run a wrapper that sleeps; a set delay after its MPI step started
  (a marker file the wrapper writes: no SLURM query) this script runs ``scancel JOBID``. Latency:
  seconds from the cancel to the sub-flow call raising, and to its watch logging the new state.

    scripts/slurm_testbed.sh up && source /tmp/askap_testbed/env.sh
    flock /tmp/askap_testbed.lock .venvs/prefect3/bin/python benchmarks/controller_load.py \\
        --out benchmarks/results/controller_load.json

``sdiag -r`` needs root or SlurmUser. The counters are the controller's, for every user: the test
bed must be otherwise idle (hold its lock). SLURM jobs are named askapbench-*.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench
import overhead  # noqa: E402

from askap_flows.jobstate import ACTIVE_STATES  # noqa: E402
from askap_flows.mpi import launch_command  # noqa: E402
from askap_flows.poll_pace import DEFAULT_BURST, DEFAULT_POLL  # noqa: E402

PREFIX = "askapbench"
MPI = {"nodes": 1, "ntasks": 1, "ntasks_per_node": 1}
ALLOC = {"nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1, "cores": 1, "memory": "1GB",
         "walltime": "00:15:00", "start_timeout": 900, "job_name_prefix": PREFIX}
OWN_RPC = "REQUEST_STATS_INFO"  # this script's own sdiag calls
QUERY_TYPES = {"REQUEST_JOB_WILL_RUN", "REQUEST_PING", "REQUEST_PRIORITY_FACTORS"}
RPC_LINE = re.compile(r"^(\S+)\s+\(\s*(\d+)\)\s+count:(\d+)")
LATENCY_DELAYS = (1.5, 4.0, 7.0, 10.0)  # seconds after the MPI step started: the board's
#                                         interval is 1 s right after a change, 3 s once steady


# --------------------------------------------------------------------------- sdiag
def is_query(rpc: str) -> bool:
    return rpc != OWN_RPC and (rpc.endswith(("_INFO", "_INFO_SINGLE")) or rpc in QUERY_TYPES)


def parse_sdiag(text: str) -> dict:
    """RPC counts by message type and by user from ``sdiag`` output."""
    out: dict = {"by_type": {}, "by_user": {}}
    section = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Remote Procedure Call statistics by message type"):
            section = "by_type"
        elif s.startswith("Remote Procedure Call statistics by user"):
            section = "by_user"
        elif s.startswith("Pending RPC statistics"):
            section = None
        elif section and (m := RPC_LINE.match(s)):
            out[section][m[1]] = int(m[3])
    return out


def queries(by_type: dict) -> dict:
    return {k: v for k, v in by_type.items() if is_query(k)}


class Sdiag:
    """``sdiag -r``, then one ``sdiag`` every ``every`` seconds until stopped: (time, parsed)."""

    def __init__(self, every: float = 1.0) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        out = subprocess.run(["sdiag"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            self.samples.append((time.time(), parse_sdiag(out.stdout)))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> Sdiag:
        r = subprocess.run(["sdiag", "-r"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SystemExit(f"`sdiag -r` failed ({r.stderr.strip()}): resetting slurmctld's "
                             "counters needs root or the SlurmUser.")
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def rpc_figures(samples: list, n: int, window: tuple[float, float] | None) -> dict:
    """Query RPCs of one phase: by type, per job, per second over the whole phase and within
    ``window`` (the samples just outside it bound the count), and the time series."""
    t0, first = samples[0]
    t_end, last = samples[-1]
    by_type = queries(last["by_type"])
    total = sum(by_type.values())
    out = {"queries": total, "queries_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
           "other_rpcs_by_type": {k: v for k, v in sorted(last["by_type"].items())
                                  if not is_query(k) and k != OWN_RPC},
           "rpcs_by_user": last["by_user"], "queries_per_job": round(total / n, 2),
           "phase_seconds": round(t_end - t0, 2),
           "queries_per_second_phase": round(total / round(t_end - t0, 2), 3),
           "series": [[round(t - t0, 1), sum(queries(s["by_type"]).values())] for t, s in samples]}
    if window:
        before = [x for x in samples if x[0] <= window[0]] or samples[:1]
        after = [x for x in samples if x[0] >= window[1]] or samples[-1:]
        (ta, a), (tb, b) = before[-1], after[0]
        qa, qb = queries(a["by_type"]), queries(b["by_type"])
        in_window = {k: v - qa.get(k, 0) for k, v in qb.items() if v - qa.get(k, 0)}
        out.update(running_seconds=round(window[1] - window[0], 2),
                   counted_seconds=round(tb - ta, 2), running_queries=sum(in_window.values()),
                   running_queries_by_type=in_window,
                   queries_per_second_running=(round(sum(in_window.values()) / round(tb - ta, 2),
                                                     3) if round(tb - ta, 2) > 0 else None))
    return out


# --------------------------------------------------------------------------- programs
def sleeper(work: Path, seconds: int, hello: str, marks: Path) -> str:
    """A wrapper that marks its start (file $SLURM_JOB_NAME.$SLURM_JOB_ID), sleeps, execs hello."""
    marks.mkdir(parents=True, exist_ok=True)
    path = work / f"sleep{seconds}.sh"
    path.write_text(f'#!/bin/sh\ntouch "{marks}/$SLURM_JOB_NAME.$SLURM_JOB_ID"\nsleep {seconds}\n'
                    f'exec {hello} "$@"\n')
    path.chmod(0o755)
    return str(path)


# --------------------------------------------------------------------------- the phases
def run_floor(n: int, alloc, spec, program: str, work: Path, tag: str) -> dict:
    """n job scripts by ``sbatch --parsable``; one ``squeue`` a second until all have ended."""
    log_dir = work / "floor"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    names = {}
    for i in range(n):
        name = f"{PREFIX}-floor-{tag}-{i}"
        path = log_dir / f"{name}.sh"
        path.write_text(overhead.floor_script(alloc, spec, program, name, log_dir))
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                             check=True).stdout.strip()
        names[out.split(";")[0]] = name
    running, ended, pended = {}, {}, set()
    ids = ",".join(names)
    while len(ended) < n:
        time.sleep(1.0)
        out = subprocess.run(["squeue", "-h", "--states=all", "-j", ids, "-o", "%i|%T"],
                             capture_output=True, text=True).stdout
        now = time.time()
        states = dict(line.strip().split("|", 1) for line in out.splitlines() if "|" in line)
        for job_id in names:
            state = states.get(job_id, "GONE")
            if state == "PENDING":
                pended.add(job_id)
            elif state == "RUNNING":
                running.setdefault(job_id, now)
            elif state not in ACTIVE_STATES:
                running.setdefault(job_id, now)
                ended.setdefault(job_id, now)
        if now - started > 900:
            raise SystemExit(f"floor jobs {ids} did not finish within 900 s")
    errors = overhead.floor_failures(names, log_dir, spec)
    return {"wall_seconds": round(time.time() - started, 2), "failures": len(errors),
            "errors": errors[:3], "jobs_pended": len(pended),
            "window": (min(running.values()), max(ended.values()))}


def run_pipeline(n: int, program: str, tag: str, alloc_for=lambda i: ALLOC) -> dict:
    """n mpi_subflow calls at once in one parent flow; when each MPI step ran, and each call ended."""
    from prefect import flow

    from askap_flows import slurm_query
    from askap_flows.composition import run_subflows
    from askap_flows.flows import mpi_subflow

    with slurm_query._checked_lock:  # a fresh pipeline process: one sinfo and one test-only again
        slurm_query._checked.clear()
    steps, ends = {}, {}

    def timed(i: int):
        called = time.time()
        try:
            r = mpi_subflow(MPI, alloc_for(i), backend="slurm", profile="testbed", program=program,
                            name=f"{PREFIX}-{tag}-{i}")
        finally:
            ends[i] = time.time()
        t = r.timings
        start = called + t["checks"] + t["prefect_start"] + t["cluster_start"] + t["worker_wait"]
        steps[i] = (start, start + t["srun"], t["worker_wait"])
        return r

    @flow(name="bench-controller-load", validate_parameters=False)
    def parent(count: int):
        return run_subflows([functools.partial(timed, i) for i in range(count)],
                            max_concurrent=count)

    pended: set[str] = set()
    stop = threading.Event()

    def pending_seen() -> None:  # the job board's cache: no SLURM call
        from askap_flows import board

        while not stop.wait(0.25):
            pended.update(j.job_id for j in board.board().all_jobs() if j.state == "PENDING")

    watcher = threading.Thread(target=pending_seen, daemon=True)
    watcher.start()
    started = time.time()
    try:
        outcomes = parent(n)
    finally:
        stop.set()
        watcher.join()
    errors = [(o.index, o.error) for o in outcomes if not o.ok]
    return {"wall_seconds": round(time.time() - started, 2), "failures": len(errors),
            "errors": [f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                       for _, e in errors][:3],
            "jobs_pended": len(pended),
            "max_worker_wait_seconds": round(max((s[2] for s in steps.values()), default=0), 2),
            "window": ((min(s[0] for s in steps.values()), max(s[1] for s in steps.values()))
                       if steps else None),
            "_ends": ends, "_errors": dict(errors)}


def measured(kind: str, program_kind: str, n: int, run) -> dict:
    with Sdiag() as sd:
        res = run()
    window = res.pop("window")
    res.pop("_ends", None), res.pop("_errors", None)
    return {"kind": kind, "program": program_kind, "n": n, **res,
            **rpc_figures(sd.samples, n, window)}


class StateLog(logging.Handler):
    """When each sub-flow's watch logged 'SLURM job ID is STATE' for a final state (no SLURM
    query; its PENDING and RUNNING lines come before the cancel)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: dict[tuple[str, str], float] = {}

    def emit(self, record) -> None:
        m = re.match(r"SLURM job (\d+) is (\S+)", record.getMessage())
        if m:
            self.seen.setdefault((m[1], m[2]), record.created)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (with 8 samples p95 is the largest)."""
    if not values:
        return None
    s = sorted(values)
    return round(s[max(0, math.ceil(q / 100 * len(s)) - 1)], 2)


def run_latency(m: int, hello: str, work: Path, tag: str) -> dict:
    """m sub-flows of a sleeping wrapper; each job cancelled LATENCY_DELAYS[i % 4] s after its
    MPI step started; seconds from each cancel to its sub-flow raising."""
    marks = work / f"marks-{tag}"
    program = sleeper(work, 600, hello, marks)
    delays = {i: LATENCY_DELAYS[i % len(LATENCY_DELAYS)] for i in range(m)}
    cancels: dict[int, tuple[str, float]] = {}
    stop = threading.Event()

    def canceller() -> None:
        due: dict[int, tuple[str, float]] = {}
        while not stop.wait(0.05):
            for f in marks.iterdir():
                name, _, job_id = f.name.rpartition(".")
                i = int(name.split("-")[1][len("lat"):])
                if i not in due:
                    due[i] = (job_id, f.stat().st_mtime + delays[i])
            for i, (job_id, at) in due.items():
                if i not in cancels and time.time() >= at:
                    subprocess.run(["scancel", job_id], capture_output=True)
                    cancels[i] = (job_id, time.time())

    log = StateLog()
    logging.getLogger("prefect.task_runs").addHandler(log)
    thread = threading.Thread(target=canceller, daemon=True)
    thread.start()
    try:
        res = run_pipeline(m, program, tag,
                           alloc_for=lambda i: {**ALLOC, "job_name_prefix": f"{PREFIX}-lat{i}"})
    finally:
        stop.set()
        thread.join()
        logging.getLogger("prefect.task_runs").removeHandler(log)
    samples = []
    for i in range(m):
        if i not in cancels:
            samples.append({"index": i, "error": "not cancelled (its MPI step never started)"})
            continue
        job_id, t = cancels[i]
        err = res["_errors"].get(i)
        seen = [v for (j, state), v in log.seen.items()
                if j == job_id and state not in ACTIVE_STATES]
        samples.append({"index": i, "job_id": job_id, "cancel_after_start_seconds": delays[i],
                        "seconds_to_fail": round(res["_ends"][i] - t, 2),
                        "seconds_to_seen": round(min(seen) - t, 2) if seen else None,
                        "error": (f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                                  if err else "the sub-flow did not fail")})
    fail = [s["seconds_to_fail"] for s in samples if "seconds_to_fail" in s]
    seen = [s["seconds_to_seen"] for s in samples if s.get("seconds_to_seen") is not None]
    return {"m": m, "samples": samples, "p50_seconds_to_fail": percentile(fail, 50),
            "p95_seconds_to_fail": percentile(fail, 95), "p50_seconds_to_seen": percentile(seen, 50),
            "p95_seconds_to_seen": percentile(seen, 95),
            "joblost_cancelled": sum("JobLost" in s["error"] and "CANCELLED" in s["error"]
                                     for s in samples)}


COMMANDS = {  # what one call of each SLURM command the library or the floor uses asks
    "scontrol -o show job (the job board)": ["scontrol", "-o", "show", "job"],
    "squeue --states=all --name a,b (the board's first version)": [
        "squeue", "-h", "--states=all", "--name", f"{PREFIX}-x,{PREFIX}-y", "-o", "%i|%j|%T"],
    "squeue -j ID1,ID2 (floor)": ["squeue", "-h", "--states=all", "-j", "1,2", "-o", "%i|%T"],
    "squeue -j ID (one job)": ["squeue", "-h", "-j", "1", "-o", "%i"],
    "scancel --name NAME (cancel_named, job not known)": ["scancel", "--name", f"{PREFIX}-none"],
    "scancel ID (cancel_named)": ["scancel", "999999"],
    "sinfo -h -o %P (check_available)": ["sinfo", "-h", "-o", "%P"],
    "sinfo -N -n NODE (node_problems)": ["sinfo", "-h", "-N", "-n", "node1", "-o", "%N|%t|%E"],
    "scontrol show hostnames (hostnames)": ["scontrol", "show", "hostnames", "node[1-2]"],
}


def command_costs(script: str) -> dict:
    """RPCs of one call of each command (``sdiag -r`` before each); sbatch --test-only on
    ``script``."""
    costs = {}
    with_test = {**COMMANDS, "sbatch --test-only (test_submit)": ["sbatch", "--test-only", script]}
    for label, argv in with_test.items():
        subprocess.run(["sdiag", "-r"], capture_output=True, timeout=30)
        subprocess.run(argv, capture_output=True, timeout=30)
        out = subprocess.run(["sdiag"], capture_output=True, text=True, timeout=30).stdout
        costs[label] = {k: v for k, v in parse_sdiag(out)["by_type"].items() if k != OWN_RPC}
    return costs


def wait_idle(timeout: float = 180) -> None:
    """Until none of this benchmark's jobs is queued (before a reset: its squeue is not counted)."""
    from askap_flows import slurm_query

    deadline = time.time() + timeout
    while slurm_query.jobs_with_prefix(PREFIX) and time.time() < deadline:
        time.sleep(1.0)


# --------------------------------------------------------------------------- summary
SRUN_OWN = "REQUEST_HET_JOB_ALLOC_INFO"  # srun's lookup of its allocation, once per job step:
#                                          the MPI program's launch, made by the floor's jobs too


def own_rate(phase: dict) -> float | None:
    """Query RPCs per second while running, without the lookups srun makes in each job."""
    secs = phase.get("counted_seconds")
    if not secs:
        return None
    own = phase["running_queries"] - phase["running_queries_by_type"].get(SRUN_OWN, 0)
    return round(own / secs, 3)


def targets(phases: list[dict], latency: dict) -> dict:
    def get(kind, program, n):
        return next((p for p in phases if (p["kind"], p["program"], p["n"]) == (kind, program, n)),
                    None)

    program = "long" if any(p["program"] == "long" for p in phases) else "short"
    ns = sorted({p["n"] for p in phases if p["program"] == program})
    rates = {n: get("pipeline", program, n)["queries_per_second_running"] for n in ns
             if get("pipeline", program, n)}
    own = {n: own_rate(get("pipeline", program, n)) for n in ns if get("pipeline", program, n)}
    lo, hi = rates[ns[0]], rates[ns[-1]]
    own_lo, own_hi = own[ns[0]], own[ns[-1]]
    extra = {f"{p['program']} N={p['n']}": round(
        p["queries_per_job"] - get("floor", p["program"], p["n"])["queries_per_job"], 2)
        for p in phases if p["kind"] == "pipeline"}
    return {
        "rate_program": program,
        "pipeline_queries_per_second_running": rates,
        "rate_at_most_1": all(r is not None and r <= 1 for r in rates.values()),
        "rate_change_largest_vs_smallest_n": round(hi / lo - 1, 3) if lo and hi else None,
        "own_queries_per_second_running": own,
        "own_rate_change_largest_vs_smallest_n": (round(own_hi / own_lo - 1, 3)
                                                  if own_lo and own_hi else None),
        # judged on the pipeline's own queries: srun's lookup in each job is the MPI program's
        "rate_independent_of_n": bool(own_lo and own_hi and abs(own_hi / own_lo - 1) <= 0.10),
        "per_subflow_over_floor": extra,
        "per_subflow_over_floor_at_most_3": all(v <= 3 for v in extra.values()),
        "latency_p95_seconds": latency["p95_seconds_to_fail"],
        "latency_p95_at_most_5": (latency["p95_seconds_to_fail"] is not None
                                  and latency["p95_seconds_to_fail"] <= 5),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4,16,48", help="concurrent sub-flows per phase (default 4,16,48)")
    p.add_argument("--programs", default="short,long", help="short, long or both (default)")
    p.add_argument("--long-n", default="4,48",
                   help="N for the long program (default 4,48: the smallest and largest N; with "
                        "16 as well the run would hold the test bed for over 20 min)")
    p.add_argument("--long-seconds", type=int, default=60, help="the long program's sleep")
    p.add_argument("--latency-samples", type=int, default=8, help="cancelled sub-flows (default 8)")
    p.add_argument("--quick", action="store_true", help="smoke test: N=2, short only, 2 cancels")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.quick:
        args.n, args.programs, args.latency_samples = "2", "short", 2
    ns = [int(x) for x in args.n.split(",")]
    long_ns = [int(x) for x in args.long_n.split(",")]
    programs = args.programs.split(",")
    work, alloc, spec, hello = _bench.slurm_setup("askap_ctld_", MPI, ALLOC)
    paths = {"short": hello, "long": sleeper(work, args.long_seconds, hello, work / "marks")}
    load_before = _bench.load()
    tag = uuid.uuid4().hex[:6]
    phases: list[dict] = []
    try:
        with _bench.prefect_server(work, max(ns + [args.latency_samples])) as server:
            import prefect  # noqa: F401 - configures logging; then quiet Dask's

            _bench.quiet_logs()
            wait_idle()
            check = work / "check.sh"
            check.write_text(overhead.floor_script(alloc, spec, hello, f"{PREFIX}-check", work))
            costs = command_costs(str(check))
            for program in programs:
                for n in (long_ns if program == "long" else ns):
                    for kind in ("floor", "pipeline"):
                        wait_idle()
                        _bench.say(f"{kind}: {n} x {program}")
                        t = f"{tag}-{program[0]}{n}"
                        run = (functools.partial(run_floor, n, alloc, spec, paths[program], work, t)
                               if kind == "floor" else
                               functools.partial(run_pipeline, n, paths[program], t))
                        phases.append(measured(kind, program, n, run))
                        if args.out:  # what is measured so far survives an interrupted run
                            Path(f"{args.out}.partial").write_text(json.dumps(phases, indent=1))
            wait_idle()
            _bench.say(f"detection latency: {args.latency_samples} cancelled sub-flows")
            latency = run_latency(args.latency_samples, hello, work, f"{tag}-lat")
    finally:
        overhead.cleanup_jobs()
    result = {
        **_bench.run_header("controller_load", args.quick, load_before, server),
        "workload": {"n": ns, "long_n": long_ns, "programs": programs, "long_seconds": args.long_seconds,
                     "mpi": MPI, "allocation": ALLOC, "profile": "testbed",
                     "srun": launch_command(spec, hello), "board_poll": os.environ.get(
                         "ASKAP_FLOWS_SLURM_POLL", "default ({:g}-{:g} s)".format(*DEFAULT_POLL)),
                     "board_burst": os.environ.get(
                         "ASKAP_FLOWS_SLURM_BURST", "default ({}/{:g} s)".format(*DEFAULT_BURST))},
        "command_costs": costs,
        "phases": phases,
        "latency": latency,
        "targets": targets(phases, latency),
    }
    _bench.write_json(result, args.out)
    if args.out:
        Path(f"{args.out}.partial").unlink(missing_ok=True)
    _bench.drop_work(work)
    return 0 if all(p["failures"] == 0 for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
