"""``askap-flows server --workers N``: the API in N processes next to a private Redis and a
services process (Prefect 3, PostgreSQL), refused with the fix where that cannot work.

``unit`` tests need no service. The ``postgres`` ones start the server on a PostgreSQL of
scripts/postgres_database.sh (tests/test_database.py's fixtures), run the main job against it, look
at the server's process tree while it runs, and check that nothing of it is left after it stops.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

import test_database
from askap_flows import compat, database, server_cli, server_workers
from test_database import clean_env, cli, run_main

# tests/test_database.py's PostgreSQL fixtures, for this module too
pg_base = test_database.pg_base
postgres = test_database.postgres

PG_URL = "postgresql+asyncpg://prefect@127.0.0.1:1/prefect"  # nothing listens: never reached
needs_workers = pytest.mark.skipif(not compat.SERVER_WORKERS,
                                   reason="Prefect 2.20's server has no worker processes")


# =========================================================================== unit
@pytest.mark.unit
def test_prefect_cli_has_what_workers_use():
    """Prefect 3's `prefect server start` takes --workers and --no-services and has `prefect
    server services start`; 2.20's has no --workers (why it is refused there)."""
    def help_of(*args: str) -> str:
        r = subprocess.run(compat.prefect_command(*args, "--help"), capture_output=True,
                           text=True, env=clean_env(COLUMNS="200"), timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    start = help_of("server", "start")
    assert ("--workers" in start and "--no-services" in start) == compat.SERVER_WORKERS, start
    if compat.SERVER_WORKERS:
        assert "Start all enabled Prefect services in one process" in help_of(
            "server", "services", "start")


@pytest.mark.unit
def test_server_command_with_workers():
    assert compat.server_command("127.0.0.1", 4300, 3)[-9:] == [
        "server", "start", "--host", "127.0.0.1", "--port", "4300", "--workers", "3",
        "--no-services"]
    assert compat.server_command("127.0.0.1", 4300)[-2:] == ["--port", "4300"]


@pytest.mark.unit
def test_cli_server_workers_refusals_name_the_fix(tmp_path):
    url_file = tmp_path / "db-url"
    url_file.write_text(PG_URL)
    url_file.chmod(0o600)
    home = ["--home", str(tmp_path / "home")]
    r = cli("server", "--workers", "2", "--database-url-file", str(url_file), *home,
            env=clean_env(ASKAP_FLOWS_REDIS_SERVER="/nonexistent/redis-server"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    if not compat.SERVER_WORKERS:  # Prefect 2.20
        assert r.stderr.startswith(f"error: --workers 2: Prefect {compat.PREFECT_VERSION}'s "
                                   "server runs in one process"), r.stderr
        assert "Fix: install Prefect 3" in r.stderr and "--workers 1" in r.stderr
        return
    assert "no redis-server" not in r.stderr  # the variable given was named instead
    assert "ASKAP_FLOWS_REDIS_SERVER=/nonexistent/redis-server is not an executable" in r.stderr
    assert "apt-get install redis-server" in r.stderr and "--workers 1" in r.stderr
    r = cli("server", "--workers", "2", *home, env=clean_env(PREFECT_HOME=str(tmp_path)))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: --workers 2 needs PostgreSQL"), r.stderr
    assert "database is locked" in r.stderr and "postgres_database.sh start" in r.stderr
    assert not (tmp_path / "prefect.db").exists()  # refused before anything started
    r = cli("server", "--workers", "0", *home)
    assert r.returncode == 2 and "--workers must be a whole number >= 1" in r.stderr, r.stderr


@pytest.mark.unit
def test_pools_are_sized_per_worker_process():
    """N API processes and the services each have a pool: each serves its share of the
    sub-flows, and together they stay within the database's connections."""
    assert database.size_pool(8, workers=1) == database.size_pool(8)  # unchanged for one
    two = database.size_pool(200, 400, workers=2)
    assert two == database.PoolSettings(40, 40, 60.0, 10.0)
    assert 3 * (two.pool_size + two.max_overflow) <= 400 * 0.6
    small = database.size_pool(40, 100, workers=2)  # 20 sub-flows each, 60 connections for 3
    assert small == database.PoolSettings(10, 10, 60.0, 10.0)
    assert database.size_pool(40, 400, workers=4) == database.PoolSettings(15, 15, 60.0, 10.0)
    plan = database.Plan(url=PG_URL, server_env={}, pool=small, workers=2)
    assert plan.describe() == ("PostgreSQL 127.0.0.1:1/prefect, server pool 10+10 in each of 3 "
                               "processes")


@pytest.mark.unit
def test_url_file_says_how_many_workers():
    api = "http://10.0.0.5:4200/api"
    assert server_cli.url_file_text(api) == f"export PREFECT_API_URL={api}\n"
    assert server_cli.url_file_text(api, 2) == (
        f"export PREFECT_API_URL={api}\n"
        "# askap-flows server: 2 API worker processes, services, Redis\n")


SETTINGS_PROBE = """
import json
from prefect.settings import get_current_settings
from prefect_redis.client import RedisMessagingSettings
s = get_current_settings().server
r = RedisMessagingSettings()
print(json.dumps({"broker": s.events.messaging_broker, "cache": s.events.messaging_cache,
                  "ordering": s.events.causal_ordering, "leases": s.concurrency.lease_storage,
                  "docket": s.docket.url, "redis": [r.host, r.port, r.db, r.password]}))
"""


@pytest.mark.unit
@needs_workers
def test_prefect_reads_the_redis_settings():
    env = clean_env(**server_workers.redis_settings("127.0.0.9", 6399, "pw"))
    r = subprocess.run([sys.executable, "-c", SETTINGS_PROBE], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        "broker": "prefect_redis.messaging", "cache": "prefect_redis.messaging",
        "ordering": "prefect_redis.ordering", "leases": "prefect_redis.lease_storage",
        "docket": "redis://:pw@127.0.0.9:6399/1", "redis": ["127.0.0.9", 6399, 0, "pw"]}


# =========================================================================== PostgreSQL
def tree(pid: int) -> dict[str, list[psutil.Process]]:
    """The server command's processes by role."""
    roles: dict[str, list[psutil.Process]] = {"redis": [], "services": [], "api": [],
                                              "api-workers": []}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            args = " ".join(p.cmdline())
            if p.name().startswith("redis-server"):
                roles["redis"].append(p)
            elif "services start" in args:
                roles["services"].append(p)
            elif "server start" in args and "--workers" in args:
                roles["api"].append(p)
            elif "multiprocessing.spawn" in args:
                roles["api-workers"].append(p)
        except psutil.NoSuchProcess:
            pass
    return roles


def connected_to(p: psutil.Process, port: int) -> bool:
    return any(c.raddr and c.raddr.port == port for c in p.net_connections("tcp"))


def alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return left


def wait_for(what, seconds: float, message: str):
    deadline = time.monotonic() + seconds
    while not (got := what()):
        assert time.monotonic() < deadline, message
        time.sleep(0.5)
    return got


def start_server(pg, tmp_path: Path, db: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    pg.start(db)
    url_file = tmp_path / "db-url"
    url_file.write_text(pg.url(db))
    url_file.chmod(0o600)
    found = tmp_path / "server.env"
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.cli", "server", "--database-url-file", str(url_file),
         "--host", "127.0.0.1", "--port", "0", "--url-file", str(found), "--home",
         str(tmp_path / "home"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    return proc, found


@pytest.mark.postgres
@needs_workers
@pytest.mark.timeout(600)
def test_two_api_workers_serve_20_subflows_and_sigterm_leaves_nothing(postgres, hello_program,
                                                                     tmp_path):
    proc, found = start_server(postgres, tmp_path, f"workers{compat.PREFECT_MAJOR}",
                               "--workers", "2", "--max-concurrent", "20")
    everything: list[psutil.Process] = []
    try:
        first = proc.stdout.readline()
        assert first.startswith("Prefect UI: http://127.0.0.1:"), proc.stderr.read()
        lines = found.read_text().splitlines()
        assert lines[1] == "# askap-flows server: 2 API worker processes, services, Redis"
        api = lines[0].split("=", 1)[1]
        roles = tree(proc.pid)
        everything = [p for ps in roles.values() for p in ps]
        assert [len(roles[r]) for r in ("redis", "services", "api", "api-workers")] == [1, 1, 1, 2], roles
        redis_port = next(c.laddr.port for c in roles["redis"][0].net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN)
        r = run_main("--subflows", "20", "--max-concurrent", "8", "--ntasks", "1", "--json",
                     env=clean_env(PREFECT_API_URL=api), timeout=480)
        assert r.returncode == 0, r.stderr[-4000:]
        runs = json.loads(r.stdout)["subflows"]
        assert [s["state"] for s in runs] == ["completed"] * 20
        req = urllib.request.Request(f"{api}/flow_runs/count", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read()) >= 21  # the parent flow and its 20 sub-flows
        # every API process and the services talk to this server's Redis
        for p in roles["api-workers"] + roles["services"]:
            assert connected_to(p, redis_port), f"{p.pid} {p.cmdline()} not on Redis"
        assert [len(v) for v in tree(proc.pid).values()] == [1, 1, 1, 2]  # none restarted
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "2 API worker processes, services in their own process" in err
    assert "server pool 10+10 in each of 3 processes" in err and "server stopped" in err
    assert alive(everything) == [], "left running after SIGTERM"
    assert not found.exists(), "the URL file of a stopped server is left"


@pytest.mark.postgres
@needs_workers
@pytest.mark.timeout(300)
def test_prefect_server_with_workers_stops_everything(postgres, tmp_path):
    """The library's PrefectServer(workers=2): the first start migrated a fresh database (no
    worker failed its start-up on the block types), and stop() leaves none of its processes."""
    from askap_flows.server import PrefectServer

    db = f"wlib{compat.PREFECT_MAJOR}"
    url = postgres.start(db)
    server = PrefectServer(tmp_path / "home", url, workers=2).start()
    try:
        kids = psutil.Process(os.getpid()).children(recursive=True)
        ours = [p for p in kids if p.pid in {server.proc.pid, server.support.redis.pid,
                                            server.support.services.pid}]
        everything = ours + [c for p in ours for c in p.children(recursive=True)]
        assert len(everything) >= 6  # redis, services, API parent, 2 workers, resource tracker
        # Redis takes its password only (other users of the node reach its port too)
        assert not server_workers.redis_ping("127.0.0.1", server.support.redis_port, "wrong")
        log = server.log_path.read_text()
        assert "startup failed" not in log and "uq_block_type__slug" not in log, log[-3000:]
    finally:
        server.stop()
    assert alive(everything) == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0


@pytest.mark.postgres
@needs_workers
def test_a_dead_services_process_stops_the_server(postgres, tmp_path):
    """One part of a multi-worker server gone: the command stops the rest and says which."""
    proc, found = start_server(postgres, tmp_path, f"wdead{compat.PREFECT_MAJOR}",
                               "--workers", "2")
    try:
        assert proc.stdout.readline().startswith("Prefect UI:"), proc.stderr.read()
        roles = tree(proc.pid)
        everything = [p for ps in roles.values() for p in ps]
        roles["services"][0].kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "error: the Prefect services exited (code -9)" in err
    assert alive(everything) == []
    assert not found.exists()


@pytest.mark.postgres
@needs_workers
def test_sigkill_of_the_server_command_leaves_nothing(postgres, tmp_path):
    """A batch job's SIGKILL after KillWait: the reaper (reaper.py) sees the command die and stops
    the API (which stops its workers), the services and Redis, in that order."""
    proc, _ = start_server(postgres, tmp_path, f"wkill{compat.PREFECT_MAJOR}", "--workers", "2")
    try:
        assert proc.stdout.readline().startswith("Prefect UI:"), proc.stderr.read()
        everything = [p for ps in tree(proc.pid).values() for p in ps]
        assert len(everything) == 5
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    wait_for(lambda: not alive(everything), 60, f"left running: {alive(everything)}")
