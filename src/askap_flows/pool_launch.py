"""One pooled step's launch: its ticket in the pool's ledger, then its ``srun`` on its worker.

A step whose nodes are free when it is called starts its ``srun`` (a Dask task on the pool's
worker, ``launch.mpi_step``) BEFORE its Prefect flow run is created, so that creating the flow run
(about eight API requests, the largest fixed cost of a warm step: docs/development.md) overlaps
the srun instead of coming before it. The program's lines wait in a ``LateLogger`` until the
step's flow run takes them over: none is lost, and all of them still go to the flow run's log.
A step that must wait for nodes keeps its place in the ledger's queue (its ticket is taken at the
call) and waits inside its flow run, visible in the UI as running, as before.

The flow run (pool_step.py) finds its launch by a key in ``pool.launches`` (flow parameters are
sent to the API: no Dask future in them). If the flow run never claims it (the API refused to
create the run, an interrupt), ``run_in_pool`` stops the srun and frees the nodes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from . import compat, launch, runners, slurm
from .mpi_run import LineCount, job_ended, stop_step
from .pool_command import step_spec
from .spec import MPISpec
from .step_id import StepIdCatcher

log = logging.getLogger("askap_flows")


class LateLogger:
    """A logger that holds the lines it is given until ``attach(logger)``, then passes them on,
    in order, and every later line straight through (called from Dask's event thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._to: Any = None
        self._held: list[tuple[str, str, tuple]] = []

    def info(self, msg: str, *args: Any) -> None:
        self._log("info", msg, args)

    def warning(self, msg: str, *args: Any) -> None:
        self._log("warning", msg, args)

    def _log(self, level: str, msg: str, args: tuple) -> None:
        with self._lock:
            if self._to is None:
                self._held.append((level, msg, args))
                return
            to = self._to
        getattr(to, level)(msg, *args)

    def attach(self, logger) -> None:
        with self._lock:  # held while the backlog goes out: a line arriving now waits its turn
            for level, msg, args in self._held:
                getattr(logger, level)(msg, *args)
            self._held, self._to = [], logger


class Launch:
    """A step of the pool: its ticket, its nodes once it has them, its Dask task once started."""

    def __init__(self, pool, spec: MPISpec, program: str, check_ranks: bool) -> None:
        self.pool, self.spec, self.program, self.check_ranks = pool, spec, program, check_ranks
        self.key = uuid.uuid4().hex
        self.topic = f"askap-mpi-{self.key}"
        self.log, self.relayed, self.catcher = LateLogger(), LineCount(), StepIdCatcher()
        self.nodes: list[str] | None = None
        self.future: Any = None
        self.called = self.started = time.time()  # the call; the srun's submit (MPIRunResult)
        self.claimed = False
        self.ticket, nodes = pool.request(spec)
        if nodes is not None:
            self.start(nodes)

    def start(self, nodes: list[str]) -> None:
        """Run the step's srun on these nodes (a Dask task on the pool's worker)."""
        self.nodes, self.started = nodes, time.time()
        client = self.pool.client
        client.subscribe_topic(self.topic, self.catcher.wrap(
            self.relayed.relay_to(self.log), self.log, self.relayed.add))
        self.future = client.submit(launch.mpi_step, step_spec(self.spec, nodes, self.pool.prolog),
                                    self.program, self.check_ranks, self.topic, pure=False)
        self.future.add_done_callback(self._ended)

    def _ended(self, future) -> None:
        """The srun ended well: its nodes go to the next step at once, not once its flow run has
        caught up (creating 8 flow runs at once takes seconds on 2 cores). A failed one keeps
        them until its flow run has asked SLURM whether a node died (pool_step.run_step)."""
        if future.status == "finished":
            self.pool.release(self.ticket)

    def stop(self) -> None:
        """Give up on the step: a srun still running is killed (mpi_run.stop_step)."""
        if self.future is not None and not self.future.done():
            stop_step(self.pool.client, self.future, self.topic, self.relayed,
                      job_ended(self.pool.handle))

    def close(self) -> None:
        if self.future is not None:
            try:
                self.pool.client.unsubscribe_topic(self.topic)
            except Exception:  # noqa: BLE001 - the pool's client may be closing
                pass


def claim(pool, key: str) -> Launch:
    """The flow run takes over its launch (from then on it stops the step and frees the nodes)."""
    step = pool.launches[key]
    step.claimed = True
    return step


def run_in_pool(pool, spec: MPISpec, program: str, check_ranks: bool, label: str, retries: int):
    """The step's sub-flow (pool_step.py), launched before its flow run when nodes are free;
    ``retries`` more attempts after a JobLost, each on the pool's nodes as they are then."""
    from .pool_step import pool_step

    attempt = 0
    while True:
        run_name = f"{label}-retry{attempt}" if attempt else label
        step = Launch(pool, spec, program, check_ranks)
        pool.launches[step.key] = step
        try:  # (no with_options per step: a new Flow builds its parameter schema again)
            with compat.without_flow_heartbeat():  # its join: 0.5 s per step (compat.py)
                return pool_step(spec=spec, program=program, check_ranks=check_ranks,
                                 pool_name=pool.job_name, name=run_name, launch_key=step.key)
        except slurm.JobLost as exc:
            if attempt >= retries or not exc.retryable or runners.shutting_down.is_set():
                raise
            attempt += 1
            log.warning("step %s lost node(s) %s; retry %d of %d on the pool's nodes %s",
                             run_name, ",".join(exc.failed_nodes) or "?", attempt, retries,
                             ",".join(pool.nodes))
        finally:
            pool.launches.pop(step.key, None)
            if not step.claimed:  # the flow run never started: nothing else stops it
                try:
                    step.stop()
                finally:
                    step.close()
                    pool.release(step.ticket)
