/*
 * mpi_hello_world.c -- the askap_flows check program.
 *
 * Every rank prints exactly one line that askap_flows.mpi.parse_ranks() reads:
 *
 *   ASKAP_MPI_HELLO rank=<r> size=<n> processor=<name> host=<hostname> allreduce=<sum> expected=<n(n-1)/2> cpus=<c>
 *
 * (cpus is $SLURM_CPUS_PER_TASK as srun set it for the rank, or '-').
 *
 * The allreduce sums the ranks over MPI_COMM_WORLD, so a correct value proves that the ranks
 * formed one world and really communicated (not N singleton worlds started side by side).
 *
 * Optional arguments, used by the tests to cause faults on purpose:
 *   --fail-rank R     rank R exits with status 3 after the allreduce
 *   --sleep S         every rank sleeps S seconds before MPI_Finalize
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank = 0, size = 0, len = 0, sum = 0, fail_rank = -1;
    double sleep_s = 0.0;
    char name[MPI_MAX_PROCESSOR_NAME] = {0};
    char host[256] = {0};

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(name, &len);
    if (gethostname(host, sizeof host - 1) != 0) {
        strcpy(host, "unknown");
    }

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--fail-rank") == 0 && i + 1 < argc) {
            fail_rank = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--sleep") == 0 && i + 1 < argc) {
            sleep_s = atof(argv[++i]);
        }
    }

    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);

    const char *cpus = getenv("SLURM_CPUS_PER_TASK");
    printf("ASKAP_MPI_HELLO rank=%d size=%d processor=%s host=%s allreduce=%d expected=%d cpus=%s\n",
           rank, size, name, host, sum, size * (size - 1) / 2, cpus ? cpus : "-");
    fflush(stdout);

    if (rank == fail_rank) {
        fprintf(stderr, "rank %d: failing on purpose (--fail-rank)\n", rank);
        fflush(stderr);
        exit(3);
    }
    if (sleep_s > 0) {
        usleep((useconds_t)(sleep_s * 1e6));
    }
    MPI_Finalize();
    return 0;
}
