"""Golden files of what each packaged profile renders: the job script and the MPI command line.

Regenerate after an intended change: ASKAP_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

import dataclasses
import os
from pathlib import Path

import pytest

from askap_flows import mpi, slurm
from askap_flows.spec import build_specs, packaged_profiles

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).with_name("golden")


def render(profile: str) -> str:
    alloc, spec = build_specs(profile)
    alloc = dataclasses.replace(alloc, python="/opt/py/bin/python")
    kwargs = slurm.cluster_kwargs(alloc, job_name=f"{alloc.job_name_prefix}-RUNID",
                                  log_directory="/home/astro/.askap_flows/logs",
                                  env={"PREFECT_API_URL": "http://127.0.0.1:4200/api"},
                                  dashboard_address="127.0.0.1:20001")
    kwargs["scheduler_options"]["port"] = 20000
    script = slurm.render_job_script(kwargs, scheduler="tcp://127.0.0.1:20000")
    command = " ".join(mpi.launch_command(spec, "/opt/bin/mpi_hello_world"))
    return f"{script}\n# MPI command line\n{command}\n"


@pytest.mark.parametrize("profile", sorted(packaged_profiles()))
def test_rendered_profile_matches_golden(profile):
    text = render(profile)
    path = GOLDEN / f"{profile}.txt"
    if os.environ.get("ASKAP_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with ASKAP_UPDATE_GOLDEN=1"
    assert text == path.read_text()
