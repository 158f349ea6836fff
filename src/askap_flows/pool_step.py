"""One MPI step in a warm allocation (pool.py), as its own Prefect sub-flow run.

The flow (``mpi-pool-step``) takes over its launch (pool_launch.py: its srun already runs when
nodes were free at the call; otherwise it waits for nodes in the pool's ledger here and starts it),
writes the program's lines to its own log (no task run: ``run_step``), and records the
allocation's job id, the step's SLURM step id (its prolog's line: step_id.py), its nodes and the
pool's dashboard link in ONE table artifact, written while the srun runs (one API request, off
the step's critical path). A step whose node died fails with JobLost naming the node, and the
pool stops using that node.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from . import clusters, runners, slurm, slurm_query, watch
from .flows import MPIRunResult
from .pool import Pool, PoolError, get
from .pool_launch import claim
from .pool_record import record_step
from .spec import MPISpec


def run_step(pool: Pool, step, logger) -> dict:
    """The step's srun (started by pool_launch.py, on the pool's worker): its lines to the flow
    run's log, its record written while it runs, its outcome (JobLost when a node of it died).
    No Prefect task of its own: a task run is 3 more API requests per step on Prefect 2 (create,
    Running, Completed) and 3 events and its engine's work on Prefect 3, for nothing the flow run
    does not show already."""
    step.log.attach(logger)
    future, nodes, recorded = step.future, step.nodes or [], False
    try:
        if named(step, NAMED_WITHIN):  # the UI's record while the srun still runs
            record(pool, step, logger)
            recorded = True
        job = watch.watch_job(future, pool.handle, logger, runners.shutting_down.is_set)
        try:
            data = future.result()
        except Exception as exc:
            step.relayed.wait_for(None, quiet_after=1.0)
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
        step.relayed.wait_for(data["lines"], quiet_after=5.0)
        return {**data, "step_id": step.catcher.step_id}
    except BaseException:  # a timeout or an interrupt: the step must not run on
        step.stop()
        raise
    finally:
        step.close()
        if not recorded and not runners.shutting_down.is_set():
            record(pool, step, logger)


NAMED_WITHIN = 5.0  # seconds a step's record waits for its SLURM step id before the srun's end


def named(step, timeout: float) -> bool:
    """Wait until the step's SLURM step id is known or its srun ended (at most ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not step.catcher.seen.wait(0.02):
        if step.future.done() or time.monotonic() > deadline or runners.shutting_down.is_set():
            return step.future.done()
    return True


def open_pool(pool_name: str) -> Pool:
    pool = get(pool_name)
    if pool is None:
        raise PoolError(f"the pool {pool_name} is closed: run its steps inside its `with` block")
    return pool


def record(pool: Pool, step, logger) -> None:
    """The step's one artifact on its flow run (pool_record.record_step)."""
    try:
        record_step(pool.job_id, step.catcher.step_id, pool.job_name, step.nodes or [],
                    pool.dashboard)
    except Exception as exc:  # noqa: BLE001 - the UI's record must not change the step's outcome
        logger.warning("could not record the step in Prefect: %s", exc)


@flow(name="mpi-pool-step", flow_run_name="{name}", validate_parameters=False)
def pool_step(spec: MPISpec, program: str, check_ranks: bool, pool_name: str, name: str,
              launch_key: str):
    pool, logger = open_pool(pool_name), get_run_logger()
    step = claim(pool, launch_key)
    try:
        try:
            if step.nodes is None:  # it waits for its turn in the pool's queue
                step.start(pool.wait(step.ticket, spec, logger))
            logger.info("step of pool job %s on %s", pool.job_id, ",".join(step.nodes or []))
            data = run_step(pool, step, logger)
        finally:
            pool.release(step.ticket)
    except BaseException:
        step.stop()
        step.close()
        pool.step_ended(ok=False)
        raise
    pool.step_ended(ok=True)
    nodes = step.nodes or []
    return MPIRunResult(
        name=name, backend="slurm", job_id=pool.job_id, nodes=nodes, dashboard=pool.dashboard,
        exit_code=data["exit_code"], seconds=data["seconds"], command=data["command"],
        ranks=data["ranks"], timings={"queue_wait": step.started - step.called,
                                      "srun": data["seconds"], "total": time.time() - step.called},
        step_id=data["step_id"])
