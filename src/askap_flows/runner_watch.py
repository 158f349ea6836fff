"""A job lost under a running flow fails that flow run's tasks, with SLURM's cause.

When the job of an MPI-shaped task runner (one job, one worker) ends while its flow run still
uses it (``scancel``, walltime, a lost node), Dask would keep the run's tasks waiting for a worker
that never comes, and the flow run would stay Running. The watch reads the process's job board
(no SLURM query of its own); on such an end it logs SLURM's cause and cancels the scheduler's
unfinished tasks with that cause as the message, through a client of its own (Dask's public
``Client.cancel(..., force=True, msg=...)``), so each waiting task fails with it.
"""

from __future__ import annotations

import logging
import threading

from . import board, slurm

log = logging.getLogger("askap_flows")


def _unfinished(dask_scheduler) -> list:
    """Runs on the scheduler: the keys of the tasks that have not finished."""
    return [key for key, ts in dask_scheduler.tasks.items() if ts.state not in ("memory", "erred",
                                                                               "forgotten")]


class LostJobWatch(threading.Thread):
    """Watches one cluster's job name on the board until ``stop()``."""

    def __init__(self, scheduler_address: str, job_name: str, log_dir: str) -> None:
        super().__init__(name=f"askap-watch-{job_name}", daemon=True)
        self.scheduler_address, self.job_name, self.log_dir = scheduler_address, job_name, log_dir
        self._stop = threading.Event()
        self.lost: str | None = None  # the cause, once the job was lost

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        b = board.board()
        while not self._stop.wait(0.5):
            if self.lost is None:
                ended = [j for j in b.jobs(self.job_name) if j.ended]
                if ended and not self._stop.is_set():
                    self.fail_tasks(ended[0])
            else:  # tasks submitted since would wait for a worker forever too
                self.cancel_unfinished()

    def fail_tasks(self, job: board.JobState) -> None:
        """Log SLURM's cause of the job's end once, and fail the unfinished tasks with it."""
        err = f"{self.log_dir}/{self.job_name}-{job.job_id}.err"
        self.lost = str(slurm.job_lost(job, self.job_name, err, runner=True))
        log.error("%s", self.lost)
        self.cancel_unfinished()

    def cancel_unfinished(self) -> None:
        from distributed import Client, Future

        try:
            with Client(self.scheduler_address, timeout=10, set_as_default=False) as client:
                keys = client.run_on_scheduler(_unfinished)
                if keys:
                    client.cancel([Future(k, client) for k in keys], force=True,
                                  reason="its SLURM job ended", msg=self.lost)
        except Exception as exc:  # noqa: BLE001 - the run is ending anyway; say why it could not
            log.warning("could not fail the tasks of lost job %s: %s", self.job_name, exc)
