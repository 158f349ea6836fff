"""Asking SLURM, through :mod:`askap_flows.shell`: is it there, would it take this job, which jobs
and nodes are there and in what state. What SLURM already accepted is asked once per process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Sequence

from . import clusters as clusters_
from . import shell
from .errors import AskapFlowsError

SLURM_INSTALL_HINT = (
    "Is this a SLURM login node? `sinfo` must work here: load the site's slurm module, or set "
    "SLURM_CONF to the cluster's slurm.conf. On the project's test bed run "
    "`scripts/slurm_testbed.sh up` and `source /tmp/askap_testbed/env.sh`."
)


class SlurmError(AskapFlowsError, RuntimeError):
    """SLURM refused or lost a job; the message says what SLURM said and what to do."""


def _slurm(argv: Sequence[str], timeout: float = 30) -> str:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"`{argv[0]}` is not on PATH. {SLURM_INSTALL_HINT}")
    try:
        return shell.output(argv, timeout=timeout)
    except shell.CommandError as exc:
        raise SlurmError(f"{exc}\n{SLURM_INSTALL_HINT}") from None


_checked: dict[str, str] = {}  # what SLURM already accepted in this process (sinfo, test-only)
_checked_lock = threading.Lock()
_asking: dict[str, threading.Lock] = {}  # one lock per question: concurrent callers ask once


def _once(key: str, ask) -> str:
    """``ask()``'s answer, asked once per process however many threads want it at once (they wait
    for the first one); a failed ask is not remembered, so the next caller asks again."""
    with _checked_lock:
        if key in _checked:
            return _checked[key]
        lock = _asking.setdefault(key, threading.Lock())
    with lock:
        with _checked_lock:
            if key in _checked:
                return _checked[key]
        answer = ask()
        with _checked_lock:
            _checked[key] = answer
        return answer


def check_available(clusters: str | None = None) -> None:
    """Raise SlurmError with the fix when SLURM's commands are missing or the controller (of the
    profile's ``clusters:``, asked with -M) is down. Once SLURM answered, later calls in this
    process ask nothing (one ``sinfo`` per process and clusters, also for many sub-flows)."""
    for cmd in ("sbatch", "srun", "squeue", "scancel"):
        if shutil.which(cmd) is None:
            raise SlurmError(f"`{cmd}` is not on PATH. {SLURM_INSTALL_HINT}")

    where = clusters_.args(clusters)

    def ask() -> str:
        try:
            _slurm(["sinfo", *where, "-h", "-o", "%P"], timeout=20)
        except SlurmError as exc:
            if not where:
                raise
            raise SlurmError(
                f"{exc}\nThe profile's clusters: {clusters} is asked with `sinfo -M {clusters}`, "
                "which needs slurmdbd to know that cluster: check the name with `sacctmgr list "
                "clusters` (`askap-flows doctor --profile PROFILE` says what is wrong).") from None
        return "ok"

    _once(" ".join(["sinfo", *where]), ask)


def test_submit(script: str) -> str:
    """``sbatch --test-only``: SLURM validates the job (partition, nodes, account), submits nothing.

    A script SLURM accepted once in this process is not asked about again, also when many
    sub-flows start at once: pass the same script for the same partition and shape
    (``run_cluster_kwargs`` with a fixed job name and ports).
    """
    return _once(script, lambda: _test_submit(script))


def _test_submit(script: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="askap-test-") as fh:
        fh.write(script)
        fh.flush()
        res = shell.run(["sbatch", "--test-only", fh.name], check=False, timeout=30)
    said = (res.stderr or res.stdout).strip()
    if res.returncode != 0:
        try:
            nodes = shell.output(["sinfo", *clusters_.args(clusters_.of_script(script)), "-h", "-o",
                                  "%P %a nodes=%D state=%t"], timeout=20)
        except shell.CommandError:
            nodes = "(sinfo failed)"
        raise SlurmError(
            f"SLURM rejected the job before submission: {said}\nWhat sinfo reports now:\n"
            f"{nodes.strip()}\nCheck the profile's partition, account, nodes and memory against "
            "it (`askap-flows render` shows the job script). Nothing was submitted."
        )
    return said


def jobs_with_prefix(prefix: str, clusters: str | None = None
                     ) -> list[tuple[str, str, str, str, str]]:
    """(cluster, job id, name, state, nodes) of this user's jobs on ``clusters`` (-M; None: this
    host's cluster) whose name starts with ``prefix-``."""
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    out = _slurm(clusters_.queue_command(user, clusters))
    return [r for r in clusters_.parse_queue(out, clusters) if r[2].startswith(f"{prefix}-")]


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (empty when SLURM no longer knows the job)."""
    try:
        out = shell.output(["scontrol", "-o", "show", "job", str(job_id)], timeout=30)
    except shell.CommandError:
        return {}
    info: dict[str, str] = {}
    for item in out.split():
        if "=" in item:
            k, v = item.split("=", 1)
            info.setdefault(k, v)
    return info


def node_problems(nodes: Sequence[str], cluster: str = clusters_.LOCAL
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """(failed, other): nodes SLURM reports down or not responding ('*'), which lose jobs; and
    nodes that are merely drained, draining, in maintenance or completing, which do not. Each
    maps a node to its state and SLURM's reason. One ``sinfo`` call, at the moment a task failed."""
    if not nodes:
        return {}, {}
    try:
        out = shell.output(clusters_.nodes_query(cluster, nodes), timeout=30)
    except shell.CommandError:
        return {}, {}
    return classify_nodes(out)


def classify_nodes(sinfo_out: str) -> tuple[dict[str, str], dict[str, str]]:
    """``sinfo -N -o '%N|%t|%E'`` lines split into (failed, other) as in ``node_problems``."""
    failed, other = {}, {}
    for line in sinfo_out.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) != 3:
            continue
        node, state, reason = parts
        text = state + (f", SLURM reason: {reason}" if reason and reason != "none" else "")
        if state.endswith("*") or state.startswith(("down", "fail")) and state != "failg":
            failed[node] = text
        elif state.startswith(("drain", "drng", "maint", "comp", "failg")):
            other[node] = text
    return failed, other

def hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``node[1-3]``."""
    if not nodelist or nodelist in ("(null)", "None"):
        return []
    return _slurm(["scontrol", "show", "hostnames", nodelist]).split()
