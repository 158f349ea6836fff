"""``python -m askap_flows.mpi_hello``: the mpi4py twin of csrc/mpi_hello_world.c.

Every rank prints the same parseable line as the C program (see askap_flows.mpi.parse_ranks), after
an allreduce of the ranks over COMM_WORLD. Run it through an MPISpec with
``program=sys.executable, args=["-m", "askap_flows.mpi_hello"]``.
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    total = comm.allreduce(rank, op=MPI.SUM)
    print(f"ASKAP_MPI_HELLO rank={rank} size={size} processor={MPI.Get_processor_name()} "
          f"host={socket.gethostname()} allreduce={total} expected={size * (size - 1) // 2} "
          f"cpus={os.environ.get('SLURM_CPUS_PER_TASK', '-')}", flush=True)
    if "--fail-rank" in args and rank == int(args[args.index("--fail-rank") + 1]):
        print(f"rank {rank}: failing on purpose (--fail-rank)", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
