"""Prefect sub-flows. Each invocation builds its own Dask cluster, uses it, and closes it.

``mpi_subflow(...)`` is a plain function: when called it resolves the specs, checks everything that
can be checked before submitting (specs, program, SLURM), builds a fresh task runner, and runs the
``mpi-subflow`` flow with it. Called inside a parent flow it is a sub-flow of that flow.
Its MPI step is ``mpi_task`` (:mod:`askap_flows.mpi_run`), the task users' own flows call on an
MPI-shaped task runner, here on the cluster the sub-flow built; ``run_subflows`` (many sub-flow
calls at once) is in :mod:`askap_flows.composition`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact

from . import compat, mpi, runners, slurm, slurm_query, watch
from .jobs import RunHandle
from .mpi_run import mpi_task
from .resolve import resolve
from .spec import AllocationSpec, MPISpec, excluding_nodes, whole_number


@dataclass
class MPIRunResult:
    """What one MPI sub-flow did."""

    name: str
    backend: str
    job_id: str | None
    nodes: list[str]
    dashboard: str | None
    exit_code: int
    seconds: float
    command: list[str]
    ranks: list[mpi.RankRecord] = field(default_factory=list)
    #: seconds per phase: checks, prefect_start, cluster_start, worker_wait, srun, teardown, total
    timings: dict[str, float] = field(default_factory=dict)
    #: the SLURM job step ``J.S`` of a step run in an allocation pool (None otherwise)
    step_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = [asdict(r) for r in self.ranks]
        return d


# --------------------------------------------------------------------------- the flow
@flow(name="mpi-subflow", validate_parameters=False)
def _mpi_flow(spec: MPISpec, program: str, check_ranks: bool, run: RunHandle) -> MPIRunResult:
    flow_started = time.time()
    logger = get_run_logger()
    backend, job_name = run.backend, run.job_name
    dashboard = _cluster_started(job_name, logger)
    cluster_ready = time.time()
    # the packaged hello program (check_ranks) is the default program: mpi_task finds it again
    data = mpi_task(spec, None if check_ranks else program)
    nodes = slurm_query.hostnames(data["nodelist"]) if data["nodelist"] else [data["host"]]
    if data["job_id"]:
        logger.info("SLURM job %s ran on %s", data["job_id"], ",".join(nodes))
        _record_job(data["job_id"], job_name, nodes, dashboard)
    return MPIRunResult(
        name=job_name or "local", backend=backend, job_id=data["job_id"], nodes=nodes,
        dashboard=dashboard, exit_code=data["exit_code"], seconds=data["seconds"],
        command=data["command"], ranks=data["ranks"],
        timings={"flow_started": flow_started, "cluster_ready": cluster_ready,
                 "srun_started": data["srun_started"]},
    )


def _phases(called: float, entered: float, invoked: float, marks: Mapping[str, float],
            srun: float, returned: float) -> dict:
    """Where a sub-flow's time went, in seconds. Prefect 3 builds a SLURM cluster (and submits its
    job) before the flow run is created (``entered`` to ``invoked``); Prefect 2 starts it before
    the flow body, so there it is part of prefect_start and cluster_start is ~0."""
    srun_ended = marks["srun_started"] + srun
    return {
        "checks": entered - called,  # specs, program, sinfo
        "prefect_start": marks["flow_started"] - invoked,  # flow run created and started
        # sbatch --test-only, ports, Dask cluster, job sbatch; the client connecting in the flow run
        "cluster_start": invoked - entered + marks["cluster_ready"] - marks["flow_started"],
        "worker_wait": marks["srun_started"] - marks["cluster_ready"],  # job queued -> task running
        "srun": srun,
        "teardown": returned - srun_ended,  # result back, flow run ended, cluster closed, job gone
        "total": returned - called,
    }


def _cluster_started(job_name: str | None, logger) -> str | None:
    """Start (Prefect 3) or get (Prefect 2) this run's cluster; log and record its dashboard."""
    client = compat.current_dask_client()  # Prefect 3 starts the cluster here (and submits the job)
    dashboard = runners.dashboard_url(client)
    if dashboard:
        logger.info("Dask dashboard of this sub-flow: %s", dashboard)
        description = f"Dask dashboard of this sub-flow's cluster (SLURM job name `{job_name}`)." \
            if job_name else "Dask dashboard of this sub-flow's local cluster."
        # ignore: Prefect 2 types it a coroutine; its @sync_compatible runs it here, synchronously
        create_link_artifact(link=dashboard, link_text="Dask dashboard", description=description)  # type: ignore[unused-coroutine, unused-ignore]
    return dashboard


def _record_job(job_id: str, job_name: str | None, nodes: list[str], dashboard: str | None) -> None:
    """The SLURM job of this sub-flow run, as a table on the flow run (shown in the Prefect UI)."""
    # ignore: Prefect 2 types it a coroutine; its @sync_compatible runs it here, synchronously
    create_table_artifact(  # type: ignore[unused-coroutine, unused-ignore]
        table=[{"slurm_job_id": job_id, "job_name": job_name or "", "nodes": ",".join(nodes),
                "dashboard": dashboard or ""}],
        description=f"SLURM job {job_id} of this sub-flow",
    )


# --------------------------------------------------------------------------- public sub-flow
def mpi_subflow(
    mpi_spec: MPISpec | Mapping[str, Any] | None = None,
    allocation: AllocationSpec | Mapping[str, Any] | None = None,
    *,
    backend: str = "local",
    profile: str | os.PathLike | None = None,
    program: str | None = None,
    name: str | None = None,
    retries: int = 0,
    pool=None,
) -> MPIRunResult:
    """Run an MPI program as a Prefect sub-flow on a Dask cluster built for this call.

    Args:
        mpi_spec: an MPISpec, or a mapping of MPISpec fields layered over the profile.
        allocation: an AllocationSpec, or a mapping of AllocationSpec fields over the profile.
        backend: "local" (LocalCluster + mpiexec) or "slurm" (SLURMCluster + srun).
        profile: packaged profile name or YAML path (default: "local" for the local backend,
            $ASKAP_FLOWS_PROFILE otherwise).
        program: the MPI executable; default: the packaged hello program (built if missing).
        name: the flow run name (default: the SLURM job name).
        retries: how often to re-run the sub-flow when its SLURM job loses a node (NODE_FAIL, or
            a node SLURM reports down): each retry is a new sub-flow run on a new cluster, whose
            job excludes the failed nodes (``--exclude``). A failing program, a cancel or a
            walltime is not retried.
        pool: an open ``askap_flows.allocation(...)`` pool: run the step as an ``srun`` job step
            on nodes of the pool's held job instead of building a cluster (``allocation`` and
            ``backend`` are then not used; retries re-run on the pool's remaining nodes).

    Returns:
        MPIRunResult with the SLURM job id and nodes, the exit code, one record per rank, and
        ``timings``: seconds spent starting Prefect, the cluster, waiting for the worker, in the
        MPI step and in teardown.

    Raises:
        SpecError, FileNotFoundError, SlurmError before anything is submitted; CommandError,
        MPIError, SlurmError when the run itself fails. No SLURM job outlives the call.
    """
    called = time.time()
    whole_number("retries", retries, minimum=0)
    if pool is not None:  # a warm allocation (pool.py)
        return pool.run_mpi(mpi_spec, program=program, name=name, retries=retries)
    resolved = resolve(profile, backend=backend, allocation=allocation, mpi=mpi_spec)
    alloc, spec = resolved.allocation_spec(), resolved.mpi_spec()
    prog, check_ranks = mpi.resolve_program(spec, program)
    if backend == "slurm":
        slurm_query.check_available(alloc.clusters)
    attempt = 0
    while True:
        label = name and (f"{name}-retry{attempt}" if attempt else name)
        try:
            entered = time.time()
            with runners.cluster_for_run(alloc, backend, step=resolved) as run:
                run_name = label or run.job_name or f"mpi-{run.token}"
                # ignore: Prefect 3 types task_runner TaskRunner[PrefectFuture], not a Dask one
                sub = _mpi_flow.with_options(task_runner=run.runner, flow_run_name=run_name)  # type: ignore[arg-type, unused-ignore]
                invoked = time.time()
                result = sub(spec=spec, program=prog, check_ranks=check_ranks, run=run.handle)
            result.timings = _phases(called, entered, invoked, result.timings, result.seconds,
                                     time.time())
            return result
        except slurm.JobLost as exc:
            if attempt == retries or not exc.retryable or runners.shutting_down.is_set():
                raise
            alloc = excluding_nodes(alloc, exc.failed_nodes)
            logging.getLogger("askap_flows").warning(
                "sub-flow %s: SLURM job %s lost node(s) %s; retry %d of %d on a new allocation%s",
                name or run.job_name, exc.job_id, ",".join(exc.failed_nodes) or "?", attempt + 1,
                retries, f" excluding {','.join(exc.failed_nodes)}" if exc.failed_nodes else "")
            attempt += 1


# --------------------------------------------------------------------------- array sub-flow
@task(name="make-array")
def make_array(seed: int, size: int):
    import numpy as np

    return np.random.default_rng(seed).random(size)


@task(name="add-arrays")
def add_arrays(a, b):
    return a + b


@task(name="mean")
def mean_of(x) -> dict:
    return {"mean": float(x.mean()), "job_id": os.environ.get("SLURM_JOB_ID"),
            "host": socket.gethostname()}


@dataclass
class ArrayResult:
    """What one array sub-flow computed: the mean of the element-wise sum of its arrays."""

    name: str
    backend: str
    mean: float
    n_arrays: int
    size: int
    job_id: str | None
    dashboard: str | None


@flow(name="array-subflow", validate_parameters=False)
def _array_flow(n_arrays: int, size: int, seed: int, run: RunHandle, name: str) -> ArrayResult:
    logger = get_run_logger()
    backend, job_name = run.backend, run.job_name
    dashboard = _cluster_started(job_name, logger)
    total = make_array.submit(seed, size)
    for i in range(1, n_arrays):
        total = add_arrays.submit(total, make_array.submit(seed + i, size))
    future = mean_of.submit(total)
    job = watch.watch_job(future, run, logger, runners.shutting_down.is_set) \
        if backend == "slurm" else None
    data = watch.result(future, job, run)
    if data["job_id"]:
        _record_job(data["job_id"], job_name, [data["host"]], dashboard)
    return ArrayResult(name=name, backend=backend, mean=data["mean"], n_arrays=n_arrays, size=size,
                       job_id=data["job_id"], dashboard=dashboard)


def array_subflow(
    n_arrays: int = 4,
    size: int = 100_000,
    *,
    seed: int = 0,
    allocation: AllocationSpec | Mapping[str, Any] | None = None,
    backend: str = "local",
    profile: str | os.PathLike | None = None,
    name: str | None = None,
) -> ArrayResult:
    """Array work (random arrays, element-wise sum, mean) on a Dask cluster built for this call.

    The same composition rules as ``mpi_subflow``: its own cluster (on SLURM a one-node job unless
    ``allocation`` says otherwise), closed when it ends.
    """
    for field_name, value in (("n_arrays", n_arrays), ("size", size)):
        whole_number(field_name, value)
    over = {"nodes": 1, "ntasks_per_node": 1}
    if isinstance(allocation, Mapping):
        over.update(allocation)
    alloc = resolve(profile, backend=backend, step=False, allocation=allocation if isinstance(
        allocation, AllocationSpec) else over).allocation_spec()
    if backend == "slurm":
        slurm_query.check_available(alloc.clusters)
    with runners.cluster_for_run(alloc, backend) as run:
        label = name or run.job_name or f"array-{run.token}"
        # ignore: Prefect 3 types task_runner TaskRunner[PrefectFuture], not a Dask one
        sub = _array_flow.with_options(task_runner=run.runner, flow_run_name=label)  # type: ignore[arg-type, unused-ignore]
        return sub(n_arrays=n_arrays, size=size, seed=seed, run=run.handle, name=label)
