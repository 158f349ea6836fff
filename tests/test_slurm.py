"""The SLURM backend on the real 3-node test bed."""

import json
import subprocess
import time
import uuid

import pytest

from askap_flows import slurm_query
from conftest import askap_jobs, run_main

pytestmark = pytest.mark.slurm


def test_three_node_subflow_forms_one_world(hello_program, no_jobs_left, monkeypatch):
    from askap_flows import board, compat
    from askap_flows.flows import mpi_subflow

    submitted = []
    b = board.board()
    real = b.submitted
    monkeypatch.setattr(b, "submitted", lambda *a: (submitted.append(time.time()), real(*a)))
    name = f"world-{uuid.uuid4().hex[:6]}"
    res = mpi_subflow({"nodes": 3, "ntasks": 6}, backend="slurm", profile="testbed", name=name)
    if compat.PREFECT_MAJOR >= 3:  # its job was queued before its flow run was created
        assert len(submitted) == 1 and submitted[0] < flow_run_created(name), submitted
    assert len(res.ranks) == 6
    assert all(r.size == 6 for r in res.ranks)
    assert len({r.processor for r in res.ranks}) == 3
    assert all(r.allreduce == 15 for r in res.ranks)
    assert res.job_id and res.nodes == ["node1", "node2", "node3"]
    # SLURM's own record of the job (not our text): it had 3 nodes, and it is gone from the queue
    info = slurm_query.job_info(res.job_id)
    assert info.get("NumNodes") == "3", info
    assert info.get("JobName", "").startswith("askapflows-")
    queued = subprocess.run(["squeue", "-h", "-j", res.job_id, "-o", "%T"], capture_output=True,
                            text=True).stdout.strip()
    assert queued in ("", "COMPLETING", "CANCELLED", "COMPLETED"), queued


def test_main_job_on_slurm(hello_program, tmp_path, no_jobs_left):
    r = run_main("--backend", "slurm", "--profile", "testbed", "--subflows", "2", "--json",
                 env={"ASKAP_FLOWS_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(r.stdout)
    subs = data["subflows"]
    assert [s["name"] for s in subs] == ["mpi-0", "mpi-1"]
    assert len({s["job_id"] for s in subs}) == 2
    for s in subs:
        assert s["state"] == "completed" and s["nodes"] == ["node1", "node2", "node3"]
        assert len(s["ranks"]) == 6 and {x["size"] for x in s["ranks"]} == {6}


def flow_run_created(name: str) -> float:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(
            any_=[name])))
    return run.created.timestamp()


def test_a_cluster_no_flow_run_used_is_closed_with_its_job(no_jobs_left):
    """Prefect 3 builds a SLURM sub-flow's cluster before its flow run: when no flow run gets to
    use it (its creation failed, an interrupt came first), leaving the block closes it."""
    from askap_flows import compat, runners
    from askap_flows.resolve import resolve

    alloc = resolve("testbed", backend="slurm").allocation_spec()
    with runners.cluster_for_run(alloc, "slurm") as run:
        built = runners._built.get(run.token)
    if compat.PREFECT_MAJOR >= 3:
        assert built is not None and built.status.name == "closed", built
    assert runners._built == {}
    assert askap_jobs(run.job_name) == []
