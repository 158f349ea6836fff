"""Bad input: one clear message, exit 2, no traceback, nothing left in SLURM."""

import os
import shutil
import sys

import pytest

from conftest import run_main

def _no_traceback(r):
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.unit
def test_no_mpicc_says_what_to_install(tmp_path):
    if shutil.which("mpicc", path=os.path.dirname(sys.executable)):
        pytest.skip("this Python's own bin dir ships mpicc (the mpich wheel)")
    bindir = tmp_path / "bin"
    bindir.mkdir()  # a PATH without any MPI
    r = run_main(env={"PATH": str(bindir), "MPICC": "", "ASKAP_FLOWS_HOME": str(tmp_path / "h")},
                 cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "no MPI compiler (mpicc) found" in r.stderr
    assert "apt-get install mpich libmpich-dev" in r.stderr and "pip install mpich" in r.stderr
    _no_traceback(r)


@pytest.mark.unit
def test_missing_program_is_named(tmp_path):
    r = run_main("--program", str(tmp_path / "nope"), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert f"MPI program '{tmp_path / 'nope'}' does not exist" in r.stderr
    _no_traceback(r)


@pytest.mark.unit
def test_impossible_layout_is_refused_before_anything_runs(tmp_path):
    r = run_main("--nodes", "3", "--ntasks", "2", cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "ntasks (2) is smaller than nodes (3)" in r.stderr
    _no_traceback(r)


@pytest.mark.unit
def test_no_srun_on_path(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    r = run_main("--backend", "slurm", "--profile", "testbed",
                 env={"PATH": str(bindir)}, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "is not on PATH" in r.stderr and "SLURM" in r.stderr
    _no_traceback(r)


@pytest.mark.slurm
def test_slurm_not_reachable(tmp_path, hello_program):
    conf = tmp_path / "slurm.conf"
    text = open(os.environ["SLURM_CONF"]).read().replace("SlurmctldPort=6817", "SlurmctldPort=6999")
    conf.write_text(text)
    r = run_main("--backend", "slurm", "--profile", "testbed",
                 env={"SLURM_CONF": str(conf)}, cwd=tmp_path, timeout=180)
    assert r.returncode == 2
    assert "sinfo" in r.stderr and "slurm_testbed.sh up" in r.stderr
    _no_traceback(r)


@pytest.mark.slurm
def test_request_slurm_cannot_hold_is_rejected_before_submission(tmp_path, hello_program, no_jobs_left):
    r = run_main("--backend", "slurm", "--profile", "testbed", "--nodes", "5", "--ntasks", "5",
                 "--subflows", "1", cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert "SLURM rejected the job before submission" in r.stderr
    assert "Nothing was submitted" in r.stderr
    assert "Prefect server" not in r.stderr  # refused before anything started
    _no_traceback(r)
