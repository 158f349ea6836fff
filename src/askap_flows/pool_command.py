"""What a pool submits and runs (pure): its job's SLURMCluster arguments, and each step's srun."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import mpi, slurm
from .spec import AllocationSpec, MPISpec


def step_cpus(spec: MPISpec) -> int:
    """CPUs a step takes on each of its nodes: its ranks per node x cpus_per_task."""
    per_node = spec.ntasks_per_node or -(-spec.ntasks // spec.nodes)
    return per_node * (spec.cpus_per_task or 1)


def step_spec(spec: MPISpec, nodes: list[str], prolog: Path | None = None) -> MPISpec:
    """The spec of a step inside the pool's job: srun on exactly the assigned nodes and CPUs;
    with the pool's ``--prolog`` (step_id.py), which names the step in its output."""
    extra: tuple[str, ...] = ("--exact", f"--nodelist={','.join(nodes)}")
    if prolog is not None:
        extra += (f"--prolog={prolog}",)
    return dataclasses.replace(spec, launcher="srun", launcher_args=extra + spec.launcher_args)


def step_command(spec: MPISpec, program: str, nodes: list[str],
                 prolog: Path | None = None) -> list[str]:
    """The command line a pooled step runs (what ``launch.mpi_step`` will run for it)."""
    return mpi.launch_command(step_spec(spec, nodes, prolog), program)


def pool_cluster_kwargs(alloc: AllocationSpec, job_name: str, log_dir, ports_=(0, 0)) -> dict:
    """SLURMCluster arguments of the pool's job: a sub-flow's, plus ``--no-kill`` (a dead node
    fails only the steps on it) and a worker thread for every step that can run at once."""
    cpus = alloc.ntasks_per_node * alloc.cpus_per_task
    alloc = dataclasses.replace(alloc, cores=max(alloc.cores, alloc.nodes * cpus))
    kwargs = slurm.run_cluster_kwargs(alloc, job_name, log_dir, scheduler_port=ports_[0],
                                      dashboard_port=ports_[1])
    kwargs["job_extra_directives"] = ["--no-kill"] + kwargs["job_extra_directives"]
    return kwargs
