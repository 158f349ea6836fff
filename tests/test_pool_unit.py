"""The pool's node ledger and the command line of a pooled step (pure, no SLURM)."""

import pytest

from askap_flows.ledger import LedgerError, NodeLedger
from askap_flows.spec import MPISpec

pytestmark = pytest.mark.unit

NODES = ["node1", "node2", "node3"]


def test_small_steps_share_a_node_and_leave_whole_nodes_free():
    led = NodeLedger(NODES, 4)
    a, b = led.request(1, 2), led.request(1, 2)
    wide = led.request(2, 4)
    started = led.assign()
    assert started == {a: ["node1"], b: ["node1"], wide: ["node2", "node3"]}
    assert led.free == {"node1": 0, "node2": 0, "node3": 0}


def test_best_fit_prefers_the_fullest_node_that_still_fits():
    led = NodeLedger(NODES, 4)
    first = led.request(1, 3)
    assert led.assign() == {first: ["node1"]}
    small = led.request(1, 1)
    assert led.assign() == {small: ["node1"]}  # not node2: that one stays whole
    led.release(first)
    led.release(small)
    second = led.request(1, 3)
    led.assign()
    other = led.request(1, 3)
    assert led.assign() == {other: ["node2"]}
    led.release(second)  # node1 whole again, node2 has 1 CPU free
    tiny = led.request(1, 1)
    assert led.assign() == {tiny: ["node2"]}  # the fullest node that holds it, not the first


def test_first_in_first_out_no_overtaking():
    led = NodeLedger(NODES, 4)
    big = led.request(3, 4)
    led.assign()
    wide = led.request(3, 1)  # waits for the big one
    small = led.request(1, 1)  # would fit as soon as anything frees, but must not overtake
    assert led.assign() == {}
    assert led.waiting(wide) == 0 and led.waiting(small) == 1
    led.release(big)
    assert led.assign() == {wide: NODES, small: ["node1"]}


def test_a_stream_of_small_steps_does_not_starve_a_wide_one():
    led = NodeLedger(NODES, 2)
    held = [led.request(1, 2) for _ in range(3)]
    led.assign()
    wide = led.request(3, 2)
    later = [led.request(1, 1) for _ in range(5)]
    for t in held:  # the small ones end one by one; the wide one is served before any later one
        led.release(t)
        started = led.assign()
        assert not set(started) & set(later)
    assert wide in led.running


def test_a_step_larger_than_the_pool_is_refused_with_both_sizes():
    led = NodeLedger(NODES, 4)
    with pytest.raises(LedgerError, match=r"needs 4 node\(s\) with 1 CPU\(s\) each, but the pool "
                                          r"has 3 node\(s\) with 4 CPU\(s\) each"):
        led.request(4, 1)
    with pytest.raises(LedgerError, match="with 8 CPU"):
        led.request(1, 8)


def test_a_dropped_node_reports_its_steps_and_the_queued_ones_that_no_longer_fit():
    led = NodeLedger(NODES, 4)
    on3 = led.request(3, 4)
    led.assign()
    queued_wide, queued_small = led.request(3, 1), led.request(2, 1)
    on_it, never = led.drop("node3")
    assert on_it == [on3] and never == [queued_wide]
    led.release(on3)
    led.release(queued_wide)
    assert led.assign() == {queued_small: ["node1", "node2"]}
    assert led.nodes == ["node1", "node2"]


def test_pooled_step_command_golden():
    from askap_flows.pool import step_command, step_cpus

    spec = MPISpec(nodes=2, ntasks=8, cpus_per_task=1, mpi_plugin="pmi2", args=("-x",))
    assert step_command(spec, "/x/hello", ["node2", "node3"]) == [
        "srun", "--mpi=pmi2", "--nodes", "2", "--ntasks", "8", "--cpus-per-task", "1",
        "--kill-on-bad-exit=1", "--exact", "--nodelist=node2,node3", "/x/hello", "-x"]
    assert step_cpus(spec) == 4
    assert step_cpus(MPISpec(nodes=2, ntasks=3, cpus_per_task=2)) == 4


def test_pool_job_script_holds_the_nodes_without_kill_on_node_failure(tmp_path):
    from askap_flows.pool import pool_cluster_kwargs
    from askap_flows.slurm import render_job_script
    from askap_flows.spec import AllocationSpec

    alloc = AllocationSpec(nodes=3, ntasks_per_node=4, partition="debug")
    script = render_job_script(pool_cluster_kwargs(alloc, "askapflows-pool-x", tmp_path))
    assert "#SBATCH --no-kill" in script and "#SBATCH --nodes=3" in script
    assert "--nthreads 12" in script  # a worker thread for every step that can run at once
    assert "#SBATCH -J askapflows-pool-x" in script
