"""SLURM vocabulary: the SLURMCluster arguments for an allocation (pure), and why a job was lost
(JobLost). Asking SLURM itself (sinfo, sbatch --test-only, squeue, scontrol) is in slurm_query.

dask-jobqueue writes ``#SBATCH -n 1``; with ``--nodes=N`` that makes sbatch shrink the job to one
node ("can't run 1 processes on 3 nodes, setting nnodes to 1"), so the line is skipped and the
job asks for ``--nodes``/``--ntasks-per-node`` instead. The Dask worker runs in the batch script,
on the first node, and its ``srun`` uses the whole allocation.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import clusters as clusters_
from . import host
from .slurm_query import SlurmError, hostnames, node_problems
from .spec import AllocationSpec

#: environment variables a job must carry so that its Dask worker finds the Prefect API and SLURM
EXPORTED_ENV = ("PREFECT_API_URL", "PREFECT_HOME", "SLURM_CONF", "ASKAP_FLOWS_HOME",
                "PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "PREFECT_CLIENT_RETRY_EXTRA_CODES")

#: job states after which a fresh allocation (without the failed nodes) may well succeed
RETRYABLE_STATES = ("NODE_FAIL", "BOOT_FAIL")


class JobLost(SlurmError):
    """A job ended underneath its running sub-flow: its state, SLURM's reason, the nodes it had
    and those of them SLURM now reports down or not responding."""

    def __init__(self, message: str, job_id: str = "", state: str = "", reason: str = "",
                 nodes: Sequence[str] = (), failed_nodes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.job_id, self.state, self.reason = job_id, state, reason
        self.nodes, self.failed_nodes = list(nodes), list(failed_nodes)

    @property
    def retryable(self) -> bool:
        """A node failed: the same request on other nodes may succeed (a walltime, a cancel or a
        failing program would only fail again)."""
        return self.state in RETRYABLE_STATES or bool(self.failed_nodes)


def job_directives(alloc: AllocationSpec) -> list[str]:
    """The ``#SBATCH`` options beyond what dask-jobqueue writes itself."""
    d = [f"--nodes={alloc.nodes}", f"--ntasks-per-node={alloc.ntasks_per_node}"]
    for flag, value in (("--qos", alloc.qos), ("--reservation", alloc.reservation),
                        ("--clusters", alloc.clusters), ("--constraint", alloc.constraint)):
        if value:
            d.append(f"{flag}={value}")
    if alloc.exclusive:
        d.append("--exclusive")
    return d + list(alloc.extra_directives)


def local_dir_export(alloc: AllocationSpec) -> list[str]:
    """The Dask worker's scratch directory, as a quoted export (dask-jobqueue would write
    ``--local-directory`` unquoted into the worker's command line)."""
    if not alloc.local_directory:
        return []
    return [f"export DASK_TEMPORARY_DIRECTORY={shlex.quote(alloc.local_directory)}"]


def log_directives(log_directory: str) -> list[str]:
    """The job's quoted ``--output``/``--error`` lines (dask-jobqueue's are not quoted)."""
    if '"' in log_directory or any(ord(c) < 32 or ord(c) == 127 for c in log_directory):
        raise SlurmError(f"the log directory {log_directory!r} contains a double quote, a line "
                         "break or another control character, which a job script cannot hold: "
                         "set ASKAP_FLOWS_HOME elsewhere.")
    return [f'--output="{log_directory}/%x-%j.out"', f'--error="{log_directory}/%x-%j.err"']


def env_exports(env: Mapping[str, str]) -> list[str]:
    """``export NAME=value`` lines (values shell-quoted) for the variables a job must carry."""
    return [f"export {k}={shlex.quote(env[k])}" for k in EXPORTED_ENV if env.get(k)]


def _for_cluster(env: Mapping[str, str], alloc: AllocationSpec) -> Mapping[str, str]:
    """A job on another cluster (``clusters:``) does not get this host's SLURM_CONF: that names
    this cluster's controller, and the job's ``srun`` must reach its own."""
    return {k: v for k, v in env.items() if not (alloc.clusters and k == "SLURM_CONF")}


def cluster_kwargs(
    alloc: AllocationSpec,
    *,
    job_name: str,
    log_directory: str,
    env: Mapping[str, str],
    dashboard_address: str | None,
) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` (pure: no I/O).

    One job of ``alloc.nodes`` nodes, one single-process Dask worker in it, and ``n_workers=1`` so
    the cluster submits that job as soon as it exists (no call to ``scale`` needed).
    """
    log_lines = log_directives(log_directory)
    scheduler_options: dict[str, Any] = {"dashboard_address": dashboard_address}
    if alloc.scheduler_interface:
        scheduler_options["interface"] = alloc.scheduler_interface
    kwargs: dict[str, Any] = dict(
        n_workers=1,
        processes=1,
        cores=alloc.cores,
        job_cpu=alloc.cpus_per_task,
        memory=alloc.memory,
        walltime=alloc.walltime,
        queue=alloc.partition,
        account=alloc.account,
        job_name=job_name,
        interface=alloc.interface,
        nanny=False,
        # no dashboard on the worker: it would import bokeh (1-2 s) while the job holds its nodes
        worker_extra_args=["--no-dashboard"],
        # `exec`: the worker replaces the batch shell, so SLURM's signals and its final SIGKILL
        # reach it directly. Started as a child, it outlived cancelled jobs as an orphan (the
        # shell died first and the worker, reparented to init, escaped the job's process tracking).
        python=f"exec {shlex.quote(alloc.python or sys.executable)}",
        shebang="#!/usr/bin/env bash",
        scheduler_options=scheduler_options,
        job_directives_skip=["-n 1"],
        # our own --output/--error: dask-jobqueue's log_directory lines are not quoted
        job_extra_directives=job_directives(alloc) + log_lines,
        job_script_prologue=env_exports(_for_cluster(env, alloc)) + local_dir_export(alloc)
        + list(alloc.prologue),
    )
    return {k: v for k, v in kwargs.items() if v is not None}


def render_job_script(kwargs: Mapping[str, Any], scheduler: str = "tcp://SCHEDULER:8786") -> str:
    """The job script SLURMCluster would submit for ``kwargs`` (no scheduler is started)."""
    from dask_jobqueue.slurm import SLURMJob

    job_kwargs = {k: v for k, v in kwargs.items() if k not in ("n_workers", "scheduler_options")}
    return SLURMJob(scheduler=scheduler, name="worker", **job_kwargs).job_script()


def job_lost(job, job_name: str, log_path: str, runner: bool = False) -> JobLost:
    """Why a job (a ``board.JobState``) ended while its sub-flow still needed it, as a JobLost
    whose message names the job, its nodes, SLURM's state and reason, the failed nodes, and the
    fix. Retryable only when a node failed: NODE_FAIL, or a node SLURM reports down or not
    responding (a job cancelled because its worker's node died counts too). ``runner``: the job
    is a flow run's, under ``task_runner`` (no mpi_subflow, no retries=N to pass)."""
    state, reason, job_id = job.state, job.reason or "unknown", job.job_id
    nodes = hostnames(job.nodelist)
    failed, other = node_problems(nodes, job.cluster)
    where = ",".join(nodes) or "?"
    head = f"SLURM job {job_id}{clusters_.where(job.cluster)} ({job_name}) on {where}"
    tail = f" Its output is in {log_path}."
    note = "".join(f" ({n} is {p}: not a cause of failure)" for n, p in other.items())
    user = "flow run" if runner else "sub-flow"
    again = ("Run the flow again: its new flow run gets a fresh allocation" if runner else
             "Pass retries=N to mpi_subflow to re-run on a fresh allocation")
    if failed and state != "TIMEOUT":
        which = "; ".join(f"{n} is {p}" for n, p in failed.items())
        text = (f"{head} lost node(s) {','.join(failed)} while its {user} was running ({which}; "
                f"job state {state}, reason: {reason}). {again} without that node, and tell the "
                "cluster's admins.")
    elif state in RETRYABLE_STATES:
        text = (f"{head} ended with {state} (reason: {reason}): one of its nodes failed. "
                f"{again}.")
    elif state == "TIMEOUT":
        raise_it = ("the walltime of the task runner's cluster (walltime in its profile, or "
                    "task_runner(..., walltime=...))" if runner else
                    "the allocation's walltime in the profile")
        text = (f"{head} reached its walltime ({job.time_limit or '?'}) and SLURM ended it "
                f"(state TIMEOUT). Raise {raise_it}, or give the {user} less work.")
        failed = {}
    elif state == "CANCELLED":
        text = (f"{head} was cancelled while its {user} was running (state CANCELLED, reason: "
                f"{reason}), by scancel (you or an admin). It is not retried; run the "
                f"{'flow' if runner else 'sub-flow'} again if the cancel was a mistake.")
    else:
        text = f"{head} ended ({state}, reason: {reason}) while its {user} was still running."
    return JobLost(text + note + tail, job_id=job_id, state=state, reason=reason, nodes=nodes,
                   failed_nodes=list(failed))


def job_env() -> dict[str, str]:
    """The variables of the environment that jobs must carry (see EXPORTED_ENV)."""
    return {k: os.environ[k] for k in EXPORTED_ENV if os.environ.get(k)}


def interface_address(interface: str) -> str:
    """The IPv4 address of the scheduler's network interface on this host (host.InterfaceError,
    a ValueError, when it is not here): the same lookup `askap-flows doctor` reports."""
    return host.interface_address(
        interface, fix="Set the profile's scheduler_interface to one that exists here "
        "(`askap-flows doctor --profile PROFILE` checks it).")


def scheduler_host(alloc: AllocationSpec) -> str:
    """The address the scheduler (and its dashboard) listens on: the scheduler interface's."""
    if alloc.scheduler_interface:
        return interface_address(alloc.scheduler_interface)
    return "127.0.0.1"


def run_cluster_kwargs(alloc: AllocationSpec, job_name: str, log_directory: Path,
                       scheduler_port: int = 0, dashboard_port: int = 0) -> dict:
    """SLURMCluster arguments for one run: its job, the exported environment, its ports."""
    host = scheduler_host(alloc)
    kwargs = cluster_kwargs(
        alloc,
        job_name=job_name,
        log_directory=str(log_directory),
        env=job_env(),
        dashboard_address=f"{host}:{dashboard_port}",
    )
    kwargs["scheduler_options"]["port"] = scheduler_port
    return kwargs
