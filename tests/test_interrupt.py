"""The first signal's cancel thread (interrupt.py), without a signal or a test bed."""

import threading
import time

import pytest

from askap_flows import interrupt, runners, shell

pytestmark = pytest.mark.unit


def test_a_command_started_after_the_first_cancel_round_is_killed_before_the_give_up(
        monkeypatch, tmp_path):
    """``shell.terminate_all`` kills only the commands already running: one launched a moment
    after the signal (a local MPI step) is stopped by the next cancel round, not at the give-up."""
    said, gave_up = [], []
    monkeypatch.setattr(interrupt, "GIVE_UP_AFTER", 3.0)
    monkeypatch.setattr(interrupt, "_cancels_done", threading.Event())
    monkeypatch.setattr(interrupt, "say_to", [said.append])
    monkeypatch.setattr(interrupt, "log_path", lambda: tmp_path / "run.log")
    monkeypatch.setattr(interrupt, "_exit_now", lambda: gave_up.append(time.monotonic()))
    thread = threading.Thread(target=interrupt._cancel_until_the_give_up, daemon=True)
    try:
        thread.start()
        assert interrupt._cancels_done.wait(10), "the first cancel round never ended"
        started = time.monotonic()
        with pytest.raises(shell.CommandError, match="killed because the run was interrupted"):
            shell.run(["sleep", "20"], timeout=10)
        assert time.monotonic() - started < interrupt.GIVE_UP_AFTER
        thread.join(10)
        assert len(gave_up) == 1 and gave_up[0] - started < interrupt.GIVE_UP_AFTER + 1
        assert "exiting now" in said[-1], said
    finally:
        runners.shutting_down.clear()  # set by the cancels
