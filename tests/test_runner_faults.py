"""Lost jobs and timeouts under ``askap_flows.task_runner``, caused for real on the test bed.

A task whose job reaches its walltime, loses a node or is cancelled fails within seconds with
SLURM's cause, and the flow run ends Failed, not Running; ``timeout_seconds`` on an ``mpi_task``
kills its MPI step (srun and every rank), not only the Prefect task. The node test stops a node
of the shared test bed and revives it: run these under ``flock /tmp/askap_testbed.lock``.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest
from prefect import flow, task

import askap_flows
from askap_flows import flow_runner
from askap_flows.slurm import JobLost
from test_faults import TESTBED, flow_runs, hostnames
from test_task_runner import jobs_named_full, unique

pytestmark = pytest.mark.slurm


def running_job(prefix: str, thread: threading.Thread, step: bool = False) -> tuple[str, str]:
    """(id, node list) of the RUNNING job named ``prefix``-*, once it runs (and its step 0)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert thread.is_alive(), "the flow ended before its job ran"
        out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%j|%i|%N"], capture_output=True,
                             text=True).stdout
        jobs = [line.split("|")[1:] for line in out.split() if line.startswith(prefix + "-")]
        if jobs and (not step or f"{jobs[0][0]}.0" in steps_of(jobs[0][0])):
            return jobs[0][0], jobs[0][1]
        time.sleep(0.5)
    pytest.fail("the run's job (and its step) never ran within 120 s")


def steps_of(job_id: str) -> list[str]:
    """The job's MPI steps in squeue (``ID.0``, ...; not its batch step)."""
    out = subprocess.run(["squeue", "-h", "-s", "-o", "%i"], capture_output=True,
                         text=True).stdout.split()
    return [s for s in out if re.fullmatch(rf"{job_id}\.\d+", s)]


def ended_at(job_id: str, states: tuple[str, ...]) -> float:
    """Wait (at most 150 s) until SLURM shows the job in one of ``states``; when it did."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"],
                             capture_output=True, text=True).stdout.strip()
        if out in states:
            return time.monotonic()
        time.sleep(0.25)
    pytest.fail(f"job {job_id} did not end as {states} within 150 s")


def flow_run_state(name: str) -> str:
    """The flow run's state type in the Prefect API (once it is final, at most 30 s)."""
    deadline = time.monotonic() + 30
    state = flow_runs([name])[name]["state_type"]
    while state in ("RUNNING", "PENDING") and time.monotonic() < deadline:
        time.sleep(0.5)
        state = flow_runs([name])[name]["state_type"]
    return state


FAILED_AT: list[float] = []  # when the flow body saw its task fail (the flow run ends later)


@task
def nap(seconds: float) -> None:
    time.sleep(seconds)


@flow(name="plain-task")
def plain_task_flow() -> None:
    try:
        nap.submit(300).result()
    finally:
        FAILED_AT.append(time.monotonic())


@flow(name="mpi-sleep")
def mpi_sleep(arg: str = "300") -> dict:
    try:
        return askap_flows.mpi_task({"nodes": 3, "ntasks": 3, "args": [arg]},
                                    program="/bin/sleep")
    finally:
        FAILED_AT.append(time.monotonic())


def run_in_thread(call) -> tuple[threading.Thread, list]:
    """Run the flow ``call`` in a thread; its outcome (None, or the exception) lands in the list."""
    outcome: list[BaseException | None] = []
    FAILED_AT.clear()

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the flow's failure is the result
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome



def start(flow, kind: str, step: bool = False, **runner_kwargs):
    """Run ``flow`` on its own task runner in a thread until its job runs: (prefix, flow run name,
    thread, outcome list, job id, nodelist)."""
    prefix, name = unique(kind), unique(f"{kind}-run")
    runner = askap_flows.task_runner("testbed", job_name_prefix=prefix, **runner_kwargs)
    thread, outcome = run_in_thread(flow.with_options(task_runner=runner, flow_run_name=name))
    return (prefix, name, thread, outcome, *running_job(prefix, thread, step=step))


def failed_after(since: float, what: str) -> float:
    """Seconds from ``since`` until the flow body saw its task fail (printed for the record)."""
    assert FAILED_AT, "the flow body never saw its task end"
    took = FAILED_AT[0] - since
    print(f"the task failed {took:.1f} s after {what}; the flow run ended "
          f"{time.monotonic() - since:.1f} s after it")
    return took


# ------------------------------------------------------------------------------ the walltime
def test_walltime_fails_a_task_within_seconds_and_the_flow_run(no_jobs_left):
    """The job's walltime is cut short with ``scontrol update JobId=N EndTime=now+5``: SLURM then
    ends it as TIMEOUT (reason TimeLimit) at its next time-limit check, 30-35 s later here,
    instead of the profile's walltime of minutes (a 1-minute walltime ends after 1-2 minutes)."""
    prefix, name, thread, outcome, job_id, _ = start(plain_task_flow, "wall", nodes=1,
                                                     ntasks_per_node=1)
    time.sleep(3)  # the task runs on the job's worker
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "EndTime=now+5"], check=True)
    ended = ended_at(job_id, ("TIMEOUT",))
    thread.join(timeout=60)  # without the watch the flow run waits for a worker forever
    assert not thread.is_alive(), "the flow run still waits for its timed-out job's worker"
    assert failed_after(ended, "SLURM ended the job") < 10
    text = str(outcome[0])
    assert f"SLURM job {job_id} ({prefix}-" in text, text
    assert "reached its walltime" in text and "(state TIMEOUT)" in text, text
    assert "Raise the walltime of the task runner's cluster" in text, text
    assert flow_run_state(name) == "FAILED"


# ------------------------------------------------------------------------------ a node dies
def test_a_lost_node_fails_the_mpi_task_with_joblost_naming_it(no_jobs_left):
    _, name, thread, outcome, job_id, nodelist = start(mpi_sleep, "node", step=True)
    killed = hostnames(nodelist)[1]  # not the first: it runs the job's Dask worker
    try:
        subprocess.run(["bash", str(TESTBED), "kill-node", killed[4:], "--down-now"], check=True,
                       capture_output=True)
        ended = ended_at(job_id, ("NODE_FAIL", "CANCELLED", "FAILED", "COMPLETED"))
        thread.join(timeout=60)
        assert not thread.is_alive(), "the flow run still waits after its node was lost"
        assert failed_after(ended, "SLURM ended the job") < 10
    finally:
        subprocess.run(["bash", str(TESTBED), "revive-node", killed[4:]], check=True,
                       capture_output=True)
        thread.join(timeout=60)
    error = outcome[0]
    assert isinstance(error, JobLost), repr(error)
    text = str(error)
    assert f"SLURM job {job_id} (" in text and f"lost node(s) {killed}" in text, text
    assert "while its flow run was running" in text and "Run the flow again" in text, text
    assert error.failed_nodes == [killed], error.failed_nodes
    assert flow_run_state(name) == "FAILED"


# ------------------------------------------------------------------------------ scancel
def test_scancel_fails_the_mpi_task_with_the_slurm_state(no_jobs_left):
    _, name, thread, outcome, job_id, _ = start(mpi_sleep, "scancel", step=True)
    subprocess.run(["scancel", job_id], check=True)
    ended = ended_at(job_id, ("CANCELLED",))  # SLURM's COMPLETING took 1-9 s here (CI load)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the flow run still waits after its job was cancelled"
    assert failed_after(ended, "SLURM ended the job") < 10
    assert isinstance(outcome[0], JobLost), repr(outcome[0])
    text = str(outcome[0])
    assert "was cancelled while its flow run was running (state CANCELLED" in text, text
    assert flow_run_state(name) == "FAILED"


def test_scancel_fails_a_plain_task_of_the_mpi_shape_with_the_slurm_state(no_jobs_left):
    prefix, name, thread, outcome, job_id, _ = start(plain_task_flow, "plain", nodes=1,
                                                     ntasks_per_node=1)
    time.sleep(5)  # the task is running on the job's worker
    subprocess.run(["scancel", "--name", jobs_named_full(prefix)], check=True)
    ended = ended_at(job_id, ("CANCELLED",))
    thread.join(timeout=60)  # without the watch the flow run waits for a worker forever
    assert not thread.is_alive(), "the flow run still waits for its lost job's worker"
    assert failed_after(ended, "SLURM ended the job") < 10
    assert outcome and outcome[0] is not None
    assert "state CANCELLED" in str(outcome[0]), repr(outcome[0])
    assert flow_run_state(name) == "FAILED"


# ------------------------------------------------------------------------------ timeout_seconds
AFTER: dict = {}  # what the flow saw of its job once its timed-out task had failed


@flow(name="timed-step")
def timed_step(arg: str):
    state = askap_flows.mpi_task.with_options(timeout_seconds=8)(
        {"nodes": 3, "ntasks": 3, "args": [arg]}, program="/bin/sleep", return_state=True)
    failed = time.monotonic()
    job_id = flow_runner.current_cluster().handle.job().job_id  # type: ignore[union-attr]
    while steps_of(job_id) and time.monotonic() - failed < 30:
        time.sleep(0.25)
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    AFTER.update(job_id=job_id, steps=steps_of(job_id), gone_after=time.monotonic() - failed,
                 left=[line for line in ps.splitlines() if arg in line])
    return state  # the flow run fails with the task's timeout


def test_timeout_seconds_of_an_mpi_task_kills_its_step(no_jobs_left):
    """Checked while the flow run, its job and its worker still run: only then could the step
    outlive its task (the job's end kills it anyway)."""
    arg = "311.25"  # unique: finds srun and the ranks in the process table (the nodes are here)
    name = unique("timeout-run")
    runner = askap_flows.task_runner("testbed", job_name_prefix=unique("timeout"))
    AFTER.clear()
    started = time.monotonic()
    with pytest.raises(BaseException) as err:
        timed_step.with_options(task_runner=runner, flow_run_name=name)(arg)
    assert time.monotonic() - started < 120
    print(f"the step was gone {AFTER['gone_after']:.1f} s after its task failed", AFTER)
    assert AFTER["steps"] == [], f"the timed-out task's MPI step still runs: {AFTER}"
    assert AFTER["left"] == [], f"srun or MPI ranks outlived the timed-out task: {AFTER}"
    assert "timeout" in f"{type(err.value).__name__} {err.value}".lower(), repr(err.value)
    assert flow_run_state(name) == "FAILED"
