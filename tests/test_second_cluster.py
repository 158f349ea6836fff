"""A profile with ``clusters:`` on the test bed's opt-in second cluster (askapfar: its own
slurmctld and node, found through slurmdbd; scripts/slurm_second_cluster.sh). Submitted from the
test bed's own cluster, so every command that forgot ``-M`` would ask the wrong controller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, _missing, run_main

pytestmark = [pytest.mark.slurm, pytest.mark.once]

FAR = "askapfar"
FAR_DIR = Path(os.environ.get("ASKAP_FAR_DIR", "/tmp/askap_testbed_far"))
CLIENT_CONF = FAR_DIR / "etc" / "client" / "slurm.conf"


def far_answers() -> bool:
    if not CLIENT_CONF.is_file():
        return False
    r = subprocess.run(["sinfo", "-M", FAR, "-h", "-o", "%P"], capture_output=True, text=True,
                       env={**os.environ, "SLURM_CONF": str(CLIENT_CONF)}, timeout=30)
    return r.returncode == 0 and "debug" in r.stdout


@pytest.fixture(scope="module")
def far_env():
    """The environment of a login node that reaches askapfar with -M (started if need be, and
    then stopped again at the end of the module)."""
    script = ROOT / "scripts" / "slurm_testbed.sh"
    started = False
    if not far_answers():
        if os.getuid() != 0:
            _missing("the second cluster needs root: scripts/slurm_testbed.sh up-second-cluster")
        r = subprocess.run(["bash", str(script), "up-second-cluster"], capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            _missing(f"slurm_testbed.sh up-second-cluster failed:\n{r.stdout}\n{r.stderr}")
        started = True
    yield {"SLURM_CONF": str(CLIENT_CONF)}
    if started:
        subprocess.run(["bash", str(script), "down-second-cluster"], capture_output=True,
                       timeout=120)


def queue(env: dict, prefix: str, far: bool) -> list[str]:
    """'name id' of the jobs named prefix* on askapfar (far) or on the test bed's own cluster."""
    argv = ["squeue", *(["-M", FAR] if far else []), "-h", "-o", "%j %i"]
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env},
                         timeout=30).stdout
    return sorted(line.strip() for line in out.splitlines() if line.startswith(prefix))


def profile(tmp_path: Path, prefix: str, sleep: int = 0, start_timeout: int = 60) -> Path:
    path = tmp_path / "far.yaml"
    args = f"  args: ['--sleep', '{sleep}']\n" if sleep else ""
    path.write_text(f"allocation:\n  clusters: {FAR}\n  job_name_prefix: {prefix}\n"
                    "  nodes: 1\n  ntasks_per_node: 2\n  cores: 1\n  memory: 500MB\n"
                    "  partition: debug\n  interface: lo\n  scheduler_interface: lo\n"
                    f"  start_timeout: {start_timeout}\n"
                    "mpi:\n  nodes: 1\n  ntasks: 2\n  mpi_plugin: pmi2\n  launcher: srun\n" + args)
    return path


def nothing_left(env: dict, prefix: str) -> None:
    deadline = time.monotonic() + 30  # scancel takes effect within KillWait
    while (queue(env, prefix, True) or queue(env, prefix, False)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert queue(env, prefix, True) == [], f"jobs left on {FAR}"
    assert queue(env, prefix, False) == [], "jobs left on the test bed's own cluster"


def test_a_clusters_subflow_runs_on_the_other_cluster(far_env, tmp_path, hello_program):
    """Its step runs longer than the watch waits for the job to appear on the board (10 s): a
    board that asked the wrong cluster fails it with "no SLURM job ... appeared"."""
    prefix = f"farok{os.getpid()}"
    far = profile(tmp_path, prefix, sleep=12, start_timeout=10)
    r = run_main("--backend", "slurm", "--profile", str(far),
                 "--subflows", "1", "--json", "--program", hello_program, timeout=180,
                 env={**far_env, "ASKAP_FLOWS_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    sub = json.loads(r.stdout)["subflows"][0]
    assert sub["state"] == "completed" and sub["nodes"] == ["farnode1"], sub
    assert len(sub["ranks"]) == 2
    nothing_left(far_env, prefix)


def test_sigint_cancels_the_jobs_on_the_other_cluster(far_env, tmp_path, hello_program):
    """The run's job waits PENDING behind a job holding the far node (a pending job never ends by
    itself): only a cancel with -M removes it."""
    prefix = f"farint{os.getpid()}"
    env = {**os.environ, **far_env, "ASKAP_FLOWS_HOME": str(tmp_path / "home")}
    env = {k: v for k, v in env.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    block = subprocess.run(["sbatch", "--parsable", "-M", FAR, "-p", "debug", "-n", "2", "-J",
                            f"blk{os.getpid()}", "-o", "/dev/null", "--wrap", "sleep 300"],
                           capture_output=True, text=True, env=env, timeout=30)
    assert block.returncode == 0, block.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.run", "--backend", "slurm", "--profile",
         str(profile(tmp_path, prefix, sleep=120)), "--subflows", "1", "--program",
         hello_program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 90
        while not any(" " in j for j in queue(far_env, prefix, True)):
            assert proc.poll() is None and time.monotonic() < deadline, \
                proc.communicate(timeout=30)[1][-3000:] if proc.poll() is not None else "no job"
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", "-M", FAR, block.stdout.strip().split(";")[0]], env=env,
                       timeout=30)
    assert proc.returncode == 130, err[-3000:]
    nothing_left(far_env, prefix)


def test_cleanup_finds_and_cancels_a_job_on_the_other_cluster(far_env, tmp_path):
    prefix = f"farcln{os.getpid()}"
    env = {**os.environ, **far_env}
    sub = subprocess.run(["sbatch", "-M", FAR, "-p", "debug", "-J", f"{prefix}-left",
                          "-o", "/dev/null", "--wrap", "sleep 120"], capture_output=True,
                         text=True, env=env, timeout=30)
    assert sub.returncode == 0 and f"on cluster {FAR}" in sub.stdout, sub.stderr
    cli = [sys.executable, "-m", "askap_flows.cli", "cleanup", "--prefix", prefix,
           "--clusters", FAR]
    listed = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and f"{prefix}-left" in listed.stdout, listed.stdout
    done = subprocess.run([*cli, "--yes"], capture_output=True, text=True, env=env, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    nothing_left(far_env, prefix)


FAR_FLOW = """
import json, sys
from prefect import flow
import askap_flows

@flow(name="far-steps")
def far_steps():
    return askap_flows.mpi_task(None, sys.argv[2])

result = far_steps.with_options(task_runner=askap_flows.task_runner(sys.argv[1]))()
print(json.dumps({"nodes": sorted({r.processor for r in result["ranks"]}),
                  "ranks": len(result["ranks"])}))
"""


def test_a_task_runner_with_clusters_runs_its_mpi_task_on_the_other_cluster(far_env, tmp_path,
                                                                           hello_program):
    """task_runner() with a clusters: profile: its job, its watch (the step outlasts the 10-s wait
    for the job to appear on the board), its lost-job watch and its cancel all go with -M."""
    prefix = f"farrun{os.getpid()}"
    script = tmp_path / "far_flow.py"
    script.write_text(FAR_FLOW)
    env = {**os.environ, **far_env, "ASKAP_FLOWS_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, str(script),
                        str(profile(tmp_path, prefix, sleep=12, start_timeout=10)),
                        hello_program], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"nodes": ["farnode1"], "ranks": 2}
    nothing_left(far_env, prefix)
