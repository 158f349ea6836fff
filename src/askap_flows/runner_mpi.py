"""``mpi_task``: an MPI step inside a user's own flow, on the nodes of its task runner's job.

The flow's task runner is ``askap_flows.task_runner(...)`` in the MPI shape (one job of N nodes,
one Dask worker on its first node). Called directly in the flow (not ``.submit()``), the task runs
in the flow's process and hands the step to that worker (``flows.run_mpi``: the program's lines
streamed to the task's log as they come, the spec's timeout, the ranks' check); the job is watched
on the job board meanwhile, so an ``scancel``, a walltime or a lost node fails the task with
SLURM's state within seconds. The worker stays: the flow may run more steps on the same job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task

from . import flows, mpi
from .flow_runner import current_cluster
from .resolve import resolve
from .spec import MPISpec

NOT_ON_RUNNER = (
    "mpi_task runs in a flow whose task_runner is askap_flows.task_runner(...) in the MPI shape "
    "(no adapt_kwargs), called directly in the flow body, not with .submit(): "
    "@flow(task_runner=askap_flows.task_runner('PROFILE')).")


@task(name="mpi-task")
def mpi_task(mpi_spec: MPISpec | Mapping[str, Any] | None = None,
             program: str | None = None) -> dict:
    """Run an MPI program across the nodes of this flow run's job (the MPI-shaped task runner).

    Args:
        mpi_spec: an MPISpec, or a mapping of its fields (over the profile's mpi section when the
            runner's profile is in this library's form).
        program: the MPI executable; default: the packaged hello program (built if missing).

    Returns:
        dict with job_id, nodelist, host, exit_code, seconds, command and ranks.
    """
    cluster = current_cluster()
    if cluster is None or cluster.askap_resolved.adapt_kwargs:
        raise RuntimeError(NOT_ON_RUNNER)
    # over the runner's profile (its mpi section), fitted in its allocation; srun: in its job
    spec = resolve(cluster.askap_resolved, mpi=mpi_spec, launcher="srun",
                   say=get_run_logger().warning).mpi_spec()
    prog, check_ranks = mpi.resolve_program(spec, program)
    return flows.run_mpi.fn(spec, prog, check_ranks, cluster.handle, release_nodes=False)
