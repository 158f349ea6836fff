"""ruff and mypy pass on the tree, with their configuration in pyproject.toml ([tool.ruff],
[tool.mypy]); both come with the test extra, pinned in package_list*.txt."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from askap_flows import compat

ROOT = Path(__file__).resolve().parents[1]
LINTED = ["src", "tests", "benchmarks", "examples"]

pytestmark = pytest.mark.unit


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed in {sys.prefix}: it comes with the test extra; "
                    "run scripts/test.sh (it reinstalls the venv when pyproject.toml or the "
                    "package list changed) or pip install -c package_list.txt -e '.[test]'")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.once
def test_ruff_is_clean():
    r = _tool("ruff", "check", "--no-cache", *LINTED)
    assert r.returncode == 0, (f"ruff check {' '.join(LINTED)} failed (fix the lines below, or "
                               f"`ruff check --fix` for the fixable ones):\n{r.stdout}{r.stderr}")


def test_mypy_is_clean():
    # one cache per Prefect major: the venvs hold different Prefect sources; a cold run takes ~1 min
    cache = ROOT / ".mypy_cache" / f"prefect{compat.PREFECT_MAJOR}"
    r = _tool("mypy", "--cache-dir", str(cache))
    assert r.returncode == 0, (f"mypy (files: [tool.mypy] in pyproject.toml) failed under Prefect "
                               f"{compat.PREFECT_VERSION}:\n{r.stdout}{r.stderr}")
