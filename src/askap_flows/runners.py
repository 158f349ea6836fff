"""Build a Prefect DaskTaskRunner for one sub-flow run, at the moment that run is invoked.

The runner is handed to ``flow.with_options(task_runner=...)``; Prefect closes its cluster when the
flow run ends. Under Prefect 3 a SLURM sub-flow's cluster is built here, before the flow run is
created, so that its job is queued and starting while Prefect creates and starts the run; its
``cluster_class`` hands that cluster back. Prefect 2's prefect-dask starts its cluster itself, in
the flow run's event loop, when the run begins; a local cluster is started by Prefect on both.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

# dask_jobqueue 0.9 installs a signal handler when first imported; that only works in the main
# thread, and sub-flows start their clusters from worker threads. Import it here, at module top.
import dask
import dask_jobqueue  # noqa: F401 - for its signal handler, see above
from distributed import LocalCluster
from distributed.core import Status
from prefect_dask import DaskTaskRunner

from . import board, compat, jobs, ports, shell, slurm, slurm_query
from .host import log_dir as job_log_dir
from .resolve import Resolved
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


def local_runner(alloc: AllocationSpec, dashboard_port: int = 0,
                 step: jobs.StepContext | None = None) -> DaskTaskRunner:
    """A threaded LocalCluster of one worker; only its dashboard listens, on loopback."""
    # In-process workers share this interpreter. Each one's statistical profiler calls
    # sys._current_frames() every 10 ms; with dozens of them CPython 3.11.7 deadlocks there
    # (cpython#106883: the run hangs with every thread waiting). Separate SLURM workers keep it.
    # Hundreds of clusters starting at once on a few cores: a client took longer than Dask's 30 s
    # to connect to its own in-process scheduler (TimeoutError at N=140-200, benchmarks/sweep.py).
    dask.config.set({"distributed.worker.profile.enabled": False,
                     "distributed.comm.timeouts.connect": "120s"})
    return _step_runner(
        LocalCluster, step,
        n_workers=1,
        threads_per_worker=alloc.cores,
        processes=False,  # in-process (inproc://) comms: no network port but the dashboard's
        dashboard_address=f"{LOCAL_HOST}:{dashboard_port}",
    )


def slurm_runner(cluster_kwargs: dict, clusters: str | None = None,
                 step: jobs.StepContext | None = None) -> DaskTaskRunner:
    """dask-jobqueue's SLURMCluster that retires its workers when it exits (jobs.RetiringCluster);
    its jobs are BoardJobs, whose close lets the retired worker end the job instead of racing it
    with ``scancel`` (``-M`` for ``clusters``)."""
    return _step_runner(jobs.RetiringCluster, step, **cluster_kwargs,
                        job_cls=jobs.board_job_class(clusters))


def _step_runner(cls: Callable[..., Any], step: jobs.StepContext | None,
                 **kwargs: Any) -> DaskTaskRunner:
    # ignore: Prefect 3 types cluster_class a callable without arguments; it is called with them
    return DaskTaskRunner(cluster_class=step_cluster, cluster_kwargs={  # type: ignore[arg-type, unused-ignore]
        **kwargs, "askap_class": cls, "askap_step": step})


_built: dict[str, Any] = {}  # run token -> its cluster, built before its flow run (Prefect 3)


def prebuilt(askap_run: str) -> Any:
    """``cluster_class`` of a runner whose cluster was built before its flow run (Prefect 3). The
    cluster is found by its run's token: a runner's settings are pickled with every Prefect task
    the flow run submits, and a cluster does not pickle."""
    return _built[askap_run]


def step_cluster(askap_class: Callable[..., Any], askap_step: jobs.StepContext | None,
                 **kwargs: Any) -> Any:
    """A sub-flow's cluster, built by prefect-dask when the flow run starts: ``askap_class`` with
    its arguments, carrying the context of the sub-flow's MPI step that ``mpi_task`` reads (None:
    a sub-flow without one)."""
    cluster = askap_class(**kwargs)
    cluster.askap_step = askap_step
    return cluster


@dataclass
class RunCluster:
    """What one sub-flow invocation owns: its task runner and the handle of its job."""

    runner: DaskTaskRunner
    handle: jobs.RunHandle

    @property
    def token(self) -> str:
        return self.handle.token

    @property
    def job_name(self) -> str | None:
        return self.handle.job_name


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
def cluster_for_run(alloc: AllocationSpec, backend: str,
                    step: Resolved | None = None) -> Iterator[RunCluster]:
    """Build the task runner of one sub-flow run, now; on exit cancel its job and free its ports.
    ``step``: the sub-flow's resolved MPI step, for the ``mpi_task`` it runs on the cluster.

    The cluster itself is started by Prefect inside the flow run and closed when it ends; the
    ``scancel --name`` here is the safety net for every way a run can end. The job is tracked on
    the process's job board from before it is submitted until it is gone.
    """
    token = uuid.uuid4().hex[:10]
    import_dashboard()
    log_dir = job_log_dir()
    if backend == "local":
        with ports.reserve(1, LOCAL_HOST) as held:
            handle = jobs.RunHandle(token, None, str(log_dir), alloc.start_timeout, backend)
            context = jobs.StepContext(step, handle) if step else None
            yield RunCluster(local_runner(alloc, held.ports[0], context), handle)
        return
    job_name = f"{alloc.job_name_prefix}-{token}"
    host = slurm.scheduler_host(alloc)
    log_dir.mkdir(parents=True, exist_ok=True)
    # SLURM checks the shape once per process: the script with a fixed name and ports
    slurm_query.test_submit(slurm.render_job_script(
        slurm.run_cluster_kwargs(alloc, f"{alloc.job_name_prefix}-check", log_dir)))
    with ports.reserve(2, host) as held:
        kwargs = slurm.run_cluster_kwargs(alloc, job_name, log_dir, scheduler_port=held.ports[0],
                                          dashboard_port=held.ports[1])
        handle = jobs.RunHandle(token, job_name, str(log_dir), alloc.start_timeout, backend,
                                alloc.clusters)
        context = jobs.StepContext(step, handle, release_nodes=True) if step else None
        with ExitStack() as stack:  # its callbacks run last to first, each whatever the others do
            board.board().track(job_name, alloc.clusters)
            stack.callback(board.board().untrack, job_name)
            stack.callback(jobs.cancel_named, job_name, clusters_=alloc.clusters)
            runner = slurm_runner(kwargs, alloc.clusters, context)
            if compat.PREFECT_MAJOR >= 3:  # submit the job now, before the flow run is created
                _built[token] = step_cluster(**runner.cluster_kwargs)
                stack.callback(_close_unused, token)
                # ignore: Prefect 3 types cluster_class a callable without arguments
                runner = DaskTaskRunner(cluster_class=prebuilt,  # type: ignore[arg-type, unused-ignore]
                                        cluster_kwargs={"askap_run": token})
            yield RunCluster(runner, handle)


def _close_unused(token: str) -> None:
    """The flow run closed its cluster at its end; close it here if no flow run got to use it."""
    built = _built.pop(token)
    if built.status not in (Status.closing, Status.closed):
        built.__exit__(None, None, None)


def active_job_names() -> set[str]:
    """SLURM job names of the sub-flows running in this process now."""
    return board.board().tracked()


def running_job_ids() -> list[str]:
    """Ids of this process's jobs the board last saw RUNNING (no SLURM call)."""
    return sorted((j.job_id for j in board.board().all_jobs() if j.state == "RUNNING"), key=int)


def cancel_everything() -> list[str]:
    """Shutdown (Ctrl-C, SIGTERM): stop new work, cancel every job, kill every launched command."""
    global _shutdown_at
    if not shutting_down.is_set():
        _shutdown_at = time.monotonic()
    shutting_down.set()
    names = sorted(active_job_names())
    for name in names:
        jobs.cancel_named(name, wait=0)
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
