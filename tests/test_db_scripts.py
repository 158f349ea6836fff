"""Tests of scripts/prefect_env.sh and scripts/postgres_database.sh.

``unit`` tests need bash (bash -n and shellcheck of every script: test_scripts.py); ``postgres`` tests start a real PostgreSQL
server listening on 127.0.0.2 (Linux routes all of 127.0.0.0/8 to ``lo``). No test
contacts an address outside 127.0.0.0/8: every call passes ``--address 127.0.0.2``.

A missing tool skips a test, except with ``CI=true``, where it fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from askap_flows.compat import PREFECT_MAJOR

ROOT = Path(__file__).resolve().parents[1]
PG_SCRIPT = ROOT / "scripts" / "postgres_database.sh"
ENV_SCRIPT = ROOT / "scripts" / "prefect_env.sh"
ADDRESS = "127.0.0.2"
IN_CI = os.environ.get("CI", "").lower() == "true"
IS_ROOT = os.geteuid() == 0


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} (CI=true: a missing tool is a failure, not a skip)")
    pytest.skip(what)


def require(binary: str) -> str:
    path = shutil.which(binary)
    if not path:
        _missing(f"'{binary}' is not on PATH")
    return path  # type: ignore[return-value]


def pg_bindir() -> str:
    """The directory of the PostgreSQL server binaries, as the script finds them."""
    if os.environ.get("ASKAP_PG_BINDIR"):
        return os.environ["ASKAP_PG_BINDIR"]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return str(Path(pg_ctl).resolve().parent)
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    for d in reversed(dirs):
        if os.access(f"{d}/pg_ctl", os.X_OK):
            return d
    _missing("no PostgreSQL server binaries (apt-get install postgresql)")
    return ""


def psql_path() -> str:
    local = Path(pg_bindir()) / "psql"
    if local.exists():
        return str(local)
    return require("psql")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without settings that would steer the scripts."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ASKAP_PG_", "ASKAP_FLOWS_", "PREFECT_", "PG"))
    }
    env.update(extra)
    return env


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        env=env if env is not None else clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(str(PG_SCRIPT), *args, env=env)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ADDRESS, 0))
        return s.getsockname()[1]


def exports(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            out[name] = value
    return out


def can_run_as_nobody() -> bool:
    if not IS_ROOT:
        return False
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return shutil.which("runuser") is not None


# ------------------------------------------------------------------------------------ static


@pytest.mark.unit
def test_help_texts() -> None:
    res = pg("--help")
    assert res.returncode == 0
    for word in ("start", "stop", "status", "url", "--address", "--interface", "ASKAP_PG_IMAGE"):
        assert word in res.stdout
    res = run("bash", ENV_SCRIPT, "--help")
    assert res.returncode == 0
    assert "source scripts/prefect_env.sh" in res.stdout
    res = run("bash", "-c", f"source {ENV_SCRIPT} --help; echo rc=$?")
    assert "Usage" in res.stdout and "rc=0" in res.stdout


# ------------------------------------------------------------------------------ prefect_env.sh


def source_env(script_body: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return run("bash", "-c", script_body, env=clean_env(**extra), cwd=cwd)


@pytest.mark.unit
def test_prefect_env_sets_variables(tmp_path: Path) -> None:
    target = tmp_path / "my project"  # a space, to check the quoting
    res = source_env(f'source "{ENV_SCRIPT}" "{target}" && env', cwd=tmp_path,
                     PYTHON=sys.executable)
    assert res.returncode == 0, res.stderr
    env = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    home = target / f"prefect{PREFECT_MAJOR}"  # the main job's home of this major
    url = f"sqlite+aiosqlite:///{home}/prefect.db"
    assert env["PREFECT_HOME"] == str(home)
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == url
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == url
    assert url.startswith("sqlite+aiosqlite:////")  # absolute path: four slashes
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert home.is_dir()
    assert str(home) in res.stderr  # it says what it set


@pytest.mark.unit
def test_prefect_env_defaults(tmp_path: Path) -> None:
    # ASKAP_FLOWS_HOME, else $PWD/.askap_flows; a relative DIR is made absolute.
    res = source_env(
        f'source "{ENV_SCRIPT}" && echo "$PREFECT_HOME"',
        cwd=tmp_path,
        ASKAP_FLOWS_HOME=str(tmp_path / "fh"), PYTHON="/nonexistent/python",
    )
    assert res.stdout.strip() == str(tmp_path / "fh" / "prefect"), res.stderr
    res = source_env(f'source "{ENV_SCRIPT}" && echo "$PREFECT_HOME"', cwd=tmp_path,
                     PYTHON=sys.executable)
    assert res.stdout.strip() == str(tmp_path / ".askap_flows" / f"prefect{PREFECT_MAJOR}")
    res = source_env(f'source "{ENV_SCRIPT}" rel && echo "$PREFECT_HOME"', cwd=tmp_path,
                     PYTHON="/nonexistent/python")
    assert res.stdout.strip() == str(tmp_path / "rel" / "prefect"), res.stderr


@pytest.mark.unit
def test_prefect_env_keeps_shell_options_and_namespace(tmp_path: Path) -> None:
    ok_dir = tmp_path / "ok"
    body = f"""
        set -u; set -o pipefail; shopt -s nullglob
        before="$(set +o; shopt -p)"
        source "{ENV_SCRIPT}" "{ok_dir}"
        source "{ENV_SCRIPT}" /proc/no/such/dir     # fails: must return, not exit
        echo "rc=$?"
        after="$(set +o; shopt -p)"
        [ "$before" = "$after" ] && echo same-options
        declare -F | grep -c askap || true
        false; echo still-alive
    """
    res = source_env(body, cwd=tmp_path)
    assert "rc=1" in res.stdout, res.stderr
    assert "same-options" in res.stdout
    assert "still-alive" in res.stdout  # no set -e leaked
    assert "\n0\n" in "\n" + res.stdout  # helper functions removed again


@pytest.mark.unit
def test_prefect_env_warns_for_orion(tmp_path: Path) -> None:
    res = source_env(
        f'source "{ENV_SCRIPT}" "{tmp_path}"; echo rc=$?',
        cwd=tmp_path,
        PREFECT_ORION_DATABASE_CONNECTION_URL="postgresql+asyncpg://u:p@127.0.0.1/x",
        PREFECT_ORION_API_HOST="127.0.0.1",
    )
    assert "rc=0" in res.stdout
    assert "WARNING" in res.stderr
    assert "PREFECT_ORION_DATABASE_CONNECTION_URL" in res.stderr
    assert "PREFECT_ORION_API_HOST" in res.stderr
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" in res.stderr  # names the replacement
    res = source_env(f'source "{ENV_SCRIPT}" "{tmp_path}"', cwd=tmp_path)
    assert "WARNING" not in res.stderr


@pytest.mark.unit
def test_prefect_env_refuses_unwritable_dir(tmp_path: Path) -> None:
    locked = Path(tempfile.mkdtemp(prefix="askap_env_ro_"))
    try:
        body = (
            f'source "{ENV_SCRIPT}" "{locked}/x"; echo "rc=$?"; '
            'echo "home=${PREFECT_HOME:-unset}"'
        )
        if IS_ROOT:
            if not can_run_as_nobody():
                _missing("as root, this test needs runuser and the user 'nobody'")
            locked.chmod(0o755)
            res = run(
                "runuser", "-u", "nobody", "--", "bash", "-c", body, env=clean_env(), cwd=Path("/")
            )
        else:
            locked.chmod(0o555)
            res = source_env(body, cwd=tmp_path)
        assert "rc=1" in res.stdout, res.stdout + res.stderr
        assert "home=unset" in res.stdout
        assert "cannot create" in res.stderr and "Fix:" in res.stderr
    finally:
        locked.chmod(0o755)
        shutil.rmtree(locked, ignore_errors=True)


@pytest.mark.unit
def test_prefect_env_must_be_sourced(tmp_path: Path) -> None:
    res = run("bash", ENV_SCRIPT, str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert "must be sourced" in res.stderr


# ---------------------------------------------------------------- postgres_database.sh, no server


@pytest.mark.unit
def test_pg_rejects_bad_arguments(tmp_path: Path) -> None:
    res = pg("start", "--port", "70000", "--address", ADDRESS, "--dir", str(tmp_path / "pg"))
    assert res.returncode != 0 and "invalid port" in res.stderr
    res = pg("frobnicate")
    assert res.returncode == 2 and "unknown argument" in res.stderr
    res = pg("start", "--address", "0.0.0.0", "--dir", str(tmp_path / "pg"))
    assert res.returncode != 0 and "every interface" in res.stderr
    res = pg("start", "--address", ADDRESS, "--dir", "/var/lib/postgresql/15/main")
    assert res.returncode != 0 and "refusing" in res.stderr
    assert not (tmp_path / "pg").exists()


@pytest.mark.unit
def test_pg_no_binaries_message(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = pg(
        "start",
        "--address",
        ADDRESS,
        "--dir",
        str(tmp_path / "pg"),
        env=clean_env(ASKAP_PG_BINDIR=str(empty)),
    )
    assert res.returncode == 1
    assert "no PostgreSQL server binaries" in res.stderr
    assert "apt-get install postgresql" in res.stderr and "ASKAP_PG_IMAGE" in res.stderr
    assert not (tmp_path / "pg").exists()


@pytest.mark.unit
def test_pg_url_encodes_password(tmp_path: Path) -> None:
    d = tmp_path / "pg"
    res = pg("url", "--address", ADDRESS, "--port", "5999", "--dir", str(d))
    assert res.returncode == 1 and "no password yet" in res.stderr
    env = clean_env(ASKAP_PG_PASSWORD="p@ss w/rd'\"$x")
    res = pg("url", "--address", ADDRESS, "--port", "5999", "--dir", str(d), env=env)
    assert res.returncode == 0, res.stderr
    expected = "postgresql+asyncpg://prefect:p%40ss%20w%2Frd%27%22%24x@127.0.0.2:5999/prefect"
    evaluated = run(
        "bash",
        "-c",
        f'eval "$({PG_SCRIPT} url --address {ADDRESS} --port 5999 '
        f'--dir {d})"; echo "$PREFECT_API_DATABASE_CONNECTION_URL"; '
        'echo "$PREFECT_SERVER_DATABASE_CONNECTION_URL"',
        env=env,
    )
    assert evaluated.stdout.split() == [expected, expected], evaluated.stderr


# ------------------------------------------------------------------ postgres_database.sh, server


@pytest.fixture
def pg_base() -> Iterator[Path]:
    """A directory the postgres system user can traverse (pytest's tmp_path is 0700)."""
    if not (Path(pg_bindir()) / "pg_isready").exists():  # skips or fails without PostgreSQL
        require("pg_isready")
    psql_path()
    if IS_ROOT:
        if shutil.which("runuser") is None:
            _missing("as root, the server runs via runuser, which is missing")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _missing("as root, the server needs the 'postgres' system user")
    base = Path(tempfile.mkdtemp(prefix="askap_pg_", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for data in base.glob("*/data"):
            if (data / "postmaster.pid").exists():
                pg("stop", "--dir", str(data.parent))
        shutil.rmtree(base, ignore_errors=True)


def psql(port: int, password: str, sql: str) -> subprocess.CompletedProcess[str]:
    return run(
        psql_path(),
        "-X",
        "-q",
        "-At",
        "-h",
        ADDRESS,
        "-p",
        str(port),
        "-U",
        "prefect",
        "-d",
        "prefect",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
        env=clean_env(PGPASSWORD=password, PGCONNECT_TIMEOUT="5"),
    )


@pytest.mark.postgres
def test_pg_start_status_url_stop_restart(pg_base: Path) -> None:
    d = pg_base / "server"
    port = free_port()
    opts = ["--address", ADDRESS, "--port", str(port), "--dir", str(d)]

    res = pg("status", *opts)
    assert res.returncode == 3  # nothing started yet

    res = pg("start", *opts)
    assert res.returncode == 0, res.stderr
    urls = exports(res.stdout)
    assert set(urls) == {
        "PREFECT_API_DATABASE_CONNECTION_URL",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    }
    url = urls["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url == urls["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://prefect:")
    assert url.endswith(f"@{ADDRESS}:{port}/prefect")
    password = url.split("://prefect:", 1)[1].rsplit("@", 1)[0]
    pwfile = d / "password"
    assert pwfile.read_text().strip() == password
    assert stat.S_IMODE(pwfile.stat().st_mode) == 0o600
    if IS_ROOT:
        assert (d / "data").stat().st_uid == pwd.getpwnam("postgres").pw_uid
        assert d.stat().st_uid == 0  # only what it created for the server is chowned

    assert pg("status", *opts).returncode == 0
    res = pg("url", "--dir", str(d))  # address and port recorded by start
    assert exports(res.stdout) == urls, res.stderr
    res = run(
        "bash",
        "-c",
        f'eval "$({PG_SCRIPT} url --dir {d})"; echo "$PREFECT_SERVER_DATABASE_CONNECTION_URL"',
    )
    assert res.stdout.strip() == url

    # A client connects through 127.0.0.2 with the password.
    res = psql(
        port,
        password,
        "SELECT inet_server_addr(); CREATE TABLE kept (x int); INSERT INTO kept VALUES (42);",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == ADDRESS
    assert psql(port, "wrong-password", "SELECT 1").returncode != 0

    # start is idempotent; stop of another directory does not touch this server.
    assert pg("start", *opts).returncode == 0
    res = pg("stop", "--address", ADDRESS, "--dir", str(pg_base / "other"))
    assert res.returncode == 0 and "not running" in res.stderr
    assert pg("status", *opts).returncode == 0

    res = pg("stop", *opts)
    assert res.returncode == 0, res.stderr
    assert pg("status", *opts).returncode == 3
    assert (d / "data" / "PG_VERSION").is_file()  # data kept

    res = pg("start", *opts)
    assert res.returncode == 0, res.stderr
    assert "initialising" not in res.stderr  # reused, not re-created
    assert exports(res.stdout) == urls  # same password
    res = psql(port, password, "SELECT x FROM kept")
    assert res.returncode == 0 and res.stdout.strip() == "42", res.stderr
    assert pg("stop", *opts).returncode == 0


@pytest.mark.postgres
def test_pg_port_in_use(pg_base: Path) -> None:
    d = pg_base / "busy"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ADDRESS, 0))
        s.listen()
        port = s.getsockname()[1]
        res = pg("start", "--address", ADDRESS, "--port", str(port), "--dir", str(d))
    assert res.returncode == 1
    assert f"port {port} on {ADDRESS} is already in use" in res.stderr
    assert "--port" in res.stderr
    assert not d.exists()  # checked before anything was created


@pytest.mark.postgres
def test_pg_dir_not_writable(pg_base: Path) -> None:
    locked = pg_base / "locked"
    locked.mkdir()
    args = ["start", "--address", ADDRESS, "--port", str(free_port()), "--dir", str(locked / "pg")]
    if IS_ROOT:
        if not can_run_as_nobody():
            _missing("as root, this test needs runuser and the user 'nobody'")
        locked.chmod(0o755)
        res = run("runuser", "-u", "nobody", "--", str(PG_SCRIPT), *args)
    else:
        locked.chmod(0o555)
        res = pg(*args)
    locked.chmod(0o755)
    assert res.returncode == 1
    assert "not writable" in res.stderr and "--dir" in res.stderr
    assert list(locked.iterdir()) == []


@pytest.mark.postgres
def test_pg_parent_not_traversable_by_postgres(tmp_path: Path) -> None:
    if not IS_ROOT:
        pytest.skip("only as root does the server run as another user (postgres)")
    pg_bindir()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    res = pg(
        "start", "--address", ADDRESS, "--port", str(free_port()), "--dir", str(private / "pg")
    )
    assert res.returncode == 1
    assert "cannot reach" in res.stderr and "not traversable by postgres" in res.stderr
    assert not (private / "pg").exists()


@pytest.mark.postgres
def test_pg_other_major_version_untouched(pg_base: Path) -> None:
    d = pg_base / "old"
    data = d / "data"
    data.mkdir(parents=True)
    data.chmod(0o700)
    (data / "PG_VERSION").write_text("9\n")
    (data / "base").mkdir()
    if IS_ROOT:
        postgres = pwd.getpwnam("postgres")
        for p in (data, data / "PG_VERSION", data / "base"):
            os.chown(p, postgres.pw_uid, postgres.pw_gid)
    before = sorted(p.name for p in data.iterdir())
    res = pg("start", "--address", ADDRESS, "--port", str(free_port()), "--dir", str(d))
    assert res.returncode == 1
    assert "created by PostgreSQL 9" in res.stderr and "Nothing was changed" in res.stderr
    assert sorted(p.name for p in data.iterdir()) == before
    assert sorted(p.name for p in d.iterdir()) == ["data"]
