"""Faults caused for real on the test bed: a node dies, a job is cancelled or reaches its walltime,
the MPI program fails or hangs, the database restarts, the pipeline is SIGKILLed.

Each test checks what the user sees (the error, the Prefect API's record) and that nothing is left
behind (SLURM jobs, Dask workers, MPI ranks). The kill-node test changes the shared test bed: run
it by hand under ``flock -x /tmp/askap-testbed.lock`` (the suite itself runs serially in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from functools import partial
from pathlib import Path

import pytest

from conftest import ROOT, askap_jobs, dask_workers

TESTBED = ROOT / "scripts" / "slurm_testbed.sh"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# --------------------------------------------------------------------------- helpers
def _api(path: str, body: dict | None = None, api_url: str | None = None):
    """POST ``body`` to the Prefect REST API (the same on Prefect 2 and 3)."""
    url = (api_url or os.environ["PREFECT_API_URL"]).rstrip("/") + path
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def flow_runs(names, api_url: str | None = None) -> dict[str, dict]:
    runs = _api("/flow_runs/filter", {"flow_runs": {"name": {"any_": list(names)}}}, api_url)
    return {r["name"]: r for r in runs}


def flow_run_logs(flow_run_id: str) -> list[dict]:
    return _api("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                 "sort": "TIMESTAMP_ASC", "limit": 200})


def script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def job_of(name_prefix: str) -> tuple[str, str, str] | None:
    """(job id, state, node list) of the running job whose name starts with ``name_prefix``,
    once its MPI step (step 0) runs."""
    out = subprocess.run(["squeue", "-h", "-o", "%j|%i|%T|%N"], capture_output=True,
                         text=True).stdout
    steps = subprocess.run(["squeue", "-h", "-s", "-o", "%i"], capture_output=True,
                           text=True).stdout.split()
    for line in out.splitlines():
        name, job_id, state, nodes = line.strip().split("|")
        if name.startswith(name_prefix) and state == "RUNNING" and f"{job_id}.0" in steps:
            return job_id, state, nodes
    return None


def wait_for(what, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{message} within {timeout:g} s")


def cut_walltime(name_prefix: str) -> None:
    """Once the job named ``name_prefix...`` runs its MPI step, let its walltime end in 5 s."""
    job_id, _, _ = wait_for(lambda: job_of(name_prefix), 120, "the walltime job never ran its step")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "EndTime=now+5"], check=True)


def hostnames(nodelist: str) -> list[str]:
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                          text=True).stdout.split()


def in_parent_flow(calls, max_concurrent: int):
    from prefect import flow

    from askap_flows.composition import run_subflows

    @flow(name="faults-parent")
    def parent():
        return run_subflows(calls, max_concurrent=max_concurrent)

    return parent()


def waiter(tmp_path: Path, hello: str, flag: Path) -> str:
    """An MPI program that waits (at most 120 s) until ``flag`` exists, then runs hello."""
    return script(tmp_path / "wait_then_hello.sh",
                  f"#!/bin/sh\nfor i in $(seq 240); do [ -e '{flag}' ] && break; sleep 0.5; done\n"
                  f"exec '{hello}'\n")


# --------------------------------------------------------------------------- pure parts
@pytest.mark.unit
def test_first_failure_names_the_cause_not_the_ranks_srun_terminated():
    from askap_flows.mpi import first_failure

    lines = ["srun: error: node2: task 1: Exited with exit code 3",
             "srun: launch/slurm: _step_signal: Terminating StepId=55.0",
             "srun: error: node1: task 0: Terminated"]
    assert first_failure(lines).startswith("The first rank to fail: task 1 on node2: Exited with "
                                           "exit code 3.")
    assert "tasks 0-1 on node1: Killed" in first_failure(["srun: error: node1: tasks 0-1: Killed"])
    assert first_failure(["plain stderr"]) is None


@pytest.mark.unit
def test_a_retry_excludes_every_failed_node_so_far():
    from askap_flows.slurm import JobLost
    from askap_flows.spec import AllocationSpec
    from askap_flows.spec import excluding_nodes as _excluding

    alloc = AllocationSpec(extra_directives=("--gres=gpu:1",))
    once = _excluding(alloc, ["node2"])
    assert once.extra_directives == ("--gres=gpu:1", "--exclude=node2")
    assert _excluding(once, ["node3", "node2"]).extra_directives == ("--gres=gpu:1",
                                                                    "--exclude=node3,node2")
    assert JobLost("x", state="NODE_FAIL").retryable and JobLost("x", failed_nodes=["n1"]).retryable
    assert not JobLost("x", state="CANCELLED").retryable
    assert not JobLost("x", state="TIMEOUT").retryable


# --------------------------------------------------------------------------- 1. a node dies
@pytest.mark.slurm
def test_node_death_fails_the_subflow_then_a_retry_succeeds_elsewhere(tmp_path, hello_program,
                                                                      no_jobs_left):
    from askap_flows.flows import mpi_subflow

    flag = tmp_path / "go"
    program = waiter(tmp_path, hello_program, flag)
    tag = uuid.uuid4().hex[:6]
    two = {"nodes": 2, "ntasks": 2, "ntasks_per_node": 1}
    calls = [
        partial(mpi_subflow, two, {"nodes": 2, "ntasks_per_node": 1, "exclusive": True,
                                   "job_name_prefix": f"fnode{tag}"},
                backend="slurm", profile="testbed", program=program, name=f"target-{tag}",
                retries=1),
        partial(mpi_subflow, {"nodes": 1, "ntasks": 1, "ntasks_per_node": 1},
                {"nodes": 1, "ntasks_per_node": 1, "exclusive": True,
                 "job_name_prefix": f"fsib{tag}"},
                backend="slurm", profile="testbed", program=program, name=f"sibling-{tag}"),
    ]
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(out=in_parent_flow(calls, 2)))
    runner.start()
    killed = None
    try:
        def running(prefix):
            assert runner.is_alive(), f"the pipeline ended early: {result}"
            return job_of(prefix)

        target = wait_for(lambda: running(f"fnode{tag}-"), 120, "the target's MPI step never ran")
        sibling = wait_for(lambda: running(f"fsib{tag}-"), 120, "the sibling's MPI step never ran")
        nodes = hostnames(target[2])
        # not the first node: that one runs the job's Dask worker (see docs/troubleshooting.md)
        killed = nodes[1]
        assert killed not in hostnames(sibling[2])
        subprocess.run(["bash", str(TESTBED), "kill-node", killed[4:], "--down-now"], check=True,
                       capture_output=True)
        wait_for(lambda: not any(f" {target[0]}" in j for j in askap_jobs(f"fnode{tag}")), 60,
                 "the job on the dead node did not end")
        flag.touch()  # the retry and the sibling may now finish
        runner.join(timeout=240)
        assert not runner.is_alive(), "the pipeline hangs after the node died"
    finally:
        flag.touch()
        if killed:
            subprocess.run(["bash", str(TESTBED), "revive-node", killed[4:]], check=True,
                           capture_output=True)
        runner.join(timeout=240)
    target_out, sibling_out = result["out"]
    assert target_out.ok, target_out.error
    assert sibling_out.ok, sibling_out.error
    # the retry: a new job, two nodes, not the dead one
    assert target_out.value.job_id != target[0]
    assert killed not in target_out.value.nodes and len(target_out.value.nodes) == 2
    assert len(target_out.value.ranks) == 2 and {r.size for r in target_out.value.ranks} == {2}
    assert sibling_out.value.job_id == sibling[0]  # the sibling kept its job
    # the first attempt's record in Prefect: failed, naming job, node and SLURM's reason
    runs = flow_runs([f"target-{tag}", f"target-{tag}-retry1"])
    first, retry = runs[f"target-{tag}"], runs[f"target-{tag}-retry1"]
    assert first["state_type"] == "FAILED" and retry["state_type"] == "COMPLETED"
    message = first["state"]["message"]
    assert f"SLURM job {target[0]}" in message and f"lost node(s) {killed}" in message, message
    assert "testbed kill-node" in message and "NODE_FAIL" in message, message
    assert "retries=N" in message
    info = subprocess.run(["sinfo", "-h", "-n", killed, "-o", "%t"], capture_output=True,
                          text=True).stdout.strip()
    assert info == "idle", f"{killed} is {info} after revive-node"


# --------------------------------------------------------------------------- 2. scancel
@pytest.mark.slurm
def test_job_cancelled_from_outside_fails_its_subflow_clearly(tmp_path, hello_program,
                                                             no_jobs_left):
    from askap_flows.flows import mpi_subflow
    from askap_flows.slurm import JobLost

    flag = tmp_path / "never"
    program = waiter(tmp_path, hello_program, flag)
    tag = uuid.uuid4().hex[:6]
    result: dict = {}

    def call():
        try:
            mpi_subflow({"nodes": 1, "ntasks": 1, "ntasks_per_node": 1},
                        {"nodes": 1, "ntasks_per_node": 1, "job_name_prefix": f"fcan{tag}"},
                        backend="slurm", profile="testbed", program=program,
                        name=f"cancel-{tag}", retries=2)
        except Exception as exc:  # noqa: BLE001 - inspected below
            result["error"] = exc

    runner = threading.Thread(target=call)
    runner.start()
    try:
        cancelled = wait_for(lambda: job_of(f"fcan{tag}-"), 120, "the job to cancel never ran")
        subprocess.run(["scancel", cancelled[0]], check=True)
        runner.join(timeout=120)
        assert not runner.is_alive(), "the sub-flow hangs after its job was cancelled"
    finally:
        flag.touch()
        runner.join(timeout=60)
    error = result.get("error")
    assert isinstance(error, JobLost), repr(error)
    text = str(error)
    assert f"SLURM job {cancelled[0]}" in text and "was cancelled" in text and "CANCELLED" in text
    assert "It is not retried" in text
    runs = flow_runs([f"cancel-{tag}", f"cancel-{tag}-retry1"])
    assert list(runs) == [f"cancel-{tag}"] and runs[f"cancel-{tag}"]["state_type"] == "FAILED"


# --------------------------------------------------------------------------- 3 + 4 + 5
@pytest.mark.slurm
def test_failing_hanging_and_overtime_programs_say_what_happened(tmp_path, hello_program,
                                                                 no_jobs_left):
    """Five failing programs, a hanging one and a job that reaches its walltime, as sub-flows of
    one parent. The walltime job's end is brought forward once its step runs (``scontrol update
    EndTime=now+5``): SLURM ends it as TIMEOUT at its next time-limit check, 30-35 s later,
    instead of the 1-2 minutes it takes to enforce the 1-minute walltime."""
    from askap_flows.flows import mpi_subflow
    from askap_flows.shell import CommandError
    from askap_flows.slurm import JobLost

    tag = uuid.uuid4().hex[:6]
    marker = f"STREAM{tag}"
    api_check = script(tmp_path / "api_check.py", f"""#!{sys.executable}
import json, os, sys, time, urllib.request
rank = os.environ.get("SLURM_PROCID", "0")
print("{marker} rank " + rank + ": started", flush=True)
if rank != "0":
    time.sleep(120)  # killed by srun --kill-on-bad-exit when rank 0 fails
api = os.environ["PREFECT_API_URL"].rstrip("/") + "/logs/filter"
body = json.dumps({{"limit": 200, "sort": "TIMESTAMP_DESC"}}).encode()
seen, deadline = False, time.time() + 90
while not seen and time.time() < deadline:
    req = urllib.request.Request(api, data=body, headers={{"Content-Type": "application/json"}})
    with urllib.request.urlopen(req, timeout=10) as r:
        seen = any("{marker} rank 0: started" in x["message"] for x in json.load(r))
    time.sleep(0.5)
print("{marker} my first line " + ("WAS" if seen else "was NOT") + " in the Prefect API while I ran",
      file=sys.stderr, flush=True)
sys.exit(3)
""")
    segv = script(tmp_path / "segv.sh", "#!/bin/sh\necho \"rank $SLURM_PROCID up\"\n"
                  "if [ \"$SLURM_PROCID\" = 1 ]; then kill -SEGV $$; fi\nsleep 120\n")
    not_exec = tmp_path / "not_executable"
    not_exec.write_text("#!/bin/sh\necho hi\n")
    missing = tmp_path / "no_such_program"
    naptime = "617.25"  # a unique argument, to find the hanging ranks in the process table
    two = {"nodes": 1, "ntasks": 2, "ntasks_per_node": 2}
    alloc = {"nodes": 1, "ntasks_per_node": 2, "job_name_prefix": f"fprog{tag}"}
    run = partial(mpi_subflow, allocation=alloc, backend="slurm", profile="testbed")
    calls = [
        partial(run, {**two, "args": ["--fail-rank", "1"]}, program=hello_program, name=f"rank-{tag}"),
        partial(run, two, program=segv, name=f"segv-{tag}"),
        # a wrapper (here `env`) skips the submit-time check: SLURM itself meets the bad program
        partial(run, {**two, "wrapper": ["env"]}, program=str(missing), name=f"missing-{tag}"),
        partial(run, {**two, "wrapper": ["env"]}, program=str(not_exec), name=f"noexec-{tag}"),
        partial(run, two, program=api_check, name=f"stream-{tag}"),
        # hangs: MPISpec.timeout kills the step on both nodes
        partial(mpi_subflow, {"nodes": 2, "ntasks": 2, "ntasks_per_node": 1, "timeout": 5,
                              "args": ["--sleep", naptime]},
                {"nodes": 2, "ntasks_per_node": 1, "job_name_prefix": f"fprog{tag}"},
                backend="slurm", profile="testbed", program=hello_program, name=f"hang-{tag}"),
        partial(mpi_subflow, {"nodes": 1, "ntasks": 1, "ntasks_per_node": 1},
                {**alloc, "walltime": "00:01:00", "job_name_prefix": f"fwall{tag}"},
                backend="slurm", profile="testbed",
                program=script(tmp_path / "sleep.sh", "#!/bin/sh\nexec sleep 600\n"),
                name=f"walltime-{tag}"),
    ]
    cut = threading.Thread(target=cut_walltime, args=(f"fwall{tag}",), daemon=True)
    cut.start()
    outs = in_parent_flow(calls, len(calls))
    cut.join(timeout=5)
    wall = outs.pop().error
    hang = outs.pop().error
    assert isinstance(wall, JobLost), repr(wall)
    # the time limit SLURM enforced (the cut one), as SLURM reports it
    assert re.search(r"reached its walltime \(\d\d:\d\d:\d\d\)", str(wall)), str(wall)
    assert "TIMEOUT" in str(wall), str(wall)
    assert "Raise the allocation's walltime" in str(wall)
    assert "worker" not in str(wall).lower()
    errors = [o.error for o in outs]
    for e in errors:
        assert isinstance(e, CommandError), repr(e)
        assert e.argv[0] == "srun" and e.returncode not in (0, None), str(e)
        assert str(e).startswith(f"command exited with code {e.returncode}: srun --mpi=pmi2"), str(e)
    rank, segv_e, missing_e, noexec_e, stream = errors
    assert "rank 1: failing on purpose" in str(rank)
    # srun exits with the code of a rank it terminated (143) when that one ends last: the hint
    # names the rank that failed first
    assert "The first rank to fail: task 1 on " in str(rank) and ": Exited with exit code 3" in str(rank)
    assert "task 1 on" in str(segv_e) and "Segmentation fault" in str(segv_e), str(segv_e)
    assert "No such file or directory" in str(missing_e) and str(missing) in str(missing_e)
    assert "Permission denied" in str(noexec_e), str(noexec_e)
    # streamed: the program saw its own first line in the Prefect API while it still ran
    assert "The first rank to fail: task 0 on" in str(stream)
    assert f"{marker} my first line WAS in the Prefect API while I ran" in str(stream), str(stream)
    run_ = flow_runs([f"stream-{tag}"])[f"stream-{tag}"]
    logs = flow_run_logs(run_["id"])
    started = [x for x in logs if f"{marker} rank 0: started" in x["message"]]
    assert started and started[0]["task_run_id"], logs[-5:]
    tasks = _api("/task_runs/filter", {"task_runs": {"id": {"any_": [started[0]["task_run_id"]]}}})
    assert tasks[0]["state_type"] == "FAILED"
    assert started[0]["timestamp"] < tasks[0]["end_time"]
    # the hanging program: a timeout, and no rank left on any node (all nodes' processes are here)
    assert isinstance(hang, CommandError), repr(hang)
    assert str(hang).startswith("command timed out after 5 s and was killed: srun"), str(hang)
    # srun's own report, before the job was cancelled: the ranks on both nodes were killed
    assert "Job step aborted" in str(hang), str(hang)
    assert "task 0: Killed" in str(hang) and "task 1: Killed" in str(hang), str(hang)
    assert "The first rank to fail" not in str(hang)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert [line for line in ps.splitlines() if f"--sleep {naptime}" in line] == []


@pytest.mark.slurm
def test_missing_or_unexecutable_program_is_refused_before_submission(tmp_path):
    from askap_flows.flows import mpi_subflow

    before = askap_jobs()
    not_exec = tmp_path / "prog"
    not_exec.write_text("#!/bin/sh\n")
    with pytest.raises(FileNotFoundError, match="does not exist. Give its full path"):
        mpi_subflow({"nodes": 1, "ntasks": 1, "ntasks_per_node": 1}, backend="slurm", profile="testbed",
                    program=str(tmp_path / "nope"))
    with pytest.raises(PermissionError, match="is not executable: chmod \\+x"):
        mpi_subflow({"nodes": 1, "ntasks": 1, "ntasks_per_node": 1}, backend="slurm", profile="testbed",
                    program=str(not_exec))
    assert askap_jobs() == before


# --------------------------------------------------------------------------- 6. the database restarts
@pytest.mark.postgres
def test_database_restart_mid_pipeline_loses_no_flow_run(tmp_path, hello_program):
    from askap_flows.server import PrefectServer, free_port

    pg_script = ROOT / "scripts" / "postgres_database.sh"
    pg_dir = Path(tempfile.mkdtemp(prefix="askap-faults-pg-", dir="/tmp"))
    pg_dir.chmod(0o755)  # the server runs as user postgres when we are root
    data = pg_dir / "pg"
    server = None
    try:
        start = subprocess.run(["bash", str(pg_script), "start", "--dir", str(data), "--address",
                                "127.0.0.1", "--port", str(free_port())], capture_output=True,
                               text=True, check=True)
        url = [line.split("=", 1)[1].strip("'\"") for line in start.stdout.splitlines()
               if line.startswith("export PREFECT_API_DATABASE_CONNECTION_URL=")][0]
        server = PrefectServer(tmp_path / "prefect", database_url=url).start()
        slow = script(tmp_path / "slow_hello.sh", f"#!/bin/sh\nsleep 2\nexec '{hello_program}'\n")
        env = {**os.environ, "PREFECT_API_URL": server.api_url,
               "ASKAP_FLOWS_HOME": str(tmp_path / "home")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "askap_flows.run", "--subflows", "4", "--max-concurrent", "2",
             "--ntasks", "1", "--program", slow, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        err_lines: list[str] = []
        reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
        reader.start()
        wait_for(lambda: any("[1/4]" in line for line in err_lines) or proc.poll() is not None,
                 180, "no sub-flow finished")
        assert proc.poll() is None, "".join(err_lines)[-3000:]
        subprocess.run(["bash", str(pg_script), "stop", "--dir", str(data)], check=True,
                       capture_output=True)
        time.sleep(5)  # sub-flows keep running against a server without its database
        subprocess.run(["bash", str(pg_script), "start", "--dir", str(data)], check=True,
                       capture_output=True)
        out = proc.stdout.read()
        proc.wait(timeout=300)
        reader.join(timeout=10)
        stderr = "".join(err_lines)
        assert "Traceback" not in stderr, stderr[-3000:]
        result = json.loads(out)
        rows = result["subflows"]
        assert len(rows) == 4
        # the README's promise: every sub-flow completes across a short database restart
        assert [(r["name"], r["state"], r.get("error")) for r in rows] == [
            (f"mpi-{i}", "completed", None) for i in range(4)]
        assert proc.returncode == 0 and result["failed"] == 0, stderr[-3000:]
        # every run the API recorded is intact and COMPLETED: none stuck, failed or crashed
        runs = _api("/flow_runs/filter", {"limit": 200}, server.api_url)
        by_name = {r["name"]: r for r in runs}
        assert {f"mpi-{i}" for i in range(4)} <= set(by_name), sorted(by_name)
        assert {(r["name"], r["state_type"]) for r in runs} == {
            (name, "COMPLETED") for name in by_name}
    finally:
        if server is not None:
            server.stop()
        subprocess.run(["bash", str(pg_script), "stop", "--dir", str(data)], capture_output=True)
        shutil.rmtree(pg_dir, ignore_errors=True)


# --------------------------------------------------------------------------- 7. SIGKILL
def job_states(prefix: str) -> dict[str, tuple[str, str]]:
    """{job id: (job name, state)} of the queued jobs whose name starts with ``prefix``."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T"], capture_output=True,
                         text=True).stdout
    rows = [line.strip().split("|") for line in out.splitlines() if line.strip()]
    return {i: (name, state) for i, name, state in rows if name.startswith(prefix)}


@pytest.mark.slurm
@pytest.mark.once  # SIGKILL runs no handler: what ends the jobs is Dask's worker and `cleanup`
def test_sigkilled_pipeline_ends_running_jobs_and_cleanup_cancels_the_rest(tmp_path,
                                                                          hello_program):
    """No handler runs on SIGKILL, so nothing cancels the jobs. What the test bed shows
    (docs/troubleshooting.md): the RUNNING job's worker sees its scheduler connection broken and
    the job ends by itself, MPI step and all; the PENDING job stays queued: cleanup cancels it."""
    prefix = f"fkill{uuid.uuid4().hex[:6]}"
    profile = tmp_path / "p.yaml"
    # every job takes all 3 nodes, so of the 2 sub-flows one runs and one is PENDING
    profile.write_text(f"allocation:\n  job_name_prefix: {prefix}\n"
                       "  nodes: 3\n  ntasks_per_node: 1\n  partition: debug\n"
                       "  interface: lo\n  scheduler_interface: lo\n  start_timeout: 600\n"
                       "  extra_directives: ['--exclusive']\n"
                       "mpi:\n  nodes: 3\n  ntasks: 3\n  args: ['--sleep', '300.5']\n")
    workers_before = dask_workers()
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.run", "--backend", "slurm", "--profile", str(profile),
         "--subflows", "2", "--max-concurrent", "2", "--program", hello_program],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, "ASKAP_FLOWS_HOME": str(home)})
    try:
        wait_for(lambda: job_of(prefix) and sorted(s for _, s in job_states(prefix).values())
                 == ["PENDING", "RUNNING"], 120, "one job never ran while the other waited")
        proc.kill()  # SIGKILL: no handler runs, nothing is cancelled
        proc.wait(timeout=30)
        states = job_states(prefix)
        running = next(i for i, (_, s) in states.items() if s == "RUNNING")
        pending = next(i for i, (_, s) in states.items() if s == "PENDING")
        # the running job ends by itself: nobody cancels it
        wait_for(lambda: running not in job_states(prefix), 180,
                 "the running job did not end by itself after its pipeline was SIGKILLed")
        err = (home / "logs" / f"{states[running][0]}-{running}.err").read_text()
        assert "worker-handle-scheduler-connection-broken" in err, err[-3000:]
        # the pending one is still there (queued, or just started and waiting for its scheduler)
        assert pending in job_states(prefix), "the PENDING job went away by itself"
        cli = [sys.executable, "-m", "askap_flows.cli", "cleanup", "--prefix", prefix]
        listed = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "1 SLURM job(s)" in listed.stdout, listed.stdout
        done = subprocess.run(cli + ["--yes"], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0 and "cancelled 1 job(s)" in done.stdout, done.stdout + done.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", *job_states(prefix)] if job_states(prefix) else ["true"])
    assert askap_jobs(prefix) == []
    deadline = time.monotonic() + 20
    while dask_workers() - workers_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not dask_workers() - workers_before, "Dask workers outlived the cleanup"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "--sleep 300.5" not in ps, "MPI ranks outlived the cleanup"
