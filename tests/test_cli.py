import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def cli(*args):
    return subprocess.run([sys.executable, "-m", "askap_flows.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_render_prints_job_script_and_srun_line():
    r = cli("render", "--profile", "testbed")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=3" in r.stdout and "#SBATCH -n 1" not in r.stdout
    assert "srun --mpi=pmi2 --nodes 3 --ntasks 6" in r.stdout


def test_render_with_bad_profile_is_one_line_error(tmp_path):
    r = cli("render", "--profile", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and r.stderr.startswith("error: profile file")
    assert "Traceback" not in r.stderr


def test_profiles_lists_the_packaged_ones():
    r = cli("profiles")
    assert r.returncode == 0
    for name in ("local", "testbed", "pawsey_example"):
        assert name in r.stdout


