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

The lock directory (``$TMPDIR/askap_flows-ports-<uid>``) must be this user's own with mode 0700:
one that another user created or can write to is refused, and so is a filesystem without
``flock``; each error says to set TMPDIR elsewhere or ``ASKAP_FLOWS_PORTS=0``.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import stat
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

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


FIX = (f"set TMPDIR to a private directory on a local filesystem, or {PORTS_ENV}=0 to let the OS "
       "choose every port")


def private_dir(path: Path) -> Path:
    """``path`` as a directory owned by this user with mode 0700 (created so if missing).

    An existing one owned by another user, or open to others, is refused: whoever can write
    there could hold (or remove) the lock files and hand this user's ports to someone else.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise PortError(f"cannot create the port lock directory {path} ({exc.strerror}): "
                        f"{FIX}.") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PortError(f"the port lock directory {path} is not a directory (a symbolic link or a "
                        f"file is there): remove it, or {FIX}.")
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise PortError(
            f"the port lock directory {path} is owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):04o}; it must be yours (uid {os.getuid()}) with mode 0700, "
            "or another user could hold or remove its locks. If it is yours: chmod 700 "
            f"{path}; otherwise {FIX}.")
    return path


class PortAllocator:
    def __init__(self, low: int, high: int, lock_dir: Path | None = None) -> None:
        self.low, self.high = low, high
        self.lock_dir = private_dir(
            Path(lock_dir or Path(tempfile.gettempdir()) / f"askap_flows-ports-{os.getuid()}"))
        self._mutex = threading.Lock()
        self._given: set[int] = set()
        self._cursor = random.randint(low, high)  # processes start at different places

    def reserve(self, count: int, host: str) -> Reservation:
        ports: list[int] = []
        handles: list[int] = []
        with self._mutex:
            try:
                self._take(count, host, ports, handles)
            except PortError:  # lock files unusable: give back what was taken
                Reservation(ports, handles).release()
                raise
            if len(ports) < count:
                Reservation(ports, handles).release()
                raise PortError(
                    f"no {count} free port(s) left in {self.low}-{self.high} on {host}: too many "
                    f"sub-flows or other programs hold them. Widen the range with "
                    f"{PORTS_ENV}=LOW-HIGH "
                    f"or set {PORTS_ENV}=0 to let the OS choose."
                )
            self._given.update(ports)
        return Reservation(ports, handles)

    def _take(self, count: int, host: str, ports: list[int], handles: list[int]) -> None:
        """Lock up to ``count`` bindable ports into ``ports``/``handles``.

        The caller holds the mutex."""
        for _round in range(2):  # second round: reuse ports this process gave out earlier
            for _ in range(self.high - self.low + 1):
                if len(ports) == count:
                    return
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

    def _lock(self, port: int) -> int | None:
        """The descriptor holding ``port``'s lock, or None when another holder has it."""
        path = self.lock_dir / f"{port}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise PortError(f"cannot open the port lock file {path} ({exc.strerror}): "
                            f"{FIX}.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:  # e.g. ENOLCK: a filesystem without flock (some NFS mounts)
            os.close(fd)
            raise PortError(f"cannot lock {path}: the filesystem of {self.lock_dir} does not "
                            f"support flock ({exc.strerror}): {FIX}.") from None
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
