"""A Prefect API server as a child process: started, checked healthy, stopped.

Dask workers in other processes (every SLURM worker) report their task runs to the Prefect API, so
a pipeline needs a real server whose URL is in ``PREFECT_API_URL``. When the user has none, the
main job starts one for the length of the run (and prints the UI's address).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from . import compat, shell
from .errors import AskapFlowsError
from .database import sqlite_url  # noqa: F401 - also re-exported here


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
                 start_timeout: float = 90.0, settings: Mapping[str, str] | None = None) -> None:
        """``settings``: extra environment of the server process, e.g. the pool settings of
        ``database.preflight(...).server_env``."""
        self.home = Path(prefect_home)
        self.database_url = database_url or sqlite_url(self.home)
        self.settings = dict(settings or {})
        self.host = host
        self.port = port
        self._fixed_port = port is not None
        self.log_path = Path(log_path or self.home / "server.log")
        self.start_timeout = start_timeout
        self.proc = None  # the server process (subprocess.Popen) while it runs

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            port = self.port if self._fixed_port else free_port(self.host)
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
            argv = compat.server_command(self.host, port)
            self.proc = shell.start_background(argv, self.log_path, env)
            self.port = port
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if healthy(self.api_url):
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.3)
            self.stop()
            if not self._fixed_port and attempt < 2 and "address already in use" in self._log_tail().lower():
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            shell.kill_group(self.proc, grace=10)
        self.proc = None

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
