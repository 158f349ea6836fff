"""The worker's MPI step (launch.py) against a stand-in `srun` that fails the way the real one
does while slurmctld is down (recorded on the test bed: tests/test_controller.py)."""

import pytest

from askap_flows import launch, shell
from askap_flows.spec import MPISpec

pytestmark = pytest.mark.unit

DOWN = ("srun: error: Unable to confirm allocation for job 63: Unable to contact slurm controller "
        "(connect failure)")


def fake_srun(tmp_path, monkeypatch, failures: int, message: str = DOWN):
    """An `srun` on PATH that fails ``failures`` times with ``message``, then runs the program."""
    count = tmp_path / "count"
    count.write_text("0")
    srun = tmp_path / "srun"
    srun.write_text(f"""#!/bin/sh
n=$(cat '{count}'); echo $((n + 1)) > '{count}'
if [ "$n" -lt {failures} ]; then
  echo '{message}' >&2
  echo 'srun: Check SLURM_JOB_ID environment variable. Expired or invalid job 63' >&2
  exit 1
fi
shift $(($# - 1)); exec "$1"
""")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return count


def program(tmp_path):
    p = tmp_path / "prog"
    p.write_text("#!/bin/sh\necho ran\n")
    p.chmod(0o755)
    return str(p)


SPEC = MPISpec(launcher="srun", nodes=1, ntasks=1, timeout=30)


def test_a_step_srun_could_not_start_for_an_unreachable_controller_is_launched_again(
        tmp_path, monkeypatch):
    count = fake_srun(tmp_path, monkeypatch, failures=2)
    out = launch.mpi_step(SPEC, program(tmp_path), False, None)
    assert out["exit_code"] == 0 and count.read_text().strip() == "3"


def test_after_the_grace_period_the_controllers_silence_fails_the_step(tmp_path, monkeypatch):
    monkeypatch.setenv("ASKAP_FLOWS_SLURM_GRACE", "0")
    count = fake_srun(tmp_path, monkeypatch, failures=5)
    with pytest.raises(shell.CommandError, match="Unable to contact slurm controller"):
        launch.mpi_step(SPEC, program(tmp_path), False, None)
    assert count.read_text().strip() == "1"


def test_other_srun_failures_are_not_launched_again(tmp_path, monkeypatch):
    count = fake_srun(tmp_path, monkeypatch, failures=5, message=(
        "srun: error: Unable to confirm allocation for job 63: Invalid job id specified"))
    with pytest.raises(shell.CommandError, match="Invalid job id"):
        launch.mpi_step(SPEC, program(tmp_path), False, None)
    assert count.read_text().strip() == "1"
