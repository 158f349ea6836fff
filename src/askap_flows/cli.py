"""``askap-flows``: helper commands around the sub-flows (the main job is ``python -m askap_flows.run``)."""

from __future__ import annotations

import argparse
import shlex
import sys

from . import mpi, slurm
from .spec import BACKENDS, SpecError, packaged_profiles, read_profile, resolve_specs


def cmd_build_mpi(args) -> int:
    path = mpi.build_hello(args.output, force=args.force)
    print(path)
    return 0


def cmd_profiles(args) -> int:
    for name, path in packaged_profiles().items():
        import yaml

        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "").strip()
        print(f"{name:16s} {path}\n{'':16s} {' '.join(desc.split())}")
    return 0


def cmd_render(args) -> int:
    read_profile(args.profile)  # a clear error for a bad profile before anything else
    alloc, spec = resolve_specs(None, None, args.profile, args.backend)
    program = args.program or spec.program or str(mpi.default_program())
    if args.backend == "slurm":
        kwargs = slurm.run_cluster_kwargs(alloc, f"{alloc.job_name_prefix}-RUNID",
                                          mpi.askap_home() / "logs")
        print("# job script (submit by hand with: sbatch THIS_FILE)")
        print(slurm.render_job_script(kwargs))
    print("# MPI command line, run by the Dask worker inside the job")
    print(shlex.join(mpi.launch_command(spec, program)))
    return 0


def cmd_cleanup(args) -> int:
    slurm.check_available()
    jobs = slurm.jobs_with_prefix(args.prefix)
    if not jobs:
        print(f"no SLURM jobs named {args.prefix}-* are left")
        return 0
    print(f"{len(jobs)} SLURM job(s) named {args.prefix}-* (left by a pipeline that died, or "
          "belonging to one still running):")
    for job_id, name, state, nodes in jobs:
        print(f"  {job_id:>10}  {name:28s} {state:12s} {nodes}")
    if not args.yes:
        print("nothing cancelled; run again with --yes to cancel them (make sure no pipeline of "
              "yours is still running)")
        return 0
    for _, name, _, _ in jobs:
        slurm.cancel_named(name)
    left = slurm.jobs_with_prefix(args.prefix)
    print(f"cancelled {len(jobs) - len(left)} job(s)" + (f"; {len(left)} still listed" if left else ""))
    return 1 if left else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="askap-flows", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-mpi", help="compile the MPI check program with $MPICC or mpicc")
    b.add_argument("--output", help=f"where to put it (default: {mpi.default_program()})")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.set_defaults(func=cmd_build_mpi)
    pr = sub.add_parser("profiles", help="list the packaged profiles")
    pr.set_defaults(func=cmd_profiles)
    r = sub.add_parser("render", help="print the job script and MPI command a sub-flow would use "
                                      "(submits nothing)")
    r.add_argument("--profile", default="testbed", help="profile name or YAML path")
    r.add_argument("--backend", choices=BACKENDS, default="slurm")
    r.add_argument("--program", help="MPI program (default: the check program)")
    r.set_defaults(func=cmd_render)
    c = sub.add_parser("cleanup", help="list (and with --yes cancel) SLURM jobs left by "
                                       "askap_flows pipelines that died")
    c.add_argument("--prefix", default="askapflows", help="job name prefix (default: askapflows)")
    c.add_argument("--yes", action="store_true", help="cancel them")
    c.set_defaults(func=cmd_cleanup)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, mpi.MPIError, slurm.SlurmError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
