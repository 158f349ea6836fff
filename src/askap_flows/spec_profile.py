"""Profiles: YAML files with two sections, ``allocation`` and ``mpi``, read into the specs of
:mod:`askap_flows.spec`.

Finding and reading a profile is here; layering it with explicit arguments and the backend is
:func:`askap_flows.resolve.resolve`, the one place every entry point resolves its specs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .spec import AllocationSpec, MPISpec, SpecError

PROFILE_DIR = Path(__file__).with_name("profiles")
PROFILE_ENV = "ASKAP_FLOWS_PROFILE"
BACKENDS = ("local", "slurm")

SECTIONS = {"allocation": AllocationSpec, "mpi": MPISpec}


def packaged_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.yaml"))}


def _profile_path(profile: str | os.PathLike | None) -> Path | None:
    if profile is None:
        profile = os.environ.get(PROFILE_ENV) or None
        if profile is None:
            return None
    text = str(profile)
    known = packaged_profiles()
    if text in known:
        return known[text]
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in text:
        if not path.is_file():
            raise SpecError(
                f"profile file {str(path)!r} does not exist. Give an existing YAML file or one of "
                f"the packaged profiles: {', '.join(known)}."
            )
        return path
    raise SpecError(
        f"unknown profile {text!r}. Packaged profiles: {', '.join(known)}; or give the path of a "
        "YAML file ('askap-flows profiles' lists them)."
    )


def read_profile(profile: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """The sections of a profile as plain dicts, checked for unknown keys and YAML errors."""
    path, data = load_profile(profile)
    if path is None:
        return {name: {} for name in SECTIONS}
    return profile_sections(data, path)


def load_profile(profile: str | os.PathLike | None) -> tuple[Path | None, Any]:
    """(path, the YAML's data) of a packaged profile name or a YAML path; (None, {}) for none."""
    path = _profile_path(profile)
    if path is None:
        return None, {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise SpecError(f"profile {path}: not valid YAML{where}: {exc}") from None
    return path, data


def profile_sections(data: Any, path: Path | str) -> dict[str, dict[str, Any]]:
    """This library's form of a profile (``allocation``, ``mpi``), checked for unknown keys."""
    if not isinstance(data, dict):
        raise SpecError(f"profile {path}: the top level must be a mapping with sections "
                        f"{', '.join(SECTIONS)}.")
    unknown = set(data) - set(SECTIONS) - {"description"}
    if unknown:
        raise SpecError(
            f"profile {path}: unknown section(s) {', '.join(sorted(unknown))}. Valid sections: "
            f"{', '.join(SECTIONS)} (and 'description')."
        )
    out: dict[str, dict[str, Any]] = {}
    for name, cls in SECTIONS.items():
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise SpecError(
                f"profile {path}: section '{name}' must be a mapping of keys to values.")
        valid = [f.name for f in fields(cls)]
        bad = sorted(set(section) - set(valid))
        if bad:
            raise SpecError(
                f"profile {path}: unknown key(s) in '{name}': {', '.join(bad)}. Valid keys are: "
                f"{', '.join(valid)}."
            )
        out[name] = dict(section)
    return out


def build_specs(
    profile: str | os.PathLike | None = None,
    allocation: Mapping[str, Any] | None = None,
    mpi: Mapping[str, Any] | None = None,
    check: bool = True,
) -> tuple[AllocationSpec, MPISpec]:
    """The profile's specs as written (its launcher too), explicit values over them, checked
    (``check``: the MPI step fits the allocation). No profile and no $ASKAP_FLOWS_PROFILE: the
    field defaults. Every run resolves its specs with :func:`askap_flows.resolve.resolve`."""
    from .resolve import resolve

    none = profile is None and not os.environ.get(PROFILE_ENV)
    res = resolve({} if none else profile, allocation=allocation, mpi=mpi, fit=check)
    return res.allocation_spec(), res.mpi_spec()
