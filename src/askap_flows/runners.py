"""Build a Prefect DaskTaskRunner for one sub-flow run, at the moment that run is invoked.

Nothing here starts a cluster: the runner is handed to ``flow.with_options(task_runner=...)`` and
Prefect starts the cluster when the flow run begins (2.x) or at the first task submission (3.x),
and closes it when the flow run ends.
"""

from __future__ import annotations

# dask_jobqueue 0.9 installs a signal handler when first imported; that only works in the main
# thread, and sub-flows start their clusters from worker threads. Import it here, at module top.
import dask_jobqueue  # noqa: F401
from prefect_dask import DaskTaskRunner

from .spec import AllocationSpec

try:  # Many clusters starting at once from threads race on this import (a failed import is only
    # caught when it happens single-threaded): import it once, here, if bokeh is installed.
    import distributed.dashboard.scheduler  # noqa: F401
except ImportError:  # pragma: no cover - bokeh missing: clusters run without a dashboard page
    pass

LOCAL_HOST = "127.0.0.1"


def local_runner(alloc: AllocationSpec) -> DaskTaskRunner:
    """A threaded LocalCluster of one worker, on loopback, with an OS-chosen dashboard port."""
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=dict(
            n_workers=1,
            threads_per_worker=alloc.cores,
            processes=False,  # in-process (inproc://) comms: no network port but the dashboard's
            dashboard_address=f"{LOCAL_HOST}:0",
        ),
    )


def slurm_runner(cluster_kwargs: dict) -> DaskTaskRunner:
    return DaskTaskRunner(cluster_class="dask_jobqueue.SLURMCluster", cluster_kwargs=cluster_kwargs)


def dashboard_url(client) -> str | None:
    """The dashboard address the scheduler really bound (Dask's own link shows the host's
    primary address for in-process clusters, which is not where the dashboard listens)."""
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    http = getattr(scheduler, "http_server", None)
    if http is None or not getattr(http, "port", None):
        return None
    return f"http://{http.address}:{http.port}/status"
