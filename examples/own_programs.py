"""Your own MPI programs as sub-flows: a C program, an mpi4py program, a program in a container."""
import sys
from functools import partial
from pathlib import Path

from prefect import flow

from askap_flows import mpi_subflow, prefect_server, run_subflows
from askap_flows.mpi import build_hello

HERE = Path(__file__).resolve().parent


@flow(name="own-programs")
def own_programs(backend: str = "local", profile: str | None = None) -> bool:
    # a C program: here the check program's source, compiled with mpicc like any of yours
    c_program = str(build_hello(Path.cwd() / "build" / "my_mpi_program"))
    layout = {"nodes": 1, "ntasks": 2}
    common = dict(allocation={"nodes": 1}, backend=backend, profile=profile)
    calls = [
        partial(mpi_subflow, {**layout, "program": c_program}, **common, name="c-program"),
        partial(mpi_subflow, {**layout, "program": sys.executable,  # an mpi4py program
                              "args": ["-m", "askap_flows.mpi_hello"]}, **common, name="mpi4py"),
        partial(mpi_subflow, {**layout, "program": c_program,  # inside a container runtime
                              "wrapper": [str(HERE / "container.sh")]}, **common, name="container"),
    ]
    outcomes = run_subflows(calls, max_concurrent=3)
    for o in outcomes:
        print(o.index, "ok" if o.ok else f"FAILED: {o.error}", *(
            [" ".join(f"{r.rank}/{r.size}" for r in o.value.ranks), "|", *o.value.command]
            if o.ok else []))
    return all(o.ok for o in outcomes)


if __name__ == "__main__":  # python examples/own_programs.py [slurm PROFILE]
    with prefect_server(max_concurrent=3):  # PREFECT_API_URL's server, else one for this run
        sys.exit(0 if own_programs(*sys.argv[1:3]) else 1)
