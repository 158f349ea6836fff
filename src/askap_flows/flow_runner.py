"""``task_runner(cluster)``: the hardened SLURM task runner for any Prefect flow.

It returns prefect-dask's own ``DaskTaskRunner``, whose cluster class is ``RunCluster`` below.
Prefect duplicates a flow's task runner for every flow run (2.20 and 3.x), and the runner builds
its cluster when the run starts (2.x) or submits its first task (3.x), so whatever makes a run's
cluster its own happens in ``RunCluster.__init__``: a fresh job name, two reserved ports (the
scheduler's and the dashboard's, ports.py), the name tracked on the process's job board (so that
``runners.cancel_everything`` cancels it on SIGINT/SIGTERM), and every job a ``jobs.BoardJob``.
On the cluster's exit its jobs are cancelled by name, the name is untracked and the ports freed.

Two shapes: the MPI shape (no ``adapt_kwargs``: one job of N nodes, one worker, ``srun`` inside
tasks, what ``mpi_subflow`` uses) and the adaptive shape (``adapt_kwargs``: single-node worker
jobs scaled by ``adapt(minimum, maximum)``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping
from typing import Any

from prefect_dask import DaskTaskRunner

from . import board, cluster_yaml, host, jobs, ports, runners, slurm, slurm_query
from .resolve import Resolved, resolve
from .runner_watch import LostJobWatch


def scheduler_host(resolved: Resolved) -> str:
    """The address the scheduler listens on ('' = every address, dask's default)."""
    if resolved.allocation:
        return slurm.scheduler_host(resolved.allocation)
    jq = resolved.jobqueue
    interface = cluster_yaml.scheduler_interface(jq)  # type: ignore[arg-type]
    if interface:
        return slurm.interface_address(interface)
    return (jq.cluster_kwargs.get("scheduler_options") or {}).get("host") or ""  # type: ignore[union-attr]


def cluster_kwargs(resolved: Resolved, job_name: str, log_dir: str, address: str,
                   scheduler_port: int, dashboard_port: int) -> dict[str, Any]:
    """One run's SLURMCluster arguments (pure)."""
    if resolved.allocation:
        kw = slurm.cluster_kwargs(resolved.allocation, job_name=job_name, log_directory=log_dir,
                                  env=slurm.job_env(),
                                  dashboard_address=f"{address}:{dashboard_port}")
        kw["scheduler_options"]["port"] = scheduler_port
        if resolved.adapt_kwargs:
            kw["n_workers"] = 0
        return kw
    return cluster_yaml.harden(resolved.jobqueue, job_name=job_name, log_directory=log_dir,  # type: ignore[arg-type]
                               env=slurm.job_env(), scheduler_port=scheduler_port,
                               dashboard_address=f"{address}:{dashboard_port}")


class RunCluster(jobs.RetiringCluster):
    """One flow run's SLURMCluster: its own job name and ports, its jobs tracked and cancelled."""

    def __init__(self, resolved: Resolved, **kwargs: Any) -> None:
        slurm_query.check_available(resolved.clusters)  # -M: the profile's clusters:
        self.askap_resolved = resolved
        self.askap_token = uuid.uuid4().hex[:10]
        self.askap_job_name = f"{resolved.prefix}-{self.askap_token}"
        self.askap_log_dir = str(host.log_dir())
        host.log_dir().mkdir(parents=True, exist_ok=True)
        address = scheduler_host(resolved)
        runners.import_dashboard()
        # SLURM checks the shape once per process: the script with a fixed name and ports
        slurm_query.test_submit(slurm.render_job_script(cluster_kwargs(
            resolved, f"{resolved.prefix}-check", self.askap_log_dir, address, 0, 0)))
        self._askap_ports = ports.reserve(2, address or "0.0.0.0")
        self._askap_done = False
        self._askap_watch = LostJobWatch("", "", "")  # replaced once the cluster runs
        board.board().track(self.askap_job_name, resolved.clusters)
        try:
            super().__init__(**cluster_kwargs(
                resolved, self.askap_job_name, self.askap_log_dir, address,
                *self._askap_ports.ports),
                job_cls=jobs.board_job_class(resolved.clusters), **kwargs)  # type: ignore[arg-type]  # typed an instance
        except BaseException:
            self.askap_release()
            raise

    @property
    def handle(self) -> jobs.RunHandle:
        """The run's job facts, as the watch and the MPI task use them."""
        return jobs.RunHandle(self.askap_token, self.askap_job_name, self.askap_log_dir,
                              self.askap_resolved.start_timeout, "slurm",
                              clusters=self.askap_resolved.clusters, runner=True)

    @property
    def askap_step(self) -> jobs.StepContext | None:
        """What ``mpi_task`` takes from this cluster (the MPI shape only): its step runs with
        ``srun`` inside this job, whose worker stays for the flow's next steps."""
        if self.askap_resolved.adapt_kwargs:
            return None
        return jobs.StepContext(self.askap_resolved, self.handle, launcher="srun")

    def askap_release(self) -> None:
        """Cancel every job of this run (by name), untrack it, free its ports. Idempotent."""
        if self._askap_done:
            return
        self._askap_done = True
        try:
            jobs.cancel_named(self.askap_job_name, clusters_=self.askap_resolved.clusters)
        finally:
            board.board().untrack(self.askap_job_name)
            self._askap_ports.release()

    def askap_watch(self) -> None:
        """The MPI shape: a job that ends under the run fails the run's tasks (runner_watch.py).
        Adaptive jobs end by design (adapt scales them down): there Dask moves the work.
        Idempotent: a synchronous ``with`` enters twice (distributed's ``Cluster.__enter__`` runs
        ``__aenter__``; Prefect 3 enters so), and a second watch would outlive the run."""
        if not self.askap_resolved.adapt_kwargs and not self._askap_watch.is_alive():
            self._askap_watch = LostJobWatch(self.scheduler_address, self.askap_job_name,
                                             self.askap_log_dir)
            self._askap_watch.start()

    def __enter__(self) -> RunCluster:
        try:
            entered = super().__enter__()
            self.askap_watch()
            return entered
        except BaseException:
            self.askap_release()
            raise

    async def __aenter__(self) -> RunCluster:
        try:
            entered = await super().__aenter__()
            self.askap_watch()
            return entered
        except BaseException:
            await asyncio.to_thread(self.askap_release)
            raise

    def __exit__(self, *exc: Any) -> None:
        self._askap_watch.stop()
        try:
            super().__exit__(*exc)
        finally:
            self.askap_release()

    async def __aexit__(self, *exc: Any) -> None:
        self._askap_watch.stop()
        try:
            await super().__aexit__(*exc)
        finally:
            await asyncio.to_thread(self.askap_release)


def current_cluster() -> RunCluster | None:
    """The RunCluster of the flow run this is called from (None: not a task_runner's flow run).
    Prefect 3 builds the cluster here if no task has been submitted yet."""
    from . import compat

    client = compat.current_dask_client()
    cluster = getattr(client, "cluster", None)
    return cluster if isinstance(cluster, RunCluster) else None


def task_runner(cluster: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> DaskTaskRunner:
    """A prefect-dask ``DaskTaskRunner`` on SLURM, hardened like askap_flows' own sub-flows.

    Args:
        cluster: a packaged profile name, a YAML path or a mapping, in this library's form
            (``allocation:``) or in dask-jobqueue's (``cluster_class``, ``cluster_kwargs``,
            ``adapt_kwargs``).
        overrides: keys of the allocation section (this library's form) or of cluster_kwargs
            (dask-jobqueue's form) over the profile's; ``adapt_kwargs={...}`` for the adaptive
            shape.

    Every flow run gets its own cluster, built when the run starts and closed (its jobs
    cancelled) when it ends. Checked here: the profile; at the run's start: SLURM and the job.
    """
    over = dict(overrides)
    adapt = over.pop("adapt_kwargs", None)
    resolved = resolve(cluster, backend="slurm", allocation=over, adapt_kwargs=adapt, step=False,
                       any_form=True)
    # ignore: Prefect 3 types cluster_class a callable without arguments; it is called with them
    return DaskTaskRunner(cluster_class=RunCluster, cluster_kwargs={"resolved": resolved},  # type: ignore[arg-type, unused-ignore]
                          adapt_kwargs=dict(resolved.adapt_kwargs))
