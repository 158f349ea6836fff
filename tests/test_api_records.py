"""What a pipeline leaves in the Prefect API (read back through Prefect's client, not the logs):
the parent flow run, its sub-flow runs with their states, and each sub-flow's SLURM job and
Dask dashboard records. Runs against the session's PostgreSQL-backed server (conftest)."""

import asyncio
import json
from functools import partial

import pytest

pytestmark = pytest.mark.slurm


async def _records(parent_id: str):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    async with get_client() as client:
        parent = await client.read_flow_run(parent_id)
        subs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        artifacts = {}
        for sub in subs:
            artifacts[sub.name] = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[sub.id])))
    return parent, subs, artifacts


def test_pipeline_runs_and_slurm_records_are_in_the_api(hello_program, no_jobs_left):
    from prefect import flow

    from askap_flows import compat
    from askap_flows.composition import run_subflows
    from askap_flows.flows import mpi_subflow

    @flow(name="api-records-pipeline")
    def pipeline():
        calls = [partial(mpi_subflow, {"nodes": 2, "ntasks": 2, "ntasks_per_node": 1}, {"nodes": 2}, backend="slurm",
                         profile="testbed", name=f"api-rec-{i}") for i in range(2)]
        outcomes = run_subflows(calls, max_concurrent=2)
        return str(compat.current_flow_run_id()), outcomes

    parent_id, outcomes = pipeline()
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    results = {o.value.name: o.value for o in outcomes}

    parent, subs, artifacts = asyncio.run(_records(parent_id))
    assert parent.state.type.value == "COMPLETED"
    assert sorted(s.name for s in subs) == ["api-rec-0", "api-rec-1"]
    assert {s.state.type.value for s in subs} == {"COMPLETED"}
    for sub in subs:
        kinds = {a.type: a for a in artifacts[sub.name]}  # a link artifact is stored as markdown
        assert set(kinds) == {"markdown", "table"}, kinds
        table = kinds["table"].data
        rows = json.loads(table) if isinstance(table, str) else table
        row = rows[0]
        result = next(r for r in results.values() if r.job_id == row["slurm_job_id"])
        assert row["job_name"] == result.name and row["job_name"].startswith("askapflows-")
        assert row["nodes"] == ",".join(result.nodes) and len(result.nodes) == 2
        assert row["dashboard"] == result.dashboard
        assert result.dashboard.startswith("http://127.0.0.1:")
        assert result.dashboard in str(kinds["markdown"].data)
