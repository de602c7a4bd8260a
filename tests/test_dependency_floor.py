"""constraints/floor.txt pins exactly the lower bounds of pyproject.toml's ranges (what `scripts/compat.sh floor`
tests), and every ranged dependency of the base install and the test extra (but the linter) is pinned there."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _floor_pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints" / "floor.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements(section: str) -> list[Requirement]:
    """The quoted requirement strings of one array of pyproject.toml (``dependencies`` or an extra's name)."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf"^{re.escape(section)} = \[(.*?)^\]", text, flags=re.S | re.M)
    assert match, f"no array {section!r} in pyproject.toml"
    return [Requirement(item) for item in re.findall(r'"([^"]+)"', match.group(1))]


def _lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    return max(bounds) if bounds else None


def test_floor_pins_equal_pyproject_lower_bounds() -> None:
    pins = _floor_pins()
    assert pins, "constraints/floor.txt pins nothing"
    checked = set()
    for section in ("dependencies", "test", "demo", "llm"):
        for req in _requirements(section):
            name = canonicalize_name(req.name)
            if name not in pins:
                continue
            assert _lower_bound(req) == pins[name], (
                f"{section}: {req} has lower bound {_lower_bound(req)}, constraints/floor.txt pins {pins[name]}"
            )
            checked.add(name)
    assert checked == set(pins), f"pinned in constraints/floor.txt but not required: {sorted(set(pins) - checked)}"


# the linter and the type checker: `.ci/run` runs them (the newest ruff, mypy within its range); the floor run is
# about the code's runtime dependencies
NOT_PINNED = {"ruff", "mypy"}


def test_every_ranged_dependency_is_pinned_at_its_floor() -> None:
    pins = _floor_pins()
    for section in ("dependencies", "test"):
        for req in _requirements(section):
            exact = any(s.operator == "==" for s in req.specifier)
            if exact or _lower_bound(req) is None:
                continue  # exact pins (the embedded model and data) are the same at both ends
            name = canonicalize_name(req.name)
            if name in NOT_PINNED:
                continue
            assert name in pins, f"{section}: {req} has a lower bound that constraints/floor.txt does not pin"
