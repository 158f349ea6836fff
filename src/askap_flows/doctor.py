"""``askap-flows doctor``: check, in seconds, what a run needs, and say how to fix what is not.

Each check is a pure function from what was observed (a command's output, a path, a set of
interface names) to a row of the table (:mod:`askap_flows.doctor_checks`, ``doctor_mpi``; the rows,
their statuses and the table: ``doctor_report``). ``run_checks`` here gathers the observations
(subprocesses only through :mod:`askap_flows.shell`) and calls them.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import database, host, mpi, ports, shell
from .doctor_checks import (
    account_check,
    cluster_check,
    interface_check,
    partition_check,
    pool_check,
    ports_check,
    reservation_check,
    sinfo_check,
)
from .doctor_mpi import (
    linked_flavour,
    mpi_flavour,
    mpi_library_check,
    mpi_plugin_check,
    mpicc_check,
    wrapper_flavour,
)
from .doctor_report import FAIL, OK, SKIP, WARN, Check
from .spec import AllocationSpec, MPISpec, SpecError


# --------------------------------------------------------------------------- observations
def local_interfaces() -> dict[str, str | None]:
    """{name: IPv4 address or None} of this host's network interfaces: the lookup behind
    host.interface_address, which a run uses for the scheduler's address."""
    return host.interfaces()


def _run(argv: list[str], timeout: float = 15) -> shell.Completed | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        return shell.run(argv, check=False, timeout=timeout)
    except shell.CommandError:  # timed out: treated like a command that could not run
        return None


def _server_settings(api_url: str) -> Mapping[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/admin/settings", timeout=10) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def slurm_checks(alloc: AllocationSpec, spec: MPISpec) -> list[Check]:
    cluster = ["-M", alloc.clusters] if alloc.clusters else []
    if shutil.which("sinfo") is None:
        res = None
        rows = [sinfo_check(None, "sinfo is not on PATH")]
    else:
        res = _run(["sinfo", *cluster, "-h", "-o", "%P|%a|%D"], timeout=20)
        rows = [sinfo_check(res, "sinfo timed out after 20 s: the controller does not answer")]
        if alloc.clusters and rows[0].status == FAIL:  # the profile's clusters: may be the cause
            rows = [cluster_check(alloc.clusters, res, _run(["sinfo", "-h", "-o", "%P"]), _run(
                ["sacctmgr", "-n", "-P", "list", "clusters", "format=Cluster"]))]
    if rows[0].status == FAIL:
        why = (f"SLURM does not answer for clusters: {alloc.clusters}" if alloc.clusters
               else "SLURM does not answer")
        return rows + [Check(n, SKIP, why)
                       for n in ("partition", "account", "reservation", "MPI plugin")]
    assert res is not None  # rows[0] is OK: sinfo answered
    rows.append(partition_check(alloc.partition, alloc.nodes, res.stdout))
    rows.append(account_check(alloc.account, _run(
        ["sacctmgr", "-n", "-P", "show", "account", alloc.account, "format=Account"])
        if alloc.account else None))
    rows.append(reservation_check(alloc.reservation, _run(
        ["scontrol", *cluster, "-o", "show", "reservation", alloc.reservation])
        if alloc.reservation else None))
    listed = _run(["srun", "--mpi=list"])
    flavour, source = program_flavour(spec)
    mpi_list = None if listed is None or listed.returncode != 0 else listed.stdout + listed.stderr
    rows.append(mpi_library_check(flavour, source))
    rows.append(mpi_plugin_check(spec, mpi_list, flavour))
    return rows


def program_flavour(spec: MPISpec) -> tuple[str | None, str]:
    """The MPI family of the program a run would start, and how that was found: ``ldd`` of the
    program; for a hello program not built yet, the compiler wrapper that would build it; else
    the ``mpiexec`` on PATH."""
    if spec.wrapper:
        return None, "the program runs inside a wrapper (container) with its own MPI"
    prog = spec.program or str(mpi.default_program(spec.mpicc))
    path = prog if os.sep in prog else shutil.which(prog)
    if path and Path(path).is_file():
        res = _run(["ldd", path])
        flavour, lib = linked_flavour(res.stdout if res else "")
        if flavour:
            return flavour, f"{path} is linked against {lib}"
    if spec.program is None:
        cc = shutil.which(spec.mpicc) if spec.mpicc else mpi.find_mpicc()
        res = _run([cc, "-show"]) if cc else None
        flavour = wrapper_flavour(res.stdout) if res and res.returncode == 0 else None
        if flavour:
            return flavour, f"{path} is not built yet; {cc} builds it"
    mpiexec = mpi.find_mpiexec()
    version = _run([mpiexec, "--version"]) if mpiexec else None
    flavour = mpi_flavour(f"{version.stdout}\n{version.stderr}") if version else None
    if flavour:
        return flavour, f"not told by the program {prog}; the mpiexec on PATH is {mpiexec}"
    return None, f"cannot tell which MPI {prog} uses (ldd shows no MPI library)"


def prefect_checks(max_concurrent: int, api_url: str | None) -> list[Check]:
    warnings: list[str] = []
    try:
        plan = database.preflight(max_concurrent, api_url=api_url, say=warnings.append)
    except (database.DatabaseError, SpecError) as exc:
        text = str(exc)
        fix = text.split("Fix:", 1)[1].strip() if "Fix:" in text else "see the detail"
        return [Check("Prefect API/database", FAIL, text.split(" Fix:")[0], fix),
                Check("database pool", SKIP, "the database does not answer")]
    if api_url:
        row = Check("Prefect API/database", OK, f"server at {api_url} and its database answer")
    else:
        row = Check("Prefect API/database", OK, f"no PREFECT_API_URL: a run starts its own "
                    f"server on {plan.describe()} (reachable)")
    rows = [row]
    if warnings:
        rows.append(Check("legacy settings", WARN, "PREFECT_ORION_* variables are set and "
                          "ignored by Prefect", "rename them (the run prints the new names)"))
    rows.append(pool_check(max_concurrent, _server_settings(api_url) if api_url else None,
                           None if api_url else plan))
    return rows


def run_checks(profile: str | None, backend: str, max_concurrent: int,
               specs: Callable[[], tuple[AllocationSpec, MPISpec]]) -> list[Check]:
    """Every check for a run with this profile/backend/concurrency, in table order."""
    try:
        alloc, spec = specs()
    except (SpecError, ValueError) as exc:
        return [Check("profile", FAIL, str(exc).split(". ")[0], str(exc))]
    rows = [Check("profile", OK, f"{profile or 'default'} ({backend} backend): {spec.ntasks} "
                  f"ranks on {spec.nodes} node(s), launcher {spec.launcher}")]
    if backend == "slurm":
        rows += slurm_checks(alloc, spec)
    else:
        rows += [Check(n, SKIP, "local backend: no SLURM")
                 for n in ("SLURM reachable", "partition", "account", "reservation", "MPI plugin")]
    cc = (shutil.which(spec.mpicc) or None) if spec.mpicc else mpi.find_mpicc()
    rows.append(mpicc_check(cc, mpi.find_mpiexec(), mpi.default_program(spec.mpicc),
                            _source(), needs_mpiexec=backend == "local", wanted=spec.mpicc))
    rows += prefect_checks(max_concurrent, os.environ.get("PREFECT_API_URL") or None)
    here = local_interfaces()
    sched = interface_check("scheduler", alloc.scheduler_interface, here, must_be_here=True)
    rows.append(sched)
    rows.append(interface_check("worker", alloc.interface, here,
                                must_be_here=backend == "local"))
    host = "127.0.0.1"
    if sched.status == OK and alloc.scheduler_interface:
        host = here[alloc.scheduler_interface] or host
    wanted = max_concurrent * (2 if backend == "slurm" else 1)
    try:
        rng = ports.port_range()
    except ports.PortError as exc:
        rows.append(Check("ports", FAIL, str(exc).split(":")[0], str(exc)))
        return rows
    try:
        with ports.reserve(wanted, host) as held:
            rows.append(ports_check(rng, held.ports, wanted, host))
    except ports.PortError as exc:
        rows.append(ports_check(rng, None, wanted, host, error=str(exc).split(":")[0]))
    return rows


def _source() -> Path | None:
    try:
        return mpi.hello_source()
    except FileNotFoundError:
        return None
