"""Warm allocations on the real test bed: many MPI sub-flows as job steps of one held job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from uuid import UUID

import pytest

from conftest import askap_jobs
from test_faults import flow_run_logs, flow_runs, in_parent_flow, wait_for

pytestmark = pytest.mark.slurm


def test_steps_run_side_by_side_in_one_held_job(hello_program, no_jobs_left):
    from askap_flows import allocation
    from askap_flows.flows import mpi_subflow
    from askap_flows.pool import PoolError

    tag = uuid.uuid4().hex[:6]
    # each wide step runs 1 s at least: the three are called together, and a slow start of one
    # call on a loaded machine must not let the steps run one after another without queueing
    wide = {"nodes": 2, "ntasks": 8, "ntasks_per_node": 4, "args": ["--sleep", "1"]}
    small = {"nodes": 1, "ntasks": 2, "ntasks_per_node": 2}
    with allocation(profile="testbed", nodes=3, walltime="00:10:00", ntasks_per_node=4) as pool:
        assert pool.nodes == ["node1", "node2", "node3"]
        job_id = pool.job_id
        started = time.monotonic()
        with pytest.raises(PoolError, match=r"needs 4 node\(s\) with 1 CPU\(s\) each, but the pool "
                                            r"has 3 node\(s\) with 4 CPU\(s\) each"):
            mpi_subflow({"nodes": 4, "ntasks": 4, "ntasks_per_node": 1}, pool=pool)
        with pytest.raises(PoolError, match=r"up to 3600 s \(MPISpec.timeout\).* ends in"):
            mpi_subflow({**small, "timeout": 3600}, pool=pool)
        assert time.monotonic() - started < 5, "refusals must not wait for nodes"
        calls = [partial(mpi_subflow, wide, pool=pool, name=f"pool-wide{i}-{tag}")
                 for i in range(3)]
        calls += [partial(mpi_subflow, small, pool=pool, name=f"pool-small{i}-{tag}")
                  for i in range(2)]
        out = in_parent_flow(calls, 5)  # Prefect 2: sub-flows in threads need a parent flow
    # its worker left at the close and the job ended by itself (not cancelled after a wait)
    from conftest import final_state

    assert final_state(job_id) == "COMPLETED"
    for o in out:
        assert o.ok, o.error
        res = o.value
        assert res.job_id == job_id  # every step ran inside the one held job
        assert {r.processor for r in res.ranks} == set(res.nodes)  # on the nodes it was given
        assert "--exact" in res.command and f"--nodelist={','.join(res.nodes)}" in res.command
        assert res.step_id and res.step_id.split(".")[0] == job_id  # a step of the held job
        n = 8 if "wide" in res.name else 2
        assert len(res.ranks) == n and {r.size for r in res.ranks} == {n}
    assert [len(o.value.nodes) for o in out] == [2, 2, 2, 1, 1]
    # two 2-node steps of 4 CPUs per node cannot run at once on 3 such nodes: all but one of the
    # three waited in the pool's own queue (before their srun), none in SLURM's step retry loop
    waits = sorted(o.value.timings["queue_wait"] for o in out if "wide" in o.value.name)
    assert waits[1] > 0.2, waits
    runs = flow_runs([*(f"pool-wide{i}-{tag}" for i in range(3)), f"pool-small1-{tag}"])
    assert {r["state_type"] for r in runs.values()} == {"COMPLETED"}, runs
    for i in range(3):
        said = " ".join(m["message"] for m in flow_run_logs(runs[f"pool-wide{i}-{tag}"]["id"]))
        assert "ASKAP_MPI_HELLO rank=" in said, said[:500]  # the program's lines are here
        assert "temporarily disabled" not in said and "nodes are busy" not in said, said[-1500:]
    from test_faults import _api

    artifacts = _api("/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [runs[f"pool-wide0-{tag}"]["id"]]}}})
    (table,) = artifacts  # one artifact per step: one API request
    assert table["type"] == "table" and f"SLURM job {job_id}" in table["description"]
    assert all(n in str(table["data"]) for n in out[0].value.nodes), table["data"]
    dashboard = out[0].value.dashboard
    assert f"[Dask dashboard (pool)]({dashboard})" in table["description"], table  # a link
    queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                            text=True).stdout.strip()
    assert queued in ("", "COMPLETING", "CANCELLED", "COMPLETED"), queued
    # the block's end retired the pool's worker, so that its job ended by itself: no scancel after
    # the cluster close's grace for a job still running (jobs.WORKER_EXIT_GRACE)
    err = Path(pool.handle.err_log(job_id)).read_text()
    assert "End worker" in err and "CANCELLED" not in err, err[-2000:]


def read_artifacts(key: str | None = None, flow_run_id: str | None = None) -> list:
    """Artifacts through Prefect's client (both majors), oldest first."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]) if key else None,
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None))

    return sorted(asyncio.run(read()), key=lambda a: a.created)


def table_rows(artifact) -> list[dict]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def test_each_step_has_its_slurm_step_id_and_the_pool_its_artifact(tmp_path, hello_program,
                                                                   no_jobs_left):
    """Three steps side by side in a pool opened inside a flow: each names its real SLURM step
    (seen in `squeue --steps` while it ran) in its result, its task log and its table; the pool's
    markdown artifact is on the opening flow run, written when it opened and when it closed."""
    from prefect import flow

    from askap_flows import allocation
    from askap_flows.composition import run_subflows
    from askap_flows.flows import mpi_subflow
    from askap_flows.pool_record import artifact_key

    slow = tmp_path / "slow_hello.sh"  # long enough for squeue to see the step
    slow.write_text(f"#!/bin/sh\nsleep 3\nexec '{hello_program}'\n")
    slow.chmod(0o755)
    tag, seen, stop, held = uuid.uuid4().hex[:6], set(), threading.Event(), {}

    def watch_steps():
        while not stop.wait(0.25):
            if "pool" in held:
                out = subprocess.run(["squeue", "-h", "-s", "-j", held["pool"].job_id, "-o", "%i"],
                                     capture_output=True, text=True).stdout
                seen.update(s for s in out.split() if s.split(".")[-1].isdigit())

    @flow(name="pool-opener", flow_run_name=f"pool-opener-{tag}")
    def opener():
        with allocation(profile="testbed", nodes=2, walltime="00:10:00",
                        ntasks_per_node=4) as pool:
            held["pool"] = pool
            calls = [partial(mpi_subflow, {"nodes": 1, "ntasks": 2, "ntasks_per_node": 2},
                             pool=pool, program=str(slow), name=f"pstep{i}-{tag}")
                     for i in range(3)]
            return run_subflows(calls, max_concurrent=3)

    watcher = threading.Thread(target=watch_steps, daemon=True)
    watcher.start()
    try:
        out = opener()
    finally:
        stop.set()
        watcher.join()
    pool = held["pool"]
    steps = []
    for o in out:
        assert o.ok, o.error
        job, _, step = (o.value.step_id or "").partition(".")
        assert job == pool.job_id and step.isdigit(), o.value.step_id
        steps.append(o.value.step_id)
    assert len(set(steps)) == 3, steps
    assert set(steps) <= seen, (steps, seen)  # real steps: squeue listed them while they ran
    runs = flow_runs([f"pool-opener-{tag}"] + [f"pstep{i}-{tag}" for i in range(3)])
    for i, o in enumerate(out):
        run_id = runs[f"pstep{i}-{tag}"]["id"]
        logs = [entry["message"] for entry in flow_run_logs(run_id)]
        assert f"SLURM job step {o.value.step_id}" in logs, logs
        assert not any(m.startswith("askap_flows: SLURM step") for m in logs)  # not also raw
        table = next(a for a in read_artifacts(flow_run_id=run_id) if a.type == "table")
        row = table_rows(table)[0]
        assert (row["slurm_job_id"], row["slurm_step_id"]) == (pool.job_id, o.value.step_id)
        assert row["nodes"] == ",".join(o.value.nodes) and row["dashboard"] == pool.dashboard
    versions = read_artifacts(key=artifact_key(pool.job_name))
    assert [a.flow_run_id for a in versions] == [UUID(runs[f"pool-opener-{tag}"]["id"])] * 2
    opened, closed = (a.data for a in versions)
    assert "| state | open |" in opened and "| state | closed |" in closed
    for text in (f"| SLURM job | {pool.job_id} |", "| walltime | 00:10:00 |",
                 f"| nodes | {','.join(pool.nodes)} (2 x 4 CPUs) |", pool.dashboard):
        assert text in closed, (text, closed)
    assert "| steps | 3 done, 0 failed, 0 running, 0 waiting |" in closed, closed
    assert not (Path(pool.prolog)).exists()  # the prolog script went with the pool


HOLDER = textwrap.dedent("""
    import sys, time
    from askap_flows import allocation
    with allocation(profile="testbed", nodes=1, walltime="00:05:00",
                    job_name_prefix=sys.argv[1]) as pool:
        if sys.argv[2] == "kill":  # a task runs on the pool's worker when the pipeline dies
            busy = pool.client.submit(time.sleep, 120, pure=False)
            while not any(pool.client.processing().values()):
                time.sleep(0.1)
        print("READY", pool.job_id, flush=True)
        if sys.argv[2] == "raise":
            raise RuntimeError("boom in the block")
        time.sleep(120)
""")


def _holder(tmp_path, prefix: str, how: str) -> subprocess.Popen:
    path = tmp_path / "holder.py"
    path.write_text(HOLDER)
    return subprocess.Popen([sys.executable, str(path), prefix, how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def _ready(proc) -> str:
    line = proc.stdout.readline()
    assert line.startswith("READY"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.split()[1]


def test_allocation_ends_with_an_exception_sigterm_and_sigint(tmp_path, no_jobs_left):
    tag = uuid.uuid4().hex[:6]
    ways = {"raise": None, "term": signal.SIGTERM, "int": signal.SIGINT}
    procs = {how: _holder(tmp_path, f"pool{how}{tag}", how) for how in ways}  # side by side
    try:
        for how, sig in ways.items():
            _ready(procs[how])
            assert len(askap_jobs(f"pool{how}{tag}")) == 1
            if sig is not None:
                procs[how].send_signal(sig)
        for proc in procs.values():
            proc.wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for how, proc in procs.items():
        err = proc.stderr.read()
        # (SIGINT: dask_jobqueue 0.9 turns it into sys.exit(), which exits 0)
        assert proc.returncode != 0 or how == "int", err
        if how == "raise":
            assert "boom in the block" in err
        wait_for(lambda p=f"pool{how}{tag}": askap_jobs(p) == [], 30,
                 f"{how}: the pool's job outlived its block")


def test_sigkilled_pool_is_found_by_cleanup(tmp_path, no_jobs_left):
    """`cleanup` lists a pool's job by its name and cancels it after a SIGKILL. (Its worker, which
    sees its scheduler vanish at once, waits up to 30 s for its running task before it exits:
    docs/troubleshooting.md; the cleanup comes within that time.)"""
    prefix = f"poolkill{uuid.uuid4().hex[:6]}"
    proc = _holder(tmp_path, prefix, "kill")
    cli = [sys.executable, "-m", "askap_flows.cli", "cleanup", "--prefix", prefix]
    try:
        job_id = _ready(proc)
        listed = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert "1 SLURM job(s)" in listed.stdout and f"{prefix}-pool-" in listed.stdout, listed
        assert job_id in listed.stdout
        proc.kill()
        proc.wait(timeout=30)
        done = subprocess.run(cli + ["--yes"], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "cancelled 1 job(s)" in done.stdout, done.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        if askap_jobs(prefix):
            subprocess.run(["scancel", "--name", askap_jobs(prefix)[0].split()[0]])
    wait_for(lambda: askap_jobs(prefix) == [], 30, "the pool's job is still queued")


def test_pool_example_pipeline_runs(tmp_path, hello_program, no_jobs_left):
    from conftest import ROOT

    r = subprocess.run([sys.executable, str(ROOT / "examples" / "pool_pipeline.py"), "testbed"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = [x.split() for x in r.stdout.splitlines() if x[:1].isdigit()]
    assert len(lines) == 8 and {x[1] for x in lines} == {"ok"}, r.stdout
    assert len({x[2] for x in lines}) == 1  # one SLURM job for all eight
    assert {x[4].split(".")[0] for x in lines} == {lines[0][2]}  # as steps J.S of that job
    assert len({x[4] for x in lines}) == 8, r.stdout


def test_a_dead_node_fails_only_its_steps_and_a_retry_runs_on_the_others(tmp_path, hello_program,
                                                                        no_jobs_left):
    import threading

    from askap_flows import allocation
    from askap_flows.flows import mpi_subflow
    from test_faults import TESTBED, waiter

    flag = tmp_path / "go"
    program = waiter(tmp_path, hello_program, flag)
    tag = uuid.uuid4().hex[:6]
    result: dict = {}
    killed = False
    with allocation(profile="testbed", nodes=3, walltime="00:10:00", ntasks_per_node=4) as pool:
        # best fit: the target gets node1+node2, the sibling joins it on node1; node2 then dies
        # (node1 runs the pool's worker: its death would end the whole pool)
        target = partial(mpi_subflow, {"nodes": 2, "ntasks": 2, "ntasks_per_node": 1},
                         pool=pool, program=program, name=f"ptarget-{tag}", retries=1)
        sibling = partial(mpi_subflow, {"nodes": 1, "ntasks": 1, "ntasks_per_node": 1},
                          pool=pool, program=program, name=f"psibling-{tag}")
        runner = threading.Thread(target=lambda: result.update(out=in_parent_flow([target, sibling],
                                                                                  2)))
        runner.start()
        try:
            def placed():
                running = list(pool.ledger.running.values())
                return len(running) == 2 and running

            held = wait_for(placed, 120, "the two steps were never placed")
            target_nodes = next(list(h) for h in held if len(h) == 2)
            sibling_node = next(list(h) for h in held if len(h) == 1)[0]
            victim = next(n for n in target_nodes if n not in ("node1", sibling_node))
            time.sleep(2)  # let both steps' sruns start
            subprocess.run(["bash", str(TESTBED), "kill-node", victim[4:], "--down-now"],
                           check=True, capture_output=True)
            killed = victim
            wait_for(lambda: victim not in pool.nodes, 90, "the pool did not drop the dead node")
            flag.touch()
            runner.join(timeout=180)
            assert not runner.is_alive(), "the steps hang after the node died"
            assert pool.nodes == [n for n in ("node1", "node2", "node3") if n != victim]
        finally:
            flag.touch()
            runner.join(timeout=180)
            if killed:
                subprocess.run(["bash", str(TESTBED), "revive-node", killed[4:]], check=True,
                               capture_output=True)
    target_out, sibling_out = result["out"]
    assert target_out.ok, target_out.error
    assert sibling_out.ok, sibling_out.error
    assert victim not in target_out.value.nodes and target_out.value.job_id == pool.job_id
    assert sibling_out.value.nodes == [sibling_node]
    runs = flow_runs([f"ptarget-{tag}", f"ptarget-{tag}-retry1"])
    first, retry = runs[f"ptarget-{tag}"], runs[f"ptarget-{tag}-retry1"]
    assert first["state_type"] == "FAILED" and retry["state_type"] == "COMPLETED"
    message = first["state"]["message"]
    assert f"lost node(s) {victim}" in message and pool.job_id in message, message
    assert "retries=N" in message
