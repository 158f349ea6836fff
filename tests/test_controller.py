"""The pipeline's one SLURM control plane, for real on the test bed: a controller outage in the
middle of a pipeline is ridden out, and a pipeline's queries do not grow with its sub-flows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT
from test_faults import script, wait_for

# once: the job board, the retried sbatch/scancel/srun and slurmctld do not depend on Prefect's major
pytestmark = [pytest.mark.slurm, pytest.mark.once]
TESTBED = ROOT / "scripts" / "slurm_testbed.sh"


def profile(tmp_path, prefix: str) -> str:
    p = tmp_path / "p.yaml"
    p.write_text(f"allocation:\n  job_name_prefix: {prefix}\n  nodes: 1\n  ntasks_per_node: 1\n"
                 "  partition: debug\n  interface: lo\n  scheduler_interface: lo\n"
                 "mpi:\n  nodes: 1\n  ntasks: 1\n")
    return str(p)


def running(prefix: str) -> int:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%j"], capture_output=True,
                         text=True).stdout
    return sum(line.startswith(prefix) for line in out.split())


def test_a_controller_outage_mid_pipeline_is_ridden_out(tmp_path, hello_program, no_jobs_left):
    """slurmctld stops for 15 s while 3 sub-flows run (and two more wait to start): every
    sub-flow completes and no job is left."""
    prefix = f"fctl{uuid.uuid4().hex[:6]}"
    prog = script(tmp_path / "slow_hello.sh", f"#!/bin/sh\nsleep 12\nexec '{hello_program}'\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.run", "--backend", "slurm", "--profile",
         profile(tmp_path, prefix), "--subflows", "5", "--max-concurrent", "3", "--program", prog,
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "ASKAP_FLOWS_HOME": str(tmp_path / "home")})
    try:
        wait_for(lambda: running(prefix) == 3, 120, "three sub-flows' jobs never ran")
        time.sleep(2)
        subprocess.run(["bash", str(TESTBED), "stop-controller"], check=True, capture_output=True)
        try:
            time.sleep(15)
        finally:
            subprocess.run(["bash", str(TESTBED), "start-controller"], check=True,
                           capture_output=True)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = json.loads(out)["subflows"]
    assert [(r["name"], r["state"]) for r in rows] == [(f"mpi-{i}", "completed") for i in range(5)], \
        err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # nothing of the run is left pending or running. Steps that ended during the outage hold
    # their job in COMPLETING until slurmstepd's next try to report them (every 60 s in SLURM
    # 22.05): SLURM's own bookkeeping, no process of the job is left; it then leaves the queue.
    left = [line for line in queue(prefix) if " COMPLETING" not in line]
    assert left == [], left + [err[-3000:]]
    wait_for(lambda: queue(prefix) == [], 150, f"SLURM still lists {queue(prefix)}")


def queue(prefix: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%j %i %T %r"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if line.startswith(prefix)]


def test_a_job_that_fails_before_the_first_poll_ends_its_subflow_with_its_state(
        tmp_path, hello_program, no_jobs_left):
    """The job script exits at once (a prologue that fails), long before any worker connects:
    the sub-flow fails with the job's real end state, not with "no job appeared" after 60 s."""
    from askap_flows.flows import mpi_subflow
    from askap_flows.slurm import JobLost

    prefix = f"fearly{uuid.uuid4().hex[:6]}"
    p = tmp_path / "early.yaml"
    p.write_text(f"allocation:\n  job_name_prefix: {prefix}\n  nodes: 1\n  ntasks_per_node: 1\n"
                 "  partition: debug\n  interface: lo\n  scheduler_interface: lo\n"
                 "  prologue: ['exit 3']\nmpi:\n  nodes: 1\n  ntasks: 1\n")
    started = time.monotonic()
    with pytest.raises(JobLost) as lost:
        mpi_subflow(backend="slurm", profile=str(p), program=hello_program, name="fails-early")
    assert time.monotonic() - started < 45, "the end was not seen: the watch waited it out"
    assert lost.value.state == "FAILED", str(lost.value)
    assert f"SLURM job {lost.value.job_id} ({prefix}-" in str(lost.value)
    assert "ended (FAILED" in str(lost.value) and not lost.value.retryable
