"""Every command in README.md is exercised: run here, by a named test, or a documented exception.

The pipeline script in README.md is examples/pipeline.py, character for character, and it runs.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = ROOT / "README.md"

#: the two long commands, not run by any pytest test, and why
NOT_RUN_BY_PYTEST = {
    "python3 -m venv .venv && .venv/bin/pip install -c package_list.txt '.[mpi]' && "
    ".venv/bin/python -m askap_flows.run":
        # building a venv from PyPI takes minutes and the network; the run itself is tested
        ("tests/test_local.py", "def test_main_job_with_defaults_needs_no_slurm"),
    "sudo ./scripts/test.sh":  # the test command itself: CI runs exactly this (.ci/run)
        ("scripts/test.sh", "pytest"),
}
#: commands that other tests run (the file holds the same invocation, maybe with fewer sub-flows)
RUN_BY_OTHER_TESTS = {
    ".venv/bin/python -m askap_flows.run --backend slurm --profile testbed --subflows 6 --json":
        ("tests/test_slurm.py", '"--backend", "slurm", "--profile", "testbed", "--subflows"'),
    ".venv/bin/askap-flows cleanup": ("tests/test_concurrency.py", '"askap_flows.cli", "cleanup"'),
}
#: commands this file runs, in this order
RUN_HERE = [
    ".venv/bin/askap-flows build-mpi",
    ".venv/bin/askap-flows doctor --profile testbed",
    ".venv/bin/python examples/pipeline.py",
]


#: docs/writing_subflows.md's commands: each is run here as written, from a directory that holds
#: examples/ and a .venv/bin/python (this interpreter), like a checkout with the README's venv
GUIDE = ROOT / "docs" / "writing_subflows.md"
GUIDE_LOCAL = ".venv/bin/python examples/own_programs.py"
GUIDE_SLURM = ".venv/bin/python examples/own_programs.py slurm testbed"


def blocks(language: str, path=README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def readme_commands(path=README) -> list[str]:
    """Each command line of the file's bash blocks (comments and blank lines dropped)."""
    out = []
    for block in blocks("bash", path):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def argv_of(command: str) -> list[str]:
    """The README command as this test environment runs it (the venv is this interpreter)."""
    argv = shlex.split(command)
    if argv[0] == ".venv/bin/askap-flows":
        return [sys.executable, "-m", "askap_flows.cli", *argv[1:]]
    if argv[0] == ".venv/bin/python":
        return [sys.executable, *argv[1:]]
    raise AssertionError(f"no way to run {command!r} here")


@pytest.mark.unit
def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) == len(set(commands)), commands
    known = set(NOT_RUN_BY_PYTEST) | set(RUN_BY_OTHER_TESTS) | set(RUN_HERE)
    assert set(commands) == known, (
        f"README commands nobody runs: {sorted(set(commands) - known)}; listed here but no longer "
        f"in README: {sorted(known - set(commands))}. Add a test that runs each new command.")
    for path, needle in {**NOT_RUN_BY_PYTEST, **RUN_BY_OTHER_TESTS}.values():
        assert needle in (ROOT / path).read_text(), f"{path} no longer contains {needle!r}"


@pytest.mark.unit
def test_readme_pipeline_is_examples_pipeline():
    example = (ROOT / "examples" / "pipeline.py").read_text()
    assert example in blocks("python"), "README's pipeline block differs from examples/pipeline.py"
    assert len(example.splitlines()) <= 25


@pytest.mark.slurm
def test_readme_commands_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for command in RUN_HERE:
        r = subprocess.run(argv_of(command), capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env=env)
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        if "examples/pipeline.py" in command:
            lines = [line for line in r.stdout.splitlines() if re.match(r"^\d ", line)]
            assert [line.split()[:2] for line in lines] == [["0", "ok"], ["1", "ok"], ["2", "ok"]]
            assert all("/status" in line for line in lines)  # each sub-flow's dashboard
        if "doctor" in command:
            assert "no check failed" in r.stdout


def run_as_written(command: str, where) -> subprocess.CompletedProcess:
    """Run a guide's command line with bash, unchanged, in ``where``: a directory with the
    checkout's examples/ and a .venv/bin/python that is this test's interpreter."""
    (where / "examples").symlink_to(ROOT / "examples")
    venv_python = where / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    venv_python.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=420,
                          cwd=where, env=env)


def own_programs_lines(r: subprocess.CompletedProcess, where) -> dict[str, str]:
    """The example's three result lines, each a 2-rank world, launched as the guide says."""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if re.match(r"^\d ok ", line)}
    assert sorted(lines) == ["0", "1", "2"], r.stdout[-2000:]
    for line in lines.values():
        assert " 0/2 1/2 | " in line  # one world of 2 ranks, not 2 singletons
    assert str(where / "build" / "my_mpi_program") in lines["0"]
    assert "-m askap_flows.mpi_hello" in lines["1"]
    wrapped = f"{ROOT / 'examples' / 'container.sh'} {where / 'build' / 'my_mpi_program'}"
    assert wrapped in lines["2"]
    return lines


@pytest.mark.unit
def test_writing_subflows_commands_are_the_ones_run_here():
    """The guide's bash commands are exactly those the two tests below run as written (so a
    `python ...` that needs an activated venv, or a new command, is caught)."""
    assert readme_commands(GUIDE) == [GUIDE_LOCAL, GUIDE_SLURM], readme_commands(GUIDE)


@pytest.mark.mpi
def test_writing_subflows_example_runs(tmp_path):
    """docs/writing_subflows.md shows examples/own_programs.py, which runs a C program, an mpi4py
    program and a wrapped ("container") program, each as a 2-rank world; its first command runs
    here as written (local backend: mpiexec)."""
    example = (ROOT / "examples" / "own_programs.py").read_text()
    assert f"```python\n{example}```" in GUIDE.read_text(), "the guide's example differs"
    lines = own_programs_lines(run_as_written(GUIDE_LOCAL, tmp_path), tmp_path)
    assert "mpiexec -n 2 " in lines["0"].split("| ")[1]


@pytest.mark.slurm
def test_writing_subflows_slurm_command_runs(tmp_path):
    """The guide's second command, as written, on the test bed: srun inside a SLURM job (the
    session's Prefect server is in PREFECT_API_URL, as the guide requires)."""
    lines = own_programs_lines(run_as_written(GUIDE_SLURM, tmp_path), tmp_path)
    for line in lines.values():
        assert "srun --mpi=pmi2 " in line.split("| ")[1], line


@pytest.mark.unit
def test_site_guide_shows_the_services_and_pipeline_jobs_as_shipped():
    """The batch scripts in docs/site_guide.md are examples/*.sbatch, character for character
    (tests/test_services_job.py runs those files on the test bed)."""
    shown = blocks("bash", ROOT / "docs" / "site_guide.md")
    for name in ("prefect_services.sbatch", "pipeline_job.sbatch"):
        assert (ROOT / "examples" / name).read_text() in shown, f"site_guide.md differs from {name}"
