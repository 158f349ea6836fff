"""Warm allocations (opt-in): ONE held multi-node SLURM job with one Dask worker, whose nodes many
MPI sub-flows share as ``srun --exact --nodelist ...`` job steps.

``with allocation(profile=..., nodes=N, walltime=...) as pool:`` submits the job (reserved ports,
tracked on the job board, ``--no-kill``, the worker exec'd: the hardening of a sub-flow's own
cluster) and waits for its worker. ``mpi_subflow(..., pool=pool)`` then asks the pool's node ledger
(ledger.py) for nodes, waits its turn there (first in, first out), and runs its step from a Dask
task on the pool's worker (``launch.mpi_step``), started before its flow run is created when the
nodes are free (pool_launch.py). Each step is its own Prefect flow run
(``mpi-pool-step``: pool_step.py); the pool is a markdown artifact on the flow run that opened it
(pool_record.py). srun's ``--prolog`` names each step's SLURM step id (step_id.py).
The job ends when the block ends (normally, on an exception, SIGINT or SIGTERM); after a SIGKILL
``askap-flows cleanup`` finds it by its name (``<prefix>-pool-<token>``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dask_jobqueue  # noqa: F401 - at module top, in the main thread (see runners.py)
import distributed

from . import (
    board,
    clusters,
    jobs,
    mpi,
    pool_job,
    ports,
    runners,
    slurm,
    slurm_query,
    step_id,
)
from .errors import AskapFlowsError
from .host import log_dir as job_log_dir
from .ledger import LedgerError, NodeLedger
from .pool_command import pool_cluster_kwargs, step_cpus
from .pool_record import PoolView, record_pool
from .resolve import resolve
from .spec import AllocationSpec, MPISpec, walltime_seconds

log = logging.getLogger("askap_flows")
_pools: dict[str, Pool] = {}  # job name -> open pool (flow parameters carry the name only)


def get(name: str) -> Pool | None:
    """The open pool of this job name (None once its block ended)."""
    return _pools.get(name)


class PoolError(AskapFlowsError, RuntimeError):
    """A step the pool refuses (too large, too long for the time left) or a pool that failed."""


# --------------------------------------------------------------------------- the pool
class Pool:
    """An open allocation: its job, its worker's client, its nodes' ledger, its deadline."""

    def __init__(self, alloc: AllocationSpec, profile, handle: jobs.RunHandle, client,
                 job_id: str, nodes: list[str], deadline: float, dashboard: str | None,
                 prolog=None) -> None:
        self.alloc, self.profile, self.handle, self.client = alloc, profile, handle, client
        self.job_id, self.deadline, self.dashboard = job_id, deadline, dashboard
        self.prolog = prolog  # the srun --prolog that names each step (step_id.py)
        self.ledger = NodeLedger(nodes, alloc.ntasks_per_node * alloc.cpus_per_task)
        self._cond = threading.Condition()
        self._failed: dict[int, str] = {}  # ticket -> why it can no longer run
        self._steps = 0
        self.launches: dict[str, Any] = {}  # key -> its pool_launch.Launch, while its call runs
        self.done = self.failed = 0  # steps (sub-flow runs) that ended

    def step_ended(self, ok: bool) -> None:
        with self._cond:
            self.done += ok
            self.failed += not ok

    def view(self, state: str = "open") -> PoolView:
        """What the UI's artifact and the progress line show (pool_record.py)."""
        with self._cond:
            return PoolView(self.job_id, self.job_name, tuple(self.ledger.nodes),
                            self.ledger.cpus_per_node, self.alloc.walltime, self.dashboard, state,
                            len(self.ledger.running), len(self.ledger.queue), self.done,
                            self.failed)

    @property
    def job_name(self) -> str:
        return self.handle.job_name or ""

    @property
    def nodes(self) -> list[str]:
        with self._cond:
            return self.ledger.nodes

    def time_left(self) -> float:
        return self.deadline - time.time()

    def __repr__(self) -> str:
        return f"<Pool job {self.job_id} ({self.job_name}) nodes {','.join(self.nodes)}>"

    def check_step(self, spec: MPISpec) -> None:
        """Refuse at once a step that can never run here, or not before the walltime."""
        with self._cond:
            why = self.ledger.why_never(spec.nodes, step_cpus(spec))
        if why:
            raise PoolError(
                f"{why} (SLURM job {self.job_id}, {self.job_name}): it can never run in this pool. "
                "Open the pool with more nodes or a larger ntasks_per_node, or ask for fewer "
                "nodes or ranks.")
        left = self.time_left()
        if spec.timeout is not None and spec.timeout > left:
            raise PoolError(
                f"the step may run for up to {spec.timeout:g} s (MPISpec.timeout) but the pool's "
                f"allocation (SLURM job {self.job_id}, walltime {self.alloc.walltime}) ends in "
                f"{max(left, 0):.0f} s: SLURM would kill it half-way. Give the step a shorter "
                "timeout, or open the pool with a longer walltime.")

    def request(self, spec: MPISpec) -> tuple[int, list[str] | None]:
        """Queue the step (first in, first out); (ticket, its nodes if it got them at once)."""
        with self._cond:
            try:
                ticket = self.ledger.request(spec.nodes, step_cpus(spec))
            except LedgerError as exc:
                raise PoolError(f"{exc}: it can never run in this pool.") from None
            self._assign()
            held = self.ledger.running.get(ticket)
            return ticket, (list(held) if held is not None else None)

    def wait(self, ticket: int, spec: MPISpec, logger) -> list[str]:
        """Wait for the ticket's nodes (its turn in the ledger's queue); its nodes."""
        with self._cond:
            said = False
            while True:
                self._assign()
                if ticket in self._failed:
                    raise PoolError(self._failed.pop(ticket))
                if ticket in self.ledger.running:
                    nodes = list(self.ledger.running[ticket])
                    break
                if runners.shutting_down.is_set() or self.job_name not in _pools:
                    self.ledger.release(ticket)
                    raise PoolError(f"the pool {self.job_name} closed while the step waited")
                if not said:
                    logger.info("waiting for %d node(s) x %d CPU(s) in pool %s (%d step(s) ahead)",
                                spec.nodes, step_cpus(spec), self.job_id,
                                self.ledger.waiting(ticket))
                    said = True
                self._cond.wait(1.0)
        try:
            self.check_step(spec)  # it may have waited past the point where it can finish
        except PoolError:
            self.release(ticket)
            raise
        return nodes

    def _assign(self) -> None:
        if self.ledger.assign():
            self._cond.notify_all()

    def release(self, ticket: int) -> None:
        with self._cond:
            self.ledger.release(ticket)
            self._assign()
            self._cond.notify_all()

    def drop(self, nodes: list[str]) -> None:
        """Nodes died: no step is placed on them again; queued steps that no longer fit fail."""
        with self._cond:
            for node in nodes:
                if node not in self.ledger.free:
                    continue
                _, never = self.ledger.drop(node)
                log.warning("pool %s: node %s failed and is no longer used", self.job_id, node)
                for t in never:
                    self.ledger.release(t)
                    self._failed[t] = (f"pool {self.job_id} lost node {node}; the step no longer "
                                       f"fits on its nodes {','.join(self.ledger.nodes)}")
            self._cond.notify_all()

    def run_mpi(self, mpi_spec: MPISpec | Mapping[str, Any] | None, program: str | None = None,
                name: str | None = None, retries: int = 0):
        """One MPI sub-flow in this pool (``mpi_subflow(..., pool=pool)`` calls this)."""
        from .pool_launch import run_in_pool

        spec = resolve(self.profile, allocation=self.alloc, mpi=mpi_spec, launcher="srun",
                       fit=False).mpi_spec()  # the pool's ledger checks the fit
        self.check_step(spec)
        prog, check_ranks = mpi.resolve_program(spec, program)
        with self._cond:
            self._steps += 1
            label = name or f"{self.job_name}-step{self._steps}"
        return run_in_pool(self, spec, prog, check_ranks, label, retries)


# --------------------------------------------------------------------------- the allocation
def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def allocation(profile: str | os.PathLike | None = None, nodes: int | None = None,
               walltime: str | None = None, backend: str = "slurm",
               **allocation_fields: Any) -> Iterator[Pool]:
    """Hold ONE multi-node SLURM job with one Dask worker for the MPI sub-flows of the block.

    Args:
        profile: packaged profile name or YAML path (its ``allocation`` section).
        nodes, walltime: the job's size and time limit (over the profile's).
        backend: only "slurm" (a local pool would hold nothing).
        allocation_fields: more AllocationSpec fields (e.g. ``ntasks_per_node=4``).

    Yields the Pool; pass it as ``mpi_subflow(..., pool=pool)``. The job is cancelled when the
    block ends, however it ends.
    """
    if backend != "slurm":
        raise PoolError(f"allocation(backend={backend!r}): a pool holds a SLURM job; use "
                        "backend='slurm', or call mpi_subflow without pool= for local runs.")
    over = {**allocation_fields, "nodes": nodes, "walltime": walltime}
    alloc = resolve(profile, backend=backend, allocation=over, step=False).allocation_spec()
    slurm_query.check_available(alloc.clusters)
    runners.import_dashboard()
    token = uuid.uuid4().hex[:10]
    job_name, log_dir = f"{alloc.job_name_prefix}-pool-{token}", job_log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    prolog = step_id.write_prolog(log_dir, job_name, step_id.site_srun_prolog(
        clusters.members(alloc.clusters)[0]))
    slurm_query.test_submit(slurm.render_job_script(
        pool_cluster_kwargs(alloc, f"{alloc.job_name_prefix}-pool-check", log_dir)))
    handle = jobs.RunHandle(token, job_name, str(log_dir), alloc.start_timeout, backend,
                            alloc.clusters)
    b = board.board()
    old = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        old = signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that `finally` runs
    cluster = client = None
    with ports.reserve(2, slurm.scheduler_host(alloc)) as held:
        b.track(job_name, alloc.clusters)
        try:
            submitted = time.time()
            job_cls = jobs.board_job_class(alloc.clusters)
            cluster = jobs.RetiringCluster(**pool_cluster_kwargs(alloc, job_name, log_dir,
                                                                 held.ports),
                                           job_cls=job_cls)  # type: ignore[arg-type]
            client = distributed.Client(cluster)
            pool_job.wait_for_worker(client, handle)
            # os.getenv: the worker imports nothing of askap_flows for it (this module is Prefect)
            env = {k: next(iter(client.run(os.getenv, k).values()))
                   for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST")}
            held_nodes = slurm_query.hostnames(env["SLURM_JOB_NODELIST"])
            dashboard = runners.dashboard_url(client)
            pool = Pool(alloc, profile, handle, client, env["SLURM_JOB_ID"], held_nodes,
                        submitted + walltime_seconds(alloc.walltime), dashboard, prolog)
            log.info("allocation pool: SLURM job %s (%s) on %s; Dask dashboard %s",
                     pool.job_id, job_name, ",".join(held_nodes), dashboard)
            _pools[job_name] = pool
            record_pool(pool.view("open"))
            yield pool
        finally:
            opened = _pools.pop(job_name, None)
            try:
                if cluster is not None:  # its worker leaves first: the job ends by itself
                    cluster.retire()
                for closing in (client, cluster):
                    try:
                        if closing is not None:
                            closing.close()
                    except Exception:  # noqa: BLE001 - the cancel below ends the job anyway
                        pass
                jobs.cancel_named(job_name, clusters_=alloc.clusters)
            finally:
                b.untrack(job_name)
                step_id.remove(prolog)
                if old is not None:
                    signal.signal(signal.SIGTERM, old)
            if opened is not None and not runners.shutting_down.is_set():
                record_pool(opened.view("closed"))  # after the cancel: the API may be slow
