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
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dask_jobqueue import SLURMCluster
from prefect_dask import DaskTaskRunner

from . import board, cluster_yaml, host, jobs, ports, runners, slurm, slurm_query
from .runner_watch import LostJobWatch
from .spec import AllocationSpec, SpecError
from .spec_profile import load_profile, profile_sections

log = logging.getLogger("askap_flows")
ADAPT = "adapt_kwargs"


@dataclass(frozen=True)
class Plan:
    """What every run of one task runner builds: a profile in either form, checked."""

    alloc: AllocationSpec | None = None  # this library's form
    jobqueue: cluster_yaml.JobqueueProfile | None = None  # the dask-jobqueue form
    adapt_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mpi: Mapping[str, Any] = field(default_factory=dict)  # this library's form: its mpi section

    @property
    def prefix(self) -> str:
        return self.alloc.job_name_prefix if self.alloc else self.jobqueue.prefix  # type: ignore[union-attr]

    @property
    def start_timeout(self) -> float:
        return self.alloc.start_timeout if self.alloc else 600.0

    def scheduler_host(self) -> str:
        """The address the scheduler listens on ('' = every address, dask's default)."""
        if self.alloc:
            return slurm.scheduler_host(self.alloc)
        interface = cluster_yaml.scheduler_interface(self.jobqueue)  # type: ignore[arg-type]
        if interface:
            return slurm.interface_address(interface)
        return (self.jobqueue.cluster_kwargs.get("scheduler_options") or {}).get("host") or ""  # type: ignore[union-attr]

    def cluster_kwargs(self, job_name: str, log_dir: str, address: str, scheduler_port: int,
                       dashboard_port: int) -> dict[str, Any]:
        """One run's SLURMCluster arguments (pure)."""
        if self.alloc:
            kw = slurm.cluster_kwargs(self.alloc, job_name=job_name, log_directory=log_dir,
                                      env=slurm.job_env(),
                                      dashboard_address=f"{address}:{dashboard_port}")
            kw["scheduler_options"]["port"] = scheduler_port
            if self.adapt_kwargs:
                kw["n_workers"] = 0
            return kw
        return cluster_yaml.harden(self.jobqueue, job_name=job_name, log_directory=log_dir,  # type: ignore[arg-type]
                                   env=slurm.job_env(), scheduler_port=scheduler_port,
                                   dashboard_address=f"{address}:{dashboard_port}")


def plan_for(cluster: str | os.PathLike | Mapping[str, Any],
             overrides: Mapping[str, Any] | None = None) -> Plan:
    """Read and check ``cluster`` (a packaged profile name, a YAML path or a mapping) in either
    form, with ``overrides`` over it. Asks SLURM nothing."""
    if isinstance(cluster, Mapping):
        where, data = "(mapping)", dict(cluster)
    else:
        path, data = load_profile(cluster)
        where = str(path)
    over = dict(overrides or {})
    if cluster_yaml.is_jobqueue_form(data):
        if isinstance(data, Mapping) and {"allocation", "mpi"} & set(data):
            raise SpecError(f"profile {where}: it mixes the dask-jobqueue form (cluster_class, "
                            "cluster_kwargs, adapt_kwargs) with this library's (allocation, "
                            "mpi). Use one form per file.")
        jq = cluster_yaml.read(data, where, over)
        for note in jq.notes:
            log.warning("%s", note)
        return Plan(jobqueue=jq, adapt_kwargs=jq.adapt_kwargs)
    adapt = over.pop(ADAPT, None) or {}
    cluster_yaml._check_adapt(where, adapt)  # noqa: SLF001 - the same checks for both forms
    sections = profile_sections(data, where)
    section = sections["allocation"]
    try:
        alloc = AllocationSpec(**{**section, **{k: v for k, v in over.items() if v is not None}})
    except TypeError as exc:
        raise SpecError(f"allocation (profile {where}): {exc}. Overrides are keys of the "
                        "profile's allocation section, or adapt_kwargs.") from None
    except SpecError as exc:
        raise SpecError(f"allocation (profile {where}): {exc}") from None
    if adapt and alloc.nodes != 1:
        raise SpecError(f"profile {where}: adapt_kwargs scales single-node worker jobs, but the "
                        f"allocation has nodes={alloc.nodes}. Set nodes=1 for the adaptive shape, "
                        "or leave adapt_kwargs out for one job of N nodes (the MPI shape).")
    return Plan(alloc=alloc, adapt_kwargs=dict(adapt), mpi=sections["mpi"])


class RunCluster(SLURMCluster):
    """One flow run's SLURMCluster: its own job name and ports, its jobs tracked and cancelled."""

    def __init__(self, plan: Plan, **kwargs: Any) -> None:
        slurm_query.check_available()
        self.askap_plan = plan
        self.askap_token = uuid.uuid4().hex[:10]
        self.askap_job_name = f"{plan.prefix}-{self.askap_token}"
        self.askap_log_dir = str(host.log_dir())
        host.log_dir().mkdir(parents=True, exist_ok=True)
        address = plan.scheduler_host()
        runners.import_dashboard()
        # SLURM checks the shape once per process: the script with a fixed name and ports
        slurm_query.test_submit(slurm.render_job_script(plan.cluster_kwargs(
            f"{plan.prefix}-check", self.askap_log_dir, address, 0, 0)))
        self._askap_ports = ports.reserve(2, address or "0.0.0.0")
        self._askap_done = False
        self._askap_watch = LostJobWatch("", "", "")  # replaced once the cluster runs
        board.board().track(self.askap_job_name)
        try:
            super().__init__(**plan.cluster_kwargs(
                self.askap_job_name, self.askap_log_dir, address, *self._askap_ports.ports),
                job_cls=jobs.BoardJob, **kwargs)  # type: ignore[arg-type]  # typed an instance
        except BaseException:
            self.askap_release()
            raise

    @property
    def handle(self) -> jobs.RunHandle:
        """The run's job facts, as the watch and the MPI task use them."""
        return jobs.RunHandle(self.askap_token, self.askap_job_name, self.askap_log_dir,
                              self.askap_plan.start_timeout, "slurm", runner=True)

    def askap_release(self) -> None:
        """Cancel every job of this run (by name), untrack it, free its ports. Idempotent."""
        if self._askap_done:
            return
        self._askap_done = True
        try:
            jobs.cancel_named(self.askap_job_name)
        finally:
            board.board().untrack(self.askap_job_name)
            self._askap_ports.release()

    def askap_watch(self) -> None:
        """The MPI shape: a job that ends under the run fails the run's tasks (runner_watch.py).
        Adaptive jobs end by design (adapt scales them down): there Dask moves the work.
        Idempotent: a synchronous ``with`` enters twice (distributed's ``Cluster.__enter__`` runs
        ``__aenter__``; Prefect 3 enters so), and a second watch would outlive the run."""
        if not self.askap_plan.adapt_kwargs and not self._askap_watch.is_alive():
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
    plan = plan_for(cluster, overrides)
    # ignore: Prefect 3 types cluster_class a callable without arguments; it is called with them
    return DaskTaskRunner(cluster_class=RunCluster, cluster_kwargs={"plan": plan},  # type: ignore[arg-type, unused-ignore]
                          adapt_kwargs=dict(plan.adapt_kwargs))
