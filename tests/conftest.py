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


# A random-weight epoch_20.pth shared by every test that runs the network.
from tests.factories import recon_checkpoint  # noqa: E402, F401


@pytest.fixture(scope="session")
def short_clip(tmp_path_factory, test_video) -> Path:
    """The first 12 frames of the shared clip (512×512, 25 fps, MPEG-4), for fast end-to-end runs."""
    from tests.media import first_frames, make_video

    frames = first_frames(test_video, 12)
    return make_video(tmp_path_factory.mktemp("clips") / "short.mp4", frames, size=(512, 512), fps=25)


# A throwaway PostgreSQL server (session) and a fresh database on it per test; skip when unavailable.
from tests.pg import pg_url, postgres  # noqa: E402, F401


@pytest.fixture
def studio(tmp_path, monkeypatch):
    """A registry with a job in every state (``tests.dashboard_fixtures.populate``); the dashboard
    and the weight folders point into tmp_path. Yields ``(registry, {state: job id}, tmp_path)``.
    (tests/test_dashboard.py has its own ``studio``, built on an empty registry.)"""
    from engine.doctor import Check
    from tests.dashboard_fixtures import dashboard_registry, populate

    reg = dashboard_registry(tmp_path, monkeypatch, [Check("system", "Python", True, "3.11")])
    ids = populate(reg, tmp_path)
    yield reg, ids, tmp_path
    reg.close()


@pytest.fixture
def in_thread():
    """``in_thread(worker)`` runs ``worker.work()`` (a :class:`worker.loop.Worker`) on a thread and
    returns the thread. At teardown each worker started so is asked to stop and joined (a gated
    scripted engine gives up on its own within a minute), so that a failed assertion cannot leave
    a worker running into the next test."""
    import threading

    started = []

    def start(worker) -> threading.Thread:
        t = threading.Thread(target=worker.work, daemon=True, name=f"worker {worker.worker_id}")
        t.start()
        started.append((worker, t))
        return t

    yield start
    for worker, _ in started:
        worker.request_stop()
    for _, t in started:
        t.join(300)
