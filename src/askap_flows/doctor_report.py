"""The rows of ``askap-flows doctor``'s table: a :class:`Check` per check, its status, the table.

Statuses: OK, WARN (will probably work, but look), FAIL (the run will not work; the row says the
fix) and SKIP (not applicable or cannot be checked here, and why).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    name: str
    status: str
    detail: str
    fix: str = ""


def render_table(rows: Sequence[Check]) -> str:
    """The rows as an aligned text table; each fix on its own line under its row."""
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'check':{width}s}  {'status':6s}  detail", f"{'-' * width}  ------  {'-' * 40}"]
    for r in rows:
        lines.append(f"{r.name:{width}s}  {r.status:6s}  {r.detail}")
        if r.fix and r.status in (FAIL, WARN):
            lines.append(f"{'':{width}s}  {'':6s}  fix: {r.fix}")
    return "\n".join(lines)


def exit_code(rows: Iterable[Check]) -> int:
    """1 when any row FAILed, else 0."""
    return 1 if any(r.status == FAIL for r in rows) else 0
