"""What overhead.py and its parts (``_pool_bench``, ``_dask_floor``) share: a batch of sub-flows
timed inside one parent flow, and waiting for SLURM jobs to leave the queue.

Imported after ``_bench`` (which puts src/ on sys.path). Prefect is imported inside the
functions: the benchmark's server must be chosen first.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import time

import _bench


def error_line(exc: BaseException) -> str:
    """An error in one line for the JSON: its type and its first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def batch_flow(name: str, call, around=contextlib.nullcontext):
    """A parent flow that enters ``around()`` and runs ``call(held, i)`` for i < count at once
    through ``run_subflows`` (``held``: what ``around()`` gave, e.g. an allocation pool opened
    inside the flow run), and the dict its calls' latencies are written to: (parent, latencies)."""
    from prefect import flow

    from askap_flows.composition import run_subflows

    latencies: dict[int, float] = {}

    def timed(held, i: int):
        t = time.monotonic()
        try:
            return call(held, i)
        finally:
            latencies[i] = time.monotonic() - t

    @flow(name=name, validate_parameters=False)
    def parent(count: int):
        with around() as held:
            return run_subflows([functools.partial(timed, held, i) for i in range(count)],
                                max_concurrent=count)

    return parent, latencies


def timed_batch(parent, n: int, latencies: dict, ntasks: int | None) -> dict:
    """Run ``parent(n)`` (a flow of n MPI sub-flows of ``ntasks`` ranks; None: not MPI runs);
    its wall time, the machine's busy (and stolen) CPU seconds meanwhile, failures (an error, or a
    world of the wrong size), the calls' latencies and
    the outcomes."""
    started, cpu = time.monotonic(), _bench.cpu_mark()
    outcomes = parent(n)
    wall, cpu_used = time.monotonic() - started, _bench.cpu_used(cpu)
    errors = [error_line(o.error) for o in outcomes if not o.ok]
    bad_ranks = [o.index for o in outcomes
                 if ntasks is not None and o.ok and len(o.value.ranks) != ntasks]
    return {"n": n, "wall_seconds": round(wall, 3), **cpu_used,
            "failures": len(errors) + len(bad_ranks),
            "errors": errors[:3], "latencies": sorted(round(v, 3) for v in latencies.values()),
            "outcomes": outcomes}


def wait_jobs_gone(job_ids: list[str], timeout: float) -> dict[str, float]:
    """Poll ``squeue`` every 0.1 s until SLURM lists none of these jobs as not yet ended
    (``jobstate.ACTIVE_STATES``); when each was first seen gone (``time.monotonic()``). A failed
    ``squeue`` is asked again, not taken for the jobs' end. RuntimeError after ``timeout`` s."""
    from askap_flows.jobstate import ACTIVE_STATES

    ended: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(job_ids):
        res = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"],
                             capture_output=True, text=True)
        now = time.monotonic()
        if res.returncode == 0:
            active = {f[0] for f in map(str.split, res.stdout.splitlines())
                      if len(f) == 2 and f[1] in ACTIVE_STATES}
            for job_id in job_ids:
                if job_id not in active:
                    ended.setdefault(job_id, now)
        if len(ended) < len(job_ids):
            if now > deadline:
                raise RuntimeError(f"jobs {','.join(job_ids)} did not end within {timeout:g} s")
            time.sleep(0.1)
    return ended
