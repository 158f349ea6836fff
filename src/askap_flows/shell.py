"""The one place where askap_flows runs a subprocess.

Commands are argument lists (never a shell string). Output is streamed line by line to a callback
as it is produced, a timeout kills the whole process group, and a failure raises CommandError
carrying the evidence: the command, the exit code and the last lines of stdout and stderr.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import AskapFlowsError

TAIL_LINES = 20
DRAIN_SECONDS = 60.0  # after the process ended, how long its output may still arrive
STOP_POLL = 1.0  # seconds between two calls of run()'s ``stop``
STOPPED = "was stopped by its caller and killed"  # CommandError.reason of a stopped command
_running: set[subprocess.Popen] = set()
_running_lock = threading.Lock()
_stopped: set[subprocess.Popen] = set()  # killed by terminate_all: never reported as a success


class CommandError(AskapFlowsError, RuntimeError):
    """A command failed, timed out or could not start."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout_tail: Sequence[str] = (),
        stderr_tail: Sequence[str] = (),
        reason: str = "",
        hint: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout_tail = list(stdout_tail)
        self.stderr_tail = list(stderr_tail)
        self.reason = reason or f"exited with code {returncode}"
        self.hint = hint
        super().__init__(self._message())

    def __reduce__(self):  # rebuilt whole when it crosses from a Dask worker to the flow
        return (type(self), (self.argv, self.returncode, self.stdout_tail, self.stderr_tail,
                             self.reason, self.hint))

    def _message(self) -> str:
        lines = [f"command {self.reason}: {shlex.join(self.argv)}"]
        if self.stderr_tail:
            lines.append("last lines of stderr:")
            lines += [f"  {line}" for line in self.stderr_tail]
        elif self.stdout_tail:
            lines.append("last lines of stdout:")
            lines += [f"  {line}" for line in self.stdout_tail]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(
    argv: Sequence[str],
    *,
    on_line: Callable[[str, str], None] | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    check: bool = True,
    kill_grace: float = 5.0,
    stop: Callable[[], bool] | None = None,
) -> Completed:
    """Run ``argv``; stream each output line to ``on_line(stream, line)``; return or raise.

    ``stream`` is "stdout" or "stderr". On timeout the process group gets SIGTERM, then SIGKILL
    after ``kill_grace`` seconds, and CommandError(reason="timed out ...") is raised. ``stop`` is
    asked every STOP_POLL s while the command runs; once it answers true the group is killed the
    same way and CommandError(reason=STOPPED) is raised (an error in ``stop`` counts as false).
    """
    argv = [str(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CommandError(argv, None, reason=f"could not start ({argv[0]!r} not found)") from None
    except PermissionError:
        raise CommandError(argv, None,
                           reason=f"could not start ({argv[0]!r} is not executable)") from None

    with _running_lock:
        _running.add(proc)
    out: list[str] = []
    err: list[str] = []

    def pump(pipe, sink: list[str], name: str) -> None:
        for line in pipe:
            line = line.rstrip("\n")
            sink.append(line)
            if on_line is not None:
                try:
                    on_line(name, line)
                except Exception:  # a broken callback must not hang the pipe
                    pass
        pipe.close()

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, out, "stdout"), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err, "stderr"), daemon=True),
    ]
    for t in readers:
        t.start()
    timed_out = stopped_by_caller = False
    try:
        timed_out, stopped_by_caller = _wait(proc, timeout, stop)
        if timed_out or stopped_by_caller:
            kill_group(proc, kill_grace)
    except BaseException:  # KeyboardInterrupt, SystemExit, a cancelled thread: leave nothing
        kill_group(proc, kill_grace)
        raise
    finally:
        with _running_lock:
            _running.discard(proc)
    # The ranks' last lines may still be in the pipes (or in an MPI launcher's forwarding proxy):
    # read to EOF. Only a grandchild that keeps the pipe open forever is given up on.
    drain_until = time.monotonic() + DRAIN_SECONDS
    for t in readers:
        t.join(timeout=max(0.1, drain_until - time.monotonic()))
    seconds = time.monotonic() - start
    stdout_tail = list(deque(out, TAIL_LINES))
    stderr_tail = list(deque(err, TAIL_LINES))
    if timed_out:
        raise CommandError(argv, proc.returncode, stdout_tail, stderr_tail,
                           reason=f"timed out after {timeout:g} s and was killed")
    if stopped_by_caller:
        raise CommandError(argv, proc.returncode, stdout_tail, stderr_tail, reason=STOPPED)
    with _running_lock:
        stopped = proc in _stopped
        _stopped.discard(proc)
    if stopped:  # MPICH's mpiexec exits 0 after forwarding the SIGTERM to its ranks
        raise CommandError(argv, proc.returncode, stdout_tail, stderr_tail,
                           reason="was killed because the run was interrupted")
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stdout_tail, stderr_tail)
    return Completed(argv, proc.returncode, "\n".join(out), "\n".join(err), seconds)


def _wait(proc: subprocess.Popen, timeout: float | None,
          stop: Callable[[], bool] | None) -> tuple[bool, bool]:
    """Wait for ``proc``: (timed out, stopped by ``stop``), both False once it has exited."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if stop is not None:
            wait = STOP_POLL if wait is None else min(wait, STOP_POLL)
        try:
            proc.wait(timeout=wait)
            return False, False
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                return True, False
            if stop is not None and _asked(stop):
                return False, True


def _asked(stop: Callable[[], bool]) -> bool:
    try:
        return bool(stop())
    except Exception:  # noqa: BLE001 - a caller that cannot be asked has not asked to stop
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it dies (Linux prctl
    PR_SET_PDEATHSIG), so even a SIGKILLed pipeline leaves no service behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the caller's kill_group is the only stop
        pass


def start_background(argv: Sequence[str], log_path: str | os.PathLike,
                     env: Mapping[str, str] | None = None, *, die_with_parent: bool = True,
                     stdin_pipe: bool = False) -> subprocess.Popen:
    """Start a long-running service (a Prefect server) in a session of its own, its output
    appended to ``log_path``. The caller stops it with ``kill_group(proc, grace)``; if the
    calling thread dies first (even by SIGKILL) the service gets SIGTERM. Call it from a thread
    that lives as long as the service should (the main thread). ``die_with_parent=False``: no
    such SIGTERM (a :mod:`.reaper` stops it instead); ``stdin_pipe``: its stdin is a pipe."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                env=None if env is None else dict(env), start_new_session=True,
                                preexec_fn=_die_with_parent if die_with_parent else None)


def _left_the_group(pid: int) -> list:
    """Descendants of ``pid`` in another process group: MPICH's hydra_pmi_proxy makes its own,
    so killing the launcher's group left it and its ranks running, reparented to init."""
    import psutil  # a dependency of distributed

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    strays = []
    for kid in kids:
        try:
            if os.getpgid(kid.pid) != pid:
                strays.append(kid)
        except ProcessLookupError:
            pass
    return strays


def _signal_all(proc: subprocess.Popen, strays: list, sig: int) -> bool:
    """Send ``sig`` to the group of ``proc`` and to ``strays``; True while any of them lives."""
    alive = False
    try:
        os.killpg(proc.pid, sig)
        alive = True
    except ProcessLookupError:
        pass
    for p in strays:
        try:
            if p.is_running() and p.status() != "zombie":
                p.send_signal(sig)
                alive = True
        except Exception:  # noqa: BLE001 - psutil.Error: it is gone
            pass
    return alive


def kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group of ``proc`` (and descendants that left it), then SIGKILL them
    after ``grace`` seconds."""
    strays = _left_the_group(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _signal_all(proc, strays, sig):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if not _signal_all(proc, strays, 0):  # is anything of them left?
                return
            time.sleep(0.05)


def terminate_all(grace: float = 3.0) -> int:
    """Kill the process groups of every command still running through ``run`` (on shutdown)."""
    with _running_lock:
        procs = list(_running)
        _stopped.update(procs)
    threads = [threading.Thread(target=kill_group, args=(p, grace)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(procs)


def output(argv: Sequence[str], timeout: float = 60, env: Mapping[str, str] | None = None) -> str:
    """Run a short query command and return its stdout (raises CommandError on failure)."""
    return run(argv, timeout=timeout, env=env).stdout
