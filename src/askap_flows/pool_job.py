"""The pool's job (pool.py) as its Dask cluster sees it: waiting for its worker after the submit,
and letting the worker leave first at the end, so that the job ends by itself.

The worker is the job's batch script (exec'd): when it leaves, the job ends. Job states come from
the process's job board (board.py), never from a query of its own.
"""

from __future__ import annotations

import time

from . import board, jobs, slurm, watch


def retire_worker(client) -> None:
    """Let the pool's worker leave first, so that its job ends by itself (the worker is the batch
    script) and the cluster's close only sees it end: nobody else retires it, and a close that
    finds the job still running waits jobs.WORKER_EXIT_GRACE s before its scancel."""
    if client is None:
        return
    try:
        # (the list: called without one, Dask may pick no worker to retire: docs/development.md)
        client.retire_workers(workers=list(client.scheduler_info()["workers"]), close_workers=True)
    except Exception:  # noqa: BLE001 - the close and the cancel below end the job anyway
        pass


def wait_for_worker(client, handle: jobs.RunHandle) -> None:
    """Until the pool's worker connected; SlurmError/JobLost when its job cannot start or ended."""
    b, started = board.board(), time.monotonic()
    while not client.scheduler_info().get("workers"):
        b.check()
        job, waited = handle.job(), time.monotonic() - started
        if job is not None and job.ended:
            raise watch.job_lost(job, handle)
        if waited > handle.start_timeout:
            state = f"{job.state} ({job.reason})" if job else "not seen in squeue"
            raise slurm.SlurmError(
                f"the pool's job {handle.job_name} has no Dask worker after "
                f"{handle.start_timeout:g} s (job {state}). The cluster may be full or the request "
                f"too large; raise start_timeout or ask for fewer nodes. Logs: {handle.log_dir}")
        time.sleep(0.2)
