"""The package as a user gets it: a wheel built by the real build backend from pyproject.toml,
installed into a fresh venv, running the main job from an empty directory.

Fast and offline: the build backend (hatchling) comes from the wheelhouse that scripts/test.sh
fills (``ASKAP_TEST_WHEELHOUSE``, default ``.venvs/wheelhouse``). The fresh venv gets the wheel
(``pip --python VENV install --no-deps``, nothing else) and, through one ``.pth`` line, the
site-packages of this test venv for the dependencies, which hold the same pinned set that
``pip install -c package_list.txt askap-flows`` gives. The project's editable install there
stays inert: a ``.pth`` file in a directory added by a ``.pth`` line is not executed. So
``askap_flows`` must come from the wheel, and the test checks that it does.
"""

import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT

pytestmark = pytest.mark.mpi

WHEELHOUSE = Path(os.environ.get("ASKAP_TEST_WHEELHOUSE") or ROOT / ".venvs" / "wheelhouse")


def run(argv, **kw):
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{argv} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def user_env(venv: Path) -> dict:
    """A user's shell: the venv first on PATH; no PYTHONPATH, no test session settings."""
    drop = ("PYTHONPATH", "PREFECT_API_URL", "PREFECT_HOME", "ASKAP_FLOWS_HOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not list(WHEELHOUSE.glob("hatchling-*.whl")):
        why = (f"no hatchling wheel in {WHEELHOUSE}: scripts/test.sh fills it (pip download -d "
               f"{WHEELHOUSE} hatchling), or set ASKAP_TEST_WHEELHOUSE")
        if IN_CI:
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-index", "--find-links", WHEELHOUSE, "-w", out, ROOT])
    (whl,) = out.glob("askap_flows-*.whl")
    return whl


def test_wheel_holds_profiles_source_scripts_and_marker(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("askap_flows/py.typed", "askap_flows/profiles/testbed.yaml",
                   "askap_flows/profiles/testbed_openmpi.yaml", "askap_flows/profiles/local.yaml",
                   "askap_flows/csrc/mpi_hello_world.c", "askap_flows/scripts/slurm_testbed.sh",
                   "askap_flows/scripts/slurm_second_cluster.sh",
                   "askap_flows/scripts/testbed_lib.sh",
                   "askap_flows/scripts/postgres_database.sh", "askap_flows/scripts/prefect_env.sh",
                   "askap_flows/run.py", "askap_flows/launch.py"):
        assert needed in names, f"{needed} is not in {wheel.name}"
    # a shipped script that runs or sources a sibling ("${SELF%/*}/NAME") needs NAME shipped too
    with zipfile.ZipFile(wheel) as z:
        for script in (n for n in names if n.startswith("askap_flows/scripts/")):
            for sibling in set(re.findall(r'"\$\{SELF%/\*\}/([\w.]+)"', z.read(script).decode())):
                assert f"askap_flows/scripts/{sibling}" in names, \
                    f"{script} uses {sibling}, which is not in {wheel.name}"
    assert not [n for n in names if n.startswith(("tests/", "askap_flows/__pycache__"))]


@pytest.mark.once
def test_installed_wheel_runs_the_main_job_from_an_empty_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    target = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                  .stdout.strip())
    (target / "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
         "--disable-pip-version-check", wheel])
    empty = tmp_path / "empty"
    empty.mkdir()
    env = user_env(venv)

    probe = run([py, "-c", "import askap_flows, importlib.metadata as m, json; print(json.dumps("
                 "[askap_flows.__file__, askap_flows.__version__, m.version('askap-flows')]))"],
                cwd=empty, env=env)
    where, version, meta = json.loads(probe.stdout)
    assert Path(where).is_relative_to(target), where  # the wheel's copy, not a source tree
    assert version == meta, (version, meta)
    # every requirement the wheel declares is met here (pip's own check, on the fresh venv)
    run([sys.executable, "-m", "pip", "--python", py, "check"], env=env)

    r = subprocess.run([py, "-m", "askap_flows.run", "--subflows", "2", "--json"], cwd=empty,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-3000:]
    subs = json.loads(r.stdout)["subflows"]
    assert [s["state"] for s in subs] == ["completed", "completed"], subs
    assert all(len(s["ranks"]) == 4 and {x["size"] for x in s["ranks"]} == {4} for s in subs)
    assert (empty / ".askap_flows" / "bin" / "mpi_hello_world").exists()  # built from the wheel
    assert sorted(p.name for p in empty.iterdir()) == [".askap_flows"]
