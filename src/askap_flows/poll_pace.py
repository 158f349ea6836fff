"""How often the job board may ask SLURM: its intervals, its grace period and its burst budget.

The board polls every ``high`` seconds in a steady stretch and every ``low`` seconds while jobs
start or end (or a reader asks). A poll that comes sooner than ``high`` after the one before is
*early*, and each early poll spends one credit of a budget: ``burst`` credits at most, one more
every ``refill`` seconds. With the budget spent, the board keeps its steady ``high`` cadence
until a credit comes back. So a pipeline whose jobs start and end all the time (48 sub-flows in
waves on 3 nodes) still averages at most about ``1/high + (1 - low/high)/refill`` queries a
second over a long stretch (0.525 with the defaults, against 0.5 for a quiet pipeline), plus the
starting credits: the load on slurmctld does not grow with the number of sub-flows.

The knobs: ``ASKAP_FLOWS_SLURM_POLL`` ("LOW-HIGH" seconds, default "1-2"),
``ASKAP_FLOWS_SLURM_BURST`` ("CREDITS/SECONDS", default "10/20": 10 early polls, one more every
20 s) and ``ASKAP_FLOWS_SLURM_GRACE`` (seconds without an answer before the waiters fail,
default 60).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping

POLL_ENV, BURST_ENV, GRACE_ENV = ("ASKAP_FLOWS_SLURM_POLL", "ASKAP_FLOWS_SLURM_BURST",
                                  "ASKAP_FLOWS_SLURM_GRACE")
DEFAULT_POLL, DEFAULT_BURST, DEFAULT_GRACE = (1.0, 2.0), (10, 20.0), 60.0


def poll_settings(env: Mapping[str, str] | None = None) -> tuple[float, float, float]:
    """(low, high, grace) from the environment, with a message that names a malformed value."""
    env = os.environ if env is None else env
    text = env.get(POLL_ENV, "").strip()
    low, high = DEFAULT_POLL
    try:
        if text:
            parts = text.split("-", 1) if "-" in text else [text, text]
            low, high = (float(x) for x in parts)
        grace = float(env.get(GRACE_ENV, "").strip() or DEFAULT_GRACE)
    except ValueError:
        raise ValueError(f"{POLL_ENV}={text!r} / {GRACE_ENV}={env.get(GRACE_ENV)!r}: use "
                         f"{POLL_ENV}=LOW-HIGH seconds (e.g. 1-3) and {GRACE_ENV}=SECONDS."
                         ) from None
    if not (0.1 <= low <= high) or grace < 0:
        raise ValueError(f"{POLL_ENV}={text!r}: need 0.1 <= LOW <= HIGH; {GRACE_ENV} >= 0.")
    return low, high, grace


def burst_settings(env: Mapping[str, str] | None = None) -> tuple[int, float]:
    """(credits, refill seconds) of the early-poll budget from ``ASKAP_FLOWS_SLURM_BURST``."""
    env = os.environ if env is None else env
    text = env.get(BURST_ENV, "").strip()
    if not text:
        return DEFAULT_BURST
    try:
        credits, refill = text.split("/", 1)
        return PollBudget.checked(int(credits), float(refill))
    except ValueError:
        raise ValueError(f"{BURST_ENV}={text!r}: use CREDITS/SECONDS, a whole number >= 0 and a "
                         f"number of seconds > 0, e.g. 10/20 (10 polls sooner than the steady "
                         f"interval, one more every 20 s; 0/1: none).") from None


class PollBudget:
    """The credits for early polls: ``credits`` at most, one more every ``refill`` seconds."""

    def __init__(self, credits: int, refill: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.credits, self.refill = self.checked(credits, refill)
        self._clock = clock
        self._left, self._at = float(self.credits), clock()

    @staticmethod
    def checked(credits: int, refill: float) -> tuple[int, float]:
        """(credits, refill), or ValueError unless a whole number >= 0 and finite seconds > 0."""
        if credits != int(credits) or credits < 0 or not (math.isfinite(refill) and refill > 0):
            raise ValueError(f"an early-poll budget needs CREDITS >= 0 (whole) and SECONDS > 0, "
                             f"got {credits!r}/{refill!r}")
        return int(credits), float(refill)

    def take(self) -> bool:
        """Spend one credit if there is one (True), else False: stay on the steady cadence."""
        now = self._clock()
        self._left = min(float(self.credits), self._left + (now - self._at) / self.refill)
        self._at = now
        if self._left >= 1.0:
            self._left -= 1.0
            return True
        return False
