"""What the Prefect UI and the progress line show of an allocation pool.

The pool itself: one markdown artifact keyed by its job name (``artifact_key``), written on the
flow run that opens the pool when it opens and again when it closes (a new version of the same
key: the UI's artifact page shows the last one, and each flow run keeps its versions). Outside a
flow run nothing is written (Prefect 3.9 deprecates artifacts without a run), only logged. Each
pooled step: ONE table artifact on its own sub-flow run with the job id, its step id (``J.S``), its
nodes and the pool's dashboard (a link in the description, which the UI shows as markdown). The
renderers are pure.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger("askap_flows")


@dataclass(frozen=True)
class PoolView:
    """A pool at one moment, as shown."""

    job_id: str
    job_name: str
    nodes: tuple[str, ...]
    cpus_per_node: int
    walltime: str
    dashboard: str | None
    state: str  # "open" or "closed"
    running: int = 0
    waiting: int = 0
    done: int = 0
    failed: int = 0


def progress_text(v: PoolView) -> str:
    """The pool's part of the main job's progress line."""
    return (f"pool job {v.job_id}: {v.running} running, {v.waiting} waiting, {v.done} done, "
            f"{v.failed} failed")


def artifact_key(job_name: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", job_name.lower()).strip("-") or "askapflows-pool"


def pool_markdown(v: PoolView) -> str:
    dashboard = f"[{v.dashboard}]({v.dashboard})" if v.dashboard else "-"
    rows = [("state", v.state), ("SLURM job", v.job_id), ("job name", f"`{v.job_name}`"),
            ("nodes", f"{','.join(v.nodes)} ({len(v.nodes)} x {v.cpus_per_node} CPUs)"),
            ("walltime", v.walltime), ("Dask dashboard", dashboard),
            ("steps", f"{v.done} done, {v.failed} failed, {v.running} running, "
                      f"{v.waiting} waiting")]
    table = "\n".join(f"| {k} | {val} |" for k, val in rows)
    return f"### Allocation pool: SLURM job {v.job_id}\n\n| | |\n|---|---|\n{table}\n"


def in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def record_pool(v: PoolView) -> bool:
    """The pool's artifact on the current flow run; False (and a log line) outside one."""
    if not in_flow_run():
        log.info("allocation pool %s (%s) %s outside a flow run: no artifact (open the pool "
                 "inside a @flow to see it in the Prefect UI)", v.job_id, v.job_name, v.state)
        return False
    from prefect.artifacts import create_markdown_artifact

    try:
        # ignore: Prefect 2 types it a coroutine; its @sync_compatible runs it here, synchronously
        create_markdown_artifact(  # type: ignore[unused-coroutine, unused-ignore]
            markdown=pool_markdown(v), key=artifact_key(v.job_name),
            description=f"Allocation pool {v.job_name}: SLURM job {v.job_id} ({v.state})")
    except Exception as exc:  # noqa: BLE001 - the UI's record must not end the pool
        log.warning("could not record the pool %s in Prefect: %s", v.job_name, exc)
        return False
    return True


def step_row(job_id: str, step_id: str | None, job_name: str, nodes: list[str],
             dashboard: str | None) -> dict[str, str]:
    return {"slurm_job_id": job_id, "slurm_step_id": step_id or "", "job_name": job_name,
            "nodes": ",".join(nodes), "dashboard": dashboard or ""}


def step_description(job_id: str, step_id: str | None, job_name: str,
                     dashboard: str | None) -> str:
    """The step artifact's description (markdown in the UI: the dashboard is a link)."""
    step = f", step {step_id}" if step_id else ""
    link = f"; [Dask dashboard (pool)]({dashboard})" if dashboard else ""
    return f"SLURM job {job_id}{step} of pool {job_name}{link}"


def record_step(job_id: str, step_id: str | None, job_name: str, nodes: list[str],
                dashboard: str | None) -> None:
    """A pooled step's one artifact on its sub-flow run: a table of its facts (shown in the
    Prefect UI), the pool's dashboard a link in its description. One API request per step."""
    from prefect.artifacts import create_table_artifact

    # ignore: Prefect 2 types it a coroutine; its @sync_compatible runs it here, synchronously
    create_table_artifact(  # type: ignore[unused-coroutine, unused-ignore]
        table=[step_row(job_id, step_id, job_name, nodes, dashboard)],
        description=step_description(job_id, step_id, job_name, dashboard))
