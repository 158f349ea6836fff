"""Prefect sub-flows. Each invocation builds its own Dask cluster, uses it, and closes it.

``mpi_subflow(...)`` is a plain function: when called it resolves the specs, checks everything that
can be checked before submitting (specs, program, SLURM), builds a fresh task runner, and runs the
``mpi-subflow`` flow with it. Called inside a parent flow it is a sub-flow of that flow.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import distributed
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact

from . import compat, launch, mpi, runners, slurm
from .spec import AllocationSpec, MPISpec, excluding_nodes, resolve_allocation, resolve_specs

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = [asdict(r) for r in self.ranks]
        return d


# --------------------------------------------------------------------------- the MPI task
@task(name="mpi-run")
def run_mpi(spec: MPISpec, program: str, check_ranks: bool, backend: str, job_name: str | None,
            start_timeout: float) -> dict:
    """Run the MPI step on this sub-flow's Dask worker (``launch.mpi_step``) and write its output
    to this task's Prefect log as it comes. The task itself runs in the sub-flow's process: the
    worker imports no Prefect, which would cost the job's nodes seconds of start-up."""
    logger = get_run_logger()
    client = compat.current_dask_client()
    topic = f"askap-mpi-{uuid.uuid4().hex}"
    relayed = [0]

    def relay(event) -> None:
        msg = event[1]
        (logger.warning if msg["level"] == "warning" else logger.info)("%s", msg["line"])
        relayed[0] += 1

    client.subscribe_topic(topic, relay)
    future = None
    try:
        future = client.submit(launch.mpi_step, spec, program, check_ranks, topic, pure=False)
        job = _watch_job(future, job_name, start_timeout, logger) if backend == "slurm" else None
        try:
            data = _result(future, job, job_name)
        except Exception:
            _wait_for_lines(relayed, None, quiet_after=1.0)  # whatever of the last lines comes
            raise
        _wait_for_lines(relayed, data["lines"], quiet_after=5.0)
        return data
    finally:
        client.unsubscribe_topic(topic)
        if backend == "slurm" and future is not None and future.done():
            _release_nodes(client, future)


def _release_nodes(client, future) -> None:
    """The MPI step was the job's only work: let its worker leave now, so that the job ends and
    frees its nodes while the sub-flow still records its results (the cluster's close, after
    the flow run, was the first to do so). Best effort: closing the cluster ends the job anyway."""
    try:
        future.release()  # its result is here; Dask retires no worker that holds the only copy
        deadline = time.monotonic() + 2.0
        while any(client.has_what().values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        client.retire_workers(workers=list(client.scheduler_info()["workers"]), close_workers=True)
    except Exception:  # noqa: BLE001
        pass


def _wait_for_lines(relayed: list[int], expected: int | None, quiet_after: float) -> None:
    """Let the step's last lines arrive: until ``expected`` were relayed (None: not known) or
    no line came for ``quiet_after`` s."""
    last, since = relayed[0], time.monotonic()
    while (expected is None or relayed[0] < expected) and time.monotonic() - since < quiet_after:
        time.sleep(0.05)
        if relayed[0] != last:
            last, since = relayed[0], time.monotonic()


def _future_done(future, timeout: float) -> bool:
    """Wait up to ``timeout`` s for a Dask or Prefect task future; True once it has finished."""
    if not isinstance(future, distributed.Future):
        return compat.future_done(future, timeout)
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    return future.done()


def _cancel(future) -> None:
    """Cancel a future whose worker is gone with its job: it would stay pending forever."""
    if isinstance(future, distributed.Future):
        future.cancel()
    else:
        compat.cancel_future(future)


# --------------------------------------------------------------------------- the flow
@flow(name="mpi-subflow", validate_parameters=False)
def _mpi_flow(spec: MPISpec, program: str, check_ranks: bool, backend: str,
              job_name: str | None, start_timeout: float) -> MPIRunResult:
    flow_started = time.time()
    logger = get_run_logger()
    dashboard = _cluster_started(job_name, logger)
    cluster_ready = time.time()
    data = run_mpi(spec, program, check_ranks, backend, job_name, start_timeout)
    nodes = slurm.hostnames(data["nodelist"]) if data["nodelist"] else [data["host"]]
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


def _phases(called: float, invoked: float, marks: Mapping[str, float], srun: float,
            returned: float) -> dict:
    """Where a sub-flow's time went, in seconds. Prefect 2 starts the cluster (and submits its job)
    before the flow body, so there it is part of prefect_start and cluster_start is ~0."""
    srun_ended = marks["srun_started"] + srun
    return {
        "checks": invoked - called,  # specs, program, sinfo, sbatch --test-only, ports
        "prefect_start": marks["flow_started"] - invoked,  # flow run created and started
        "cluster_start": marks["cluster_ready"] - marks["flow_started"],  # Dask cluster, job sbatch
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
        create_link_artifact(link=dashboard, link_text="Dask dashboard", description=description)
    return dashboard


def _record_job(job_id: str, job_name: str | None, nodes: list[str], dashboard: str | None) -> None:
    """The SLURM job of this sub-flow run, as a table on the flow run (visible in the Prefect UI)."""
    create_table_artifact(
        table=[{"slurm_job_id": job_id, "job_name": job_name or "", "nodes": ",".join(nodes),
                "dashboard": dashboard or ""}],
        description=f"SLURM job {job_id} of this sub-flow",
    )


def _watch_job(future, job_name: str, start_timeout: float, logger) -> tuple[str, list[str]] | None:
    """Wait for the task while watching its SLURM job: fail clearly when the job cannot start or
    ends underneath the task (cancelled, node failure, walltime) instead of waiting forever.
    Returns the job's id and nodes once the task has finished (None if the job was never seen)."""
    started = time.monotonic()
    seen: slurm.JobState | None = None
    nodes: list[str] = []
    last_poll = 0.0
    while not _future_done(future, timeout=1.0):
        if runners.shutting_down.is_set():
            raise RuntimeError(f"the pipeline is shutting down: job {job_name} was cancelled")
        now = time.monotonic()
        if now - last_poll < 2.0:
            continue
        last_poll = now
        # only the job first seen counts: dask-jobqueue may submit a replacement of the same name
        jobs = [j for j in slurm.jobs_named(job_name) if seen is None or j.job_id == seen.job_id]
        if jobs:
            if seen is None or jobs[0].state != seen.state:
                logger.info("SLURM job %s is %s (%s)", jobs[0].job_id, jobs[0].state,
                            jobs[0].nodelist or jobs[0].reason)
            seen = jobs[0]
            if seen.state == "RUNNING" and not nodes:
                nodes = slurm.hostnames(seen.nodelist)
            if seen.state == "PENDING" and now - started > start_timeout:
                raise slurm.SlurmError(
                    f"SLURM job {seen.job_id} ({job_name}) was still PENDING after "
                    f"{start_timeout:g} s (reason: {seen.reason}). The cluster may be full or the "
                    "request too large; raise the allocation's start_timeout or ask for less."
                )
        elif seen is not None:
            if _future_done(future, timeout=2.0):
                break
            _cancel(future)
            raise _job_lost(seen.job_id, job_name, nodes)
        elif now - started > min(start_timeout, 60.0):
            raise slurm.SlurmError(
                f"no SLURM job named {job_name} appeared within {min(start_timeout, 60.0):g} s: "
                f"the Dask cluster could not submit it. See {mpi.askap_home() / 'logs'} and run "
                "`askap-flows render` with the same profile to check the job script."
            )
    return (seen.job_id, nodes) if seen is not None else None


def _job_lost(job_id: str, job_name: str, nodes: list[str]) -> slurm.JobLost:
    return slurm.job_lost(job_id, job_name, nodes,
                          f"{mpi.askap_home() / 'logs'}/{job_name}-{job_id}.err")


def _result(future, job: tuple[str, list[str]] | None, job_name: str | None):
    """The task's result; a task that failed because its job ended or lost a node (walltime,
    node failure, scancel) raises JobLost saying so, not the launcher's or Dask's own error."""
    try:
        return future.result()
    except Exception as exc:
        if job is None or job_name is None:
            raise
        job_id, nodes = job
        state = slurm.job_info(job_id).get("JobState", "ENDED")
        deadline = time.monotonic() + 10
        while state == "RUNNING" and "already completing or completed" in str(exc) \
                and time.monotonic() < deadline:  # srun learns that the job ends before squeue
            time.sleep(1)
            state = slurm.job_info(job_id).get("JobState", "ENDED")
        if state in ("RUNNING", "COMPLETED") and not slurm.node_problems(nodes):
            raise  # the program itself failed: its own error says why
        lost = _job_lost(job_id, job_name, nodes)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        lost.args = (f"{lost.args[0]} The task's own error: {type(exc).__name__}: {first}",)
        raise lost from exc


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

    Returns:
        MPIRunResult with the SLURM job id and nodes, the exit code, one record per rank, and
        ``timings``: seconds spent starting Prefect, the cluster, waiting for the worker, in the
        MPI step and in teardown.

    Raises:
        SpecError, FileNotFoundError, SlurmError before anything is submitted; CommandError,
        MPIError, SlurmError when the run itself fails. No SLURM job outlives the call.
    """
    called = time.time()
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise TypeError(f"retries must be a whole number >= 0, got {retries!r}.")
    alloc, spec = resolve_specs(mpi_spec, allocation, profile, backend)
    prog, check_ranks = mpi.resolve_program(spec, program)
    if backend == "slurm":
        slurm.check_available()
    attempt = 0
    while True:
        label = name and (f"{name}-retry{attempt}" if attempt else name)
        try:
            with runners.cluster_for_run(alloc, backend) as run:
                sub = _mpi_flow.with_options(task_runner=run.runner,
                                             flow_run_name=label or run.job_name or f"mpi-{run.token}")
                invoked = time.time()
                result = sub(spec=spec, program=prog, check_ranks=check_ranks, backend=backend,
                             job_name=run.job_name, start_timeout=alloc.start_timeout)
            result.timings = _phases(called, invoked, result.timings, result.seconds, time.time())
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
def _array_flow(n_arrays: int, size: int, seed: int, backend: str, job_name: str | None,
                start_timeout: float, name: str) -> ArrayResult:
    logger = get_run_logger()
    dashboard = _cluster_started(job_name, logger)
    total = make_array.submit(seed, size)
    for i in range(1, n_arrays):
        total = add_arrays.submit(total, make_array.submit(seed + i, size))
    future = mean_of.submit(total)
    job = _watch_job(future, job_name, start_timeout, logger) if backend == "slurm" else None
    data = _result(future, job, job_name)
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
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TypeError(f"{field_name} must be a whole number >= 1, got {value!r}.")
    over = {"nodes": 1, "ntasks_per_node": 1}
    if isinstance(allocation, Mapping):
        over.update(allocation)
    alloc = resolve_allocation(allocation if isinstance(allocation, AllocationSpec) else over,
                               profile, backend)
    if backend == "slurm":
        slurm.check_available()
    with runners.cluster_for_run(alloc, backend) as run:
        label = name or run.job_name or f"array-{run.token}"
        sub = _array_flow.with_options(task_runner=run.runner, flow_run_name=label)
        return sub(n_arrays=n_arrays, size=size, seed=seed, backend=backend,
                   job_name=run.job_name, start_timeout=alloc.start_timeout, name=label)


# --------------------------------------------------------------------------- composition
@dataclass
class Outcome:
    """The result of one sub-flow call in ``run_subflows``: a value, or the error it raised."""

    index: int
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_subflows(
    calls: Sequence[Callable[[], Any]],
    max_concurrent: int = 4,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run sub-flow calls concurrently, at most ``max_concurrent`` at once; results in order.

    A failing call does not stop the others: its Outcome carries the exception. Called inside a
    flow, each call becomes a sub-flow run of it (the flow context is copied into each thread).
    ``on_done(outcome)`` is called as each one finishes (for progress output).
    """
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
        raise ValueError(f"max_concurrent must be a whole number >= 1, got {max_concurrent!r}.")
    calls = list(calls)
    for i, c in enumerate(calls):
        if not callable(c):
            raise TypeError(f"calls[{i}] is {type(c).__name__}, not a callable (use functools.partial).")
    limit = compat.MAX_CONCURRENT_SUBFLOWS
    if limit is not None and max_concurrent > limit and len(calls) > limit:
        logging.getLogger("askap_flows").warning(
            "running at most %d of the %d sub-flows at once, not %d: Prefect %s runs every flow "
            "run on one event-loop thread and stalled with 140 at once (benchmarks/README.md). "
            "Prefect 3 has no such limit.", limit, len(calls), max_concurrent, compat.PREFECT_VERSION)
        max_concurrent = limit

    def one(i: int, call: Callable[[], Any], ctx: contextvars.Context) -> Outcome:
        if runners.shutting_down.is_set():
            return Outcome(i, error=RuntimeError("not started: the pipeline is shutting down"))
        try:
            outcome = Outcome(i, value=ctx.run(call))
        except Exception as exc:  # noqa: BLE001 - reported per sub-flow
            outcome = Outcome(i, error=exc)
        if on_done is not None:
            on_done(outcome)
        return outcome

    if not calls:
        return []
    runners.begin_composition()  # an earlier composition's interrupt is over, not a new one
    pool = ThreadPoolExecutor(max_workers=min(max_concurrent, len(calls)),
                              thread_name_prefix="askap-subflow")
    futures = [pool.submit(one, i, c, contextvars.copy_context()) for i, c in enumerate(calls)]
    try:
        results = [f.result() for f in futures]
    except BaseException:  # Ctrl-C, SIGTERM, SystemExit: cancel every job, leave nothing running
        runners.cancel_everything()
        # no waiting here: under Prefect 2 the running sub-flows wait for this thread's flow
        # engine, so joining them would deadlock; with their jobs cancelled they end by themselves
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        runners.end_composition()
    pool.shutdown(wait=True)
    return results
