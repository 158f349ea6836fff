"""The environment the tests run in is exactly the pinned set (regenerate: scripts/pin_packages.sh)."""

import subprocess
import sys
from pathlib import Path

import pytest

from askap_flows import compat

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def _pins(path):
    return {line.strip().lower() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def test_installed_packages_match_the_pinned_list():
    pinned = ROOT / ("package_list.txt" if compat.PREFECT_MAJOR >= 3 else "package_list_prefect2.txt")
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable",
                             "--disable-pip-version-check"], capture_output=True, text=True,
                            check=True).stdout
    installed = {line.strip().lower() for line in frozen.splitlines()
                 if line.strip() and not line.lower().startswith("askap-flows")}
    want = _pins(pinned)
    assert installed == want, (
        f"installed packages differ from {pinned.name}: only installed {sorted(installed - want)}, "
        f"only pinned {sorted(want - installed)}. Regenerate with scripts/pin_packages.sh "
        f"{compat.PREFECT_MAJOR}, or reinstall with pip install -c {pinned.name}."
    )


def test_pinned_sets_hold_the_supported_prefect_majors():
    assert any(p.startswith("prefect==3.") for p in _pins(ROOT / "package_list.txt"))
    assert any(p.startswith("prefect==2.20.") for p in _pins(ROOT / "package_list_prefect2.txt"))


def test_the_job_side_step_imports_neither_prefect_nor_dask_jobqueue():
    """A SLURM job's Dask worker runs askap_flows.launch only: importing Prefect there cost every
    job seconds of start-up while it held its nodes (benchmarks/README.md)."""
    code = ("import sys, askap_flows.launch; print(sorted({m.split('.')[0] for m in sys.modules "
            "if m.split('.')[0] in ('prefect', 'prefect_dask', 'dask_jobqueue', 'bokeh')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
