"""A Prefect API server as a child process: started, checked healthy, stopped.

Dask workers in other processes (every SLURM worker) report their task runs to the Prefect API, so
a pipeline needs a real server whose URL is in ``PREFECT_API_URL``. When the user has none, the
main job starts one for the length of the run (and prints the UI's address); a pipeline script
gets the same with ``with askap_flows.prefect_server(): ...``.

Servers started from one ``PREFECT_HOME`` start one at a time (an flock held until the server
answers): two runs started at once in one directory both ran Prefect's migrations on the same
sqlite file, and one server died with an alembic error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import compat, database, shell
from .database_url import sqlite_url
from .errors import AskapFlowsError

if TYPE_CHECKING:
    import subprocess  # the type only: shell.py runs every command

    from .server_workers import WorkerSupport


class ServerError(AskapFlowsError, RuntimeError):
    """The Prefect server did not start or does not answer."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200 and json.loads(r.read() or b"true") is not False
    except (urllib.error.URLError, OSError, ValueError):
        return False


class PrefectServer:
    """``prefect server start`` on ``host`` with its log in ``log_path``; a context manager."""

    def __init__(self, prefect_home: Path, database_url: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None,
                 start_timeout: float = 90.0, settings: Mapping[str, str] | None = None,
                 workers: int = 1) -> None:
        """``settings``: extra environment of the server process, e.g. the pool settings of
        ``database.preflight(...).server_env``. ``workers`` > 1: the API in that many processes,
        next to Redis and a services process (:mod:`.server_workers`; Prefect 3, PostgreSQL)."""
        self.home = Path(prefect_home)
        self.database_url = database_url or sqlite_url(self.home)
        self.settings = dict(settings or {})
        self.host = host
        self.port = port
        self._fixed_port = port is not None
        self.log_path = Path(log_path or self.home / "server.log")
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None  # the server process while it runs
        self.workers = workers
        self.support: WorkerSupport | None = None  # with workers > 1

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with start_lock(self.home):  # one server at a time migrates this home's database
            return self._start()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(compat.server_settings(self.database_url))
        env.update(self.settings)
        env["PREFECT_HOME"] = str(self.home)
        # The UI's own API address. Prefect 3 builds it from its *configured* port (4200), not
        # the --port given here, so its UI at any other port showed "Can't connect to Server
        # API at http://127.0.0.1:4200/api". The relative "/api" (Prefect 2's default) also
        # works through an SSH tunnel, where the browser's host is not the server's.
        if not (env.get("PREFECT_UI_API_URL") or env.get("PREFECT_SERVER_UI_API_URL")):
            env["PREFECT_UI_API_URL"] = "/api"
        return env

    def _start(self) -> PrefectServer:
        from . import server_workers  # it builds on this module

        for attempt in range(3):
            fixed = self.port if self._fixed_port else None
            port = fixed if fixed is not None else free_port(self.host)
            env = self._env()
            if server_workers.check(self.workers, self.database_url) > 1:
                self.support = server_workers.WorkerSupport(self.home, self.host,
                                                            self.start_timeout)
                env.update(self.support.prepare(env))
            argv = compat.server_command(self.host, port, self.workers)
            self.proc = (self.support.start(argv, self.log_path, env) if self.support
                         else shell.start_background(argv, self.log_path, env))
            self.port = port
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if healthy(self.api_url) and self.exited() is None:
                    return self
                if self.exited() is not None:
                    break
                time.sleep(0.3)
            gone = self.support.exited() if self.support else None
            self.stop()
            if gone:
                raise ServerError(f"the Prefect server did not start: {gone}")
            in_use = "address already in use" in self._log_tail().lower()
            if not self._fixed_port and attempt < 2 and in_use:
                continue
            break
        raise ServerError(
            f"the Prefect server did not become healthy at {self.api_url} within "
            f"{self.start_timeout:g} s. Last lines of {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def exited(self) -> str | None:
        """What of the server's processes stopped on its own, or None while all of them run."""
        if self.proc is None or self.proc.poll() is not None:
            code = self.proc.returncode if self.proc else "?"
            return (f"the Prefect server exited (code {code}). Last lines of {self.log_path}:\n"
                    f"{self._log_tail()}")
        return self.support.exited() if self.support else None

    def describe(self) -> str:
        """How the server runs, for its status line."""
        if self.support is None:
            return "one server process (API and services)"
        return f"{self.workers} API worker processes, {self.support.describe()}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            shell.kill_group(self.proc, grace=10)
        self.proc = None
        if self.support is not None:  # the services, then Redis: after the API that uses them
            self.support.stop()

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def start_lock(home: Path) -> Iterator[None]:
    """Held while a server starts from ``home`` (and runs its database migrations)."""
    with open(Path(home) / ".server-start.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:
            raise ServerError(f"cannot lock {fh.name} ({exc.strerror}): this filesystem has no "
                              "flock. Fix: set PREFECT_HOME to a local directory.") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_environment() -> Path:
    """The main job's defaults: ASKAP_FLOWS_HOME (./.askap_flows), and PREFECT_HOME under it, one
    per Prefect major (prefect2/, prefect3/: the two cannot share a database)."""
    from .mpi import HOME_ENV, askap_home

    home = askap_home()
    for name, value in ((HOME_ENV, str(home)),
                        ("PREFECT_HOME", str(home / f"prefect{compat.PREFECT_MAJOR}")),
                        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                        # ride out a database restart: the server answers 500 while it is away
                        # (the client already retries 429/502/503 and lost connections)
                        ("PREFECT_CLIENT_RETRY_EXTRA_CODES", "500")):
        if not os.environ.get(name):  # unset or empty
            os.environ[name] = value
    return home


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _client_settings(api_url: str) -> Iterator[None]:
    """PREFECT_API_URL for this process's Prefect client. Prefect reads its settings when it is
    first imported: a process that imported it before (a pipeline script's ``from prefect import
    flow``) also needs them in Prefect's settings context (its public ``temporary_settings``)."""
    os.environ["PREFECT_API_URL"] = api_url
    if "prefect" not in sys.modules:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


@contextlib.contextmanager
def prefect_server(max_concurrent: int = 2, *, say: Callable[[str], None] = _stderr,
                   on_start: Callable[[PrefectServer], None] | None = None) -> Iterator[str]:
    """The Prefect server of a pipeline, as the main job gets it; yields its API URL.

    With ``PREFECT_API_URL`` set, that server (and its database) must answer. Without it, a server
    on the configured database (sqlite under ``./.askap_flows/prefect<major>`` by default) is
    started for the length of the block, announced with its UI address, and stopped on exit.
    Use it before the first sub-flow runs, so that every process of the pipeline (SLURM jobs too)
    reports to this one server rather than to a temporary one of its own::

        with askap_flows.prefect_server(max_concurrent=2):
            pipeline()

    Raises database.DatabaseError or ServerError with the cause and the fix.
    """
    prepare_environment()
    given = os.environ.get("PREFECT_API_URL")
    plan = database.preflight(max_concurrent, api_url=given, say=say)
    if given:
        with _client_settings(given):
            yield given
        return
    say(f"starting a Prefect server for this run ({plan.describe()}) ...")
    server = PrefectServer(Path(os.environ["PREFECT_HOME"]), plan.url, settings=plan.server_env)
    if on_start is not None:
        on_start(server)
    server.start()
    say(f"Prefect UI for this run: {server.ui_url}  (stops when the run ends; set "
        "PREFECT_API_URL to use your own server)")
    try:
        with _client_settings(server.api_url):
            yield server.api_url
    finally:
        _flush_prefect_logs()
        server.stop()
        os.environ.pop("PREFECT_API_URL", None)


def _flush_prefect_logs() -> None:
    """Send the queued log lines to the API while it is still up (else they retry for a minute)."""
    if "prefect" not in sys.modules:
        return
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - logging must not turn a finished run into a failure
        pass
