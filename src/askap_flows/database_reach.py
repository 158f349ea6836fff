"""Whether Prefect's database answers (one connection, its schema revision), or the Prefect
server at ``PREFECT_API_URL`` and its database do; every failure a DatabaseError naming the cause
and the fix.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from . import compat
from .database_url import PG_SCRIPT, DatabaseError, DatabaseURL, parse_url


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
