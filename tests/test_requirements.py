"""requirements.lock agrees with the ranges in requirements*.txt for every supported Python.

A range edited without ``make lock`` (or a lock edited by hand) fails here, before an install
does something else than the files say.
"""

from __future__ import annotations

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

RANGES = ("requirements.txt", "requirements-dev.txt", "requirements-ray.txt")
PYTHONS = ("3.10.13", "3.11.7", "3.12.3", "3.13.0")


def _lines(name: str) -> list[str]:
    out = []
    for raw in (REPO / name).read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _env(python: str) -> dict[str, str]:
    return {"python_full_version": python, "python_version": ".".join(python.split(".")[:2]),
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}


def _pins(python: str) -> dict[str, Version]:
    """Package → pinned version of the lock lines whose markers hold on Linux x86_64 with ``python``."""
    pins: dict[str, Version] = {}
    for line in _lines("requirements.lock"):
        spec, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(_env(python)):
            continue
        name, _, version = spec.strip().partition("==")
        name = canonicalize_name(name.split("[")[0])
        assert name not in pins, f"two pins of {name} apply on Python {python}"
        pins[name] = Version(version)
    return pins


def test_the_lock_is_made_by_make_lock():
    assert "#    make lock" in (REPO / "requirements.lock").read_text()


@pytest.mark.parametrize("python", PYTHONS)
def test_every_range_is_pinned_inside_it(python):
    pins = _pins(python)
    for name in RANGES:
        for line in _lines(name):
            req = Requirement(line)
            key = canonicalize_name(req.name)
            assert key in pins, f"{name}: {req.name} is not in requirements.lock for Python {python} (run make lock)"
            assert pins[key] in req.specifier, (
                f"requirements.lock pins {req.name}=={pins[key]} for Python {python}, outside {name}'s "
                f"'{req.specifier}' (run make lock)"
            )


def test_pyav_19_is_what_python_312_gets():
    """The case this lock exists for: Python >= 3.12 installs PyAV 19 (engine/avcompat.py)."""
    assert _pins("3.12.3")["av"].major == 19 and _pins("3.11.7")["av"].major == 18
