import pytest

from askap_flows.mpi import launch_command
from askap_flows.resolve import resolve
from askap_flows.spec import AllocationSpec, MPISpec, SpecError, check_fits, walltime_seconds
from askap_flows.spec_profile import build_specs, packaged_profiles, read_profile

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("30:15", 1815), ("01:02:03", 3723), ("2-0", 172800),
    ("1-02:03", 93780), ("1-02:03:04", 93784),
])
def test_walltime_forms(text, seconds):
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("bad", ["1h", "", "1:2:3:4", "-5", "ten"])
def test_walltime_rejected_with_the_forms(bad):
    with pytest.raises(SpecError, match="MM, MM:SS, HH:MM:SS, D-HH"):
        walltime_seconds(bad)


def test_ntasks_smaller_than_nodes_says_the_fix():
    with pytest.raises(SpecError) as e:
        MPISpec(nodes=3, ntasks=2)
    assert str(e.value) == ("ntasks (2) is smaller than nodes (3): every node needs at least one "
                            "rank. Use ntasks >= 3 or nodes <= 2.")


def test_ntasks_must_equal_nodes_times_per_node():
    with pytest.raises(SpecError, match=r"ntasks \(5\) must equal nodes x ntasks_per_node \(2 x 2 = 4\)"):
        MPISpec(nodes=2, ntasks=5, ntasks_per_node=2)


@pytest.mark.parametrize("field", ["nodes", "ntasks"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_counts_must_be_positive_integers(field, value):
    with pytest.raises(SpecError, match=f"{field} must be a whole number >= 1"):
        MPISpec(**{field: value})


def test_unknown_plugin_names_the_choices():
    with pytest.raises(SpecError, match="MPICH needs 'pmi2', Open MPI 'pmix', Cray MPICH 'cray_shasta'"):
        MPISpec(mpi_plugin="pmi3")
    for plugin in ("cray_shasta", "pmix_v4"):  # site plugins are accepted and rendered as given
        assert f"--mpi={plugin}" in launch_command(MPISpec(mpi_plugin=plugin), "/bin/prog")


def test_memory_must_have_a_unit_form():
    with pytest.raises(SpecError, match="memory 'lots' cannot go into a job script: memory must be a number with a unit"):
        AllocationSpec(memory="lots")


def test_mpi_layout_must_fit_the_allocation():
    with pytest.raises(SpecError, match="wants 3 nodes but the allocation has 2"):
        check_fits(MPISpec(nodes=3, ntasks=3), AllocationSpec(nodes=2))
    with pytest.raises(SpecError, match="puts 4 ranks on a node but the allocation has ntasks_per_node=2"):
        check_fits(MPISpec(nodes=1, ntasks=4), AllocationSpec(nodes=1, ntasks_per_node=2))


def test_packaged_profiles_load_and_fit():
    names = set(packaged_profiles())
    assert {"local", "testbed", "pawsey_example"} <= names
    for name in names:
        alloc, spec = build_specs(name)
        check_fits(spec, alloc)
    alloc, spec = build_specs("testbed")
    assert (alloc.nodes, alloc.partition, alloc.interface) == (3, "debug", "lo")
    assert (spec.nodes, spec.ntasks, spec.mpi_plugin) == (3, 6, "pmi2")


def test_explicit_values_win_over_the_profile():
    alloc, spec = build_specs("testbed", allocation={"nodes": 2}, mpi={"nodes": 2, "ntasks": 4,
                                                                       "ntasks_per_node": 2})
    assert alloc.nodes == 2 and alloc.partition == "debug" and spec.ntasks == 4


def test_unknown_key_lists_the_valid_ones(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("allocation:\n  nodez: 3\n")
    with pytest.raises(SpecError, match=r"unknown key\(s\) in 'allocation': nodez. Valid keys are: nodes, "):
        read_profile(p)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("allocation:\n  nodes: 3\n mpi: [\n")
    with pytest.raises(SpecError, match=rf"profile {p}: not valid YAML at line \d+"):
        read_profile(p)


def test_wrong_type_in_profile_is_named(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("mpi:\n  ntasks: many\n")
    with pytest.raises(SpecError) as e:
        build_specs(p)
    assert str(e.value) == f"mpi (profile {p}): ntasks must be a whole number >= 1, got 'many'."


def test_missing_profile_path_and_unknown_name():
    with pytest.raises(SpecError, match="profile file '/nope/x.yaml' does not exist"):
        read_profile("/nope/x.yaml")
    with pytest.raises(SpecError, match="unknown profile 'galaxy'. Packaged profiles: "):
        read_profile("galaxy")


def test_slurm_backend_without_profile_says_what_to_pass(monkeypatch):
    monkeypatch.delenv("ASKAP_FLOWS_PROFILE", raising=False)
    with pytest.raises(SpecError, match="the slurm backend needs a profile"):
        resolve(None, backend="slurm")


def test_local_backend_uses_mpiexec():
    assert resolve(None, backend="local", mpi={"launcher": "srun"}).mpi_spec().launcher == "mpiexec"


# --------------------------------------------------------------------------- one error family
def test_every_library_error_derives_from_askap_flows_error_and_keeps_its_old_base():
    import askap_flows
    from askap_flows import database, host, mpi, ports, server, shell, slurm

    expected = {SpecError: ValueError, slurm.SlurmError: RuntimeError, mpi.MPIError: RuntimeError,
                database.DatabaseError: RuntimeError, ports.PortError: RuntimeError,
                shell.CommandError: RuntimeError, server.ServerError: RuntimeError,
                host.InterfaceError: ValueError}
    for cls, old in expected.items():
        assert issubclass(cls, askap_flows.AskapFlowsError) and issubclass(cls, old), cls
    assert issubclass(slurm.JobLost, askap_flows.AskapFlowsError)
    assert "AskapFlowsError" in askap_flows.__all__


def test_a_count_below_its_minimum_is_one_kind_of_error_everywhere(monkeypatch):
    """nodes, retries, n_arrays, size, max_concurrent, the sqlite limit: one SpecError, one text."""
    from askap_flows import composition, database, flows

    cases = [
        (lambda: AllocationSpec(nodes=0), "nodes must be a whole number >= 1, got 0"),
        (lambda: MPISpec(ntasks=True), "ntasks must be a whole number >= 1, got True"),
        (lambda: flows.mpi_subflow(retries=-1), "retries must be a whole number >= 0, got -1"),
        (lambda: flows.array_subflow(n_arrays=0), "n_arrays must be a whole number >= 1, got 0"),
        (lambda: flows.array_subflow(size=2.5), "size must be a whole number >= 1, got 2.5"),
        (lambda: composition.run_subflows([], max_concurrent=0),
         "max_concurrent must be a whole number >= 1, got 0"),
        (lambda: database.size_pool(0), "max_concurrent must be a whole number >= 1, got 0"),
        (lambda: database.sqlite_limit({database.SQLITE_LIMIT_ENV: "0"}),
         f"{database.SQLITE_LIMIT_ENV} must be a whole number >= 1, got 0"),
    ]
    for call, text in cases:
        with pytest.raises(SpecError) as err:
            call()
        assert str(err.value) == text + "."
