"""Shared fixtures. Real media comes from ``../shared`` and is never copied into the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED", REPO.parent / "shared"))
TESTDATA = SHARED / "testdata"
TEST_VIDEO = TESTDATA / "video" / "WDA_KatieHill_000.mp4"
TEST_IMAGES = TESTDATA / "images"
BFM_INDEX = SHARED / "bfm_index"


def require(path: Path) -> Path:
    """Return ``path`` or skip the test, naming the missing shared file."""
    if not path.exists():
        pytest.skip(f"shared test data not found: {path} (tests read ../shared; set STUDIO_SHARED)")
    return path


@pytest.fixture(scope="session")
def test_video() -> Path:
    return require(TEST_VIDEO)


@pytest.fixture(scope="session")
def test_images() -> Path:
    return require(TEST_IMAGES)


@pytest.fixture(scope="session")
def bfm_index() -> Path:
    return require(BFM_INDEX)
