"""Pins every private Prefect / prefect-dask / Dask attribute askap_flows relies on, on the
installed major: if an upgrade moves one, this fails here with its name, not in a user's run."""

import pytest

from askap_flows import compat, runners
from askap_flows.spec import AllocationSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_prefects_migrations_are_where_the_version_check_reads_them(dialect):
    found = compat.known_migrations(dialect)
    assert len(found) > 10 and all(len(r) >= 8 for r in found), found


def test_an_empty_migrations_folder_fails_loudly(monkeypatch, tmp_path):
    import importlib.util
    from types import SimpleNamespace

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(origin=str(tmp_path / "prefect" / "x.py")))
    with pytest.raises(RuntimeError, match="found no sqlite migrations"):
        compat.known_migrations("sqlite")


def test_the_flow_runs_dask_client_its_dashboard_and_cancelling_a_pending_future(tmp_path):
    """current_dask_client (prefect-dask 0.2: the runner's ``_client``), dashboard_url (the
    scheduler's ``http_server``), cancel_future (0.2: ``_get_dask_future``) on a real run."""
    import time

    import distributed
    from prefect import flow, task

    @task
    def blocked():
        time.sleep(1.5)
        return 1

    ran = tmp_path / "waiting-ran"

    @task
    def waiting(x):
        ran.write_text("ran")  # a cancelled future never gets here
        return x

    seen = {}

    @flow(task_runner=runners.local_runner(AllocationSpec(cores=1)))
    def probe():
        client = compat.current_dask_client()
        seen["client"] = isinstance(client, distributed.Client)
        seen["dashboard"] = runners.dashboard_url(client)
        first = blocked.submit()
        second = waiting.submit(first)  # cannot run before `first`: still pending
        compat.cancel_future(second)
        value = first.result()
        time.sleep(1.5)  # `second` would have run by now
        return value

    assert probe() == 1
    assert not ran.exists(), "the cancelled future still ran"
    assert seen["client"] is True
    assert seen["dashboard"] and seen["dashboard"].startswith("http://127.0.0.1:")


def test_dask_jobqueues_start_reads_the_job_id_through_the_override():
    """jobs.BoardJob overrides dask-jobqueue's private ``_job_id_from_submit_output`` to learn the
    cluster sbatch put the job on; dask-jobqueue's own ``Job.start`` must still call it. Its real
    start runs here, with a stand-in for sbatch that answers as a multi-cluster sbatch does."""
    import asyncio
    import shlex
    import sys

    from askap_flows import jobs

    cls = jobs.board_job_class("near,far")
    job = cls(scheduler="tcp://127.0.0.1:1", name="w", cores=1, memory="1GB", job_name="pin")
    job.submit_command = shlex.join(
        [sys.executable, "-c", "print('Submitted batch job 42 on cluster far')"])
    asyncio.run(super(jobs.BoardJob, job).start())  # dask-jobqueue's start, not BoardJob's retry
    assert job.job_id == "42"
    assert (job.cluster, job.cancel_command) == ("far", "scancel -M far"), \
        "dask-jobqueue's Job.start no longer calls _job_id_from_submit_output"


def test_a_closed_job_says_it_is_closed():
    """distributed's cluster close asserts that every job object it still references is closed,
    and dask-jobqueue's Job.close does not set the status (CI: "AssertionError: Status.running"
    when something still held the job). BoardJob.close must leave it closed."""
    import asyncio

    from distributed.core import Status

    from askap_flows import jobs

    job = jobs.board_job_class(None)(scheduler="tcp://127.0.0.1:1", name="w", cores=1,
                                     memory="1GB", job_name="pin")
    job.status = Status.running  # started, and its job id not known (nothing to cancel)
    asyncio.run(job.close())
    assert job.status == Status.closed
