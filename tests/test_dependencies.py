"""Dependency floors in pyproject.toml stay above known security holes (an edit cannot
quietly lower them), and the installed versions meet them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# package -> (first safe version, the last vulnerable version below it, the advisories)
FLOORS = {
    "jinja2": ("3.1.6", "3.1.5", "sandbox escapes: CVE-2024-56201, CVE-2024-56326, CVE-2025-27516"),
    "tqdm": ("4.66.3", "4.66.2", "CVE-2024-34062"),
    "torch": ("2.6", "2.5.1", "CVE-2025-32434: torch.load(weights_only=True) RCE"),
    "transformers": ("5.10", "5.9.0", "CVE-2026-4372, CVE-2026-5241, CVE-2026-9856, 2024-25 RCE/ReDoS fixes"),
    "pyarrow": ("23.0.1", "23.0.0", "CVE-2023-47248 (< 14.0.1), CVE-2026-25087 (15.0.0 - 23.0.0)"),
    "pytest": ("9.0.3", "9.0.2", "CVE-2025-71176"),
    "sentencepiece": ("0.2.1", "0.2.0", "CVE-2026-1260"),
    "ray": ("2.55", "2.54.1", "CVE-2026-32981 dashboard path traversal (<= 2.53), CVE-2026-27482 (< 2.54), CVE-2025-1979"),
    "setuptools": ("83", "82.0.1", "CVE-2025-47273, CVE-2026-59890 (build requirement)"),
}


def _requirements() -> dict[str, list[Requirement]]:
    data = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    specs = list(data["build-system"]["requires"]) + list(data["project"]["dependencies"])
    for extra in data["project"].get("optional-dependencies", {}).values():
        specs.extend(extra)
    out: dict[str, list[Requirement]] = {}
    for spec in specs:
        req = Requirement(spec)
        out.setdefault(req.name.lower(), []).append(req)
    return out


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_security_floor_is_kept(name):
    floor, vulnerable, why = FLOORS[name]
    reqs = _requirements().get(name)
    assert reqs, f"{name} is no longer declared in pyproject.toml"
    for req in reqs:
        assert not req.specifier.contains(vulnerable, prereleases=True), \
            f"{req} admits {name} {vulnerable} ({why}); keep >={floor}"
        assert req.specifier.contains(floor), f"{req} excludes the safe {name} {floor}"


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_installed_version_meets_the_floor(name):
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.skip(f"{name} is not installed")
    assert Version(installed) >= Version(FLOORS[name][0]), f"installed {name} {installed} is below the floor"


def test_installed_jinja2_has_the_sandbox_fixes():
    """Chat templates are rendered in Jinja's sandbox: the installed Jinja must be >= 3.1.6."""
    assert Version(version("jinja2")) >= Version("3.1.6")
