"""The worker's MPI step (launch.py) against a stand-in `srun` that fails the way the real one
does while slurmctld is down (recorded on the test bed: tests/test_controller.py)."""

import os
import time

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


class Lines:
    """A stand-in for the task's Prefect logger."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def info(self, fmt, line) -> None:
        self.seen.append(line)

    warning = info


def test_a_step_its_task_gives_up_on_is_killed_reports_its_end_and_is_not_launched_again(
        tmp_path, monkeypatch):
    """What mpi_task does when Prefect's timeout_seconds (or an interrupt) raises in its thread:
    the worker kills srun's group within seconds and says so, and its "end" event arrives. The
    stand-in srun also printed the controller-outage error, after which a failed step would be
    launched again: a stopped one is not."""
    import distributed

    from askap_flows import mpi_run

    count, pidfile = tmp_path / "count", tmp_path / "rank.pid"
    count.write_text("0")
    srun = tmp_path / "srun"
    srun.write_text(f"#!/bin/bash\necho $(($(cat '{count}') + 1)) > '{count}'\n"
                    f"echo '{DOWN}' >&2\nsleep 300 & echo $! > '{pidfile}'; wait\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    topic, relayed, lines = "askap-mpi-test-stop", mpi_run.LineCount(), Lines()
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as c, \
            distributed.Client(c, set_as_default=False) as client:
        client.subscribe_topic(topic, relayed.relay_to(lines))
        future = client.submit(launch.mpi_step, MPISpec(launcher="srun", nodes=1, ntasks=1,
                                                        timeout=120), program(tmp_path), False,
                               topic, pure=False)
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline and not future.done(), future
            time.sleep(0.1)
        started = time.monotonic()
        assert mpi_run.stop_step(client, future, topic, relayed)
        took = time.monotonic() - started
        time.sleep(0.5)
        assert count.read_text().strip() == "1", "the stopped step was launched again"
    assert took < shell.STOP_POLL + 8, took
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)
    assert any("stopped by its Prefect task" in line for line in lines.seen), lines.seen


def test_the_watch_sees_a_finished_task_at_once(monkeypatch):
    """watch.future_done wakes when the Dask task ends (its done callback), not at its next poll:
    a 50-ms poll cost every step 25 ms on average between its srun's end and its result. Judged
    by how often the future is asked whether it is done (load-proof), not by a clock."""
    import distributed

    from askap_flows import watch

    asked = []
    done = distributed.Future.done
    monkeypatch.setattr(distributed.Future, "done", lambda self: asked.append(1) or done(self))
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as c, \
            distributed.Client(c, set_as_default=False) as client:
        for _ in range(3):
            future = client.submit(time.sleep, 0.5, pure=False)
            asked.clear()
            assert watch.future_done(future, timeout=30)
            # before the wait and after it; a 50-ms poll asks about ten times in 0.5 s
            assert len(asked) <= 3, f"the future was asked {len(asked)} times: a poll"
        slow = client.submit(time.sleep, 1, pure=False)
        assert not watch.future_done(slow, timeout=0.05)  # a timeout is not an end
        slow.cancel()
        assert watch.future_done(slow, timeout=1)  # a cancelled task is done too
