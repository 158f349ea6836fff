"""Process groups stopped in a given order when the process that started them dies.

A multi-worker Prefect server is three services that depend on each other: the API processes and
the services use Redis. Stopped all at once (each with SIGTERM from the kernel when the
``askap-flows server`` that started them was SIGKILLed, e.g. by SLURM after KillWait), Redis went
first and an API worker never finished its shutdown: its background-task loop (Docket) retried
"Redis is unavailable" every second, for good, as an orphan. The reaper is a small process
(the standard library only) that reads process-group ids on its stdin; when its stdin closes --
its parent exited, however it died -- it stops the groups, the last one given first, each with
SIGTERM and, after a grace time, SIGKILL. It ignores SIGTERM and SIGINT itself (a batch job's
scancel signals every process of the job): its parent's own stop goes first, and the closed
pipe then finds nothing left.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import shell

REAPER_CODE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups = [int(line) for line in sys.stdin if line.strip()]
grace = float(sys.argv[1])
def gone(group):
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False
for group in reversed(groups):
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if gone(group):
            break
        print(f"reaper: {sig.name} to process group {group}", flush=True)
        os.killpg(group, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not gone(group):
            time.sleep(0.1)
"""


class Reaper:
    """``watch(proc)`` each service in the order they depend on each other (Redis first);
    ``close()`` after stopping them yourself."""

    def __init__(self, log_path: Path, grace: float = 10.0) -> None:
        self.proc = shell.start_background([sys.executable, "-c", REAPER_CODE, f"{grace:g}"],
                                           log_path, os.environ, stdin_pipe=True)

    def watch(self, proc) -> None:
        """Stop ``proc``'s process group (its pid: shell.start_background) when the parent dies."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{proc.pid}\n".encode())
        self.proc.stdin.flush()

    def close(self, timeout: float = 30.0) -> None:
        """Let it go (its groups are stopped already, or it stops what is left of them)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except Exception:  # noqa: BLE001 - it is stopped below
            shell.kill_group(self.proc, grace=1)
