"""A sub-flow's job frees its nodes as soon as its MPI step has returned (mpi_run._release_nodes)."""

import pytest
from distributed import Client, LocalCluster

from askap_flows import mpi_run

pytestmark = pytest.mark.unit


def test_the_worker_leaves_once_the_step_result_is_fetched():
    """Dask refuses to retire a worker that holds the only copy of a result, even one the client
    has already fetched (it returned {} and the job kept its nodes until the cluster closed)."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        future = client.submit(lambda: {"exit_code": 0}, pure=False)
        assert future.result() == {"exit_code": 0}
        assert client.retire_workers(workers=list(client.scheduler_info()["workers"])) == {}
        assert len(client.scheduler_info()["workers"]) == 1  # plain retire: refused
        mpi_run._release_nodes(client, future)
        assert client.scheduler_info()["workers"] == {}
