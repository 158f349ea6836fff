"""A run's Ctrl-C and SIGTERM: the handlers, the give-up, the quiet terminal, the run's log file.

The first signal stops new sub-flows, cancels the run's SLURM jobs and kills its MPI steps from a
thread of its own; the pipeline then ends with a summary and exit code 130. The parent flow runs
off the main thread (``off_the_main_thread``), so these handlers, not Prefect's, get the signals.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import mpi
from .server import PrefectServer

EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM

interrupted = threading.Event()
_cancels_done = threading.Event()  # the first signal's cancels have been made
_cancel_thread: list[threading.Thread] = []  # the first signal's, once started
_server: PrefectServer | None = None  # the run's own server (own_server), stopped on every exit
say_to = [lambda msg: print(msg, file=sys.stderr, flush=True)]  # where signal messages go
GIVE_UP_AFTER = 30.0  # seconds after a signal before the main job stops waiting for Prefect
CANCEL_AGAIN_EVERY = 1.0  # seconds between the cancel rounds until then


def cancel_everything() -> list[str]:
    """Cancel the run's SLURM jobs and kill its MPI steps (nothing to do before any sub-flow
    module was imported: importing Prefect here, in a signal's thread, is avoided)."""
    runners = sys.modules.get("askap_flows.runners")
    return runners.cancel_everything() if runners is not None else []


def _exit_now() -> None:
    """End the process at once, but leave no SLURM job (one more cancel round: a job submitted
    since the first) and never the run's own Prefect server behind."""
    try:
        cancel_everything()
    finally:
        if _server is not None:
            _server.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def _cancel_until_the_give_up() -> None:
    """The first signal's thread: cancel everything at once, then again every second until the
    give-up, which ends the process. The first round misses what was starting at the signal: a
    command launched a moment later (``shell.terminate_all`` kills the running ones only: a local
    MPI step started then would run on until the give-up, which ends the run without its summary),
    or a job whose sbatch was in flight (the board cannot name it yet, and ``scancel --name`` may
    reach slurmctld before the job does). The later rounds stop those within a second."""
    try:
        cancelled = cancel_everything()
    finally:
        _cancels_done.set()
    say_to[0](f"cancelled {len(cancelled)} SLURM job(s) and killed the running MPI steps; "
              f"details in {log_path()}")
    deadline = time.monotonic() + GIVE_UP_AFTER
    while time.monotonic() < deadline:
        time.sleep(CANCEL_AGAIN_EVERY)
        cancel_everything()
    say_to[0](f"the pipeline did not stop within {GIVE_UP_AFTER:g} s of the signal: exiting now")
    _exit_now()


def install() -> None:
    """Ctrl-C / SIGTERM: cancel every SLURM job of the run, kill its MPI steps and let the
    sub-flows fail; the pipeline then ends with a summary and exit code 130. Nothing is raised
    into Prefect's machinery (Prefect 2 was seen to hang in its teardown after an interrupt).
    A second signal (once the first one's cancels are made), or a pipeline still running
    GIVE_UP_AFTER s later, ends the process at once (after stopping the run's own Prefect server).
    Installed before anything starts: a signal during start-up is honoured, not forgotten."""

    def interrupt(signum, frame) -> None:
        if interrupted.is_set():
            if _cancel_thread:  # never exit in the middle of the first signal's cancels
                _cancels_done.wait(GIVE_UP_AFTER)
            _exit_now()  # cancels (again) itself
        interrupted.set()
        runners = sys.modules.get("askap_flows.runners")
        if runners is not None:
            runners.shutting_down.set()  # no new sub-flow starts from now on
        _quiet_console_for_good()
        say_to[0](f"received {signal.Signals(signum).name}: stopping this run, no new sub-flow "
                "starts (again to stop at once)")
        thread = threading.Thread(target=_cancel_until_the_give_up, daemon=True,
                                  name="askap-interrupt")
        _cancel_thread.append(thread)
        thread.start()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


_log_file: list[Path] = []


def log_path() -> Path:
    """This run's log file: Prefect's and Dask's lines, tracebacks included."""
    if not _log_file:
        _log_file.append(mpi.askap_home() / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
                                                    f"-{os.getpid()}.log")
    return _log_file[0]


def log_to_file() -> Path:
    """Every log line of the run (tracebacks included) also goes to the run's log file."""
    import logging

    path = log_path()
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


def off_the_main_thread(fn, *args):
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


def own_server(server: PrefectServer | None) -> None:
    """The run's own Prefect server (stopped when a second signal ends the process at once)."""
    global _server
    _server = server
