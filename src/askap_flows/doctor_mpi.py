"""``askap-flows doctor``'s MPI checks: which MPI library a program uses, whether the profile's
``srun --mpi=`` plugin fits it, and whether the check program is built.

Pure functions from what was observed (``srun --mpi=list``, ``ldd``, ``mpicc -show``, ``mpiexec
--version``) to a flavour or a :class:`~askap_flows.doctor_report.Check` row.
"""

from __future__ import annotations

from pathlib import Path

from . import mpi
from .doctor_report import FAIL, OK, SKIP, WARN, Check
from .spec import MPISpec


def parse_mpi_list(text: str) -> set[str]:
    """Plugin names from ``srun --mpi=list`` (22.05: 'MPI plugin types are...' then one a line;
    newer: 'srun: MPI types are...' and 'srun: pmi2')."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("srun:"):
            line = line[len("srun:"):].strip()
        if not line or " " in line or line.endswith(":"):
            continue
        names.add(line)
    return names


def mpi_flavour(mpiexec_version: str) -> str | None:
    """'mpich', 'openmpi' or None, from ``mpiexec --version``."""
    text = mpiexec_version.lower()
    if "hydra" in text or "mpich" in text:
        return "mpich"
    if "open mpi" in text or "openrte" in text or "open-mpi" in text:
        return "openmpi"
    return None


NEEDED_PLUGIN = {"mpich": "pmi2", "openmpi": "pmix"}
FAMILY = {"mpich": "MPICH", "openmpi": "Open MPI"}
# what a program started with the wrong plugin does (measured on the test bed)
WRONG_PLUGIN = {"mpich": "every rank would start as a singleton world of size 1",
                "openmpi": "MPI_Init would abort on every rank (Open MPI needs PMIx)"}


def linked_flavour(ldd_out: str) -> tuple[str | None, str]:
    """('mpich' | 'openmpi' | None, the MPI library's file name) from ``ldd PROGRAM``.

    libmpich.so.N and libmpi.so.12 (the MPICH ABI, e.g. the mpich wheel) are MPICH; libmpi.so.40
    (Open MPI 3-5) with libopen-rte/libopen-pal or libmpi_cray are told apart by name too.
    """
    for line in ldd_out.splitlines():
        lib = line.strip().split(" ", 1)[0]
        if lib.startswith(("libmpich.so", "libmpi.so.12", "libmpi_cray")):
            return "mpich", lib
        if lib.startswith(("libmpi.so.4", "libopen-rte.so", "libopen-pal.so")):
            return "openmpi", lib
    return None, ""


def wrapper_flavour(show_out: str) -> str | None:
    """'mpich' | 'openmpi' | None from ``mpicc -show`` (the compile line the wrapper would run)."""
    if "-lmpich" in show_out.split() or "/mpich" in show_out:
        return "mpich"
    if "openmpi" in show_out or "-lopen-" in show_out:
        return "openmpi"
    return None


def mpi_library_check(flavour: str | None, source: str) -> Check:
    """Which MPI library the profile's program uses, as found by ``source``."""
    if flavour is None:
        return Check("MPI library", SKIP, source or "the program's MPI library cannot be told")
    return Check("MPI library", OK, f"{FAMILY[flavour]}: {source}")


def mpi_plugin_check(spec: MPISpec, mpi_list: str | None, flavour: str | None) -> Check:
    """The profile's ``srun --mpi=`` plugin is offered by SLURM and fits the MPI library."""
    if spec.launcher != "srun":
        return Check("MPI plugin", SKIP, f"launcher is {spec.launcher}, not srun")
    if mpi_list is None:
        return Check("MPI plugin", FAIL, "srun --mpi=list did not answer",
                     "make srun work here first (see 'SLURM reachable')")
    offered = parse_mpi_list(mpi_list)
    shown = ", ".join(sorted(offered)) or "(none)"
    if spec.mpi_plugin not in offered:
        return Check("MPI plugin", FAIL, f"mpi_plugin {spec.mpi_plugin!r} is not offered by "
                     f"srun (offered: {shown})",
                     f"set mpi: mpi_plugin: to one of {shown} in the profile (MPICH: pmi2, "
                     "Open MPI: pmix)")
    need = NEEDED_PLUGIN.get(flavour or "")
    if need and spec.mpi_plugin != need and flavour:
        return Check("MPI plugin", FAIL, f"mpi_plugin {spec.mpi_plugin!r}, but the program is "
                     f"{FAMILY[flavour]}: {WRONG_PLUGIN[flavour]}",
                     f"set mpi: mpi_plugin: {need} in the profile")
    if spec.mpi_plugin == "none":
        return Check("MPI plugin", WARN, "mpi_plugin 'none': ranks get no PMI and start as "
                     "singletons unless the program needs no MPI", "use pmi2 (MPICH) or pmix "
                     "(Open MPI)")
    which = f" and fits {FAMILY[flavour]}" if flavour else " (MPI flavour unknown: not compared)"
    return Check("MPI plugin", OK, f"--mpi={spec.mpi_plugin} offered (of {shown}){which}")


def mpicc_check(mpicc: str | None, mpiexec: str | None, program: Path, source: Path | None,
                needs_mpiexec: bool, wanted: str | None = None) -> Check:
    """An MPI compiler is there (``wanted``: the one the profile names), and the check program is
    built and up to date."""
    if mpicc is None and wanted:
        return Check("mpicc + program", FAIL, f"the profile's mpi: mpicc: {wanted} is not there",
                     "install that MPI (Debian's Open MPI: apt-get install openmpi-bin "
                     "libopenmpi-dev), or fix mpi: mpicc: in the profile")
    if mpicc is None:
        return Check("mpicc + program", FAIL, "no MPI compiler (mpicc) found",
                     mpi.MPI_INSTALL_HINT)
    if needs_mpiexec and mpiexec is None:
        return Check("mpicc + program", FAIL, f"mpicc {mpicc}, but no mpiexec for the local "
                     "backend", mpi.MPI_INSTALL_HINT)
    if not program.exists():
        return Check("mpicc + program", WARN, f"mpicc {mpicc}; the check program {program} is "
                     "not built yet (a run builds it first)",
                     "askap-flows build-mpi" + (f" --mpicc {wanted}" if wanted else ""))
    if source is not None and program.stat().st_mtime < source.stat().st_mtime:
        return Check("mpicc + program", WARN, f"{program} is older than its source {source}",
                     "askap-flows build-mpi --force")
    return Check("mpicc + program", OK, f"mpicc {mpicc}; {program} built")
