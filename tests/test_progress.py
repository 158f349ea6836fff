"""Progress of the main job: plain lines in a log, a live line redrawn in place on a terminal."""

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from askap_flows.progress import CLEAR, Progress, status_line
from conftest import ROOT, askap_jobs, run_main


@pytest.mark.unit
def test_status_line_and_counts():
    assert status_line(3.2, 2, 1, 4, 0) == "[    3s] 2 queued, 1 running, 4 done, 0 failed"
    assert status_line(61, 0, 2, 0, 1, ["10", "9"]).endswith("| SLURM jobs 9, 10")
    assert status_line(2, 0, 3, 0, 0, ["5"], "pool job 5: 2 running, 1 waiting, 0 done, 0 failed"
                       ).endswith("| SLURM job 5 | pool job 5: 2 running, 1 waiting, 0 done, 0 failed")
    out = io.StringIO()
    p = Progress(3, out, tty=False)
    with p:
        p.started(0, "a")
        p.started(1, "b")
        p.ended(1, "b FAILED: boom", ok=False)
        assert p.counts() == (1, 1, 0, 1)
        p.ended(2, "c not started", ok=False)  # ended without starting (shutting down)
    assert p.counts() == (0, 1, 0, 2)
    assert out.getvalue().splitlines() == [
        "a started (2 queued, 1 running, 0 done, 0 failed)",
        "b started (1 queued, 2 running, 0 done, 0 failed)",
        "[1/3] b FAILED: boom", "[2/3] c not started"]
    tty = io.StringIO()
    with Progress(1, tty, tty=True, interval=0.05) as p:
        p.started(0, "a")
        time.sleep(0.2)  # the background thread redraws the line
        p.ended(0, "a completed", ok=True)
    text = tty.getvalue()
    assert text.count(CLEAR + "[    0s] 0 queued, 1 running") >= 2
    pooled = io.StringIO()
    with Progress(1, pooled, tty=True, interval=0.05) as p:
        p.pool = lambda: "pool job 5: 1 running, 0 waiting, 0 done, 0 failed"
        p.started(0, "a")
        time.sleep(0.2)
    assert "1 running, 0 done, 0 failed | pool job 5: 1 running, 0 waiting" in pooled.getvalue()
    assert CLEAR + "[1/1] a completed\n" in text and text.endswith(CLEAR)


@pytest.mark.mpi
def test_not_a_tty_gives_plain_lines(tmp_path, hello_program):
    r = run_main("--subflows", "2", "--ntasks", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr
    lines = r.stderr.splitlines()
    assert "mpi-0 started (1 queued, 1 running, 0 done, 0 failed)" in lines
    assert any(line.startswith("[2/2] mpi-") and " completed: 2 ranks" in line for line in lines)
    assert "2 completed, 0 failed" in r.stdout and r.stdout.startswith("sub-flow  state")


def run_in_pty(argv, timeout=300):
    """Run argv with stdout and stderr on a pseudo-terminal; return (exit code, all output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


@pytest.mark.slurm
def test_tty_gets_a_live_line_with_job_ids(tmp_path, hello_program):
    # the testbed profile with this test's own job names: the shared test bed runs other
    # askapflows-* jobs meanwhile, and this test must see only its own
    prefix = f"askapprog{os.getpid()}"
    profile = tmp_path / "testbed.yaml"
    profile.write_text((ROOT / "src/askap_flows/profiles/testbed.yaml").read_text().replace(
        "  start_timeout: 120", f"  start_timeout: 120\n  job_name_prefix: {prefix}"))
    # the program runs 5 s, so that the jobs are seen RUNNING: the line shows what the process's
    # job board last saw (its interval is 1-2 s), redrawn every second
    slow = tmp_path / "slow_hello.sh"
    slow.write_text(f"#!/bin/sh\nsleep 5\nexec '{hello_program}'\n")
    slow.chmod(0o755)
    code, out = run_in_pty([sys.executable, "-m", "askap_flows.run", "--backend", "slurm",
                            "--profile", str(profile), "--subflows", "2", "--nodes", "1",
                            "--ntasks", "2", "--program", str(slow)])
    assert code == 0, out[-3000:]
    redraws = [part for part in out.split("\r\x1b[K") if " queued, " in part]
    assert len(redraws) >= 2, out[-3000:]  # the line was redrawn in place, not appended
    assert any("running" in part and "| SLURM job" in part for part in redraws), out[-3000:]
    assert "started (" not in out  # the plain lines are for logs only
    assert "2 completed, 0 failed" in out
    assert not [job for job in askap_jobs(prefix)], "SLURM jobs outlived the run"


@pytest.mark.unit
def test_pool_needs_the_slurm_backend_and_room_for_a_sub_flow(tmp_path):
    r = run_main("--pool", "2", cwd=tmp_path)
    assert r.returncode == 2 and "error: --pool holds a SLURM job, but the backend is local: add " \
        "--backend slurm, or drop --pool." in r.stderr, r.stderr
    r = run_main("--backend", "slurm", "--profile", "testbed", "--nodes", "2", "--pool", "1",
                 cwd=tmp_path)
    assert r.returncode == 2 and "--pool 1 is narrower than one sub-flow (2 node(s)): give " \
        "--pool at least 2" in r.stderr, r.stderr


@pytest.mark.slurm
def test_pool_run_shows_the_pools_counts_on_the_live_line(tmp_path, hello_program):
    """`--pool 2`: the three sub-flows run as steps of one held job; the live line carries the
    pool's counts, a line names the pool when it opens and its counts when it closes, and the
    pipeline's flow run holds the pool's artifact (both versions)."""
    import re

    from askap_flows.pool_record import artifact_key
    from test_pool import read_artifacts

    prefix = f"askappoolprog{os.getpid()}"
    profile = tmp_path / "testbed.yaml"
    profile.write_text((ROOT / "src/askap_flows/profiles/testbed.yaml").read_text().replace(
        "  start_timeout: 120", f"  start_timeout: 120\n  job_name_prefix: {prefix}"))
    slow = tmp_path / "slow_hello.sh"
    slow.write_text(f"#!/bin/sh\nsleep 4\nexec '{hello_program}'\n")
    slow.chmod(0o755)
    code, out = run_in_pty([sys.executable, "-m", "askap_flows.run", "--backend", "slurm",
                            "--profile", str(profile), "--subflows", "3", "--max-concurrent", "3",
                            "--nodes", "1", "--ntasks", "2", "--program", str(slow),
                            "--pool", "2"])
    assert code == 0, out[-3000:]
    opened = re.search(r"pool: SLURM job (\d+) \((\S+)\) on node1,node2; Dask dashboard", out)
    assert opened, out[-3000:]
    job, name = opened.groups()
    redraws = [part for part in out.split("\r\x1b[K") if " queued, " in part]
    assert any(re.search(rf"\| pool job {job}: [1-3] running, \d waiting", part)
               for part in redraws), out[-3000:]
    assert f"pool job {job}: 0 running, 0 waiting, 3 done, 0 failed" in out  # the closing line
    assert "3 completed, 0 failed" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("mpi-")]
    assert {r[2] for r in rows} == {job}, rows  # every sub-flow in the pool's job
    versions = read_artifacts(key=artifact_key(name))
    assert len(versions) == 2 and len({a.flow_run_id for a in versions}) == 1, versions
    assert "| steps | 3 done, 0 failed, 0 running, 0 waiting |" in versions[1].data
    assert not askap_jobs(prefix), "SLURM jobs outlived the run"
