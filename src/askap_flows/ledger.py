"""The node ledger of an allocation pool: which step holds which CPUs of which node (pure).

A step asks for ``nodes`` nodes with ``cpus`` free CPUs on each. Asks are served strictly first
in, first out: a later ask never starts before an earlier one that is still waiting, so no step
waits forever behind a stream of smaller ones. Placement is best fit: a step goes to the nodes
with the fewest free CPUs that still hold it, so small steps share nodes and whole nodes stay free
for wide steps; a multi-node step goes to the emptiest nodes instead when that leaves room for
more steps of its size (``place``). A node that died is dropped; the steps on it are reported to
the caller.

No threads, no I/O, no clock: the pool (pool.py) wraps it with a lock and a condition.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import AskapFlowsError


class LedgerError(AskapFlowsError, ValueError):
    """An ask that can never be served by the pool's nodes; the message gives both sizes."""


@dataclass(frozen=True)
class Ask:
    ticket: int
    nodes: int
    cpus: int  # per node


class NodeLedger:
    def __init__(self, nodes: Sequence[str], cpus_per_node: int) -> None:
        if not nodes or cpus_per_node < 1:
            raise LedgerError("a pool needs at least one node with at least one CPU")
        self.cpus_per_node = cpus_per_node
        self.order = list(nodes)  # tie-break for placement: the allocation's node order
        self.free: dict[str, int] = {n: cpus_per_node for n in nodes}
        self.queue: deque[Ask] = deque()
        self.running: dict[int, dict[str, int]] = {}  # ticket -> {node: cpus held}
        self._next = 0

    @property
    def nodes(self) -> list[str]:
        return [n for n in self.order if n in self.free]

    def why_never(self, nodes: int, cpus: int) -> str | None:
        """Why an ask of ``nodes`` x ``cpus`` can never run on this pool, or None if it can."""
        have = len(self.free)
        if nodes <= have and cpus <= self.cpus_per_node:
            return None
        return (f"the step needs {nodes} node(s) with {cpus} CPU(s) each, but the pool has "
                f"{have} node(s) with {self.cpus_per_node} CPU(s) each")

    def request(self, nodes: int, cpus: int) -> int:
        """Queue an ask; its ticket. LedgerError at once when it can never fit."""
        why = self.why_never(nodes, cpus)
        if why:
            raise LedgerError(why)
        self._next += 1
        self.queue.append(Ask(self._next, nodes, cpus))
        return self._next

    def assign(self) -> dict[int, list[str]]:
        """Start the asks at the head of the queue that fit now, in order; stop at the first that
        does not (no overtaking). Returns ticket -> the nodes it was given."""
        started: dict[int, list[str]] = {}
        while self.queue:
            ask = self.queue[0]
            chosen = self.place(ask.nodes, ask.cpus)
            if chosen is None:
                break
            self.queue.popleft()
            for n in chosen:
                self.free[n] -= ask.cpus
            self.running[ask.ticket] = {n: ask.cpus for n in chosen}
            started[ask.ticket] = chosen
        return started

    def place(self, nodes: int, cpus: int) -> list[str] | None:
        """Where an ask goes now (None: not now). Best fit: the ``nodes`` nodes with the fewest
        free CPUs >= ``cpus``. A multi-node ask goes to the nodes with the MOST free CPUs instead
        when that leaves room for more asks of its own size (``copies``): best fit put two
        2-node steps on the same two nodes of three and left the third's CPUs idle."""
        fits = [n for n in self.order if self.free.get(n, -1) >= cpus]
        if len(fits) < nodes:
            return None
        best = sorted(fits, key=lambda n: (self.free[n], self.order.index(n)))[:nodes]
        if nodes > 1:
            most = sorted(fits, key=lambda n: (-self.free[n], self.order.index(n)))[:nodes]
            if self._copies_after(most, nodes, cpus) > self._copies_after(best, nodes, cpus):
                best = most
        return sorted(best, key=self.order.index)

    def _copies_after(self, chosen: list[str], nodes: int, cpus: int) -> int:
        left = {n: f - (cpus if n in chosen else 0) for n, f in self.free.items()}
        return copies(left.values(), nodes, cpus)

    def release(self, ticket: int) -> None:
        """A step ended (or was given up while waiting): its CPUs are free again."""
        for n, c in self.running.pop(ticket, {}).items():
            if n in self.free:
                self.free[n] += c
        self.queue = deque(a for a in self.queue if a.ticket != ticket)

    def drop(self, node: str) -> tuple[list[int], list[int]]:
        """A node died: forget it. Returns (tickets running on it, queued tickets that can now
        never fit); the caller fails both and releases them."""
        self.free.pop(node, None)
        on_it = [t for t, held in self.running.items() if node in held]
        never = [a.ticket for a in self.queue if self.why_never(a.nodes, a.cpus)]
        return on_it, never

    def waiting(self, ticket: int) -> int:
        """How many asks are ahead of this one in the queue (-1: not queued)."""
        for i, a in enumerate(self.queue):
            if a.ticket == ticket:
                return i
        return -1


def copies(free, nodes: int, cpus: int) -> int:
    """How many asks of ``nodes`` x ``cpus`` fit at once on nodes with these free CPUs: the largest
    m with sum(min(slots_i, m)) >= m * nodes (each ask uses a node at most once)."""
    slots = [f // cpus for f in free if f >= cpus]
    m = 0
    while sum(min(s, m + 1) for s in slots) >= (m + 1) * nodes:
        m += 1
    return m
