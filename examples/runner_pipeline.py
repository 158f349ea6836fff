"""Two flows written the way Prefect + dask-jobqueue pipelines write theirs, each with its own
cluster YAML (examples/clusters/), on askap_flows' hardened task runner (for the test bed).

    python examples/runner_pipeline.py

``squares`` runs on single-node worker jobs that adapt(minimum=1, maximum=3) scales with its load;
``mpi_hello`` runs an MPI program across the 3 nodes of one job. Each flow run gets its own
cluster, and no job outlives it.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task

import askap_flows

CLUSTERS = Path(__file__).resolve().parent / "clusters"


@task
def square(x: int) -> int:
    time.sleep(1)  # some work, on a Dask worker in a SLURM job
    return x * x


@flow(name="adaptive-squares")
def squares(n: int = 12) -> int:
    futures = [square.submit(i) for i in range(n)]
    return sum(f.result() for f in futures)


@flow(name="mpi-hello")
def mpi_hello() -> dict:
    return askap_flows.mpi_task({"nodes": 3, "ntasks": 6, "ntasks_per_node": 2,
                                 "mpi_plugin": "pmi2", "timeout": 120})


def main() -> None:
    total = squares.with_options(task_runner=askap_flows.task_runner(CLUSTERS / "adaptive.yaml"))()
    hello = mpi_hello.with_options(task_runner=askap_flows.task_runner(CLUSTERS / "mpi.yaml"))()
    nodes = sorted({r.host for r in hello["ranks"]})
    print(f"sum of squares: {total}; MPI job {hello['job_id']}: {len(hello['ranks'])} ranks on "
          f"{','.join(nodes)}")


if __name__ == "__main__":
    with askap_flows.prefect_server():  # the jobs' workers report to this server
        main()
