"""The benchmark scripts run (--quick) and their JSON is complete and consistent (no timings asserted).

They use the session's Prefect server (PREFECT_API_URL from conftest), as a user with a server would.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("checks", "prefect_start", "cluster_start", "worker_wait", "srun", "teardown")


def _run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "ASKAP_FLOWS_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick",
                        "--out", str(out), *args], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, f"{script} failed:\n{r.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert json.loads(r.stdout) == data  # printed and written: the same object
    assert data["versions"]["prefect"] == __import__("prefect").__version__
    return data


def _check_cpu(data: dict, sample: dict, summary: dict) -> None:
    """A sample's busy CPU seconds (the whole machine's, /proc/stat) are some work, at most all
    cores for its whole wall time; its median is the summary's (one repetition)."""
    assert 0 < sample["cpu_seconds"] <= data["workload"]["cpus"] * sample["wall_seconds"] + 0.1
    assert sample["steal_seconds"] >= 0
    assert summary["median_cpu_seconds"] == sample["cpu_seconds"]


@pytest.mark.slurm
@pytest.mark.once  # the overhead benchmark runs under Prefect 3 (benchmarks/README.md)
def test_overhead_quick(tmp_path, no_jobs_left):
    data = _run("overhead", tmp_path, "--dask")
    runs = data["workload"]["runs"]
    assert data["quick"] and data["workload"]["reps"] == 1 and runs == 2
    assert data["workload"]["srun"][:2] == ["srun", "--mpi=pmi2"]
    (rep,) = data["repetitions"]
    for kind in ("floor", "subflows"):
        sample = rep[kind]
        assert sample["failures"] == 0, sample["errors"]
        assert len(sample["latencies"]) == runs
        assert max(sample["latencies"]) <= sample["wall_seconds"] + 0.01
        summary = data["summary"][kind]
        assert summary["runs"] == 1 and summary["median_wall_seconds"] == sample["wall_seconds"]
        _check_cpu(data, sample, summary)
    assert data["ratio_wall"] == round(data["summary"]["subflows"]["median_wall_seconds"]
                                       / data["summary"]["floor"]["median_wall_seconds"], 3)
    # every sub-flow's phases add up to its total, which its caller's latency contains
    assert len(rep["subflows"]["timings"]) == runs
    for t in rep["subflows"]["timings"]:
        assert all(t[p] >= 0 for p in PHASES), t
        assert abs(sum(t[p] for p in PHASES) - t["total"]) < 0.01
        assert t["total"] <= max(rep["subflows"]["latencies"]) + 0.01
    assert set(data["subflow_breakdown"]) == {*PHASES, "total"}
    # --dask: the same runs through stock dask-jobqueue, no Prefect (by hand)
    assert rep["dask"]["failures"] == 0, rep["dask"]["errors"]
    assert data["ratio_dask_wall"] == round(data["summary"]["dask"]["median_wall_seconds"]
                                            / data["summary"]["floor"]["median_wall_seconds"], 3)
    for t in rep["dask"]["timings"] + rep["dask_single"]["timings"]:
        assert abs(t["start"] + t["task"] + t["close"] - t["total"]) < 0.01 and t["task"] > 0
    assert sorted(t["total"] for t in rep["dask"]["timings"]) == rep["dask"]["latencies"]


@pytest.mark.postgres
def test_sweep_quick(tmp_path):
    data = _run("sweep", tmp_path)
    rows = data["results"]
    assert [(r["pattern"], r["n"]) for r in rows] == [("askap", 2), ("seed", 1)]
    for r in rows:
        assert r["completed"] + r["failures"] == r["n"]
        assert r["subflows_per_minute"] == round(r["completed"] / r["wall_seconds"] * 60, 1)
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
        assert r["peak_tree_rss_mb"] >= r["baseline_rss_mb"]
        assert r["rss_per_subflow_mb"] == round(
            (r["peak_rss_mb"] - r["baseline_rss_mb"]) / r["n"], 1)
        assert r["broke"] == bool(r["failures"])
    assert all(r["failures"] == 0 for r in rows if r["pattern"] == "askap"), rows
    askap = data["summary"]["askap"]
    assert askap == {"max_n_without_failure": 2, "total_failures": 0, "first_break": None}
    assert Path(data["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slurm
@pytest.mark.once  # as the overhead benchmark
def test_controller_load_quick(tmp_path, no_jobs_left):
    data = _run("controller_load", tmp_path)
    assert data["quick"] and data["workload"]["n"] == [2] and data["workload"]["programs"] == ["short"]
    phases = data["phases"]
    assert [(p["kind"], p["program"], p["n"]) for p in phases] == [
        ("floor", "short", 2), ("pipeline", "short", 2)]
    for p in phases:
        assert p["failures"] == 0, p["errors"]
        _check_phase(p)
        # the counters saw this phase's jobs, and only them: one batch submission per job
        assert p["other_rpcs_by_type"]["REQUEST_SUBMIT_BATCH_JOB"] == p["n"], p
        counts = [c for _, c in p["series"]]
        assert counts == sorted(counts) and counts[-1] == p["queries"]
    assert "REQUEST_JOB_WILL_RUN" in phases[1]["queries_by_type"]  # its sbatch --test-only
    _check_targets(data)
    costs = data["command_costs"]
    assert "REQUEST_JOB_WILL_RUN" in costs["sbatch --test-only (test_submit)"]
    assert all("REQUEST_STATS_INFO" not in c for c in costs.values())
    lat = data["latency"]
    assert lat["m"] == len(lat["samples"]) == 2
    # both cancels ended their sub-flows, with the right cause, and the watch saw it first
    assert lat["joblost_cancelled"] == 2, lat["samples"]
    fail = sorted(s["seconds_to_fail"] for s in lat["samples"])
    assert (lat["p50_seconds_to_fail"], lat["p95_seconds_to_fail"]) == (fail[0], fail[1])
    assert all(s["seconds_to_seen"] <= s["seconds_to_fail"] for s in lat["samples"])


def _check_phase(p: dict) -> None:
    assert p["queries"] == sum(p["queries_by_type"].values())
    assert p["queries_per_job"] == round(p["queries"] / p["n"], 2)
    assert not {"REQUEST_STATS_INFO", *p["other_rpcs_by_type"]} & set(p["queries_by_type"])
    assert p["running_queries"] == sum(p["running_queries_by_type"].values()) <= p["queries"]
    assert p["queries_per_second_phase"] == round(p["queries"] / p["phase_seconds"], 3)
    assert p["queries_per_second_running"] == round(p["running_queries"] / p["counted_seconds"], 3)


def _check_targets(data: dict) -> None:
    """The targets' figures are the phases' (report.py's table shows them)."""
    t, phases = data["targets"], data["phases"]
    by = {(p["kind"], p["program"], p["n"]): p for p in phases}
    for p in phases:
        if p["kind"] == "pipeline":
            floor = by[("floor", p["program"], p["n"])]
            assert t["per_subflow_over_floor"][f"{p['program']} N={p['n']}"] == round(
                p["queries_per_job"] - floor["queries_per_job"], 2)
    rates = {str(p["n"]): p["queries_per_second_running"] for p in phases
             if (p["kind"], p["program"]) == ("pipeline", t["rate_program"])}
    assert {str(k): v for k, v in t["pipeline_queries_per_second_running"].items()} == rates
    assert t["rate_at_most_1"] == all(r <= 1 for r in rates.values())
    own = {p["n"]: round((p["running_queries"] - p["running_queries_by_type"].get(
        "REQUEST_HET_JOB_ALLOC_INFO", 0)) / p["counted_seconds"], 3) for p in phases
        if (p["kind"], p["program"]) == ("pipeline", t["rate_program"])}
    assert {int(k): v for k, v in t["own_queries_per_second_running"].items()} == own
    lo, hi = own[min(own)], own[max(own)]
    assert t["rate_independent_of_n"] == (abs(hi / lo - 1) <= 0.10)
    assert t["per_subflow_over_floor_at_most_3"] == all(
        v <= 3 for v in t["per_subflow_over_floor"].values())
    assert t["latency_p95_seconds"] == data["latency"]["p95_seconds_to_fail"]


@pytest.mark.unit
def test_sdiag_parsing_counts_only_queries():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import controller_load

    text = (ROOT / "tests" / "recorded" / "sdiag.txt").read_text()
    d = controller_load.parse_sdiag(text)
    assert d["by_type"]["REQUEST_JOB_INFO"] == 12 and d["by_user"] == {"root": 35}
    assert controller_load.queries(d["by_type"]) == {
        "REQUEST_JOB_INFO": 12, "REQUEST_PARTITION_INFO": 9, "REQUEST_FED_INFO": 3,
        "REQUEST_PING": 2, "REQUEST_JOB_INFO_SINGLE": 4, "REQUEST_JOB_WILL_RUN": 1}
    assert controller_load.percentile([3.0, 1.0, 2.0, 9.0], 95) == 9.0
    assert controller_load.percentile([3.0, 1.0, 2.0, 9.0], 50) == 2.0


@pytest.mark.unit
def test_controller_load_table_is_the_committed_json():
    """The committed controller_load.json is a full run, consistent, and its tables are in README."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    data = json.loads((ROOT / "benchmarks" / "results" / "controller_load.json").read_text())
    assert not data["quick"] and data["workload"]["n"] == [4, 16, 48]
    assert data["workload"]["programs"] == ["short", "long"] and data["workload"]["long_n"] == [4, 48]
    for p in data["phases"]:
        _check_phase(p)
    _check_targets(data)
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    rows = [line for line in report.controller_load(data).splitlines() if line.startswith("| ")]
    assert len(rows) > 20
    missing = [line for line in rows if line not in readme]
    assert not missing, f"README lacks rows of controller_load.json (run benchmarks/report.py): {missing}"


@pytest.mark.unit
def test_readme_tables_are_the_committed_json():
    """benchmarks/README.md shows what benchmarks/results/*.json hold (report.py renders them)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py")],
                         capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    tables = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(tables) > 20
    missing = [line for line in tables if line not in readme]
    assert not missing, f"README rows not in the JSON's report (run benchmarks/report.py): {missing}"


@pytest.mark.postgres
@pytest.mark.skipif(__import__("askap_flows.compat").compat.PREFECT_MAJOR < 3,
                    reason="Prefect 2.20's server has no worker processes")
def test_server_workers_quick(tmp_path):
    data = _run("server_workers", tmp_path)
    assert data["quick"] and [r["workers"] for r in data["results"]] == [1, 2]
    for r in data["results"]:
        assert r["requests"] == 4 * 2 * 4 and r["failures"] == 0  # 4 threads x 2 runs x 4 calls
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["max_ms"]
    assert "in each of 3 processes" in data["results"][1]["pool"]


@pytest.mark.slurm
@pytest.mark.once  # as the overhead benchmark
def test_overhead_pool_quick(tmp_path, no_jobs_left):
    """--pool: W through a warm and a cold pool, one step alone, and their floor of bare srun in
    a held salloc, all in one repetition."""
    data = _run("overhead", tmp_path, "--pool")
    (rep,) = data["repetitions"]
    for kind in ("prefect_w", "srun_w", "srun_single", "pool_cold", "pool_warm",
                 "pool_warm_single"):
        sample = rep[kind]
        assert sample["failures"] == 0, (kind, sample["errors"])
        assert len(sample["latencies"]) == (1 if kind.endswith("single") else 2)
        assert data["summary"][kind]["median_wall_seconds"] == sample["wall_seconds"]
        _check_cpu(data, sample, data["summary"][kind])
    s = data["summary"]
    assert data["ratio_prefect_w"] == round(s["prefect_w"]["median_wall_seconds"]
                                            / s["floor"]["median_wall_seconds"], 3)
    assert data["ratio_pool_single_srun"] == round(s["pool_warm_single"]["median_latency_seconds"]
                                                   / s["srun_single"]["median_wall_seconds"], 3)
    for t in rep["pool_warm"]["timings"]:
        assert set(t) == {"queue_wait", "srun", "total"} and t["total"] >= t["srun"] > 0


@pytest.mark.slurm
@pytest.mark.once  # as the overhead benchmark
def test_throughput_quick(tmp_path, no_jobs_left):
    data = _run("throughput", tmp_path)
    assert data["quick"] and data["workload"]["n"] == 4
    for mode in ("pool", "cold"):
        s = data["summary"][mode]
        assert s["n"] == 4 and s["failures"] == 0 and s["completed"] == 4, data["runs"][mode]
        assert s["subflows_per_minute"] == round(4 / s["wall_seconds"] * 60, 1)
        assert s["peak_rss_mb"] > 0
    assert data["speedup_pool_over_cold"] == round(
        data["summary"]["pool"]["subflows_per_minute"]
        / data["summary"]["cold"]["subflows_per_minute"], 2)
