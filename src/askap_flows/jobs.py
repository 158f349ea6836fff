"""One sub-flow's SLURM job: its frozen handle, the context of its MPI step, its dask-jobqueue job
and cluster classes (a job that ends by itself, a cluster that lets its workers leave first), and
its cancel.

The handle is made where the cluster is built and travels with the run (flow parameters, the
watch, the classification of failures). Every question about the job's state is answered by the
process's job board (``board.py``); nothing here loops on ``squeue``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dask_jobqueue.slurm import SLURMCluster, SLURMJob
from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from . import board, clusters, shell
from .jobstate import DONE_STATES

if TYPE_CHECKING:
    from .resolve import Resolved

log = logging.getLogger("askap_flows")

#: seconds a closing cluster waits for its retired worker to end its job before cancelling it
WORKER_EXIT_GRACE = 10.0
RETIRE_TIMEOUT = 10.0  # seconds the scheduler may take to retire a cluster's workers at its end
#: seconds from a worker's retirement to its job's end in SLURM (0.19-0.26 s on the test bed):
#: the board's next poll is timed for then (``ending_soon``), not for the retirement itself
JOB_END_AFTER_RETIRE = 0.3


def ending_soon() -> None:
    """A job's worker was just retired: have the board look when the job should have ended."""
    board.board().poll_soon(JOB_END_AFTER_RETIRE)


@dataclass(frozen=True)
class RunHandle:
    """The facts of one sub-flow run's job, fixed when its cluster is built."""

    token: str
    job_name: str | None  # None for the local backend
    log_dir: str
    start_timeout: float
    backend: str
    clusters: str | None = None  # the profile's clusters: (sbatch --clusters), None: this one
    runner: bool = False  # a flow run's job under task_runner (not a sub-flow's): for messages

    def job(self) -> board.JobState | None:
        """The job once the board has seen it (the first one of this name: dask-jobqueue may
        submit a replacement under the same name, which does not count)."""
        jobs = board.board().jobs(self.job_name) if self.job_name else []
        return jobs[0] if jobs else None

    def err_log(self, job_id: str) -> str:
        return str(Path(self.log_dir) / f"{self.job_name}-{job_id}.err")


@dataclass(frozen=True)
class StepContext:
    """What ``mpi_task`` takes from the cluster of the flow run it is called in (the cluster's
    ``askap_step``), set where that cluster is built: a task runner's ``RunCluster`` (MPI shape)
    or an ``mpi_subflow``'s own cluster (SLURM or local)."""

    resolved: Resolved  # what the step's spec is resolved over (mpi section, allocation, backend)
    handle: RunHandle
    launcher: str | None = None  # the launcher the step's place needs (None: the backend's)
    release_nodes: bool = False  # the step is the job's only work: free its nodes once it returns


class BoardJob(SLURMJob):
    """dask-jobqueue's SLURM job whose close lets a running worker end the job by itself.

    RetiringCluster (or the step's own release) retires a worker before its job is closed; the
    worker, exec'd in the batch script, then exits and the job ends. ``scancel`` while the worker
    was still shutting down made its SIGTERM land in that shutdown, which hung until SLURM's
    KillWait with the nodes held in COMPLETING. So a running job gets WORKER_EXIT_GRACE seconds
    to end (watched on the board); a job still pending or still running after that is cancelled
    as dask-jobqueue would.
    """

    #: the profile's ``clusters:`` (see ``board_job_class``); the job's own cluster once submitted
    clusters: str | None = None
    cluster: str = ""  # (clusters.LOCAL: the name `clusters` is the attribute above here)

    def _job_id_from_submit_output(self, out):
        """The job id, and the cluster sbatch put it on: its cancel names that cluster."""
        job_id = super()._job_id_from_submit_output(out)
        self.cluster = clusters.submitted_on(out, self.clusters)[1]
        self.cancel_command = shlex.join(["scancel", *clusters.args(self.cluster)])
        return job_id

    async def start(self):
        """Submit; while the controller cannot be reached (a restart, a busy controller) try
        again with backoff for the board's grace period instead of failing the sub-flow."""
        b = board.board()
        pauses = board.retry_pauses(b.grace)
        while True:
            try:
                await super().start()
                b.submitted(self.job_name, str(self.job_id), self.cluster)
                return
            except Exception as exc:  # noqa: BLE001 - only an unreachable controller is retried
                pause = next(pauses, None) if board.unreachable(str(exc)) else None
                if pause is None:
                    raise
                log.warning("sbatch could not reach the SLURM controller; trying again in %g s "
                            "(for up to %g s)", pause, b.grace)
                await asyncio.sleep(pause)

    async def close(self):
        try:
            await self._close_unless_ended()
        finally:
            # dask-jobqueue's Job.close leaves the status `running`; distributed's cluster close
            # asserts that every job it still holds a reference to is closed (seen in CI:
            # "AssertionError: Status.running"). ProcessInterface.close sets it.
            await ProcessInterface.close(self)

    async def _close_unless_ended(self):
        if self.job_id and self.job_name:
            b = board.board()
            job_id = str(self.job_id)
            state = b.job(job_id, self.cluster)
            if state is not None and (state.ended or state.state in ("RUNNING", "COMPLETING")):
                # an end already on the board needs no fresh poll (the step's own release often
                # ended the job while Prefect closed the flow run)
                if not state.ended:
                    b.poll_soon()
                try:
                    ended = await asyncio.to_thread(b.wait, lambda: b.latest(state).ended,
                                                    WORKER_EXIT_GRACE + b.high)
                except board.ControllerUnreachable:
                    ended = False
                # any other end (NODE_FAIL, PREEMPTED, ...) may come back with JobRequeue=1:
                # cancelled as dask-jobqueue would (an scancel of an ended job is harmless)
                if ended and b.latest(state).state in DONE_STATES:
                    return
        await super().close()


class RetiringCluster(SLURMCluster):
    """dask-jobqueue's SLURMCluster whose exit first retires its workers (by name, closing them),
    so that each job ends by itself (COMPLETED) within a second before its BoardJob is closed.

    SpecCluster's own scale-down asks the scheduler to retire the workers with their spec names
    (``SLURMCluster-0``) as ``workers=``, which are addresses (distributed 2026.8): it retired
    nothing, and every close waited out WORKER_EXIT_GRACE for a worker nobody stopped, then
    cancelled the job (15 s at every end of a flow run under the task runner). The names are
    SpecCluster's public ``requested``: with several worker processes per job (``processes`` > 1)
    they carry the group's suffixes (``X-0-0``, ``X-0-1``).
    """

    async def askap_retire(self) -> None:
        comm = self.scheduler_comm
        if self.status != Status.running or not self.workers or comm is None:
            return
        try:
            retired = await asyncio.wait_for(comm.retire_workers(
                names=sorted(map(str, self.requested)), close_workers=True), RETIRE_TIMEOUT)
            if retired:  # (a step's release may have retired them already)
                ending_soon()
        except Exception:  # noqa: BLE001 - the jobs' close cancels them anyway
            pass

    def retire(self) -> None:
        """Retire the workers now (a cluster closed with ``close()``, not left with ``with``)."""
        self.sync(self.askap_retire)

    def __exit__(self, *exc) -> None:
        try:
            self.retire()
        finally:  # whatever interrupts the retire, the cluster still closes
            super().__exit__(*exc)

    async def __aexit__(self, *exc) -> None:
        try:
            await self.askap_retire()
        finally:
            await super().__aexit__(*exc)


@functools.cache
def board_job_class(clusters_: str | None) -> type[BoardJob]:
    """BoardJob for jobs submitted with the profile's ``clusters:`` (``sbatch --clusters`` comes
    from the job script): their close cancels on the cluster sbatch named."""
    if not clusters_:
        return BoardJob
    name = "BoardJob_" + re.sub(r"\W", "_", clusters_)
    cls = type(name, (BoardJob,), {"clusters": clusters_, "__module__": __name__,
                                   "cancel_command": shlex.join(cancel_argv(clusters_))})
    globals()[name] = cls  # found by name, as pickle and copy look a class up
    return cls


def cancel_argv(clusters_: str | None) -> list[str]:
    """``scancel`` (with ``-M`` for a ``clusters:`` profile) before the job ids."""
    return ["scancel", *clusters.args(clusters_)]


def cancel_commands(name: str, clusters_: str | None,
                    live: list[tuple[str, str]], complete: bool) -> list[list[str]]:
    """The scancel calls for the jobs of ``name`` (pure): by id, one call per cluster, when the
    board can name them all; else by name on every cluster of ``clusters:``."""
    if not complete:
        return [clusters.cancel_name(clusters_, name)]
    by_cluster: dict[str, list[str]] = {}
    for cluster, job_id in live:
        by_cluster.setdefault(cluster, []).append(job_id)
    return [clusters.cancel_ids(c, ids) for c, ids in sorted(by_cluster.items())]


def cancel_named(name: str, wait: float = 30.0, clusters_: str | None = None) -> list[str]:
    """Cancel every job of this name; wait up to ``wait`` s until the board shows them ended.

    Jobs the board can name are cancelled by id (``scancel ID``: no query for slurmctld); a job
    already seen ending is left alone; only when the board cannot name the jobs of ``name`` does
    ``scancel --name`` run (which makes slurmctld load its job list). ``scancel`` runs even when
    SLURM cannot be queried (on shutdown, cancelling matters most). ``clusters_``: the profile's
    ``clusters:`` (default: what the name is tracked with), so that every call carries its -M.
    Returns the ids the board knows.
    """
    b = board.board()
    clusters_ = clusters_ or b.clusters_of(name)
    b.track(name, clusters_)
    grace = b.grace if wait > 0 else 0.0
    try:
        live, complete = b.live_ids(name)
        if complete and not live:
            return [j.job_id for j in b.jobs(name)]  # every job of this name has ended
        for argv in cancel_commands(name, clusters_, live, complete):
            pauses = board.retry_pauses(grace, first=2.0, most=2.0)
            while True:
                try:
                    res = shell.run(argv, check=False, timeout=30)
                except shell.CommandError:  # scancel missing or hanging: nothing more to do
                    return [j.job_id for j in b.jobs(name)]
                pause = next(pauses, None) if board.unreachable(res.stderr or "") else None
                if pause is None:
                    break
                time.sleep(pause)  # the controller is restarting: the cancel must still happen
        if wait > 0:
            try:
                b.wait(lambda: all(j.ended for j in b.jobs(name))
                       and not b.live_ids(name)[0], wait, fresh=True)
            except board.ControllerUnreachable:
                pass
        return [j.job_id for j in b.jobs(name)]
    finally:
        b.untrack(name)
