"""The main job's life: one Prefect server, started before Prefect is imported and gone after any
signal; a quiet terminal after Ctrl-C; runs started at the same instant in one directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import migrated_home

SERVER_MARKS = ("server start", "create_app")  # `prefect server start`, its (or an ephemeral) uvicorn


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def prefect_servers(root: int) -> dict[int, tuple[int, str]]:
    """Prefect server processes descending from ``root``: pid -> (parent pid, command line)."""
    kids, found, todo = _children(), {}, [root]
    while todo:
        pid = todo.pop()
        for child in kids.get(pid, []):
            cmd = _cmdline(child)
            if any(mark in cmd for mark in SERVER_MARKS):
                found[child] = (pid, cmd)
            todo.append(child)
    return found


class ServerWatch(threading.Thread):
    """Records every Prefect server that descends from a process while it runs."""

    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.proc, self.seen = proc, {}

    def run(self) -> None:
        while self.proc.poll() is None:
            self.seen.update(prefect_servers(self.proc.pid))
            time.sleep(0.2)

    def servers(self) -> list[int]:
        """The distinct servers: a server's own uvicorn child is part of that server."""
        return sorted(pid for pid, (parent, _) in self.seen.items() if parent not in self.seen)

    def alive(self) -> list[str]:
        return [cmd for pid, (_, cmd) in self.seen.items() if _cmdline(pid) == cmd]


def _sleepy_profile(tmp_path: Path) -> Path:
    profile = tmp_path / "sleepy.yaml"
    profile.write_text("allocation:\n  nodes: 1\n  ntasks_per_node: 1\n  interface: lo\n"
                       "  scheduler_interface: lo\nmpi:\n  nodes: 1\n  ntasks: 1\n"
                       "  launcher: mpiexec\n  mpi_plugin: none\n  args: ['--sleep', '120']\n")
    return profile


def _start_run(tmp_path: Path, hello_program: str, *args: str) -> tuple[subprocess.Popen, ServerWatch]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    env["ASKAP_FLOWS_HOME"] = migrated_home(tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "askap_flows.run", "--program", hello_program, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        start_new_session=True)
    watch = ServerWatch(proc)
    watch.start()
    return proc, watch


def _wait_for(proc: subprocess.Popen, text: str) -> str:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the run ended before {text!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "group Ctrl-C"])
def test_a_run_talks_to_one_prefect_server_and_leaves_none(how, tmp_path, hello_program):
    """Prefect 3 imported before PREFECT_API_URL was set started a temporary server of its own next
    to the run's (left behind after SIGINT; a group Ctrl-C killed it first and the run then waited
    30 s for it). Now the process tree holds exactly one server, gone after any signal, and a
    terminal's Ctrl-C ends the run promptly. The terminal shows no traceback, and says once that
    the run was interrupted; the details are in the run's log file."""
    proc, watch = _start_run(tmp_path, hello_program, "--profile", str(_sleepy_profile(tmp_path)),
                             "--subflows", "2")
    head = _wait_for(proc, "mpi-1 started")
    time.sleep(3)  # the sub-flows' MPI steps run now
    sent = time.monotonic()
    if how == "group Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    _, rest = proc.communicate(timeout=120)
    ended = time.monotonic() - sent
    watch.join(timeout=5)
    err = head + rest
    assert proc.returncode == 130, err[-3000:]
    assert len(watch.servers()) == 1, f"Prefect servers of the run: {watch.seen}"
    assert watch.alive() == [], "a Prefect server outlived the run"
    assert ended < 20, f"the run took {ended:.0f} s to end after {how}"
    assert "Traceback" not in err, err[-3000:]
    assert err.count("received SIG") == 1, err[-3000:]
    said = [ln for ln in err.splitlines() if ln.startswith("interrupted: ")]
    assert len(said) == 1, err[-3000:]
    logs = list((tmp_path / "home" / "logs").glob("run-*.log"))
    assert len(logs) == 1 and logs[0].name in err
    # the killed steps are failures (MPICH's mpiexec exits 0 after forwarding the signal), and
    # the run's own handler had the signal: Prefect 3's, on the main thread, crashed the flow first
    assert " completed: " not in err, err[-3000:]
    assert "aborted by a termination signal" not in logs[0].read_text()
    # no MPI rank outlives the run: MPICH's hydra_pmi_proxy leaves mpiexec's process group, and
    # was left running with its rank (reparented to init) when only that group was killed
    deadline = time.monotonic() + 10
    while _ranks(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ranks(tmp_path) == [], "MPI processes outlived the run"


def _ranks(tmp_path: Path) -> list[str]:
    """This test's MPI processes still alive (their launcher ran in ``tmp_path``)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["status"] != "zombie" and ("--sleep 120" in cmd or "hydra_pmi_proxy" in cmd) \
                and str(p.info["cwd"] or "").startswith(str(tmp_path)):
            found.append(f"{p.info['pid']} {cmd}")
    return found


@pytest.mark.mpi
def test_a_finished_run_had_one_prefect_server(tmp_path, hello_program):
    proc, watch = _start_run(tmp_path, hello_program, "--subflows", "2", "--ntasks", "2")
    _, err = proc.communicate(timeout=300)
    watch.join(timeout=5)
    assert proc.returncode == 0, err[-3000:]
    assert len(watch.servers()) == 1, f"Prefect servers of the run: {watch.seen}"
    assert watch.alive() == []


@pytest.mark.mpi
@pytest.mark.once  # the lock is askap_flows' own (server.py), around either major's server start
def test_two_runs_started_at_the_same_instant_in_one_directory_both_complete(tmp_path, hello_program):
    """Both started a server on ./.askap_flows/prefect<major>/prefect.db and both ran Prefect's
    migrations at once: one server died with an alembic error (about half of the tries). Servers
    of one PREFECT_HOME now start one at a time (an flock held until the server answers)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_HOME", "PREFECT_API_URL", "ASKAP_FLOWS_HOME")}
    argv = [sys.executable, "-m", "askap_flows.run", "--subflows", "1", "--ntasks", "2",
            "--program", hello_program]
    # three pairs side by side, each pair in a fresh directory of its own (no database yet)
    pairs = []
    for round_ in range(3):
        cwd = tmp_path / f"project{round_}"
        cwd.mkdir()
        pairs.append([subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env, cwd=cwd) for _ in range(2)])
    try:
        for round_, procs in enumerate(pairs):
            for p in procs:
                err = p.communicate(timeout=300)[1]
                assert p.returncode == 0, f"pair {round_}: {err[-3000:]}"
    finally:
        for p in (p for procs in pairs for p in procs if p.poll() is None):
            p.kill()
            p.wait()


@pytest.mark.unit
def test_an_interrupt_before_the_subflows_start_is_not_forgotten():
    """A Ctrl-C that arrives while the parent flow run is being created must stop the sub-flows
    from starting (run_subflows cleared it); once that composition has ended, a new one runs."""
    from askap_flows import runners
    from askap_flows.composition import run_subflows

    try:
        runners.cancel_everything()  # the interrupt, before the composition
        first = run_subflows([lambda: 1, lambda: 2], max_concurrent=2)
        assert [str(o.error) for o in first] == ["not started: the pipeline is shutting down"] * 2
        second = run_subflows([lambda: 3], max_concurrent=1)  # the interrupt is over
        assert [o.value for o in second] == [3]
    finally:
        runners.shutting_down.clear()


@pytest.mark.unit
def test_each_prefect_major_has_its_own_home_by_default(tmp_path, monkeypatch):
    """Prefect 2 and 3 in one checkout shared ./.askap_flows/prefect/prefect.db, and the other
    major then refused it ("migrated by another Prefect version")."""
    from askap_flows import compat, server

    for name in ("ASKAP_FLOWS_HOME", "PREFECT_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    server.prepare_environment()
    assert os.environ["PREFECT_HOME"] == str(tmp_path / ".askap_flows" / f"prefect{compat.PREFECT_MAJOR}")


@pytest.mark.mpi
def test_the_example_pipeline_gets_its_server_as_the_main_job_does(tmp_path, hello_program):
    """examples/pipeline.py without PREFECT_API_URL: its processes reported to a temporary server
    of their own (Prefect 3: a uvicorn child of each process; in a SLURM job, one inside the job).
    With askap_flows.prefect_server() it starts one announced server, the one all of them use."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    env["ASKAP_FLOWS_HOME"] = migrated_home(tmp_path / "home")
    (tmp_path / "home" / "bin").mkdir(parents=True)
    os.symlink(hello_program, tmp_path / "home" / "bin" / Path(hello_program).name)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "examples" / "pipeline.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    watch = ServerWatch(proc)
    watch.start()
    out, err = proc.communicate(timeout=300)
    watch.join(timeout=5)
    assert proc.returncode == 0, err[-3000:]
    assert "Prefect UI for this run:" in err
    servers = [watch.seen[pid][1] for pid in watch.servers()]
    assert len(servers) == 1 and "server start" in servers[0], watch.seen
    assert watch.alive() == []


def _slurm_run(tmp_path: Path, hello_program: str, prefix: str) -> subprocess.Popen:
    profile = tmp_path / "slow.yaml"
    profile.write_text(f"allocation:\n  job_name_prefix: {prefix}\n"
                       "  nodes: 1\n  ntasks_per_node: 1\n  partition: debug\n"
                       "  interface: lo\n  scheduler_interface: lo\n"
                       "mpi:\n  nodes: 1\n  ntasks: 1\n  args: ['--sleep', '120']\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    env["ASKAP_FLOWS_HOME"] = migrated_home(tmp_path / "home")
    return subprocess.Popen(
        [sys.executable, "-m", "askap_flows.run", "--backend", "slurm", "--profile", str(profile),
         "--subflows", "2", "--max-concurrent", "2", "--program", hello_program],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)


def _queued(prefix: str) -> list[str]:
    from conftest import askap_jobs

    return askap_jobs(prefix)


def _nothing_left(prefix: str, home: Path) -> None:
    deadline = time.monotonic() + 30  # scancel takes effect within SLURM's KillWait
    while _queued(prefix) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _queued(prefix) == [], "SLURM jobs of the run are left"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert [line for line in ps.splitlines() if str(home) in line] == []


@pytest.mark.slurm
def test_a_signal_during_start_up_starts_no_subflow(tmp_path, hello_program):
    """Ctrl-C while the parent flow run was being created was forgotten (run_subflows cleared
    it): the sub-flows started and submitted jobs, and 30 s later the run os._exit-ed with them
    live. Now no sub-flow starts, and no job is left."""
    prefix = f"lcstart{os.getpid()}"
    proc = _slurm_run(tmp_path, hello_program, prefix)
    head = _wait_for(proc, "running 2 sub-flow(s)")
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=120)
    err = head + rest
    assert proc.returncode == 130, err[-3000:]
    assert out.count("not started") == 2 and "0 completed" in out, out + err[-3000:]
    assert " started (" not in err, err[-3000:]  # no sub-flow started
    _nothing_left(prefix, tmp_path / "home")


@pytest.mark.slurm
def test_a_double_signal_leaves_no_job(tmp_path, hello_program):
    """A second Ctrl-C os._exit-ed at once, possibly before the first one's cancels were made.
    Now it waits for them: after two signals in a row, no job and no process of the run is left."""
    prefix = f"lcdouble{os.getpid()}"
    proc = _slurm_run(tmp_path, hello_program, prefix)
    deadline = time.monotonic() + 120
    while len(_queued(prefix)) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    assert len(_queued(prefix)) == 2, "the run's two jobs never appeared"
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    _nothing_left(prefix, tmp_path / "home")
