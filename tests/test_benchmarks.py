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


@pytest.mark.slurm
def test_overhead_quick(tmp_path):
    data = _run("overhead", tmp_path)
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
    assert data["ratio_wall"] == round(data["summary"]["subflows"]["median_wall_seconds"]
                                       / data["summary"]["floor"]["median_wall_seconds"], 3)
    # every sub-flow's phases add up to its total, which its caller's latency contains
    assert len(rep["subflows"]["timings"]) == runs
    for t in rep["subflows"]["timings"]:
        assert all(t[p] >= 0 for p in PHASES), t
        assert abs(sum(t[p] for p in PHASES) - t["total"]) < 0.01
        assert t["total"] <= max(rep["subflows"]["latencies"]) + 0.01
    assert set(data["subflow_breakdown"]) == {*PHASES, "total"}


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
