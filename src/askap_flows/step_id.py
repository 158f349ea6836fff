"""The SLURM step id of a pooled MPI step (``J.S``: job J, step S), seen from srun's output.

srun knows the step id only once slurmctld created the step, and says it nowhere on its own. The
pool writes an ``srun --prolog`` script (``<log dir>/<job name>.srun-prolog``): srun runs it, on
the host where srun runs, after the step was created and before its tasks start, with
``SLURM_JOB_ID`` and ``SLURM_STEP_ID`` set (SLURM 22.05 on the test bed: docs/development.md). It
prints one line on srun's stderr, which the step's task reads from the relayed output. The script
always exits 0 (a failing srun prolog aborts the step), and runs the site's own ``SrunProlog``
after it: ``--prolog`` replaces that one.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import clusters as clusters_
from . import shell

LINE = "askap_flows: SLURM step "
_STEP = re.compile(r"^" + re.escape(LINE) + r"(\d+\.\d+)$")


def prolog_text(site_prolog: str | None = None) -> str:
    """The prolog script (pure). ``site_prolog``: the site's SrunProlog, run after our line."""
    text = f'#!/bin/sh\necho "{LINE}$SLURM_JOB_ID.$SLURM_STEP_ID" >&2\n'
    if site_prolog:
        return text + f'exec {shlex.quote(site_prolog)} "$@"\n'
    return text + "exit 0\n"


def write_prolog(log_dir: Path, job_name: str, site_prolog: str | None = None) -> Path:
    """Write the pool's prolog script (executable) next to its job's logs; its path."""
    path = Path(log_dir) / f"{job_name}.srun-prolog"
    path.write_text(prolog_text(site_prolog))
    path.chmod(0o755)
    return path


def site_srun_prolog(cluster: str = clusters_.LOCAL) -> str | None:
    """The SrunProlog of slurm.conf (None when unset, or when SLURM does not say)."""
    try:
        out = shell.output(["scontrol", *clusters_.args(cluster), "show", "config"], timeout=30)
    except (OSError, shell.CommandError):
        return None
    return parse_site_prolog(out)


def parse_site_prolog(config: str) -> str | None:
    """SrunProlog from ``scontrol show config`` output (pure)."""
    for line in config.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "SrunProlog":
            value = value.strip()
            return None if value in ("", "(null)") else value
    return None


def parse_step_line(line: str) -> str | None:
    """``"J.S"`` when ``line`` is the prolog's line, else None (pure)."""
    m = _STEP.match(line.strip())
    return m.group(1) if m else None


class StepIdCatcher:
    """Wraps a Dask topic handler of relayed lines: takes the prolog's line out of the stream,
    keeps its step id and logs it as one info line; every other line goes on to ``relay``."""

    def __init__(self) -> None:
        self.step_id: str | None = None
        self.seen = threading.Event()  # set once the step id is known

    def wrap(self, relay: Callable[[Any], None], logger, counted: Callable[[], None]
             ) -> Callable[[Any], None]:
        def handler(event) -> None:
            step = parse_step_line(str(event[1].get("line", "")))
            if step is None:
                relay(event)
                return
            self.step_id = step
            self.seen.set()
            logger.info("SLURM job step %s", step)
            counted()

        return handler


def remove(path: Path | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            logging.getLogger("askap_flows").debug("could not remove %s", path)
