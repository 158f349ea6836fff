"""One place where a run's specs are resolved: the profile (this library's form or dask-jobqueue's),
explicit arguments and the backend, layered into one frozen, checked :class:`Resolved`.

Every entry point asks here: ``mpi_subflow``, ``array_subflow``, ``allocation()`` and its steps,
``task_runner``, ``mpi_task``, the main job, ``askap-flows render``, ``doctor`` and ``cleanup``.

Layering, highest first: given specs (an ``AllocationSpec``/``MPISpec`` is used as it is) >
explicit values (a mapping of spec fields; ``nodes``/``ntasks`` of the command line) > the profile
(a packaged name, a YAML path, a mapping; default ``$ASKAP_FLOWS_PROFILE``, then ``local`` for the
local backend) > the specs' field defaults. A profile is read only when something is taken from
it. The launcher follows where the step runs (``mpiexec`` for the local backend, ``srun`` inside a
job that already holds its nodes); a change of it is a note, said and kept in the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import cluster_yaml
from .spec import AllocationSpec, MPISpec, SpecError, check_fits
from .spec_profile import BACKENDS, PROFILE_ENV, load_profile, profile_sections

log = logging.getLogger("askap_flows")

#: why the launcher is replaced, by the launcher the place of the step needs
WHY_LAUNCHER = {
    "mpiexec": "the local backend runs MPI on this machine, without SLURM (srun needs a SLURM job)",
    "srun": "the step runs inside a SLURM job that already holds its nodes; srun starts it there",
}
JOBQUEUE_ONLY_FOR_RUNNER = (
    "it is in dask-jobqueue's form (cluster_class, cluster_kwargs, adapt_kwargs), which only "
    "askap_flows.task_runner(...) reads (its adaptive shape: single-node worker jobs). "
    "mpi_subflow, array_subflow, allocation() and the main job build one job of N nodes from "
    "this library's form: a profile with 'allocation:' and 'mpi:' sections (`askap-flows "
    "profiles` lists examples).")


@dataclass(frozen=True)
class Resolved:
    """What a run builds, checked: this library's allocation or a dask-jobqueue profile (the task
    runner only), the adaptive shape's adapt_kwargs, the MPI step, and what was changed, why."""

    backend: str
    where: str = ""  # the profile: its path, '(mapping)', or '' when none was read
    allocation: AllocationSpec | None = None  # this library's form
    jobqueue: cluster_yaml.JobqueueProfile | None = None  # dask-jobqueue's form
    adapt_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mpi: MPISpec | None = None  # None: no MPI step was asked for
    mpi_section: Mapping[str, Any] = field(default_factory=dict)  # the profile's, for mpi_task
    launcher_note: str | None = None  # the launcher was replaced: from what, to what, why
    notes: tuple[str, ...] = ()  # every note said (the launcher's, the profile's overrides)

    @property
    def prefix(self) -> str:
        """The prefix of the job names (``<prefix>-<token>``)."""
        if self.allocation is not None:
            return self.allocation.job_name_prefix
        return self.jobqueue.prefix if self.jobqueue else cluster_yaml.DEFAULT_PREFIX

    @property
    def start_timeout(self) -> float:
        return self.allocation.start_timeout if self.allocation else 600.0

    @property
    def clusters(self) -> str | None:
        """The SLURM clusters the jobs go to (``sbatch -M``); None: this host's."""
        return self.allocation.clusters if self.allocation else None

    def allocation_spec(self) -> AllocationSpec:
        if self.allocation is None:
            raise SpecError(f"profile {self.where}: {JOBQUEUE_ONLY_FOR_RUNNER}")
        return self.allocation

    def mpi_spec(self) -> MPISpec:
        if self.mpi is None:
            raise SpecError("no MPI step was resolved (resolve(..., step=True) gives one).")
        return self.mpi


def resolve(
    profile: str | os.PathLike | Mapping[str, Any] | Resolved | None = None,
    *,
    backend: str = "slurm",
    allocation: AllocationSpec | Mapping[str, Any] | None = None,
    mpi: MPISpec | Mapping[str, Any] | None = None,
    adapt_kwargs: Mapping[str, Any] | None = None,
    nodes: int | None = None,
    ntasks: int | None = None,
    step: bool = True,
    launcher: str | None = None,
    fit: bool = True,
    any_form: bool = False,
    say: Callable[[str], None] | None = None,
) -> Resolved:
    """Resolve a run's specs; SpecError names the value, where it came from and the fix.

    Args:
        profile: a packaged profile name, a YAML path, a mapping, or a ``Resolved`` (a task
            runner's: only its MPI step is resolved, over its mpi section; nothing is read).
        backend: "local" or "slurm".
        allocation: an AllocationSpec, or AllocationSpec fields over the profile's (in
            dask-jobqueue's form: cluster_kwargs over the profile's).
        mpi: an MPISpec, or MPISpec fields over the profile's. Fields that set ``nodes`` or
            ``ntasks`` but not ``ntasks_per_node`` drop the profile's ``ntasks_per_node``.
        adapt_kwargs: ``adapt(minimum, maximum)`` of the adaptive shape (single-node jobs).
        nodes, ntasks: the command line's size of each sub-flow: the MPI step's, and the
            allocation follows it (``nodes`` without ``ntasks``: at least one rank per node).
        step: resolve an MPI step (False: sub-flows without one, pools, the task runner).
        launcher: the launcher the place of the step needs (default: ``mpiexec`` for the local
            backend, else the spec's).
        fit: check that the MPI step fits the allocation.
        any_form: accept dask-jobqueue's form (the task runner, render, doctor, cleanup).
        say: where notes go (default: the ``askap_flows`` logger, as warnings).
    """
    if backend not in BACKENDS:
        raise SpecError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    say = say or log.warning
    launcher = launcher or ("mpiexec" if backend == "local" else None)
    if isinstance(profile, Resolved):
        if allocation is not None or adapt_kwargs is not None:
            raise SpecError("a resolved profile's allocation is fixed: resolve only its MPI step "
                            "over it (mpi=...), or resolve the profile again.")
        stepped, said = _step(profile.mpi_section, mpi, nodes, ntasks, launcher, profile.where,
                              say)
        if fit and profile.allocation is not None:
            check_fits(stepped, profile.allocation)
        return dataclasses.replace(profile, mpi=stepped, launcher_note=said,
                                   notes=profile.notes + ((said,) if said else ()))
    needed = not isinstance(allocation, AllocationSpec) or (step and not isinstance(mpi, MPISpec))
    where, data = _read(profile, backend) if needed else ("", {})
    if cluster_yaml.is_jobqueue_form(data):
        return _jobqueue(data, where, backend, allocation, mpi, adapt_kwargs, nodes, ntasks,
                         step, launcher, any_form, say)
    sections = profile_sections(data, where) if where else {"allocation": {}, "mpi": {}}
    adapt = dict(adapt_kwargs or {})
    if adapt:
        cluster_yaml.check_adapt(where or "(arguments)", adapt)
    alloc = allocation if isinstance(allocation, AllocationSpec) else _build(
        AllocationSpec, "allocation", sections["allocation"], _explicit(
            AllocationSpec, "allocation", allocation), where)
    spec: MPISpec | None = None
    note: str | None = None
    if step:
        spec, note = _step(sections["mpi"], mpi, nodes, ntasks, launcher, where, say)
        if nodes is not None or ntasks is not None:  # the allocation follows the step's size
            per_node = -(-spec.ntasks // spec.nodes)
            alloc = dataclasses.replace(
                alloc, nodes=nodes if nodes is not None else max(alloc.nodes, spec.nodes),
                ntasks_per_node=max(alloc.ntasks_per_node, per_node))
        if fit:
            check_fits(spec, alloc)
    if adapt and alloc.nodes != 1:
        raise SpecError(f"profile {where}: adapt_kwargs scales single-node worker jobs, but the "
                        f"allocation has nodes={alloc.nodes}. Set nodes=1 for the adaptive shape, "
                        "or leave adapt_kwargs out for one job of N nodes (the MPI shape).")
    return Resolved(backend, where, alloc, None, adapt, spec, dict(sections["mpi"]), note,
                    (note,) if note else ())


def _read(profile, backend: str) -> tuple[str, Any]:
    """(where, data) of the profile to use; SpecError when the slurm backend has none."""
    if isinstance(profile, Mapping):
        return "(mapping)", dict(profile)
    if profile is None:
        profile = os.environ.get(PROFILE_ENV) or ("local" if backend == "local" else None)
    if profile is None:
        raise SpecError(
            "the slurm backend needs a profile that says which partition and network "
            "interfaces to use: pass profile='testbed' (the test bed), a YAML path, or set "
            "ASKAP_FLOWS_PROFILE. `askap-flows profiles` lists the packaged ones.")
    path, data = load_profile(profile)
    return str(path), data


def _jobqueue(data, where, backend, allocation, mpi, adapt_kwargs, nodes, ntasks, step,
              launcher, any_form, say) -> Resolved:
    """A profile in dask-jobqueue's form: only the task runner builds from it."""
    if {"allocation", "mpi"} & set(data):
        raise SpecError(f"profile {where}: it mixes the dask-jobqueue form (cluster_class, "
                        "cluster_kwargs, adapt_kwargs) with this library's (allocation, mpi). "
                        "Use one form per file.")
    if not any_form:
        raise SpecError(f"profile {where}: {JOBQUEUE_ONLY_FOR_RUNNER}")
    wrong = []
    if nodes is not None or ntasks is not None:
        wrong.append("--nodes/--ntasks (nodes, ntasks) apply to this library's form only: set the "
                     "job's nodes in its cluster_kwargs.job_extra_directives (--nodes=N)")
    if backend != "slurm":
        wrong.append(f"it builds SLURM jobs, not the {backend} backend's: use the slurm backend")
    if wrong:
        raise SpecError(f"profile {where} is in dask-jobqueue's form: {'; '.join(wrong)}.")
    if isinstance(allocation, AllocationSpec):
        raise SpecError(f"profile {where} is in dask-jobqueue's form: give cluster_kwargs over "
                        "it as a mapping, not an AllocationSpec.")
    over = dict(allocation or {})
    if adapt_kwargs is not None:
        over["adapt_kwargs"] = adapt_kwargs
    jq = cluster_yaml.read(data, where, over)
    for text in jq.notes:
        say(text)
    spec: MPISpec | None = None
    note: str | None = None
    if step:
        spec, note = _step({}, mpi, None, None, launcher, where, say)
    return Resolved(backend, where, None, jq, dict(jq.adapt_kwargs), spec, {}, note,
                    jq.notes + ((note,) if note else ()))


def _step(section: Mapping[str, Any], mpi, nodes, ntasks, launcher, where,
          say) -> tuple[MPISpec, str | None]:
    """The MPI step: a given MPISpec, or explicit values over the profile's mpi section; with the
    launcher its place needs (and the note saying so)."""
    if isinstance(mpi, MPISpec):
        spec = mpi
    else:
        over = _explicit(MPISpec, "mpi", mpi)
        over.update({k: v for k, v in (("nodes", nodes), ("ntasks", ntasks)) if v is not None})
        section = dict(section)
        if ("nodes" in over or "ntasks" in over) and "ntasks_per_node" not in over:
            section.pop("ntasks_per_node", None)  # a new layout: its own ranks per node
        if nodes is not None and ntasks is None and "ntasks" not in over:
            over["ntasks"] = max(section.get("ntasks", 1), nodes)  # at least a rank per node
        spec = _build(MPISpec, "mpi", section, over, where)
    if launcher is None or spec.launcher == launcher:
        return spec, None
    note = (f"launcher {spec.launcher!r} replaced by {launcher!r}: {WHY_LAUNCHER[launcher]}.")
    say(note)
    return dataclasses.replace(spec, launcher=launcher), note


def _explicit(cls, name: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Explicit values (None: not given); unknown keys are refused, naming the valid ones."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise SpecError(f"{name} must be a {cls.__name__} or a mapping of its fields, got "
                        f"{type(given).__name__}.")
    valid = [f.name for f in dataclasses.fields(cls)]
    bad = sorted(set(given) - set(valid))
    if bad:
        raise SpecError(f"{name}: unknown key(s) {', '.join(map(str, bad))}. Valid keys are: "
                        f"{', '.join(valid)}.")
    return {k: v for k, v in given.items() if v is not None}


def _build(cls, name: str, section: Mapping[str, Any], over: Mapping[str, Any], where: str):
    """``cls`` from the profile's section with explicit values over it; errors name both."""
    try:
        return cls(**{**section, **over})
    except SpecError as exc:
        raise SpecError(f"{name}{f' (profile {where})' if where else ''}: {exc}") from None
