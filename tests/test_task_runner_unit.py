"""task_runner(cluster) and the dask-jobqueue form of cluster YAML, without SLURM."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest

from askap_flows import cluster_yaml, flow_runner
from askap_flows.resolve import resolve
from askap_flows.spec import SpecError
from conftest import ROOT

pytestmark = pytest.mark.unit

ADAPTIVE = ROOT / "examples" / "clusters" / "adaptive.yaml"
MPI = ROOT / "examples" / "clusters" / "mpi.yaml"
FLINT_STYLE = {
    "cluster_class": "dask_jobqueue.SLURMCluster",
    "cluster_kwargs": {
        "cores": 1, "processes": 1, "job_cpu": 4, "memory": "8GB", "walltime": "01:00:00",
        "queue": "work", "account": "askaprt", "interface": "ib0", "local_directory": "/tmp/a b",
        "log_directory": "/scratch/my logs", "job_extra_directives": ["--qos=high"],
        "job_script_prologue": ["module load singularity"], "python": "/opt/py env/bin/python",
    },
    "adapt_kwargs": {"minimum": 1, "maximum": 512},
}


def run_kwargs(profile, **kw):
    defaults = dict(job_name="p-abc", log_directory="/logs", env={"PREFECT_API_URL": "http://x"},
                    scheduler_port=20001, dashboard_address="10.0.0.1:20002")
    return cluster_yaml.harden(profile, **{**defaults, **kw})


def test_task_runner_is_prefect_dasks_runner_with_a_cluster_per_run():
    from prefect_dask import DaskTaskRunner

    import askap_flows

    runner = askap_flows.task_runner("testbed")
    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_class is flow_runner.RunCluster
    assert runner.cluster_kwargs["resolved"].allocation.nodes == 3
    assert not runner.adapt_kwargs
    copy = runner.duplicate()  # what Prefect runs each flow run with (2.20 and 3.x)
    assert copy is not runner and copy.cluster_class is flow_runner.RunCluster
    assert copy.cluster_kwargs["resolved"] == runner.cluster_kwargs["resolved"]


def runner_profile(cluster, **overrides):
    """What task_runner(cluster, **overrides) builds each run from."""
    return flow_runner.task_runner(cluster, **overrides).cluster_kwargs["resolved"]


def test_each_run_of_a_profile_gets_its_own_job_name_and_ports():
    plan = runner_profile("testbed", nodes=1, adapt_kwargs={"minimum": 1, "maximum": 3})
    one = flow_runner.cluster_kwargs(plan, "askapflows-aaa", "/l", "127.0.0.1", 20001, 20002)
    two = flow_runner.cluster_kwargs(plan, "askapflows-bbb", "/l", "127.0.0.1", 20003, 20004)
    assert (one["job_name"], two["job_name"]) == ("askapflows-aaa", "askapflows-bbb")
    assert one["scheduler_options"] == {"port": 20001, "dashboard_address": "127.0.0.1:20002",
                                        "interface": "lo"}
    assert two["scheduler_options"]["port"] == 20003
    assert one["n_workers"] == 0  # adapt(minimum, maximum) decides
    assert plan.adapt_kwargs == {"minimum": 1, "maximum": 3}


def test_library_form_mpi_shape_is_one_job_of_n_nodes():
    plan = runner_profile("testbed")
    kw = flow_runner.cluster_kwargs(plan, "askapflows-aaa", "/l", "127.0.0.1", 1, 2)
    assert kw["n_workers"] == 1 and "--nodes=3" in kw["job_extra_directives"]
    assert kw["python"].startswith("exec ")


def test_adaptive_shape_needs_single_node_jobs():
    with pytest.raises(SpecError, match="single-node worker jobs.*nodes=3.*Set nodes=1"):
        runner_profile("testbed", adapt_kwargs={"minimum": 1, "maximum": 3})


def test_unknown_override_of_the_library_form_says_what_is_valid():
    with pytest.raises(SpecError, match="allocation: unknown key.*nodez.*Valid keys are: nodes"):
        runner_profile("testbed", nodez=2)


def test_jobqueue_form_is_accepted_unchanged_and_hardened():
    plan = runner_profile(FLINT_STYLE)
    assert plan.adapt_kwargs == {"minimum": 1, "maximum": 512}
    kw = run_kwargs(plan.jobqueue)
    assert kw["job_name"] == "p-abc"
    assert kw["python"] == "exec '/opt/py env/bin/python'"
    assert kw["n_workers"] == 0
    assert kw["scheduler_options"] == {"port": 20001, "dashboard_address": "10.0.0.1:20002"}
    assert "log_directory" not in kw and "local_directory" not in kw  # written quoted instead
    assert kw["job_extra_directives"] == [
        "--qos=high", '--output="/scratch/my logs/%x-%j.out"',
        '--error="/scratch/my logs/%x-%j.err"']
    assert kw["job_script_prologue"] == [
        "export PREFECT_API_URL=http://x", "export DASK_TEMPORARY_DIRECTORY='/tmp/a b'",
        "module load singularity"]
    assert kw["job_directives_skip"] == []  # single-node jobs keep dask-jobqueue's -n 1


def test_jobqueue_form_multi_node_job_drops_dask_jobqueues_dash_n_1():
    profile = cluster_yaml.read({"cluster_kwargs": {"job_extra_directives": ["--nodes=3"]}}, "x")
    kw = run_kwargs(profile)
    assert kw["job_directives_skip"] == ["-n 1"] and kw["n_workers"] == 1


def test_unknown_cluster_kwargs_list_the_valid_ones():
    data = {"cluster_class": "dask_jobqueue.SLURMCluster", "cluster_kwargs": {"coers": 2}}
    with pytest.raises(SpecError) as err:
        runner_profile(data)
    text = str(err.value)
    assert "unknown key(s) in cluster_kwargs: coers" in text
    for key in ("cores", "memory", "job_extra_directives", "job_script_prologue", "interface"):
        assert key in text
    assert "asynchronous" not in text.split("Valid keys are:")[1]


@pytest.mark.parametrize("data, said", [
    ({"cluster_class": "dask_jobqueue.SLURMCluster", "cluster_kwarg": {}},
     "unknown key.*cluster_kwarg.*cluster_class, cluster_kwargs, adapt_kwargs"),
    ({"cluster_class": "dask_jobqueue.PBSCluster"}, "PBSCluster.*SLURM clusters only"),
    ({"adapt_kwargs": {"minimum": 4, "maximum": 2}}, "minimum \\(4\\) is larger than maximum"),
    ({"adapt_kwargs": {"minimun": 1}}, "unknown key.*adapt_kwargs: minimun.*Valid keys.*minimum"),
    ({"cluster_kwargs": {"asynchronous": True}}, "asynchronous cannot be set: Prefect starts"),
    ({"cluster_kwargs": {"interface": "lo; reboot"}}, "interface 'lo; reboot' cannot go into"),
    ({"cluster_kwargs": {"job_extra_directives": "--qos=x"}}, "must be a list of strings"),
    ({"cluster_kwargs": {"walltime": "1 hour"}}, "walltime '1 hour' is not a SLURM time"),
    ({"cluster_class": "dask_jobqueue.SLURMCluster", "allocation": {}}, "mixes"),
])
def test_jobqueue_form_refuses_what_cannot_work(data, said):
    with pytest.raises(SpecError, match=said):
        runner_profile(data)


def test_managed_values_are_overridden_with_a_note(caplog):
    data = {"cluster_kwargs": {"dashboard_address": ":8787", "job_name": "flint",
                               "scheduler_options": {"port": 8786}},
            "adapt_kwargs": {"minimum": 1, "maximum": 2}}
    with caplog.at_level(logging.WARNING, logger="askap_flows"):
        plan = runner_profile(data, n_workers=4)
    said = caplog.text
    assert "dashboard_address (':8787') is not used: each run's scheduler gets its own" in said
    assert "scheduler_options.port (8786) is not used" in said
    assert "n_workers (4) is not used: with adapt_kwargs" in said
    assert "job_name ('flint') is the prefix of the job names" in said
    kw = run_kwargs(plan.jobqueue, job_name=f"{plan.prefix}-abc")
    assert kw["job_name"] == "flint-abc" and "dashboard_address" not in kw
    assert kw["scheduler_options"] == {"port": 20001, "dashboard_address": "10.0.0.1:20002"}
    assert kw["n_workers"] == 0


def test_example_profiles_read_in_both_shapes():
    assert runner_profile(ADAPTIVE).adapt_kwargs == {"minimum": 1, "maximum": 3}
    mpi_plan = runner_profile(MPI)
    assert not mpi_plan.adapt_kwargs and mpi_plan.prefix == "example-mpi"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "askap_flows.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_render_accepts_the_jobqueue_form():
    r = cli("render", "--profile", str(MPI))
    assert r.returncode == 0, r.stderr
    assert "#SBATCH -J example-mpi-RUNID" in r.stdout
    assert "#SBATCH --nodes=3" in r.stdout and "#SBATCH -n 1" not in r.stdout
    assert "\nexec " in r.stdout and "--interface lo" in r.stdout
    assert "is the prefix of the job names" in r.stderr
    r = cli("render", "--profile", str(ADAPTIVE))
    assert r.returncode == 0 and "adapt(minimum=1, maximum=3)" in r.stdout


def test_render_of_the_jobqueue_form_refuses_library_flags():
    r = cli("render", "--profile", str(MPI), "--nodes", "2")
    assert r.returncode != 0 and "dask-jobqueue's form: --nodes" in r.stderr
    assert "Traceback" not in r.stderr


def test_jobqueue_form_as_the_allocation_doctor_checks():
    alloc = cluster_yaml.as_allocation(runner_profile(FLINT_STYLE).jobqueue)
    assert (alloc.partition, alloc.account, alloc.interface, alloc.scheduler_interface) == (
        "work", "askaprt", "ib0", "ib0")
    assert (alloc.nodes, alloc.cpus_per_task, alloc.memory, alloc.walltime) == (
        1, 4, "8GB", "01:00:00")
    alloc = cluster_yaml.as_allocation(runner_profile(MPI).jobqueue)
    assert (alloc.nodes, alloc.ntasks_per_node, alloc.job_name_prefix) == (3, 2, "example-mpi")


RELEASE = threading.Event()


def _wait_for_release() -> None:
    RELEASE.wait(60)


def test_a_lost_job_fails_the_waiting_tasks_with_slurms_cause():
    import time

    import distributed

    from askap_flows.board import JobState
    from askap_flows.runner_watch import LostJobWatch

    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as c, \
            distributed.Client(c, set_as_default=False) as client:
        future = client.submit(_wait_for_release, pure=False)  # a task whose worker is gone
        while not c.scheduler.tasks:  # the watch acts seconds after the job is gone
            time.sleep(0.05)
        watch = LostJobWatch(c.scheduler_address, "p-abc", "/logs")
        watch.fail_tasks(JobState("123", "p-abc", "CANCELLED", "None", "", "00:10:00"))
        with pytest.raises(distributed.client.FutureCancelledError) as err:
            future.result(timeout=30)
        RELEASE.set()
    text = str(err.value)
    assert "its SLURM job ended" in text
    assert "SLURM job 123 (p-abc) on ? was cancelled" in text and "state CANCELLED" in text
    assert "/logs/p-abc-123.err" in text


def test_mpi_task_layout_over_the_profiles_mpi_section():
    plan = runner_profile("testbed")  # its mpi section: 3 nodes, 6 ranks, 2 per node, pmi2

    def step(mpi):  # what mpi_task resolves
        return resolve(plan, mpi=mpi, launcher="srun").mpi_spec()

    spec = step({"nodes": 2, "ntasks": 2})  # a new layout
    assert (spec.nodes, spec.ntasks, spec.ntasks_per_node, spec.mpi_plugin) == (2, 2, None, "pmi2")
    assert step({"timeout": 5}).ntasks_per_node == 2
    assert step({"launcher": "mpiexec"}).launcher == "srun"  # in the job
    with pytest.raises(SpecError, match="mpi: unknown key.*nodez.*Valid keys are: nodes, ntasks"):
        step({"nodez": 2})
    with pytest.raises(SpecError, match="wants 4 nodes but the allocation has 3"):
        step({"nodes": 4, "ntasks": 4})


def test_mpi_task_outside_a_runners_flow_says_how_to_use_it():
    from prefect import flow

    from askap_flows import mpi_run

    with pytest.raises(RuntimeError, match="task_runner is askap_flows.task_runner.*MPI shape"):
        mpi_run.mpi_task.fn({"nodes": 1, "ntasks": 1})

    @flow(name="no-dask")  # Prefect's default task runner (it has no Dask client)
    def no_dask():
        return mpi_run.mpi_task({"nodes": 1, "ntasks": 1})

    with pytest.raises(RuntimeError, match="task_runner is askap_flows.task_runner.*MPI shape"):
        no_dask()


@pytest.mark.parametrize("state,sinfo,said", [
    ("CANCELLED", "node1|idle|none\n", "was cancelled while its flow run was running (state "
     "CANCELLED"),
    ("TIMEOUT", "node1|idle|none\n", "reached its walltime (00:01:00) and SLURM ended it (state "
     "TIMEOUT). Raise the walltime of the task runner's cluster"),
    ("NODE_FAIL", "node1|down*|Not responding\n", "lost node(s) node1 while its flow run was "
     "running"),
])
def test_a_lost_jobs_message_under_the_runner_speaks_of_the_flow_run(monkeypatch, state, sinfo,
                                                                    said):
    from askap_flows import board, slurm, slurm_query

    monkeypatch.setattr(slurm, "hostnames", lambda nodelist: ["node1"])
    monkeypatch.setattr(slurm, "node_problems",
                        lambda nodes, cluster="": slurm_query.classify_nodes(sinfo))
    job = board.JobState("77", "run-x", state, "None", "node1", "00:01:00")
    text = str(slurm.job_lost(job, "run-x", "/logs/run-x-77.err", runner=True))
    assert said in text, text
    assert "sub-flow" not in text and "mpi_subflow" not in text, text


def test_the_lost_job_watch_starts_once_however_often_the_cluster_is_entered(monkeypatch):
    """Prefect 3 enters the runner's cluster with ``with``, and distributed's Cluster.__enter__
    runs __aenter__: RunCluster's watch was started twice, and the first one outlived the run."""
    import threading
    import types

    from askap_flows import runner_watch
    from askap_flows.flow_runner import RunCluster

    cluster = object.__new__(RunCluster)  # no SLURM: only what askap_watch reads
    cluster.askap_resolved = types.SimpleNamespace(adapt_kwargs={})  # the MPI shape
    cluster.askap_job_name, cluster.askap_log_dir = "p-once", "/logs"
    cluster._askap_watch = runner_watch.LostJobWatch("", "", "")
    monkeypatch.setattr(RunCluster, "scheduler_address", property(lambda self: "tcp://x:1"))
    try:
        cluster.askap_watch()
        cluster.askap_watch()
        named = [t for t in threading.enumerate() if t.name == "askap-watch-p-once"]
        assert len(named) == 1, named
    finally:
        cluster._askap_watch.stop()
