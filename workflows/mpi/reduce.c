/* A small MPI program: every rank reports the node it runs on and its time span, then the
 * ranks sum their ranks with MPI_Reduce and rank 0 prints the result.
 *   ./reduce OUTDIR          (run through srun / mpiexec by pilotflow for an mpi = true task) */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    long long start = now_ns();
    int rank, size, sum = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    char node[256];
    const char *slurm = getenv("SLURMD_NODENAME");
    if (slurm) snprintf(node, sizeof node, "%s", slurm); else gethostname(node, sizeof node);
    usleep(500000);  /* a little work, so that the ranks overlap in time */
    MPI_Reduce(&rank, &sum, 1, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD);
    long long end = now_ns();
    const char *outdir = argc > 1 ? argv[1] : ".";
    const char *token = getenv("PILOTFLOW_TOKEN");
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.rank%d", outdir, token ? token : "reduce", rank);
    FILE *f = fopen(path, "w");
    if (f) { fprintf(f, "%d %d %s %lld %lld\n", rank, size, node, start, end); fclose(f); }
    if (rank == 0) printf("%d ranks, sum of ranks %d (expected %d)\n", size, sum, size * (size - 1) / 2);
    MPI_Finalize();
    return rank == 0 && sum != size * (size - 1) / 2;
}
