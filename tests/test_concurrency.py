"""Many sub-flows at once: a fresh cluster per call, unique ports, a bound, no orphans."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from urllib.parse import urlparse

import pytest

from conftest import askap_jobs, dask_workers


def _port(url):
    return urlparse(url).port


@pytest.mark.unit
def test_bad_composition_arguments_are_refused():
    from askap_flows.composition import run_subflows

    with pytest.raises(ValueError, match="max_concurrent must be a whole number >= 1, got 0"):
        run_subflows([print], max_concurrent=0)
    with pytest.raises(TypeError, match=r"calls\[1\] is int, not a callable"):
        run_subflows([print, 3])


@pytest.mark.unit
def test_prefect_2_runs_at_most_its_measured_limit_at_once(monkeypatch, caplog):
    """Prefect 2 stalled with 140 sub-flows at once (benchmarks/README.md): run_subflows caps it."""
    import threading

    from askap_flows import compat, composition

    assert compat.MAX_CONCURRENT_SUBFLOWS == (80 if compat.PREFECT_MAJOR < 3 else None)
    monkeypatch.setattr(compat, "MAX_CONCURRENT_SUBFLOWS", 2)
    lock, active, peak = threading.Lock(), [0], [0]

    def call():
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return True

    with caplog.at_level("WARNING", logger="askap_flows"):
        outcomes = composition.run_subflows([call] * 6, max_concurrent=6)
    assert all(o.ok for o in outcomes) and peak[0] == 2
    assert "running at most 2 of the 6 sub-flows at once, not 6" in caplog.text


@pytest.mark.unit
def test_summary_names_the_failed_subflow():
    from askap_flows.run import summary_table

    rows = [{"name": "mpi-0", "state": "completed", "job_id": "7", "nodes": ["node1"],
             "ranks": [{}], "seconds": 1.0},
            {"name": "mpi-1", "state": "failed", "job_id": None, "nodes": [], "ranks": [],
             "seconds": 0.0, "error": "CommandError: command exited with code 3: srun ..."}]
    text = summary_table(rows)
    line = [x for x in text.splitlines() if x.startswith("mpi-1")][0]
    assert line.split()[1] == "failed" and "exited with code 3" in line


@pytest.mark.mpi
def test_each_invocation_gets_its_own_cluster(hello_program):
    from prefect import flow

    from askap_flows.composition import run_subflows
    from askap_flows.flows import mpi_subflow

    @flow
    def parent(n: int):
        return run_subflows([partial(mpi_subflow, {"ntasks": 1}, name=f"c{i}") for i in range(n)],
                            max_concurrent=4)

    first, second = parent(2), parent(2)
    dashboards = [o.value.dashboard for o in first + second]
    assert all(o.ok for o in first + second)
    assert len(set(dashboards)) == 4


@pytest.mark.mpi
def test_two_pipelines_started_together_share_no_port(tmp_path, hello_program):
    cmd = [sys.executable, "-m", "askap_flows.run", "--subflows", "20", "--ntasks", "1",
           "--max-concurrent", "2", "--json", "--program", hello_program]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    port_sets = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        port_sets.append({_port(s["dashboard"]) for s in json.loads(out)["subflows"]})
    assert len(port_sets[0]) == len(port_sets[1]) == 20
    assert not port_sets[0] & port_sets[1]


@pytest.mark.mpi
def test_array_subflow_composes_with_mpi_subflows(hello_program):
    import numpy as np
    from prefect import flow

    from askap_flows.composition import run_subflows
    from askap_flows.flows import array_subflow, mpi_subflow

    @flow
    def parent():
        return run_subflows([partial(mpi_subflow, {"ntasks": 2}),
                             partial(array_subflow, 3, 1000, seed=5)], max_concurrent=2)

    mpi_out, arr_out = parent()
    assert mpi_out.ok and arr_out.ok, (mpi_out.error, arr_out.error)
    expected = sum(np.random.default_rng(5 + i).random(1000) for i in range(3)).mean()
    assert arr_out.value.mean == pytest.approx(expected)


@pytest.mark.slurm
def test_12_concurrent_slurm_subflows(hello_program, no_jobs_left):
    from prefect import flow

    from askap_flows.composition import run_subflows
    from askap_flows.flows import mpi_subflow

    @flow
    def parent():
        calls = [partial(mpi_subflow, {"nodes": 2, "ntasks": 2, "ntasks_per_node": 1},
                         {"nodes": 2, "ntasks_per_node": 1}, backend="slurm", profile="testbed",
                         name=f"many-{i}") for i in range(12)]
        return run_subflows(calls, max_concurrent=4)

    outcomes = parent()
    assert [o.ok for o in outcomes] == [True] * 12, [str(o.error) for o in outcomes if not o.ok]
    assert len({o.value.job_id for o in outcomes}) == 12
    assert len({_port(o.value.dashboard) for o in outcomes}) == 12
    for o in outcomes:
        assert len(o.value.nodes) == 2 and len(o.value.ranks) == 2


@pytest.mark.slurm
def test_array_subflow_on_slurm(no_jobs_left):
    from askap_flows.flows import array_subflow

    res = array_subflow(2, 500, seed=1, backend="slurm", profile="testbed")
    assert res.job_id and res.mean > 0
    from conftest import final_state

    assert final_state(res.job_id) == "COMPLETED"  # its worker left; nothing had to cancel it


def _jobs(prefix="askapflows-"):
    return [line.split()[0] for line in askap_jobs(prefix)]


@pytest.mark.slurm
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_pipeline_leaves_no_job_and_no_process(sig, tmp_path, hello_program):
    _signal_run(sig, tmp_path, hello_program, [], jobs=3)


@pytest.mark.slurm
def test_sigterm_to_a_pool_pipeline_leaves_no_job_and_no_process(tmp_path, hello_program):
    """`run --pool`: the pipeline's shutdown ends the pool's held job with its running step and
    the steps still queued in the pool (README, docs/writing_subflows.md: Lifecycle). Fails
    without the run's signal handling (interrupt.install: killed by SIGTERM, no summary). The
    job's end itself has three causes that overlap: the interrupt's cancel round, the pool's own
    close, and the pool's Dask worker leaving when its scheduler (in the pipeline) is gone; with
    the first two removed it still passed (2026-12-04)."""
    _signal_run(signal.SIGTERM, tmp_path, hello_program, ["--pool", "1"], jobs=1)


def _signal_run(sig, tmp_path, hello_program, args: list[str], jobs: int) -> None:
    """A main job of 3 sub-flows whose MPI steps sleep 120 s gets ``sig`` once ``jobs`` SLURM
    jobs of it run their first step: it exits 130, and no job, rank or Dask worker is left."""
    profile = tmp_path / "sleepy.yaml"
    prefix = f"sigtest{os.getpid()}{sig.value}{len(args)}"  # only this test's jobs are watched
    profile.write_text(f"allocation:\n  job_name_prefix: {prefix}\n"
                       "  nodes: 1\n  ntasks_per_node: 1\n  partition: debug\n"
                       "  interface: lo\n  scheduler_interface: lo\n"
                       "mpi:\n  nodes: 1\n  ntasks: 1\n  args: ['--sleep', '120']\n")
    home = tmp_path / "home"
    workers_before = dask_workers()
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.run", "--backend", "slurm", "--profile", str(profile),
         "--subflows", "3", "--max-concurrent", "3", "--program", hello_program, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "ASKAP_FLOWS_HOME": str(home)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the MPI steps of this run's jobs are running
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        ids = [line.split()[1] for line in askap_jobs(prefix)]
        steps = subprocess.run(["squeue", "-h", "-s", "-o", "%i"], capture_output=True,
                               text=True).stdout.split()
        if len(ids) == jobs and all(f"{i}.0" in steps for i in ids):
            break
        time.sleep(0.5)
    assert len(_jobs(prefix)) == jobs, f"the {jobs} job(s) never ran"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    # Prefect 2 may hang in its own teardown after the jobs are gone; the main job then ends
    # itself 30 s after the signal (the message differs, the outcome below does not)
    assert "interrupted: no SLURM job of this run is left" in err or "exiting now" in err, err[-3000:]
    deadline = time.monotonic() + 30
    while _jobs(prefix) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _jobs(prefix) == []
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    stray = [line for line in ps.splitlines() if str(home) in line or "--sleep 120" in line]
    assert stray == []
    deadline = time.monotonic() + 20
    while dask_workers() - workers_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not dask_workers() - workers_before, "Dask workers outlived their cancelled jobs"


@pytest.mark.slurm
def test_cleanup_lists_then_cancels_leftover_jobs(tmp_path):
    job = subprocess.run(["sbatch", "--parsable", "-J", "askapflows-orphan", "-o", "/dev/null",
                          "--wrap", "sleep 300"], capture_output=True, text=True, check=True)
    job_id = job.stdout.strip().split(";")[0]
    cli = [sys.executable, "-m", "askap_flows.cli", "cleanup"]
    listed = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and job_id in listed.stdout and "--yes" in listed.stdout
    assert "askapflows-orphan" in _jobs()
    done = subprocess.run(cli + ["--yes"], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "askapflows-orphan" not in _jobs()
