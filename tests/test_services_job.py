"""The site guide's services job on the test bed: examples/prefect_services.sbatch runs PostgreSQL
and the Prefect server as one batch job (under Prefect 3 with 2 API worker processes, its services
process and Redis), examples/pipeline_job.sbatch (another job) discovers the server through its
URL file and runs 20 sub-flows against it, and a scancel of the services job leaves nothing
running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from askap_flows import compat
from conftest import ROOT
from test_server_workers import alive, tree

pytestmark = [pytest.mark.slurm, pytest.mark.once]


def sbatch(*args: str, env: dict) -> str:
    r = subprocess.run(["sbatch", "--parsable", "-p", "debug", *args], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def gone(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                         text=True).stdout.strip()
    return out in ("", "COMPLETED", "CANCELLED", "FAILED")


def wait(what, seconds: float, message: str):
    deadline = time.monotonic() + seconds
    while not (got := what()):
        assert time.monotonic() < deadline, message
        time.sleep(0.5)
    return got


def left_running(d: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(d) in line and "ps -eo" not in line]


def server_command(d: Path) -> psutil.Process | None:
    """The services job's ``askap-flows server`` process."""
    for p in psutil.process_iter(["cmdline"]):
        args = " ".join(p.info["cmdline"] or [])
        if "askap-flows server" in args and f"{d}/server.env" in args:
            return p
    return None


def test_the_services_job_serves_a_pipeline_job_and_leaves_nothing(hello_program):
    from askap_flows.server import free_port

    workers = 2 if compat.SERVER_WORKERS else 1

    d = Path(tempfile.mkdtemp(prefix="askap-services-", dir="/tmp"))
    d.chmod(0o755)  # PostgreSQL runs as user postgres when we are root
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(ASKAP_SERVICES_DIR=str(d), ASKAP_SERVICES_IFACE="lo",
               ASKAP_SERVICES_ALLOW="127.0.0.0/8", ASKAP_SERVICES_PG_PORT=str(free_port()),
               ASKAP_SERVICES_MAX_CONCURRENT="4", ASKAP_SERVICES_WORKERS=str(workers),
               ASKAP_FLOWS_CHECKOUT=str(ROOT),
               ASKAP_VENV=sys.prefix, ASKAP_FLOWS_HOME=str(d / "home"),
               # the local backend's mpiexec in a job: MPICH's hydra would start its ranks with
               # srun and look up the test bed's node names, which only SLURM knows
               HYDRA_BOOTSTRAP="fork")
    services = pipeline = None
    parts: list[psutil.Process] = []
    try:
        services = sbatch("-o", str(d / "services.out"), "-e", str(d / "services.err"),
                          str(ROOT / "examples" / "prefect_services.sbatch"), env=env)
        pipeline = sbatch(f"--dependency=after:{services}", "-o", str(d / "pipeline.out"),
                          "-e", str(d / "pipeline.err"),
                          str(ROOT / "examples" / "pipeline_job.sbatch"), "--backend", "local",
                          "--subflows", "20", "--max-concurrent", "4", "--nodes", "1",
                          "--ntasks", "1", "--json", "--program", hello_program, env=env)
        server = wait(lambda: server_command(d), 120, "no askap-flows server in the services job")
        wait(lambda: (d / "server.env").exists(), 180, "the server did not answer within 180 s")
        roles = tree(server.pid)
        parts = [server] + [p for ps in roles.values() for p in ps]
        if workers > 1:  # the API in 2 processes, the services in another, Redis
            assert [len(roles[r]) for r in ("redis", "services", "api", "api-workers")] == [
                1, 1, 1, 2], roles
            assert "2 API worker processes" in (d / "server.env").read_text()
        wait(lambda: gone(pipeline), 240, "the pipeline job did not end within 240 s")
        err = (d / "pipeline.err").read_text(errors="replace")
        runs = json.loads((d / "pipeline.out").read_text())["subflows"]
        assert [r["state"] for r in runs] == ["completed"] * 20, err[-3000:]
        api = (d / "server.env").read_text().splitlines()[0].split("=", 1)[1].strip("'")
        assert api.startswith("http://127.0.0.1:")
        req = urllib.request.Request(f"{api}/flow_runs/count", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read()) >= 21  # the parent flow and its 20 sub-flows
        subprocess.run(["scancel", services], check=True, timeout=30)
        wait(lambda: gone(services), 60, "the services job did not end after scancel")
        wait(lambda: not left_running(d), 30, f"left running: {left_running(d)}")
        wait(lambda: not alive(parts), 30, f"left running: {alive(parts)}")  # Redis too
        assert not (d / "server.env").exists(), "the URL file of a stopped server is left"
        assert "stopped the server" in (d / "services.err").read_text()  # PostgreSQL's stop
    finally:
        for job in (pipeline, services):
            if job:
                subprocess.run(["scancel", job], timeout=30)
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres_database.sh"), "stop", "--dir",
                        str(d / "pg")], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)
