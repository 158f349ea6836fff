"""Composition: ``run_subflows`` runs sub-flow calls concurrently, at most ``max_concurrent`` at
once, and returns one :class:`Outcome` per call, in order."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import compat, runners
from .spec import whole_number


@dataclass
class Outcome:
    """The result of one sub-flow call in ``run_subflows``: a value, or the error it raised."""

    index: int
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_subflows(
    calls: Sequence[Callable[[], Any]],
    max_concurrent: int = 4,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run sub-flow calls concurrently, at most ``max_concurrent`` at once; results in order.

    A failing call does not stop the others: its Outcome carries the exception. Called inside a
    flow, each call becomes a sub-flow run of it (the flow context is copied into each thread).
    ``on_done(outcome)`` is called as each one finishes (for progress output).
    """
    whole_number("max_concurrent", max_concurrent)
    calls = list(calls)
    for i, c in enumerate(calls):
        if not callable(c):
            raise TypeError(
                f"calls[{i}] is {type(c).__name__}, not a callable (use functools.partial).")
    limit = compat.MAX_CONCURRENT_SUBFLOWS
    if limit is not None and max_concurrent > limit and len(calls) > limit:
        logging.getLogger("askap_flows").warning(
            "running at most %d of the %d sub-flows at once, not %d: Prefect %s runs every flow "
            "run on one event-loop thread and stalled with 140 at once (benchmarks/README.md). "
            "Prefect 3 has no such limit.",
            limit, len(calls), max_concurrent, compat.PREFECT_VERSION)
        max_concurrent = limit

    def one(i: int, call: Callable[[], Any], ctx: contextvars.Context) -> Outcome:
        if runners.shutting_down.is_set():
            return Outcome(i, error=RuntimeError("not started: the pipeline is shutting down"))
        try:
            outcome = Outcome(i, value=ctx.run(call))
        except Exception as exc:  # noqa: BLE001 - reported per sub-flow
            outcome = Outcome(i, error=exc)
        if on_done is not None:
            on_done(outcome)
        return outcome

    if not calls:
        return []
    runners.begin_composition()  # an earlier composition's interrupt is over, not a new one
    pool = ThreadPoolExecutor(max_workers=min(max_concurrent, len(calls)),
                              thread_name_prefix="askap-subflow")
    futures = [pool.submit(one, i, c, contextvars.copy_context()) for i, c in enumerate(calls)]
    try:
        results = [f.result() for f in futures]
    except BaseException:  # Ctrl-C, SIGTERM, SystemExit: cancel every job, leave nothing running
        runners.cancel_everything()
        # no waiting here: under Prefect 2 the running sub-flows wait for this thread's flow
        # engine, so joining them would deadlock; with their jobs cancelled they end by themselves
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        runners.end_composition()
    pool.shutdown(wait=True)
    return results
