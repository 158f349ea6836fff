"""The SLURM backend on the real 3-node test bed."""

import json
import subprocess

import pytest

from askap_flows import slurm_query
from conftest import run_main

pytestmark = pytest.mark.slurm


def test_three_node_subflow_forms_one_world(hello_program, no_jobs_left):
    from askap_flows.flows import mpi_subflow

    res = mpi_subflow({"nodes": 3, "ntasks": 6}, backend="slurm", profile="testbed")
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
