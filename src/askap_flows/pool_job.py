"""The pool's job (pool.py) as its Dask cluster sees it: waiting for its worker after the submit.
(At the end the pool's ``jobs.RetiringCluster`` lets the worker leave first, so that the job
ends by itself.) Job states come from the process's job board (board.py), never from a query of
its own.
"""

from __future__ import annotations

import time

from . import board, jobs, slurm, watch


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
