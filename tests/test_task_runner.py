"""askap_flows.task_runner in users' own flows, on the real 3-node test bed."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from prefect import flow, task

import askap_flows
from askap_flows import board, flow_runner
from conftest import ROOT, final_state

pytestmark = pytest.mark.slurm

CLUSTERS = ROOT / "examples" / "clusters"


def jobs_named(prefix: str) -> list[tuple[str, str]]:
    """(id, state) of the queued jobs whose name starts with ``prefix``, as squeue shows them."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T"], capture_output=True, text=True,
                         timeout=30).stdout
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 2]
    return [(r[0], r[2]) for r in rows if r[1].startswith(prefix)]


def unique(name: str) -> str:
    return f"t-{name}-{uuid.uuid4().hex[:6]}"


@task
def where(seconds: float) -> dict:
    time.sleep(seconds)
    return {"job_name": os.environ.get("SLURM_JOB_NAME"), "job_id": os.environ.get("SLURM_JOB_ID"),
            "nodes": os.environ.get("SLURM_JOB_NUM_NODES")}


@flow(name="user-flow")
def user_flow(seconds: float) -> dict:
    info = where.submit(seconds).result()
    cluster = flow_runner.current_cluster()
    assert cluster is not None
    assert cluster.askap_job_name in board.board().tracked()  # SIGINT cleanup cancels it
    return {**info, "scheduler": cluster.scheduler_address, "dashboard": cluster.dashboard_link,
            "tracked": cluster.askap_job_name}


@flow(name="parent-flow")
def parent_flow(prefix: str) -> list:
    """Two runs of one flow at once, as sub-flows (Prefect 2.20 crashes two root flow runs started
    from two threads of one process, with any task runner: docs/development.md)."""
    runner = askap_flows.task_runner("testbed", nodes=1, ntasks_per_node=1,
                                     job_name_prefix=prefix)
    run = user_flow.with_options(task_runner=runner)
    outcomes = askap_flows.run_subflows([functools.partial(run, seconds=3)] * 2, max_concurrent=2)
    for o in outcomes:
        if not o.ok:
            raise o.error
    return [o.value for o in outcomes]


def test_concurrent_runs_of_one_flow_get_their_own_clusters(no_jobs_left):
    prefix = unique("two")
    results = parent_flow(prefix)
    assert all(r["job_name"].startswith(prefix + "-") for r in results), results
    assert all(r["job_name"] == r["tracked"] and r["nodes"] == "1" for r in results), results
    for key in ("job_name", "job_id", "scheduler", "dashboard"):
        assert results[0][key] != results[1][key], (key, results)
    assert not board.board().tracked() & {r["job_name"] for r in results}
    assert jobs_named(prefix) == []
    # each run's worker left at the run's end and its job ended by itself (not cancelled after
    # waiting out the close's grace for a worker that nobody stopped)
    assert [final_state(r["job_id"]) for r in results] == ["COMPLETED", "COMPLETED"]



@task
def busy(i: int) -> int:
    time.sleep(2)
    return i


SEEN: list[list[tuple[str, str]]] = []  # the adaptive flow's RUNNING jobs, every half second


@flow(name="adaptive-flow")
def adaptive_flow(n: int) -> int:
    busy.submit(0).result()  # light load: adapt keeps minimum=1 job
    futures = [busy.submit(i) for i in range(n)]  # heavy load: it grows to maximum=3
    total = sum(f.result() for f in futures)
    deadline = time.monotonic() + 90  # the load is gone: adapt shrinks back to minimum=1
    while time.monotonic() < deadline and len(SEEN[-1]) != 1:
        time.sleep(0.5)
    return total


def test_adaptive_shape_grows_to_three_jobs_under_load_and_shrinks_back(no_jobs_left):
    prefix = unique("adapt")
    runner = askap_flows.task_runner(CLUSTERS / "adaptive.yaml", job_name=prefix)
    seen = SEEN
    seen.clear()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append([j for j in jobs_named(prefix) if j[1] == "RUNNING"])
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        total = adaptive_flow.with_options(task_runner=runner)(n=15)
    finally:
        stop.set()
        watcher.join()
    assert total == sum(range(15))
    counts = [len(s) for s in seen]
    print("RUNNING jobs of the run, every 0.5 s:", counts)
    peak = counts.index(max(counts))
    assert max(counts) == 3, counts
    assert 1 in counts[:peak], f"did not grow from one job: {counts}"
    assert 1 in counts[peak:], f"did not shrink back to one job while the flow ran: {counts}"
    assert jobs_named(prefix) == []


def test_sigint_leaves_no_job(tmp_path, no_jobs_left):
    prefix = unique("sigint")
    script = tmp_path / "flow.py"
    script.write_text(f"""
import time
from prefect import flow, task
import askap_flows

@task
def long(): time.sleep(300)

@flow
def f():
    long.submit().result()

f.with_options(task_runner=askap_flows.task_runner("testbed", nodes=1, ntasks_per_node=1,
                                                   job_name_prefix={prefix!r}))()
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not any(s == "RUNNING" for _, s in jobs_named(prefix)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.5)
        time.sleep(3)  # the task is running on the job's worker
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert jobs_named(prefix) == [], out[-3000:]


@flow(name="mpi-steps")
def mpi_steps() -> list:
    first = askap_flows.mpi_task({"nodes": 3, "ntasks": 6})
    second = askap_flows.mpi_task({"nodes": 2, "ntasks": 2})  # the same job: its worker stays
    return [first, second]


def test_mpi_task_runs_steps_across_the_jobs_nodes(hello_program, no_jobs_left):
    runner = askap_flows.task_runner("testbed", job_name_prefix=unique("mpi"))
    first, second = mpi_steps.with_options(task_runner=runner)()
    assert first["job_id"] == second["job_id"]
    assert len(first["ranks"]) == 6 and {r.size for r in first["ranks"]} == {6}
    assert len({r.processor for r in first["ranks"]}) == 3
    assert len(second["ranks"]) == 2 and {r.size for r in second["ranks"]} == {2}


def test_doctor_checks_a_profile_in_dask_jobqueues_form():
    r = subprocess.run([sys.executable, "-m", "askap_flows.cli", "doctor", "--profile",
                        str(CLUSTERS / "mpi.yaml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    assert " OK " in rows["profile"] and "3 wanted" in rows["partition"], r.stdout


def jobs_named_full(prefix: str) -> str:
    out = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout
    return next(n for n in out.split() if n.startswith(prefix))


def test_example_pipeline_runs(hello_program, tmp_path, no_jobs_left):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "runner_pipeline.py")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "ASKAP_FLOWS_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "sum of squares: 506; MPI job " in r.stdout, r.stdout
    assert "6 ranks on node1,node2,node3" in r.stdout, r.stdout
