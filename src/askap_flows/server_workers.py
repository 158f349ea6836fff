"""A Prefect server whose API runs in several worker processes (``askap-flows server --workers N``).

Prefect 3 serves its API from N processes (``prefect server start --workers N``) only when the
processes share their events, caches and leases through Redis (``prefect-redis``) and its
background services run in a process of their own (``prefect server services start``). This
module adds what that needs around a :class:`~askap_flows.server.PrefectServer`: a private
``redis-server`` on the server's own address (a free port, a password, nothing kept on disk), a
first start of the API in one process (it migrates the database and registers Prefect's block
types: N processes starting at once raced for both, one failed with "duplicate key value violates
unique constraint uq_block_type__slug"), and the services process. Everything it decides reaches
Prefect as its own settings.

Refused, with the fix: Prefect 2.20 (one process only), sqlite (one writer at a time), no
``redis-server`` or no ``prefect-redis``.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import compat, shell
from .database_url import parse_url
from .reaper import Reaper
from .server import ServerError, free_port, healthy
from .spec import whole_number

if TYPE_CHECKING:
    import subprocess  # the type only: shell.py runs every command

#: the redis-server to run (default: the one on PATH)
REDIS_ENV = "ASKAP_FLOWS_REDIS_SERVER"
INSTALL_HINT = "pip install -c package_list.txt 'askap-flows[server]'"


def check(workers: int, database_url: str) -> int:
    """``workers`` if this installation can serve the API from that many processes on
    ``database_url``; otherwise ServerError with the cause and the fix."""
    whole_number("--workers", workers)
    if workers == 1:
        return workers
    if not compat.SERVER_WORKERS:
        raise ServerError(
            f"--workers {workers}: Prefect {compat.PREFECT_VERSION}'s server runs in one process "
            "(its 'prefect server start' has no --workers). Fix: install Prefect 3 "
            f"({INSTALL_HINT}), or run one server process (--workers 1): its pool is sized for "
            "--max-concurrent.")
    if parse_url(database_url).is_sqlite:
        raise ServerError(
            f"--workers {workers} needs PostgreSQL: sqlite has one writer at a time, and "
            f"{workers} API processes writing to it fail with 'database is locked'. Fix: start "
            "PostgreSQL (scripts/postgres_database.sh start --dir DIR; eval \"$(scripts/"
            "postgres_database.sh url --dir DIR)\") and give its URL (--database-url-file FILE), "
            "or run one server process (--workers 1).")
    redis_binary()
    if importlib.util.find_spec("prefect_redis") is None:
        raise ServerError(
            f"--workers {workers} needs the prefect-redis package (the API processes share their "
            f"events through Redis). Fix: {INSTALL_HINT} (or pip install prefect-redis).")
    return workers


def redis_binary(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    given = env.get(REDIS_ENV)
    found = shutil.which(given or "redis-server")
    if found is None:
        where = f"{REDIS_ENV}={given} is not an executable" if given else "no redis-server on PATH"
        raise ServerError(
            f"--workers N > 1 runs a private Redis next to the server, but {where}. Fix: install "
            "Redis (Debian/Ubuntu: apt-get install redis-server; or your site's module), or set "
            f"{REDIS_ENV}=/path/to/redis-server; or run one server process (--workers 1).")
    return found


def redis_settings(host: str, port: int, password: str) -> dict[str, str]:
    """Prefect 3's settings for its messaging, event ordering, leases and background-task queue
    (Docket) in Redis ``host:port`` (database 0 for messaging, 1 for Docket)."""
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": host,
        "PREFECT_REDIS_MESSAGING_PORT": str(port),
        "PREFECT_REDIS_MESSAGING_DB": "0",
        "PREFECT_REDIS_MESSAGING_PASSWORD": password,
        "PREFECT_SERVER_DOCKET_URL": f"redis://:{password}@{host}:{port}/1",
    }


def redis_ping(host: str, port: int, password: str, timeout: float = 2.0) -> bool:
    """True when the Redis at ``host:port`` takes the password and answers PING."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            got = b""
            while b"+PONG" not in got and len(got) < 512:
                chunk = s.recv(512)
                if not chunk:
                    break
                got += chunk
            return got.startswith(b"+OK") and b"+PONG" in got
    except OSError:
        return False


class WorkerSupport:
    """The processes next to a multi-worker server's API: Redis and the services.

    ``prepare(env)`` starts Redis, starts the API once in one process (migrations, block types)
    and starts the services; it returns the settings every one of the server's processes needs.
    ``stop()`` stops them, Redis last.
    """

    def __init__(self, home: Path, host: str, start_timeout: float = 90.0) -> None:
        self.home = Path(home)
        self.host = host
        self.start_timeout = start_timeout
        self.redis_dir = self.home / "redis"
        self.redis_port: int | None = None
        self.redis: subprocess.Popen | None = None
        self.services: subprocess.Popen | None = None
        self.services_log = self.home / "services.log"
        self.reaper: Reaper | None = None

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "redis.log"

    def start(self, argv: list[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen:
        """One of the server's processes, stopped by the reaper after the ones started later if
        this process dies first."""
        if self.reaper is None:
            self.reaper = Reaper(self.home / "reaper.log")
        proc = shell.start_background(argv, log, env, die_with_parent=False)
        self.reaper.watch(proc)
        return proc

    def prepare(self, env: Mapping[str, str]) -> dict[str, str]:
        password = secrets.token_hex(24)
        self._start_redis(password)
        assert self.redis_port is not None
        settings = redis_settings(self.host, self.redis_port, password)
        self._first_start({**env, **settings})
        settings[compat.MIGRATE_ON_START_VAR] = "false"  # migrated by the first start
        full = {**env, **settings}
        self.services = self.start(compat.prefect_command("server", "services", "start"),
                                   self.services_log, full)
        return settings

    def _start_redis(self, password: str) -> None:
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        self.redis_dir.chmod(0o700)
        self.redis_port = free_port(self.host)
        conf = self.redis_dir / "redis.conf"
        conf.touch(mode=0o600)
        conf.chmod(0o600)  # it holds the password: not on the command line, where ps shows it
        conf.write_text("\n".join([
            f"bind {self.host}", f"port {self.redis_port}", f"dir {self.redis_dir}",
            'save ""', "appendonly no", "daemonize no", f"requirepass {password}",
            'logfile ""', ""]))
        self.redis = self.start([redis_binary(), str(conf)], self.redis_log, os.environ)
        deadline = time.monotonic() + 30
        while not redis_ping(self.host, self.redis_port, password):
            if self.redis.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"redis-server did not start on {self.host}:{self.redis_port}. "
                                  f"Last lines of {self.redis_log}:\n{tail(self.redis_log)}")
            time.sleep(0.1)

    def _first_start(self, env: Mapping[str, str]) -> None:
        """The API in one process on a port of its own until it answers, then stopped."""
        log = self.home / "first-start.log"
        port = free_port(self.host)
        argv = compat.server_command(self.host, port) + ["--no-services"]
        proc = self.start(argv, log, env)
        deadline = time.monotonic() + self.start_timeout
        try:
            while not healthy(f"http://{self.host}:{port}/api"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(
                        "the first start of the API (one process: database migrations, block "
                        f"types) did not answer within {self.start_timeout:g} s. Last lines of "
                        f"{log}:\n{tail(log)}")
                time.sleep(0.3)
        finally:
            shell.kill_group(proc, grace=10)

    def exited(self) -> str | None:
        """What of them has stopped on its own (with its log), or None."""
        for name, proc, log in (("the Prefect services", self.services, self.services_log),
                                ("redis-server", self.redis, self.redis_log)):
            if proc is not None and proc.poll() is not None:
                return f"{name} exited (code {proc.returncode}). Last lines of {log}:\n{tail(log)}"
        return None

    def describe(self) -> str:
        return (f"services in their own process (log: {self.services_log}), Redis on "
                f"{self.host}:{self.redis_port}")

    def stop(self) -> None:
        for attr in ("services", "redis"):
            proc = getattr(self, attr)
            if proc is not None and proc.poll() is None:
                shell.kill_group(proc, grace=10)
            setattr(self, attr, None)
        if self.reaper is not None:
            self.reaper.close()
            self.reaper = None


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
