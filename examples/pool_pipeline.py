"""Eight MPI steps as job steps of ONE held 3-node SLURM job (a warm pool): no queue wait, no
cluster start per step; steps of 2 nodes x 2 ranks run three at a time, side by side. Opened in
this flow, the pool is an artifact of its run; each step prints its SLURM step id (J.S)."""
import sys
from functools import partial

from prefect import flow

from askap_flows import allocation, mpi_subflow, run_subflows


@flow(name="pool-pipeline")
def pipeline(profile: str = "testbed", steps: int = 8) -> bool:
    step = {"nodes": 2, "ntasks": 4, "ntasks_per_node": 2, "timeout": 120}
    with allocation(profile=profile, nodes=3, walltime="00:15:00", ntasks_per_node=4) as pool:
        calls = [partial(mpi_subflow, step, pool=pool, name=f"beam-{i}") for i in range(steps)]
        outcomes = run_subflows(calls, max_concurrent=steps)  # more than fit: the pool queues them
    for o in outcomes:
        print(o.index, "ok" if o.ok else f"FAILED: {o.error}",
              getattr(o.value, "job_id", ""), ",".join(getattr(o.value, "nodes", [])),
              getattr(o.value, "step_id", ""))  # the SLURM job step J.S
    return all(o.ok for o in outcomes)


if __name__ == "__main__":  # python examples/pool_pipeline.py [PROFILE]
    sys.exit(0 if pipeline(*sys.argv[1:2]) else 1)
