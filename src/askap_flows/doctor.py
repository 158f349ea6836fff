"""``askap-flows doctor``: check, in seconds, what a run needs, and say how to fix what is not.

Each check is a pure function from what was observed (a command's output, a path, a set of
interface names) to a :class:`Check` row; ``run_checks`` gathers the observations (subprocesses
only through :mod:`askap_flows.shell`) and calls them. Statuses: OK, WARN (will probably work, but
look), FAIL (the run will not work; the row says the fix) and SKIP (not applicable or cannot be
checked here, and why).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import database, host, mpi, ports, shell
from .spec import AllocationSpec, MPISpec, SpecError

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
TESTBED_HINT = "on the test bed: scripts/slurm_testbed.sh up; source /tmp/askap_testbed/env.sh"


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    name: str
    status: str
    detail: str
    fix: str = ""


def render_table(rows: Sequence[Check]) -> str:
    """The rows as an aligned text table; each fix on its own line under its row."""
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'check':{width}s}  {'status':6s}  detail", f"{'-' * width}  ------  {'-' * 40}"]
    for r in rows:
        lines.append(f"{r.name:{width}s}  {r.status:6s}  {r.detail}")
        if r.fix and r.status in (FAIL, WARN):
            lines.append(f"{'':{width}s}  {'':6s}  fix: {r.fix}")
    return "\n".join(lines)


def exit_code(rows: Iterable[Check]) -> int:
    """1 when any row FAILed, else 0."""
    return 1 if any(r.status == FAIL for r in rows) else 0


# --------------------------------------------------------------------------- pure checks: SLURM
def sinfo_check(result: shell.Completed | None, error: str = "") -> Check:
    """SLURM answers ``sinfo`` (``result`` None: the command could not run, ``error`` says why)."""
    fix = ("load the site's slurm module or set SLURM_CONF to the cluster's slurm.conf; "
           + TESTBED_HINT)
    if result is None:
        return Check("SLURM reachable", FAIL, error or "sinfo could not run", fix)
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        return Check("SLURM reachable", FAIL,
                     f"sinfo exited {result.returncode}: {said[-1] if said else 'no output'}", fix)
    n = len([line for line in result.stdout.splitlines() if line.strip()])
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    return Check("SLURM reachable", OK, f"sinfo answers ({n} partition line(s); SLURM_CONF={conf})")


def cluster_check(clusters: str, with_m: shell.Completed | None, plain: shell.Completed | None,
                  known: shell.Completed | None) -> Check:
    """``sinfo -M CLUSTERS`` failed (``with_m``): say whether the profile's ``clusters:`` value is
    the cause. ``plain``: ``sinfo`` without ``-M``; ``known``: ``sacctmgr -n -P list clusters
    format=Cluster`` (None: not run or not on PATH)."""
    if plain is None or plain.returncode != 0:
        row = sinfo_check(plain, "sinfo could not run")
        return Check(row.name, FAIL, f"sinfo -M {clusters} failed, and {row.detail} without -M "
                     "too", row.fix)
    said = ((with_m.stderr or with_m.stdout).strip().splitlines()[-1:] if with_m
            else ["timed out"])
    head = f"sinfo -M {clusters} failed"
    fix = ("set allocation: clusters: in the profile to a name `sacctmgr list clusters` shows, or "
           "remove it (it is for multi-cluster sites only: sbatch -M)")
    if known is None or known.returncode != 0:
        return Check("SLURM reachable", FAIL, f"{head}: cluster {clusters!r} is not known to this "
                     "SLURM (it keeps no accounting database, slurmdbd, so `sacctmgr list "
                     "clusters` lists none and -M reaches no cluster; sinfo without -M answers)",
                     "remove allocation: clusters: from the profile (this SLURM is one cluster)")
    names = {n.strip().lower() for n in known.stdout.splitlines() if n.strip()}
    unknown = [c for c in clusters.split(",") if c.strip().lower() not in names]
    listed = ", ".join(sorted(names)) or "(none)"
    if unknown:
        return Check("SLURM reachable", FAIL, f"{head}: cluster {', '.join(map(repr, unknown))} "
                     f"is not known to this SLURM (`sacctmgr list clusters`: {listed})", fix)
    return Check("SLURM reachable", FAIL, f"{head}: cluster {clusters!r} is known to this SLURM "
                 f"but does not answer ({said[0] if said else 'no output'})",
                 "try again later (its slurmctld may be down), or ask the site's help desk")


def parse_partitions(sinfo_out: str) -> dict[str, dict[str, Any]]:
    """``sinfo -h -o '%P|%a|%D'`` -> {name: {"available": up/down, "nodes": N, "default": bool}}."""
    parts: dict[str, dict[str, Any]] = {}
    for line in sinfo_out.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3 or not fields[0]:
            continue
        name, avail, nodes = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        entry = parts.setdefault(name, {"available": avail, "nodes": 0, "default": default})
        entry["nodes"] += int(nodes) if nodes.isdigit() else 0
    return parts


def partition_check(partition: str | None, nodes_wanted: int, sinfo_out: str) -> Check:
    """The profile's partition exists, is up and has enough nodes (None: the default one)."""
    parts = parse_partitions(sinfo_out)
    names = ", ".join(sorted(parts)) or "(none)"
    if partition is None:
        default = [n for n, p in parts.items() if p["default"]]
        if not default:
            return Check("partition", FAIL, "the profile names no partition and SLURM has no "
                         f"default one (partitions: {names})",
                         f"set allocation: partition: to one of {names} in the profile")
        partition = default[0]
        label = f"(default) {partition}"
    else:
        label = partition
    if partition not in parts:
        return Check("partition", FAIL, f"partition {partition!r} does not exist here "
                     f"(partitions: {names})",
                     f"set allocation: partition: to one of {names} in the profile "
                     "(sinfo lists them)")
    p = parts[partition]
    if p["available"] != "up":
        return Check("partition", FAIL, f"partition {label} is {p['available']}",
                     "wait for it to come up, or choose another partition (sinfo shows states)")
    if p["nodes"] < nodes_wanted:
        return Check("partition", FAIL, f"partition {label} has {p['nodes']} node(s); the "
                     f"profile asks for {nodes_wanted}",
                     f"set allocation: nodes: <= {p['nodes']} (and mpi: nodes:), or use a "
                     "larger partition")
    return Check("partition", OK, f"{label}: up, {p['nodes']} node(s), {nodes_wanted} wanted")


def account_check(account: str | None, result: shell.Completed | None) -> Check:
    """``sacctmgr -n -P show account NAME format=Account``: the account exists (when SLURM keeps
    accounts at all: without slurmdbd there is nothing to ask, and the row is SKIP)."""
    if account is None:
        return Check("account", SKIP, "the profile names no account (SLURM's default for you)")
    if result is None:
        return Check("account", SKIP, f"cannot check {account!r}: sacctmgr is not on PATH")
    said = f"{result.stdout}\n{result.stderr}"
    if result.returncode != 0 and ("accounting_storage" in said or "slurmdbd" in said.lower()):
        return Check("account", SKIP, f"cannot check {account!r}: this cluster keeps no "
                     "accounting database (AccountingStorageType is not slurmdbd); sbatch "
                     "--test-only at the start of a run still checks it")
    if result.returncode != 0:
        return Check("account", WARN, f"sacctmgr failed: {said.strip().splitlines()[-1:]}",
                     "ask your site's help desk which account to use")
    found = {line.strip() for line in result.stdout.splitlines() if line.strip()}
    if account.lower() not in {a.lower() for a in found}:
        return Check("account", FAIL, f"account {account!r} does not exist",
                     "set allocation: account: to one of yours (sacctmgr show assoc user=$USER "
                     "format=account lists them)")
    return Check("account", OK, f"account {account!r} exists")


def reservation_check(reservation: str | None, result: shell.Completed | None) -> Check:
    """``scontrol -o show reservation NAME``: the reservation exists and is not over."""
    if reservation is None:
        return Check("reservation", SKIP, "the profile names no reservation")
    if result is None or result.returncode != 0:
        said = ((result.stderr or result.stdout).strip() if result else "scontrol did not run")
        return Check("reservation", FAIL, f"reservation {reservation!r}: {said or 'not found'}",
                     "remove allocation: reservation: from the profile, or use a current one "
                     "(scontrol show reservation lists them)")
    info = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    state = info.get("State", "?")
    detail = (f"reservation {reservation!r}: {state}, nodes {info.get('Nodes', '?')}, until "
              f"{info.get('EndTime', '?')}")
    if state != "ACTIVE":
        return Check("reservation", WARN, detail, "jobs wait until the reservation starts "
                     f"({info.get('StartTime', '?')})")
    return Check("reservation", OK, detail)


def parse_mpi_list(text: str) -> set[str]:
    """Plugin names from ``srun --mpi=list`` (22.05: 'MPI plugin types are...' then one a line;
    newer: 'srun: MPI types are...' and 'srun: pmi2')."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("srun:"):
            line = line[len("srun:"):].strip()
        if not line or " " in line or line.endswith(":"):
            continue
        names.add(line)
    return names


def mpi_flavour(mpiexec_version: str) -> str | None:
    """'mpich', 'openmpi' or None, from ``mpiexec --version``."""
    text = mpiexec_version.lower()
    if "hydra" in text or "mpich" in text:
        return "mpich"
    if "open mpi" in text or "openrte" in text or "open-mpi" in text:
        return "openmpi"
    return None


NEEDED_PLUGIN = {"mpich": "pmi2", "openmpi": "pmix"}
FAMILY = {"mpich": "MPICH", "openmpi": "Open MPI"}
# what a program started with the wrong plugin does (measured on the test bed)
WRONG_PLUGIN = {"mpich": "every rank would start as a singleton world of size 1",
                "openmpi": "MPI_Init would abort on every rank (Open MPI needs PMIx)"}


def linked_flavour(ldd_out: str) -> tuple[str | None, str]:
    """('mpich' | 'openmpi' | None, the MPI library's file name) from ``ldd PROGRAM``.

    libmpich.so.N and libmpi.so.12 (the MPICH ABI, e.g. the mpich wheel) are MPICH; libmpi.so.40
    (Open MPI 3-5) with libopen-rte/libopen-pal or libmpi_cray are told apart by name too.
    """
    for line in ldd_out.splitlines():
        lib = line.strip().split(" ", 1)[0]
        if lib.startswith(("libmpich.so", "libmpi.so.12", "libmpi_cray")):
            return "mpich", lib
        if lib.startswith(("libmpi.so.4", "libopen-rte.so", "libopen-pal.so")):
            return "openmpi", lib
    return None, ""


def wrapper_flavour(show_out: str) -> str | None:
    """'mpich' | 'openmpi' | None from ``mpicc -show`` (the compile line the wrapper would run)."""
    if "-lmpich" in show_out.split() or "/mpich" in show_out:
        return "mpich"
    if "openmpi" in show_out or "-lopen-" in show_out:
        return "openmpi"
    return None


def mpi_library_check(flavour: str | None, source: str) -> Check:
    """Which MPI library the profile's program uses, as found by ``source``."""
    if flavour is None:
        return Check("MPI library", SKIP, source or "the program's MPI library cannot be told")
    return Check("MPI library", OK, f"{FAMILY[flavour]}: {source}")


def mpi_plugin_check(spec: MPISpec, mpi_list: str | None, flavour: str | None) -> Check:
    """The profile's ``srun --mpi=`` plugin is offered by SLURM and fits the MPI library."""
    if spec.launcher != "srun":
        return Check("MPI plugin", SKIP, f"launcher is {spec.launcher}, not srun")
    if mpi_list is None:
        return Check("MPI plugin", FAIL, "srun --mpi=list did not answer",
                     "make srun work here first (see 'SLURM reachable')")
    offered = parse_mpi_list(mpi_list)
    shown = ", ".join(sorted(offered)) or "(none)"
    if spec.mpi_plugin not in offered:
        return Check("MPI plugin", FAIL, f"mpi_plugin {spec.mpi_plugin!r} is not offered by "
                     f"srun (offered: {shown})",
                     f"set mpi: mpi_plugin: to one of {shown} in the profile (MPICH: pmi2, "
                     "Open MPI: pmix)")
    need = NEEDED_PLUGIN.get(flavour or "")
    if need and spec.mpi_plugin != need and flavour:
        return Check("MPI plugin", FAIL, f"mpi_plugin {spec.mpi_plugin!r}, but the program is "
                     f"{FAMILY[flavour]}: {WRONG_PLUGIN[flavour]}",
                     f"set mpi: mpi_plugin: {need} in the profile")
    if spec.mpi_plugin == "none":
        return Check("MPI plugin", WARN, "mpi_plugin 'none': ranks get no PMI and start as "
                     "singletons unless the program needs no MPI", "use pmi2 (MPICH) or pmix "
                     "(Open MPI)")
    which = f" and fits {FAMILY[flavour]}" if flavour else " (MPI flavour unknown: not compared)"
    return Check("MPI plugin", OK, f"--mpi={spec.mpi_plugin} offered (of {shown}){which}")


def mpicc_check(mpicc: str | None, mpiexec: str | None, program: Path, source: Path | None,
                needs_mpiexec: bool, wanted: str | None = None) -> Check:
    """An MPI compiler is there (``wanted``: the one the profile names), and the check program is
    built and up to date."""
    if mpicc is None and wanted:
        return Check("mpicc + program", FAIL, f"the profile's mpi: mpicc: {wanted} is not there",
                     "install that MPI (Debian's Open MPI: apt-get install openmpi-bin "
                     "libopenmpi-dev), or fix mpi: mpicc: in the profile")
    if mpicc is None:
        return Check("mpicc + program", FAIL, "no MPI compiler (mpicc) found",
                     mpi.MPI_INSTALL_HINT)
    if needs_mpiexec and mpiexec is None:
        return Check("mpicc + program", FAIL, f"mpicc {mpicc}, but no mpiexec for the local "
                     "backend", mpi.MPI_INSTALL_HINT)
    if not program.exists():
        return Check("mpicc + program", WARN, f"mpicc {mpicc}; the check program {program} is "
                     "not built yet (a run builds it first)",
                     "askap-flows build-mpi" + (f" --mpicc {wanted}" if wanted else ""))
    if source is not None and program.stat().st_mtime < source.stat().st_mtime:
        return Check("mpicc + program", WARN, f"{program} is older than its source {source}",
                     "askap-flows build-mpi --force")
    return Check("mpicc + program", OK, f"mpicc {mpicc}; {program} built")


# --------------------------------------------------------------------------- pure checks: the rest
def pool_check(max_concurrent: int, server_settings: Mapping[str, Any] | None,
               planned: database.Plan | None) -> Check:
    """The Prefect server's database pool is large enough for ``max_concurrent`` sub-flows.

    ``server_settings``: the JSON of a running server's /admin/settings (PREFECT_API_URL), or
    ``planned``: what a server started by the run would get (``database.preflight``).
    """
    want = database.size_pool(max_concurrent)
    if planned is not None and planned.url is not None:
        db = database.parse_url(planned.url)
        if db.is_sqlite:
            return Check("database pool", OK, f"sqlite, {max_concurrent} concurrent sub-flow(s) "
                         f"(at most {database.sqlite_limit()} allowed on sqlite)")
        pool = planned.pool or want
        return Check("database pool", OK, f"a server started by the run gets pool "
                     f"{pool.pool_size}+{pool.max_overflow} for {max_concurrent} concurrent")
    if server_settings is None:
        return Check("database pool", SKIP, "the server at PREFECT_API_URL does not show its "
                     "settings (/admin/settings); its pool cannot be compared")
    size = _find_setting(server_settings, "pool_size")
    overflow = _find_setting(server_settings, "max_overflow")
    size = int(size) if size is not None else database.DEFAULT_POOL.pool_size
    overflow = int(overflow) if overflow is not None else database.DEFAULT_POOL.max_overflow
    have = f"server pool {size}+{overflow}"
    # measured (docs/database.md): the default 5+10 served 140 concurrent sub-flows on 3.9.1;
    # warn only when the pool cannot hold one connection per sub-flow plus the server's own
    if size + overflow < want.pool_size:
        return Check("database pool", WARN, f"{have} connection(s) for {max_concurrent} "
                     f"concurrent sub-flows; askap-flows would size it "
                     f"{want.pool_size}+{want.max_overflow}",
                     f"restart the server with: askap-flows server --max-concurrent "
                     f"{max_concurrent} (or lower --max-concurrent)")
    return Check("database pool", OK, f"{have}, enough for {max_concurrent} concurrent")


def _find_setting(tree: Any, suffix: str) -> Any:
    """The first value whose key ends with ``suffix`` (case-insensitive) in nested settings JSON
    (Prefect 3 nests server.database.sqlalchemy.pool_size; 2.20 has flat PREFECT_* names)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if str(key).lower().endswith(suffix) and not isinstance(value, (Mapping, list)):
                if value is not None:
                    return value
        for value in tree.values():
            found = _find_setting(value, suffix)
            if found is not None:
                return found
    return None


def ports_check(rng: tuple[int, int] | None, reserved: Sequence[int] | None, wanted: int,
                host: str, error: str = "") -> Check:
    """Ports for ``wanted`` schedulers/dashboards could be reserved in the configured range."""
    if rng is None:
        return Check("ports", OK, f"{ports.PORTS_ENV}=0: the OS chooses every port")
    label = f"{rng[0]}-{rng[1]} on {host}"
    if reserved is None or len(reserved) < wanted:
        return Check("ports", FAIL, f"no {wanted} free port(s) in {label}: {error}",
                     f"set {ports.PORTS_ENV}=LOW-HIGH to a free range, or {ports.PORTS_ENV}=0")
    return Check("ports", OK, f"{label}: reserved and released {wanted} port(s) "
                 f"({reserved[0]}, ...) for the planned concurrency")


def interface_check(role: str, name: str | None, here: Mapping[str, str | None],
                    must_be_here: bool) -> Check:
    """A profile interface exists on this host with an IPv4 address.

    ``here``: {interface name: IPv4 address or None}. ``must_be_here``: the scheduler's interface
    (and every interface of the local backend) is used on this host; the SLURM worker's is used
    on the compute nodes, so its absence here is only a warning.
    """
    label = f"interface ({role})"
    if name is None:
        return Check(label, SKIP if role == "worker" else WARN,
                     "not set: Dask picks an address, which may not be reachable",
                     f"set allocation: {'interface' if role == 'worker' else 'scheduler_interface'}"
                     ": in the profile (ip -br addr lists them)")
    names = ", ".join(sorted(here)) or "(none)"
    if name not in here or here[name] is None:
        why = "does not exist" if name not in here else "has no IPv4 address"
        fix = (f"set allocation: {'interface' if role == 'worker' else 'scheduler_interface'}: "
               f"to one of {names} in the profile")
        if must_be_here:
            return Check(label, FAIL, f"{name!r} {why} on this host (interfaces: {names})", fix)
        return Check(label, WARN, f"{name!r} {why} on this host (it must exist on the compute "
                     "nodes; a login node may lack it)", fix + " if the compute nodes lack it too")
    return Check(label, OK, f"{name} = {here[name]}")


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
