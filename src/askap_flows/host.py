"""This host: the IPv4 address of a network interface, and askap_flows' home and log directories.

A run (the scheduler's address) and ``askap-flows doctor`` (its interface rows) ask the same
function, :func:`interface_address`, so that what doctor reports is what a run will do.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .errors import AskapFlowsError

HOME_ENV = "ASKAP_FLOWS_HOME"


class InterfaceError(AskapFlowsError, ValueError):
    """A network interface is missing on this host or has no IPv4 address."""


def interfaces() -> dict[str, str | None]:
    """{name: first IPv4 address or None} of this host's network interfaces."""
    import psutil  # a dependency of distributed; the same source Dask uses for ``interface=``

    found: dict[str, str | None] = {name: None for _, name in socket.if_nameindex()}
    for name, addrs in psutil.net_if_addrs().items():
        ipv4 = [a.address for a in addrs if a.family == socket.AF_INET]
        found[name] = ipv4[0] if ipv4 else found.get(name)
    return found


def interface_address(interface: str, fix: str = "") -> str:
    """The IPv4 address of ``interface`` on this host; InterfaceError names what exists here.

    ``fix`` is the caller's advice (which setting to change), appended to the message.
    """
    here = interfaces()
    names = ", ".join(sorted(here)) or "(none)"
    if here.get(interface):
        return here[interface]  # type: ignore[return-value]
    why = "has no IPv4 address" if interface in here else "does not exist"
    raise InterfaceError(f"network interface {interface!r} {why} on this host (interfaces here: "
                         f"{names}).{' ' + fix if fix else ''}")


def askap_home() -> Path:
    """Where askap_flows keeps its working files: $ASKAP_FLOWS_HOME or ./.askap_flows."""
    return Path(os.environ.get(HOME_ENV) or Path.cwd() / ".askap_flows").absolute()


def log_dir() -> Path:
    """Where the SLURM jobs' output files go: ``<home>/logs``."""
    return askap_home() / "logs"
