"""Watching a running task's SLURM job, and telling why a task failed.

The watch reads the process's job board (no ``squeue`` of its own): it fails a task clearly when
its job cannot start or ends underneath it (cancelled, node failure, walltime) instead of letting
the task wait forever on a worker that is gone. The classification turns a task's error into
JobLost when SLURM says the job, not the program, was the cause.
"""

from __future__ import annotations

import threading
import time
import weakref

import distributed

from . import board, compat, slurm, slurm_query
from .jobs import RunHandle

NEVER_SUBMITTED_AFTER = 60.0  # seconds without any job of the run's name: the submission failed


def future_done(future, timeout: float) -> bool:
    """Wait up to ``timeout`` s for a Dask or Prefect task future; True once it has finished."""
    if not isinstance(future, distributed.Future):
        return compat.future_done(future, timeout)
    if not future.done():  # woken by the task's end, not a poll (a 50-ms poll: 25 ms late)
        _done_event(future).wait(timeout)
    return future.done()


_done_events: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_done_lock = threading.Lock()


def _done_event(future: distributed.Future) -> threading.Event:
    """An event set when the Dask future finishes, whichever way (its done callback; one per
    future however often it is watched)."""
    with _done_lock:
        event = _done_events.get(future)
        if event is None:
            event = _done_events[future] = threading.Event()
            future.add_done_callback(lambda _: event.set())
        return event


def cancel(future) -> None:
    """Cancel a future whose worker is gone with its job: it would stay pending forever."""
    if isinstance(future, distributed.Future):
        future.cancel()
    else:
        compat.cancel_future(future)


def watch_job(future, run: RunHandle, logger, stopping) -> board.JobState | None:
    """Wait for the task while watching its job on the board. Returns the job as last seen once
    the task has finished (None if the job was never seen). ``stopping()`` true: the pipeline is
    shutting down."""
    b = board.board()
    started = time.monotonic()
    seen: board.JobState | None = None
    while not future_done(future, timeout=0.5):
        if stopping():
            raise RuntimeError(f"the pipeline is shutting down: job {run.job_name} was cancelled")
        b.check()
        job = run.job()
        waited = time.monotonic() - started
        if job is None:
            if waited > min(run.start_timeout, NEVER_SUBMITTED_AFTER):
                raise slurm.SlurmError(
                    f"no SLURM job named {run.job_name} appeared within "
                    f"{min(run.start_timeout, NEVER_SUBMITTED_AFTER):g} s: the Dask cluster could "
                    f"not submit it. See {run.log_dir} and run `askap-flows render` with the same "
                    "profile to check the job script.")
            continue
        if seen is None or job.state != seen.state:
            logger.info("SLURM job %s is %s (%s)", job.job_id, job.state,
                        job.nodelist or job.reason)
        seen = job
        if job.ended:
            # a job that completed may still be handing its result over; any other end is final
            if future_done(future, timeout=2.0 if job.state == "COMPLETED" else 0.1):
                break
            cancel(future)
            raise job_lost(job, run)
        if job.state == "PENDING" and waited > run.start_timeout:
            raise slurm.SlurmError(
                f"SLURM job {job.job_id} ({run.job_name}) was still PENDING after "
                f"{run.start_timeout:g} s (reason: {job.reason}). The cluster may be full or the "
                "request too large; raise the allocation's start_timeout or ask for less.")
    return run.job() or seen


def job_lost(job: board.JobState, run: RunHandle) -> slurm.JobLost:
    return slurm.job_lost(job, run.job_name or "", run.err_log(job.job_id), runner=run.runner)


def result(future, job: board.JobState | None, run: RunHandle):
    """The task's result; a task that failed because its job ended or lost a node (walltime,
    node failure, scancel) raises JobLost saying so, not the launcher's or Dask's own error."""
    try:
        return future.result()
    except Exception as exc:
        if job is None or run.job_name is None:
            raise
        b = board.board()
        # judge on an answer given after the failure (the board's last one may be a second old);
        # srun learns that the job ends before SLURM's job list does: then wait for the end
        ending = "already completing or completed" in str(exc)
        try:
            b.wait(lambda: not ending or b.latest(job).ended,
                   (10.0 if ending else 5.0) + b.high, fresh=True)
        except board.ControllerUnreachable:
            pass
        now = b.latest(job)
        if (not now.ended or now.state == "COMPLETED") and \
                not slurm_query.node_problems(slurm_query.hostnames(now.nodelist), now.cluster)[0]:
            raise  # the program itself failed: its own error says why
        lost = job_lost(now, run)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        lost.args = (f"{lost.args[0]} The task's own error: {type(exc).__name__}: {first}",)
        raise lost from exc
