"""Progress of the main job: a live line on a terminal, plain lines otherwise.

On a terminal the bottom line is redrawn in place (carriage return) about once a second:
``[  12s] 3 queued, 2 running, 4 done, 1 failed | SLURM jobs 123, 124``, and with an allocation
pool ``| pool job 5: 2 running, 1 waiting, 4 done, 0 failed`` (its steps). Each sub-flow that
ends also leaves a permanent line above it. When the output is not a terminal (a batch job's log,
a pipe) only the plain lines are written, one per event, so logs stay readable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TextIO

CLEAR = "\r\x1b[K"  # back to column 0, clear to the end of the line


def status_line(elapsed: float, queued: int, running: int, done: int, failed: int,
                job_ids: Iterable[str] = (), pool: str | None = None) -> str:
    """The live line (pure). ``pool``: the pool's own counts (pool_record.progress_text)."""
    line = f"[{elapsed:5.0f}s] {queued} queued, {running} running, {done} done, {failed} failed"
    ids = sorted(job_ids, key=lambda j: (len(j), j))
    if ids:
        line += " | SLURM job" + ("s " if len(ids) > 1 else " ") + ", ".join(ids)
    return f"{line} | {pool}" if pool else line


class Progress:
    """Counts sub-flows as they start and end, and shows them on ``stream``.

    ``job_ids()``: the SLURM job ids of the sub-flows running now (polled every ``poll`` seconds
    on a terminal, from a background thread; never called when the stream is not a terminal).
    ``pool``: set to a callable giving an allocation pool's counts while one is open.
    """

    def __init__(self, total: int, stream: TextIO, tty: bool | None = None,
                 job_ids: Callable[[], list[str]] | None = None, interval: float = 1.0,
                 poll: float = 1.0) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._job_ids = job_ids
        self._ids: list[str] = []
        self._started: set[int] = set()
        self._ended: set[int] = set()
        self.failed = 0
        self._lock = threading.RLock()  # a signal handler may print while we hold it
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self.interval = interval
        self.poll = poll
        self._thread: threading.Thread | None = None
        self.pool: Callable[[], str] | None = None

    # ----------------------------------------------------------------- events
    def started(self, index: int, name: str) -> None:
        with self._lock:
            self._started.add(index)
            if not self.tty:
                self._write(f"{name} started ({self._counts_text()})\n")
            else:
                self._redraw()

    def ended(self, index: int, message: str, ok: bool) -> None:
        with self._lock:
            self._ended.add(index)
            self.failed += 0 if ok else 1
            n = len(self._ended)
            line = f"[{n}/{self.total}] {message}"
            if self.tty:
                self._write(f"{CLEAR}{line}\n")
                self._redraw()
            else:
                self._write(f"{line}\n")

    def say(self, message: str) -> None:
        """A permanent line (the live line, if any, is redrawn under it)."""
        with self._lock:
            self._write(f"{CLEAR if self.tty else ''}{message}\n")
            if self.tty:
                self._redraw()

    # ----------------------------------------------------------------- the live line
    def counts(self) -> tuple[int, int, int, int]:
        """(queued, running, done, failed)."""
        running = len(self._started - self._ended)
        ended = len(self._ended)
        return (self.total - len(self._started | self._ended), running, ended - self.failed,
                self.failed)

    def _counts_text(self) -> str:
        q, r, d, f = self.counts()
        return f"{q} queued, {r} running, {d} done, {f} failed"

    def _redraw(self) -> None:
        pool = self.pool
        line = status_line(time.monotonic() - self._t0, *self.counts(), self._ids,
                           pool() if pool is not None else None)
        self._write(f"{CLEAR}{line}")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not fail the pipeline
            pass

    def _loop(self) -> None:
        last_poll = 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if self._job_ids is not None and now - last_poll >= self.poll:
                last_poll = now
                try:
                    ids = list(self._job_ids())
                except Exception:  # noqa: BLE001 - a failed squeue only leaves the ids stale
                    ids = self._ids
                self._ids = ids
            with self._lock:
                self._redraw()

    def __enter__(self) -> Progress:
        if self.tty:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="askap-progress")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.tty:
            with self._lock:
                self._write(CLEAR)  # the summary follows on a clean line
