"""Profile-driven layouts, awkward paths and the MPI plugin mismatch, for real on the test bed."""

import subprocess
import sys

import pytest

from askap_flows import slurm, slurm_query
from askap_flows.mpi import MPIError

pytestmark = pytest.mark.slurm


def test_two_nodes_two_tasks_each_two_cpus(tmp_path, hello_program, no_jobs_left):
    from askap_flows.flows import mpi_subflow

    profile = tmp_path / "layout.yaml"
    profile.write_text(
        "allocation:\n  nodes: 2\n  ntasks_per_node: 2\n  cpus_per_task: 2\n  partition: debug\n"
        "  interface: lo\n  scheduler_interface: lo\n"
        "mpi:\n  nodes: 2\n  ntasks: 4\n  ntasks_per_node: 2\n  cpus_per_task: 2\n")
    res = mpi_subflow(backend="slurm", profile=profile)
    by_node = {}
    for r in res.ranks:
        by_node.setdefault(r.processor, []).append(r.rank)
    assert sorted(len(v) for v in by_node.values()) == [2, 2]  # 2 nodes, 2 ranks each
    assert {r.cpus for r in res.ranks} == {"2"} and {r.size for r in res.ranks} == {4}
    info = slurm_query.job_info(res.job_id)  # SLURM's own record of the job
    assert info["NumNodes"] == "2" and info["CPUs/Task"] == "2", info
    assert info["NumTasks"] == "4", info


def test_awkward_paths_are_quoted_and_intact(tmp_path, hello_program, monkeypatch, no_jobs_left):
    from askap_flows.flows import mpi_subflow

    home = tmp_path / "aw k'd;x"
    scratch = tmp_path / "sc ratch 'q;y"
    monkeypatch.setenv("ASKAP_FLOWS_HOME", str(home))
    res = mpi_subflow({"nodes": 1, "ntasks": 1, "ntasks_per_node": 1},
                      {"nodes": 1, "ntasks_per_node": 1, "local_directory": str(scratch)},
                      backend="slurm", profile="testbed")
    assert len(res.ranks) == 1
    logs = list((home / "logs").glob(f"*-{res.job_id}.err"))
    assert logs, list((home / "logs").iterdir())
    assert any(p.name.startswith("dask-scratch-space") for p in scratch.iterdir())
    script = slurm.render_job_script(slurm.run_cluster_kwargs(
        slurm.AllocationSpec(local_directory=str(scratch), partition="debug"), "askapflows-x",
        home / "logs"))
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_wrong_plugin_gives_the_plugin_fix(hello_program, no_jobs_left):
    from askap_flows.flows import mpi_subflow

    with pytest.raises(MPIError, match="MPICH needs --mpi=pmi2"):
        mpi_subflow({"nodes": 2, "ntasks": 4, "ntasks_per_node": 2, "mpi_plugin": "none"},
                    {"nodes": 2}, backend="slurm", profile="testbed")


def test_mpi4py_program_across_nodes(no_jobs_left):
    probe = subprocess.run([sys.executable, "-c", "import mpi4py.MPI"], capture_output=True,
                           text=True)
    assert probe.returncode == 0, f"mpi4py does not load (scripts/test.sh builds it): {probe.stderr}"
    from askap_flows.flows import mpi_subflow

    res = mpi_subflow({"nodes": 3, "ntasks": 3, "ntasks_per_node": 1, "program": sys.executable,
                       "args": ["-m", "askap_flows.mpi_hello"]},
                      {"nodes": 3, "ntasks_per_node": 1}, backend="slurm", profile="testbed")
    assert [r.size for r in res.ranks] == [3, 3, 3]
    assert len({r.processor for r in res.ranks}) == 3 and res.ranks[0].allreduce == 3
