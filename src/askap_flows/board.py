"""The job board: one thread per process asks SLURM about every job the process tracks, in ONE
query per interval (``scontrol -o show job``: one RPC), and everyone else reads its cache or
waits on its changes.

Readers (the job watch of every sub-flow, a cluster's close, cancels, the progress line, the
classification of failures, ``cleanup``) never query SLURM themselves, so the load a pipeline
puts on slurmctld does not grow with the number of its sub-flows. SLURM keeps a job that already
ended in the answer, with its final state and reason, for MinJobAge (300 s by default): a job
that starts and ends between two polls is still seen.

The interval adapts: ``low`` seconds while jobs are being tracked, start or end (or a reader asks
for a fresh answer, or times one for a job about to end: ``poll_soon(after)``), and ``high``
from the first answer in which nothing changed; never less than ``low`` between two. A poll
sooner than ``high`` after the one before spends a credit of a budget (``poll_pace.py``; a fresh
wait's request excepted): with it spent, the steady cadence goes on, so a pipeline whose jobs
change all the time asks about as often as a quiet one (5-10 % more, not N times more). A failed
query is retried with backoff and logged once; the waiters fail only after ``grace`` s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from . import clusters, shell
from .jobstate import ACTIVE_STATES, GONE, JobState, parse_jobs, query_command  # noqa: F401
from .poll_pace import GRACE_ENV, PollBudget, burst_settings, poll_settings
from .slurm import SlurmError

log = logging.getLogger("askap_flows")

#: what SLURM's commands say when the controller does not answer (worth another try)
UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out on send/recv",
               "Zero Bytes were transmitted or received")


def unreachable(said: str) -> bool:
    """Whether a SLURM command's error says that the controller did not answer."""
    return any(t in said for t in UNREACHABLE)


def retry_pauses(grace: float, first: float = 1.0, most: float = 10.0) -> Iterator[float]:
    """The pauses between tries of a SLURM command while the controller does not answer:
    doubling from ``first`` up to ``most``, until ``grace`` seconds after the first call."""
    deadline = time.monotonic() + grace
    pause = first
    while time.monotonic() < deadline:
        yield pause
        pause = min(2 * pause, most)


class ControllerUnreachable(SlurmError):
    """SLURM did not answer the board's query for longer than the grace period."""


def run_query(names: Sequence[str], cluster: str = clusters.LOCAL) -> str:
    return shell.output(query_command(cluster), timeout=30)


class JobBoard:
    """SLURM's view of the jobs this process tracks, refreshed by one thread."""

    def __init__(self, query: Callable[[Sequence[str], str], str] = run_query,
                 low: float | None = None, high: float | None = None,
                 grace: float | None = None, burst: tuple[int, float] | None = None) -> None:
        d_low, d_high, d_grace = poll_settings()
        self.low = d_low if low is None else low
        self.high = d_high if high is None else high
        self.grace = d_grace if grace is None else grace
        self.budget = PollBudget(*(burst_settings() if burst is None else burst))
        self._query = query
        self._cond = threading.Condition()
        self._names: dict[str, int] = {}  # tracked name -> number of holders
        self._clusters: dict[str, str | None] = {}  # tracked name -> its profile's clusters:
        self._jobs: dict[tuple[str, str], JobState] = {}  # (cluster, job id) -> last seen state
        self._submitted: dict[str, set[tuple[str, str]]] = {}  # name -> what sbatch returned
        self._polls = 0  # successful polls so far
        self._failing_since: float | None = None
        self._error: str | None = None  # set once the controller did not answer for `grace` s
        self._urgent = threading.Event()
        self._due: float | None = None  # when a poll_soon(after) asked for the next poll
        self._exempt = False  # a fresh wait asked for the next poll: it spends no credit
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- tracking
    def track(self, name: str, clusters: str | None = None) -> None:
        """Watch the jobs of ``name``, on the clusters of its profile's ``clusters:`` (None:
        this host's own cluster, or what an earlier holder of the name said)."""
        with self._cond:
            self._names[name] = self._names.get(name, 0) + 1
            if clusters or name not in self._clusters:
                self._clusters[name] = clusters
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="askap-job-board")
                self._thread.start()
        self.poll_soon()

    def submitted(self, name: str, job_id: str, cluster: str = clusters.LOCAL) -> None:
        """sbatch returned ``job_id`` on ``cluster`` for ``name``: known before the first poll."""
        with self._cond:
            self._submitted.setdefault(name, set()).add((cluster, str(job_id)))
        self.poll_soon()

    def clusters_of(self, name: str) -> str | None:
        """The ``clusters:`` value ``name`` was tracked with (None: this host's cluster)."""
        with self._cond:
            return self._clusters.get(name)

    def live_ids(self, name: str) -> tuple[list[tuple[str, str]], bool]:
        """((cluster, id) of this name's jobs not seen ending, complete): ``complete`` is
        False when a job of this name may exist that the board cannot name (nothing submitted
        through it and nothing seen), so a cancel must go by name."""
        with self._cond:
            seen = {k: j for k, j in self._jobs.items() if j.name == name}
            keys = set(self._submitted.get(name, set())) | set(seen)
            live = sorted(k for k in keys if k not in seen or not seen[k].ended)
            return live, bool(keys)

    def untrack(self, name: str) -> None:
        with self._cond:
            left = self._names.get(name, 0) - 1
            if left > 0:
                self._names[name] = left
                return
            self._names.pop(name, None)
            self._clusters.pop(name, None)
            self._submitted.pop(name, None)
            for key in [k for k, j in self._jobs.items() if j.name == name]:
                del self._jobs[key]

    def tracked(self) -> set[str]:
        with self._cond:
            return set(self._names)

    # ----------------------------------------------------------------- reading
    def jobs(self, name: str) -> list[JobState]:
        """The jobs of this name as last seen, oldest first (no SLURM call)."""
        with self._cond:
            return sorted((j for j in self._jobs.values() if j.name == name),
                          key=lambda j: int(j.job_id) if j.job_id.isdigit() else 0)

    def job(self, job_id: str, cluster: str = clusters.LOCAL) -> JobState | None:
        with self._cond:
            return self._jobs.get((cluster, job_id))

    def latest(self, job: JobState) -> JobState:
        """The board's newest answer about ``job`` (``job`` itself if it is no longer kept)."""
        return self.job(job.job_id, job.cluster) or job

    def all_jobs(self) -> list[JobState]:
        with self._cond:
            return list(self._jobs.values())

    def wait(self, done: Callable[[], bool], timeout: float, fresh: bool = False) -> bool:
        """Wait until ``done()`` (checked after every poll) is true, up to ``timeout`` s.

        ``fresh``: ask for a poll now (within ``low``; such a request spends no credit of the
        budget: they come once per cancel or failed task) and judge only answers given after
        this call (e.g. right after a cancel). Raises ControllerUnreachable when SLURM has not
        answered for the grace period; False on timeout.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            start = self._polls + (1 if fresh else 0)
            if fresh:
                self.poll_soon(exempt=True)
            while True:
                if self._error:
                    raise ControllerUnreachable(self._error)
                if self._polls >= start and done():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))

    def check(self) -> None:
        """Raise ControllerUnreachable once SLURM has not answered for the grace period."""
        with self._cond:
            if self._error:
                raise ControllerUnreachable(self._error)

    def notify(self) -> None:
        """Wake every waiter (e.g. a task finished): they re-check their condition."""
        with self._cond:
            self._cond.notify_all()

    def poll_soon(self, after: float = 0.0, exempt: bool = False) -> None:
        """Ask for a poll ``after`` seconds from now (never sooner than ``low`` after the last
        one; with the budget of early polls spent, at the steady ``high`` cadence unless
        ``exempt``). A request already waiting keeps its time: e.g. a cluster's close right after
        its workers were retired does not move the poll timed for their jobs' end back to now."""
        with self._cond:
            if self._due is None:
                self._due = time.monotonic() + min(after, self.high)
            self._exempt = self._exempt or exempt
            self._urgent.set()

    # ----------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                names = list(self._names)
                where = sorted({c for n in names for c in clusters.members(self._clusters.get(n))})
            if not names:
                with self._cond:
                    if not self._names:  # nothing to watch: the thread ends, track() restarts it
                        self._thread = None
                        return
                continue
            started = time.monotonic()
            with self._cond:  # this poll answers every request made so far but a timed later one
                if self._due is None or self._due <= started:
                    self._due, self._exempt = None, False
                    self._urgent.clear()
            changed = self._poll_once(names, where)
            if self._failing_since is not None:  # back off; requests do not shorten it
                time.sleep(min(5.0, max(self.low, (time.monotonic() - self._failing_since) / 4)))
                continue
            # one unchanged answer after a change ends the burst (back off to `high` at once); an
            # urgent request shortens the wait, but never below `low` between two polls
            self._urgent.wait(self.low if changed else self.high)
            with self._cond:  # (the next poll's start clears what it answers)
                due, exempt = self._due, self._exempt
                self._urgent.clear()
            at = max(started + self.low, time.monotonic() if due is None else due)
            # sooner than the steady cadence costs a credit; none left: wait for the cadence
            if at < started + self.high and not exempt and not self.budget.take():
                at = max(started + self.low, self._hold(started + self.high))
            if (left := at - time.monotonic()) > 0:
                time.sleep(left)

    def _hold(self, until: float) -> float:
        """Wait for the steady cadence's poll at ``until``; a fresh wait's request ends it
        sooner. Returns when the next poll is due."""
        while (left := until - time.monotonic()) > 0:
            if self._urgent.wait(left):
                with self._cond:
                    self._urgent.clear()
                    if self._exempt:
                        return time.monotonic()
        return until

    def _poll_once(self, names: list[str], where: Sequence[str] = (clusters.LOCAL,)) -> bool:
        """One query per cluster the tracked names' jobs may be on (one in the usual case)."""
        try:
            seen = [j for c in where for j in parse_jobs(self._query(names, c), names, c)]
        except Exception as exc:  # noqa: BLE001 - transient controller trouble is ridden out
            now = time.monotonic()
            with self._cond:
                if self._failing_since is None:
                    self._failing_since = now
                    log.warning("SLURM did not answer the job query (%s); retrying for up to %g s",
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                self.grace)
                if now - self._failing_since > self.grace and not self._error:
                    self._error = (
                        f"the SLURM controller did not answer for {self.grace:g} s "
                        f"(last error: {str(exc).strip()[:300]}). Check `sinfo` and the site's "
                        f"status page; raise {GRACE_ENV} to wait longer.")
                    self._cond.notify_all()
            return True
        with self._cond:
            if self._failing_since is not None:
                log.warning("SLURM answers again after %.0f s",
                            time.monotonic() - self._failing_since)
            self._failing_since, self._error = None, None
            tracked = set(self._names)
            changed = False
            for job in seen:
                if job.name in tracked and self._jobs.get(job.key) != job:
                    self._jobs[job.key] = job
                    changed = True
            listed = {j.key for j in seen}
            for key, job in list(self._jobs.items()):
                if not job.ended and key not in listed and job.cluster in where:  # ended long ago
                    self._jobs[key] = JobState(job.job_id, job.name, GONE, "left the queue",
                                               job.nodelist, job.time_limit, job.cluster)
                    changed = True
            self._polls += 1
            self._cond.notify_all()
        return changed


_board: JobBoard | None = None
_board_lock = threading.Lock()


def board() -> JobBoard:
    """This process's job board (made on first use)."""
    global _board
    with _board_lock:
        if _board is None:
            _board = JobBoard()
        return _board
