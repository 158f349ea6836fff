"""``mpi_task``: an MPI step inside a user's own flow, on the nodes of its task runner's job.

The flow's task runner is ``askap_flows.task_runner(...)`` in the MPI shape (one job of N nodes,
one Dask worker on its first node). Called directly in the flow (not ``.submit()``), the task runs
in the flow's process and hands the step to that worker (``flows.run_mpi``: the program's lines
streamed to the task's log as they come, the spec's timeout, the ranks' check); the job is watched
on the job board meanwhile, so an ``scancel``, a walltime or a lost node fails the task with
SLURM's state within seconds. The worker stays: the flow may run more steps on the same job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from prefect import task

from . import flows, mpi
from .flow_runner import current_cluster
from .spec import MPISpec, SpecError, check_fits

NOT_ON_RUNNER = (
    "mpi_task runs in a flow whose task_runner is askap_flows.task_runner(...) in the MPI shape "
    "(no adapt_kwargs), called directly in the flow body, not with .submit(): "
    "@flow(task_runner=askap_flows.task_runner('PROFILE')).")


def resolve(given: MPISpec | Mapping[str, Any] | None, section: Mapping[str, Any]) -> MPISpec:
    """The step's MPISpec: a given one, or a mapping over the profile's mpi section (a mapping
    with nodes or ntasks but no ntasks_per_node drops the profile's ntasks_per_node)."""
    if isinstance(given, MPISpec):
        return given
    over = dict(given or {})
    if ("nodes" in over or "ntasks" in over) and "ntasks_per_node" not in over:
        section = {k: v for k, v in section.items() if k != "ntasks_per_node"}  # a new layout
    try:
        spec = MPISpec(**{**section, **over})
    except TypeError as exc:
        raise SpecError(f"mpi_task: {exc}. Valid keys: "
                        f"{', '.join(f.name for f in dataclasses.fields(MPISpec))}.") from None
    if spec.launcher != "srun":  # the step runs inside the SLURM job: srun uses its nodes
        spec = dataclasses.replace(spec, launcher="srun")
    return spec


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
    if cluster is None or cluster.askap_plan.adapt_kwargs:
        raise RuntimeError(NOT_ON_RUNNER)
    plan = cluster.askap_plan
    spec = resolve(mpi_spec, plan.mpi)
    if plan.alloc is not None:
        check_fits(spec, plan.alloc)
    prog, check_ranks = mpi.resolve_program(spec, program)
    return flows.run_mpi.fn(spec, prog, check_ranks, cluster.handle, release_nodes=False)
