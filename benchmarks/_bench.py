"""What the benchmark scripts share: a PostgreSQL-backed Prefect server, versions, statistics.

Imported by benchmarks/overhead.py and benchmarks/sweep.py (they put this directory and src/ on
sys.path). Nothing here imports Prefect: the server must be chosen before Prefect is imported.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results"
PG_SCRIPT = ROOT / "scripts" / "postgres_database.sh"
LOOPBACK = "127.0.0.1"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "ASKAP_PG_", "PG"))}


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def work_dir(prefix: str) -> Path:
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    work.chmod(0o755)  # the postgres system user must traverse it when run as root
    return work


def bench_environment(work: Path) -> None:
    """Working directories of this run, quiet Prefect console, no telemetry."""
    os.environ["ASKAP_FLOWS_HOME"] = str(work / "home")
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    for var in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
                "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL",
                "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL"):
        os.environ.setdefault(var, "WARNING")


@contextmanager
def prefect_server(work: Path, max_concurrent: int, default_pools: bool = False) -> Iterator[dict]:
    """PREFECT_API_URL if set; else PostgreSQL (scripts/postgres_database.sh, loopback) and a
    ``prefect server start`` on it with pools sized for ``max_concurrent`` (Prefect's default
    pools with ``default_pools``). Sets PREFECT_API_URL while it runs."""
    if os.environ.get("PREFECT_API_URL"):
        yield {"api_url": os.environ["PREFECT_API_URL"], "started_here": False}
        return
    from askap_flows.database import size_pool
    from askap_flows.database_url import postgres_url
    from askap_flows.server import PrefectServer, free_port

    pg_dir = work / "pg"
    port = free_port(LOOPBACK)
    r = subprocess.run(["bash", str(PG_SCRIPT), "start", "--dir", str(pg_dir), "--address",
                        LOOPBACK, "--port", str(port)], capture_output=True, text=True,
                       env=clean_env(), timeout=180)
    if r.returncode != 0:
        raise SystemExit(f"postgres_database.sh start failed:\n{r.stderr}")
    url = postgres_url(LOOPBACK, port, "prefect", (pg_dir / "password").read_text().strip(),
                       "prefect")
    settings = {} if default_pools else size_pool(max_concurrent).env()
    server = PrefectServer(work / "prefect", url, settings=settings,
                           log_path=work / "server.log")
    started = time.monotonic()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield {"api_url": server.api_url, "started_here": True, "database": "postgresql",
               "pool_settings": settings or "Prefect's defaults",
               "server_start_seconds": round(time.monotonic() - started, 2)}
    finally:
        try:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - never fail a finished benchmark on log shipping
            pass
        server.stop()
        os.environ.pop("PREFECT_API_URL", None)
        subprocess.run(["bash", str(PG_SCRIPT), "stop", "--dir", str(pg_dir)],
                       capture_output=True, env=clean_env(), timeout=120)


def quiet_logs() -> None:
    """Dask's INFO lines (one per client, worker and scheduler close) would bury the progress."""
    import logging

    for name in ("distributed", "dask_jobqueue", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "machine_cpus": os.cpu_count()}
    for pkg in ("prefect", "prefect-dask", "dask", "distributed", "dask-jobqueue"):
        out[pkg] = version(pkg)
    try:
        out["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if shutil.which("sinfo"):
        r = subprocess.run(["sinfo", "--version"], capture_output=True, text=True)
        out["slurm"] = r.stdout.strip()
    return out


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_mark() -> tuple[float, float]:
    """The whole machine's CPU seconds since boot, from one read of /proc/stat: (busy, stolen).
    Busy is user, nice, system and interrupts (not idle, not waiting for I/O, not stolen): over a
    measurement, the CPU work it took, every process counted (the test bed's nodes, the Prefect
    server and PostgreSQL run on the same cores). Stolen is what the hypervisor took away: a
    measurement that grew it ran on a machine slower than it looks."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def cpu_used(mark: tuple[float, float]) -> dict[str, float]:
    """The busy and stolen CPU seconds since ``mark`` (``cpu_mark()``), for a sample's JSON."""
    busy, steal = cpu_mark()
    return {"cpu_seconds": round(busy - mark[0], 2), "steal_seconds": round(steal - mark[1], 2)}


def write_json(data: dict, out: str | os.PathLike | None) -> None:
    text = json.dumps(data, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def drop_work(work: str | os.PathLike) -> None:
    """Remove a benchmark's scratch directory, unless ASKAP_BENCH_KEEP is set."""
    if not os.environ.get("ASKAP_BENCH_KEEP"):
        shutil.rmtree(work, ignore_errors=True)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def slurm_setup(work_prefix: str, mpi_spec: dict, alloc_spec: dict):
    """The test bed is there, a work directory and environment, the specs of the testbed profile
    with these overrides, and the hello program: (work, alloc, spec, hello)."""
    if not os.environ.get("SLURM_CONF"):
        raise SystemExit("SLURM_CONF is not set: run `scripts/slurm_testbed.sh up` and "
                         "`source /tmp/askap_testbed/env.sh` first.")
    work = work_dir(work_prefix)
    bench_environment(work)
    from askap_flows import mpi, slurm_query
    from askap_flows.resolve import resolve

    slurm_query.check_available()
    resolved = resolve("testbed", backend="slurm", allocation=alloc_spec, mpi=mpi_spec)
    alloc, spec = resolved.allocation_spec(), resolved.mpi_spec()
    return work, alloc, spec, str(mpi.build_hello())


def run_header(name: str, quick: bool, load_before, server) -> dict:
    """The first keys of every benchmark's JSON: what ran, when, with which versions, on what load."""
    return {"benchmark": name, "quick": quick,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "versions": versions(), "load_average_before": load_before,
            "load_average_after": load(), "prefect_server": server}
