"""Warn once, at import, when an installed dependency is outside the range this release declares (and tests).

The ranges have one home, the package metadata (setup.cfg's install_requires and extras, tested at both ends by
scripts/drift.sh). Users mix environments, so this never fails: it names the package, the installed version and
the tested range, and how to get a tested environment.
"""

from __future__ import annotations

import importlib.metadata as metadata
import warnings

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version


class UntestedVersionWarning(UserWarning):
    """An installed dependency is outside the range gpt2_accel was tested with."""


def untested_versions(requirements: list[str], installed: dict[str, str | None]) -> list[str]:
    """Messages for each requirement whose installed version falls outside its range.

    ``requirements`` are PEP 508 strings as in the package metadata (extras carry an ``extra == "x"`` marker and
    are checked only when installed); ``installed`` maps a distribution name to its version (None = absent).
    """
    out = []
    for line in requirements:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        optional = req.marker is not None and "extra" in str(req.marker)
        if req.marker is not None and not optional and not req.marker.evaluate():
            continue  # e.g. a python_version marker that does not apply here
        have = installed.get(req.name)
        if have is None or not req.specifier:
            continue  # not installed: a missing required package fails at its import with its own message
        try:
            ok = req.specifier.contains(Version(have), prereleases=True)
        except InvalidVersion:
            continue
        if not ok:
            out.append(
                f"{req.name} {have} is installed, but gpt2_accel is tested with {req.name}{req.specifier}. It may "
                f"work; if something breaks, install a tested version: pip install '{req.name}{req.specifier}' "
                "(or the locked environment: pip install -c constraints.txt ...)"
            )
    return out


def check_installed_versions() -> list[str]:
    """Warn (UntestedVersionWarning) once per dependency outside its range; returns the messages."""
    try:
        requirements = metadata.requires("gpt2_accel") or []
    except (
        metadata.PackageNotFoundError
    ):  # imported from a source tree that was never installed: nothing declared
        return []
    installed: dict[str, str | None] = {}
    for line in requirements:
        try:
            name = Requirement(line).name
        except InvalidRequirement:
            continue
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    messages = untested_versions(requirements, installed)
    for msg in messages:
        warnings.warn(msg, UntestedVersionWarning, stacklevel=3)
    return messages
