"""Profiles: YAML files with two sections, ``allocation`` and ``mpi``, read into the specs of
:mod:`askap_flows.spec`.

Layering, highest first: explicit arguments > the chosen profile (a packaged name or a path) > the
field defaults of the specs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .spec import AllocationSpec, MPISpec, SpecError, check_fits

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
    """Layer explicit values over the profile over the defaults, validate, and check the fit."""
    sections = read_profile(profile)
    path = _profile_path(profile)
    where = f" (profile {path})" if path else ""
    built: list[Any] = []  # [AllocationSpec, MPISpec]
    for name, cls, explicit in (("allocation", AllocationSpec, allocation), ("mpi", MPISpec, mpi)):
        try:
            built.append(cls(**{**sections[name], **_explicit(explicit)}))
        except (TypeError, SpecError) as exc:  # name the section and the file the value came from
            raise SpecError(f"{name}{where}: {exc}") from None
    alloc, mpi_spec = built
    if check:
        check_fits(mpi_spec, alloc)
    return alloc, mpi_spec


def _explicit(values: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (values or {}).items() if v is not None}


def _profile_for(profile, backend: str, needed: bool):
    if backend not in BACKENDS:
        raise SpecError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    if profile is not None or not needed:
        return profile
    profile = os.environ.get(PROFILE_ENV) or ("local" if backend == "local" else None)
    if profile is None:
        raise SpecError(
            "the slurm backend needs a profile that says which partition and network "
            "interfaces to use: pass profile='testbed' (the test bed), a YAML path, or set "
            "ASKAP_FLOWS_PROFILE. `askap-flows profiles` lists the packaged ones."
        )
    return profile


def resolve_specs(
    mpi_spec: MPISpec | Mapping[str, Any] | None,
    allocation: AllocationSpec | Mapping[str, Any] | None,
    profile: str | os.PathLike | None,
    backend: str,
) -> tuple[AllocationSpec, MPISpec]:
    """The specs of one sub-flow: given specs win, mappings layer over the profile; checked."""
    given = isinstance(mpi_spec, MPISpec) and isinstance(allocation, AllocationSpec)
    profile = _profile_for(profile, backend, needed=not given)
    alloc_over = allocation if isinstance(allocation, Mapping) else None
    mpi_over = mpi_spec if isinstance(mpi_spec, Mapping) else None
    alloc, spec = build_specs(profile, allocation=alloc_over, mpi=mpi_over, check=False)
    if isinstance(allocation, AllocationSpec):
        alloc = allocation
    if isinstance(mpi_spec, MPISpec):
        spec = mpi_spec
    if backend == "local" and spec.launcher != "mpiexec":
        spec = dataclasses.replace(spec, launcher="mpiexec")
    check_fits(spec, alloc)
    return alloc, spec


def resolve_allocation(
    allocation: AllocationSpec | Mapping[str, Any] | None,
    profile: str | os.PathLike | None,
    backend: str,
) -> AllocationSpec:
    """The allocation alone (for sub-flows without an MPI step), layered like resolve_specs."""
    if isinstance(allocation, AllocationSpec):
        _profile_for(profile, backend, needed=False)
        return allocation
    section = read_profile(_profile_for(profile, backend, needed=True))["allocation"]
    try:
        return AllocationSpec(**{**section, **_explicit(allocation)})
    except TypeError as exc:
        raise SpecError(f"allocation: {exc}") from None
