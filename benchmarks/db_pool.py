#!/usr/bin/env python3
"""Prefect's default database pool vs askap_flows' sized pool, on a PostgreSQL-backed server.

For each pool configuration: a fresh database on one PostgreSQL server (started here with
scripts/postgres_database.sh on 127.0.0.2, or yours with --database-url), a separate
``prefect server start`` against it (askap_flows.server.PrefectServer) with either no pool settings
(Prefect's defaults: 5 + 10 connections, 30 s pool timeout) or ``database.size_pool(...)``, and the
main job ``python -m askap_flows.run --subflows N --max-concurrent K`` (local backend: every
sub-flow builds its own Dask LocalCluster and runs mpiexec) pointed at it with PREFECT_API_URL.

Prints one JSON object: the Prefect version, and per configuration N, K, failures, wall time, the
peak number of server connections, error texts from the job and the server log.

    .venvs/prefect3/bin/python benchmarks/db_pool.py                 # 140 sub-flows, K=8
    .venvs/prefect2/bin/python benchmarks/db_pool.py --max-concurrent 140

Contacts loopback only (127.0.0.2 for PostgreSQL, 127.0.0.1 for the Prefect server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_SCRIPT = ROOT / "scripts" / "postgres_database.sh"
ADDRESS = "127.0.0.2"
ERROR_PATTERNS = [
    r"QueuePool limit[^\n]*", r"TimeoutError[^\n]*", r"database is locked[^\n]*",
    r"503 Service Unavailable[^\n]*", r"500 Internal Server Error[^\n]*",
    r"too many (?:clients|connections)[^\n]*", r"Crash detected![^\n]*",
]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "ASKAP_PG_", "PG"))}


def pg(*args: str) -> str:
    r = subprocess.run([str(PG_SCRIPT), *args], capture_output=True, text=True, env=clean_env(),
                       timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"postgres_database.sh {' '.join(args)} failed:\n{r.stderr}")
    for line in r.stdout.splitlines():
        if line.startswith("export PREFECT_SERVER_DATABASE_CONNECTION_URL="):
            return line.split("=", 1)[1]
    return ""


class ConnectionSampler(threading.Thread):
    """Peak number of connections to one database (pg_stat_activity, every 0.5 s)."""

    def __init__(self, url: str, database: str) -> None:
        super().__init__(daemon=True)
        self.url, self.database, self.peak = url, database, 0
        self._halt = threading.Event()

    def run(self) -> None:
        from askap_flows.database_url import parse_url

        db = parse_url(self.url)

        async def sample() -> None:
            import asyncpg

            conn = await asyncpg.connect(host=db.host, port=db.port, user=db.user,
                                         password=db.password, database=db.database)
            try:
                while not self._halt.is_set():
                    n = await conn.fetchval(
                        "SELECT count(*) - 1 FROM pg_stat_activity WHERE datname = $1",
                        self.database)
                    self.peak = max(self.peak, n)
                    await asyncio.sleep(0.5)
            finally:
                await conn.close()

        try:
            asyncio.run(sample())
        except Exception:  # noqa: BLE001 - a sampler must not break the benchmark
            pass

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def error_texts(text: str, limit: int = 5) -> dict[str, object]:
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for pattern in ERROR_PATTERNS:
        for m in re.finditer(pattern, text):
            key = pattern.split("[")[0].replace("\\", "")
            counts[key] += 1
            first.setdefault(key, m.group(0)[:300])
    return {"counts": dict(counts), "examples": list(first.values())[:limit]}


def api_states(api_url: str) -> dict[str, int]:
    """How many flow runs the server holds, per state type (also after a timeout)."""
    import urllib.request

    counts: Counter[str] = Counter()
    offset = 0
    try:
        while True:
            req = urllib.request.Request(
                f"{api_url}/flow_runs/filter", method="POST",
                data=json.dumps({"limit": 200, "offset": offset}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                page = json.loads(r.read())
            counts.update(run["state_type"] for run in page)
            offset += len(page)
            if len(page) < 200:
                return dict(counts)
    except OSError as exc:
        return {"error": str(exc)}  # type: ignore[dict-item]


def run_config(name: str, url: str, settings: dict[str, str], args, work: Path) -> dict:
    from askap_flows.database_url import parse_url
    from askap_flows.server import PrefectServer

    home = work / f"prefect-{name}"
    server = PrefectServer(home, url, settings=settings, log_path=work / f"server-{name}.log")
    server.start()
    sampler = ConnectionSampler(url, parse_url(url).database or "")
    sampler.start()
    env = {**clean_env(), "PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(home),
           "ASKAP_FLOWS_HOME": str(work / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if not args.dask_profile:
        # CPython < 3.11.9 (gh-106883): in-process Dask workers' profilers call
        # sys._current_frames() every 10 ms from several threads, which can deadlock the process.
        env["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"
    started = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "askap_flows.run", "--subflows", str(args.subflows),
             "--max-concurrent", str(args.max_concurrent), "--ntasks", str(args.ntasks), "--json"],
            capture_output=True, text=True, env=env, timeout=args.timeout, cwd=work)
        wall = time.monotonic() - started
        timed_out = False
    except subprocess.TimeoutExpired as exc:
        r = subprocess.CompletedProcess(exc.cmd, -9, exc.stdout or "", exc.stderr or "")
        r.stdout = r.stdout.decode() if isinstance(r.stdout, bytes) else r.stdout
        r.stderr = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
        wall = time.monotonic() - started
        timed_out = True
    finally:
        sampler.stop()
        states = api_states(server.api_url)
        server.stop()
    try:
        data = json.loads(r.stdout)
        failed = data["failed"]
        errors = sorted({(s.get("error") or "").splitlines()[0][:300]
                         for s in data["subflows"] if s["state"] != "completed"})
    except (ValueError, KeyError):
        failed, errors = None, [f"no JSON from the job (exit {r.returncode}): "
                                f"{r.stderr.strip().splitlines()[-1:] if r.stderr else ''}"]
    server_log = (work / f"server-{name}.log").read_text(errors="replace")
    return {
        "pools": name, "server_settings": settings, "subflows": args.subflows,
        "max_concurrent": args.max_concurrent, "exit_code": r.returncode, "timed_out": timed_out,
        "failed": failed, "wall_seconds": round(wall, 1), "peak_db_connections": sampler.peak,
        "flow_run_states_in_api": states,
        "subflow_errors": errors[:10], "job_log_errors": error_texts(r.stderr),
        "server_log_errors": error_texts(server_log),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subflows", type=int, default=140)
    p.add_argument("--max-concurrent", type=int, default=8)
    p.add_argument("--ntasks", type=int, default=1, help="MPI ranks per sub-flow (default 1)")
    p.add_argument("--pools", default="default,sized", help="comma list: default, sized")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--dask-profile", action="store_true",
                   help="leave Dask's worker profiler on (it can deadlock CPython < 3.11.9)")
    p.add_argument("--database-url", help="an existing PostgreSQL (one database per config is "
                   "NOT created then: both configurations share it)")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from askap_flows import compat
    from askap_flows.database import size_pool
    from askap_flows.database_url import postgres_url

    work = Path(tempfile.mkdtemp(prefix="askap_bench_", dir="/tmp"))
    work.chmod(0o755)  # the postgres system user must traverse it when run as root
    pg_dir = work / "pg"
    port = free_port(ADDRESS)
    results = []
    try:
        if not args.database_url:
            pg("start", "--dir", str(pg_dir), "--address", ADDRESS, "--port", str(port))
        for name in args.pools.split(","):
            if args.database_url:
                url = args.database_url
            else:
                db = f"bench_{name}_{int(time.time())}"
                pg("start", "--dir", str(pg_dir), "--address", ADDRESS, "--port", str(port),
                   "--db", db)
                url = postgres_url(ADDRESS, port, "prefect",
                                   (pg_dir / "password").read_text().strip(), db)
            settings = {} if name == "default" else size_pool(args.max_concurrent).env()
            results.append(run_config(name, url, settings, args, work))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if not args.database_url and (pg_dir / "data").exists():
            subprocess.run([str(PG_SCRIPT), "stop", "--dir", str(pg_dir)], capture_output=True,
                           env=clean_env())
        if os.environ.get("ASKAP_BENCH_KEEP"):
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"prefect": compat.PREFECT_VERSION, "machine_cpus": os.cpu_count(),
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
