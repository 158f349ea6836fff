"""The pool's node ledger and the command line of a pooled step (pure, no SLURM)."""

import logging

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


def test_two_node_steps_fill_three_nodes_at_once():
    """W's shape: 2-node steps of 2 CPUs on 3 nodes of 4. Best fit alone put the first two on
    node1+node2 and the third waited while node3 was idle (4 waves for 8 steps where 3 fit)."""
    from askap_flows.ledger import copies

    led = NodeLedger(NODES, 4)
    asks = [led.request(2, 2) for _ in range(4)]
    started = led.assign()
    assert sorted(started) == asks[:3] and led.free == {n: 0 for n in NODES}, started
    assert led.waiting(asks[3]) == 0
    assert [copies(f, 2, 2) for f in ([4, 4, 4], [2, 2, 4], [0, 0, 4], [0, 2, 2])] == [3, 2, 0, 1]
    assert copies([4, 4], 1, 1) == 8 and copies([3], 2, 1) == 0


def test_pooled_step_command_golden():
    from askap_flows.pool_command import step_command, step_cpus

    spec = MPISpec(nodes=2, ntasks=8, cpus_per_task=1, mpi_plugin="pmi2", args=("-x",))
    assert step_command(spec, "/x/hello", ["node2", "node3"]) == [
        "srun", "--mpi=pmi2", "--nodes", "2", "--ntasks", "8", "--cpus-per-task", "1",
        "--kill-on-bad-exit=1", "--exact", "--nodelist=node2,node3", "/x/hello", "-x"]
    assert step_cpus(spec) == 4
    assert step_cpus(MPISpec(nodes=2, ntasks=3, cpus_per_task=2)) == 4


def test_pool_job_script_holds_the_nodes_without_kill_on_node_failure(tmp_path):
    from askap_flows.pool_command import pool_cluster_kwargs
    from askap_flows.slurm import render_job_script
    from askap_flows.spec import AllocationSpec

    alloc = AllocationSpec(nodes=3, ntasks_per_node=4, partition="debug")
    script = render_job_script(pool_cluster_kwargs(alloc, "askapflows-pool-x", tmp_path))
    assert "#SBATCH --no-kill" in script and "#SBATCH --nodes=3" in script
    assert "--nthreads 12" in script  # a worker thread for every step that can run at once
    assert "#SBATCH -J askapflows-pool-x" in script


def test_pooled_step_runs_the_pools_prolog():
    from pathlib import Path

    from askap_flows.pool_command import step_command

    argv = step_command(MPISpec(nodes=1, ntasks=2), "/x/hello", ["node1"], Path("/l/p.srun-prolog"))
    assert argv[argv.index("--exact"):argv.index("/x/hello")] == [
        "--exact", "--nodelist=node1", "--prolog=/l/p.srun-prolog"]


def test_the_step_line_and_the_prolog_that_prints_it(tmp_path):
    import os
    import subprocess

    from askap_flows import step_id

    assert step_id.parse_step_line("askap_flows: SLURM step 5.3") == "5.3"
    assert step_id.parse_step_line("  askap_flows: SLURM step 12.0\n") == "12.0"
    for other in ("askap_flows: SLURM step 5.", "askap_flows: SLURM step .3",
                  "rank 0: askap_flows: SLURM step 5.3", "srun: error: step 5.3"):
        assert step_id.parse_step_line(other) is None, other
    path = step_id.write_prolog(tmp_path, "askapflows-pool-x")
    assert path == tmp_path / "askapflows-pool-x.srun-prolog" and os.access(path, os.X_OK)
    # what srun does with it: runs it with the step's env and the step's command as arguments
    r = subprocess.run([str(path), "hostname"], capture_output=True, text=True,
                       env={**os.environ, "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "2"})
    assert r.returncode == 0 and r.stdout == ""
    assert step_id.parse_step_line(r.stderr) == "7.2"
    # a site's SrunProlog still runs (--prolog replaces it), with srun's arguments
    site = tmp_path / "site.sh"
    site.write_text('#!/bin/sh\necho "site $*"\nexit 3\n')
    site.chmod(0o755)
    path = step_id.write_prolog(tmp_path, "p2", str(site))
    r = subprocess.run([str(path), "a", "b c"], capture_output=True, text=True,
                       env={**os.environ, "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "4"})
    assert (r.returncode, r.stdout, step_id.parse_step_line(r.stderr)) == (3, "site a b c\n", "7.4")
    config = "SrunEpilog              = (null)\nSrunProlog              = /etc/slurm/p.sh\n"
    assert step_id.parse_site_prolog(config) == "/etc/slurm/p.sh"
    assert step_id.parse_site_prolog("SrunProlog              = (null)\n") is None
    step_id.remove(path)
    assert not path.exists()


def test_the_step_line_is_taken_out_of_the_relayed_lines():
    from askap_flows.step_id import StepIdCatcher

    seen, counted, logged = [], [], []

    class Logger:
        def info(self, fmt, *a):
            logged.append(fmt % a)

    catcher = StepIdCatcher()
    handler = catcher.wrap(seen.append, Logger(), lambda: counted.append(1))
    for line in ("launching: srun ...", "askap_flows: SLURM step 9.1", "rank 0 of 2"):
        handler((0.0, {"level": "warning", "line": line}))
    assert catcher.step_id == "9.1" and logged == ["SLURM job step 9.1"] and counted == [1]
    assert [e[1]["line"] for e in seen] == ["launching: srun ...", "rank 0 of 2"]


def test_the_pool_artifact_and_progress_text():
    from askap_flows.pool_record import (
        PoolView,
        artifact_key,
        pool_markdown,
        progress_text,
        step_row,
    )

    v = PoolView("5", "askapflows-pool-ab12", ("node1", "node2"), 4, "00:10:00",
                 "http://h:8787/status", "closed", running=2, waiting=1, done=4, failed=0)
    assert progress_text(v) == "pool job 5: 2 running, 1 waiting, 4 done, 0 failed"
    md = pool_markdown(v)
    assert md.startswith("### Allocation pool: SLURM job 5\n")
    for row in ("| state | closed |", "| SLURM job | 5 |", "| job name | `askapflows-pool-ab12` |",
                "| nodes | node1,node2 (2 x 4 CPUs) |", "| walltime | 00:10:00 |",
                "| Dask dashboard | [http://h:8787/status](http://h:8787/status) |",
                "| steps | 4 done, 0 failed, 2 running, 1 waiting |"):
        assert row in md.splitlines(), (row, md)
    assert artifact_key("askapflows-pool-ab12") == "askapflows-pool-ab12"
    assert artifact_key("My_Site.pool-AB") == "my-site-pool-ab"
    assert step_row("5", "5.2", "askapflows-pool-ab12", ["node1"], None) == {
        "slurm_job_id": "5", "slurm_step_id": "5.2", "job_name": "askapflows-pool-ab12",
        "nodes": "node1", "dashboard": ""}


def test_a_steps_one_artifact_links_the_dashboard():
    from askap_flows.pool_record import step_description

    assert step_description("5", "5.2", "askapflows-pool-ab", "http://h:8787/status") == (
        "SLURM job 5, step 5.2 of pool askapflows-pool-ab; "
        "[Dask dashboard (pool)](http://h:8787/status)")
    assert step_description("5", None, "p", None) == "SLURM job 5 of pool p"


def test_held_lines_reach_the_task_log_in_order_once_attached():
    from askap_flows.pool_launch import LateLogger

    said = []

    class Logger:
        def info(self, fmt, *a):
            said.append(("info", fmt % a))

        def warning(self, fmt, *a):
            said.append(("warning", fmt % a))

    late = LateLogger()
    late.info("%s", "launching: srun")
    late.warning("%s", "srun: warning")
    assert said == []
    late.attach(Logger())
    late.info("rank %d", 0)
    assert said == [("info", "launching: srun"), ("warning", "srun: warning"), ("info", "rank 0")]


def test_no_pool_artifact_outside_a_flow_run(monkeypatch):
    from askap_flows import pool_record

    said = []  # (Prefect 2's logging setup stops askap_flows' records before caplog)
    monkeypatch.setattr(pool_record.log, "info", lambda fmt, *a: said.append(fmt % a))
    v = pool_record.PoolView("5", "askapflows-pool-x", ("node1",), 4, "00:10:00", None, "open")
    assert pool_record.record_pool(v) is False
    assert "outside a flow run: no artifact" in said[0]


def _heartbeat():
    from prefect.settings import get_current_settings

    return get_current_settings().flows.heartbeat_frequency


def _pool(left: float = 3600.0):
    """A pool of 2 nodes x 4 CPUs whose allocation ends in ``left`` s (walltime 10 min)."""
    import time

    from askap_flows import jobs
    from askap_flows.pool import Pool
    from askap_flows.resolve import resolve

    alloc = resolve("testbed", backend="slurm", allocation={"nodes": 2, "ntasks_per_node": 4,
                                                            "walltime": "00:10:00"},
                    step=False).allocation_spec()
    handle = jobs.RunHandle("t", "askapflows-pool-t", "/tmp", 60.0, "slurm")
    return Pool(alloc, "testbed", handle, FakeClient(), "1", NODES[:2], time.time() + left, None)


def test_a_step_is_checked_against_the_time_left_not_the_walltime():
    """A 5-minute step fits a 10-minute walltime, but not an allocation that ends in 100 s."""
    from askap_flows.pool import PoolError

    pool = _pool(left=100)
    with pytest.raises(PoolError, match=r"up to 300 s \(MPISpec.timeout\).*walltime 00:10:00\) "
                                        r"ends in (99|100) s"):
        pool.check_step(MPISpec(nodes=1, ntasks=2, ntasks_per_node=2, timeout=300))
    pool.check_step(MPISpec(nodes=1, ntasks=2, ntasks_per_node=2, timeout=60))  # fits
    pool.check_step(MPISpec(nodes=1, ntasks=2, ntasks_per_node=2))  # no timeout: not checked


def test_a_step_that_waited_too_long_for_nodes_is_refused_and_gives_its_place_back():
    """A step queued behind a busy pool is checked again when its nodes come: if the allocation
    now ends before the step could finish, it is refused and the nodes stay free."""
    from askap_flows.pool import PoolError

    pool, said = _pool(left=100), logging.getLogger("askap_flows")
    busy, _ = pool.request(MPISpec(nodes=2, ntasks=8, ntasks_per_node=4))  # every CPU
    step = MPISpec(nodes=1, ntasks=2, ntasks_per_node=2, timeout=60)
    pool.check_step(step)  # fits now
    ticket, nodes = pool.request(step)
    assert nodes is None and pool.ledger.waiting(ticket) == 0  # queued, first in line
    pool.deadline -= 90  # it waited: the allocation now ends in about 10 s
    pool.release(busy)
    with pytest.raises(PoolError, match=r"up to 60 s .* ends in (9|10) s"):
        pool.wait(ticket, step, said)
    assert pool.ledger.free == {"node1": 4, "node2": 4} and not pool.ledger.running


def test_a_queued_step_that_no_longer_fits_after_a_node_died_fails_with_the_node():
    """Pool.drop: a node died; a queued 2-node step can never run on the 1 node left and its
    sub-flow fails with the node's name, instead of waiting forever."""
    from askap_flows.pool import PoolError

    pool, said = _pool(), logging.getLogger("askap_flows")
    busy, _ = pool.request(MPISpec(nodes=1, ntasks=4, ntasks_per_node=4))
    wide = MPISpec(nodes=2, ntasks=4, ntasks_per_node=2)
    ticket, nodes = pool.request(wide)
    assert nodes is None  # node1 is busy: it waits
    dead = [n for n in NODES[:2] if n not in pool.ledger.running[busy]]
    pool.drop(dead)
    with pytest.raises(PoolError, match=rf"lost node {dead[0]}; the step no longer fits"):
        pool.wait(ticket, wide, said)
    assert dead[0] not in pool.nodes and ticket not in pool.ledger.running


class FakeFuture:
    status = "finished"

    def done(self):
        return True

    def add_done_callback(self, callback):
        callback(self)


class FakeClient:
    """What a launch asks of the pool's Dask client, recorded."""

    def __init__(self):
        self.calls = []

    def subscribe_topic(self, topic, handler):
        self.calls.append("subscribe")

    def unsubscribe_topic(self, topic):
        self.calls.append("unsubscribe")

    def submit(self, fn, *args, **kw):
        self.calls.append(("submit", args[0].launcher_args))
        return FakeFuture()


def test_a_step_with_free_nodes_starts_its_srun_before_its_flow_run(monkeypatch):
    """Creating the step's flow run (about 8 API requests) overlaps its srun instead of coming
    first, and a srun that ended well frees its nodes at once; a step that must wait for nodes
    keeps its place in the queue and starts inside its flow run; a launch its flow run never
    took over frees its nodes."""
    from askap_flows import pool_step

    pool, seen, free = _pool(), [], []

    def flow_run(**kw):  # what the flow run finds when it starts
        step = pool.launches[kw["launch_key"]]
        seen.append((kw["name"], list(pool.client.calls), step.nodes, step.ticket))
        free.append(dict(pool.ledger.free))

    monkeypatch.setattr(pool_step, "pool_step", flow_run)
    small = {"nodes": 1, "ntasks": 2, "ntasks_per_node": 2}
    pool.run_mpi(small, program="/bin/true", name="s1")
    (name, calls, nodes, _), = seen
    assert name == "s1" and nodes == ["node1"] and calls[0] == "subscribe", seen
    assert calls[1][0] == "submit" and "--nodelist=node1" in calls[1][1], calls
    # its srun ended (the fake's at once): its nodes were free before its flow run caught up
    assert free == [{"node1": 4, "node2": 4}], free
    assert pool.ledger.free == {"node1": 4, "node2": 4} and pool.launches == {}  # freed
    assert "unsubscribe" in pool.client.calls
    seen.clear()
    pool.client.calls.clear()
    busy, _ = pool.request(MPISpec(nodes=2, ntasks=8, ntasks_per_node=4))  # every CPU
    pool.run_mpi(small, program="/bin/true", name="s2")
    assert seen == [("s2", [], None, busy + 1)], seen  # no srun before its turn
    assert pool.ledger.queue == type(pool.ledger.queue)() and busy in pool.ledger.running


def test_a_failed_srun_keeps_its_nodes_until_its_flow_run_is_done_with_them(monkeypatch):
    """A srun that ended well frees its nodes from its future's callback; one that failed does
    not: its flow run first asks SLURM whether a node died (pool_step.run_step), and no other
    step is placed on a node that may be dead meanwhile."""
    from askap_flows import pool_step

    pool, free = _pool(), []

    class Failed(FakeFuture):
        status = "error"

    monkeypatch.setattr(pool.client, "submit", lambda *a, **kw: Failed())
    monkeypatch.setattr(pool_step, "pool_step", lambda **kw: free.append(dict(pool.ledger.free)))
    pool.run_mpi({"nodes": 1, "ntasks": 2, "ntasks_per_node": 2}, program="/bin/true", name="f")
    assert free == [{"node1": 2, "node2": 4}], free  # still held while its flow run ran


def test_pooled_steps_run_without_prefect_3s_flow_heartbeat(monkeypatch):
    """Prefect 3 joins every flow run's heartbeat thread at its end (0.5 s on average per step);
    a pooled step's flow run starts none, unless the user set the frequency himself."""
    from askap_flows import compat, pool_step

    seen = []
    monkeypatch.setattr(pool_step, "pool_step", lambda **kw: seen.append(
        (kw["name"], _heartbeat() if compat.PREFECT_MAJOR >= 3 else None)))
    for var in compat.HEARTBEAT_VARS:
        monkeypatch.delenv(var, raising=False)
    pool = _pool()
    pool.run_mpi({"nodes": 1, "ntasks": 2}, program="/bin/true", name="s1")
    assert seen == [("s1", None)]
    if compat.PREFECT_MAJOR >= 3:
        assert _heartbeat() is not None  # only the step's own flow run is without it
        monkeypatch.setenv(compat.HEARTBEAT_VARS[0], "60")
        assert compat.without_flow_heartbeat().__class__.__name__ == "nullcontext"  # it stays


def test_the_settings_without_heartbeat_are_made_once(monkeypatch):
    """Each copy of Prefect's settings re-reads the environment and its files (as much CPU as
    creating the step's flow run): the steps of a pool share one."""
    from askap_flows import compat

    if compat.PREFECT_MAJOR < 3:
        pytest.skip("Prefect 2 has no flow run heartbeat")
    from prefect.settings import get_current_settings

    for var in compat.HEARTBEAT_VARS:
        monkeypatch.delenv(var, raising=False)
    seen = []
    for _ in range(2):
        with compat.without_flow_heartbeat():
            seen.append(get_current_settings())
    assert seen[0] is seen[1] and seen[0].flows.heartbeat_frequency is None


def test_a_heartbeat_the_user_set_in_prefects_settings_stays(monkeypatch):
    """Set in a profile, prefect.toml or .env (not only the environment), the user's heartbeat
    frequency is kept for pooled steps too."""
    from askap_flows import compat

    if compat.PREFECT_MAJOR < 3:
        pytest.skip("Prefect 2 has no flow run heartbeat")
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    for var in compat.HEARTBEAT_VARS:
        monkeypatch.delenv(var, raising=False)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        assert compat.without_flow_heartbeat().__class__.__name__ == "nullcontext"
        with compat.without_flow_heartbeat():
            assert _heartbeat() == 60
