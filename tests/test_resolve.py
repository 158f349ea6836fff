"""resolve(): profile + YAML form + explicit arguments + backend -> one frozen, checked Resolved,
the one place every entry point (sub-flows, pools, the task runner, mpi_task, the main job, render,
doctor, cleanup) takes its specs from."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest

from askap_flows.resolve import Resolved, resolve
from askap_flows.spec import AllocationSpec, MPISpec, SpecError
from conftest import ROOT, run_main

pytestmark = pytest.mark.unit

MPI_YAML = ROOT / "examples" / "clusters" / "mpi.yaml"  # dask-jobqueue's form


def test_explicit_values_over_the_profile_over_the_defaults():
    r = resolve("testbed", allocation={"walltime": "05:00", "qos": None}, mpi={"timeout": 9})
    assert (r.allocation.walltime, r.allocation.partition, r.allocation.qos) == (
        "05:00", "debug", None)
    assert (r.mpi.ntasks, r.mpi.timeout, r.mpi.mpi_plugin) == (6, 9, "pmi2")
    assert r.where.endswith("testbed.yaml") and r.mpi_section["ntasks"] == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.backend = "local"  # type: ignore[misc]


def test_given_specs_win_and_an_unused_profile_is_not_read():
    alloc, spec = AllocationSpec(nodes=2), MPISpec(nodes=2, ntasks=2)
    r = resolve("/nowhere/missing.yaml", allocation=alloc, mpi=spec)
    assert (r.allocation, r.mpi, r.where) == (alloc, spec, "")
    r = resolve("/nowhere/missing.yaml", allocation=alloc, step=False)
    assert r.allocation is alloc and r.mpi is None


def test_unknown_explicit_keys_name_the_valid_ones():
    with pytest.raises(SpecError, match=r"^allocation: unknown key\(s\) nodez. Valid keys are: "
                                        r"nodes, ntasks_per_node, "):
        resolve("testbed", allocation={"nodez": 2})
    with pytest.raises(SpecError, match=r"^mpi: unknown key\(s\) rank. Valid keys are: nodes, "):
        resolve("testbed", mpi={"rank": 2})


def test_a_bad_value_names_the_section_and_the_profile():
    with pytest.raises(SpecError, match=r"^mpi \(profile .*testbed.yaml\): ntasks must be a whole"):
        resolve("testbed", mpi={"ntasks": "many"})


def test_the_local_backend_replaces_the_launcher_with_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="askap_flows"):
        r = resolve("testbed", backend="local")
    assert r.mpi.launcher == "mpiexec"
    assert r.launcher_note == ("launcher 'srun' replaced by 'mpiexec': the local backend runs MPI "
                               "on this machine, without SLURM (srun needs a SLURM job).")
    assert r.notes == (r.launcher_note,) and r.launcher_note in caplog.text


def test_a_step_inside_a_held_job_uses_srun_with_a_note():
    said: list[str] = []
    r = resolve("local", backend="slurm", launcher="srun", say=said.append)
    assert r.mpi.launcher == "srun" and said == [r.launcher_note]
    assert "'mpiexec' replaced by 'srun': the step runs inside a SLURM job" in said[0]
    quiet = resolve("local", backend="local", say=said.append)  # already mpiexec: nothing said
    assert quiet.launcher_note is None and quiet.notes == () and len(said) == 1


def test_command_line_size_sets_the_step_and_the_allocation_follows():
    r = resolve("testbed", nodes=1, ntasks=4)
    assert (r.mpi.nodes, r.mpi.ntasks, r.mpi.ntasks_per_node) == (1, 4, None)
    assert (r.allocation.nodes, r.allocation.ntasks_per_node) == (1, 4)
    r = resolve("local", backend="local", nodes=6)  # at least one rank per node
    assert (r.mpi.nodes, r.mpi.ntasks, r.allocation.nodes) == (6, 6, 6)


def test_a_new_layout_drops_the_profiles_ranks_per_node():
    r = resolve("testbed", mpi={"nodes": 1, "ntasks": 1})  # testbed: ntasks_per_node 2
    assert (r.mpi.nodes, r.mpi.ntasks, r.mpi.ntasks_per_node) == (1, 1, None)
    assert resolve("testbed", mpi={"timeout": 5}).mpi.ntasks_per_node == 2


def test_the_step_must_fit_the_allocation_unless_told_not_to_check():
    with pytest.raises(SpecError, match="wants 3 nodes but the allocation has 2"):
        resolve("testbed", allocation={"nodes": 2})
    assert resolve("testbed", allocation={"nodes": 2}, fit=False).mpi.nodes == 3


def test_which_profile_when_none_is_given(monkeypatch):
    monkeypatch.delenv("ASKAP_FLOWS_PROFILE", raising=False)
    assert resolve(None, backend="local").where.endswith("local.yaml")
    with pytest.raises(SpecError, match="the slurm backend needs a profile"):
        resolve(None, backend="slurm")
    monkeypatch.setenv("ASKAP_FLOWS_PROFILE", "testbed")
    assert resolve(None, backend="slurm").where.endswith("testbed.yaml")
    with pytest.raises(SpecError, match="backend 'pbs' is not one of local, slurm"):
        resolve("testbed", backend="pbs")


def test_the_jobqueue_form_is_only_for_the_task_runner():
    with pytest.raises(SpecError, match="dask-jobqueue's form .* which only "
                                        r"askap_flows.task_runner\(...\) reads"):
        resolve(MPI_YAML)
    r = resolve(MPI_YAML, any_form=True, step=False, say=lambda _: None)
    assert r.allocation is None and r.jobqueue is not None and r.prefix == "example-mpi"
    assert "is the prefix of the job names" in r.notes[0]
    with pytest.raises(SpecError, match="dask-jobqueue's form: --nodes.*job_extra_directives"):
        resolve(MPI_YAML, any_form=True, nodes=2)
    with pytest.raises(SpecError, match="form: it builds SLURM jobs, not the local backend's"):
        resolve(MPI_YAML, any_form=True, backend="local")
    with pytest.raises(SpecError, match="mixes the dask-jobqueue form"):
        resolve({"cluster_kwargs": {}, "allocation": {}}, any_form=True)


def test_the_adaptive_shape_is_checked_for_both_forms():
    r = resolve("testbed", step=False, allocation={"nodes": 1},
                adapt_kwargs={"minimum": 1, "maximum": 3})
    assert r.adapt_kwargs == {"minimum": 1, "maximum": 3} and r.mpi is None
    with pytest.raises(SpecError, match="single-node worker jobs.*nodes=3"):
        resolve("testbed", step=False, adapt_kwargs={"maximum": 3})
    with pytest.raises(SpecError, match="unknown key.*adapt_kwargs: maximun"):
        resolve("testbed", step=False, allocation={"nodes": 1}, adapt_kwargs={"maximun": 3})


def test_a_resolved_profile_resolves_a_step_over_its_mpi_section_without_reading():
    base = resolve({"allocation": {"nodes": 2, "ntasks_per_node": 2},
                    "mpi": {"nodes": 2, "ntasks": 4, "launcher": "mpiexec"}}, step=False)
    assert isinstance(base, Resolved) and base.mpi is None and base.where == "(mapping)"
    said: list[str] = []
    r = resolve(base, mpi={"timeout": 3}, launcher="srun", say=said.append)
    assert (r.mpi.ntasks, r.mpi.timeout, r.mpi.launcher) == (4, 3, "srun") and said
    assert r.allocation is base.allocation
    with pytest.raises(SpecError, match="wants 3 nodes but the allocation has 2"):
        resolve(base, mpi={"nodes": 3, "ntasks": 3})
    with pytest.raises(SpecError, match="a resolved profile's allocation is fixed"):
        resolve(base, allocation={"nodes": 1})


# --------------------------------------------------------------------------- the entry points
def test_subflows_and_pools_refuse_the_jobqueue_form_before_submitting():
    from askap_flows import array_subflow, mpi_subflow, pool

    for call in (lambda: mpi_subflow(backend="slurm", profile=MPI_YAML),
                 lambda: array_subflow(backend="slurm", profile=MPI_YAML),
                 lambda: pool.allocation(profile=MPI_YAML).__enter__()):
        with pytest.raises(SpecError, match=r"only askap_flows.task_runner\(...\) reads"):
            call()


def test_the_main_job_refuses_the_jobqueue_form(tmp_path):
    r = run_main("--backend", "slurm", "--profile", str(MPI_YAML),
                 env={"ASKAP_FLOWS_HOME": str(tmp_path / "h")}, timeout=120)
    assert r.returncode == 2 and "only askap_flows.task_runner(...) reads" in r.stderr
    assert "Traceback" not in r.stderr


def test_render_says_in_a_comment_that_the_launcher_was_replaced():
    r = subprocess.run([sys.executable, "-m", "askap_flows.cli", "render", "--profile", "testbed",
                        "--backend", "local"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-2] == ("# launcher 'srun' replaced by 'mpiexec': the local backend runs MPI on "
                         "this machine, without SLURM (srun needs a SLURM job).")
    assert lines[-1].startswith("mpiexec ")
