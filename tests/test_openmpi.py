"""Open MPI with PMIx next to MPICH on the test bed: the testbed_openmpi profile across 3 nodes,
and both plugin/library mismatches refused with their one-line fix, by a run and by ``doctor``."""

import json
import shutil
import subprocess

import pytest

from askap_flows import doctor_mpi, doctor_report, mpi
from askap_flows.shell import CommandError
from askap_flows.spec import MPISpec
from askap_flows.spec_profile import PROFILE_DIR, build_specs
from conftest import ROOT, run_main
from test_doctor import doctor_cli, statuses

OMPI_CC = "/usr/bin/mpicc.openmpi"


def linked(program: str) -> str:
    return subprocess.run(["ldd", program], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def ompi_program():
    """The check program built with Open MPI's wrapper, as the testbed_openmpi profile does."""
    if shutil.which(OMPI_CC) is None:
        pytest.fail(f"{OMPI_CC} is missing: scripts/slurm_testbed.sh up installs Open MPI",
                    pytrace=False)
    return str(mpi.build_hello(mpicc=OMPI_CC))


# --------------------------------------------------------------------------- unit
@pytest.mark.unit
def test_program_paths_per_mpi_family_and_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv(mpi.HOME_ENV, str(tmp_path))
    mpich, ompi = mpi.default_program(), mpi.default_program(OMPI_CC)
    assert mpich == tmp_path / "bin" / "mpi_hello_world"
    assert ompi.parent.parent == tmp_path / "bin" and ompi.parent.name.startswith("mpicc.openmpi-")
    assert mpi.default_program("/opt/other/mpicc.openmpi") != ompi  # same name, other MPI
    with pytest.raises(mpi.MPIError, match="mpi: mpicc: /nonexistent/mpicc.openmpi"):
        mpi.build_hello(mpicc="/nonexistent/mpicc.openmpi")
    row = doctor_mpi.mpicc_check(None, None, ompi, None, False, wanted="/nonexistent/mpicc.openmpi")
    assert row.status == doctor_report.FAIL and "apt-get install openmpi-bin" in row.fix
    _, spec = build_specs("testbed_openmpi")
    assert spec.mpi_plugin == "pmix" and spec.mpicc == OMPI_CC
    assert mpi.launch_command(spec)[-1] == str(ompi)


@pytest.mark.unit
def test_library_from_ldd_and_wrapper_and_the_fixes():
    ompi = "\tlibmpi.so.40 => /lib/x86_64-linux-gnu/libmpi.so.40 (0x7f)\n\tlibc.so.6 => /x (0x1)\n"
    assert doctor_mpi.linked_flavour(ompi) == ("openmpi", "libmpi.so.40")
    assert doctor_mpi.linked_flavour("\tlibmpich.so.12 => /lib/libmpich.so.12 (0x7f)\n")[0] == "mpich"
    assert doctor_mpi.linked_flavour("\tlibmpi.so.12 => /venv/lib/libmpi.so.12 (0x7f)\n")[0] == "mpich"
    assert doctor_mpi.linked_flavour("\tlibc.so.6 => /x (0x1)\n") == (None, "")
    assert doctor_mpi.wrapper_flavour("gcc -I/usr/include/x86_64-linux-gnu/mpich -lmpich") == "mpich"
    assert doctor_mpi.wrapper_flavour("gcc -I/usr/lib/x86_64-linux-gnu/openmpi/include -lmpi") == "openmpi"
    lines = ["srun: pmi2 ...", "but OMPI was not built with SLURM's PMI support and therefore cannot",
             "srun: error: node1: tasks 0-3: Exited with exit code 1"]
    hint = mpi.first_failure(lines, "pmi2")
    assert "--mpi=pmi2" in hint and hint.endswith("Fix: set mpi: mpi_plugin: pmix in the profile.")
    pmix = MPISpec(nodes=3, ntasks=6, mpi_plugin="pmix")
    row = doctor_mpi.mpi_plugin_check(pmix, "\tpmix\n\tpmi2\n", "mpich")
    assert row.status == doctor_report.FAIL and row.fix == "set mpi: mpi_plugin: pmi2 in the profile"
    row = doctor_mpi.mpi_plugin_check(MPISpec(mpi_plugin="pmi2"), "\tpmix\n\tpmi2\n", "openmpi")
    assert row.status == doctor_report.FAIL and "MPI_Init would abort" in row.detail
    assert row.fix == "set mpi: mpi_plugin: pmix in the profile"


# --------------------------------------------------------------------------- test bed
@pytest.mark.slurm
def test_testbed_status_reports_both_mpi_families():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_testbed.sh"), "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "status: OK" in r.stdout, r.stdout + r.stderr
    family = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("  M")}
    assert "(mpicc -> /usr/bin/mpicc.mpich), srun --mpi=pmi2" in family["MPICH"], r.stdout
    (ompi,) = [line for line in r.stdout.splitlines() if line.startswith("  Open MPI")]
    assert "(/usr/bin/mpicc.openmpi, PMIx " in ompi and ompi.endswith("srun --mpi=pmix"), ompi


@pytest.mark.slurm
def test_openmpi_subflow_across_three_nodes_apart_from_mpich(ompi_program, hello_program,
                                                            no_jobs_left):
    from askap_flows.flows import mpi_subflow

    assert "libmpi.so.40" in linked(ompi_program) and "libmpich" in linked(hello_program)
    assert ompi_program != hello_program
    assert shutil.which("mpicc") and "mpich" in subprocess.run(
        ["mpicc", "-show"], capture_output=True, text=True).stdout  # mpicc stays MPICH's
    res = mpi_subflow(None, None, backend="slurm", profile="testbed_openmpi", name="ompi")
    assert res.command[:2] == ["srun", "--mpi=pmix"] and res.command[-1] == ompi_program
    assert [r.rank for r in res.ranks] == list(range(6))
    assert {r.size for r in res.ranks} == {6} and all(r.allreduce_ok for r in res.ranks)
    assert {r.processor for r in res.ranks} == {"node1", "node2", "node3"}


@pytest.mark.slurm
def test_main_job_with_openmpi_profile(ompi_program, tmp_path, no_jobs_left):
    r = run_main("--backend", "slurm", "--profile", "testbed_openmpi", "--subflows", "1",
                 "--json", env={"ASKAP_FLOWS_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    (sub,) = json.loads(r.stdout)["subflows"]
    assert sub["state"] == "completed", sub
    assert {x["size"] for x in sub["ranks"]} == {6} and len(sub["ranks"]) == 6
    assert {x["processor"] for x in sub["ranks"]} == {"node1", "node2", "node3"}
    built = list((tmp_path / "home" / "bin").glob("mpicc.openmpi-*/mpi_hello_world"))
    assert len(built) == 1 and "libmpi.so.40" in linked(str(built[0]))
    assert not (tmp_path / "home" / "bin" / "mpi_hello_world").exists()  # MPICH's not touched


@pytest.mark.slurm
def test_mpich_launched_with_pmix_is_refused(hello_program, no_jobs_left):
    from askap_flows.flows import mpi_subflow

    with pytest.raises(mpi.MPIError, match="singleton worlds") as err:
        mpi_subflow({"mpi_plugin": "pmix"}, None, backend="slurm", profile="testbed")
    assert "Fix: set mpi: mpi_plugin: pmi2 in the profile" in str(err.value)


@pytest.mark.slurm
def test_openmpi_launched_with_pmi2_is_refused(ompi_program, no_jobs_left):
    from askap_flows.flows import mpi_subflow

    with pytest.raises(CommandError) as err:
        mpi_subflow({"mpi_plugin": "pmi2"}, None, backend="slurm", profile="testbed_openmpi")
    last = str(err.value).splitlines()[-1]
    assert last.startswith("MPI_Init aborted: the program is built with Open MPI"), str(err.value)
    assert last.endswith("Fix: set mpi: mpi_plugin: pmix in the profile.")


@pytest.mark.slurm
def test_doctor_names_the_linked_library_and_fails_both_mismatches(ompi_program, hello_program,
                                                                  tmp_path):
    ok = doctor_cli("--profile", "testbed_openmpi")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"Open MPI: {ompi_program} is linked against libmpi.so.40" in ok.stdout
    for name, line, fix in (
            ("testbed_openmpi", "mpi_plugin: pmix", "mpi_plugin: pmi2"),  # Open MPI + pmi2
            ("testbed", "mpi_plugin: pmi2", "mpi_plugin: pmix")):         # MPICH + pmix
        bad = tmp_path / f"{name}_wrong.yaml"
        bad.write_text((PROFILE_DIR / f"{name}.yaml").read_text().replace(line, fix))
        r = doctor_cli("--profile", str(bad))
        assert r.returncode == 1 and statuses(r.stdout)["MPI plugin"] == doctor_report.FAIL, r.stdout
        assert f"fix: set mpi: {line} in the profile" in r.stdout
        family = "Open MPI" if name == "testbed_openmpi" else "MPICH"
        (row,) = [x for x in r.stdout.splitlines() if x.startswith("MPI library")]
        assert statuses(r.stdout)["MPI library"] == doctor_report.OK and f"  {family}: " in row
