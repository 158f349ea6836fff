"""``python -m askap_flows.run``: the main job.

Runs several MPI sub-flows concurrently inside one parent flow, each on its own Dask cluster
(local: LocalCluster + mpiexec; slurm: a multi-node SLURM job + srun), shows progress, prints a
summary (or one JSON object with --json), and exits non-zero when any sub-flow failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import database, interrupt, mpi, poll_pace, run_pool, slurm, slurm_query
from . import server as server_mod
from .interrupt import EXIT_INTERRUPTED
from .progress import Progress
from .resolve import resolve
from .server import ServerError
from .spec import SpecError
from .spec_profile import BACKENDS

EXIT_FAILED = 1  # a sub-flow failed
EXIT_USAGE = 2  # bad input or a missing piece: nothing was run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m askap_flows.run",
        description=(
            "Run N MPI sub-flows concurrently as one Prefect pipeline. Each sub-flow builds its "
            "own Dask cluster when it starts (local: a threaded LocalCluster; slurm: a "
            "SLURMCluster "
            "whose one job spans --nodes nodes), runs the MPI check program across it (mpiexec or "
            "srun) and closes the cluster. With no arguments: the local backend, 4 sub-flows, "
            "a Prefect server on sqlite under ./.askap_flows, started for this run."
        ),
        epilog=(
            "examples:\n"
            "  python -m askap_flows.run\n"
            "  python -m askap_flows.run --backend slurm --profile testbed --subflows 6 --json\n"
            "environment: ASKAP_FLOWS_HOME (working dir, default ./.askap_flows), "
            "ASKAP_FLOWS_PROFILE, PREFECT_API_URL (use this Prefect server instead of starting "
            "one)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="where the clusters run: 'local' (no SLURM needed) or 'slurm' "
                        "(default: local)")
    p.add_argument("--profile", metavar="NAME|PATH",
                   help="packaged profile (local, testbed, pawsey_example) or a YAML file; "
                        "default: "
                        "'local' for the local backend, $ASKAP_FLOWS_PROFILE for slurm")
    p.add_argument("--subflows", type=int, default=4, metavar="N",
                   help="how many MPI sub-flows to run (default: 4)")
    p.add_argument("--max-concurrent", type=int, default=2, metavar="K",
                   help="at most K sub-flows (and clusters) at once (default: 2)")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="nodes per sub-flow: the SLURM job and the MPI step "
                        "(default: the profile's)")
    p.add_argument("--ntasks", type=int, metavar="N",
                   help="MPI ranks per sub-flow (default: the profile's)")
    p.add_argument("--program", metavar="PATH",
                   help="MPI executable to run (default: the packaged check program, "
                        "built if missing)")
    p.add_argument("--pool", type=int, metavar="NODES",
                   help="run the sub-flows as srun job steps of ONE held SLURM job of NODES "
                        "nodes (an allocation pool: no queue wait per sub-flow); needs "
                        "--backend slurm")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (a 'subflows' list) instead of the summary table")
    p.add_argument("--verbose", action="store_true", help="show Prefect's own log lines too")
    return p


def prepare_environment() -> Path:
    return server_mod.prepare_environment()


def quiet_prefect_console(verbose: bool) -> None:
    """Prefect's console lines would drown the progress output; they still reach the UI."""
    if not verbose:
        for var in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
                    "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL",
                    "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL"):
            os.environ.setdefault(var, "WARNING")
        import logging

        for name in ("distributed", "dask_jobqueue", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.ERROR)


def summary_table(rows: list[dict]) -> str:
    head = ("sub-flow", "state", "job", "nodes", "ranks", "seconds", "error")
    lines = [head]
    for r in rows:
        ranks = r.get("ranks") or []
        lines.append((
            r["name"], r["state"], r.get("job_id") or "-", ",".join(r.get("nodes") or []) or "-",
            f"{len(ranks)}", f"{r['seconds']:.1f}", (r.get("error") or "").splitlines()[0][:70]
            if r.get("error") else "",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip()
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    interrupt.install()
    try:
        if args.subflows < 1:
            raise SpecError(f"--subflows must be >= 1, got {args.subflows}.")
        if args.max_concurrent < 1:
            raise SpecError(f"--max-concurrent must be >= 1, got {args.max_concurrent}.")
        resolved = resolve(args.profile, backend=args.backend, nodes=args.nodes,
                           ntasks=args.ntasks, say=lambda note: say(f"note: {note}"))
        alloc, spec = resolved.allocation_spec(), resolved.mpi_spec()
        run_pool.check(args.pool, args.backend, spec)
        home = prepare_environment()
        if args.backend == "slurm":
            poll_pace.poll_settings()  # the job board's knobs: a malformed one stops us here
            poll_pace.burst_settings()
            slurm_query.check_available(alloc.clusters)
            kwargs = slurm.run_cluster_kwargs(alloc, f"{alloc.job_name_prefix}-check",
                                              home / "logs")
            slurm_query.test_submit(slurm.render_job_script(kwargs))
        program, _ = mpi.resolve_program(spec, args.program)
    except Exception as exc:  # bad input, a missing piece, the compiler failed: no traceback wall
        say(f"error: {exc}")
        return EXIT_USAGE

    quiet_prefect_console(args.verbose)
    # The server first, Prefect after: Prefect 3 imported without PREFECT_API_URL starts a
    # temporary server of its own, and the flow runs went there instead.
    entered = False
    try:
        with server_mod.prefect_server(args.max_concurrent, say=say, on_start=interrupt.own_server):
            entered = True
            if interrupt.interrupted.is_set():
                say("interrupted before any sub-flow started")
                return EXIT_INTERRUPTED
            return _run(args, alloc, spec, program, say)
    except (database.DatabaseError, ServerError) as exc:
        if entered:
            raise
        say(f"error: {exc}")
        return EXIT_INTERRUPTED if interrupt.interrupted.is_set() else EXIT_USAGE
    finally:
        interrupt.own_server(None)


def _run(args, alloc, spec, program, say) -> int:
    from functools import partial

    from prefect import flow

    from .composition import run_subflows
    from .flows import mpi_subflow

    interrupt.install()  # again: importing dask_jobqueue installed its own
    names = [f"mpi-{i}" for i in range(args.subflows)]
    started = time.monotonic()
    from .runners import running_job_ids

    job_ids = running_job_ids if args.backend == "slurm" else None
    progress = Progress(len(names), sys.stderr, job_ids=job_ids)
    interrupt.say_to[0] = progress.say
    interrupt.log_to_file()

    def on_done(outcome) -> None:
        name = names[outcome.index]
        if outcome.ok:
            v = outcome.value
            where = f"job {v.job_id} on {','.join(v.nodes)}" if v.job_id else ",".join(v.nodes)
            progress.ended(outcome.index, f"{name} completed: {len(v.ranks)} ranks, {where}", True)
        else:
            text = str(outcome.error)
            first = text.splitlines()[0] if text else type(outcome.error).__name__
            progress.ended(outcome.index, f"{name} FAILED: {first}", False)

    def tracked(i: int, call):
        def run():
            if interrupt.interrupted.is_set():  # a signal during start-up is not forgotten
                raise RuntimeError("not started: the run was interrupted")
            progress.started(i, names[i])
            return call()
        return run

    @flow(name="askap-pipeline", validate_parameters=False)
    def pipeline(n: int, max_concurrent: int) -> list:  # of composition.Outcome
        with run_pool.pool(args.pool, args.profile, alloc, progress) as pool:
            calls = [tracked(i, partial(mpi_subflow, spec, alloc, backend=args.backend,
                                        profile=args.profile, program=program, name=names[i],
                                        pool=pool))
                     for i in range(n)]
            return run_subflows(calls, max_concurrent=max_concurrent, on_done=on_done)

    say(f"running {args.subflows} sub-flow(s), backend {args.backend}, at most "
        f"{args.max_concurrent} at once, {spec.ntasks} ranks on {spec.nodes} node(s) each ...")
    try:
        with progress:
            outcomes = interrupt.off_the_main_thread(pipeline, args.subflows, args.max_concurrent)
    except BaseException:
        if not interrupt.interrupted.is_set():
            raise
        interrupt.cancel_everything()
        say(f"interrupted: no SLURM job of this run is left (log: {interrupt.log_path()})")
        return EXIT_INTERRUPTED
    rows = []
    for o in outcomes:
        if o.ok:
            d = o.value.to_dict()
            d.update(name=names[o.index], state="completed")
        else:
            d = {"name": names[o.index], "state": "failed", "backend": args.backend,
                 "job_id": None, "nodes": [], "ranks": [], "seconds": 0.0,
                 "error": f"{type(o.error).__name__}: {o.error}"}
        rows.append(d)
    failed = sum(r["state"] == "failed" for r in rows)
    wall = time.monotonic() - started
    if args.json:
        print(json.dumps({"backend": args.backend, "subflows": rows, "failed": failed,
                          "seconds": round(wall, 3)}, indent=2))
    else:
        print(summary_table(rows))
        print(f"{len(rows) - failed} completed, {failed} failed in {wall:.1f} s")
    if interrupt.interrupted.is_set():
        interrupt.cancel_everything()
        say(f"interrupted: no SLURM job of this run is left (log: {interrupt.log_path()})")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    code = main()
    if code == EXIT_INTERRUPTED:  # jobs cancelled, server stopped: do not wait for stuck threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
