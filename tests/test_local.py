"""The local backend: a LocalCluster per sub-flow and mpiexec, no SLURM anywhere."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid

import pytest

from conftest import run_main
from test_cli import cli
from test_faults import _api, flow_runs

pytestmark = pytest.mark.mpi


def test_local_subflow_returns_one_record_per_rank(hello_program):
    import askap_flows
    from askap_flows.flows import mpi_subflow

    name = f"local-test-{uuid.uuid4().hex[:8]}"
    res = mpi_subflow({"ntasks": 3}, backend="local", name=name)
    assert [r.rank for r in res.ranks] == [0, 1, 2]
    assert all(r.size == 3 and r.allreduce == 3 for r in res.ranks)
    assert res.exit_code == 0 and res.job_id is None
    assert res.dashboard and res.dashboard.startswith("http://127.0.0.1:")
    # its MPI step is the public mpi_task (one task for users' flows and sub-flows), in the API
    run_id = flow_runs([name])[name]["id"]
    deadline = time.monotonic() + 30  # Prefect 3 records task runs from their events
    while not (tasks := _api("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})):
        assert time.monotonic() < deadline, f"no task run of {name} in the API"
        time.sleep(0.5)
    assert [(t["task_key"], t["name"].rsplit("-", 1)[0]) for t in tasks] == [
        (askap_flows.mpi_task.task_key, "mpi-task")]


def _fake_slurm(tmp_path):
    """A PATH dir whose SLURM commands record that they were called (they must not be)."""
    d = tmp_path / "fakebin"
    d.mkdir()
    for cmd in ("sbatch", "srun", "sinfo", "squeue", "scancel", "salloc", "scontrol"):
        p = d / cmd
        p.write_text(f"#!/bin/sh\necho {cmd} >> {tmp_path}/slurm-called\nexit 97\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return d


def test_main_job_with_defaults_needs_no_slurm(tmp_path):
    fake = _fake_slurm(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_HOME", "PREFECT_API_URL", "SLURM_CONF", "ASKAP_FLOWS_HOME")}
    env["PATH"] = f"{fake}:{os.environ['PATH']}"
    r = subprocess.run([sys.executable, "-m", "askap_flows.run"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(4):
        assert f"mpi-{i}" in r.stdout
    assert "4 completed, 0 failed" in r.stdout
    assert "Prefect UI for this run: http://127.0.0.1:" in r.stderr
    assert not (tmp_path / "slurm-called").exists()
    assert (tmp_path / ".askap_flows" / "bin" / "mpi_hello_world").exists()  # project-local
    from askap_flows import compat

    assert (tmp_path / ".askap_flows" / f"prefect{compat.PREFECT_MAJOR}").is_dir()  # one per major


def test_main_job_json_output(tmp_path):
    r = run_main("--subflows", "2", "--ntasks", "2", "--json",
                 env={"ASKAP_FLOWS_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)
    assert [s["state"] for s in data["subflows"]] == ["completed", "completed"]
    for s in data["subflows"]:
        assert [(x["rank"], x["size"], x["allreduce"]) for x in s["ranks"]] == [(0, 2, 1), (1, 2, 1)]
        assert {"processor"} <= set(s["ranks"][0])


def test_failing_subflow_does_not_stop_its_siblings(tmp_path):
    from functools import partial

    from prefect import flow

    from askap_flows.composition import run_subflows
    from askap_flows.flows import mpi_subflow

    @flow
    def parent():
        good = partial(mpi_subflow, {"ntasks": 2}, backend="local")
        bad = partial(mpi_subflow, {"ntasks": 2, "args": ["--fail-rank", "1"]}, backend="local")
        return run_subflows([good, bad, good], max_concurrent=2)

    outcomes = parent()
    assert [o.ok for o in outcomes] == [True, False, True]
    assert "exited with code" in str(outcomes[1].error)


def test_in_process_workers_run_without_the_profiler_and_wait_longer_to_connect():
    """CPython 3.11.7 deadlocks in sys._current_frames() with dozens of in-process profilers."""
    import dask

    from askap_flows.resolve import resolve
    from askap_flows.runners import local_runner

    with dask.config.set({"distributed.worker.profile.enabled": True}):
        local_runner(resolve(None, backend="local", step=False).allocation_spec())
        assert dask.config.get("distributed.worker.profile.enabled") is False
        assert dask.config.get("distributed.comm.timeouts.connect") == "120s"


def _main_job_running(tmp_path, hello_program):
    """A main job that started its own Prefect server, once its sub-flows are starting."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.run", "--subflows", "1", "--ntasks", "1",
         "--program", hello_program],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    ui = None
    for line in proc.stderr:
        if "Prefect UI for this run:" in line:
            ui = line.split("Prefect UI for this run:")[1].split()[0]
        if line.startswith("running 1 sub-flow"):
            break
    assert ui, "the main job never reported its Prefect server"
    return proc, int(ui.rstrip("/").rsplit(":", 1)[1])


def _nothing_listens(port: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return True
        time.sleep(0.5)
    return False


def test_twice_interrupted_run_leaves_no_prefect_server(tmp_path, hello_program):
    """Two Ctrl-C end the main job at once; the Prefect server it started must not outlive it."""
    proc, port = _main_job_running(tmp_path, hello_program)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert _nothing_listens(port, within=0.1)  # stopped before the main job exited


def test_sigkilled_main_job_takes_its_prefect_server_along(tmp_path, hello_program):
    """No handler runs on SIGKILL: the server dies with its parent (PR_SET_PDEATHSIG)."""
    proc, port = _main_job_running(tmp_path, hello_program)
    proc.kill()
    proc.communicate(timeout=60)
    assert _nothing_listens(port), f"the run's Prefect server still listens on port {port}"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"--port {port}" not in ps, "the server process (or its uvicorn child) is left"


def test_many_subflows_at_once_in_a_fresh_home_all_build_and_run(tmp_path, monkeypatch):
    """A user's own parent flow starting several sub-flows at once in a fresh home: every one of
    them wants the check program, which does not exist yet. It is built once and all complete
    (each sub-flow building it under one shared temporary name failed 1-2 of 4)."""
    from prefect import flow

    from askap_flows.composition import run_subflows
    from askap_flows.flows import mpi_subflow

    home = tmp_path / "fresh home"
    monkeypatch.setenv("ASKAP_FLOWS_HOME", str(home))
    assert not (home / "bin").exists()

    @flow(name="fresh-home-pipeline")
    def pipeline():
        calls = [lambda i=i: mpi_subflow({"ntasks": 2}, backend="local", name=f"fresh-{i}")
                 for i in range(6)]
        return run_subflows(calls, max_concurrent=6)

    outcomes = pipeline()
    assert [o.error for o in outcomes if not o.ok] == []
    assert sorted(p.name for p in (home / "bin").iterdir()) == [
        ".mpi_hello_world.lock", "mpi_hello_world"]  # no temporary file left behind


def test_concurrent_builds_in_threads_and_processes_share_one_program(tmp_path):
    """Threads of one process and separate processes build into one home at once."""
    import concurrent.futures

    from askap_flows import mpi

    out = tmp_path / "bin" / "hello"
    code = f"from askap_flows import mpi; mpi.build_hello({str(out)!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: mpi.build_hello(out), range(8)))
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert set(paths) == {out} and os.access(out, os.X_OK)


def test_build_mpi(tmp_path, hello_program):
    out = tmp_path / "hello"
    r = cli("build-mpi", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and r.stdout.strip() == str(out)

