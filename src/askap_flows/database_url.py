"""Prefect's database URLs: parse, build, redact, read from a file, and the one configured now.

sqlite under ``PREFECT_HOME`` for one user, PostgreSQL (``postgresql+asyncpg``) for anything
concurrent. :class:`DatabaseError`, raised by every ``database*`` module, is here too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from . import compat
from .errors import AskapFlowsError

PG_SCRIPT = "scripts/postgres_database.sh"
POSTGRES_SCHEME = "postgresql+asyncpg"
SQLITE_SCHEME = "sqlite+aiosqlite"


class DatabaseError(AskapFlowsError, RuntimeError):
    """Prefect's database (or the server in front of it) cannot be used; the text says why and
    what to do."""


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
