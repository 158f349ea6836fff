"""The Prefect UI in a real browser (Debian's headless chromium): a small pipeline, then its pages.

The test uses the session's Prefect server (tests/conftest.py, PREFECT_API_URL), runs a parent flow
with three sub-flows (an MPI and an array sub-flow on the local backend, one MPI sub-flow on the
SLURM test bed), and checks in the rendered pages that the parent run, its sub-flow runs (with
their parent) and the SLURM job table and Dask dashboard link are visible. Screenshots go to
$ASKAP_TEST_OUTPUT (scripts/test.sh: test-output/prefectN/), else test-output/prefectN/.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
import uuid
from functools import partial
from pathlib import Path

import pytest

from askap_flows import compat
from conftest import IN_CI, ROOT, askap_jobs

pytestmark = pytest.mark.slurm

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
#: where a flow run's page lives: Prefect 3 moved it from /flow-runs/ to /runs/ (the old path
#: redirects there); Prefect 2.20 has only /flow-runs/flow-run/<id>
FLOW_RUN_PAGE = "runs/flow-run" if compat.PREFECT_MAJOR >= 3 else "flow-runs/flow-run"


def chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                         else None)
    if found is None:
        why = "Debian's chromium is not installed (apt-get install chromium; scripts/test.sh does)"
        if IN_CI:
            pytest.fail(f"CI=true and {why}", pytrace=False)
        pytest.skip(why)
    return found


def output_dir() -> Path:
    out = Path(os.environ.get("ASKAP_TEST_OUTPUT")
               or ROOT / "test-output" / f"prefect{compat.PREFECT_MAJOR}") / "ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


def page_text(dom: str) -> str:
    """The visible text of a dumped DOM, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", " ", dom, flags=re.S | re.I)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))).strip()


def browse(url: str, screenshot: Path) -> tuple[str, str]:
    """Render ``url`` in headless chromium (a fresh profile); save a screenshot.

    Returns the visible text and the DOM."""
    with tempfile.TemporaryDirectory(prefix="askap-chromium-") as profile:
        r = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                            "--window-size=1400,1000", "--virtual-time-budget=15000",
                            f"--screenshot={screenshot}", "--dump-dom", url],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"chromium failed on {url}:\n{r.stderr[-2000:]}"
    assert screenshot.stat().st_size > 10_000, f"empty screenshot of {url}"
    return page_text(r.stdout), r.stdout


def api(api_url: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{api_url}/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_pipeline_runs_sub_flows_and_artifacts_are_visible_in_the_ui(hello_program):
    from prefect import flow

    from askap_flows import array_subflow, mpi_subflow, run_subflows

    chromium()  # skip (or fail in CI) before running anything
    api_url = os.environ["PREFECT_API_URL"].rstrip("/")
    ui = api_url[: -len("/api")]
    parent_name = f"ui-check-{uuid.uuid4().hex[:6]}"
    prefix = f"askapui{parent_name[-6:]}"  # its own job names: the test bed is shared

    @flow(name="ui-pipeline", flow_run_name=parent_name)
    def pipeline():
        calls = [partial(mpi_subflow, {"ntasks": 2}, backend="local", name=f"{parent_name}-mpi"),
                 partial(array_subflow, 2, 1000, backend="local", name=f"{parent_name}-array"),
                 partial(mpi_subflow, {"nodes": 1, "ntasks": 2},
                         {"nodes": 1, "job_name_prefix": prefix}, backend="slurm",
                         profile="testbed", name=f"{parent_name}-slurm")]
        return compat.current_flow_run_id(), run_subflows(calls, max_concurrent=3)

    parent_id, outcomes = pipeline()
    assert all(o.ok for o in outcomes), [str(o.error) for o in outcomes]
    job_id = outcomes[2].value.job_id
    assert job_id
    assert not askap_jobs(prefix), "the sub-flow's SLURM job outlived it"

    subs = {r["name"]: r["id"] for r in api(api_url, "flow_runs/filter", {
        "flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}})}
    assert set(subs) == {f"{parent_name}-{s}" for s in ("mpi", "array", "slurm")}
    artifacts = api(api_url, "artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [subs[f"{parent_name}-slurm"]]}}})
    table = next(a for a in artifacts if a["type"] == "table")
    link = next(a for a in artifacts if a["type"] != "table")  # link artifacts are markdown
    dashboard = outcomes[2].value.dashboard
    out = output_dir()

    text, _ = browse(f"{ui}/{FLOW_RUN_PAGE}/{parent_id}", out / "parent_flow_run.png")
    assert parent_name in text and "ui-pipeline" in text, text[:2000]
    assert "Completed" in text
    assert "Can't connect" not in text  # the UI reaches its API (PREFECT_UI_API_URL)

    text, _ = browse(f"{ui}/{FLOW_RUN_PAGE}/{subs[f'{parent_name}-slurm']}",
                     out / "slurm_subflow_run.png")
    assert f"{parent_name}-slurm" in text and "mpi-subflow" in text, text[:2000]
    assert parent_name in text.replace(f"{parent_name}-slurm", "")  # its parent run is named

    text, _ = browse(f"{ui}/artifacts/artifact/{table['id']}", out / "slurm_job_artifact.png")
    assert f"SLURM job {job_id} of this sub-flow" in text, text[:2000]
    assert "slurm_job_id" in text and f"{prefix}-" in text and dashboard in text

    text, dom = browse(f"{ui}/artifacts/artifact/{link['id']}", out / "dashboard_artifact.png")
    assert "Dask dashboard" in text, text[:2000]
    assert f'href="{dashboard}"' in dom  # a real link to the sub-flow's dashboard
