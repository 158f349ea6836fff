"""A profile's ``clusters:`` (sbatch --clusters): every later SLURM command about its jobs carries
the same ``-M``, and a job is known by (cluster, id). The argv each step renders, recorded through
the one subprocess seam (no SLURM needed)."""

import pickle
import threading

import pytest

from askap_flows import board, cli, clusters, jobs, shell, slurm, slurm_query

pytestmark = pytest.mark.unit


class Shell:
    """Records every argv run through shell.run; answers from ``answers`` by command name."""

    def __init__(self, **answers):
        self.answers, self.calls, self.lock = answers, [], threading.Lock()

    def __call__(self, argv, **kw):
        with self.lock:
            self.calls.append(list(argv))
        return shell.Completed(list(argv), 0, self.answers.get(argv[0], ""), "", 0.0)

    def of(self, command):
        with self.lock:
            return [c for c in self.calls if c[0] == command]


@pytest.fixture
def fake_shell(monkeypatch):
    fake = Shell()
    monkeypatch.setattr(shell, "run", fake)
    monkeypatch.setattr(slurm_query.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    monkeypatch.setattr(slurm_query, "_checked", {})
    return fake


@pytest.fixture
def fresh_board(monkeypatch):
    b = board.JobBoard(low=0.1, high=0.1, grace=5)
    monkeypatch.setattr(board, "_board", b)
    return b


def scontrol_line(job_id, name, state):
    return (f"JobId={job_id} JobName={name} JobState={state} Reason=None TimeLimit=00:10:00 "
            f"NodeList=farnode1\n")


def test_the_dash_m_of_a_clusters_value_and_none_for_this_hosts_cluster():
    assert clusters.args(None) == [] and clusters.args("") == []
    assert clusters.args("galaxy") == ["-M", "galaxy"]
    assert clusters.args(" a, b,a ") == ["-M", "a,b"]
    assert clusters.members(None) == [""] and clusters.members("a,b") == ["a", "b"]


def test_sbatch_names_the_cluster_that_took_the_job():
    assert clusters.submitted_on("Submitted batch job 42 on cluster far\n", "near,far") == (
        "42", "far")
    assert clusters.submitted_on("Submitted batch job 42\n", "far") == ("42", "far")
    assert clusters.submitted_on("Submitted batch job 42\n", None) == ("42", "")


def test_the_boards_query_asks_each_cluster_its_tracked_jobs_are_on(fake_shell, fresh_board):
    fake_shell.answers["scontrol"] = scontrol_line(7, "run-far", "RUNNING")
    fresh_board.track("run-far", "far")
    assert fresh_board.wait(lambda: fresh_board.jobs("run-far"), 5)
    assert ["scontrol", "-M", "far", "-o", "show", "job"] in fake_shell.of("scontrol")
    assert ["scontrol", "-o", "show", "job"] not in fake_shell.of("scontrol")
    job = fresh_board.jobs("run-far")[0]
    assert job.key == ("far", "7") and fresh_board.job("7", "far") == job
    assert fresh_board.job("7") is None  # job 7 of this host's cluster is another job
    fresh_board.untrack("run-far")


def test_one_query_per_cluster_of_a_list_and_ids_kept_apart():
    asked = []

    def query(names, cluster=""):
        asked.append(cluster)
        return scontrol_line(5, f"run-{cluster}", "RUNNING")  # job 5 on both clusters

    b = board.JobBoard(query, low=0.1, high=0.1)
    b.track("run-a", "a,b")
    b.track("run-b", "a,b")
    assert b.wait(lambda: b.jobs("run-a") and b.jobs("run-b"), 5)
    assert {"a", "b"} <= set(asked) and "" not in asked
    assert b.job("5", "a").name == "run-a" and b.job("5", "b").name == "run-b"


def test_a_cancel_names_the_cluster_of_each_job(fake_shell, fresh_board):
    fresh_board.track("run-x", "near,far")
    fresh_board.submitted("run-x", "42", "far")
    jobs.cancel_named("run-x", wait=0)
    assert fake_shell.of("scancel") == [["scancel", "-M", "far", "42"]]
    fresh_board.untrack("run-x")


def test_a_cancel_by_name_asks_every_cluster_of_the_profile(fake_shell, fresh_board):
    jobs.cancel_named("run-y", wait=0, clusters_="near,far")
    assert fake_shell.of("scancel") == [["scancel", "-M", "near,far", "--name", "run-y"]]


def test_cancel_commands_group_ids_by_cluster():
    live = [("far", "3"), ("", "9"), ("far", "4")]
    assert jobs.cancel_commands("n", "far", live, True) == [
        ["scancel", "9"], ["scancel", "-M", "far", "3", "4"]]
    assert jobs.cancel_commands("n", None, [], False) == [["scancel", "--name", "n"]]


def test_the_job_class_of_a_clusters_profile_cancels_on_the_job_s_cluster():
    cls = jobs.board_job_class("near,far")
    assert cls is jobs.board_job_class("near,far") and jobs.board_job_class(None) is jobs.BoardJob
    job = cls.__new__(cls)
    assert job._job_id_from_submit_output("Submitted batch job 42 on cluster far") == "42"
    assert job.cluster == "far" and job.cancel_command == "scancel -M far"
    assert jobs.board_job_class("galaxy").cancel_command == "scancel -M galaxy"
    assert pickle.loads(pickle.dumps(cls)) is cls  # a task runner's arguments may be copied


def test_preflight_sinfo_and_the_node_check_carry_dash_m(fake_shell):
    slurm_query.check_available("far")
    assert fake_shell.of("sinfo") == [["sinfo", "-M", "far", "-h", "-o", "%P"]]
    slurm_query.node_problems(["farnode1"], "far")
    assert fake_shell.of("sinfo")[-1][:3] == ["sinfo", "-M", "far"]
    slurm_query.check_available()  # this host's cluster: asked separately, without -M
    assert fake_shell.of("sinfo")[-1] == ["sinfo", "-h", "-o", "%P"]


def test_a_rejected_test_submit_shows_sinfo_of_the_scripts_cluster(monkeypatch):
    def fake_run(argv, **kw):
        calls.append(list(argv))
        return shell.Completed(list(argv), 1, "", "sbatch: error: invalid partition", 0.0)

    calls = []
    monkeypatch.setattr(shell, "run", fake_run)
    monkeypatch.setattr(shell, "output", lambda argv, **kw: calls.append(list(argv)) or "")
    with pytest.raises(slurm.SlurmError, match="invalid partition"):
        slurm_query._test_submit("#!/bin/sh\n#SBATCH --clusters=far\n")
    assert calls[-1][:3] == ["sinfo", "-M", "far"]


SQUEUE_M = """CLUSTER: far
JOBID|NAME|STATE|NODELIST
42|askapflows-aa|RUNNING|farnode1
CLUSTER: near
JOBID|NAME|STATE|NODELIST
42|askapflows-bb|PENDING|
7|other-job|RUNNING|n1
"""


def test_cleanup_lists_and_cancels_on_the_profiles_clusters(fake_shell, fresh_board, tmp_path,
                                                              capsys):
    fake_shell.answers["squeue"] = SQUEUE_M
    profile = tmp_path / "p.yaml"
    profile.write_text("allocation:\n  clusters: far,near\n")
    assert cli.main(["cleanup", "--profile", str(profile), "--yes"]) == 1  # still listed
    squeues = fake_shell.of("squeue")
    assert squeues and all(c[1:3] == ["-M", "far,near"] for c in squeues)
    assert "-h" not in squeues[0]  # it would drop the CLUSTER: lines (SLURM 22.05)
    assert sorted(fake_shell.of("scancel")) == [["scancel", "-M", "far", "--name", "askapflows-aa"],
                                                ["scancel", "-M", "near", "--name", "askapflows-bb"]]
    out = capsys.readouterr().out
    assert "far" in out and "near" in out and "other-job" not in out
    assert clusters.parse_queue(SQUEUE_M)[0] == ("far", "42", "askapflows-aa", "RUNNING",
                                                 "farnode1")
    assert len(clusters.parse_queue(SQUEUE_M)) == 3  # the header lines are not jobs
    assert clusters.queue_command("u", None)[:2] == ["squeue", "-h"]


def test_a_lost_job_names_its_cluster(fake_shell):
    job = board.JobState("42", "run-x", "CANCELLED", "None", "", "00:01:00", "far")
    assert "SLURM job 42 on cluster far (run-x)" in str(slurm.job_lost(job, "run-x", "/l"))


def test_a_job_on_another_cluster_does_not_get_this_hosts_slurm_conf():
    """Its srun would ask this host's controller about a job id of another cluster."""
    from askap_flows.spec import AllocationSpec

    env = {"SLURM_CONF": "/etc/login/slurm.conf", "PREFECT_API_URL": "http://h:1/api"}
    far = slurm.cluster_kwargs(AllocationSpec(clusters="far"), job_name="j", log_directory="/l",
                               env=env, dashboard_address=None)["job_script_prologue"]
    here = slurm.cluster_kwargs(AllocationSpec(), job_name="j", log_directory="/l", env=env,
                                dashboard_address=None)["job_script_prologue"]
    assert "export SLURM_CONF=/etc/login/slurm.conf" in here
    assert not any("SLURM_CONF" in line for line in far)
    assert "export PREFECT_API_URL=http://h:1/api" in far
