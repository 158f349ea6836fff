"""Prefect's database: pool sizing and the checks before a run (its URL: :mod:`.database_url`;
whether it answers: :mod:`.database_reach`).

Prefect keeps every flow run, task run and log line in one database behind its API server: sqlite
under ``PREFECT_HOME`` for one user, PostgreSQL for anything concurrent. This module never patches
Prefect: everything it decides reaches the *server process* as Prefect's own settings, under the
names of the installed major (from :mod:`askap_flows.compat`).

``preflight(max_concurrent)`` is the one call a pipeline makes before its server starts. It warns
about legacy ``PREFECT_ORION_*`` variables, refuses more than a few concurrent sub-flows on sqlite,
checks that the database (or the server given by ``PREFECT_API_URL``) answers, and sizes the pool.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import compat
from .database_reach import check_reachable, check_server
from .database_url import PG_SCRIPT, DatabaseError, DatabaseURL, configured_url, parse_url
from .spec import whole_number  # the one "a count must be >= 1" check (a SpecError)

#: more concurrent sub-flows than this on sqlite are refused. Measured (docs/database.md, a separate
#: server on sqlite, 3K local sub-flows at K at once): every run completed up to K=16 on both
#: majors, Prefect 3.9.1 lost 1 of 96 at K=32 (its clients retried 503 "database is locked"
#: from K=2 on).
#: Half the largest K measured without a loss.
SQLITE_MAX_CONCURRENT = 8
SQLITE_LIMIT_ENV = "ASKAP_FLOWS_SQLITE_MAX_CONCURRENT"
#: a pool larger than this per engine buys nothing: the server's request handling saturates first
POOL_SIZE_CAP = 40


# --------------------------------------------------------------------------- pool sizing
@dataclass(frozen=True)
class PoolSettings:
    """SQLAlchemy pool of the Prefect server process."""

    pool_size: int
    max_overflow: int
    pool_timeout: float
    connect_timeout: float

    def env(self) -> dict[str, str]:
        """Settings for the server process, under the installed major's names."""
        return compat.pool_settings(self.pool_size, self.max_overflow, self.pool_timeout,
                                    self.connect_timeout)


DEFAULT_POOL = PoolSettings(**compat.DEFAULT_POOL)


def size_pool(max_concurrent: int, max_connections: int = 100, workers: int = 1) -> PoolSettings:
    """Pool settings for a server that serves ``max_concurrent`` concurrent sub-flows.

    Every running sub-flow keeps about one API request in flight that needs a connection (state
    changes, task runs, log batches), and the server's own services need a few more:
    ``pool_size = 5 + max_concurrent`` and ``max_overflow = pool_size``, so that bursts wait
    rather than fail. The total stays below ``max_connections`` (PostgreSQL's default is 100;
    scripts/postgres_database.sh sets 300), keeping room for psql and a second engine. A busy
    server waits up to 60 s for a free connection (Prefect's default: 30 s, after which the request
    fails with "QueuePool limit ... reached") and 10 s to open one (default 5 s).

    With ``workers`` > 1 API processes every process has a pool of its own: each serves its share
    of the sub-flows (``ceil(max_concurrent / workers)``), and the budget is split between them
    and the services process (``workers + 1`` pools).
    """
    whole_number("max_concurrent", max_concurrent)
    whole_number("workers", workers)
    pools = 1 if workers == 1 else workers + 1
    budget = max(15, int(max_connections * 0.6) // pools)  # leave room for other clients
    share = -(-max_concurrent // workers)
    pool_size = min(5 + share, POOL_SIZE_CAP, budget // 2)
    max_overflow = max(10, min(pool_size, budget - pool_size))
    return PoolSettings(pool_size=max(pool_size, 5), max_overflow=max_overflow,
                        pool_timeout=60.0, connect_timeout=10.0)


# --------------------------------------------------------------------------- checks
def legacy_variables(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return sorted(k for k in env if k.startswith(compat.LEGACY_PREFIX))


def legacy_warning(names: list[str]) -> str:
    """A loud warning: PREFECT_ORION_* is ignored by Prefect 2.20 and 3.x, silently."""
    lines = ["!" * 78,
             f"!!! WARNING: {', '.join(names)} {'is' if len(names) == 1 else 'are'} set, but "
             f"Prefect {compat.PREFECT_VERSION} IGNORES PREFECT_ORION_* variables without a word."]
    if compat.LEGACY_PREFIX + "DATABASE_CONNECTION_URL" in names:
        lines.append("!!! The database URL given that way is NOT used: the server falls back to "
                     "sqlite.")
    for name in names:
        if name.startswith(compat.LEGACY_PREFIX + "DATABASE_"):
            new = compat.LEGACY_DATABASE_RENAME + name[len(compat.LEGACY_PREFIX + "DATABASE_"):]
            lines.append(f"!!!   {name} -> {new}")
        else:
            lines.append(f"!!!   {name} -> find its current name: prefect config view "
                         "--show-defaults")
    lines += ["!!! Fix: rename (or unset) them; for PostgreSQL: eval \"$(" + PG_SCRIPT + " url)\"",
              "!" * 78]
    return "\n".join(lines)


def sqlite_limit(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = env.get(SQLITE_LIMIT_ENV, "").strip()
    if not raw:
        return SQLITE_MAX_CONCURRENT
    try:
        value = int(raw)
    except ValueError:
        raise DatabaseError(f"{SQLITE_LIMIT_ENV}={raw!r} is not a whole number.") from None
    return whole_number(SQLITE_LIMIT_ENV, value)


def check_sqlite_concurrency(db: DatabaseURL, max_concurrent: int, limit: int) -> None:
    if db.is_sqlite and max_concurrent > limit:
        raise DatabaseError(
            f"refusing to run {max_concurrent} concurrent sub-flows against sqlite "
            f"({db.database}). Prefect's server on sqlite has one writer at a time: measured "
            "with Prefect 3.9.1, it answered '503 Service Unavailable' (database is locked, "
            "retried by the client) from 2 concurrent sub-flows on, and lost a run at 32. "
            f"At most {limit} run against sqlite. Fix: use PostgreSQL:\n"
            f"  {PG_SCRIPT} start --dir DIR --interface IF      # prints the URL\n"
            f"  eval \"$({PG_SCRIPT} url --dir DIR)\"\n"
            f"or run at most {limit} at once (--max-concurrent {limit}), or accept the risk with "
            f"{SQLITE_LIMIT_ENV}={max_concurrent}."
        )


@dataclass(frozen=True)
class Plan:
    """What preflight decided: the database URL a server should use and its process settings.

    ``url`` is None when an existing server (PREFECT_API_URL) is used.
    """

    url: str | None
    server_env: dict[str, str]
    pool: PoolSettings | None = None
    workers: int = 1

    def describe(self) -> str:
        if self.url is None:
            return "the Prefect server at PREFECT_API_URL and its database answer"
        db = parse_url(self.url)
        if db.is_sqlite:
            return f"sqlite {db.database}"
        pool = self.pool
        if pool is None:
            return f"PostgreSQL {db.where}"
        per = "" if self.workers == 1 else f" in each of {self.workers + 1} processes"
        return f"PostgreSQL {db.where}, server pool {pool.pool_size}+{pool.max_overflow}{per}"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def preflight(max_concurrent: int, *, database_url: str | None = None,
              api_url: str | None = None, env: Mapping[str, str] | None = None,
              timeout: float = 5.0, say: Callable[[str], None] = _stderr,
              max_connections: int = 100, workers: int = 1) -> Plan:
    """Everything about the database that can be checked before a pipeline starts.

    With ``api_url`` (an existing server): that server and its database must answer. Otherwise
    the database a new server would use (``database_url``, else the configured one) must be
    reachable, sqlite is refused above the limit, and the pool is sized for ``max_concurrent``.
    ``workers``: the server's API processes (pools sized per process, :func:`size_pool`).
    Raises DatabaseError with the cause and the fix.
    """
    env = os.environ if env is None else env
    legacy = legacy_variables(env)
    if legacy:
        say(legacy_warning(legacy))
    if api_url:
        check_server(api_url, timeout=max(timeout, 15.0))
        return Plan(url=None, server_env={})
    url = database_url or configured_url(env)[0]
    db = parse_url(url)
    check_sqlite_concurrency(db, max_concurrent, sqlite_limit(env))
    check_reachable(db, timeout=timeout)
    if db.is_sqlite:
        return Plan(url=url, server_env={})
    pool = size_pool(max_concurrent, max_connections, workers)  # the database's max_connections
    return Plan(url=url, server_env=pool.env(), pool=pool, workers=workers)


# --------------------------------------------------------------------------- addresses
def interface_address(interface: str) -> str:
    """The first IPv4 address of a network interface (e.g. ``ib0``): host.interface_address,
    the one lookup of the library, as a DatabaseError when the interface is not here."""
    from . import host

    try:
        return host.interface_address(interface)
    except host.InterfaceError as exc:
        raise DatabaseError(str(exc)) from None
