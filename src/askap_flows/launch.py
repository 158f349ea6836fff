"""The step that runs on a sub-flow's Dask worker: launch the MPI program, send its lines back.

This is the only askap_flows code a SLURM job's Dask worker runs. It imports neither Prefect nor
dask-jobqueue: on the worker each would cost the job seconds of start-up while it already holds
its nodes (benchmarks/README.md). The program's output goes back line by line as Dask events on
``topic``; the sub-flow's Prefect task subscribes to it and writes each line to its Prefect log
while the program runs, and a final "end" event once the step is over, whichever way.

The flow side may give up on the step (Prefect's ``timeout_seconds``, an interrupt): it sets the
Dask event ``stop_event(topic)``, which the step polls through the worker's client; srun's process
group is then killed (its step with it) and the step is not launched again.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

from . import board, mpi, poll_pace, shell
from .slurm_query import SLURM_INSTALL_HINT
from .spec import MPISpec

BEFORE_LAUNCH = ("srun: error: Unable to confirm allocation", "srun: error: Unable to create step")


def mpi_step(spec: MPISpec, program: str, check_ranks: bool, topic: str | None) -> dict:
    """Run the MPI step here (on the Dask worker) and return what the sub-flow records.

    Raises FileNotFoundError (no launcher on this node), shell.CommandError (the step failed or
    timed out; with the first failing rank as hint) or mpi.MPIError (the ranks' world is wrong).
    """
    send = _sender(topic)
    stop, close = _stop_check(topic)
    try:
        return _step(spec, program, check_ranks, send, stop)
    finally:
        send("end", "")
        close()


def stop_event(topic: str) -> str:
    """The name of the Dask event that tells the step on ``topic`` to stop (distributed.Event)."""
    return f"{topic}-stop"


def _stop_check(topic: str | None):
    """(a function that says whether the flow asked the step to stop, a close for it); no topic
    or no scheduler to ask: (None, a no-op). The step's own client is not the default one: the
    worker's (``get_client()``) became the process's default client, and with in-process workers
    (the local backend) a later sub-flow's task runner connected to that stale cluster."""
    if topic is None:
        return None, lambda: None
    from distributed import Client, Event, get_worker

    try:
        client = Client(get_worker().scheduler.address, set_as_default=False, timeout=30)
    except Exception:  # noqa: BLE001 - the step still runs; only its stop cannot be asked for
        return None, lambda: None
    event = Event(stop_event(topic), client=client)

    def asked() -> bool:
        try:
            return event.is_set()
        except Exception:  # noqa: BLE001 - no scheduler to ask: the job is ending anyway
            return False

    def close() -> None:
        try:
            client.close(timeout=5)
        except Exception:  # noqa: BLE001
            pass

    return asked, close


def _step(spec: MPISpec, program: str, check_ranks: bool, send, stop) -> dict:
    argv = mpi.launch_command(spec, program)
    if argv[0] == "mpiexec":
        argv[0] = mpi.find_mpiexec() or _missing("mpiexec", mpi.MPI_INSTALL_HINT)
    elif shutil.which(argv[0]) is None:
        _missing(argv[0], SLURM_INSTALL_HINT)
    send("info", "launching: " + " ".join(argv))
    srun_started = time.time()  # wall clock: compared with the sub-flow's, on another host
    srun_errors: list[str] = []  # kept whole: the stderr tail may have lost the first one
    lines = 1

    def on_line(stream: str, line: str) -> None:
        nonlocal lines
        send("info" if stream == "stdout" else "warning", line)
        lines += 1
        if line.startswith("srun: error: ") or mpi.OMPI_WITHOUT_PMIX in line:
            srun_errors.append(line)

    pauses = board.retry_pauses(poll_pace.poll_settings()[2])  # the board's grace period
    while True:
        srun_errors.clear()
        try:
            res = shell.run(argv, on_line=on_line, timeout=spec.timeout,
                            env=mpi.program_env(spec), stop=stop)
            break
        except shell.CommandError as exc:
            if exc.reason == shell.STOPPED or (stop is not None and stop()):
                send("warning", "the step was stopped by its Prefect task (a timeout or an "
                                "interrupt): srun and its ranks were killed")
                raise  # never launched again
            pause = next(pauses, None) if controller_refused_the_step(srun_errors) else None
            if pause is not None:
                send("warning", f"srun could not reach the SLURM controller to start the step "
                                f"(no rank started); trying again in {pause:g} s")
                time.sleep(pause)
                if stop is not None and stop():
                    raise
                continue
            hint = mpi.first_failure(srun_errors, spec.mpi_plugin)
            if not hint or exc.hint or exc.returncode is None or "timed out" in exc.reason:
                raise  # a timeout killed the ranks itself: their deaths are no cause
            raise shell.CommandError(exc.argv, exc.returncode, exc.stdout_tail, exc.stderr_tail,
                                     exc.reason, hint) from None
    ranks = mpi.parse_ranks(res.stdout)
    if check_ranks or ranks:
        try:
            mpi.check_world(ranks, spec)
        except mpi.MPIError as exc:
            shown = "\n".join(res.stdout.splitlines()[-2 * spec.ntasks:]) or "(nothing)"
            raise mpi.MPIError(
                f"{exc} The program printed on stdout (last lines):\n{shown}") from None
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "nodelist": os.environ.get("SLURM_JOB_NODELIST"),
        "host": socket.gethostname(),
        "exit_code": res.returncode,
        "seconds": res.seconds,
        "command": argv,
        "ranks": ranks,
        "srun_started": srun_started,
        "lines": lines,  # events sent on the topic: the sub-flow waits for all of them
    }


def controller_refused_the_step(srun_errors: list[str]) -> bool:
    """srun could not reach slurmctld to confirm the allocation or create the step: no rank was
    started, so the step may be launched again once the controller answers (a restart, an
    outage: board.py's grace period)."""
    return any(e.startswith(BEFORE_LAUNCH) and board.unreachable(e) for e in srun_errors)


def _sender(topic: str | None):
    """A function (level, line) that sends one line to the sub-flow as a Dask event."""
    if topic is None:
        return lambda level, line: None
    from distributed import get_worker  # thread-safe: log_event hands over to the worker's loop

    worker = get_worker()
    return lambda level, line: worker.log_event(topic, {"level": level, "line": line})


def _missing(what: str, hint: str):
    raise FileNotFoundError(f"`{what}` is not on PATH of the Dask worker. {hint}")
