"""Build a Prefect DaskTaskRunner for one sub-flow run, at the moment that run is invoked.

Nothing here starts a cluster: the runner is handed to ``flow.with_options(task_runner=...)`` and
Prefect starts the cluster when the flow run begins (2.x) or at the first task submission (3.x),
and closes it when the flow run ends.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

# dask_jobqueue 0.9 installs a signal handler when first imported; that only works in the main
# thread, and sub-flows start their clusters from worker threads. Import it here, at module top.
import dask
import dask_jobqueue  # noqa: F401
from prefect_dask import DaskTaskRunner

from . import mpi, ports, shell, slurm
from .spec import AllocationSpec

try:  # Many clusters starting at once from threads race on this import (a failed import is only
    # caught when it happens single-threaded): import it once, here, if bokeh is installed.
    import distributed.dashboard.scheduler  # noqa: F401
except ImportError:  # pragma: no cover - bokeh missing: clusters run without a dashboard page
    pass

LOCAL_HOST = "127.0.0.1"


def local_runner(alloc: AllocationSpec, dashboard_port: int = 0) -> DaskTaskRunner:
    """A threaded LocalCluster of one worker; only its dashboard listens, on loopback."""
    # In-process workers share this interpreter. Each one's statistical profiler calls
    # sys._current_frames() every 10 ms; with dozens of them CPython 3.11.7 deadlocks there
    # (cpython#106883: the run hangs with every thread waiting). Separate SLURM workers keep it.
    dask.config.set({"distributed.worker.profile.enabled": False})
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=dict(
            n_workers=1,
            threads_per_worker=alloc.cores,
            processes=False,  # in-process (inproc://) comms: no network port but the dashboard's
            dashboard_address=f"{LOCAL_HOST}:{dashboard_port}",
        ),
    )


def slurm_runner(cluster_kwargs: dict) -> DaskTaskRunner:
    return DaskTaskRunner(cluster_class="dask_jobqueue.SLURMCluster", cluster_kwargs=cluster_kwargs)


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


@contextmanager
def cluster_for_run(alloc: AllocationSpec, backend: str) -> Iterator[RunCluster]:
    """Build the task runner of one sub-flow run, now; on exit cancel its job and free its ports.

    The cluster itself is started by Prefect inside the flow run and closed when it ends; the
    ``scancel --name`` here is the safety net for every way a run can end.
    """
    token = uuid.uuid4().hex[:10]
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


def cancel_everything() -> list[str]:
    """Shutdown (Ctrl-C, SIGTERM): stop new work, cancel every job, kill every launched command."""
    shutting_down.set()
    with _active_lock:
        names = list(_active_jobs)
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
