"""What SLURM says about a job: its state as the job board keeps it, and the one query (with its
parsing) that answers for every job a cluster knows. Job ids are numbered per cluster, so a job is
named by (cluster, id) (clusters.py)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from . import clusters

#: states of a job that has not ended yet (everything else is final)
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
})

#: ends a job cannot come back from (a NODE_FAIL or PREEMPTED job is requeued with JobRequeue=1)
DONE_STATES = frozenset({"COMPLETED", "CANCELLED"})

#: the state of a job that left SLURM's answer before its final state was seen
GONE = "ENDED"


@dataclass(frozen=True)
class JobState:
    job_id: str
    name: str
    state: str
    reason: str
    nodelist: str
    time_limit: str = ""
    cluster: str = clusters.LOCAL  # job ids are per cluster: (cluster, job_id) names a job

    @property
    def ended(self) -> bool:
        return self.state not in ACTIVE_STATES

    @property
    def key(self) -> tuple[str, str]:
        return self.cluster, self.job_id


def query_command(cluster: str = clusters.LOCAL) -> list[str]:
    """One query for every job SLURM knows, including those that ended less than MinJobAge ago
    (on ``cluster``: ``-M`` for a profile's ``clusters:``, see clusters.py).

    ``scontrol -o show job`` costs slurmctld ONE RPC (REQUEST_JOB_INFO); ``squeue`` sends that
    same RPC (it filters by name on the client side) plus a REQUEST_PARTITION_INFO, measured with
    ``sdiag`` on SLURM 22.05. The board keeps the lines of the names it tracks.
    """
    return clusters.job_query(cluster)


_FIELDS = {k: re.compile(rf"(?:^| ){k}=(\S*)") for k in
           ("JobId", "JobName", "JobState", "Reason", "NodeList", "TimeLimit")}


def parse_jobs(text: str, names: Iterable[str] | None = None,
               cluster: str = clusters.LOCAL) -> list[JobState]:
    """The lines of ``scontrol -o show job`` (asked of ``cluster``) as JobStates, only those of
    ``names`` if given (lines without a job id, e.g. "No jobs in the system", are skipped)."""
    wanted = None if names is None else set(names)
    jobs = []
    for line in text.splitlines():
        found = {k: m.group(1) if (m := rx.search(line)) else "" for k, rx in _FIELDS.items()}
        if not found["JobId"] or (wanted is not None and found["JobName"] not in wanted):
            continue
        nodes = found["NodeList"] if found["NodeList"] != "(null)" else ""
        jobs.append(JobState(found["JobId"], found["JobName"], found["JobState"],
                             found["Reason"], nodes, found["TimeLimit"], cluster))
    return jobs
