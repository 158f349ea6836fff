#!/usr/bin/env python3
"""Throughput on the test bed: N short MPI sub-flows through ONE 3-node allocation pool against the
same N on the default cold path (each sub-flow its own 1-node SLURM job and Dask worker).

Each sub-flow runs the hello program with 2 ranks on 1 node. Both modes run the sub-flows through
``run_subflows(..., max_concurrent=K)`` inside one parent flow, each mode in a fresh process (its
peak RSS is the pipeline's peak memory). The pool's wall time counts its own start and end.

The cold path is slow on this machine (2 cores): with ``--chunk C`` it runs as N/C separate
processes of C sub-flows, and the rate is the completed sub-flows over the SUM of their wall
times. With ``--lock PATH`` every process that submits jobs holds ``flock PATH`` for its own run
only, so that the test bed's lock is released between chunks.

    source /tmp/askap_testbed/env.sh
    .venvs/prefect3/bin/python benchmarks/throughput.py --n 200 --chunk 50 \\
        --lock /tmp/askap_testbed.lock --out benchmarks/results/throughput.json

Uses PREFECT_API_URL if set; else starts PostgreSQL and a Prefect server for the run (outside
the lock). Its SLURM jobs are named askapbench-*.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench

PREFIX = "askapbench"
MPI = {"nodes": 1, "ntasks": 2, "ntasks_per_node": 2}
COLD_ALLOC = {"nodes": 1, "ntasks_per_node": 2, "job_name_prefix": PREFIX}
POOL = {"nodes": 3, "ntasks_per_node": 4, "walltime": "00:30:00", "job_name_prefix": PREFIX}


# --------------------------------------------------------------------------- child: one run
def child(mode: str, n: int, k: int, program: str) -> dict:
    from contextlib import nullcontext

    from prefect import flow

    from askap_flows import allocation
    from askap_flows.composition import run_subflows
    from askap_flows.flows import mpi_subflow

    _bench.quiet_logs()
    tag = uuid.uuid4().hex[:6]

    @flow(name=f"bench-throughput-{mode}", validate_parameters=False)
    def parent(count: int):
        with (allocation(profile="testbed", **POOL) if mode == "pool" else nullcontext()) as pool:
            where = ({"pool": pool} if pool is not None else
                     {"allocation": COLD_ALLOC, "backend": "slurm", "profile": "testbed"})
            return run_subflows([functools.partial(mpi_subflow, MPI, program=program,
                                                   name=f"{PREFIX}-{mode}-{tag}-{i}", **where)
                                 for i in range(count)], max_concurrent=k)

    started = time.monotonic()
    outcomes = parent(n)
    wall = time.monotonic() - started
    errors = [f"{type(o.error).__name__}: {(str(o.error).splitlines() or [''])[0][:200]}"
              for o in outcomes if not o.ok]
    errors += [f"sub-flow {o.index}: {len(o.value.ranks)} ranks" for o in outcomes
               if o.ok and len(o.value.ranks) != MPI["ntasks"]]
    return {"mode": mode, "n": n, "wall_seconds": round(wall, 2), "failures": len(errors),
            "errors": errors[:5],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# --------------------------------------------------------------------------- parent
def run_child(mode: str, n: int, args, program: str) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "--n", str(n), "--max-concurrent",
            str(args.max_concurrent), "--program", program]
    if args.lock:
        argv = ["flock", args.lock, *argv]
    _bench.say(f"{mode}: {n} sub-flows (load {_bench.load()})")
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.budget)
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        data = {"mode": mode, "n": n, "failures": n, "wall_seconds": None, "peak_rss_mb": None,
                "errors": [f"exit {proc.returncode}: " + proc.stderr.strip()[-500:]]}
    data["process_seconds"] = round(time.monotonic() - started, 2)  # with the wait for the lock
    return data


def summarize(runs: list[dict]) -> dict:
    n = sum(r["n"] for r in runs)
    failures = sum(r["failures"] for r in runs)
    walls = [r["wall_seconds"] for r in runs if r["wall_seconds"] is not None]
    wall = round(sum(walls), 2) if len(walls) == len(runs) else None
    return {"n": n, "runs": len(runs), "completed": n - failures, "failures": failures,
            "wall_seconds": wall,
            "subflows_per_minute": round((n - failures) / wall * 60, 1) if wall else None,
            "peak_rss_mb": max((r["peak_rss_mb"] or 0) for r in runs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="sub-flows per mode (default 200)")
    p.add_argument("--chunk", type=int, default=0,
                   help="run the cold path as processes of this many sub-flows (default: one)")
    p.add_argument("--max-concurrent", type=int, default=12,
                   help="run_subflows' bound in both modes (default 12: twice the 6 steps of "
                        "2 ranks that the pool's 3 x 4 CPUs hold at once)")
    p.add_argument("--modes", default="pool,cold", help="comma-separated (default pool,cold)")
    p.add_argument("--lock", help="hold `flock LOCK` around each process that submits jobs")
    p.add_argument("--budget", type=float, default=900, help="seconds per process (default 900)")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 sub-flows per mode")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--program", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.max_concurrent, args.program)))
        return 0
    if args.quick:
        args.n, args.chunk = 4, 0
    work, _, _, program = _bench.slurm_setup("askap_throughput_", MPI, COLD_ALLOC)
    load_before = _bench.load()
    modes = [m for m in args.modes.split(",") if m]
    results: dict[str, list[dict]] = {}
    try:
        with _bench.prefect_server(work, args.max_concurrent) as server:
            for mode in modes:
                size = args.chunk if mode == "cold" and args.chunk else args.n
                sizes = [min(size, args.n - i) for i in range(0, args.n, size)]
                results[mode] = [run_child(mode, s, args, program) for s in sizes]
    finally:  # a child killed by its budget may have left its jobs
        from askap_flows import slurm_query

        for job_id, *_ in slurm_query.jobs_with_prefix(PREFIX):
            subprocess.run(["scancel", job_id], capture_output=True)
    summary = {m: summarize(r) for m, r in results.items()}
    speedup = None
    if {"pool", "cold"} <= set(summary) and summary["cold"]["subflows_per_minute"]:
        speedup = round((summary["pool"]["subflows_per_minute"] or 0)
                        / summary["cold"]["subflows_per_minute"], 2)
    result = {**_bench.run_header("throughput", args.quick, load_before, server),
              "workload": {"n": args.n, "mpi": MPI, "cold_allocation": COLD_ALLOC, "pool": POOL,
                           "max_concurrent": args.max_concurrent, "cold_chunk": args.chunk or None,
                           "profile": "testbed"},
              "summary": summary, "speedup_pool_over_cold": speedup, "target_speedup": 3.0,
              "runs": results}
    _bench.write_json(result, args.out)
    _bench.drop_work(work)
    return 0 if all(s["failures"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
