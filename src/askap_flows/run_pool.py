"""``python -m askap_flows.run --pool NODES``: the main job's sub-flows as steps of one pool.

The pool (pool.py) is opened inside the pipeline's flow run, so its artifact is on that run; its
counts join the progress line while it is open, and a line says when it opened and closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .progress import Progress
from .spec import AllocationSpec, MPISpec, SpecError


def check(nodes: int | None, backend: str, spec: MPISpec) -> None:
    """--pool NODES: a SLURM pool at least as wide as one sub-flow's step (SpecError if not)."""
    if nodes is None:
        return
    if backend != "slurm":
        raise SpecError(f"--pool holds a SLURM job, but the backend is {backend}: add "
                        "--backend slurm, or drop --pool.")
    if nodes < spec.nodes:
        raise SpecError(f"--pool {nodes} is narrower than one sub-flow ({spec.nodes} node(s)): "
                        f"give --pool at least {spec.nodes}, or fewer --nodes.")


@contextmanager
def pool(nodes: int | None, profile, alloc: AllocationSpec, progress: Progress) -> Iterator:
    """The run's allocation pool of ``nodes`` nodes (None: no pool, each sub-flow its own job)."""
    if nodes is None:
        yield None
        return
    from .pool import allocation
    from .pool_record import progress_text

    with allocation(profile, nodes=nodes, ntasks_per_node=alloc.ntasks_per_node) as held:
        progress.say(f"pool: SLURM job {held.job_id} ({held.job_name}) on {','.join(held.nodes)}; "
                     f"Dask dashboard {held.dashboard or '-'}")
        progress.pool = lambda: progress_text(held.view())
        try:
            yield held
        finally:
            progress.pool = None
            progress.say(progress_text(held.view("closed")))
