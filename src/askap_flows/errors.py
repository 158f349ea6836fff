"""The library's one base exception.

Every error askap_flows raises on purpose derives from :class:`AskapFlowsError`, so a pipeline can
catch them all with one ``except``; each keeps its older base too (``SpecError`` is still a
``ValueError``, ``SlurmError`` a ``RuntimeError``), so existing handlers keep working.
"""

from __future__ import annotations


class AskapFlowsError(Exception):
    """An error askap_flows raised on purpose: its message names the problem and the fix."""
