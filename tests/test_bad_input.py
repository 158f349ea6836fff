"""Bad input: one clear message, exit 2, no traceback, nothing left in SLURM."""

import os
import shutil
import sys

import pytest

from conftest import run_main


def _no_traceback(r):
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.unit
def test_no_mpicc_says_what_to_install(tmp_path):
    if shutil.which("mpicc", path=os.path.dirname(sys.executable)):
        pytest.skip("this Python's own bin dir ships mpicc (the mpich wheel)")
    bindir = tmp_path / "bin"
    bindir.mkdir()  # a PATH without any MPI
    r = run_main(env={"PATH": str(bindir), "MPICC": "", "ASKAP_FLOWS_HOME": str(tmp_path / "h")},
                 cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "no MPI compiler (mpicc) found" in r.stderr
    assert "apt-get install mpich libmpich-dev" in r.stderr and "pip install mpich" in r.stderr
    _no_traceback(r)


@pytest.mark.unit
def test_missing_program_is_named(tmp_path):
    r = run_main("--program", str(tmp_path / "nope"), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert f"MPI program '{tmp_path / 'nope'}' does not exist" in r.stderr
    _no_traceback(r)


@pytest.mark.unit
def test_impossible_layout_is_refused_before_anything_runs(tmp_path):
    r = run_main("--nodes", "3", "--ntasks", "2", cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "ntasks (2) is smaller than nodes (3)" in r.stderr
    _no_traceback(r)


@pytest.mark.unit
def test_no_srun_on_path(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    r = run_main("--backend", "slurm", "--profile", "testbed",
                 env={"PATH": str(bindir)}, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "is not on PATH" in r.stderr and "SLURM" in r.stderr
    _no_traceback(r)


@pytest.mark.slurm
def test_slurm_not_reachable(tmp_path, hello_program):
    conf = tmp_path / "slurm.conf"
    text = open(os.environ["SLURM_CONF"]).read().replace("SlurmctldPort=6817", "SlurmctldPort=6999")
    conf.write_text(text)
    r = run_main("--backend", "slurm", "--profile", "testbed",
                 env={"SLURM_CONF": str(conf)}, cwd=tmp_path, timeout=180)
    assert r.returncode == 2
    assert "sinfo" in r.stderr and "slurm_testbed.sh up" in r.stderr
    _no_traceback(r)


@pytest.mark.slurm
def test_request_slurm_cannot_hold_is_rejected_before_submission(tmp_path, hello_program, no_jobs_left):
    r = run_main("--backend", "slurm", "--profile", "testbed", "--nodes", "5", "--ntasks", "5",
                 "--subflows", "1", cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert "SLURM rejected the job before submission" in r.stderr
    assert "Nothing was submitted" in r.stderr
    assert "Prefect server" not in r.stderr  # refused before anything started
    _no_traceback(r)


# --------------------------------------------------------------------------- hostile input
HOSTILE = "$(touch {m}1)`touch {m}2`;touch {m}3 && touch {m}4|touch {m}5"


@pytest.mark.unit
@pytest.mark.parametrize("key", ["partition", "account", "qos", "constraint", "interface"])
def test_shell_metacharacters_in_a_directive_value_are_refused(tmp_path, key):
    marker = tmp_path / "ran"
    profile = tmp_path / "evil.yaml"
    import yaml

    profile.write_text(yaml.safe_dump({"allocation": {key: HOSTILE.format(m=marker)}}))
    r = run_main("--backend", "slurm", "--profile", str(profile), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert f"{key} " in r.stderr and "cannot go into a job script" in r.stderr, r.stderr
    assert str(profile) in r.stderr  # the message names the file the value came from
    assert not list(tmp_path.glob("ran*")), "a command in a profile value ran"
    _no_traceback(r)


@pytest.mark.slurm
def test_shell_metacharacters_in_paths_args_and_env_are_quoted_not_run(tmp_path, hello_program,
                                                                      no_jobs_left):
    """Values that may hold any character reach SLURM and the program quoted: the job runs, and
    no marker file appears."""
    from askap_flows.flows import mpi_subflow

    marker = tmp_path / "ran"
    hostile = HOSTILE.format(m=marker)
    res = mpi_subflow(
        {"nodes": 1, "ntasks": 1, "ntasks_per_node": 1, "args": [hostile],
         "env": {"ASKAP_HOSTILE": hostile}},
        {"nodes": 1, "ntasks_per_node": 1, "local_directory": str(tmp_path / f"scratch {hostile}")},
        backend="slurm", profile="testbed", program=hello_program)
    assert res.job_id and len(res.ranks) == 1
    assert not list(tmp_path.glob("ran*")), "a command in a value ran"


@pytest.mark.unit
@pytest.mark.parametrize("section,key,value,says", [
    ("allocation", "walltime", "90 minutes", "is not a SLURM time"),
    ("allocation", "walltime", "1:2:3:4", "is not a SLURM time"),
    ("allocation", "walltime", "-01:00:00", "is not a SLURM time"),
    ("allocation", "memory", "lots", "memory 'lots' cannot go into a job script: memory must be a number with a unit"),
    ("allocation", "memory", "-4GB", "memory must be a number with a unit"),
    ("allocation", "nodes", -2, "nodes must be a whole number >= 1, got -2"),
    ("allocation", "ntasks_per_node", 0, "ntasks_per_node must be a whole number >= 1, got 0"),
    ("mpi", "ntasks", -6, "ntasks must be a whole number >= 1, got -6"),
    ("mpi", "ntasks", "6", "ntasks must be a whole number >= 1, got '6'"),
    ("mpi", "timeout", -1, "timeout must be a number of seconds > 0"),
])
def test_wrong_forms_and_negative_counts_in_a_profile(tmp_path, section, key, value, says):
    import yaml

    profile = tmp_path / "bad.yaml"
    profile.write_text(yaml.safe_dump({section: {key: value}}))
    r = run_main("--profile", str(profile), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert says in r.stderr and str(profile) in r.stderr, r.stderr
    _no_traceback(r)


@pytest.mark.unit
def test_negative_counts_on_the_command_line(tmp_path):
    r = run_main("--nodes", "-1", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "nodes must be a whole number >= 1, got -1" in r.stderr, r.stderr
    _no_traceback(r)


@pytest.mark.unit
def test_profile_path_that_does_not_exist(tmp_path):
    r = run_main("--profile", str(tmp_path / "nowhere" / "p.yaml"), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "does not exist. Give an existing YAML file" in r.stderr, r.stderr
    _no_traceback(r)


@pytest.mark.slurm
@pytest.mark.parametrize("key,value", [("memory", "900TB"), ("ntasks_per_node", 4096)])
def test_huge_requests_get_slurms_own_rejection(tmp_path, hello_program, key, value):
    import yaml

    profile = tmp_path / "huge.yaml"
    profile.write_text(yaml.safe_dump({"allocation": {"partition": "debug", "interface": "lo",
                                                      "scheduler_interface": "lo", key: value},
                                       "mpi": {"nodes": 1, "ntasks": 1}}))
    r = run_main("--backend", "slurm", "--profile", str(profile), cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert ("SLURM rejected the job before submission: allocation failure: Requested node "
            "configuration is not available") in r.stderr, r.stderr
    assert "Nothing was submitted" in r.stderr
    _no_traceback(r)


# --------------------------------------------------------------------------- every job-script field
#: every AllocationSpec field whose value reaches the job script (or the scheduler's command line)
SCRIPT_FIELDS = ["partition", "account", "qos", "reservation", "clusters", "constraint",
                 "interface", "scheduler_interface", "job_name_prefix", "memory", "walltime",
                 "python", "local_directory", "extra_directives", "prologue"]
#: fields that can only be names or sizes: every hostile value must be refused outright
NAME_FIELDS = ["partition", "account", "qos", "reservation", "clusters", "interface",
               "scheduler_interface", "job_name_prefix", "memory", "walltime"]
#: ``{p}`` is an executable that creates the marker file, ``{m}`` the marker file itself
HOSTILE_FORMS = ["lo;{p}", "lo|{p}", "lo&{p}", "lo&&{p}", "lo||{p}", "$({p})", "`{p}`",
                 "lo\n{p}", "lo\r\n{p}", "lo'{p}'", 'lo"{p}"', "lo' ;{p}; '", 'lo" ;{p}; "',
                 "lo|touch${{IFS}}{m}", "lo $({p})", "--gres=gpu:1\n{p}"]


def _sandbox(tmp_path):
    """A bin directory with a stand-in Python (records that the worker line was reached) and an
    attacker's program (creates the marker)."""
    import stat

    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker, reached = tmp_path / "MARKER", tmp_path / "reached"
    for name, body in (("python", f'echo "$@" > {reached}\n'), ("payload", f"touch {marker}\n")):
        exe = bindir / name
        exe.write_text(f"#!/bin/sh\n{body}")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bindir, marker, reached


def _execute_job_script(alloc, tmp_path, bindir):
    """Render the job script for ``alloc`` and run it with bash (no SLURM: #SBATCH lines are
    comments to bash, and the Dask worker's Python is the stand-in)."""
    import subprocess

    from askap_flows import slurm

    kwargs = slurm.cluster_kwargs(alloc, job_name=f"{alloc.job_name_prefix}-RUNID",
                                  log_directory=str(tmp_path / "logs"),
                                  env={"PREFECT_API_URL": "http://127.0.0.1:4200/api"},
                                  dashboard_address="127.0.0.1:0")
    script = tmp_path / "job.sh"
    script.write_text(slurm.render_job_script(kwargs, scheduler="tcp://127.0.0.1:1"))
    subprocess.run(["bash", str(script)], cwd=tmp_path, timeout=60, capture_output=True,
                   env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)})
    return script.read_text()


@pytest.mark.unit
@pytest.mark.parametrize("field", SCRIPT_FIELDS)
def test_hostile_values_in_every_job_script_field_are_refused_or_inert(tmp_path, field):
    """Each hostile value is either refused with a SpecError naming the field, the value and what
    is allowed, or, where the field may hold it, rendered into a job script that really runs under
    bash without running anything else: the marker file never appears."""
    from askap_flows import values
    from askap_flows.spec import AllocationSpec, SpecError

    bindir, marker, reached = _sandbox(tmp_path)
    base = {"partition": "debug", "interface": "lo", "python": str(bindir / "python")}
    refused = []
    for form in HOSTILE_FORMS:
        value = form.format(p=bindir / "payload", m=marker)
        given = [value] if field in ("extra_directives", "prologue") else value
        if field == "prologue" and "\n" not in value and "\r" not in value:
            continue  # prologue lines are the author's shell code by design (the next test)
        try:
            alloc = AllocationSpec(**{**base, field: given})
        except SpecError as exc:
            text = str(exc)
            assert field in text and repr(value) in text, text
            allowed = ("Use one of MM, MM:SS" if field == "walltime" else values.RULES[field][1])
            assert allowed in text, text
            refused.append(value)
            continue
        reached.unlink(missing_ok=True)
        script = _execute_job_script(alloc, tmp_path, bindir)
        assert not marker.exists(), f"{field}={value!r} ran a command:\n{script}"
        if field != "python":
            assert reached.exists(), f"the job script did not reach the worker line:\n{script}"
    if field in NAME_FIELDS:
        assert len(refused) == len(HOSTILE_FORMS), "a hostile value was accepted"
    breaks = [f.format(p=bindir / "payload", m=marker) for f in HOSTILE_FORMS if "\n" in f]
    assert set(breaks) <= set(refused), "a line break was accepted"  # in every field


@pytest.mark.unit
def test_prologue_lines_are_trusted_shell_code_and_run_as_written(tmp_path):
    """The documented exception: a prologue line is the profile author's shell code. It runs (the
    sandbox really executes what it renders); only a line break inside an entry is refused."""
    from askap_flows.spec import AllocationSpec

    bindir, marker, reached = _sandbox(tmp_path)
    alloc = AllocationSpec(partition="debug", interface="lo", python=str(bindir / "python"),
                           prologue=[f"{bindir / 'payload'}"])
    _execute_job_script(alloc, tmp_path, bindir)
    assert marker.exists() and reached.exists()


@pytest.mark.unit
def test_hostile_environment_variable_names_are_refused():
    from askap_flows.spec import MPISpec, SpecError

    for name in ("A;touch x", "A B", "$(x)", "1A", "A\nB", ""):
        with pytest.raises(SpecError, match="env: env_name .* must be an environment variable"):
            MPISpec(env={name: "1"})


@pytest.mark.unit
def test_hostile_home_directory_is_refused_or_inert(tmp_path):
    """The log directory (under ASKAP_FLOWS_HOME) is written in double quotes in '#SBATCH' lines:
    a double quote or a control character is refused, anything else stays inert."""
    from askap_flows import slurm
    from askap_flows.spec import AllocationSpec

    bindir, marker, reached = _sandbox(tmp_path)
    alloc = AllocationSpec(partition="debug", interface="lo", python=str(bindir / "python"))
    for bad in (f'/x";{bindir}/payload;"', f"/x\n{bindir}/payload", f"/x\r{bindir}/payload"):
        with pytest.raises(slurm.SlurmError, match="set ASKAP_FLOWS_HOME elsewhere"):
            slurm.cluster_kwargs(alloc, job_name="a-b", log_directory=bad, env={},
                                 dashboard_address="127.0.0.1:0")
    for odd in (f"/x$({bindir}/payload)", f"/x`{bindir}/payload`", f"/x;{bindir}/payload"):
        kwargs = slurm.cluster_kwargs(alloc, job_name="a-b", log_directory=odd,
                                      env={"ASKAP_FLOWS_HOME": odd},
                                      dashboard_address="127.0.0.1:0")
        script = tmp_path / "job.sh"
        script.write_text(slurm.render_job_script(kwargs, scheduler="tcp://127.0.0.1:1"))
        import subprocess

        subprocess.run(["bash", str(script)], cwd=tmp_path, timeout=60, capture_output=True,
                       env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)})
        assert reached.exists() and not marker.exists(), script.read_text()
        reached.unlink()
