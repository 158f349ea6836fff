"""Build a Prefect DaskTaskRunner for one sub-flow run, at the moment that run is invoked.

Nothing here starts a cluster: the runner is handed to ``flow.with_options(task_runner=...)`` and
Prefect starts the cluster when the flow run begins (2.x) or at the first task submission (3.x),
and closes it when the flow run ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

# dask_jobqueue 0.9 installs a signal handler when first imported; that only works in the main
# thread, and sub-flows start their clusters from worker threads. Import it here, at module top.
import dask
import dask_jobqueue
from prefect_dask import DaskTaskRunner

from . import mpi, ports, shell, slurm
from .spec import AllocationSpec

LOCAL_HOST = "127.0.0.1"


_dashboard_import = threading.Lock()


def import_dashboard() -> None:
    """Import the scheduler's dashboard once, under a lock, before a cluster starts: many clusters
    starting at once from threads raced on this import. Not at module top: the SLURM jobs' Dask
    workers import this module with each task, and bokeh costs them 1-2 s while they hold nodes."""
    with _dashboard_import:
        try:
            import distributed.dashboard.scheduler  # noqa: F401
        except ImportError:  # pragma: no cover - bokeh missing: clusters run without a dashboard
            pass


def local_runner(alloc: AllocationSpec, dashboard_port: int = 0) -> DaskTaskRunner:
    """A threaded LocalCluster of one worker; only its dashboard listens, on loopback."""
    # In-process workers share this interpreter. Each one's statistical profiler calls
    # sys._current_frames() every 10 ms; with dozens of them CPython 3.11.7 deadlocks there
    # (cpython#106883: the run hangs with every thread waiting). Separate SLURM workers keep it.
    # Hundreds of clusters starting at once on a few cores: a client took longer than Dask's 30 s
    # to connect to its own in-process scheduler (TimeoutError at N=140-200, benchmarks/sweep.py).
    dask.config.set({"distributed.worker.profile.enabled": False,
                     "distributed.comm.timeouts.connect": "120s"})
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=dict(
            n_workers=1,
            threads_per_worker=alloc.cores,
            processes=False,  # in-process (inproc://) comms: no network port but the dashboard's
            dashboard_address=f"{LOCAL_HOST}:{dashboard_port}",
        ),
    )


#: seconds a closing cluster waits for its workers to leave (and so end their jobs) before cancelling
WORKER_EXIT_GRACE = 10.0


class SLURMCluster(dask_jobqueue.SLURMCluster):
    """dask-jobqueue's SLURMCluster whose jobs end with their worker instead of by ``scancel``.

    On close, dask-jobqueue runs ``scancel`` while the worker is still connected; the SIGTERM lands
    in the worker's own shutdown, which then hung until SLURM's KillWait (3 s on the test bed,
    30 s by default) with the job's nodes held in COMPLETING and the sub-flow waiting for them.
    Here the scheduler first closes the workers (no nanny, exec'd: the job ends with its worker),
    and only jobs still running after WORKER_EXIT_GRACE seconds are cancelled.
    """

    async def _close(self):
        names = [job.job_name for job in self.workers.values() if getattr(job, "job_name", None)]
        if self.scheduler_comm is not None and names and self.status.name == "running":
            try:
                await asyncio.wait_for(self.scheduler_comm.retire_workers(
                    names=list(self.workers), close_workers=True), WORKER_EXIT_GRACE)
                deadline = time.monotonic() + WORKER_EXIT_GRACE
                while time.monotonic() < deadline:
                    jobs = await asyncio.to_thread(lambda: [j for n in set(names)
                                                            for j in slurm.jobs_named(n)])
                    if all(j.state == "PENDING" for j in jobs):
                        break  # ended by themselves (or never started: cancelled below)
                    await asyncio.sleep(0.1)
            except Exception:  # noqa: BLE001 - the cancel below is the fallback for every failure
                pass
        await super()._close()


def slurm_runner(cluster_kwargs: dict) -> DaskTaskRunner:
    return DaskTaskRunner(cluster_class=f"{__name__}.SLURMCluster", cluster_kwargs=cluster_kwargs)


@dataclass
class RunCluster:
    """What one sub-flow invocation owns: its task runner, its SLURM job name, its ports."""

    runner: DaskTaskRunner
    token: str
    job_name: str | None  # None for the local backend


# SLURM jobs of sub-flows running in this process, cancelled all at once on shutdown
_active_jobs: set[str] = set()
_active_lock = threading.Lock()
shutting_down = threading.Event()
_shutdown_at = float("inf")  # when shutting_down was last set by cancel_everything
_composition_ended_at = float("-inf")  # when the last run_subflows of this process ended


def begin_composition() -> None:
    """A new run_subflows: forget an interrupt that an earlier, finished composition has seen,
    but keep one that came since (e.g. Ctrl-C while the parent flow run was being created)."""
    if shutting_down.is_set() and _shutdown_at < _composition_ended_at:
        shutting_down.clear()


def end_composition() -> None:
    global _composition_ended_at
    _composition_ended_at = time.monotonic()


@contextmanager
def cluster_for_run(alloc: AllocationSpec, backend: str) -> Iterator[RunCluster]:
    """Build the task runner of one sub-flow run, now; on exit cancel its job and free its ports.

    The cluster itself is started by Prefect inside the flow run and closed when it ends; the
    ``scancel --name`` here is the safety net for every way a run can end.
    """
    token = uuid.uuid4().hex[:10]
    import_dashboard()
    if backend == "local":
        with ports.reserve(1, LOCAL_HOST) as held:
            yield RunCluster(local_runner(alloc, held.ports[0]), token, None)
        return
    job_name = f"{alloc.job_name_prefix}-{token}"
    host = slurm.scheduler_host(alloc)
    log_dir = mpi.askap_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ports.reserve(2, host) as held:
        kwargs = slurm.run_cluster_kwargs(alloc, job_name, log_dir, scheduler_port=held.ports[0],
                                          dashboard_port=held.ports[1])
        slurm.test_submit(slurm.render_job_script(kwargs))
        with _active_lock:
            _active_jobs.add(job_name)
        try:
            yield RunCluster(slurm_runner(kwargs), token, job_name)
        finally:
            try:
                slurm.cancel_named(job_name)
            finally:
                with _active_lock:
                    _active_jobs.discard(job_name)


def active_job_names() -> set[str]:
    """SLURM job names of the sub-flows running in this process now."""
    with _active_lock:
        return set(_active_jobs)


def cancel_everything() -> list[str]:
    """Shutdown (Ctrl-C, SIGTERM): stop new work, cancel every job, kill every launched command."""
    global _shutdown_at
    if not shutting_down.is_set():
        _shutdown_at = time.monotonic()
    shutting_down.set()
    names = sorted(active_job_names())
    for name in names:
        slurm.cancel_named(name, wait=0)
    shell.terminate_all()
    return names


def dashboard_url(client) -> str | None:
    """The dashboard address the scheduler really bound (Dask's own link shows the host's
    primary address for in-process clusters, which is not where the dashboard listens)."""
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    http = getattr(scheduler, "http_server", None)
    if http is None or not getattr(http, "port", None):
        return None
    return f"http://{http.address}:{http.port}/status"
