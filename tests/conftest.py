"""Test tiers and the services they need.

unit      no services
mpi       an MPI compiler and launcher (Debian's mpich, installed by scripts/test.sh)
slurm     the 3-node test bed (scripts/slurm_testbed.sh up; SLURM_CONF from its env.sh)
postgres  PostgreSQL's binaries

With CI=true a missing service makes its tests fail; elsewhere they are skipped with the reason.
A Prefect server on a real PostgreSQL (scripts/postgres_database.sh, loopback, temporary dirs) is
started once for the session, before any test module imports Prefect, unless PREFECT_API_URL is
already set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
_server = None
_tmp_home = None


def pytest_configure(config):
    global _server, _tmp_home
    _tmp_home = tempfile.mkdtemp(prefix="askap-tests-")
    os.environ.setdefault("ASKAP_FLOWS_HOME", str(Path(_tmp_home) / "home"))
    os.environ.setdefault("PREFECT_HOME", str(Path(_tmp_home) / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not os.environ.get("PREFECT_API_URL"):
        from askap_flows.server import PrefectServer

        _server = PrefectServer(Path(os.environ["PREFECT_HOME"]),
                                database_url=_start_session_postgres()).start()
        os.environ["PREFECT_API_URL"] = _server.api_url


_pg_dir = None


def _start_session_postgres() -> str | None:
    """A real PostgreSQL (scripts/postgres_database.sh) behind the session's Prefect server:
    Prefect 3's server on sqlite answers 503 under concurrent sub-flows. None: use sqlite."""
    global _pg_dir
    script = ROOT / "scripts" / "postgres_database.sh"
    if shutil.which("pg_ctl") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        if IN_CI:
            raise pytest.UsageError("CI=true and PostgreSQL is missing (scripts/test.sh installs it)")
        return None
    from askap_flows.server import free_port

    _pg_dir = Path(tempfile.mkdtemp(prefix="askap-session-pg-", dir="/tmp"))
    _pg_dir.chmod(0o755)  # the server runs as user postgres when we are root
    data = _pg_dir / "pg"
    start = subprocess.run(["bash", str(script), "start", "--dir", str(data), "--address",
                            "127.0.0.1", "--port", str(free_port())], capture_output=True, text=True)
    if start.returncode != 0:
        raise pytest.UsageError(f"could not start the session's PostgreSQL:\n{start.stderr}")
    for line in start.stdout.splitlines():
        if line.startswith("export PREFECT_API_DATABASE_CONNECTION_URL="):
            return line.split("=", 1)[1].strip().strip("'\"")
    raise pytest.UsageError(f"postgres_database.sh printed no URL:\n{start.stdout}")


def pytest_unconfigure(config):
    if _server is not None:
        try:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
        except Exception:
            pass
        _server.stop()
    if _pg_dir is not None:
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres_database.sh"), "stop", "--dir",
                        str(_pg_dir / "pg")], capture_output=True)
        shutil.rmtree(_pg_dir, ignore_errors=True)
    if _tmp_home:
        shutil.rmtree(_tmp_home, ignore_errors=True)


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true and a service is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def slurm_ready() -> str | None:
    """None when the test bed answers, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not on PATH (scripts/slurm_testbed.sh up installs SLURM)"
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF not set: source /tmp/askap_testbed/env.sh after scripts/slurm_testbed.sh up"
    r = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip()}"
    return None


TIERS = ("unit", "mpi", "slurm", "postgres")
ONCE_DONE = "ASKAP_TEST_ONCE_DONE"  # the `once` tests ran under an earlier major of this run


def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one tier marker (the README's promise)."""
    wrong = [f"{item.nodeid}: {sorted(tiers) or 'none'}" for item in items
             if len(tiers := {m.name for m in item.iter_markers() if m.name in TIERS}) != 1]
    if wrong:
        raise pytest.UsageError("each test needs exactly one tier marker (unit, mpi, slurm, "
                                "postgres):\n" + "\n".join(wrong))
    if os.environ.get(ONCE_DONE) == "1":  # scripts/test.sh, from the second major on
        once = [item for item in items if item.get_closest_marker("once")]
        if once:
            config.hook.pytest_deselected(items=once)
            items[:] = [item for item in items if not item.get_closest_marker("once")]


def pytest_runtest_setup(item):
    marks = {m.name for m in item.iter_markers()}
    if "slurm" in marks:
        why = slurm_ready()
        if why:
            _missing(why)
    if marks & {"mpi", "slurm", "postgres"}:  # the slurm and postgres tiers run MPI programs too
        from askap_flows import mpi

        if mpi.find_mpicc() is None or mpi.find_mpiexec() is None:
            _missing("no mpicc/mpiexec: apt-get install mpich libmpich-dev")
    if "postgres" in marks and shutil.which("pg_ctl") is None and not list(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
    ):
        _missing("PostgreSQL binaries not found: apt-get install postgresql")


@pytest.fixture(scope="session")
def hello_program() -> str:
    """The check program, built once with the mpicc on PATH."""
    from askap_flows import mpi

    return str(mpi.build_hello())


_template_db: Path | None = None


def migrated_home(home: Path) -> str:
    """``home`` as an ASKAP_FLOWS_HOME whose sqlite database (this major's) is already migrated:
    a copy of one made once per session. Migrating a fresh database adds about 10 s to a main
    job's server start; the tests that use this are about signals, servers and cleanup. A first
    run's migrations are tested where that is the subject (test_local's first run from an empty
    directory, the two runs started at the same instant, the installed wheel)."""
    global _template_db
    from askap_flows import compat
    from askap_flows.server import PrefectServer

    if _template_db is None:
        made = Path(_tmp_home) / "migrated"
        PrefectServer(made).start().stop()
        _template_db = made / "prefect.db"
    target = Path(home) / f"prefect{compat.PREFECT_MAJOR}"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template_db, target / "prefect.db")
    return str(home)


def final_state(job_id: str) -> str:
    """The state SLURM still shows for an ended job (MinJobAge: 30 s on the test bed)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                         text=True, timeout=30).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), out)


def queued_jobs() -> set[str]:
    """'name id' of every job in SLURM's queue (pending, running or completing), whatever its name."""
    out = subprocess.run(["squeue", "-h", "-o", "%j %i"], capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def askap_jobs(prefix: str = "askapflows") -> list[str]:
    """'name id' of the SLURM jobs whose name starts with ``prefix``."""
    return sorted(j for j in queued_jobs() if j.startswith(prefix))


def dask_workers() -> set[int]:
    """PIDs of Dask worker processes on this machine (SLURM jobs' workers run here too)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()
            if "distributed.cli.dask_worker" in line and "ps -eo" not in line}


@pytest.fixture
def no_jobs_left():
    """Asserts after the test that no job the test started is left in SLURM (whatever its name:
    every job in the queue that was not there before), and that no Dask worker process the
    test's jobs started outlived them."""
    before = dask_workers()
    jobs_before = queued_jobs()
    yield
    left = sorted(queued_jobs() - jobs_before)
    assert not left, f"jobs left behind: {left}"
    deadline = time.monotonic() + 20  # SLURM's KillWait is 5 s on the test bed
    while (dask_workers() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not dask_workers() - before, f"Dask workers outlived their jobs: {dask_workers() - before}"


def run_main(*args: str, env: dict | None = None, timeout: float = 600, cwd=None):
    """Run ``python -m askap_flows.run`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "askap_flows.run", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)
