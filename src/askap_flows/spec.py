"""What a sub-flow needs: the SLURM allocation and the MPI layout, validated at construction.

Specs are frozen dataclasses. Every rule is checked when a spec is built, with a message that names
the field and the fix, so that nothing is submitted to SLURM when the request cannot work.

Profiles (YAML files that give these fields) are read by :mod:`askap_flows.spec_profile`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import values
from .errors import AskapFlowsError

# srun --mpi= plugins: MPICH pmi2; Open MPI pmix (or a versioned pmix_vN);
# HPE Cray MPICH cray_shasta
MPI_PLUGINS = ("pmi2", "pmix", "pmix_v3", "pmix_v4", "pmix_v5", "cray_shasta", "none")
LAUNCHERS = ("srun", "mpiexec")


class SpecError(AskapFlowsError, ValueError):
    """A spec or profile that cannot work; the message says which field and how to fix it."""


def whole_number(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is a whole number >= ``minimum`` (not a bool), else SpecError naming it.

    The one check for every count askap_flows takes (nodes, ranks, retries, sub-flows, ...).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    return value


_WALLTIME = re.compile(
    r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"  # D-HH[:MM[:SS]]
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"  # MM | MM:SS | HH:MM:SS
)


def walltime_seconds(text: str) -> int:
    """Seconds in a SLURM time string: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = _WALLTIME.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise SpecError(
            f"walltime {text!r} is not a SLURM time. Use one of MM, MM:SS, HH:MM:SS, D-HH, "
            "D-HH:MM, D-HH:MM:SS (for example '01:30:00' for 90 minutes)."
        )
    g = {k: int(v) if v else 0 for k, v in m.groupdict().items()}
    if m.group("d") is not None:
        return ((g["d"] * 24 + g["dh"]) * 60 + g["dm"]) * 60 + g["ds"]
    if m.group("c") is not None:
        return (g["a"] * 60 + g["b"]) * 60 + g["c"]
    return g["a"] * 60 + g["b"]


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    whole_number(name, value)


def _str_tuple(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise SpecError(f"{name} must be a list of strings, got the single string {value!r}.")
    out = tuple(value)
    for item in out:
        if not isinstance(item, str):
            raise SpecError(f"{name} must be a list of strings; {item!r} is not a string.")
    return out


#: AllocationSpec fields written into the job script, checked by values.RULES (with the lists
#: prologue and extra_directives, and the walltime, checked on their own)
SCRIPT_FIELDS = ("partition", "account", "qos", "reservation", "clusters", "constraint",
                 "interface", "scheduler_interface", "job_name_prefix", "memory", "python",
                 "local_directory")


@dataclass(frozen=True)
class AllocationSpec:
    """The one SLURM job a sub-flow's Dask cluster submits (its worker runs on the first node)."""

    nodes: int = 1
    ntasks_per_node: int = 1
    cpus_per_task: int = 1
    cores: int = 1  # Dask worker threads
    memory: str = "1GB"  # per node, for the job and the Dask worker
    walltime: str = "00:30:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    reservation: str | None = None
    clusters: str | None = None  # sbatch -M
    constraint: str | None = None
    exclusive: bool = False
    job_name_prefix: str = "askapflows"
    interface: str | None = None  # network interface of the Dask worker on the compute node
    scheduler_interface: str | None = None  # interface the scheduler listens on (submit host)
    prologue: tuple[str, ...] = ()  # job-script lines before the worker starts
    python: str | None = None  # Python on the compute nodes; default: this interpreter
    local_directory: str | None = None
    extra_directives: tuple[str, ...] = ()  # more '#SBATCH' options, e.g. '--gres=gpu:1'
    start_timeout: float = 600.0  # seconds from submit until the worker must have connected

    def __post_init__(self) -> None:
        for name in ("nodes", "ntasks_per_node", "cpus_per_task", "cores"):
            _positive(name, getattr(self, name))
        if isinstance(self.walltime, int) and not isinstance(self.walltime, bool):
            object.__setattr__(self, "walltime", str(self.walltime))  # YAML `walltime: 30`
        walltime_seconds(self.walltime)
        if not (isinstance(self.start_timeout, (int, float)) and self.start_timeout > 0):
            raise SpecError(
                f"start_timeout must be a number of seconds > 0, got {self.start_timeout!r}.")
        for name in ("python", "local_directory"):  # paths: given as str or os.PathLike
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        for name in ("prologue", "extra_directives"):
            object.__setattr__(self, name, _str_tuple(name, getattr(self, name)))
            said = values.problems(name, getattr(self, name))
            if said:
                raise SpecError(said)
        for name in SCRIPT_FIELDS:  # every other value that reaches the job script
            value = getattr(self, name)
            said = None if value is None else values.problem(name, value)
            if said:
                raise SpecError(said)

    @property
    def total_tasks(self) -> int:
        return self.nodes * self.ntasks_per_node


@dataclass(frozen=True)
class MPISpec:
    """How the MPI program is launched inside the allocation."""

    nodes: int = 1
    ntasks: int = 1
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mpi_plugin: str = "pmi2"  # srun --mpi=...; MPICH: pmi2, Open MPI: pmix
    launcher: str = "srun"  # srun (SLURM backend) or mpiexec (local backend)
    # default: the packaged hello-world, built by `askap-flows build-mpi`
    program: str | None = None
    mpicc: str | None = None  # compiler wrapper for that hello-world (default $MPICC or mpicc)
    args: tuple[str, ...] = ()
    wrapper: tuple[str, ...] = ()  # e.g. ('apptainer', 'exec', '-B', '/scratch', 'image.sif')
    launcher_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None  # seconds; the whole step is killed when it is exceeded

    def __post_init__(self) -> None:
        _positive("nodes", self.nodes)
        _positive("ntasks", self.ntasks)
        _positive("ntasks_per_node", self.ntasks_per_node, allow_none=True)
        _positive("cpus_per_task", self.cpus_per_task, allow_none=True)
        if self.ntasks < self.nodes:
            raise SpecError(
                f"ntasks ({self.ntasks}) is smaller than nodes ({self.nodes}): every node needs at "
                f"least one rank. Use ntasks >= {self.nodes} or nodes <= {self.ntasks}."
            )
        if self.ntasks_per_node is not None and self.ntasks != self.nodes * self.ntasks_per_node:
            raise SpecError(
                f"ntasks ({self.ntasks}) must equal nodes x ntasks_per_node ({self.nodes} x "
                f"{self.ntasks_per_node} = {self.nodes * self.ntasks_per_node}). Change one of "
                "them, or leave ntasks_per_node out."
            )
        if self.mpi_plugin not in MPI_PLUGINS:
            raise SpecError(
                f"mpi_plugin {self.mpi_plugin!r} is not one of {', '.join(MPI_PLUGINS)}. MPICH "
                "needs 'pmi2', Open MPI 'pmix', Cray MPICH 'cray_shasta' ('srun --mpi=list' shows "
                "what this SLURM offers; `askap-flows doctor` compares them)."
            )
        if self.launcher not in LAUNCHERS:
            raise SpecError(f"launcher {self.launcher!r} is not one of {', '.join(LAUNCHERS)}.")
        if self.timeout is not None and not (
            isinstance(self.timeout, (int, float)) and self.timeout > 0
        ):
            raise SpecError(f"timeout must be a number of seconds > 0, got {self.timeout!r}.")
        for name in ("args", "wrapper", "launcher_args"):
            object.__setattr__(self, name, _str_tuple(name, getattr(self, name)))
        env = dict(self.env or {})
        for k, v in env.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise SpecError(f"env must map strings to strings; {k!r}: {v!r} does not.")
            said = values.problem("env_name", k)
            if said:
                raise SpecError(f"env: {said}")
        object.__setattr__(self, "env", env)


def excluding_nodes(alloc: AllocationSpec, nodes: Sequence[str]) -> AllocationSpec:
    """The allocation with ``--exclude`` for ``nodes``, merged with an ``--exclude`` it had."""
    if not nodes:
        return alloc
    excluded = list(nodes)
    kept = []
    for d in alloc.extra_directives:
        if d.startswith("--exclude="):
            excluded += d.split("=", 1)[1].split(",")
        else:
            kept.append(d)
    directive = "--exclude=" + ",".join(dict.fromkeys(excluded))
    return dataclasses.replace(alloc, extra_directives=tuple(kept) + (directive,))


def check_fits(mpi: MPISpec, allocation: AllocationSpec) -> None:
    """Raise SpecError when the MPI layout cannot run inside the allocation."""
    if mpi.nodes > allocation.nodes:
        raise SpecError(
            f"the MPI step wants {mpi.nodes} nodes but the allocation has {allocation.nodes}. "
            f"Set allocation nodes >= {mpi.nodes} or MPI nodes <= {allocation.nodes}."
        )
    per_node = mpi.ntasks_per_node or -(-mpi.ntasks // mpi.nodes)
    if per_node > allocation.ntasks_per_node:
        raise SpecError(
            f"the MPI step puts {per_node} ranks on a node but the allocation has "
            f"ntasks_per_node={allocation.ntasks_per_node}. Set allocation ntasks_per_node >= "
            f"{per_node}, or spread the {mpi.ntasks} ranks over more nodes."
        )
    cpt = mpi.cpus_per_task or 1
    if cpt > allocation.cpus_per_task:
        raise SpecError(
            f"the MPI step asks cpus_per_task={cpt} but the allocation has "
            f"cpus_per_task={allocation.cpus_per_task}. Raise the allocation's cpus_per_task."
        )

