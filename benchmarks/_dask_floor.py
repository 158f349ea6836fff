"""Stock dask-jobqueue alone, for benchmarks/overhead.py (``--dask``): the same MPI runs through
dask-jobqueue as hand-written code would use it, no Prefect and none of askap_flows' machinery.

For each run: ``dask_jobqueue.SLURMCluster`` with the library's rendered job (the same sbatch
header, environment and Dask worker line as a sub-flow's cluster), a ``distributed.Client``, one
task that runs the ``srun`` line on the job's worker (as a sub-flow's MPI task does), then the
client's and the cluster's close (stock: ``scancel`` of the job). Completion: the close returned
and SLURM no longer lists the job as pending, running or completing (polled every 0.1 s), as the
bare floor's completion is judged.

What this shows: what a Dask cluster per run costs when built by hand (the job's Python worker
start, its connection, the task round trip, stock's close), beside the askap_flows sub-flow
(Prefect flow run, ports, job board, checks, the retiring close). It is not a lower bound of the
design: stock's close (``scancel`` of a job whose worker still runs) sometimes waits out SLURM's
KillWait, and in W the other runs' jobs queue behind it.

Imported by overhead.py after ``_bench`` (which puts src/ on sys.path).
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _batch


def one_run(alloc, spec, program: str, name: str, log_dir: Path) -> tuple[dict, str]:
    """One stock SLURMCluster run of the srun line: (its phases in seconds, the srun's output).
    Phases: ``start`` until the job's worker has connected, ``task`` the srun task's round trip,
    ``close`` the client's and cluster's close until SLURM no longer lists the job."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from askap_flows import mpi, slurm

    t0 = time.monotonic()
    kwargs = slurm.run_cluster_kwargs(alloc, name, log_dir)
    job_id = None
    try:
        with SLURMCluster(**kwargs) as cluster:
            job_id = str(next(iter(cluster.workers.values())).job_id)
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=120)
                t1 = time.monotonic()
                # subprocess.run itself: the worker unpickles it by reference (this module is
                # not importable there)
                res = client.submit(subprocess.run, mpi.launch_command(spec, program),
                                    capture_output=True, text=True, timeout=300,
                                    pure=False).result()
                t2 = time.monotonic()
    finally:  # a failed run too: the next measurement must not start beside its job
        if job_id is not None:
            _batch.wait_jobs_gone([job_id], 120)
    t3 = time.monotonic()
    phases = {"start": t1 - t0, "task": t2 - t1, "close": t3 - t2, "total": t3 - t0}
    return {k: round(v, 3) for k, v in phases.items()}, res.stdout + res.stderr


def run_dask_floor(n: int, alloc, spec, program: str, work: Path, tag: str,
                   prefix: str) -> dict:
    """n stock SLURMCluster runs at once (threads): wall time, failures, latencies."""
    from askap_flows import mpi

    log_dir = work / "dask_floor"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=n) as threads:
        futures = [threads.submit(one_run, alloc, spec, program, f"{prefix}-dask-{tag}-{i}",
                                  log_dir) for i in range(n)]
        results, errors = [], []
        for f in futures:
            try:
                phases, text = f.result()
                mpi.check_world(mpi.parse_ranks(text), spec)
                results.append(phases)
            except Exception as exc:  # noqa: BLE001 - counted as a failure, reported in the JSON
                errors.append(_batch.error_line(exc))
    wall = time.monotonic() - started
    return {"n": n, "wall_seconds": round(wall, 3), "failures": len(errors),
            "errors": errors[:3], "latencies": sorted(r["total"] for r in results),
            "timings": results}
