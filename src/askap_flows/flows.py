"""Prefect sub-flows. Each invocation builds its own Dask cluster, uses it, and closes it.

``mpi_subflow(...)`` is a plain function: when called it resolves the specs, checks everything that
can be checked before submitting (specs, program, SLURM), builds a fresh task runner, and runs the
``mpi-subflow`` flow with it. Called inside a parent flow it is a sub-flow of that flow.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from prefect import flow, get_run_logger, task

from . import compat, mpi, runners, shell, slurm
from .spec import AllocationSpec, MPISpec, resolve_specs

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = [asdict(r) for r in self.ranks]
        return d


# --------------------------------------------------------------------------- the Dask task
@task(name="mpi-run")
def run_mpi(spec: MPISpec, program: str, check_ranks: bool) -> dict:
    """Launch the MPI step from the Dask worker; stream its output to the Prefect log."""
    logger = get_run_logger()
    argv = mpi.launch_command(spec, program)
    if argv[0] == "mpiexec":
        argv[0] = mpi.find_mpiexec() or _missing("mpiexec", mpi.MPI_INSTALL_HINT)
    elif shutil.which(argv[0]) is None:
        _missing(argv[0], slurm.SLURM_INSTALL_HINT)
    logger.info("launching: %s", " ".join(argv))

    def log_line(stream: str, line: str) -> None:
        (logger.info if stream == "stdout" else logger.warning)("%s", line)

    res = shell.run(argv, on_line=log_line, timeout=spec.timeout, env=mpi.program_env(spec))
    ranks = mpi.parse_ranks(res.stdout)
    if check_ranks or ranks:
        mpi.check_world(ranks, spec)
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "nodelist": os.environ.get("SLURM_JOB_NODELIST"),
        "host": socket.gethostname(),
        "exit_code": res.returncode,
        "seconds": res.seconds,
        "command": argv,
        "ranks": ranks,
    }


def _missing(what: str, hint: str):
    raise FileNotFoundError(f"`{what}` is not on PATH of the Dask worker. {hint}")


# --------------------------------------------------------------------------- the flow
@flow(name="mpi-subflow", validate_parameters=False)
def _mpi_flow(spec: MPISpec, program: str, check_ranks: bool, backend: str,
              job_name: str | None, start_timeout: float) -> MPIRunResult:
    logger = get_run_logger()
    client = compat.current_dask_client()  # Prefect 3 starts the cluster here (and submits the job)
    dashboard = runners.dashboard_url(client)
    if dashboard:
        logger.info("Dask dashboard of this sub-flow: %s", dashboard)
    future = run_mpi.submit(spec, program, check_ranks)
    if backend == "slurm":
        _watch_job(future, job_name, start_timeout, logger)
    data = future.result()
    nodes = slurm.hostnames(data["nodelist"]) if data["nodelist"] else [data["host"]]
    if data["job_id"]:
        logger.info("SLURM job %s ran on %s", data["job_id"], ",".join(nodes))
    return MPIRunResult(
        name=job_name or "local", backend=backend, job_id=data["job_id"], nodes=nodes,
        dashboard=dashboard, exit_code=data["exit_code"], seconds=data["seconds"],
        command=data["command"], ranks=data["ranks"],
    )


def _watch_job(future, job_name: str, start_timeout: float, logger) -> None:
    """Wait for the task while watching its SLURM job: fail clearly when the job cannot start or
    ends underneath the task (cancelled, node failure, walltime) instead of waiting forever."""
    started = time.monotonic()
    seen: slurm.JobState | None = None
    last_poll = 0.0
    while not compat.future_done(future, timeout=1.0):
        now = time.monotonic()
        if now - last_poll < 2.0:
            continue
        last_poll = now
        jobs = slurm.jobs_named(job_name)
        if jobs:
            if seen is None or jobs[0].state != seen.state:
                logger.info("SLURM job %s is %s (%s)", jobs[0].job_id, jobs[0].state,
                            jobs[0].nodelist or jobs[0].reason)
            seen = jobs[0]
            if seen.state == "PENDING" and now - started > start_timeout:
                raise slurm.SlurmError(
                    f"SLURM job {seen.job_id} ({job_name}) was still PENDING after "
                    f"{start_timeout:g} s (reason: {seen.reason}). The cluster may be full or the "
                    "request too large; raise the allocation's start_timeout or ask for less."
                )
        elif seen is not None:
            if compat.future_done(future, timeout=2.0):
                return
            info = slurm.job_info(seen.job_id)
            state = info.get("JobState", "ended")
            reason = info.get("Reason", "unknown")
            raise slurm.SlurmError(
                f"SLURM job {seen.job_id} ({job_name}) on {seen.nodelist or '?'} ended ({state}, "
                f"reason: {reason}) while its sub-flow was still running. Its output is in "
                f"{mpi.askap_home() / 'logs'}/{seen.job_id}.err."
            )
        elif now - started > min(start_timeout, 60.0):
            raise slurm.SlurmError(
                f"no SLURM job named {job_name} appeared within {min(start_timeout, 60.0):g} s: "
                f"the Dask cluster could not submit it. See {mpi.askap_home() / 'logs'} and run "
                "`askap-flows render` with the same profile to check the job script."
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

    Returns:
        MPIRunResult with the SLURM job id and nodes, the exit code and one record per rank.

    Raises:
        SpecError, FileNotFoundError, SlurmError before anything is submitted; CommandError,
        MPIError, SlurmError when the run itself fails. No SLURM job outlives the call.
    """
    alloc, spec = resolve_specs(mpi_spec, allocation, profile, backend)
    prog, check_ranks = mpi.resolve_program(spec, program)
    token = uuid.uuid4().hex[:10]
    job_name = f"{alloc.job_name_prefix}-{token}"
    if backend == "local":
        runner = runners.local_runner(alloc)
        job = None
    else:
        slurm.check_available()
        log_dir = mpi.askap_home() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        kwargs = slurm.run_cluster_kwargs(alloc, job_name, log_dir)
        slurm.test_submit(slurm.render_job_script(kwargs))
        runner = runners.slurm_runner(kwargs)
        job = job_name
    sub = _mpi_flow.with_options(name="mpi-subflow", task_runner=runner,
                                 flow_run_name=name or job_name)
    try:
        return sub(spec=spec, program=prog, check_ranks=check_ranks, backend=backend,
                   job_name=job, start_timeout=alloc.start_timeout)
    finally:
        if job is not None:
            slurm.cancel_named(job)  # safety net: the cluster normally cancelled it already


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

    def one(i: int, call: Callable[[], Any], ctx: contextvars.Context) -> Outcome:
        try:
            outcome = Outcome(i, value=ctx.run(call))
        except Exception as exc:  # noqa: BLE001 - reported per sub-flow
            outcome = Outcome(i, error=exc)
        if on_done is not None:
            on_done(outcome)
        return outcome

    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=min(max_concurrent, len(calls)),
                            thread_name_prefix="askap-subflow") as pool:
        futures = [pool.submit(one, i, c, contextvars.copy_context()) for i, c in enumerate(calls)]
        return [f.result() for f in futures]
