"""Prefect's database: its URL, a reachability check, pool sizing, and the checks before a run.

Prefect keeps every flow run, task run and log line in one database behind its API server: sqlite
under ``PREFECT_HOME`` for one user, PostgreSQL for anything concurrent. This module never patches
Prefect: everything it decides reaches the *server process* as Prefect's own settings, under the
names of the installed major (from :mod:`askap_flows.compat`).

``preflight(max_concurrent)`` is the one call a pipeline makes before its server starts. It warns
about legacy ``PREFECT_ORION_*`` variables, refuses more than a few concurrent sub-flows on sqlite,
checks that the database (or the server given by ``PREFECT_API_URL``) answers, and sizes the pool.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from . import compat
from .errors import AskapFlowsError
from .spec import whole_number  # the one "a count must be >= 1" check (a SpecError)

PG_SCRIPT = "scripts/postgres_database.sh"
#: more concurrent sub-flows than this on sqlite are refused. Measured (docs/database.md, a separate
#: server on sqlite, 3K local sub-flows at K at once): every run completed up to K=16 on both
#: majors, Prefect 3.9.1 lost 1 of 96 at K=32 (its clients retried 503 "database is locked"
#: from K=2 on).
#: Half the largest K measured without a loss.
SQLITE_MAX_CONCURRENT = 8
SQLITE_LIMIT_ENV = "ASKAP_FLOWS_SQLITE_MAX_CONCURRENT"
POSTGRES_SCHEME = "postgresql+asyncpg"
SQLITE_SCHEME = "sqlite+aiosqlite"
#: a pool larger than this per engine buys nothing: the server's request handling saturates first
POOL_SIZE_CAP = 40


class DatabaseError(AskapFlowsError, RuntimeError):
    """Prefect's database (or the server in front of it) cannot be used; the text says why and
    what to do."""


# --------------------------------------------------------------------------- URLs
@dataclass(frozen=True)
class DatabaseURL:
    """A parsed Prefect database URL (sqlite+aiosqlite or postgresql+asyncpg)."""

    url: str = field(repr=False)  # holds the password
    dialect: str = "postgresql"  # "sqlite" or "postgresql"
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None  # database name, or the sqlite file path

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def where(self) -> str:
        if self.is_sqlite:
            return self.database or "?"
        return f"{self.host}:{self.port}/{self.database}"

    def redacted(self) -> str:
        """The URL with the password replaced by ``***`` (for messages and logs)."""
        return redact(self.url)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    userinfo, host = netloc.rsplit("@", 1)
    if ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{tail}"


def sqlite_url(prefect_home: str | os.PathLike) -> str:
    """sqlite under ``PREFECT_HOME``: ``sqlite+aiosqlite:////abs/home/prefect.db``."""
    return f"{SQLITE_SCHEME}:///{Path(prefect_home).expanduser().absolute() / 'prefect.db'}"


def postgres_url(host: str, port: int = 5432, user: str = "prefect", password: str | None = None,
                 database: str = "prefect") -> str:
    """A ``postgresql+asyncpg://`` URL; user and password are percent-encoded."""
    if not host:
        raise DatabaseError("a PostgreSQL URL needs a host: the address of the database server.")
    auth = quote(user, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    netloc_host = f"[{host}]" if ":" in host else host
    return f"{POSTGRES_SCHEME}://{auth}@{netloc_host}:{int(port)}/{quote(database, safe='')}"


def parse_url(url: str) -> DatabaseURL:
    """Parse a Prefect database URL; an unsupported or malformed one is a DatabaseError."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise DatabaseError(f"'{redact(url)}' is not a database URL: expected "
                            f"{POSTGRES_SCHEME}://USER:PASSWORD@HOST:PORT/DB or "
                            f"{SQLITE_SCHEME}:///ABSOLUTE/PATH/prefect.db.")
    if scheme == SQLITE_SCHEME:
        path = rest[1:] if rest.startswith("/") else rest
        return DatabaseURL(url, "sqlite", database=path.split("?", 1)[0])
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        raise DatabaseError(f"Prefect's server needs the asyncpg driver: write "
                            f"'{POSTGRES_SCHEME}://...' instead of '{scheme}://...'.")
    if scheme != POSTGRES_SCHEME:
        raise DatabaseError(f"unsupported database URL scheme '{scheme}': Prefect supports "
                            f"{POSTGRES_SCHEME}:// and {SQLITE_SCHEME}:///.")
    parts = urlsplit(url)
    try:
        port = parts.port or 5432
    except ValueError as exc:
        raise DatabaseError(f"bad port in database URL '{redact(url)}': {exc}") from None
    if not parts.hostname:
        raise DatabaseError(f"database URL '{redact(url)}' has no host.")
    return DatabaseURL(
        url, "postgresql", host=parts.hostname, port=port,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=unquote(parts.path.lstrip("/")) or (unquote(parts.username or "") or None),
    )


def url_from_file(path: str | os.PathLike) -> str:
    """A database URL kept in a file that only its owner can read (mode 0600 or stricter)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text().strip()
    except OSError as exc:
        raise DatabaseError(f"cannot read the database URL file {path}: {exc.strerror}.") from None
    if mode & 0o077:
        raise DatabaseError(f"{path} (mode {mode:04o}) can be read by other users, and it holds a "
                            f"database password. Fix: chmod 600 {path}")
    if not text:
        raise DatabaseError(f"the database URL file {path} is empty.")
    parse_url(text)
    return text


def configured_url(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The database URL a server started now would use, and where it came from.

    The installed major's setting names (compat.DATABASE_URL_VARS) are read first; without them,
    sqlite under ``PREFECT_HOME`` (Prefect's default ``~/.prefect``).
    """
    env = os.environ if env is None else env
    for name in compat.DATABASE_URL_VARS:
        if env.get(name):
            return env[name], name
    home = env.get("PREFECT_HOME") or str(Path("~/.prefect").expanduser())
    return sqlite_url(home), f"default: sqlite under PREFECT_HOME={home}"


# --------------------------------------------------------------------------- reachability
def check_reachable(url: str | DatabaseURL, timeout: float = 5.0) -> None:
    """Connect once (at most ``timeout`` seconds); raise DatabaseError naming cause and fix."""
    db = parse_url(url) if isinstance(url, str) else url
    if db.is_sqlite:
        _check_sqlite(db)
        revisions = _sqlite_revisions(db)
    else:
        try:
            revisions = _run_async(_pg_connect(db, timeout))
        except Exception as exc:  # noqa: BLE001 - every cause becomes one clear message
            raise DatabaseError(_pg_message(db, exc, timeout)) from None
    check_schema(db, revisions)


def check_schema(db: DatabaseURL, revisions: list[str]) -> None:
    """The database's schema revision must be one the installed Prefect knows (or none yet)."""
    unknown = sorted(set(revisions) - compat.known_migrations(db.dialect))
    if unknown:
        where = db.database if db.is_sqlite else f"database '{db.database}' at {db.host}:{db.port}"
        raise DatabaseError(
            f"{where} was migrated by another Prefect version: its schema revision "
            f"{', '.join(unknown)} is unknown to the installed Prefect {compat.PREFECT_VERSION}, "
            "whose server would fail to start on it. Prefect 2 and 3 (and an older release after "
            "a newer one) cannot share a database. Fix: give each Prefect version its own "
            f"database ('{PG_SCRIPT} start --db prefect{compat.PREFECT_MAJOR} --dir DIR' creates "
            "one; for sqlite another PREFECT_HOME). The existing database is left untouched."
        )


def _sqlite_revisions(db: DatabaseURL) -> list[str]:
    import sqlite3

    path = Path(db.database or "")
    if not db.database or not path.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.Error:  # no table yet (a new database), or a busy file: the server will tell
        return []


def _check_sqlite(db: DatabaseURL) -> None:
    """The file (and its directory, for sqlite's journal) can be written; the directory is
    created as the server would."""
    if not db.database or db.database.startswith((":memory:", "file::memory:")):
        return
    path = Path(db.database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
        if path.exists():
            with open(path, "ab"):
                pass
    except OSError as exc:
        raise DatabaseError(
            f"Prefect's sqlite database {path} cannot be written ({exc.strerror}: "
            f"{exc.filename or path.parent}). Fix: point PREFECT_HOME at a writable directory "
            "(source scripts/prefect_env.sh DIR), or use PostgreSQL "
            f"({PG_SCRIPT} start)."
        ) from None


async def _pg_connect(db: DatabaseURL, timeout: float) -> list[str]:
    """Connect, and read the schema revision (none for a new database)."""
    import asyncpg

    conn = await asyncpg.connect(host=db.host, port=db.port, user=db.user, password=db.password,
                                 database=db.database, timeout=timeout)
    try:
        if not await conn.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL",
                                   timeout=timeout):
            return []  # a new database: the server creates the schema
        rows = await conn.fetch("SELECT version_num FROM alembic_version", timeout=timeout)
        return [r[0] for r in rows]
    finally:
        await conn.close(timeout=timeout)


def _pg_message(db: DatabaseURL, exc: BaseException, timeout: float) -> str:
    import asyncpg

    at = f"PostgreSQL at {db.host}:{db.port}"
    status = f"{PG_SCRIPT} status --dir DIR"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return (f"{at} refused the login of user '{db.user}': {text}. The password in the "
                f"database URL is wrong (or missing). Fix: take the URL from the script that "
                f"started the server: eval \"$({PG_SCRIPT} url --dir DIR)\" (the password is in "
                f"DIR/password), or set ASKAP_PG_PASSWORD before '{PG_SCRIPT} start'.")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return (f"{at} answers, but the database '{db.database}' does not exist: {text}. Fix: "
                f"'{PG_SCRIPT} start --db {db.database} --dir DIR' creates it (also on a running "
                f"server), or run CREATE DATABASE \"{db.database}\" OWNER \"{db.user}\"; as a "
                "superuser.")
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return (f"{at} refused user '{db.user}': {text}. If it says 'no pg_hba.conf entry', "
                f"this host is not allowed to log in: restart with '{PG_SCRIPT} start --allow "
                "CIDR' (this network). Otherwise check the user name in the URL.")
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return (f"{at} has no free connection slots: {text}. Fix: raise max_connections "
                f"('{PG_SCRIPT} start --max-connections N' after a stop), or lower the pipeline's "
                "concurrency.")
    if isinstance(exc, asyncpg.PostgresError):
        return f"{at} answered with an error: {type(exc).__name__}: {text}."
    if isinstance(exc, socket.gaierror):
        return (f"cannot resolve the database host '{db.host}': {text}. Fix: use the server's "
                "IP address in the URL (as printed by "
                f"'{PG_SCRIPT} url').")
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return (f"cannot reach {at}: connection refused (nothing listens on that address and "
                f"port). Is the database server up? Check with '{status}'; start it with "
                f"'{PG_SCRIPT} start --dir DIR --address {db.host} --port {db.port}'. "
                "Then check the address and port in the URL.")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return (f"no answer from {at} within {timeout:g} s. The host may be unreachable from "
                "here (firewall, wrong network, an address only that node can reach such as "
                "127.0.0.1), or the server is overloaded. Is the database server up? Check "
                f"with '{status}' on its node; use the node's routable address "
                f"('{PG_SCRIPT} start --interface IF').")
    if isinstance(exc, OSError):
        return (f"cannot reach {at}: {text}. Is the database server up? Check with '{status}'; "
                "check the address and port in the URL.")
    return f"cannot use {at}: {type(exc).__name__}: {text}"


def _run_async(coro):
    """Run a coroutine to completion, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="askap-db-check")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


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


def size_pool(max_concurrent: int, max_connections: int = 100) -> PoolSettings:
    """Pool settings for a server that serves ``max_concurrent`` concurrent sub-flows.

    Every running sub-flow keeps about one API request in flight that needs a connection (state
    changes, task runs, log batches), and the server's own services need a few more:
    ``pool_size = 5 + max_concurrent`` and ``max_overflow = pool_size``, so that bursts wait
    rather than fail. The total stays below ``max_connections`` (PostgreSQL's default is 100;
    scripts/postgres_database.sh sets 300), keeping room for psql and a second engine. A busy
    server waits up to 60 s for a free connection (Prefect's default: 30 s, after which the request
    fails with "QueuePool limit ... reached") and 10 s to open one (default 5 s).
    """
    whole_number("max_concurrent", max_concurrent)
    budget = max(15, int(max_connections * 0.6))  # leave room for other clients
    pool_size = min(5 + max_concurrent, POOL_SIZE_CAP, budget // 2)
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


def check_server(api_url: str, timeout: float = 15.0) -> None:
    """The Prefect server at ``api_url`` answers, and so does its database (``/ready``)."""
    base = api_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
            r.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatabaseError(
            f"no Prefect server answers at PREFECT_API_URL={api_url} ({reason}). Fix: start one "
            "(askap-flows server --database-url-file FILE --host ADDRESS, FILE holding the "
            "database URL, mode 0600) and export the PREFECT_API_URL it prints, or unset "
            "PREFECT_API_URL to let the run start its own."
        ) from None
    try:
        with urllib.request.urlopen(f"{base}/ready", timeout=timeout) as r:
            r.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403, 404, 405):  # no /ready here (e.g. Prefect Cloud): nothing to say
            return
        body = exc.read().decode(errors="replace")
        try:
            body = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            pass
        raise DatabaseError(
            f"the Prefect server at {api_url} answers, but its database does not (HTTP "
            f"{exc.code}: {body}). The database went away or is unreachable from the server. "
            f"Fix: check it on its node ('{PG_SCRIPT} status --dir DIR', then 'start'), and "
            "look at the server's log; nothing was run."
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise DatabaseError(f"the Prefect server at {api_url} did not answer /ready within "
                            f"{timeout:g} s ({getattr(exc, 'reason', exc)}).") from None


@dataclass(frozen=True)
class Plan:
    """What preflight decided: the database URL a server should use and its process settings.

    ``url`` is None when an existing server (PREFECT_API_URL) is used.
    """

    url: str | None
    server_env: dict[str, str]
    pool: PoolSettings | None = None

    def describe(self) -> str:
        if self.url is None:
            return "the Prefect server at PREFECT_API_URL and its database answer"
        db = parse_url(self.url)
        if db.is_sqlite:
            return f"sqlite {db.database}"
        pool = self.pool
        return (f"PostgreSQL {db.where}, server pool {pool.pool_size}+{pool.max_overflow}"
                if pool else f"PostgreSQL {db.where}")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def preflight(max_concurrent: int, *, database_url: str | None = None,
              api_url: str | None = None, env: Mapping[str, str] | None = None,
              timeout: float = 5.0, say: Callable[[str], None] = _stderr,
              max_connections: int = 100) -> Plan:
    """Everything about the database that can be checked before a pipeline starts.

    With ``api_url`` (an existing server): that server and its database must answer. Otherwise
    the database a new server would use (``database_url``, else the configured one) must be
    reachable, sqlite is refused above the limit, and the pool is sized for ``max_concurrent``.
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
    pool = size_pool(max_concurrent, max_connections)  # the database's max_connections
    return Plan(url=url, server_env=pool.env(), pool=pool)


# --------------------------------------------------------------------------- addresses
def interface_address(interface: str) -> str:
    """The first IPv4 address of a network interface (e.g. ``ib0``): host.interface_address,
    the one lookup of the library, as a DatabaseError when the interface is not here."""
    from . import host

    try:
        return host.interface_address(interface)
    except host.InterfaceError as exc:
        raise DatabaseError(str(exc)) from None
