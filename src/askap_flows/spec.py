"""What a sub-flow needs: the SLURM allocation and the MPI layout, validated at construction.

Specs are frozen dataclasses. Every rule is checked when a spec is built, with a message that names
the field and the fix, so that nothing is submitted to SLURM when the request cannot work.

Profiles are YAML files with two sections, ``allocation`` and ``mpi``. Layering, highest first:
explicit arguments > the chosen profile (a packaged name or a path) > the field defaults here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import values
from .errors import AskapFlowsError

PROFILE_DIR = Path(__file__).with_name("profiles")
PROFILE_ENV = "ASKAP_FLOWS_PROFILE"
# srun --mpi= plugins: MPICH pmi2; Open MPI pmix (or a versioned pmix_vN);
# HPE Cray MPICH cray_shasta
MPI_PLUGINS = ("pmi2", "pmix", "pmix_v3", "pmix_v4", "pmix_v5", "cray_shasta", "none")
LAUNCHERS = ("srun", "mpiexec")
BACKENDS = ("local", "slurm")


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


# --------------------------------------------------------------------------- profiles
SECTIONS = {"allocation": AllocationSpec, "mpi": MPISpec}


def packaged_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.yaml"))}


def _profile_path(profile: str | os.PathLike | None) -> Path | None:
    if profile is None:
        profile = os.environ.get(PROFILE_ENV) or None
        if profile is None:
            return None
    text = str(profile)
    known = packaged_profiles()
    if text in known:
        return known[text]
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in text:
        if not path.is_file():
            raise SpecError(
                f"profile file {str(path)!r} does not exist. Give an existing YAML file or one of "
                f"the packaged profiles: {', '.join(known)}."
            )
        return path
    raise SpecError(
        f"unknown profile {text!r}. Packaged profiles: {', '.join(known)}; or give the path of a "
        "YAML file ('askap-flows profiles' lists them)."
    )


def read_profile(profile: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """The sections of a profile as plain dicts, checked for unknown keys and YAML errors."""
    path, data = load_profile(profile)
    if path is None:
        return {name: {} for name in SECTIONS}
    return profile_sections(data, path)


def load_profile(profile: str | os.PathLike | None) -> tuple[Path | None, Any]:
    """(path, the YAML's data) of a packaged profile name or a YAML path; (None, {}) for none."""
    path = _profile_path(profile)
    if path is None:
        return None, {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise SpecError(f"profile {path}: not valid YAML{where}: {exc}") from None
    return path, data


def profile_sections(data: Any, path: Path | str) -> dict[str, dict[str, Any]]:
    """This library's form of a profile (``allocation``, ``mpi``), checked for unknown keys."""
    if not isinstance(data, dict):
        raise SpecError(f"profile {path}: the top level must be a mapping with sections "
                        f"{', '.join(SECTIONS)}.")
    unknown = set(data) - set(SECTIONS) - {"description"}
    if unknown:
        raise SpecError(
            f"profile {path}: unknown section(s) {', '.join(sorted(unknown))}. Valid sections: "
            f"{', '.join(SECTIONS)} (and 'description')."
        )
    out: dict[str, dict[str, Any]] = {}
    for name, cls in SECTIONS.items():
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise SpecError(
                f"profile {path}: section '{name}' must be a mapping of keys to values.")
        valid = [f.name for f in fields(cls)]
        bad = sorted(set(section) - set(valid))
        if bad:
            raise SpecError(
                f"profile {path}: unknown key(s) in '{name}': {', '.join(bad)}. Valid keys are: "
                f"{', '.join(valid)}."
            )
        out[name] = dict(section)
    return out


def build_specs(
    profile: str | os.PathLike | None = None,
    allocation: Mapping[str, Any] | None = None,
    mpi: Mapping[str, Any] | None = None,
    check: bool = True,
) -> tuple[AllocationSpec, MPISpec]:
    """Layer explicit values over the profile over the defaults, validate, and check the fit."""
    sections = read_profile(profile)
    path = _profile_path(profile)
    where = f" (profile {path})" if path else ""
    built: list[Any] = []  # [AllocationSpec, MPISpec]
    for name, cls, explicit in (("allocation", AllocationSpec, allocation), ("mpi", MPISpec, mpi)):
        try:
            built.append(cls(**{**sections[name], **_explicit(explicit)}))
        except (TypeError, SpecError) as exc:  # name the section and the file the value came from
            raise SpecError(f"{name}{where}: {exc}") from None
    alloc, mpi_spec = built
    if check:
        check_fits(mpi_spec, alloc)
    return alloc, mpi_spec


def _explicit(values: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (values or {}).items() if v is not None}


def _profile_for(profile, backend: str, needed: bool):
    if backend not in BACKENDS:
        raise SpecError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    if profile is not None or not needed:
        return profile
    profile = os.environ.get(PROFILE_ENV) or ("local" if backend == "local" else None)
    if profile is None:
        raise SpecError(
            "the slurm backend needs a profile that says which partition and network "
            "interfaces to use: pass profile='testbed' (the test bed), a YAML path, or set "
            "ASKAP_FLOWS_PROFILE. `askap-flows profiles` lists the packaged ones."
        )
    return profile


def resolve_specs(
    mpi_spec: MPISpec | Mapping[str, Any] | None,
    allocation: AllocationSpec | Mapping[str, Any] | None,
    profile: str | os.PathLike | None,
    backend: str,
) -> tuple[AllocationSpec, MPISpec]:
    """The specs of one sub-flow: given specs win, mappings layer over the profile; checked."""
    given = isinstance(mpi_spec, MPISpec) and isinstance(allocation, AllocationSpec)
    profile = _profile_for(profile, backend, needed=not given)
    alloc_over = allocation if isinstance(allocation, Mapping) else None
    mpi_over = mpi_spec if isinstance(mpi_spec, Mapping) else None
    alloc, spec = build_specs(profile, allocation=alloc_over, mpi=mpi_over, check=False)
    if isinstance(allocation, AllocationSpec):
        alloc = allocation
    if isinstance(mpi_spec, MPISpec):
        spec = mpi_spec
    if backend == "local" and spec.launcher != "mpiexec":
        spec = dataclasses.replace(spec, launcher="mpiexec")
    check_fits(spec, alloc)
    return alloc, spec


def resolve_allocation(
    allocation: AllocationSpec | Mapping[str, Any] | None,
    profile: str | os.PathLike | None,
    backend: str,
) -> AllocationSpec:
    """The allocation alone (for sub-flows without an MPI step), layered like resolve_specs."""
    if isinstance(allocation, AllocationSpec):
        _profile_for(profile, backend, needed=False)
        return allocation
    section = read_profile(_profile_for(profile, backend, needed=True))["allocation"]
    try:
        return AllocationSpec(**{**section, **_explicit(allocation)})
    except TypeError as exc:
        raise SpecError(f"allocation: {exc}") from None
