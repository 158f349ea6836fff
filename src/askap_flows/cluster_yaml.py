"""The cluster YAML that Prefect + dask-jobqueue pipelines already have: read, checked, hardened.

    cluster_class: dask_jobqueue.SLURMCluster
    cluster_kwargs: {cores: 1, memory: 4GB, interface: ib0, job_extra_directives: [...], ...}
    adapt_kwargs: {minimum: 1, maximum: 512}

``is_jobqueue_form`` tells it from this library's own form (``allocation``, ``mpi``); ``read``
checks it (unknown keys list the valid ones; values the library manages are refused or overridden,
with a note saying why); ``harden`` turns it into one run's ``SLURMCluster`` arguments with what
every askap_flows job gets (pure: no I/O).
"""

from __future__ import annotations

import inspect
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import slurm, values
from .spec import SpecError, walltime_seconds, whole_number

FORM_KEYS = ("cluster_class", "cluster_kwargs", "adapt_kwargs")
SLURM_CLASSES = ("dask_jobqueue.SLURMCluster", "dask_jobqueue.slurm.SLURMCluster")
ADAPT_KEYS = ("minimum", "maximum", "minimum_jobs", "maximum_jobs", "interval", "wait_count",
              "target_duration")
#: refused: (key, why)
REFUSED = {
    "asynchronous": "Prefect starts the cluster itself, in the mode its engine runs (prefect-dask "
                    "refuses it too)",
    "job_cls": "askap_flows' jobs.BoardJob submits and ends every job (so that a job never "
               "outlives its run)",
}
#: overridden: (key, why); the profile's value is not used
OVERRIDDEN = {
    "dashboard_address": "each run's scheduler gets its own dashboard port, reserved so that "
                         "concurrent runs never collide (prefect-dask logs its address)",
    "scheduler_options.port": "each run's scheduler gets its own port, reserved so that concurrent "
                              "runs never collide",
    "scheduler_options.dashboard_address": "each run's scheduler gets its own dashboard port, "
                                           "reserved so that concurrent runs never collide",
    "n_workers": "with adapt_kwargs, adapt(minimum, maximum) decides how many jobs run",
}
#: values that reach the job script, checked like this library's own (values.RULES)
CHECKED = {"queue": "partition", "account": "account", "interface": "interface",
           "memory": "memory"}
DEFAULT_PREFIX = "askapflows"


def is_jobqueue_form(data: Any) -> bool:
    return isinstance(data, Mapping) and any(k in data for k in FORM_KEYS)


def valid_cluster_kwargs() -> list[str]:
    """The keyword arguments dask-jobqueue's SLURMCluster takes (from its public signatures)."""
    from dask_jobqueue.core import Job, JobQueueCluster
    from dask_jobqueue.slurm import SLURMJob

    skip = {"self", "scheduler", "name", "base_class_kwargs", "job_kwargs", "loop", "config_name"}
    names: dict[str, None] = {}
    for fn in (JobQueueCluster.__init__, Job.__init__, SLURMJob.__init__):
        for p in inspect.signature(fn).parameters.values():
            if p.name not in skip and p.kind is not p.VAR_KEYWORD:
                names[p.name] = None
    return sorted(names)


@dataclass(frozen=True)
class JobqueueProfile:
    """A checked profile in the dask-jobqueue form."""

    cluster_kwargs: Mapping[str, Any]
    adapt_kwargs: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = DEFAULT_PREFIX
    notes: tuple[str, ...] = ()  # what was overridden, and why


def read(data: Mapping[str, Any], where: str,
         overrides: Mapping[str, Any] | None = None) -> JobqueueProfile:
    """Check a profile in the dask-jobqueue form; ``overrides`` are cluster_kwargs over it (and
    ``adapt_kwargs``). SpecError names the key, the valid ones and the fix."""
    unknown = sorted(set(data) - set(FORM_KEYS) - {"description"})
    if unknown:
        raise SpecError(f"profile {where}: unknown key(s) {', '.join(unknown)}. In the "
                        f"dask-jobqueue form the valid keys are {', '.join(FORM_KEYS)} (and "
                        "'description'); this library's own form has 'allocation' and 'mpi'.")
    cls = data.get("cluster_class", SLURM_CLASSES[0])
    if cls not in SLURM_CLASSES and getattr(cls, "__name__", None) != "SLURMCluster":
        raise SpecError(f"profile {where}: cluster_class {cls!r} is not supported: askap_flows "
                        f"builds SLURM clusters only. Use cluster_class: {SLURM_CLASSES[0]}.")
    over = dict(overrides or {})
    adapt = _mapping(where, "adapt_kwargs", over.pop("adapt_kwargs", data.get("adapt_kwargs")))
    kwargs = {**_mapping(where, "cluster_kwargs", data.get("cluster_kwargs")), **over}
    check_adapt(where, adapt)
    return _check_kwargs(where, kwargs, adapt)


def _mapping(where: str, name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"profile {where}: {name} must be a mapping of keys to values, got "
                        f"{value!r}.")
    return dict(value)


def check_adapt(where: str, adapt: Mapping[str, Any]) -> None:
    bad = sorted(set(adapt) - set(ADAPT_KEYS))
    if bad:
        raise SpecError(f"profile {where}: unknown key(s) in adapt_kwargs: {', '.join(bad)}. "
                        f"Valid keys are: {', '.join(ADAPT_KEYS)}.")
    for lo_name, hi_name in (("minimum", "maximum"), ("minimum_jobs", "maximum_jobs")):
        lo, hi = adapt.get(lo_name), adapt.get(hi_name)
        try:
            if lo is not None:
                whole_number(f"adapt_kwargs.{lo_name}", lo, minimum=0)
            if hi is not None:
                whole_number(f"adapt_kwargs.{hi_name}", hi)
        except SpecError as exc:
            raise SpecError(f"profile {where}: {exc}") from None
        if lo is not None and hi is not None and lo > hi:
            raise SpecError(f"profile {where}: adapt_kwargs.{lo_name} ({lo}) is larger than "
                            f"{hi_name} ({hi}). Use {lo_name} <= {hi_name}.")


def _check_kwargs(where: str, kwargs: dict[str, Any],
                  adapt: Mapping[str, Any]) -> JobqueueProfile:
    valid = valid_cluster_kwargs()
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise SpecError(f"profile {where}: unknown key(s) in cluster_kwargs: {', '.join(bad)}. "
                        f"Valid keys are: {', '.join(k for k in valid if k not in REFUSED)}.")
    for key, why in REFUSED.items():
        if key in kwargs:
            raise SpecError(f"profile {where}: cluster_kwargs.{key} cannot be set: {why}. "
                            "Remove it.")
    sched = _mapping(where, "cluster_kwargs.scheduler_options", kwargs.get("scheduler_options"))
    notes = []
    for key, why in OVERRIDDEN.items():
        head, _, sub = key.partition(".")
        given = sched.get(sub) if sub else kwargs.get(head)
        if key == "n_workers" and not adapt:
            continue
        if given is not None:
            notes.append(f"profile {where}: cluster_kwargs.{key} ({given!r}) is not used: {why}.")
    prefix = kwargs.pop("job_name", None) or DEFAULT_PREFIX
    if prefix != DEFAULT_PREFIX:
        notes.append(f"profile {where}: cluster_kwargs.job_name ({prefix!r}) is the prefix of the "
                     f"job names: each run's jobs are named '{prefix}-<run id>', so that they are "
                     "found and cancelled by name.")
    said = values.problem("job_name_prefix", prefix)
    for key, rule in CHECKED.items():
        said = said or (values.problem(rule, kwargs[key]) if kwargs.get(key) is not None else None)
    for key, rule in (("job_extra_directives", "extra_directives"),
                      ("job_script_prologue", "prologue")):
        items = kwargs.get(key) or []
        if isinstance(items, str) or not isinstance(items, list):
            said = said or f"{key} must be a list of strings, got {items!r}."
        said = said or values.problems(rule, items)
    if said:
        raise SpecError(f"profile {where}: cluster_kwargs: {said}")
    try:
        if kwargs.get("walltime") is not None:
            walltime_seconds(str(kwargs["walltime"]))
        for key in ("cores", "processes", "job_cpu"):
            if kwargs.get(key) is not None:
                whole_number(key, kwargs[key])
    except SpecError as exc:
        raise SpecError(f"profile {where}: cluster_kwargs: {exc}") from None
    return JobqueueProfile(kwargs, dict(adapt), prefix, tuple(notes))


def _asks_for_nodes(directives: list[str]) -> bool:
    return any(d.startswith(("--nodes", "-N")) for d in directives)


def harden(profile: JobqueueProfile, *, job_name: str, log_directory: str,
           env: Mapping[str, str], scheduler_port: int, dashboard_address: str) -> dict[str, Any]:
    """One run's SLURMCluster arguments: the profile's, with this run's job name and ports, the
    worker ``exec``'d (SLURM's signals reach it), quoted log paths, the environment the jobs need,
    and no ``#SBATCH -n 1`` where the job asks for nodes (sbatch would shrink it to one)."""
    kw = {k: v for k, v in profile.cluster_kwargs.items() if k not in ("dashboard_address",)}
    log_dir = kw.pop("log_directory", None) or log_directory
    local_dir = kw.pop("local_directory", None)
    directives = list(kw.get("job_extra_directives") or [])
    skip = list(kw.get("job_directives_skip") or [])
    if _asks_for_nodes(directives) and "-n 1" not in skip:
        skip.append("-n 1")
    prologue = slurm.env_exports(env)
    if local_dir:
        prologue.append(f"export DASK_TEMPORARY_DIRECTORY={shlex.quote(str(local_dir))}")
    kw.update(
        job_name=job_name,
        python=f"exec {shlex.quote(str(kw.get('python') or sys.executable))}",
        shebang=kw.get("shebang") or "#!/usr/bin/env bash",
        job_extra_directives=directives + slurm.log_directives(str(log_dir)),
        job_directives_skip=skip,
        job_script_prologue=prologue + list(kw.get("job_script_prologue") or []),
        scheduler_options={**(kw.get("scheduler_options") or {}), "port": scheduler_port,
                           "dashboard_address": dashboard_address},
        n_workers=0 if profile.adapt_kwargs else kw.get("n_workers", 1),
    )
    return kw


def scheduler_interface(profile: JobqueueProfile) -> str | None:
    """The interface the scheduler listens on: scheduler_options' or else the workers' (as
    dask-jobqueue does)."""
    sched = profile.cluster_kwargs.get("scheduler_options") or {}
    return sched.get("interface") or profile.cluster_kwargs.get("interface")


def job_script(profile: JobqueueProfile, log_directory: str, env: Mapping[str, str],
               address: str) -> str:
    """The job script each of the profile's jobs runs (RUNID and the ports: chosen by the run)."""
    from dask_jobqueue.core import Job
    from dask_jobqueue.slurm import SLURMJob

    kw = harden(profile, job_name=f"{profile.prefix}-RUNID", log_directory=log_directory,
                env=env, scheduler_port=0, dashboard_address=f"{address}:0")
    job_keys = {*inspect.signature(Job.__init__).parameters,
                *inspect.signature(SLURMJob.__init__).parameters}
    job_kw = {k: v for k, v in kw.items() if k in job_keys and k not in ("scheduler", "name")}
    return SLURMJob(scheduler=f"tcp://{address}:SCHEDULER_PORT", name="worker",
                    **job_kw).job_script()


def _directive_number(directives: list[str], long: str, short: str) -> int | None:
    for d in directives:
        for flag in (f"{long}=", f"{short} ", f"{short}="):
            if d.startswith(flag) and d[len(flag):].strip().isdigit():
                return int(d[len(flag):])
    return None


def as_allocation(profile: JobqueueProfile):
    """The profile as this library's AllocationSpec, for ``askap-flows doctor``'s checks
    (partition, account, interfaces, nodes): what the jobs ask SLURM for."""
    from .spec import AllocationSpec

    kw = profile.cluster_kwargs
    directives = list(kw.get("job_extra_directives") or [])
    given: dict[str, Any] = dict(
        nodes=_directive_number(directives, "--nodes", "-N") or 1,
        ntasks_per_node=_directive_number(directives, "--ntasks-per-node", "--ntasks-per-node")
        or 1,
        cpus_per_task=kw.get("job_cpu") or kw.get("cores") or 1, cores=kw.get("cores") or 1,
        memory=kw.get("memory"), walltime=kw.get("walltime"), partition=kw.get("queue"),
        account=kw.get("account"), interface=kw.get("interface"),
        scheduler_interface=scheduler_interface(profile), job_name_prefix=profile.prefix)
    chosen: dict[str, Any] = {k: str(v) if k == "walltime" else v
                              for k, v in given.items() if v is not None}
    return AllocationSpec(**chosen)
