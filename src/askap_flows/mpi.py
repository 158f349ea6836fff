"""MPI vocabulary: the launch command line (pure), the hello program, and reading its ranks."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import host, shell
from .errors import AskapFlowsError
from .spec import MPISpec

HELLO_NAME = "mpi_hello_world"
HOME_ENV = host.HOME_ENV
_RANK_MARK = "ASKAP_MPI_HELLO "

MPI_INSTALL_HINT = (
    "Install an MPI with a compiler wrapper: as root `apt-get install mpich libmpich-dev` "
    "(Debian), "
    "or without root `pip install mpich` in this Python environment (the wheel ships mpicc and "
    "mpiexec). Or point $MPICC at an existing mpicc."
)


class MPIError(AskapFlowsError, RuntimeError):
    """The MPI step ran but its ranks do not form the world that was asked for."""


@dataclass(frozen=True)
class RankRecord:
    rank: int
    size: int
    processor: str
    host: str
    allreduce: int
    expected: int
    cpus: str = "-"  # $SLURM_CPUS_PER_TASK of the rank ('-' outside SLURM)

    @property
    def allreduce_ok(self) -> bool:
        return self.allreduce == self.expected


askap_home = host.askap_home  # $ASKAP_FLOWS_HOME or ./.askap_flows (kept here for callers)


def default_program(mpicc: str | None = None) -> Path:
    """Where the hello program lives: ``bin/`` of the home, or, built with a compiler wrapper a
    profile names (``mpi: mpicc:``, e.g. Open MPI's next to MPICH's), ``bin/<wrapper>-<hash>/``,
    so that builds with different MPI libraries never replace each other."""
    if not mpicc:
        return askap_home() / "bin" / HELLO_NAME
    digest = hashlib.sha1(mpicc.encode()).hexdigest()[:8]
    return askap_home() / "bin" / f"{Path(mpicc).name}-{digest}" / HELLO_NAME


# --------------------------------------------------------------------------- launch command
def launch_command(spec: MPISpec, program: str | None = None) -> list[str]:
    """The argument list that starts ``spec`` (pure: no I/O).

    srun:    srun --mpi=P -N nodes -n ntasks [--ntasks-per-node k] [-c cpus] [extra] [wrapper]
             prog args
    mpiexec: mpiexec -n ntasks [extra] [wrapper] prog args
    """
    prog = program or spec.program or str(default_program(spec.mpicc))
    if spec.launcher == "srun":
        argv = ["srun", f"--mpi={spec.mpi_plugin}", "--nodes", str(spec.nodes),
                "--ntasks", str(spec.ntasks)]
        if spec.ntasks_per_node is not None:
            argv += ["--ntasks-per-node", str(spec.ntasks_per_node)]
        # SLURM >= 22.05: srun no longer inherits --cpus-per-task from the job; always pass it.
        argv += ["--cpus-per-task", str(spec.cpus_per_task or 1)]
        argv += ["--kill-on-bad-exit=1"]
    else:
        argv = ["mpiexec", "-n", str(spec.ntasks)]
    return argv + list(spec.launcher_args) + list(spec.wrapper) + [prog] + list(spec.args)


# Every rank of an Open MPI program started by srun without PMIx (--mpi=pmi2 or none) prints this
# before MPI_Init aborts (Open MPI 4.1 of Debian 12; it is not built with SLURM's PMI-1/PMI-2)
OMPI_WITHOUT_PMIX = "OMPI was not built with SLURM's PMI support"
_SRUN_TASK_ERROR = re.compile(
    r"^srun: error: (?P<node>\S+): tasks? (?P<tasks>[0-9,-]+): (?P<what>.+)$")


def first_failure(stderr_lines: Sequence[str], mpi_plugin: str | None = None) -> str | None:
    """The first rank failure srun reported (the cause; ranks it then terminated are effects),
    as a hint for the error message, or None. When Open MPI said it was started without PMIx,
    the hint is that fix alone."""
    if any(OMPI_WITHOUT_PMIX in line for line in stderr_lines):
        return ("MPI_Init aborted: the program is built with Open MPI, which srun starts only "
                f"with --mpi=pmix (this was --mpi={mpi_plugin or '?'}). Fix: set mpi: mpi_plugin: "
                "pmix in the profile.")
    failures = [m for m in map(_SRUN_TASK_ERROR.match, (x.strip() for x in stderr_lines)) if m]
    causes = [m for m in failures if m.group("what") not in ("Terminated", "Killed")] or failures
    if not causes:
        return None
    m = causes[0]
    tasks = m.group("tasks")
    word = "task" if tasks.isdigit() else "tasks"
    return (f"The first rank to fail: {word} {tasks} on {m.group('node')}: "
            f"{m.group('what')}. (srun's own exit code can be that of the ranks it terminated "
            "after it; the program's stderr above says why the rank failed.)")


# --------------------------------------------------------------------------- ranks
def parse_ranks(text: str) -> list[RankRecord]:
    """Rank records from the hello program's output, sorted by rank; other lines are ignored."""
    records = []
    # Split at every marker, not only at line starts: a launcher that forwards several ranks'
    # output can glue two records into one line.
    for fields in text.split(_RANK_MARK)[1:]:
        fields = fields.split("\n", 1)[0]
        kv = dict(item.split("=", 1) for item in fields.split() if "=" in item)
        try:
            records.append(RankRecord(
                rank=int(kv["rank"]), size=int(kv["size"]), processor=kv["processor"],
                host=kv.get("host", kv["processor"]), allreduce=int(kv["allreduce"]),
                expected=int(kv["expected"]), cpus=kv.get("cpus", "-"),
            ))
        except (KeyError, ValueError):
            continue
    return sorted(records, key=lambda r: r.rank)


def check_world(ranks: Sequence[RankRecord], spec: MPISpec) -> None:
    """Raise MPIError unless the ranks formed one world of ``spec.ntasks`` that communicated."""
    n = spec.ntasks
    if n > 1 and ranks and all(r.size == 1 for r in ranks):
        hint = ("MPICH needs --mpi=pmi2, Open MPI needs --mpi=pmix"
                if spec.launcher == "srun" else "the mpiexec does not belong to the MPI the "
                "program was compiled with")
        if spec.launcher == "srun" and spec.mpi_plugin.startswith("pmix"):
            hint += (" (an MPICH program started with pmix gives exactly this). Fix: set mpi: "
                     "mpi_plugin: pmi2 in the profile, or build the program with Open MPI")
        raise MPIError(
            f"every rank reports size 1 although {n} ranks were started: they are {len(ranks)} "
            f"separate singleton worlds, not one MPI job. The launcher and the MPI library do not "
            f"match (mpi_plugin={spec.mpi_plugin!r}): {hint}. Check `srun --mpi=list` and the "
            "profile's mpi_plugin."
        )
    if len(ranks) != n:
        raise MPIError(f"expected {n} rank records, got {len(ranks)}.")
    bad = [r.rank for r in ranks if r.size != n or not r.allreduce_ok]
    if bad or sorted(r.rank for r in ranks) != list(range(n)):
        raise MPIError(f"ranks {bad} report a wrong world size or allreduce (expected size {n}).")


# --------------------------------------------------------------------------- building
def find_mpicc() -> str | None:
    """$MPICC, else mpicc on PATH, else mpicc next to this Python (a venv with the mpich wheel)."""
    if os.environ.get("MPICC"):
        return shutil.which(os.environ["MPICC"]) or None
    return shutil.which("mpicc") or shutil.which("mpicc", path=str(Path(sys.executable).parent))


def find_mpiexec() -> str | None:
    """The mpiexec that belongs to the mpicc in use (same directory), else the one on PATH."""
    cc = find_mpicc()
    if cc:
        sibling = Path(cc).parent / "mpiexec"
        if sibling.exists():
            return str(sibling)
    return shutil.which("mpiexec") or shutil.which("mpiexec", path=str(Path(sys.executable).parent))


def hello_source() -> Path:
    """The C source: shipped in the package, or csrc/ of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc" / f"{HELLO_NAME}.c",
                      here.parents[1] / "csrc" / f"{HELLO_NAME}.c"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{HELLO_NAME}.c is not shipped with this installation of askap_flows")


_build_mutex = threading.Lock()


def build_hello(output: Path | None = None, force: bool = False, mpicc: str | None = None) -> Path:
    """Compile the hello program with mpicc (if missing or older than its source); return its path.

    ``mpicc``: the compiler wrapper to use (a profile's ``mpi: mpicc:``); its program goes to
    ``default_program(mpicc)``. Default: :func:`find_mpicc`, into ``default_program()``.

    Built once per home, however many sub-flows ask at once: threads queue on a mutex, processes
    on an ``flock`` of ``<output>.lock``; whoever comes second finds the program built. The
    compiler writes a temporary file unique to the process and thread, renamed into place.
    """
    output = Path(output or default_program(mpicc))
    src = hello_source()

    def current() -> bool:
        return not force and output.exists() and output.stat().st_mtime >= src.stat().st_mtime

    if current():
        return output
    cc = shutil.which(mpicc) if mpicc else find_mpicc()
    if cc is None and mpicc:
        raise MPIError(f"the profile's MPI compiler (mpi: mpicc: {mpicc}) is not there. Install "
                       "that MPI (Debian's Open MPI: apt-get install openmpi-bin libopenmpi-dev) "
                       "or fix mpi: mpicc: in the profile.")
    if cc is None:
        raise MPIError(f"no MPI compiler (mpicc) found to build {output.name}. {MPI_INSTALL_HINT}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with _build_mutex, open(output.with_name(f".{output.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current() and not force:
            return output
        tmp = output.with_name(f".{output.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            shell.run([cc, "-O2", "-o", str(tmp), str(src)], timeout=120)
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
    return output


def program_env(spec: MPISpec) -> Mapping[str, str]:
    """Environment for the launcher: the spec's own, plus Open MPI's root permission for mpiexec."""
    env = dict(spec.env)
    if spec.launcher == "mpiexec" and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def resolve_program(spec: MPISpec, program: str | None) -> tuple[str, bool]:
    """The program to run and whether it is the packaged hello program (whose ranks we check).
    Builds the hello program if it is missing; a user program must exist (unless wrapped)."""
    prog = program or spec.program
    if prog is None:
        return str(build_hello(mpicc=spec.mpicc)), True
    if not spec.wrapper:
        path = Path(prog) if os.sep in prog else shutil.which(prog)
        if path is None or not Path(path).exists():
            raise FileNotFoundError(
                f"MPI program {prog!r} does not exist. Give its full path, or build the packaged "
                "check program with `askap-flows build-mpi`."
            )
        if not os.access(path, os.X_OK):
            raise PermissionError(f"MPI program {prog!r} is not executable: chmod +x {prog}")
        prog = str(Path(path).absolute())
    return prog, False
