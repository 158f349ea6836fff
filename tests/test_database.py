"""askap_flows.database: URLs, pool sizing, the checks before a run, and a PostgreSQL-backed server.

``unit`` tests need no service. ``postgres`` tests start a real PostgreSQL with
scripts/postgres_database.sh on 127.0.0.2 (a free port, a 0755 directory under /tmp), and the
ones that also carry ``mpi`` run the main job against a Prefect server on it. Nothing here contacts
an address outside 127.0.0.0/8.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from askap_flows import compat, database, database_reach, database_url
from askap_flows.database_url import DatabaseError
from conftest import ROOT, _missing

PG_SCRIPT = ROOT / "scripts" / "postgres_database.sh"
ADDRESS = "127.0.0.2"
#: concurrency bound of the 140-sub-flow test, measured on this 2-core machine (140 sub-flows,
#: each with its own LocalCluster and mpiexec -n 1, PostgreSQL-backed server): K=4 140 s,
#: K=8 112-119 s, K=16 108-112 s on both majors, 0 failures. 8 is where the wall time flattens.
BOUND = 8
#: CPython < 3.11.9 can deadlock when several threads call sys._current_frames() at once
#: (python/cpython#106883); every in-process Dask worker's profiler does that every 10 ms.


def free_port(host: str = ADDRESS) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect's database settings (and with ``extra``)."""
    env = {k: v for k, v in os.environ.items()
           if k not in compat.DATABASE_URL_VARS and not k.startswith(compat.LEGACY_PREFIX)}
    env.update(extra)
    return env


# =========================================================================== unit
@pytest.mark.unit
def test_postgres_url_is_quoted_and_parses_back():
    url = database_url.postgres_url("127.0.0.2", 5999, "pre fect", "p@ss w/rd:'x", "my db")
    assert url == ("postgresql+asyncpg://pre%20fect:p%40ss%20w%2Frd%3A%27x@127.0.0.2:5999/my%20db")
    db = database_url.parse_url(url)
    assert (db.dialect, db.host, db.port, db.user, db.password, db.database) == (
        "postgresql", "127.0.0.2", 5999, "pre fect", "p@ss w/rd:'x", "my db")
    assert database_url.redact(url) == "postgresql+asyncpg://pre%20fect:***@127.0.0.2:5999/my%20db"
    assert "p%40ss" not in repr(db)
    assert database_url.parse_url("postgresql+asyncpg://u@h/d").port == 5432


@pytest.mark.unit
def test_bad_urls_say_what_prefect_needs():
    with pytest.raises(DatabaseError, match=r"asyncpg driver.*postgresql\+asyncpg://"):
        database_url.parse_url("postgresql://u:p@h:5432/d")
    with pytest.raises(DatabaseError, match="unsupported database URL scheme 'mysql'"):
        database_url.parse_url("mysql://u:secret@h/d")
    with pytest.raises(DatabaseError, match="not a database URL") as err:
        database_url.parse_url("127.0.0.1:5432")
    with pytest.raises(DatabaseError, match="has no host"):
        database_url.parse_url("postgresql+asyncpg:///prefect")
    assert "secret" not in str(err.value)


@pytest.mark.unit
def test_sqlite_url_and_the_configured_url(tmp_path):
    assert database_url.sqlite_url(tmp_path) == f"sqlite+aiosqlite:///{tmp_path}/prefect.db"
    db = database_url.parse_url(database_url.sqlite_url(tmp_path))
    assert db.is_sqlite and db.database == f"{tmp_path}/prefect.db"
    url, source = database_url.configured_url({"PREFECT_HOME": str(tmp_path)})
    assert url == database_url.sqlite_url(tmp_path) and "sqlite" in source
    pg = "postgresql+asyncpg://prefect:pw@127.0.0.2:5999/prefect"
    for name in compat.DATABASE_URL_VARS:  # every name the installed major reads
        assert database_url.configured_url({"PREFECT_HOME": str(tmp_path), name: pg}) == (pg, name)
    # Like Prefect itself, the legacy name is not read (preflight warns about it instead).
    url, _ = database_url.configured_url({"PREFECT_HOME": str(tmp_path),
                                      "PREFECT_ORION_DATABASE_CONNECTION_URL": pg})
    assert url.startswith("sqlite")


@pytest.mark.unit
def test_pool_sizing_numbers():
    assert database.size_pool(1) == database.PoolSettings(6, 10, 60.0, 10.0)
    assert database.size_pool(BOUND) == database.PoolSettings(13, 13, 60.0, 10.0)
    assert database.size_pool(140) == database.PoolSettings(30, 30, 60.0, 10.0)  # 60 of 100
    assert database.size_pool(140, max_connections=300) == database.PoolSettings(40, 40, 60.0, 10.0)
    assert database.DEFAULT_POOL == database.PoolSettings(5, 10, 30.0, 5.0)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="max_concurrent"):
            database.size_pool(bad)


@pytest.mark.unit
def test_pool_settings_use_the_installed_majors_names():
    env = database.size_pool(BOUND).env()
    if compat.PREFECT_MAJOR >= 3:
        assert env == {"PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "13",
                       "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "13",
                       "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_TIMEOUT": "60",
                       "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "10"}
    else:  # 2.20 has no pool-timeout setting
        assert env == {"PREFECT_SQLALCHEMY_POOL_SIZE": "13",
                       "PREFECT_SQLALCHEMY_MAX_OVERFLOW": "13",
                       "PREFECT_API_DATABASE_CONNECTION_TIMEOUT": "10"}


ENGINE_PROBE = """
import asyncio, json
from prefect.server.database.configurations import AsyncPostgresConfiguration

async def main():
    engine = await AsyncPostgresConfiguration(
        connection_url="postgresql+asyncpg://u:p@127.0.0.2:9/none").engine()
    pool = engine.pool
    print(json.dumps({"size": pool.size(), "overflow": pool._max_overflow,
                      "timeout": pool._timeout}))
asyncio.run(main())
"""


@pytest.mark.unit
def test_prefect_reads_the_pool_settings():
    """Prefect's own engine (built in a fresh process, as the server does) takes the settings."""
    def probe(extra: dict[str, str]) -> dict:
        env = {k: v for k, v in clean_env(**extra).items() if "SQLALCHEMY" not in k}
        env.update(extra)
        r = subprocess.run([sys.executable, "-c", ENGINE_PROBE], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    default = probe({})
    assert (default["size"], default["overflow"]) == (5, 10)
    got = probe(database.size_pool(140).env())
    assert (got["size"], got["overflow"]) == (30, 30)
    if compat.POOL_TIMEOUT_VAR:
        assert got["timeout"] == 60


@pytest.mark.unit
def test_legacy_orion_variables_get_a_loud_warning(tmp_path):
    said = []
    env = {"PREFECT_HOME": str(tmp_path), "PREFECT_ORION_DATABASE_CONNECTION_URL": "x",
           "PREFECT_ORION_API_HOST": "127.0.0.1"}
    database.preflight(1, env=env, say=said.append)
    text = "\n".join(said)
    assert "WARNING" in text and "IGNORES" in text and "!!!" in text
    assert "PREFECT_ORION_DATABASE_CONNECTION_URL" in text and "PREFECT_ORION_API_HOST" in text
    assert f"{compat.LEGACY_DATABASE_RENAME}CONNECTION_URL" in text  # the name to use instead
    assert "falls back to sqlite" in text
    said.clear()
    database.preflight(1, env={"PREFECT_HOME": str(tmp_path)}, say=said.append)
    assert said == []


@pytest.mark.unit
def test_sqlite_refuses_high_concurrency(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path)}
    plan = database.preflight(database.SQLITE_MAX_CONCURRENT, env=env)
    assert plan.url == database_url.sqlite_url(tmp_path) and plan.server_env == {}
    with pytest.raises(DatabaseError) as err:
        database.preflight(database.SQLITE_MAX_CONCURRENT + 1, env=env)
    msg = str(err.value)
    assert database.SQLITE_MAX_CONCURRENT == 8  # measured: docs/database.md
    for part in ("refusing to run 9 concurrent sub-flows against sqlite", "503",
                 "scripts/postgres_database.sh start", "--max-concurrent 8",
                 "ASKAP_FLOWS_SQLITE_MAX_CONCURRENT=9", "lost a run at 32"):
        assert part in msg, msg
    database.preflight(40, env={**env, database.SQLITE_LIMIT_ENV: "40"})  # explicit override
    with pytest.raises(DatabaseError, match="not a whole number"):
        database.preflight(1, env={**env, database.SQLITE_LIMIT_ENV: "many"})


@pytest.mark.unit
def test_sqlite_in_an_unwritable_place(tmp_path):
    if os.geteuid() == 0:
        url = "sqlite+aiosqlite:////proc/askap/prefect.db"  # even root cannot create it there
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        url = database_url.sqlite_url(locked / "home")
    with pytest.raises(DatabaseError, match="cannot be written.*PREFECT_HOME"):
        database_reach.check_reachable(url)


@pytest.mark.unit
def test_a_database_of_another_prefect_version_is_refused(tmp_path):
    path = tmp_path / "prefect.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.execute("INSERT INTO alembic_version VALUES ('ffffffffffff')")
    before = path.read_bytes()
    with pytest.raises(DatabaseError) as err:
        database_reach.check_reachable(f"sqlite+aiosqlite:///{path}")
    assert "migrated by another Prefect version" in str(err.value)
    assert "ffffffffffff" in str(err.value) and compat.PREFECT_VERSION in str(err.value)
    assert path.read_bytes() == before  # untouched
    known = sorted(compat.known_migrations("sqlite"))[0]
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (known,))
    database_reach.check_reachable(f"sqlite+aiosqlite:///{path}")


@pytest.mark.unit
def test_unreachable_database_names_cause_and_fix():
    port = free_port()  # nothing listens there
    url = database_url.postgres_url(ADDRESS, port, "prefect", "pw")
    started = time.monotonic()
    with pytest.raises(DatabaseError) as err:
        database_reach.check_reachable(url, timeout=30)
    assert time.monotonic() - started < 15  # refused at once: the 30-s timeout was not waited out
    msg = str(err.value)
    assert f"cannot reach PostgreSQL at {ADDRESS}:{port}: connection refused" in msg
    assert "Is the database server up?" in msg
    assert "scripts/postgres_database.sh status" in msg
    assert "pw" not in msg.replace("postgres", "")


@pytest.mark.unit
def test_a_database_that_does_not_answer_times_out_clearly():
    with socket.socket() as silent:  # accepts TCP connections, never says a word
        silent.bind((ADDRESS, 0))
        silent.listen(8)
        url = database_url.postgres_url(ADDRESS, silent.getsockname()[1], "prefect", "pw")
        started = time.monotonic()
        with pytest.raises(DatabaseError, match=r"no answer from PostgreSQL .* within 1 s"):
            database_reach.check_reachable(url, timeout=1)
        assert time.monotonic() - started < 10


@pytest.mark.unit
def test_a_prefect_server_that_does_not_answer():
    with pytest.raises(DatabaseError, match="no Prefect server answers at PREFECT_API_URL"):
        database.preflight(1, api_url=f"http://127.0.0.1:{free_port('127.0.0.1')}/api")


@pytest.mark.unit
def test_check_reachable_works_inside_an_event_loop():
    import asyncio

    async def inside():
        with pytest.raises(DatabaseError, match="connection refused"):
            database_reach.check_reachable(database_url.postgres_url(ADDRESS, free_port(), "u", "p"))

    asyncio.run(inside())


@pytest.mark.unit
def test_interface_address_reads_the_interface():
    assert database.interface_address("lo") == "127.0.0.1"
    with pytest.raises(DatabaseError, match="interface 'nosuchif0' does not exist on this host.*lo"):
        database.interface_address("nosuchif0")


def run_main(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``python -m askap_flows.run`` with exactly ``env`` (conftest's run_main adds os.environ)."""
    return subprocess.run([sys.executable, "-m", "askap_flows.run", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def cli(*args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "askap_flows.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or clean_env())


@pytest.mark.unit
def test_cli_db_url(tmp_path):
    pwfile = tmp_path / "password"
    pwfile.write_text("s3cret/@\n")
    r = cli("db", "url", "--host", ADDRESS, "--port", "5999", "--password-file", str(pwfile),
            "--export")
    assert r.returncode == 0, r.stderr
    url = "postgresql+asyncpg://prefect:s3cret%2F%40@127.0.0.2:5999/prefect"
    assert r.stdout.split("\n")[:-1] == [f"export {n}={url}" for n in compat.DATABASE_URL_VARS]
    r = cli("db", "url", env=clean_env(**{compat.DATABASE_URL_VARS[0]: url}))
    assert r.stdout.strip() == "postgresql+asyncpg://prefect:***@127.0.0.2:5999/prefect"
    assert compat.DATABASE_URL_VARS[0] in r.stderr
    r = cli("db", "url", env=clean_env(PREFECT_HOME=str(tmp_path)))
    assert r.stdout.strip() == database_url.sqlite_url(tmp_path)


@pytest.mark.unit
def test_cli_db_check_refuses_sqlite_and_names_the_fix(tmp_path):
    r = cli("db", "check", "--max-concurrent", "16", env=clean_env(PREFECT_HOME=str(tmp_path)))
    assert r.returncode == 2 and r.stderr.startswith("error: refusing to run 16")
    assert "Traceback" not in r.stderr
    r = cli("db", "check", "--max-concurrent", "2", env=clean_env(PREFECT_HOME=str(tmp_path)))
    assert r.returncode == 0 and r.stdout.startswith("ok: sqlite"), r.stderr


@pytest.mark.unit
def test_cli_server_keeps_database_passwords_off_command_lines(tmp_path):
    """A password given with --database-url is in ps for every user of a login node: refused,
    with the fix; a URL file readable by others is refused too. Nothing prints the password."""
    url = "postgresql+asyncpg://prefect:S3cretPW@127.0.0.1:1/prefect"
    r = cli("server", "--database-url", url, "--home", str(tmp_path), env=clean_env())
    assert r.returncode == 2 and "--database-url-file FILE" in r.stderr, r.stderr
    assert " ps" in r.stderr and "S3cretPW" not in r.stdout + r.stderr
    url_file = tmp_path / "db-url"
    url_file.write_text(url)
    url_file.chmod(0o644)
    r = cli("server", "--database-url-file", str(url_file), "--home", str(tmp_path), env=clean_env())
    assert r.returncode == 2 and f"chmod 600 {url_file}" in r.stderr, r.stderr
    assert "S3cretPW" not in r.stdout + r.stderr
    url_file.chmod(0o600)  # accepted: the next complaint is the unreachable database, redacted
    r = cli("server", "--database-url-file", str(url_file), "--home", str(tmp_path), env=clean_env())
    assert r.returncode == 2 and "connection refused" in r.stderr, r.stderr
    assert "S3cretPW" not in r.stdout + r.stderr


@pytest.mark.unit
def test_cli_server_with_a_taken_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("server", "--host", "127.0.0.1", "--port", str(port), "--home", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert r.stdout == ""


@pytest.mark.unit
def test_main_job_refuses_sqlite_before_anything_starts(tmp_path):
    r = run_main("--subflows", "9", "--max-concurrent", "9", "--program", "/bin/true",
                 env=clean_env(PREFECT_API_URL="", PREFECT_HOME=str(tmp_path / "prefect"),
                               ASKAP_FLOWS_HOME=str(tmp_path / "home")), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "refusing to run 9 concurrent sub-flows against sqlite" in r.stderr
    assert "Prefect UI" not in r.stderr and "running 9 sub-flow" not in r.stderr
    assert not (tmp_path / "prefect" / "prefect.db").exists()


# =========================================================================== PostgreSQL
def pg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ASKAP_PG_", "PREFECT_", "PG"))}
    return subprocess.run(["bash", str(PG_SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


class Postgres:
    """A PostgreSQL of scripts/postgres_database.sh on 127.0.0.2, in a directory of its own."""

    def __init__(self, base: Path, name: str) -> None:
        self.dir = base / name
        self.port = free_port()

    def start(self, db: str = "prefect") -> str:
        r = pg("start", "--dir", str(self.dir), "--address", ADDRESS, "--port", str(self.port),
               "--db", db)
        assert r.returncode == 0, r.stderr
        return self.url(db)

    def url(self, db: str = "prefect", password: str | None = None) -> str:
        password = password or (self.dir / "password").read_text().strip()
        return database_url.postgres_url(ADDRESS, self.port, "prefect", password, db)

    def stop(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            pg("stop", "--dir", str(self.dir))


@pytest.fixture(scope="module")
def pg_base():
    if shutil.which("pg_ctl") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        _missing("PostgreSQL binaries not found: apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="askap_dbtest_", dir="/tmp"))
    base.chmod(0o755)  # as root, the server runs as user postgres, which must traverse it
    servers: list[Postgres] = []
    yield base, servers
    for s in servers:
        s.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres(pg_base):
    base, servers = pg_base
    server = Postgres(base, "main")
    servers.append(server)
    server.start(f"prefect{compat.PREFECT_MAJOR}")
    return server


@pytest.mark.postgres
def test_reachable_database_and_its_plan(postgres):
    url = postgres.url(f"prefect{compat.PREFECT_MAJOR}")
    database_reach.check_reachable(url)
    plan = database.preflight(BOUND, database_url=url, env=clean_env())
    assert plan.url == url and plan.pool == database.size_pool(BOUND)
    assert plan.server_env == database.size_pool(BOUND).env()
    assert f"PostgreSQL {ADDRESS}:{postgres.port}/" in plan.describe()


@pytest.mark.postgres
def test_wrong_password_message(postgres):
    url = postgres.url(f"prefect{compat.PREFECT_MAJOR}", password="not-the-password")
    with pytest.raises(DatabaseError) as err:
        database_reach.check_reachable(url)
    msg = str(err.value)
    assert f"PostgreSQL at {ADDRESS}:{postgres.port} refused the login of user 'prefect'" in msg
    assert "password authentication failed" in msg and "password in the database URL is wrong" in msg
    assert "postgres_database.sh url" in msg and "not-the-password" not in msg


@pytest.mark.postgres
def test_missing_database_message(postgres):
    with pytest.raises(DatabaseError) as err:
        database_reach.check_reachable(postgres.url("no_such_db"))
    msg = str(err.value)
    assert "the database 'no_such_db' does not exist" in msg
    assert "postgres_database.sh start --db no_such_db" in msg


@pytest.mark.postgres
def test_cli_server_runs_in_the_foreground(postgres, tmp_path):
    db = f"cli{compat.PREFECT_MAJOR}"
    postgres.start(db)
    port = free_port("127.0.0.1")
    url_file = tmp_path / "db-url"
    url_file.write_text(postgres.url(db))
    url_file.chmod(0o600)
    password = (postgres.dir / "password").read_text().strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.cli", "server", "--database-url-file", str(url_file),
         "--host", "127.0.0.1", "--port", str(port), "--max-concurrent", "12", "--home",
         str(tmp_path / "home")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert password not in ps  # the server's command lines never show it
        assert lines == [f"Prefect UI: http://127.0.0.1:{port}/\n",
                         f"export PREFECT_API_URL=http://127.0.0.1:{port}/api\n"], proc.stderr.read()
        database_reach.check_server(f"http://127.0.0.1:{port}/api")  # its database answers too
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200  # the UI
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1  # the server process, with the sized pool in its environment
        environ = Path(f"/proc/{children[0]}/environ").read_text().split("\0")
        for name, value in database.size_pool(12).env().items():
            assert f"{name}={value}" in environ
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert password not in "".join(lines) + out + err
    assert "server stopped" in err and "reachable from this node only" in err
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server is gone


@pytest.mark.postgres
def test_cli_server_url_file_any_port_and_a_pool_for_hundreds_of_subflows(postgres, tmp_path):
    """A services job's server: --port 0 takes a free port, --url-file tells the pipeline job
    where (written once it answers, gone once it stops), and --max-connections lets the pool grow
    for 200 sub-flows (40+40 within 400 connections, not 30+30 within PostgreSQL's default 100)."""
    db = f"svc{compat.PREFECT_MAJOR}"
    postgres.start(db)
    url_file = tmp_path / "db-url"
    url_file.write_text(postgres.url(db))
    url_file.chmod(0o600)
    found = tmp_path / "shared" / "server.env"
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.cli", "server", "--database-url-file", str(url_file),
         "--host", "127.0.0.1", "--port", "0", "--max-concurrent", "200", "--max-connections",
         "400", "--url-file", str(found), "--home", str(tmp_path / "home")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        proc.stdout.readline()  # "Prefect UI: ..." once it answers
        text = found.read_text()
        assert text.startswith("export PREFECT_API_URL=http://127.0.0.1:") and ":0/" not in text
        api = text.split("=", 1)[1].strip()
        database_reach.check_server(api)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        environ = Path(f"/proc/{children[0]}/environ").read_text().split("\0")
        assert database.size_pool(200, 400).pool_size == 40
        for name, value in database.size_pool(200, 400).env().items():
            assert f"{name}={value}" in environ
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not found.exists(), "the URL file of a stopped server is left"


@pytest.mark.unit
def test_cli_server_refuses_a_bad_max_connections(tmp_path):
    r = cli("server", "--max-connections", "0", "--home", str(tmp_path), env=clean_env())
    assert r.returncode == 2 and "--max-connections must be a whole number >= 1" in r.stderr


def subflow_runs(api_url: str, flow_name: str) -> tuple[list[dict], list[dict]]:
    """The runs of the flow ``flow_name`` and of all sub-flows of those runs, from the REST API."""
    def post(path: str, body: dict) -> list[dict]:
        req = urllib.request.Request(f"{api_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    parents = post("/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}, "limit": 50})
    children: list[dict] = []
    while True:  # the server caps a page at 200
        page = post("/flow_runs/filter", {
            "flow_runs": {"parent_flow_run_id": {"any_": [p["id"] for p in parents]}},
            "limit": 200, "offset": len(children), "sort": "ID_DESC"})
        children += page
        if len(page) < 200:
            return parents, children


@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_140_subflows_against_a_postgres_backed_server(postgres, hello_program, tmp_path):
    from askap_flows.server import PrefectServer

    db = f"run140_{compat.PREFECT_MAJOR}"
    url = postgres.start(db)
    plan = database.preflight(BOUND, database_url=url, env=clean_env())
    with PrefectServer(tmp_path / "prefect", plan.url, settings=plan.server_env) as server:
        started = time.monotonic()
        r = run_main("--subflows", "140", "--max-concurrent", str(BOUND), "--ntasks", "1",
                     "--json", env=clean_env(PREFECT_API_URL=server.api_url),
                     timeout=800)
        wall = time.monotonic() - started
        assert r.returncode == 0, r.stderr[-4000:]
        data = json.loads(r.stdout)
        assert data["failed"] == 0
        assert [s["state"] for s in data["subflows"]] == ["completed"] * 140
        # each sub-flow's own cluster had its own dashboard port
        assert len({s["dashboard"].split(":")[2] for s in data["subflows"]}) == 140
        print(f"140 sub-flows, at most {BOUND} at once: {wall:.1f} s")

        parents, children = subflow_runs(server.api_url, "askap-pipeline")
    assert len(parents) == 1 and parents[0]["state_type"] == "COMPLETED"
    assert len(children) == 140
    assert {c["state_type"] for c in children} == {"COMPLETED"}
    assert {c["state_name"] for c in children} == {"Completed"}
    assert sorted(c["name"] for c in children) == sorted(f"mpi-{i}" for i in range(140))
    assert all(c["parent_task_run_id"] for c in children)


@pytest.mark.postgres
def test_main_job_starts_its_own_server_on_postgres(postgres, hello_program, tmp_path):
    db = f"own{compat.PREFECT_MAJOR}"
    url = postgres.start(db)
    env = clean_env(PREFECT_API_URL="", PREFECT_HOME=str(tmp_path / "prefect"),
                    **{compat.DATABASE_URL_VARS[0]: url})
    r = run_main("--subflows", "2", "--max-concurrent", "2", "--ntasks", "1", env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"starting a Prefect server for this run (PostgreSQL {ADDRESS}:{postgres.port}/{db}, "
            "server pool 7+10)") in r.stderr
    assert "2 completed, 0 failed" in r.stdout
    assert not (tmp_path / "prefect" / "prefect.db").exists()  # sqlite was not used


@pytest.mark.postgres
def test_a_database_that_went_away_stops_the_run_before_it_starts(pg_base, hello_program,
                                                                  tmp_path):
    from askap_flows.server import PrefectServer

    base, servers = pg_base
    gone = Postgres(base, "gone")
    servers.append(gone)
    url = gone.start(f"prefect{compat.PREFECT_MAJOR}")
    server = PrefectServer(tmp_path / "prefect", url).start()
    try:
        gone.stop()  # the database goes away under a running Prefect server
        # 1. the run uses that server: it answers, its database does not
        r = run_main("--subflows", "2", env=clean_env(PREFECT_API_URL=server.api_url),
                     timeout=300)
        assert r.returncode == 2, r.stderr[-3000:]
        assert (f"the Prefect server at {server.api_url} answers, but its database does not "
                "(HTTP 503: Database is not available)") in r.stderr
        assert "running 2 sub-flow" not in r.stderr and "mpi-0" not in r.stdout + r.stderr
    finally:
        server.stop()
    # 2. the run would start its own server on that database
    r = run_main("--subflows", "2", env=clean_env(PREFECT_API_URL="",
                                                  PREFECT_HOME=str(tmp_path / "own"),
                                                  **{compat.DATABASE_URL_VARS[0]: url}),
                 timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert re.search(rf"cannot reach PostgreSQL at {re.escape(ADDRESS)}:{gone.port}: connection "
                     "refused", r.stderr)
    assert "scripts/postgres_database.sh status" in r.stderr
    assert "starting a Prefect server" not in r.stderr and "running 2 sub-flow" not in r.stderr
