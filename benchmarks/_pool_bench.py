"""The allocation pool's part of benchmarks/overhead.py (``--pool``) and its own floor.

* pool_cold: W through a pool opened and closed inside the timing (``allocation(...)`` of 3 nodes).
* pool_warm / pool_warm_single: W, and one sub-flow alone, through a pool opened before.
* prefect_w: Prefect's own floor, W's sub-flow runs with an empty body (no SLURM, no Dask).
* srun_w / srun_single: the bare floor of a pool, measured in the same repetition: ONE held
  ``salloc --no-shell`` of the same 3 nodes, then the same ``srun`` lines (with ``--jobid`` and
  ``--exact``) started by hand, all W at once and one alone. No Prefect, no Dask.

Imported by overhead.py after ``_bench`` (which puts src/ on sys.path).
"""

from __future__ import annotations

import re
import subprocess
import time
from contextlib import contextmanager, nullcontext

import _batch
import _bench

PREFIX = "askapbench"
POOL = {"nodes": 3, "ntasks_per_node": 4, "walltime": "00:20:00", "job_name_prefix": PREFIX}


def run_pool_batch(n: int, mpi: dict, program: str, tag: str, pool=None) -> dict:
    """n ``mpi_subflow(..., pool=...)`` calls at once inside one parent flow: through ``pool``
    (warm: its job already runs) or through a pool opened and closed inside the timing (cold)."""
    from askap_flows import allocation
    from askap_flows.flows import mpi_subflow

    parent, latencies = _batch.batch_flow(
        "bench-pool",
        lambda held, i: mpi_subflow(mpi, program=program, name=f"{PREFIX}-pool-{tag}-{i}",
                                    pool=held),
        lambda: (nullcontext(pool) if pool is not None
                 else allocation(profile="testbed", **POOL)))
    result = _batch.timed_batch(parent, n, latencies, mpi["ntasks"])
    outcomes = result.pop("outcomes")
    result["timings"] = [{k: round(v, 3) for k, v in o.value.timings.items()}
                         for o in outcomes if o.ok]
    return result


def run_empty_batch(n: int) -> dict:
    """Prefect's own floor for a pooled W: n sub-flow runs with an empty body at once inside one
    parent flow, each started as a pooled step's is (no heartbeat), no SLURM, no Dask. What
    every step being its own flow run (issue 15) costs on this machine by itself."""
    from prefect import flow

    from askap_flows import compat

    @flow(name="bench-empty-step", validate_parameters=False)
    def step(i: int):
        return i

    def call(_held, i: int):
        with compat.without_flow_heartbeat():
            return step(i)

    parent, latencies = _batch.batch_flow("bench-empty", call)
    result = _batch.timed_batch(parent, n, latencies, None)
    result.pop("outcomes")
    return result


@contextmanager
def held_salloc(tag: str):
    """One ``salloc --no-shell`` of the pool's nodes (what a user holding nodes by hand does);
    its job id. Cancelled on the way out, and waited for until SLURM no longer lists it: the
    next measurement (a pool started cold) needs the same nodes, and counted the salloc's end
    as its own start (2026-12-04: 17-22 s in all 3 repetitions without the wait, 6-7 s in 2 of 3
    with it)."""
    name = f"{PREFIX}-salloc-{tag}"
    res = subprocess.run(["salloc", "--no-shell", "-J", name, "--nodes", str(POOL["nodes"]),
                          "--ntasks-per-node", str(POOL["ntasks_per_node"]), "--time",
                          "00:10:00"], capture_output=True, text=True, timeout=120)
    m = re.search(r"Granted job allocation (\d+)", res.stderr)
    if m is None:
        raise SystemExit(f"salloc gave no allocation: {res.stderr.strip()}")
    try:
        yield m.group(1)
    finally:
        subprocess.run(["scancel", m.group(1)], capture_output=True)
        _batch.wait_jobs_gone([m.group(1)], 120)


def run_sruns(n: int, job_id: str, argv: list[str], ntasks: int) -> dict:
    """n copies of the step's srun line (``--jobid --exact``) at once in the held allocation."""
    from askap_flows import mpi

    line = [argv[0], f"--jobid={job_id}", "--exact", *argv[1:]]
    started, cpu = time.monotonic(), _bench.cpu_mark()
    procs = [subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    latencies, errors = [], []
    for p in procs:
        out, err = p.communicate(timeout=300)
        latencies.append(round(time.monotonic() - started, 3))
        try:
            if p.returncode:
                raise mpi.MPIError(f"exit {p.returncode}: {err.strip()[-300:]}")
            if len(mpi.parse_ranks(out)) != ntasks:
                raise mpi.MPIError(f"{len(mpi.parse_ranks(out))} ranks, not {ntasks}")
        except mpi.MPIError as exc:
            errors.append(str(exc))
    return {"n": n, "wall_seconds": round(time.monotonic() - started, 3),
            **_bench.cpu_used(cpu), "failures": len(errors), "errors": errors[:3],
            "latencies": sorted(latencies)}


def run_pool_kinds(n: int, mpi: dict, program: str, argv: list[str], tag: str) -> dict:
    """srun_w and srun_single in a held salloc; pool_cold (the pool's start and end counted);
    then pool_warm and pool_warm_single through a pool opened before the timing starts."""
    from askap_flows import allocation

    out = {"prefect_w": run_empty_batch(n)}
    with held_salloc(tag) as job_id:
        out["srun_w"] = run_sruns(n, job_id, argv, mpi["ntasks"])
        out["srun_single"] = run_sruns(1, job_id, argv, mpi["ntasks"])
    out["pool_cold"] = run_pool_batch(n, mpi, program, f"{tag}-cold")
    with allocation(profile="testbed", **POOL) as pool:
        out["pool_warm"] = run_pool_batch(n, mpi, program, f"{tag}-warm", pool)
        out["pool_warm_single"] = run_pool_batch(1, mpi, program, f"{tag}-warm1", pool)
    return out
