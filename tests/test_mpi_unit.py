import pytest

from askap_flows.mpi import MPIError, check_world, launch_command, parse_ranks
from askap_flows.spec import MPISpec

pytestmark = pytest.mark.unit


def test_srun_command_line_golden():
    spec = MPISpec(nodes=3, ntasks=6, ntasks_per_node=2, cpus_per_task=2, mpi_plugin="pmi2",
                   launcher_args=("--exclusive",), wrapper=("apptainer", "exec", "img.sif"),
                   args=("--sleep", "1"))
    assert launch_command(spec, "/x/hello") == [
        "srun", "--mpi=pmi2", "--nodes", "3", "--ntasks", "6", "--ntasks-per-node", "2",
        "--cpus-per-task", "2", "--kill-on-bad-exit=1", "--exclusive",
        "apptainer", "exec", "img.sif", "/x/hello", "--sleep", "1",
    ]


def test_mpiexec_command_line_golden():
    spec = MPISpec(nodes=1, ntasks=4, launcher="mpiexec")
    assert launch_command(spec, "/p/a b") == ["mpiexec", "-n", "4", "/p/a b"]


def _lines(n, size=None, bad_sum=False):
    size = n if size is None else size
    out = ["some other line"]
    for r in range(n):
        s = 0 if size == 1 else size * (size - 1) // 2
        out.append(f"ASKAP_MPI_HELLO rank={0 if size == 1 else r} size={size} processor=node{r % 3 + 1} "
                   f"host=node{r % 3 + 1} allreduce={s + (1 if bad_sum else 0)} expected={s}")
    return "\n".join(out)


def test_parse_ranks_reads_every_record_in_rank_order():
    ranks = parse_ranks(_lines(6))
    assert [r.rank for r in ranks] == list(range(6))
    assert {r.processor for r in ranks} == {"node1", "node2", "node3"}
    assert all(r.size == 6 and r.allreduce == 15 for r in ranks)
    check_world(ranks, MPISpec(nodes=3, ntasks=6))


def test_singleton_worlds_name_the_plugin_fix():
    ranks = parse_ranks(_lines(6, size=1))
    with pytest.raises(MPIError, match="MPICH needs --mpi=pmi2, Open MPI needs --mpi=pmix"):
        check_world(ranks, MPISpec(nodes=3, ntasks=6, mpi_plugin="pmix"))


def test_wrong_count_or_sum_is_an_error():
    with pytest.raises(MPIError, match="expected 6 rank records, got 5"):
        check_world(parse_ranks(_lines(5, size=6)), MPISpec(nodes=3, ntasks=6))
    with pytest.raises(MPIError, match="wrong world size or allreduce"):
        check_world(parse_ranks(_lines(6, bad_sum=True)), MPISpec(nodes=3, ntasks=6))


def test_records_glued_into_one_line_by_the_launcher_are_all_read():
    one, two = _lines(2).splitlines()[1:]
    ranks = parse_ranks(f"{one}{two}\n")
    assert [r.rank for r in ranks] == [0, 1]
    check_world(ranks, MPISpec(nodes=1, ntasks=2))
