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
from . import server as server_mod
from .progress import Progress
from .server import PrefectServer, ServerError
from .spec import BACKENDS, SpecError, check_fits, resolve_specs

EXIT_FAILED = 1  # a sub-flow failed
EXIT_USAGE = 2  # bad input or a missing piece: nothing was run
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM


_interrupted = threading.Event()
_cancels_done = threading.Event()  # the first signal's cancels have been made
_cancel_thread: list[threading.Thread] = []  # the first signal's, once started
_own_server: PrefectServer | None = None  # the server this run started, stopped on every exit
_say = [lambda msg: print(msg, file=sys.stderr, flush=True)]  # where signal messages go
GIVE_UP_AFTER = 30.0  # seconds after a signal before the main job stops waiting for Prefect


def _cancel_everything() -> list[str]:
    """Cancel the run's SLURM jobs and kill its MPI steps (nothing to do before any sub-flow
    module was imported: importing Prefect here, in a signal's thread, is avoided)."""
    runners = sys.modules.get("askap_flows.runners")
    return runners.cancel_everything() if runners is not None else []


def _exit_now() -> None:
    """End the process at once, but leave no SLURM job (one more cancel round: a job submitted
    since the first) and never the run's own Prefect server behind."""
    try:
        _cancel_everything()
    finally:
        if _own_server is not None:
            _own_server.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def install_signal_handlers() -> None:
    """Ctrl-C / SIGTERM: cancel every SLURM job of the run, kill its MPI steps and let the
    sub-flows fail; the pipeline then ends with a summary and exit code 130. Nothing is raised
    into Prefect's machinery (Prefect 2 was seen to hang in its teardown after an interrupt).
    A second signal (once the first one's cancels are made), or a pipeline still running
    GIVE_UP_AFTER s later, ends the process at once (after stopping the run's own Prefect server).
    Installed before anything starts: a signal during start-up is honoured, not forgotten."""

    def after_signal() -> None:
        try:
            cancelled = _cancel_everything()
        finally:
            _cancels_done.set()
        _say[0](f"cancelled {len(cancelled)} SLURM job(s) and killed the running MPI steps; "
                f"details in {_log_path()}")
        deadline = time.monotonic() + GIVE_UP_AFTER
        while time.monotonic() < deadline:  # a step or job that was starting at the signal
            time.sleep(1.0)
            _cancel_everything()
        _say[0](f"the pipeline did not stop within {GIVE_UP_AFTER:g} s of the signal: exiting now")
        _exit_now()

    def interrupt(signum, frame) -> None:
        if _interrupted.is_set():
            if _cancel_thread:  # never exit in the middle of the first signal's cancels
                _cancels_done.wait(GIVE_UP_AFTER)
            _exit_now()  # cancels (again) itself
        _interrupted.set()
        runners = sys.modules.get("askap_flows.runners")
        if runners is not None:
            runners.shutting_down.set()  # no new sub-flow starts from now on
        _quiet_console_for_good()
        _say[0](f"received {signal.Signals(signum).name}: stopping this run, no new sub-flow "
                "starts (again to stop at once)")
        thread = threading.Thread(target=after_signal, daemon=True, name="askap-interrupt")
        _cancel_thread.append(thread)
        thread.start()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


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
    alloc = dataclasses.replace(alloc,
                                nodes=max(alloc.nodes, nodes) if args.nodes is None else nodes,
                                ntasks_per_node=max(alloc.ntasks_per_node, per_node))
    check_fits(spec, alloc)
    return alloc, spec


def prepare_environment() -> Path:
    return server_mod.prepare_environment()


_log_file: list[Path] = []


def _log_path() -> Path:
    """This run's log file: Prefect's and Dask's lines, tracebacks included."""
    if not _log_file:
        _log_file.append(mpi.askap_home() / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
                                                    f"-{os.getpid()}.log")
    return _log_file[0]


def log_to_file() -> Path:
    """Every log line of the run (tracebacks included) also goes to the run's log file."""
    import logging

    path = _log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("", "prefect", "distributed", "dask_jobqueue", "askap_flows"):
        logger = logging.getLogger(name)
        if not name or not logger.propagate:  # else its lines reach the root's handler anyway
            logger.addHandler(handler)
    return path


def _quiet_console_for_good() -> None:
    """After an interrupt, the sub-flows' failures are expected: their tracebacks go to the log
    file only, the terminal keeps the run's own few lines."""
    import logging

    try:  # in a signal handler: another thread may be adding a logger right now
        known = list(logging.root.manager.loggerDict.values())
    except RuntimeError:
        known = []
    loggers = [logging.getLogger()] + [lg for lg in known if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.CRITICAL + 1)


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
    install_signal_handlers()
    try:
        if args.subflows < 1:
            raise SpecError(f"--subflows must be >= 1, got {args.subflows}.")
        if args.max_concurrent < 1:
            raise SpecError(f"--max-concurrent must be >= 1, got {args.max_concurrent}.")
        alloc, spec = cli_specs(args)
        home = prepare_environment()
        if args.backend == "slurm":
            slurm.check_available(alloc.clusters)
            kwargs = slurm.run_cluster_kwargs(alloc, f"{alloc.job_name_prefix}-check",
                                              home / "logs")
            slurm.test_submit(slurm.render_job_script(kwargs))
        program, _ = mpi.resolve_program(spec, args.program)
    except Exception as exc:  # bad input, a missing piece, the compiler failed: no traceback wall
        say(f"error: {exc}")
        return EXIT_USAGE

    def remember(server: PrefectServer | None) -> None:
        global _own_server
        _own_server = server

    quiet_prefect_console(args.verbose)
    # The server first, Prefect after: Prefect 3 imported without PREFECT_API_URL starts a
    # temporary server of its own, and the flow runs went there instead.
    entered = False
    try:
        with server_mod.prefect_server(args.max_concurrent, say=say, on_start=remember):
            entered = True
            if _interrupted.is_set():
                say("interrupted before any sub-flow started")
                return EXIT_INTERRUPTED
            return _run(args, alloc, spec, program, say)
    except (database.DatabaseError, ServerError) as exc:
        if entered:
            raise
        say(f"error: {exc}")
        return EXIT_INTERRUPTED if _interrupted.is_set() else EXIT_USAGE
    finally:
        remember(None)


def _off_the_main_thread(fn, *args):
    """Run the parent flow in a thread of its own, so that the main thread keeps the signals:
    Prefect 3's flow engine replaces the SIGTERM handler of the main thread with one that crashes
    the flow, which tore the sub-flows down (tracebacks on the terminal) before this run could
    quiet the terminal and cancel its jobs."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="askap-pipeline")
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: the main thread runs the signal handlers in between
    if "error" in box:
        raise box["error"]
    return box["value"]


def _run(args, alloc, spec, program, say) -> int:
    from functools import partial

    from prefect import flow

    from .flows import mpi_subflow, run_subflows

    install_signal_handlers()  # again: importing dask_jobqueue installed its own
    names = [f"mpi-{i}" for i in range(args.subflows)]
    started = time.monotonic()
    from .runners import running_job_ids

    job_ids = running_job_ids if args.backend == "slurm" else None
    progress = Progress(len(names), sys.stderr, job_ids=job_ids)
    _say[0] = progress.say
    log_to_file()

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
            if _interrupted.is_set():  # a signal during start-up is not forgotten
                raise RuntimeError("not started: the run was interrupted")
            progress.started(i, names[i])
            return call()
        return run

    @flow(name="askap-pipeline", validate_parameters=False)
    def pipeline(n: int, max_concurrent: int) -> list:  # of flows.Outcome
        calls = [tracked(i, partial(mpi_subflow, spec, alloc, backend=args.backend,
                                    profile=args.profile, program=program, name=names[i]))
                 for i in range(n)]
        return run_subflows(calls, max_concurrent=max_concurrent, on_done=on_done)

    say(f"running {args.subflows} sub-flow(s), backend {args.backend}, at most "
        f"{args.max_concurrent} at once, {spec.ntasks} ranks on {spec.nodes} node(s) each ...")
    try:
        with progress:
            outcomes = _off_the_main_thread(pipeline, args.subflows, args.max_concurrent)
    except BaseException:
        if not _interrupted.is_set():
            raise
        _cancel_everything()
        say(f"interrupted: no SLURM job of this run is left (log: {_log_path()})")
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
        _cancel_everything()
        say(f"interrupted: no SLURM job of this run is left (log: {_log_path()})")
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    code = main()
    if code == EXIT_INTERRUPTED:  # jobs cancelled, server stopped: do not wait for stuck threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
