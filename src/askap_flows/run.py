"""``python -m askap_flows.run``: the main job.

Runs several MPI sub-flows concurrently inside one parent flow, each on its own Dask cluster
(local: LocalCluster + mpiexec; slurm: a multi-node SLURM job + srun), shows progress, prints a
summary (or one JSON object with --json), and exits non-zero when any sub-flow failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import database, mpi, slurm
from .progress import Progress
from .server import PrefectServer, ServerError
from .spec import BACKENDS, SpecError, check_fits, resolve_specs

EXIT_FAILED = 1  # a sub-flow failed
EXIT_USAGE = 2  # bad input or a missing piece: nothing was run
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM


_interrupted = threading.Event()
_own_server: PrefectServer | None = None  # the server this run started, stopped on every exit
GIVE_UP_AFTER = 30.0  # seconds after a signal before the main job stops waiting for Prefect


def _exit_now() -> None:
    """End the process at once, but never leave the run's own Prefect server behind."""
    if _own_server is not None:
        _own_server.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def install_signal_handlers(say) -> None:
    """Ctrl-C / SIGTERM: cancel every SLURM job of the run, kill its MPI steps and let the
    sub-flows fail; the pipeline then ends with a summary and exit code 130. Nothing is raised
    into Prefect's machinery (Prefect 2 was seen to hang in its teardown after an interrupt).
    A second signal, or a pipeline still running GIVE_UP_AFTER s later, ends the process at once
    (after stopping the run's own Prefect server)."""

    def after_signal() -> None:
        from .runners import cancel_everything

        cancelled = cancel_everything()
        say(f"cancelled {len(cancelled)} SLURM job(s) and killed the running MPI steps")
        time.sleep(GIVE_UP_AFTER)
        say(f"the pipeline did not stop within {GIVE_UP_AFTER:g} s of the signal: exiting now")
        _exit_now()

    def interrupt(signum, frame) -> None:
        if _interrupted.is_set():
            _exit_now()
        _interrupted.set()
        say(f"received {signal.Signals(signum).name}: stopping this run (again to stop at once)")
        threading.Thread(target=after_signal, daemon=True, name="askap-interrupt").start()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m askap_flows.run",
        description=(
            "Run N MPI sub-flows concurrently as one Prefect pipeline. Each sub-flow builds its "
            "own Dask cluster when it starts (local: a threaded LocalCluster; slurm: a SLURMCluster "
            "whose one job spans --nodes nodes), runs the MPI check program across it (mpiexec or "
            "srun) and closes the cluster. With no arguments: the local backend, 4 sub-flows, "
            "a Prefect server on sqlite under ./.askap_flows, started for this run."
        ),
        epilog=(
            "examples:\n"
            "  python -m askap_flows.run\n"
            "  python -m askap_flows.run --backend slurm --profile testbed --subflows 6 --json\n"
            "environment: ASKAP_FLOWS_HOME (working dir, default ./.askap_flows), "
            "ASKAP_FLOWS_PROFILE, PREFECT_API_URL (use this Prefect server instead of starting one)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="where the clusters run: 'local' (no SLURM needed) or 'slurm' (default: local)")
    p.add_argument("--profile", metavar="NAME|PATH",
                   help="packaged profile (local, testbed, pawsey_example) or a YAML file; default: "
                        "'local' for the local backend, $ASKAP_FLOWS_PROFILE for slurm")
    p.add_argument("--subflows", type=int, default=4, metavar="N",
                   help="how many MPI sub-flows to run (default: 4)")
    p.add_argument("--max-concurrent", type=int, default=2, metavar="K",
                   help="at most K sub-flows (and clusters) at once (default: 2)")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="nodes per sub-flow: the SLURM job and the MPI step (default: the profile's)")
    p.add_argument("--ntasks", type=int, metavar="N",
                   help="MPI ranks per sub-flow (default: the profile's)")
    p.add_argument("--program", metavar="PATH",
                   help="MPI executable to run (default: the packaged check program, built if missing)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (a 'subflows' list) instead of the summary table")
    p.add_argument("--verbose", action="store_true", help="show Prefect's own log lines too")
    return p


def cli_specs(args):
    """The profile's specs with --nodes/--ntasks applied; the allocation follows the MPI layout."""
    alloc, spec = resolve_specs(None, None, args.profile, args.backend)
    if args.nodes is None and args.ntasks is None:
        return alloc, spec
    nodes = args.nodes if args.nodes is not None else spec.nodes
    ntasks = args.ntasks if args.ntasks is not None else max(spec.ntasks, nodes)
    spec = dataclasses.replace(spec, nodes=nodes, ntasks=ntasks, ntasks_per_node=None)
    per_node = -(-ntasks // nodes)
    alloc = dataclasses.replace(alloc, nodes=max(alloc.nodes, nodes) if args.nodes is None else nodes,
                                ntasks_per_node=max(alloc.ntasks_per_node, per_node))
    check_fits(spec, alloc)
    return alloc, spec


def prepare_environment() -> Path:
    home = mpi.askap_home()
    for name, value in ((mpi.HOME_ENV, str(home)), ("PREFECT_HOME", str(home / "prefect")),
                        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                        # ride out a database restart: the server answers 500 while it is away
                        # (the client already retries 429/502/503 and lost connections)
                        ("PREFECT_CLIENT_RETRY_EXTRA_CODES", "500")):
        if not os.environ.get(name):  # unset or empty
            os.environ[name] = value
    return home


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
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.subflows < 1:
            raise SpecError(f"--subflows must be >= 1, got {args.subflows}.")
        if args.max_concurrent < 1:
            raise SpecError(f"--max-concurrent must be >= 1, got {args.max_concurrent}.")
        alloc, spec = cli_specs(args)
        home = prepare_environment()
        if args.backend == "slurm":
            slurm.check_available()
            kwargs = slurm.run_cluster_kwargs(alloc, f"{alloc.job_name_prefix}-check", home / "logs")
            slurm.test_submit(slurm.render_job_script(kwargs))
        program, _ = mpi.resolve_program(spec, args.program)
        db = database.preflight(args.max_concurrent, api_url=os.environ.get("PREFECT_API_URL"))
    except (SpecError, FileNotFoundError, PermissionError, mpi.MPIError, slurm.SlurmError) as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except Exception as exc:  # e.g. the compiler failed: say it, no traceback wall
        say(f"error: {exc}")
        return EXIT_USAGE

    global _own_server
    quiet_prefect_console(args.verbose)
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        say(f"starting a Prefect server for this run ({db.describe()}) ...")
        try:
            server = _own_server = PrefectServer(Path(os.environ["PREFECT_HOME"]), db.url,
                                                 settings=db.server_env)
            server.start()
        except ServerError as exc:
            say(f"error: {exc}")
            return EXIT_USAGE
        os.environ["PREFECT_API_URL"] = server.api_url
        say(f"Prefect UI for this run: {server.ui_url}  (stops when the run ends; set "
            "PREFECT_API_URL to use your own server)")
    try:
        return _run(args, alloc, spec, program, say)
    finally:
        _flush_prefect_logs()
        if server is not None:
            server.stop()
            _own_server = None


def _flush_prefect_logs() -> None:
    """Send the queued log lines to the API while it is still up (else they retry for a minute)."""
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - logging must not turn a finished run into a failure
        pass


def _run(args, alloc, spec, program, say) -> int:
    from functools import partial

    from prefect import flow

    from .flows import mpi_subflow, run_subflows

    names = [f"mpi-{i}" for i in range(args.subflows)]
    started = time.monotonic()
    from .runners import running_job_ids

    job_ids = running_job_ids if args.backend == "slurm" else None
    progress = Progress(len(names), sys.stderr, job_ids=job_ids)
    install_signal_handlers(progress.say)

    def on_done(outcome) -> None:
        name = names[outcome.index]
        if outcome.ok:
            v = outcome.value
            where = f"job {v.job_id} on {','.join(v.nodes)}" if v.job_id else ",".join(v.nodes)
            progress.ended(outcome.index, f"{name} completed: {len(v.ranks)} ranks, {where}", True)
        else:
            first = str(outcome.error).splitlines()[0] if str(outcome.error) else type(outcome.error).__name__
            progress.ended(outcome.index, f"{name} FAILED: {first}", False)

    def tracked(i: int, call):
        def run():
            progress.started(i, names[i])
            return call()
        return run

    @flow(name="askap-pipeline", validate_parameters=False)
    def pipeline(n: int, max_concurrent: int):
        calls = [tracked(i, partial(mpi_subflow, spec, alloc, backend=args.backend,
                                    profile=args.profile, program=program, name=names[i]))
                 for i in range(n)]
        return run_subflows(calls, max_concurrent=max_concurrent, on_done=on_done)

    say(f"running {args.subflows} sub-flow(s), backend {args.backend}, at most "
        f"{args.max_concurrent} at once, {spec.ntasks} ranks on {spec.nodes} node(s) each ...")
    try:
        with progress:
            outcomes = pipeline(args.subflows, args.max_concurrent)
    except BaseException as exc:  # Prefect 3 turns SIGTERM into its own TerminationSignal
        if not (_interrupted.is_set() or isinstance(exc, (KeyboardInterrupt, SystemExit))
                or type(exc).__name__ == "TerminationSignal"):
            raise
        from .runners import cancel_everything

        cancel_everything()
        say("interrupted: no SLURM job of this run is left")
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
    if _interrupted.is_set():
        say("interrupted: no SLURM job of this run is left")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    code = main()
    if code == EXIT_INTERRUPTED:  # jobs cancelled, server stopped: do not wait for stuck threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
