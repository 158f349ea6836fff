"""Golden files of what `askap-flows render` prints for each packaged profile: the job script and
the MPI command line, rendered on a host that has none of the profiles' network interfaces (as a
laptop or a login node of another site would be): the scheduler's address is the marked
placeholder, stderr says so, and the command exits 0.

Regenerate after an intended change: ASKAP_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

import os
import sys
from pathlib import Path

import pytest

from askap_flows import cli, host, slurm
from askap_flows.spec_profile import packaged_profiles

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).with_name("golden")


def render(profile: str, monkeypatch, capsys) -> tuple[str, str]:
    monkeypatch.setattr(host, "interfaces", lambda: {"eth9": "192.0.2.9"})  # none of theirs
    monkeypatch.setattr(sys, "executable", "/opt/py/bin/python")
    for name in slurm.EXPORTED_ENV + ("ASKAP_FLOWS_PROFILE",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ASKAP_FLOWS_HOME", "/home/astro/.askap_flows")
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.1:4200/api")
    assert cli.main(["render", "--profile", profile]) == 0
    out, err = capsys.readouterr()
    return out, err


@pytest.mark.parametrize("profile", sorted(packaged_profiles()))
def test_rendered_profile_matches_golden(profile, monkeypatch, capsys):
    text, err = render(profile, monkeypatch, capsys)
    path = GOLDEN / f"{profile}.txt"
    if os.environ.get("ASKAP_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with ASKAP_UPDATE_GOLDEN=1"
    assert text == path.read_text()
    assert "tcp://SCHEDULER_ADDRESS:SCHEDULER_PORT" in text
    assert "# SCHEDULER_ADDRESS: placeholder" in text
    assert "does not exist on this host" in err and "askap-flows doctor" in err, err


def test_render_uses_the_interface_address_where_it_exists(monkeypatch, capsys):
    monkeypatch.setattr(host, "interfaces", lambda: {"hsn0": "10.1.2.3"})
    assert cli.main(["render", "--profile", "setonix_example"]) == 0
    out, err = capsys.readouterr()
    assert "tcp://10.1.2.3:SCHEDULER_PORT" in out and "SCHEDULER_ADDRESS" not in out
    assert err == ""


def test_every_packaged_profile_has_a_golden_file():
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(packaged_profiles())


@pytest.mark.parametrize("profile", ["pawsey_example", "setonix_example"])
def test_render_of_a_site_profile_works_on_this_machine(profile):
    """For real, in a subprocess: this machine has neither ipogif0 nor hsn0."""
    import subprocess

    if {"ipogif0", "hsn0"} & set(host.interfaces()):
        pytest.skip("this host has the profile's interface")
    r = subprocess.run([sys.executable, "-m", "askap_flows.cli", "render", "--profile", profile],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tcp://SCHEDULER_ADDRESS:SCHEDULER_PORT" in r.stdout and "#SBATCH" in r.stdout
    assert "does not exist on this host" in r.stderr and "Traceback" not in r.stderr
