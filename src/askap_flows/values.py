"""What each profile value may be, because it reaches a job script or a command line (pure).

The job script SLURM runs is a bash script: dask-jobqueue writes some values into ``#SBATCH`` lines
and into the Dask worker's command line *unquoted* (``--interface <value>``), so a value holding
``;``, ``|``, ``&``, ``$(...)``, a backtick, a quote or a line break could run a command on the
compute node. Every such field is checked here against what the field can legally be; the few
free-form ones (paths) are shell-quoted where they are written and only refused when they hold a
control character (a line break would end the line they are written on).

``prologue`` is the exception, by design: its lines are shell code written by the profile's author,
copied into the job script as they are (one entry, one line). A profile is trusted like a shell
script; only line breaks and control characters in an entry are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_NAME = r"[A-Za-z0-9_.+-]+"
_NAMES = rf"{_NAME}(?:,{_NAME})*"
_OPTION_VALUE = r"[A-Za-z0-9_.,:=@%/+*!&|\[\]-]+"

#: field -> (pattern the whole value must match, what is allowed, in words)
RULES: dict[str, tuple[str, str]] = {
    "partition": (_NAMES, "one or more partition names separated by ',' (letters, digits, "
                  "'_', '.', '+', '-')"),
    "account": (_NAME, "one account name (letters, digits, '_', '.', '+', '-')"),
    "qos": (_NAMES, "one or more QOS names separated by ',' (letters, digits, '_', '.', '+', "
            "'-')"),
    "reservation": (_NAMES, "one or more reservation names separated by ',' (letters, digits, "
                    "'_', '.', '+', '-')"),
    "clusters": (_NAMES, "one or more cluster names separated by ',' (letters, digits, '_', '.', "
                 "'+', '-')"),
    "constraint": (r"[A-Za-z0-9_.,:&|*!\[\]-]+", "SLURM node features with SLURM's own operators "
                   "(letters, digits, '_', '.', ',', ':', '&', '|', '*', '!', '[', ']', '-'); it "
                   "is only written into a '#SBATCH' line, never run by the shell"),
    "interface": (r"[A-Za-z0-9_.:-]{1,15}", "a network interface name of 1-15 letters, digits, "
                  "'_', '.', ':' or '-' (e.g. ib0, hsn0; `ip -br addr` lists them)"),
    "scheduler_interface": (r"[A-Za-z0-9_.:-]{1,15}", "a network interface name of 1-15 "
                            "letters, digits, '_', '.', ':' or '-' (e.g. ib0, hsn0; `ip -br "
                            "addr` lists them)"),
    "job_name_prefix": (r"[A-Za-z0-9_.-]{1,40}", "1-40 letters, digits, '_', '.' or '-' (it "
                        "becomes part of the SLURM job name)"),
    "memory": (r"\d+(?:\.\d+)? ?(?i:[KMGTP]i?B?|B)?", "a number with a unit, e.g. '4GB', "
               "'500MB' or '1.5GiB'"),
    "extra_directives": (rf"--?[A-Za-z][A-Za-z0-9-]*(?:[= ]{_OPTION_VALUE})?",
                         "one sbatch option per entry, '--name=value', '--name' or '-X value' "
                         "(value: letters, digits and , . : = @ % / + * ! & | [ ] _ -), e.g. "
                         "'--gres=gpu:1' or '--exclude=nid[001-004]'"),
    "python": (r"[^\x00-\x1f\x7f]+", "a path without line breaks or control characters (it is "
               "shell-quoted in the job script)"),
    "local_directory": (r"[^\x00-\x1f\x7f]+", "a path without line breaks or control "
                        "characters (it is shell-quoted in the job script)"),
    "prologue": (r"[^\x00-\x08\x0a-\x1f\x7f]*", "one line of shell code per entry, without line "
                 "breaks or control characters (prologue lines are the profile author's own "
                 "shell code and run as written: use only profiles you trust)"),
    "env_name": (r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name (letters, digits, "
                 "'_', not starting with a digit)"),
}


def problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the field ``name`` (None: it can). ``name`` must be in RULES."""
    pattern, allowed = RULES[name]
    if not isinstance(value, str):
        return f"{name} must be a string ({allowed}), got {value!r}."
    if re.fullmatch(pattern, value) is None:
        return f"{name} {value!r} cannot go into a job script: {name} must be {allowed}."
    return None


def problems(name: str, values: Iterable[Any]) -> str | None:
    """The first problem of a list field (``extra_directives``, ``prologue``), naming the entry."""
    for value in values:
        said = problem(name, value)
        if said:
            return said.replace(f"{name} ", f"{name} entry ", 1)
    return None
