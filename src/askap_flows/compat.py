"""Every difference between Prefect 2 (2.20.x) and Prefect 3 (3.x), and nothing else.

No other module checks Prefect's version. What is the same in both (flow/task decorators,
``flow.with_options(task_runner=...)``, ``task.submit()`` returning a future with a blocking
``.result()`` in a sync flow, ``prefect server start``, ``/api/health``) is used directly.
"""

from __future__ import annotations

import re
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

PREFECT_VERSION = version("prefect")
PREFECT_MAJOR = int(PREFECT_VERSION.split(".")[0])

#: Prefect's database URL, under the names the installed major reads (2.20: API_, 3.x: SERVER_,
#: which also accepts the 2.20 name). PREFECT_ORION_* is read by neither.
DATABASE_URL_VARS = (
    ("PREFECT_API_DATABASE_CONNECTION_URL",)
    if PREFECT_MAJOR < 3
    else ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
)
POOL_SIZE_VAR = (
    "PREFECT_SQLALCHEMY_POOL_SIZE" if PREFECT_MAJOR < 3
    else "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"
)
MAX_OVERFLOW_VAR = (
    "PREFECT_SQLALCHEMY_MAX_OVERFLOW" if PREFECT_MAJOR < 3
    else "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW"
)
POOL_TIMEOUT_VAR = None if PREFECT_MAJOR < 3 else "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_TIMEOUT"
LEGACY_PREFIX = "PREFECT_ORION_"
#: connection (connect) timeout of the server's database connections, seconds
CONNECT_TIMEOUT_VAR = (
    "PREFECT_API_DATABASE_CONNECTION_TIMEOUT" if PREFECT_MAJOR < 3
    else "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT"
)
#: what PREFECT_ORION_DATABASE_<X> is called now
LEGACY_DATABASE_RENAME = (
    "PREFECT_API_DATABASE_" if PREFECT_MAJOR < 3 else "PREFECT_SERVER_DATABASE_"
)
#: the server's defaults when none of the above is set (SQLAlchemy's 5/10/30 s; connect 5 s)
DEFAULT_POOL: dict[str, Any] = {
    "pool_size": 5, "max_overflow": 10, "pool_timeout": 30.0, "connect_timeout": 5.0}

#: sub-flows that may run at once in one process. Prefect 2 runs every flow run's engine on one
#: event-loop thread: 80 at once finished, 140 at once stalled with that thread at 100 % (0 of 140
#: in 860 s; benchmarks/README.md). Prefect 3 ran 200 at once.
MAX_CONCURRENT_SUBFLOWS = 80 if PREFECT_MAJOR < 3 else None

#: settings every server and client of askap_flows gets (offline sites: no telemetry errors)
QUIET_SETTINGS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


#: ``prefect server start --workers N``: the API in N processes, its services in another
#: (``prefect server services start``). Prefect 2.20's server is one process (no --workers).
SERVER_WORKERS = PREFECT_MAJOR >= 3
#: the server's "migrate the database when it starts" (False: migrated once, before N workers)
MIGRATE_ON_START_VAR = (
    "PREFECT_API_DATABASE_MIGRATE_ON_START" if PREFECT_MAJOR < 3
    else "PREFECT_SERVER_DATABASE_MIGRATE_ON_START"
)


def prefect_command(*args: str) -> list[str]:
    """The ``prefect`` CLI with this interpreter (2.20 has no ``python -m prefect``)."""
    return [sys.executable, "-c", "from prefect.cli import app; app()", *args]


def server_command(host: str, port: int, workers: int = 1) -> list[str]:
    """``prefect server start``; with ``workers`` > 1 (Prefect 3) its API alone, in that many
    processes."""
    argv = prefect_command("server", "start", "--host", host, "--port", str(port))
    if workers > 1:
        argv += ["--workers", str(workers), "--no-services"]
    return argv


def server_settings(database_url: str) -> dict[str, str]:
    """Environment for ``prefect server start`` against ``database_url``."""
    env = {name: database_url for name in DATABASE_URL_VARS}
    env.update(QUIET_SETTINGS)
    return env


def pool_settings(pool_size: int, max_overflow: int, pool_timeout: float,
                  connect_timeout: float) -> dict[str, str]:
    """The server-process environment for these pool settings, under the installed major's names.

    Prefect 2.20 has no pool-timeout setting (SQLAlchemy's 30 s applies): it is left out there.
    """
    env = {POOL_SIZE_VAR: str(pool_size), MAX_OVERFLOW_VAR: str(max_overflow),
           CONNECT_TIMEOUT_VAR: f"{connect_timeout:g}"}
    if POOL_TIMEOUT_VAR is not None:
        env[POOL_TIMEOUT_VAR] = f"{pool_timeout:g}"
    return env


def known_migrations(dialect: str) -> set[str]:
    """Alembic revisions of the installed Prefect's database schema ("postgresql" or "sqlite").

    A database whose revision is not among them was migrated by another Prefect version (2.20
    cannot start on a database that 3.x has migrated).
    """
    import importlib.util

    # located, not imported: importing Prefect before PREFECT_API_URL is set made Prefect 3 start
    # a temporary server of its own next to the run's
    sub = "migrations" if PREFECT_MAJOR < 3 else "_migrations"
    found_spec = importlib.util.find_spec("prefect")
    if found_spec is None or found_spec.origin is None:
        raise RuntimeError("askap_flows cannot locate the prefect package in this Python: install "
                           "it (pip install -c package_list.txt askap-flows).")
    package = Path(found_spec.origin).parent
    folder = package / "server" / "database" / sub / "versions" / dialect
    found = set()
    for path in folder.glob("*.py"):
        m = re.search(r'^revision\s*=\s*["\']([0-9a-f]+)["\']', path.read_text(), re.M)
        if m:
            found.add(m.group(1))
    if not found:  # Prefect moved its migrations: refusing every database would be the result
        raise RuntimeError(
            f"askap_flows found no {dialect} migrations of Prefect {PREFECT_VERSION} in {folder}: "
            "this Prefect version keeps them elsewhere, so the database's version cannot be "
            "checked. Use a Prefect version of package_list.txt, or report it to askap_flows "
            "(compat.known_migrations).")
    return found


def current_dask_client():
    """The Dask client of the task runner of the flow run this is called from (None: not a
    flow run on a prefect-dask ``DaskTaskRunner``).

    Prefect 3 creates the cluster lazily here (first access of ``client``); Prefect 2 started it
    when the flow run began.
    """
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    ctx = FlowRunContext.get()
    if ctx is None or not isinstance(ctx.task_runner, DaskTaskRunner):
        return None  # no flow run, or Prefect's default task runner: no Dask
    runner: Any = ctx.task_runner
    if PREFECT_MAJOR >= 3:
        return runner.client
    # prefect-dask 0.2 has no public accessor; tests/test_compat.py pins this attribute
    return runner._client


def current_flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None


def future_done(future, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a task future; True once it has finished (either way)."""
    if PREFECT_MAJOR >= 3:
        future.wait(timeout=timeout)
        return future.wrapped_future.done()
    return future.wait(timeout=timeout) is not None


def cancel_future(future) -> None:
    """Cancel the Dask future behind a task future whose worker is gone (its job ended): it would
    stay pending forever, and Prefect 2 waits for every task future before a flow run ends."""
    if PREFECT_MAJOR >= 3:
        future.wrapped_future.cancel()
        return
    # prefect-dask 0.2 has no public accessor; tests/test_compat.py pins this method. It knows
    # a task's Dask future once Prefect's event loop has submitted it (a moment after .submit())
    deadline = time.monotonic() + 10
    while True:
        try:
            future._task_runner._get_dask_future(future.key).cancel()
            return
        except KeyError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"task future {future.key} never reached Dask: cannot cancel it") from None
            time.sleep(0.05)


#: what sets Prefect 3's flow run heartbeat (a user's choice, which the pool then keeps)
HEARTBEAT_VARS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")
_quiet_settings: dict[int, tuple[Any, Any]] = {}  # id(settings) -> (settings, its copy without)


def without_flow_heartbeat(env=None):
    """A context in which the flow runs started in this thread send no heartbeat (Prefect 3).

    Prefect 3.9 gives every flow run, sub-flows too, a heartbeat thread (every 180 s by default)
    and joins it when the run ends; the thread looks at its stop flag once a second, so every
    flow run's end waits 0.5 s on average (1 s at most). Pooled steps (seconds each) turn it off
    unless the user set the frequency (HEARTBEAT_VARS); the flow run that opens the pool keeps
    its own. The settings without it are made once per settings object: a copy re-reads the
    environment and Prefect's files (``temporary_settings`` per step cost as much CPU as
    creating the step's flow run). Prefect 2 has no such heartbeat: nothing to do."""
    import contextlib
    import os

    env = os.environ if env is None else env
    if PREFECT_MAJOR < 3 or any(env.get(v) for v in HEARTBEAT_VARS):
        return contextlib.nullcontext()
    # (the ignores: Prefect 2 has neither; only Prefect 3 gets here)
    from prefect.context import SettingsContext, get_settings_context
    try:
        from prefect.settings import (  # type: ignore[attr-defined, unused-ignore]
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        )
    except ImportError:  # a Prefect 3 from before flow run heartbeats: nothing to turn off
        return contextlib.nullcontext()

    ctx = get_settings_context()
    flows = getattr(ctx.settings, "flows", None)
    if "heartbeat_frequency" in getattr(flows, "model_fields_set", ()):
        return contextlib.nullcontext()  # the user set it (a profile, prefect.toml, .env)
    cached = _quiet_settings.get(id(ctx.settings))
    if cached is None or cached[0] is not ctx.settings:
        quiet = ctx.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
        if len(_quiet_settings) > 8:
            _quiet_settings.clear()
        cached = _quiet_settings[id(ctx.settings)] = (ctx.settings, quiet)
    return SettingsContext(  # type: ignore[call-arg, unused-ignore]
        profile=ctx.profile, settings=cached[1])
