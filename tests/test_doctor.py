"""``askap-flows doctor``: the pure checks on their text, then the command on the real test bed."""

import subprocess
import sys

import pytest

from askap_flows import database, doctor, doctor_checks, doctor_mpi, doctor_report
from askap_flows.doctor_report import FAIL, OK, SKIP, WARN
from askap_flows.shell import Completed
from askap_flows.spec import MPISpec
from conftest import ROOT


def done(stdout="", stderr="", rc=0):
    return Completed(["x"], rc, stdout, stderr, 0.1)


SINFO = "debug*|up|3\nbig|up|2\nbig|up|6\nold|down|4\n"


@pytest.mark.unit
def test_partitions_exist_are_up_and_large_enough():
    big = {"available": "up", "nodes": 8, "default": False}
    assert doctor_checks.parse_partitions(SINFO)["big"] == big
    assert doctor_checks.partition_check("debug", 3, SINFO).status == OK
    row = doctor_checks.partition_check(None, 2, SINFO)
    assert row.status == OK and "(default) debug" in row.detail
    missing = doctor_checks.partition_check("workq", 1, SINFO)
    assert missing.status == FAIL and "'workq' does not exist" in missing.detail
    assert "big, debug, old" in missing.fix and "partition:" in missing.fix
    assert doctor_checks.partition_check("old", 1, SINFO).status == FAIL
    small = doctor_checks.partition_check("debug", 4, SINFO)
    assert small.status == FAIL and "nodes: <= 3" in small.fix
    assert doctor_checks.partition_check(None, 1, "big|up|2\n").status == FAIL  # no default partition


@pytest.mark.unit
def test_mpi_plugin_list_both_formats_and_flavour():
    old = ("MPI plugin types are...\n\tpmix\n\tnone\n\tpmi2\n"
           "specific pmix plugin versions available: pmix_v4\n")
    new = "srun: MPI types are...\nsrun: cray_shasta\nsrun: none\nsrun: pmi2\n"
    assert doctor_mpi.parse_mpi_list(old) == {"pmix", "none", "pmi2"}
    assert doctor_mpi.parse_mpi_list(new) == {"cray_shasta", "none", "pmi2"}
    assert doctor_mpi.mpi_flavour("HYDRA build details:\n Version: 4.0.2") == "mpich"
    assert doctor_mpi.mpi_flavour("mpiexec (OpenRTE) 4.1.4") == "openmpi"
    spec = MPISpec(nodes=2, ntasks=4, mpi_plugin="pmi2")
    assert doctor_mpi.mpi_plugin_check(spec, old, "mpich").status == OK
    wrong = doctor_mpi.mpi_plugin_check(MPISpec(mpi_plugin="pmix"), old, "mpich")
    assert wrong.status == FAIL and "singleton" in wrong.detail and "mpi_plugin: pmi2" in wrong.fix
    absent = doctor_mpi.mpi_plugin_check(MPISpec(mpi_plugin="pmix"), new, None)
    assert absent.status == FAIL and "cray_shasta, none, pmi2" in absent.fix
    assert doctor_mpi.mpi_plugin_check(MPISpec(launcher="mpiexec"), None, None).status == SKIP


@pytest.mark.unit
def test_account_and_reservation():
    no_db = done(stderr="You are not running a supported accounting_storage plugin", rc=1)
    row = doctor_checks.account_check("askaprt", no_db)
    assert row.status == SKIP and "accounting" in row.detail
    assert doctor_checks.account_check("askaprt", done("askaprt\n")).status == OK
    assert doctor_checks.account_check("nope", done("askaprt\n")).status == FAIL
    assert doctor_checks.account_check(None, None).status == SKIP
    gone = doctor_checks.reservation_check("askapdev", done(stderr="Reservation askapdev not found", rc=1))
    assert gone.status == FAIL and "not found" in gone.detail and gone.fix
    active = done("ReservationName=r1 StartTime=2026-01-01T00:00:00 EndTime=2026-12-01T00:00:00 "
                  "Nodes=n[1-3] State=ACTIVE")
    assert doctor_checks.reservation_check("r1", active).status == OK
    inactive = done(active.stdout.replace("ACTIVE", "INACTIVE"))
    assert doctor_checks.reservation_check("r1", inactive).status == WARN


@pytest.mark.unit
def test_a_failing_sinfo_dash_m_names_the_profiles_clusters_value():
    """sinfo -M X failed: the row names X and why, not 'load the slurm module' (issue 19.3)."""
    refused = done(stderr="sinfo: error: 'galaxy' can't be reached now, or it is an invalid "
                   "entry for --cluster.", rc=1)
    answers = done("debug\n")
    no_db = done(stderr="You are not running a supported accounting_storage plugin", rc=1)
    row = doctor_checks.cluster_check("galaxy", refused, answers, no_db)
    assert row.status == FAIL and row.detail.startswith("sinfo -M galaxy failed: cluster "
                                                        "'galaxy' is not known to this SLURM")
    assert "slurmdbd" in row.detail and "remove allocation: clusters:" in row.fix
    row = doctor_checks.cluster_check("galaxy,zeus", refused, answers, done("setonix\nzeus\n"))
    assert "cluster 'galaxy' is not known" in row.detail and "setonix, zeus" in row.detail
    assert "set allocation: clusters:" in row.fix
    row = doctor_checks.cluster_check("zeus", refused, answers, done("zeus\n"))
    assert "'zeus' is known to this SLURM but does not answer" in row.detail
    assert "can't be reached" in row.detail and "slurmctld" in row.fix
    down = doctor_checks.cluster_check("zeus", refused, done(stderr="Unable to contact slurm "
                                                           "controller", rc=1), None)
    assert "sinfo -M zeus failed, and sinfo exited 1" in down.detail and "SLURM_CONF" in down.fix


@pytest.mark.unit
def test_interfaces_pool_ports_and_table():
    here = {"lo": "127.0.0.1", "ib0": None}
    assert doctor_checks.interface_check("scheduler", "lo", here, must_be_here=True).status == OK
    missing = doctor_checks.interface_check("scheduler", "ib9", here, must_be_here=True)
    assert missing.status == FAIL and "does not exist" in missing.detail
    assert "ib0, lo" in missing.fix
    assert doctor_checks.interface_check("worker", "ib0", here, must_be_here=False).status == WARN
    # a server's /admin/settings: Prefect 3 nests the pool, Prefect 2 has flat names
    p3 = {"server": {"database": {"sqlalchemy": {"pool_size": 5, "max_overflow": 10}}}}
    p2 = {"PREFECT_SQLALCHEMY_POOL_SIZE": 30, "PREFECT_SQLALCHEMY_MAX_OVERFLOW": 30}
    assert doctor_checks.pool_check(4, p3, None).status == OK
    small = doctor_checks.pool_check(30, p3, None)
    assert small.status == WARN and "--max-concurrent 30" in small.fix
    assert doctor_checks.pool_check(30, p2, None).status == OK
    assert doctor_checks.pool_check(4, None, None).status == SKIP
    plan = database.Plan(url="postgresql+asyncpg://u:p@h:5432/db", server_env={},
                         pool=database.size_pool(8))
    assert "13+13" in doctor_checks.pool_check(8, None, plan).detail
    assert doctor_checks.ports_check((20000, 20010), [20001, 20002], 2, "127.0.0.1").status == OK
    assert doctor_checks.ports_check((20000, 20000), None, 2, "127.0.0.1", "taken").status == FAIL
    rows = [doctor_report.Check("a", OK, "fine"), doctor_report.Check("bb", FAIL, "broken", "do this")]
    text = doctor_report.render_table(rows)
    assert "bb     FAIL    broken" in text and "fix: do this" in text
    assert doctor_report.exit_code(rows) == 1 and doctor_report.exit_code(rows[:1]) == 0


# --------------------------------------------------------------------------- on the test bed
def doctor_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "askap_flows.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def statuses(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        for status in (OK, WARN, FAIL, SKIP):
            marker = f"  {status:6s}  "
            if marker in line and not line.startswith(" "):
                rows[line.split(marker)[0].strip()] = status
    return rows


@pytest.mark.unit
def test_a_run_and_doctor_look_interfaces_up_with_the_same_function(monkeypatch):
    """The scheduler's address of a run, `askap-flows server --interface` and doctor's rows all
    come from askap_flows.host: what doctor reports for an interface is what a run will do."""
    from askap_flows import host, slurm
    from askap_flows.spec import AllocationSpec

    monkeypatch.setattr(host, "interfaces", lambda: {"hsn0": "10.1.2.3", "eth7": None})
    assert doctor.local_interfaces() == {"hsn0": "10.1.2.3", "eth7": None}
    assert slurm.scheduler_host(AllocationSpec(scheduler_interface="hsn0")) == "10.1.2.3"
    assert database.interface_address("hsn0") == "10.1.2.3"
    row = doctor_checks.interface_check("scheduler", "eth7", doctor.local_interfaces(), must_be_here=True)
    assert row.status == FAIL and "'eth7' has no IPv4 address" in row.detail
    with pytest.raises(host.InterfaceError, match="'eth7' has no IPv4 address on this host"):
        slurm.scheduler_host(AllocationSpec(scheduler_interface="eth7"))


@pytest.mark.slurm
def test_doctor_testbed_profile_is_all_ok(hello_program):
    r = doctor_cli("--profile", "testbed", "--max-concurrent", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = statuses(r.stdout)
    assert set(rows) >= {"SLURM reachable", "partition", "MPI plugin", "mpicc + program",
                         "Prefect API/database", "database pool", "ports",
                         "interface (scheduler)", "interface (worker)"}
    not_ok = {k: v for k, v in rows.items() if v != OK}
    # the test bed's profile names no account and no reservation
    assert not_ok == {"account": SKIP, "reservation": SKIP}, r.stdout
    assert "no check failed" in r.stdout


@pytest.mark.slurm
def test_doctor_broken_profile_fails_with_fixes(tmp_path, hello_program):
    text = (ROOT / "src/askap_flows/profiles/testbed.yaml").read_text()
    text = (text.replace("partition: debug", "partition: nosuchpart")
                .replace("mpi_plugin: pmi2", "mpi_plugin: pmix")
                .replace("scheduler_interface: lo", "scheduler_interface: ib9")
                + "\n")
    text = text.replace("  start_timeout: 120",
                        "  start_timeout: 120\n  reservation: nosuchres\n  account: askaprt")
    profile = tmp_path / "broken.yaml"
    profile.write_text(text)
    r = doctor_cli("--profile", str(profile))
    assert r.returncode == 1, r.stdout + r.stderr
    rows = statuses(r.stdout)
    for name in ("partition", "MPI plugin", "interface (scheduler)", "reservation"):
        assert rows[name] == FAIL, r.stdout
    assert "'nosuchpart' does not exist" in r.stdout
    assert "fix: set allocation: partition: to one of debug" in r.stdout
    assert "fix: set mpi: mpi_plugin: pmi2" in r.stdout
    assert "'ib9' does not exist on this host" in r.stdout
    assert "4 check(s) failed" in r.stdout
    assert rows["account"] == SKIP and "no accounting database" in r.stdout  # no slurmdbd here
    assert "Traceback" not in r.stderr


@pytest.mark.slurm
def test_doctor_names_a_clusters_value_the_test_bed_does_not_know(tmp_path):
    """The pawsey_example case: `clusters:` names a cluster this SLURM cannot reach with -M."""
    text = (ROOT / "src/askap_flows/profiles/testbed.yaml").read_text()
    text = text.replace("  start_timeout: 120", "  start_timeout: 120\n  clusters: nosuchcluster")
    assert "clusters: nosuchcluster" in text
    profile = tmp_path / "clusters.yaml"
    profile.write_text(text)
    r = doctor_cli("--profile", str(profile))
    assert r.returncode == 1, r.stdout + r.stderr
    rows = statuses(r.stdout)
    assert rows["SLURM reachable"] == FAIL, r.stdout
    assert ("sinfo -M nosuchcluster failed: cluster 'nosuchcluster' is not known to this SLURM"
            in r.stdout), r.stdout
    assert "fix: remove allocation: clusters:" in r.stdout and "SLURM_CONF" not in r.stdout
    for name in ("partition", "account", "reservation", "MPI plugin"):
        assert rows[name] == SKIP
    assert "SLURM does not answer for clusters: nosuchcluster" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.mpi
def test_doctor_local_backend_skips_slurm(tmp_path, hello_program):
    r = doctor_cli("--backend", "local")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = statuses(r.stdout)
    for name in ("SLURM reachable", "partition", "MPI plugin"):
        assert rows[name] == SKIP
    assert rows["mpicc + program"] == OK and rows["Prefect API/database"] == OK
