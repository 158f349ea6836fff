"""``askap-flows doctor``'s pure checks of SLURM, the database pool, ports and interfaces.

Each is a pure function from what was observed (a command's output, a server's settings, a set of
interface names) to a :class:`~askap_flows.doctor_report.Check` row; :mod:`askap_flows.doctor`
makes the observations. The MPI checks are in :mod:`askap_flows.doctor_mpi`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from . import database, database_url, ports, shell
from .doctor_report import FAIL, OK, SKIP, WARN, Check

TESTBED_HINT = "on the test bed: scripts/slurm_testbed.sh up; source /tmp/askap_testbed/env.sh"


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

# --------------------------------------------------------------------------- pure checks: the rest
def pool_check(max_concurrent: int, server_settings: Mapping[str, Any] | None,
               planned: database.Plan | None) -> Check:
    """The Prefect server's database pool is large enough for ``max_concurrent`` sub-flows.

    ``server_settings``: the JSON of a running server's /admin/settings (PREFECT_API_URL), or
    ``planned``: what a server started by the run would get (``database.preflight``).
    """
    want = database.size_pool(max_concurrent)
    if planned is not None and planned.url is not None:
        db = database_url.parse_url(planned.url)
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
