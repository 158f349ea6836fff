"""One MPI step in a warm allocation (pool.py), as its own Prefect sub-flow run.

The flow (``mpi-pool-step``) waits for nodes in the pool's ledger, runs the step from a Dask task
on the pool's worker (``launch.mpi_step`` with ``srun --exact --nodelist ... --prolog ...``),
writes its lines to the task's log, and records the allocation's job id, the step's SLURM step id
(its prolog's line: step_id.py), its nodes and the pool's dashboard. A step whose node died fails
with JobLost naming the node, and the pool stops using that node.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact

from . import clusters, launch, runners, slurm, slurm_query, watch
from .flows import MPIRunResult
from .mpi_run import LineCount, job_ended, stop_step
from .pool import Pool, PoolError, get
from .pool_command import step_spec
from .pool_record import record_step
from .spec import MPISpec
from .step_id import StepIdCatcher


@task(name="mpi-pool-run")
def run_step(spec: MPISpec, program: str, check_ranks: bool, pool_name: str,
             nodes: list[str]) -> dict:
    """The step, launched from a Dask task on the pool's worker; its lines to this task's log."""
    pool, logger = open_pool(pool_name), get_run_logger()
    topic, relayed, step = f"askap-mpi-{uuid.uuid4().hex}", LineCount(), StepIdCatcher()
    pool.client.subscribe_topic(topic, step.wrap(relayed.relay_to(logger), logger, relayed.add))
    future = None
    try:
        future = pool.client.submit(launch.mpi_step, step_spec(spec, nodes, pool.prolog), program,
                                    check_ranks, topic, pure=False)
        job = watch.watch_job(future, pool.handle, logger, runners.shutting_down.is_set)
        try:
            data = future.result()
        except Exception as exc:
            relayed.wait_for(None, quiet_after=1.0)
            on = job.cluster if job else clusters.members(pool.alloc.clusters)[0]
            failed, _ = slurm_query.node_problems(nodes, on)
            if not failed:
                return watch.result(future, job, pool.handle)  # the program's error, or the job's
            pool.drop(list(failed))
            which = "; ".join(f"{n} is {p}" for n, p in failed.items())
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise slurm.JobLost(
                f"the MPI step on {','.join(nodes)} in pool job {pool.job_id} ({pool.job_name}) "
                f"lost node(s) {','.join(failed)} ({which}). The pool no longer uses them; pass "
                "retries=N to mpi_subflow to re-run the step on the pool's other nodes. The "
                f"task's own error: {type(exc).__name__}: {first}", job_id=pool.job_id,
                state="NODE_FAIL", reason=which, nodes=nodes, failed_nodes=list(failed)) from exc
        relayed.wait_for(data["lines"], quiet_after=5.0)
        return {**data, "step_id": step.step_id}
    except BaseException:  # a timeout or an interrupt: the step must not run on
        if future is not None and not future.done():
            stop_step(pool.client, future, topic, relayed, job_ended(pool.handle))
        raise
    finally:
        pool.client.unsubscribe_topic(topic)


def open_pool(pool_name: str) -> Pool:
    pool = get(pool_name)
    if pool is None:
        raise PoolError(f"the pool {pool_name} is closed: run its steps inside its `with` block")
    return pool


def link_dashboard(pool: Pool, logger) -> None:
    """The pool's Dask dashboard as a link artifact on the step's flow run."""
    if not pool.dashboard:
        return
    try:
        create_link_artifact(  # type: ignore[unused-coroutine, unused-ignore]
            link=pool.dashboard, link_text="Dask dashboard (pool)",
            description=f"Dask dashboard of pool job {pool.job_id}.")
    except Exception as exc:  # noqa: BLE001 - the UI's record must not change the step's outcome
        logger.warning("could not record the pool's dashboard link: %s", exc)


@flow(name="mpi-pool-step", flow_run_name="{name}", validate_parameters=False)
def pool_step(spec: MPISpec, program: str, check_ranks: bool, pool_name: str, name: str):
    called = time.time()
    pool, logger = open_pool(pool_name), get_run_logger()
    try:
        ticket, nodes = pool.acquire(spec, logger)
        started = time.time()
        try:
            logger.info("step of pool job %s on %s", pool.job_id, ",".join(nodes))
            data = run_step(spec, program, check_ranks, pool_name, nodes)
        finally:
            pool.release(ticket)
    except BaseException:
        pool.step_ended(ok=False)
        raise
    finally:  # once the nodes are free again: the next step does not wait for the API
        link_dashboard(pool, logger)
    pool.step_ended(ok=True)
    record_step(pool.job_id, data["step_id"], pool.job_name, nodes, pool.dashboard)
    return MPIRunResult(
        name=name, backend="slurm", job_id=pool.job_id, nodes=nodes, dashboard=pool.dashboard,
        exit_code=data["exit_code"], seconds=data["seconds"], command=data["command"],
        ranks=data["ranks"], timings={"queue_wait": started - called, "srun": data["seconds"],
                                      "total": time.time() - called}, step_id=data["step_id"])
