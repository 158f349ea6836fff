"""Collision-free ports for the schedulers and dashboards of concurrent sub-flows.

A port is *reserved* by holding an exclusive ``flock`` on a per-port lock file in a per-user
directory on this host, for as long as the sub-flow runs. Concurrent sub-flows in one process and
askap_flows processes started side by side on the same login node therefore never get the same
port: the kernel's lock is the arbiter, so there is no check-then-reserve race between them. A
port some other program is listening on is skipped (a test bind). Within one process a port is not
handed out twice until the range has been used up, so every sub-flow of a run has its own.

The range comes from ``ASKAP_FLOWS_PORTS`` ("20000-31999" by default: below Linux's ephemeral range
and clear of the ports the hand-written pipelines used, 8787 and 32120+). ``ASKAP_FLOWS_PORTS=0``
lets the OS choose every port instead (unique while bound, but not recorded in advance).
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path

from .errors import AskapFlowsError

PORTS_ENV = "ASKAP_FLOWS_PORTS"
DEFAULT_RANGE = (20000, 31999)


class PortError(AskapFlowsError, RuntimeError):
    """No free port is left in the configured range, or the range is malformed."""


def port_range(text: str | None = None) -> tuple[int, int] | None:
    """The configured range as (low, high), or None for "let the OS choose"."""
    text = (os.environ.get(PORTS_ENV, "") if text is None else text).strip()
    if not text:
        return DEFAULT_RANGE
    if text == "0":
        return None
    try:
        low, high = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise PortError(f"{PORTS_ENV}={text!r} is not a range: use LOW-HIGH, e.g. 20000-31999, "
                        "or 0 to let the OS choose.") from None
    if not (1024 <= low <= high <= 65535):
        raise PortError(f"{PORTS_ENV}={text!r}: need 1024 <= LOW <= HIGH <= 65535.")
    return low, high


class Reservation:
    """Ports held for one sub-flow; ``release()`` (or leaving the ``with``) gives them back."""

    def __init__(self, ports: list[int], handles: list[int]) -> None:
        self.ports = ports
        self._handles = handles

    def release(self) -> None:
        for fd in self._handles:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._handles = []

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class PortAllocator:
    def __init__(self, low: int, high: int, lock_dir: Path | None = None) -> None:
        self.low, self.high = low, high
        self.lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / f"askap_flows-ports-{os.getuid()}")
        self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._mutex = threading.Lock()
        self._given: set[int] = set()
        self._cursor = random.randint(low, high)  # processes start at different places

    def reserve(self, count: int, host: str) -> Reservation:
        ports: list[int] = []
        handles: list[int] = []
        size = self.high - self.low + 1
        with self._mutex:
            for _round in range(2):  # second round: reuse ports this process gave out earlier
                for _ in range(size):
                    if len(ports) == count:
                        break
                    port = self._cursor
                    self._cursor = self.low if port >= self.high else port + 1
                    if _round == 0 and port in self._given or port in ports:
                        continue
                    fd = self._lock(port)
                    if fd is None:
                        continue
                    if not _bindable(host, port):
                        fcntl.flock(fd, fcntl.LOCK_UN)
                        os.close(fd)
                        continue
                    ports.append(port)
                    handles.append(fd)
                if len(ports) == count:
                    break
            if len(ports) < count:
                Reservation(ports, handles).release()
                raise PortError(
                    f"no {count} free port(s) left in {self.low}-{self.high} on {host}: too many "
                    f"sub-flows or other programs hold them. Widen the range with {PORTS_ENV}=LOW-HIGH "
                    f"or set {PORTS_ENV}=0 to let the OS choose."
                )
            self._given.update(ports)
        return Reservation(ports, handles)

    def _lock(self, port: int) -> int | None:
        fd = os.open(self.lock_dir / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_allocators: dict[tuple[int, int], PortAllocator] = {}
_alloc_mutex = threading.Lock()


def reserve(count: int, host: str) -> Reservation:
    """Reserve ``count`` ports on ``host`` (port 0s when the OS is to choose)."""
    rng = port_range()
    if rng is None:
        return Reservation([0] * count, [])
    with _alloc_mutex:
        allocator = _allocators.get(rng) or _allocators.setdefault(rng, PortAllocator(*rng))
    return allocator.reserve(count, host)
