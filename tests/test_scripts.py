"""Every shipped shell script passes bash -n and shellcheck."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (sorted(ROOT.glob("scripts/*.sh")) + sorted(ROOT.glob("examples/*.sbatch"))
           + [ROOT / ".ci" / "run"])

pytestmark = [pytest.mark.unit, pytest.mark.once]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("shellcheck missing (scripts/test.sh installs it)")
        pytest.skip("shellcheck missing: apt-get install shellcheck")
    r = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_once_tests_are_left_out_after_the_first_major():
    """scripts/test.sh sets ASKAP_TEST_ONCE_DONE=1 from the second major on: the `once` tests
    (this module's among them) are deselected then, and only then."""
    import sys

    def collected(once_done: str) -> str:
        env = {**os.environ, "ASKAP_TEST_ONCE_DONE": once_done}
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                               "--collect-only", "-q", str(Path(__file__))], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120).stdout

    assert "deselected" not in collected("0")
    assert f"{len(SCRIPTS) * 2 + 1} deselected" in collected("1")
