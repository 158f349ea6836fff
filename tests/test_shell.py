import os
import threading
import time

import pytest

from askap_flows import shell

pytestmark = [pytest.mark.unit, pytest.mark.once]  # subprocesses only: no Prefect


def test_lines_are_streamed_as_they_come():
    seen = []
    t0 = time.monotonic()
    shell.run(["bash", "-c", "echo one; sleep 1; echo two >&2"],
              on_line=lambda s, text: seen.append((s, text, time.monotonic() - t0)))
    assert [(s, text) for s, text, _ in seen] == [("stdout", "one"), ("stderr", "two")]
    assert seen[0][2] < 0.9 <= seen[1][2]  # the first line arrived before the command ended


def test_failure_carries_command_code_and_stderr_tail():
    with pytest.raises(shell.CommandError) as e:
        shell.run(["bash", "-c", "echo out; echo bad thing >&2; exit 7"])
    err = e.value
    assert err.returncode == 7 and err.stderr_tail == ["bad thing"]
    assert "exited with code 7: bash -c" in str(err) and "bad thing" in str(err)


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    with pytest.raises(shell.CommandError, match="timed out after 1 s"):
        shell.run(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout=1, kill_grace=1)
    child = int(pidfile.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_command_stopped_by_the_shutdown_is_a_failure_even_if_it_exits_0():
    """MPICH's mpiexec forwards SIGTERM to its ranks and exits 0: the interrupted run reported
    its killed MPI steps as completed."""
    outcome: list = []

    def target():
        try:
            outcome.append(shell.run(["bash", "-c", "trap 'exit 0' TERM; echo up; sleep 30 & wait"],
                                     on_line=lambda s, t: started.set()))
        except shell.CommandError as exc:
            outcome.append(exc)

    started = threading.Event()
    thread = threading.Thread(target=target)
    thread.start()
    assert started.wait(10)
    assert shell.terminate_all(grace=5) == 1
    thread.join(10)
    assert isinstance(outcome[0], shell.CommandError), outcome
    assert "killed because the run was interrupted" in str(outcome[0])


def test_missing_program_is_a_clear_error():
    with pytest.raises(shell.CommandError, match="could not start .'/no/such/prog' not found"):
        shell.run(["/no/such/prog"])


def test_output_that_arrives_after_the_process_ended_is_kept():
    """An MPI launcher's forwarding proxy may still hold the ranks' last lines when the launcher
    itself has exited: everything up to EOF is read (it was once cut off after 10 s)."""
    res = shell.run(["bash", "-c", "(sleep 12; echo late) & echo early"])
    assert res.stdout.splitlines() == ["early", "late"]


def test_a_command_its_caller_stops_is_killed_with_its_group(tmp_path):
    """``stop`` is how a Dask worker ends an MPI step whose Prefect task timed out: the step's
    srun (and all its group) must die, not run on holding the job's nodes."""
    pidfile = tmp_path / "child.pid"
    asked = time.monotonic() + 1.5
    t0 = time.monotonic()
    with pytest.raises(shell.CommandError, match="was stopped by its caller and killed"):
        shell.run(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], kill_grace=1,
                  stop=lambda: time.monotonic() > asked)
    assert time.monotonic() - t0 < 60  # not the 300-s sleep (a loaded machine takes seconds)
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


def test_a_stop_that_cannot_be_asked_does_not_stop_the_command():
    def broken() -> bool:
        raise ConnectionError("the scheduler is gone")

    assert shell.run(["bash", "-c", "sleep 1.5; echo done"], stop=broken).stdout == "done"
