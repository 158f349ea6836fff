"""The job board driven by recorded ``squeue`` answers (no SLURM): one query for every tracked job,
a job that ended before the first poll, controller trouble ridden out, and the waiters."""

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

from askap_flows import board, poll_pace, slurm, slurm_query

pytestmark = [pytest.mark.unit, pytest.mark.once]  # the job board: no Prefect


class Recorded:
    """Plays back squeue answers; the last one repeats. An Exception in the list is raised."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[list[str]] = []
        self.clusters: list[str] = []  # the cluster each query asked
        self.times: list[float] = []  # when each query was made (time.monotonic)
        self.lock = threading.Lock()

    def __call__(self, names, cluster=""):
        with self.lock:
            self.calls.append(sorted(names))
            self.times.append(time.monotonic())
            self.clusters.append(cluster)
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def line(job_id, name, state, reason="None", nodes="node1", limit="00:10:00"):
    """One line of ``scontrol -o show job`` (shortened; the fields the board reads, in order)."""
    return (f"JobId={job_id} JobName={name} UserId=root(0) GroupId=root(0) Priority=1 "
            f"JobState={state} Reason={reason} Dependency=(null) TimeLimit={limit} "
            f"Partition=debug ReqNodeList=(null) NodeList={nodes} BatchHost={nodes}\n")


def always_changing(name):
    """Answers in which the job's reason differs every time (every poll sees a change)."""
    return Recorded(*(line(1, name, "RUNNING", reason=f"r{i}") for i in range(500)))


def test_the_query_is_one_rpc_for_every_job_ended_ones_included():
    assert board.query_command() == ["scontrol", "-o", "show", "job"]


def test_parse_jobs_keeps_the_tracked_names_and_skips_other_lines():
    text = (line(7, "a", "RUNNING") + "No jobs in the system\n" + line(8, "b", "NODE_FAIL")
            + line(9, "other", "RUNNING") + line(10, "c", "PENDING", "Priority", "(null)"))
    jobs = board.parse_jobs(text, ["a", "b", "c"])
    assert [(j.job_id, j.state, j.ended, j.nodelist) for j in jobs] == [
        ("7", "RUNNING", False, "node1"), ("8", "NODE_FAIL", True, "node1"),
        ("10", "PENDING", False, "")]
    assert jobs[0].time_limit == "00:10:00"


def test_one_query_per_interval_serves_every_tracked_job():
    q = Recorded("".join(line(100 + i, f"run-{i}", "RUNNING") for i in range(20)))
    b = board.JobBoard(q, low=0.1, high=0.1)
    for i in range(20):
        b.track(f"run-{i}")
    assert b.wait(lambda: all(b.jobs(f"run-{i}") for i in range(20)), 5)
    time.sleep(0.35)
    calls = len(q.calls)
    assert calls <= 6, f"{calls} squeue calls for 20 jobs in ~0.4 s: one per interval expected"
    assert len(q.calls[-1]) == 20  # each call serves all of them at once


def test_a_job_that_ended_before_the_first_poll_is_seen_with_its_final_state():
    q = Recorded(line(55, "short", "NODE_FAIL", reason="NodeDown", nodes="node2"))
    b = board.JobBoard(q, low=0.1, high=0.1)
    b.track("short")
    assert b.wait(lambda: bool(b.jobs("short")), 5)
    job = b.jobs("short")[0]
    assert job.ended and job.state == "NODE_FAIL" and job.reason == "NodeDown"


def test_a_job_that_left_the_queue_unseen_is_marked_ended():
    q = Recorded(line(9, "gone", "RUNNING"), "")
    b = board.JobBoard(q, low=0.1, high=0.1)
    b.track("gone")
    assert b.wait(lambda: bool(b.jobs("gone")) and b.jobs("gone")[0].ended, 5)
    assert b.jobs("gone")[0].state == board.GONE


def test_a_replacement_job_of_the_same_name_comes_after_the_first():
    q = Recorded(line(12, "x", "RUNNING") + line(11, "x", "CANCELLED"))
    b = board.JobBoard(q, low=0.1, high=0.1)
    b.track("x")
    assert b.wait(lambda: len(b.jobs("x")) == 2, 5)
    assert [j.job_id for j in b.jobs("x")] == ["11", "12"]


def test_ids_learned_at_submission_are_live_until_seen_ending():
    q = Recorded("", line(21, "s", "RUNNING"), line(21, "s", "CANCELLED"))
    b = board.JobBoard(q, low=0.1, high=0.1)
    b.track("t")
    assert b.live_ids("t") == ([], False)  # nothing known: a cancel must go by name
    b.track("s")
    b.submitted("s", "21")
    assert b.live_ids("s") == ([("", "21")], True)  # before any poll has seen it
    assert b.wait(lambda: bool(b.jobs("s")) and b.jobs("s")[0].ended, 5)
    assert b.live_ids("s") == ([], True)  # ended: nothing to cancel


def test_transient_controller_trouble_is_ridden_out_and_logged_once(caplog):
    err = RuntimeError("slurm_load_jobs error: Unable to contact slurm controller")
    q = Recorded(err, err, err, line(3, "j", "RUNNING"))
    b = board.JobBoard(q, low=0.1, high=0.1, grace=30)
    with caplog.at_level("WARNING", logger="askap_flows"):
        b.track("j")
        assert b.wait(lambda: bool(b.jobs("j")), 20)
    b.check()  # no error left
    said = [r.getMessage() for r in caplog.records]
    assert sum("did not answer" in m for m in said) == 1
    assert any("answers again" in m for m in said)


def test_after_the_grace_period_waiters_fail_with_the_cause():
    q = Recorded(RuntimeError("Unable to contact slurm controller"))
    b = board.JobBoard(q, low=0.1, high=0.1, grace=0.5)
    b.track("j")
    with pytest.raises(board.ControllerUnreachable, match="did not answer for 0.5 s"):
        b.wait(lambda: False, 20)
    with pytest.raises(slurm.SlurmError):
        b.check()


def test_fresh_waits_judge_only_answers_given_after_the_call():
    q = Recorded(line(4, "c", "RUNNING"), line(4, "c", "CANCELLED"))
    b = board.JobBoard(q, low=0.1, high=0.1)
    b.track("c")
    assert b.wait(lambda: bool(b.jobs("c")), 5)
    assert b.wait(lambda: b.jobs("c")[0].ended, 5, fresh=True)


def test_the_interval_backs_off_to_high_after_one_unchanged_answer():
    q = Recorded(line(5, "steady", "RUNNING"))
    b = board.JobBoard(q, low=0.1, high=1.0)
    b.track("steady")
    time.sleep(1.5)
    # polls at 0 (the job appears), 0.1 (nothing changed) and 1.1; growing by 1.5x from 0.1
    # instead would poll 6 times (0, 0.1, 0.25, 0.48, 0.81, 1.32)
    assert 2 <= len(q.calls) <= 4, len(q.calls)


def test_the_early_poll_budget_spends_credits_and_refills_them():
    now = [0.0]
    budget = poll_pace.PollBudget(2, 10.0, clock=lambda: now[0])
    assert [budget.take() for _ in range(3)] == [True, True, False]
    now[0] = 9.0
    assert not budget.take()  # 0.9 of a credit back
    now[0] = 10.5
    assert budget.take() and not budget.take()
    now[0] = 1000.0  # never more than the cap
    assert [budget.take() for _ in range(3)] == [True, True, False]
    assert not poll_pace.PollBudget(0, 1.0).take()


def test_jobs_that_change_all_the_time_get_the_steady_cadence_once_the_budget_is_spent():
    """48 sub-flows starting and ending in waves change the answer at every poll: after the
    budget's early polls the board keeps to ``high`` (the load does not grow with the jobs)."""
    q = always_changing("busy")
    b = board.JobBoard(q, low=0.05, high=0.4, burst=(3, 1000.0))
    b.track("busy")
    time.sleep(2.0)
    b.untrack("busy")
    gaps = [t1 - t0 for t0, t1 in zip(q.times, q.times[1:], strict=False)]
    assert sum(g < 0.3 for g in gaps) <= 4, [round(g, 2) for g in gaps]  # 3 credits (+ track)
    assert 5 <= len(q.calls) <= 10, f"{len(q.calls)} polls in 2 s; the budget allows about 8"


def test_a_fresh_wait_is_answered_at_once_with_the_budget_spent():
    """After a cancel or a failed task the reader judges on the next answer: it spends no credit
    and does not wait for the steady cadence."""
    q = always_changing("busy")
    b = board.JobBoard(q, low=0.05, high=5.0, burst=(0, 1.0))
    b.track("busy")
    assert b.wait(lambda: len(q.calls) >= 1, 5)
    time.sleep(0.2)
    asked = time.monotonic()
    assert b.wait(lambda: True, 10, fresh=True)
    took = time.monotonic() - asked
    b.untrack("busy")
    assert took < 2.0, f"a fresh wait took {took:.2f} s: it waited for the 5-s cadence"


def test_requests_do_not_shorten_the_backoff_while_the_controller_does_not_answer():
    """48 sub-flows asking for polls during a controller restart must not make the board retry
    every ``low`` seconds."""
    q = Recorded(slurm.SlurmError("squeue: error: Unable to contact slurm controller"))
    b = board.JobBoard(q, low=0.02, high=0.02, grace=60)
    b.track("x")
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        b.poll_soon()
        time.sleep(0.01)
    b.untrack("x")
    assert len(q.calls) <= 25, f"{len(q.calls)} tries in 1 s: the backoff allows about 15"


def test_a_malformed_budget_is_refused_before_anything_runs():
    """``python -m askap_flows.run --backend slurm`` names the variable; no traceback, no job."""
    env = {**os.environ, "ASKAP_FLOWS_SLURM_BURST": "10/nan"}
    r = subprocess.run([sys.executable, "-m", "askap_flows.run", "--backend", "slurm",
                        "--profile", "testbed"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ASKAP_FLOWS_SLURM_BURST='10/nan'" in r.stderr and "Traceback" not in r.stderr


def test_burst_settings_from_the_environment():
    assert poll_pace.burst_settings({}) == (10, 20.0)
    assert poll_pace.burst_settings({"ASKAP_FLOWS_SLURM_BURST": "0/1"}) == (0, 1.0)
    for bad in ("fast", "5", "-1/2", "3/0", "10/nan", "2.5/10"):
        with pytest.raises(ValueError, match="ASKAP_FLOWS_SLURM_BURST=.*CREDITS/SECONDS"):
            poll_pace.burst_settings({"ASKAP_FLOWS_SLURM_BURST": bad})


def test_untracked_names_are_no_longer_asked_about_and_the_thread_ends():
    q = Recorded(line(6, "a", "RUNNING"))
    b = board.JobBoard(q, low=0.05, high=0.05)
    b.track("a")
    assert b.wait(lambda: bool(b.jobs("a")), 5)
    b.untrack("a")
    time.sleep(0.3)
    n = len(q.calls)
    time.sleep(0.3)
    assert len(q.calls) == n and b.jobs("a") == []


def test_poll_settings_from_the_environment():
    assert poll_pace.poll_settings({}) == (1.0, 2.0, 60.0)
    assert poll_pace.poll_settings({poll_pace.POLL_ENV: "2-10", poll_pace.GRACE_ENV: "120"}) == (2, 10, 120)
    with pytest.raises(ValueError, match=poll_pace.POLL_ENV):
        poll_pace.poll_settings({poll_pace.POLL_ENV: "fast"})


def test_node_classification_retries_only_for_failed_nodes():
    failed, other = slurm_query.classify_nodes(
        "node1|down*|Not responding\nnode2|drain|maintenance\nnode3|idle*|none\n"
        "node4|drng|x\nnode5|maint|none\nnode6|comp|none\nnode7|alloc|none\n")
    assert set(failed) == {"node1", "node3"}
    assert set(other) == {"node2", "node4", "node5", "node6"}


@pytest.mark.parametrize("state,sinfo,retryable", [
    ("TIMEOUT", "node1|drain|maint\n", False),       # walltime on a draining node: not a node loss
    ("FAILED", "node1|drng|maint\n", False),         # the program failed on a draining node
    ("CANCELLED", "node1|maint|none\n", False),      # scancel while a node is in maintenance
    ("TIMEOUT", "node1|down*|Not responding\n", False),  # the walltime is the cause
    ("CANCELLED", "node1|down*|Not responding\n", True),  # the worker's node died: cancelled
    ("NODE_FAIL", "node1|idle|none\n", True),
    ("COMPLETED", "node1|idle*|none\n", True),       # not responding for this job
])
def test_only_a_failed_node_makes_a_lost_job_retryable(monkeypatch, state, sinfo, retryable):
    monkeypatch.setattr(slurm, "hostnames", lambda nodelist: ["node1"])
    monkeypatch.setattr(slurm, "node_problems",
                        lambda nodes, cluster="": slurm_query.classify_nodes(sinfo))
    job = board.JobState("77", "run-x", state, "None", "node1", "00:01:00")
    lost = slurm.job_lost(job, "run-x", "/logs/run-x-77.err")
    assert lost.retryable is retryable, lost
    assert "77" in str(lost) and "/logs/run-x-77.err" in str(lost)


def test_a_poll_asked_for_later_comes_no_sooner_and_keeps_its_time():
    """``poll_soon(after)`` times the poll for a retired worker's job end; a request made while
    it waits (the cluster's close) does not move it back to now."""
    q = Recorded(line(7, "r", "RUNNING"))
    b = board.JobBoard(q, low=0.05, high=30, burst=(10, 20.0))
    b.track("r")
    assert b.wait(lambda: len(q.calls) >= 2, 5)  # the job appeared, then one unchanged answer
    time.sleep(0.2)  # (track's own request for a poll, if it came late, is answered by now)
    n, asked = len(q.calls), time.monotonic()
    b.poll_soon(1.0)
    b.poll_soon()
    assert b.wait(lambda: len(q.calls) > n, 10), "the poll asked for never came"
    assert q.times[n] >= asked + 0.99, f"polled {q.times[n] - asked:.2f} s after the request"


def test_a_close_after_the_board_saw_the_end_asks_slurm_nothing(monkeypatch):
    """The sub-flow's own release ends its job while Prefect closes the flow run: the cluster's
    close then returns at once (an end is final), without waiting for another poll."""
    q = Recorded(line(8, "done", "COMPLETED"))
    b = board.JobBoard(q, low=0.05, high=30, burst=(10, 20.0))
    monkeypatch.setattr(board, "board", lambda: b)
    b.track("done")
    assert b.wait(lambda: bool(b.jobs("done")) and len(q.calls) >= 2, 5)
    time.sleep(0.2)  # (track's own request for a poll, if it came late, is answered by now)
    n = len(q.calls)
    job, cancelled = closing_job(monkeypatch, "8", "done")
    started = time.monotonic()
    asyncio.run(job._close_unless_ended())
    assert cancelled == [] and len(q.calls) == n, (cancelled, q.calls[n:])
    assert time.monotonic() - started < 5  # not WORKER_EXIT_GRACE (10 s) waited out


def closing_job(monkeypatch, job_id, name):
    """A BoardJob with only what its close reads, and the list its cancels land in."""
    from askap_flows import jobs

    job = object.__new__(jobs.BoardJob)
    job.job_id, job.job_name, job.cluster = job_id, name, ""
    cancelled: list = []

    async def cancel(self):
        cancelled.append(self)

    monkeypatch.setattr(jobs.SLURMJob, "close", cancel)
    return job, cancelled


@pytest.mark.parametrize("states, cancel", [
    (("COMPLETING", "COMPLETING", "COMPLETED"), False),  # ending: its end is waited for
    (("NODE_FAIL",), True),  # may come back (JobRequeue=1): cancelled, as dask-jobqueue would
])
def test_a_close_waits_out_completing_and_cancels_an_end_that_may_come_back(monkeypatch, states,
                                                                            cancel):
    q = Recorded(*(line(9, "j", s) for s in states))
    b = board.JobBoard(q, low=0.05, high=30, burst=(10, 20.0))
    monkeypatch.setattr(board, "board", lambda: b)
    b.track("j")
    assert b.wait(lambda: len(q.calls) >= 2, 5)  # the first state, then one unchanged answer
    job, cancelled = closing_job(monkeypatch, "9", "j")
    asyncio.run(job._close_unless_ended())
    assert (cancelled == [job]) is cancel, (states, cancelled)
    assert b.jobs("j")[0].state == states[-1]
