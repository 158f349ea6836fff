"""``askap-flows``: helper commands around the sub-flows.

(The main job is ``python -m askap_flows.run``.)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import cluster_yaml, host, mpi, server_cli, slurm, slurm_query
from .resolve import resolve
from .spec import AllocationSpec, MPISpec, SpecError
from .spec_profile import BACKENDS, packaged_profiles


def cmd_build_mpi(args) -> int:
    path = mpi.build_hello(args.output, force=args.force, mpicc=args.mpicc)
    print(path)
    return 0


def cmd_profiles(args) -> int:
    for name, path in packaged_profiles().items():
        import yaml

        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "").strip()
        print(f"{name:16s} {path}\n{'':16s} {' '.join(desc.split())}")
    return 0


SCHEDULER_PLACEHOLDER = "SCHEDULER_ADDRESS"


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def cmd_render(args) -> int:
    """Print the job script and MPI command line; works off-cluster: where the profile's scheduler
    interface is not on this host, the scheduler address is a marked placeholder (stderr says so).
    `doctor` is the command that fails for a missing interface."""
    resolved = resolve(args.profile, backend=args.backend, nodes=args.nodes, ntasks=args.ntasks,
                       any_form=True, say=_note)
    if resolved.jobqueue is not None:
        return _render_jobqueue(args, resolved.jobqueue)
    alloc, spec = resolved.allocation_spec(), resolved.mpi_spec()
    program = args.program or spec.program or str(mpi.default_program(spec.mpicc))
    if args.backend == "slurm":
        address = "127.0.0.1"  # what slurm.scheduler_host gives without a scheduler_interface
        try:
            if alloc.scheduler_interface:
                address = host.interface_address(alloc.scheduler_interface)
        except host.InterfaceError as exc:  # e.g. a laptop: the profile's interface is elsewhere
            address = SCHEDULER_PLACEHOLDER
            print(f"note: {str(exc).rstrip('.')}: the job script shows {SCHEDULER_PLACEHOLDER} in "
                  "place of the scheduler's address. That is fine for checking a profile here; a "
                  "run must start on a host with that interface (`askap-flows doctor --profile "
                  f"{args.profile}` checks it there).", file=sys.stderr)
        kwargs = slurm.cluster_kwargs(alloc, job_name=f"{alloc.job_name_prefix}-RUNID",
                                      log_directory=str(host.log_dir()), env=slurm.job_env(),
                                      dashboard_address=f"{address}:0")
        print("# job script: what each sub-flow submits (RUNID and the scheduler's port are "
              "chosen by the run)")
        if address == SCHEDULER_PLACEHOLDER:
            print(f"# {SCHEDULER_PLACEHOLDER}: placeholder, the scheduler interface "
                  f"{alloc.scheduler_interface!r} is not on this host")
        print(slurm.render_job_script(kwargs, scheduler=f"tcp://{address}:SCHEDULER_PORT"))
    print("# MPI command line, run by the Dask worker inside the job")
    if resolved.launcher_note:
        print(f"# {resolved.launcher_note}")
    print(shlex.join(mpi.launch_command(spec, program)))
    return 0


def _render_jobqueue(args, profile: cluster_yaml.JobqueueProfile) -> int:
    """render for a profile in dask-jobqueue's form (cluster_class, cluster_kwargs, adapt_kwargs):
    the job script of each of its jobs; what the profile sets that askap_flows overrides, on
    stderr (said by resolve)."""
    interface = cluster_yaml.scheduler_interface(profile)
    address = "127.0.0.1"
    try:
        if interface:
            address = host.interface_address(interface)
    except host.InterfaceError as exc:
        address = SCHEDULER_PLACEHOLDER
        print(f"note: {str(exc).rstrip('.')}: the job script shows {SCHEDULER_PLACEHOLDER}.",
              file=sys.stderr)
    adapt = profile.adapt_kwargs
    shape = (f"adaptive: adapt({', '.join(f'{k}={v!r}' for k, v in adapt.items())}) scales "
             "jobs like this one" if adapt else "one cluster per flow run, "
             f"{profile.cluster_kwargs.get('n_workers', 1)} job(s) like this one")
    print(f"# job script (dask-jobqueue form; {shape}; RUNID and the scheduler's port are chosen "
          "by each flow run)")
    print(cluster_yaml.job_script(profile, str(host.log_dir()), slurm.job_env(), address))
    return 0


def cmd_doctor(args) -> int:
    from . import doctor, doctor_report
    from .run import prepare_environment

    if args.max_concurrent < 1:
        raise SpecError(f"--max-concurrent must be >= 1, got {args.max_concurrent}.")
    prepare_environment()  # the main job's defaults: PREFECT_HOME under ./.askap_flows
    if args.backend is None:
        chosen = args.profile or os.environ.get("ASKAP_FLOWS_PROFILE")
        args.backend = "slurm" if chosen and chosen != "local" else "local"

    def specs() -> tuple[AllocationSpec, MPISpec]:
        resolved = resolve(args.profile, backend=args.backend, any_form=True, say=_note)
        if resolved.jobqueue is not None:  # dask-jobqueue's form: what its jobs ask for
            return cluster_yaml.as_allocation(resolved.jobqueue), resolved.mpi_spec()
        return resolved.allocation_spec(), resolved.mpi_spec()

    rows = doctor.run_checks(args.profile, args.backend, args.max_concurrent, specs=specs)
    print(doctor_report.render_table(rows))
    failed = [r.name for r in rows if r.status == doctor_report.FAIL]
    print(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed
          else "no check failed")
    return doctor_report.exit_code(rows)


def cmd_cleanup(args) -> int:
    where = args.clusters
    if where is None and args.profile:  # the clusters: its sub-flows submitted to (sbatch -M)
        where = resolve(args.profile, step=False, any_form=True, say=lambda _: None).clusters
    slurm_query.check_available(where)
    jobs = slurm_query.jobs_with_prefix(args.prefix, where)
    on = f" on cluster(s) {where}" if where else ""
    if not jobs:
        print(f"no SLURM jobs named {args.prefix}-* are left{on}")
        return 0
    print(f"{len(jobs)} SLURM job(s) named {args.prefix}-*{on} (left by a pipeline that died, or "
          "belonging to one still running):")
    for cluster, job_id, name, state, nodes in jobs:
        print(f"  {cluster or '-':10s} {job_id:>10}  {name:28s} {state:12s} {nodes}")
    if not args.yes:
        print("nothing cancelled; run again with --yes to cancel them (make sure no pipeline of "
              "yours is still running)")
        return 0
    from .jobs import cancel_named

    for cluster, _, name, _, _ in jobs:  # one scancel each; the job board watches them end
        cancel_named(name, clusters_=cluster or None)
    left = slurm_query.jobs_with_prefix(args.prefix, where)
    still = f"; {len(left)} still listed" if left else ""
    print(f"cancelled {len(jobs) - len(left)} job(s){still}")
    return 1 if left else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="askap-flows", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-mpi", help="compile the MPI check program with $MPICC or mpicc")
    b.add_argument("--output", help=f"where to put it (default: {mpi.default_program()})")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--mpicc", help="compiler wrapper of another MPI (a profile's mpi: mpicc:, e.g. "
                                   "/usr/bin/mpicc.openmpi); builds into its own bin/ directory")
    b.set_defaults(func=cmd_build_mpi)
    pr = sub.add_parser("profiles", help="list the packaged profiles")
    pr.set_defaults(func=cmd_profiles)
    r = sub.add_parser("render", help="print the job script and MPI command a sub-flow would use "
                                      "(submits nothing)")
    r.add_argument("--profile", default="testbed", help="profile name or YAML path")
    r.add_argument("--backend", choices=BACKENDS, default="slurm")
    r.add_argument("--program", help="MPI program (default: the check program)")
    r.add_argument("--nodes", type=int,
                   help="nodes of the job and the MPI step (overrides the profile)")
    r.add_argument("--ntasks", type=int, help="MPI ranks (overrides the profile)")
    r.set_defaults(func=cmd_render)
    d = sub.add_parser("doctor", help="check, in seconds, what a run needs (SLURM, partition, MPI, "
                                      "Prefect, ports, interfaces); print OK/FAIL with the fix; "
                                      "exit 1 on any FAIL")
    d.add_argument("--profile", help="profile name or YAML path (default: 'local' for the local "
                                     "backend, $ASKAP_FLOWS_PROFILE for slurm)")
    d.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: slurm when a profile other than 'local' is given, else local")
    d.add_argument("--max-concurrent", type=int, default=2, metavar="K",
                   help="sub-flows the run will start at once (default: 2, as the main job)")
    d.set_defaults(func=cmd_doctor)
    c = sub.add_parser("cleanup", help="list (and with --yes cancel) SLURM jobs left by "
                                       "askap_flows pipelines that died")
    c.add_argument("--prefix", default="askapflows", help="job name prefix (default: askapflows)")
    c.add_argument("--yes", action="store_true", help="cancel them")
    c.add_argument("--clusters", default=None, metavar="NAMES",
                   help="look on these SLURM clusters (squeue/scancel -M; default: the "
                        "profile's allocation: clusters:, else this host's cluster)")
    c.add_argument("--profile", default=None,
                   help="take --clusters from this profile's allocation: clusters:")
    c.set_defaults(func=cmd_cleanup)
    server_cli.add_database_commands(sub)
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
