"""askap_flows: Prefect sub-flows that each build their own Dask cluster on SLURM and run MPI.

Importing this package does not import Prefect; ``askap_flows.flows`` does.
"""

from .errors import AskapFlowsError
from .spec import AllocationSpec, MPISpec, SpecError
from .spec_profile import build_specs

__all__ = ["AskapFlowsError", "AllocationSpec", "MPISpec", "SpecError", "build_specs",
           "mpi_subflow", "array_subflow", "run_subflows", "prefect_server", "allocation",
           "task_runner", "mpi_task"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "prefect_server":
        from .server import prefect_server

        return prefect_server
    if name in ("mpi_subflow", "array_subflow"):
        from . import flows

        return getattr(flows, name)
    if name == "run_subflows":
        from .composition import run_subflows

        return run_subflows
    if name == "task_runner":
        from .flow_runner import task_runner

        return task_runner
    if name == "mpi_task":
        from .mpi_run import mpi_task

        return mpi_task
    if name == "allocation":
        from . import pool

        return pool.allocation
    raise AttributeError(name)
