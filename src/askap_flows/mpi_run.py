"""``mpi_task``: the one Prefect task of an MPI step, on the nodes of the flow run's cluster.

A user's flow calls it on an MPI-shaped ``askap_flows.task_runner(...)`` (one job of N nodes, one
Dask worker on its first node); ``mpi_subflow``'s flow calls it on the cluster it built for itself
(SLURM, or the local backend's LocalCluster and ``mpiexec``). Whichever it is, the cluster carries
the step's context (``jobs.StepContext``: what the spec is resolved over, the job's handle, the
launcher its place needs, whether the job's nodes are freed once the step returns).

Called directly in the flow (not ``.submit()``), the task runs in the flow's process: it hands
the step to the cluster's worker (``launch.mpi_step``; the worker imports no Prefect, which would
cost the job's nodes seconds of start-up), relays the program's lines to the task's Prefect log
as they come, and watches the job on the job board, so that an ``scancel``, a walltime or a lost
node fails the task with SLURM's state within seconds. A task that gives up on its step
(Prefect's ``timeout_seconds``, which raises in the task's thread, or an interrupt) stops it
(``stop_step``): the worker kills srun's process group, so the step does not run on, holding the
job's nodes, after its task has failed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from prefect import get_run_logger, task

from . import compat, jobs, launch, mpi, runners, watch
from .jobs import RunHandle, StepContext
from .resolve import resolve
from .spec import MPISpec

STOP_WAIT = 20.0  # seconds a stopped step may take to report its end
STOP_QUIET = 2.0  # ... or this long if it never sent a line (it has not started)

NOT_ON_RUNNER = (
    "mpi_task runs in a flow whose task_runner is askap_flows.task_runner(...) in the MPI shape "
    "(no adapt_kwargs), called directly in the flow body, not with .submit(): "
    "@flow(task_runner=askap_flows.task_runner('PROFILE')).")


@task(name="mpi-task")
def mpi_task(mpi_spec: MPISpec | Mapping[str, Any] | None = None,
             program: str | None = None) -> dict:
    """Run an MPI program across the nodes of this flow run's job: the job of an MPI-shaped
    ``task_runner(...)`` (its worker stays for the flow's next steps), or the cluster an
    ``mpi_subflow`` built for its one step (on SLURM, its nodes are freed once the step returns).

    Args:
        mpi_spec: an MPISpec, or a mapping of its fields (over the profile's mpi section when the
            runner's profile is in this library's form).
        program: the MPI executable; default: the packaged hello program (built if missing).

    Returns:
        dict with job_id, nodelist, host, exit_code, seconds, command and ranks.
    """
    step = step_context()
    # over the profile's mpi section, fitted in its allocation, with the launcher its place needs
    spec = resolve(step.resolved, backend=step.resolved.backend, mpi=mpi_spec,
                   launcher=step.launcher, say=get_run_logger().warning).mpi_spec()
    prog, check_ranks = mpi.resolve_program(spec, program)
    return run_step(spec, prog, check_ranks, step.handle, step.release_nodes)


def step_context() -> StepContext:
    """The step's context, from the cluster of the flow run this is called in."""
    client = compat.current_dask_client()
    step = getattr(getattr(client, "cluster", None), "askap_step", None)
    if not isinstance(step, StepContext):
        raise RuntimeError(NOT_ON_RUNNER)
    return step


def run_step(spec: MPISpec, program: str, check_ranks: bool, run: RunHandle,
             release_nodes: bool) -> dict:
    """Run the MPI step on the flow run's Dask worker and write its output to the calling task's
    Prefect log as it comes. ``release_nodes``: let the job free its nodes once it returns."""
    logger = get_run_logger()
    client = compat.current_dask_client()
    topic = f"askap-mpi-{uuid.uuid4().hex}"
    relayed = LineCount()
    client.subscribe_topic(topic, relayed.relay_to(logger))
    future = None
    slurm_run = run.backend == "slurm"
    try:
        future = client.submit(launch.mpi_step, spec, program, check_ranks, topic, pure=False)
        job = watch.watch_job(future, run, logger, runners.shutting_down.is_set) \
            if slurm_run else None
        try:
            data = watch.result(future, job, run)
        except Exception:
            relayed.wait_for(None, quiet_after=1.0)  # whatever of the last lines comes
            raise
        relayed.wait_for(data["lines"], quiet_after=5.0)
        return data
    except BaseException:
        if future is not None and not future.done():
            stop_step(client, future, topic, relayed, job_ended(run) if slurm_run else None)
        raise
    finally:
        client.unsubscribe_topic(topic)
        if release_nodes and slurm_run and future is not None and future.done():
            _release_nodes(client, future)


def stop_step(client, future, topic: str, relayed: LineCount, job_ended=None) -> bool:
    """The task gives up on its running step: ask the worker to kill it (``launch.stop_event``),
    cancel its Dask task, and wait up to STOP_WAIT s for its "end" (less if ``job_ended()``: no
    worker is left to report; or if the step never sent a line and STOP_QUIET s pass: it has not
    started, and the event, left set, stops it within a second if it does). True if it ended."""
    from distributed import Event

    event = Event(launch.stop_event(topic), client=client)
    try:
        event.set()
        future.cancel()
    except Exception:  # noqa: BLE001 - no scheduler left: the job and its step are gone too
        return False
    ended = relayed.wait_for_end(STOP_WAIT, STOP_QUIET, job_ended)
    if ended:
        try:
            event.clear()  # the scheduler forgets it
        except Exception:  # noqa: BLE001
            pass
    return ended


def job_ended(run: RunHandle):
    """A function that says whether the run's job has ended (on the job board)."""

    def ended() -> bool:
        job = run.job()
        return job is not None and job.ended

    return ended


def _release_nodes(client, future) -> None:
    """The MPI step was the job's only work: let its worker leave now, so that the job ends and
    frees its nodes while the sub-flow still records its results (the cluster's close, after
    the flow run, was the first to do so). Best effort: closing the cluster ends the job anyway."""
    try:
        future.release()  # its result is here; Dask retires no worker that holds the only copy
        deadline = time.monotonic() + 2.0
        while any(client.has_what().values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        client.retire_workers(workers=list(client.scheduler_info()["workers"]), close_workers=True)
        jobs.ending_soon()
    except Exception:  # noqa: BLE001
        pass


class LineCount:
    """Lines relayed so far, counted from Dask's event thread and read by the task's thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._n = 0
        self.ended = False  # the step's "end" event arrived (launch.mpi_step sends it last)

    def relay_to(self, logger) -> Callable[[Any], None]:
        """A Dask topic handler that writes each relayed line to ``logger`` and counts it."""

        def relay(event) -> None:
            msg = event[1]
            if msg["level"] == "end":
                self.end()
                return
            (logger.warning if msg["level"] == "warning" else logger.info)("%s", msg["line"])
            self.add()

        return relay

    def add(self) -> None:
        with self._cond:
            self._n += 1
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait_for_end(self, timeout: float, quiet_after: float, gone=None) -> bool:
        """Wait up to ``timeout`` s for the step's "end"; give up earlier once ``gone()`` is true,
        or after ``quiet_after`` s if no line ever came. Polls in short waits, so that an
        interrupt is not held up. True if the end came."""
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while not self.ended:
                now = time.monotonic()
                if now >= deadline or (self._n == 0 and now - start >= quiet_after):
                    break
                if gone is not None and gone():
                    break
                self._cond.wait(0.2)
            return self.ended

    def wait_for(self, expected: int | None, quiet_after: float) -> None:
        """Let the step's last lines arrive: until ``expected`` were relayed (None: not known) or
        no line came for ``quiet_after`` s."""
        with self._cond:
            while expected is None or self._n < expected:
                last = self._n
                self._cond.wait(quiet_after)
                if self._n == last:
                    return
