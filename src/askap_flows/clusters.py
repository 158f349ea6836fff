"""Which SLURM cluster a job lives on: the ``-M`` of every command about it (pure functions).

A profile's ``clusters:`` (``sbatch --clusters``) sends its jobs to another cluster of a
multi-cluster site; every later command about those jobs (the job board's query, ``scancel``,
``sinfo`` about their nodes, ``squeue`` for ``cleanup``) must name the same cluster with ``-M``,
or it asks this host's own controller, which has never heard of them. Job ids are numbered per
cluster, so a job is known by (cluster, id): ``""`` is this host's own cluster, which is asked
without ``-M`` (``-M`` needs slurmdbd, which a single-cluster site may not run).

``clusters:`` may list several clusters ("a,b": sbatch picks the one that starts the job first);
sbatch then says which one took it ("Submitted batch job 42 on cluster b"). ``scontrol`` takes one
cluster per call, so the board asks each listed cluster in turn.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LOCAL = ""  # this host's own cluster: commands without -M

_SUBMITTED_ON = re.compile(r"Submitted batch job (\d+)(?: on cluster (\S+))?")


def members(clusters: str | None) -> list[str]:
    """The clusters a ``clusters:`` value names, in order (``[LOCAL]`` when none)."""
    names = [c.strip() for c in (clusters or "").split(",") if c.strip()]
    return list(dict.fromkeys(names)) or [LOCAL]


def args(clusters: str | None) -> list[str]:
    """``-M CLUSTERS`` for a command about jobs on ``clusters`` (nothing for the local one)."""
    names = [c for c in members(clusters) if c]
    return ["-M", ",".join(names)] if names else []


def submitted_on(sbatch_out: str, clusters: str | None) -> tuple[str, str]:
    """(job id, cluster) from sbatch's answer. sbatch names the cluster only when ``--clusters``
    was given; a single ``clusters:`` value is the cluster whatever sbatch said."""
    m = _SUBMITTED_ON.search(sbatch_out)
    if m is None:
        digits = re.search(r"\d+", sbatch_out)
        job_id = digits.group(0) if digits else ""
        return job_id, members(clusters)[0]
    named = m.group(2) or LOCAL
    listed = members(clusters)
    return m.group(1), named if named or len(listed) != 1 else listed[0]


def job_query(cluster: str) -> list[str]:
    """The job board's one query for every job ``cluster`` knows (see ``board.query_command``)."""
    return ["scontrol", *args(cluster), "-o", "show", "job"]


def cancel_ids(cluster: str, job_ids: Iterable[str]) -> list[str]:
    """``scancel`` of these jobs, all on ``cluster`` (ids are per cluster: never several -M)."""
    return ["scancel", *args(cluster), *job_ids]


def cancel_name(clusters: str | None, name: str) -> list[str]:
    """``scancel --name`` on every cluster a ``clusters:`` value names (names are unique)."""
    return ["scancel", *args(clusters), "--name", name]


_QUEUE_HEADER = "JOBID|NAME|STATE|NODELIST"  # squeue's header line for the format below


def queue_command(user: str, clusters: str | None) -> list[str]:
    """``squeue`` of this user's jobs on ``clusters``, one ``id|name|state|nodes`` line each.
    With ``-M``, no ``-h``: it would also drop the ``CLUSTER: NAME`` line heading each cluster's
    jobs (SLURM 22.05), the only place squeue says which cluster a job is on."""
    where = args(clusters)
    return ["squeue", *where, *([] if where else ["-h"]), "-u", user, "-o", "%i|%j|%T|%N"]


def parse_queue(out: str, clusters: str | None = None) -> list[tuple[str, str, str, str, str]]:
    """(cluster, id, name, state, nodes) from ``queue_command``'s answer for ``clusters``: each
    cluster's lines follow its ``CLUSTER: NAME`` line (without -M all are the local cluster's)."""
    rows, cluster = [], members(clusters)[0]
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("CLUSTER:"):
            cluster = line.split(":", 1)[1].strip()
        elif line.count("|") == 3 and line != _QUEUE_HEADER:
            job_id, name, state, nodes = line.split("|")
            rows.append((cluster, job_id, name, state, nodes))
    return rows


def nodes_query(cluster: str, nodes: Iterable[str]) -> list[str]:
    """``sinfo`` of these nodes of ``cluster``: state and reason (see ``slurm.node_problems``)."""
    return ["sinfo", *args(cluster), "-h", "-N", "-n", ",".join(nodes), "-o", "%N|%t|%E"]


def where(cluster: str) -> str:
    """`` on cluster NAME`` for messages about a job (nothing for the local cluster)."""
    return f" on cluster {cluster}" if cluster else ""


def of_script(script: str) -> str | None:
    """The ``#SBATCH --clusters=`` value of a job script (None: this host's cluster)."""
    for line in script.splitlines():
        if line.startswith("#SBATCH --clusters="):
            return line.split("=", 1)[1].strip()
    return None
