import subprocess

import pytest

from askap_flows import slurm, slurm_query
from askap_flows.spec import AllocationSpec
from askap_flows.spec_profile import build_specs

pytestmark = pytest.mark.unit


def _kwargs(alloc, env=None):
    return slurm.cluster_kwargs(alloc, job_name="askapflows-t", log_directory="/logs",
                                env=env or {}, dashboard_address="127.0.0.1:0")


def test_cluster_kwargs_for_a_multi_node_job():
    alloc, _ = build_specs("testbed")
    kw = _kwargs(alloc)
    assert kw["n_workers"] == 1 and kw["processes"] == 1
    assert kw["job_directives_skip"] == ["-n 1"]
    assert kw["job_extra_directives"][:2] == ["--nodes=3", "--ntasks-per-node=2"]
    assert kw["interface"] == "lo" and kw["scheduler_options"]["interface"] == "lo"
    assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:0"


def test_rendered_script_requests_three_nodes_and_not_one_task():
    alloc, _ = build_specs("testbed")
    script = slurm.render_job_script(_kwargs(alloc, {"PREFECT_API_URL": "http://127.0.0.1:1/api",
                                                     "SLURM_CONF": "/a b/slurm.conf"}))
    lines = script.splitlines()
    assert "#SBATCH --nodes=3" in lines and "#SBATCH --ntasks-per-node=2" in lines
    assert "#SBATCH -n 1" not in lines
    assert "#SBATCH -p debug" in lines and "#SBATCH -J askapflows-t" in lines
    assert "export SLURM_CONF='/a b/slurm.conf'" in lines
    assert "export PREFECT_API_URL=http://127.0.0.1:1/api" in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_site_directives():
    alloc = AllocationSpec(nodes=2, qos="high", reservation="askapdev", clusters="galaxy",
                           constraint="cpu", exclusive=True, extra_directives=["--gres=gpu:1"])
    assert slurm.job_directives(alloc) == [
        "--nodes=2", "--ntasks-per-node=1", "--qos=high", "--reservation=askapdev",
        "--clusters=galaxy", "--constraint=cpu", "--exclusive", "--gres=gpu:1"]


def test_preflight_checks_ask_slurm_once_when_many_sub_flows_start_at_once(monkeypatch):
    """48 sub-flows starting at once in a fresh process: one sinfo and one sbatch --test-only,
    not one per sub-flow (each racing past the empty cache; benchmarks/controller_load.py)."""
    import threading
    import time

    from askap_flows import shell

    calls = []

    def fake_run(argv, **kw):
        calls.append(argv[0] if argv[0] == "sinfo" else "test-only")
        time.sleep(0.2)  # SLURM takes a moment to answer: every thread gets to ask meanwhile
        return shell.Completed(list(argv), 0, "debug\n", "", 0.2)

    monkeypatch.setattr(slurm_query.shell, "run", fake_run)
    monkeypatch.setattr(slurm_query.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    monkeypatch.setattr(slurm_query, "_checked", {})

    def preflight():
        slurm_query.check_available()
        slurm_query.test_submit("#!/bin/sh\n#SBATCH -p debug\n")

    threads = [threading.Thread(target=preflight) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == ["sinfo", "test-only"]
