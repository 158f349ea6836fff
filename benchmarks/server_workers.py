#!/usr/bin/env python3
"""Flow-run API latency of ``askap-flows server`` with 1 and with 2 API worker processes.

For each worker count: a fresh database on one PostgreSQL (scripts/postgres_database.sh on
127.0.0.2), ``PrefectServer(workers=N)`` on it with the pools ``database.preflight`` sizes, and C
client threads that each do what a sub-flow does to the API, R times: create a flow run, set it
Running, set it Completed, read it. Every request's latency is recorded. Prefect 3 only
(Prefect 2.20 has no worker processes).

Prints one JSON object (and writes it with --out): per worker count the requests, failures,
p50/p95/max latency in ms, and requests per second.

    .venvs/prefect3/bin/python benchmarks/server_workers.py --out benchmarks/results/server_workers.json

Contacts loopback only (127.0.0.2 for PostgreSQL, 127.0.0.1 for the Prefect server).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from askap_flows import compat, database, database_url  # noqa: E402
from askap_flows.server import PrefectServer, free_port  # noqa: E402

PG = ROOT / "scripts" / "postgres_database.sh"


def call(api: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{api}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read()
        return json.loads(text) if text else {}


def client(api: str, flow_id: str, reps: int, latencies: list[float], failures: list[str]):
    for _ in range(reps):
        try:
            start = time.monotonic()
            run = call(api, "POST", "/flow_runs/", {"flow_id": flow_id, "name": uuid.uuid4().hex})
            latencies.append(time.monotonic() - start)
            for state in ("RUNNING", "COMPLETED"):
                start = time.monotonic()
                call(api, "POST", f"/flow_runs/{run['id']}/set_state",
                     {"state": {"type": state}, "force": True})
                latencies.append(time.monotonic() - start)
            start = time.monotonic()
            call(api, "GET", f"/flow_runs/{run['id']}")
            latencies.append(time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - counted, not fatal
            failures.append(repr(exc)[:200])


def measure(url: str, workers: int, concurrent: int, reps: int, home: Path) -> dict:
    plan = database.preflight(concurrent, database_url=url, workers=workers)
    with PrefectServer(home, plan.url, settings=plan.server_env, workers=workers) as server:
        api = server.api_url
        flow_id = call(api, "POST", "/flows/", {"name": "bench"})["id"]
        latencies: list[float] = []
        failures: list[str] = []
        threads = [threading.Thread(target=client, args=(api, flow_id, reps, latencies, failures))
                   for _ in range(concurrent)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
    ms = sorted(x * 1000 for x in latencies)
    return {"workers": workers, "concurrent": concurrent, "reps": reps, "pool": plan.describe(),
            "requests": len(ms), "failures": len(failures), "errors": sorted(set(failures))[:5],
            "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1), "max_ms": round(ms[-1], 1),
            "requests_per_s": round(len(ms) / wall, 1), "wall_s": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrent", type=int, default=48, help="client threads (default: 48)")
    ap.add_argument("--reps", type=int, default=20, help="flow runs per thread (default: 20)")
    ap.add_argument("--quick", action="store_true", help="4 threads, 2 runs each")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()
    if not compat.SERVER_WORKERS:
        print(f"Prefect {compat.PREFECT_VERSION} has no server worker processes", file=sys.stderr)
        return 2
    concurrent, reps = (4, 2) if args.quick else (args.concurrent, args.reps)
    base = Path(tempfile.mkdtemp(prefix="askap_bench_workers_", dir="/tmp"))
    base.chmod(0o755)  # as root PostgreSQL runs as user postgres
    pg_dir, port = base / "pg", free_port("127.0.0.2")
    results = []
    try:
        for workers in (1, 2):
            db = f"bench{workers}"
            subprocess.run(["bash", str(PG), "start", "--dir", str(pg_dir), "--address",
                            "127.0.0.2", "--port", str(port), "--db", db],
                           check=True, capture_output=True, timeout=180)
            password = (pg_dir / "password").read_text().strip()
            url = database_url.postgres_url("127.0.0.2", port, "prefect", password, db)
            results.append(measure(url, workers, concurrent, reps, base / f"home{workers}"))
    finally:
        subprocess.run(["bash", str(PG), "stop", "--dir", str(pg_dir)], capture_output=True,
                       timeout=120)
        shutil.rmtree(base, ignore_errors=True)
    out = {"versions": {"prefect": compat.PREFECT_VERSION, "python": platform.python_version()},
           "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_at_end": open("/proc/loadavg").read().split()[:3], "results": results}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
