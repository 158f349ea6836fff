"""Two MPI sub-flows and an array sub-flow, each on its own Dask cluster, at most 2 at once."""
import sys
from functools import partial

from prefect import flow

from askap_flows import array_subflow, mpi_subflow, prefect_server, run_subflows


@flow(name="example-pipeline")
def pipeline(backend: str = "local", profile: str | None = None) -> bool:
    where = dict(backend=backend, profile=profile)
    calls = [partial(mpi_subflow, {"nodes": 1, "ntasks": 2}, {"nodes": 1}, **where,
                     name=f"beam-{i}") for i in range(2)]
    calls.append(partial(array_subflow, 4, 100_000, **where, name="arrays"))
    outcomes = run_subflows(calls, max_concurrent=2)  # in order; a failure does not stop the rest
    for o in outcomes:
        print(o.index, "ok" if o.ok else f"FAILED: {o.error}",
              getattr(o.value, "job_id", None) or "", getattr(o.value, "dashboard", ""))
    return all(o.ok for o in outcomes)


if __name__ == "__main__":  # python examples/pipeline.py [slurm PROFILE]
    with prefect_server(max_concurrent=2):  # PREFECT_API_URL's server, else one for this run
        sys.exit(0 if pipeline(*sys.argv[1:3]) else 1)
