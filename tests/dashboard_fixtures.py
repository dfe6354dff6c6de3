"""Fixtures of the dashboard tests: result files written by the real writers from made-up numbers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from engine.structures import MediaInfo, VideoResult
from engine.writers import write_outputs


@contextmanager
def served_on(address: str) -> Iterator[None]:
    """Run AppTests as if the dashboard listened on ``address`` (Streamlit's ``server.address``;
    the sign-in gate treats any non-loopback address as the network)."""
    from streamlit import config

    old = config.get_option("server.address")
    config.set_option("server.address", address)
    try:
        yield
    finally:
        config.set_option("server.address", old)


def dashboard_registry(tmp_path: Path, monkeypatch, doctor=()):
    """Point the dashboard at ``tmp_path``: its data folder, checkpoint, BFM and torch-hub folders,
    no registry URL or import roots from the environment, a fixed doctor report (``doctor``,
    a list of :class:`engine.doctor.Check`), fresh Streamlit caches. Returns a new Registry there."""
    import streamlit as st

    from dashboard import data as dashboard_data
    from db import Registry

    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("STUDIO_DB_URL", raising=False)
    monkeypatch.delenv("STUDIO_IMPORT_ROOTS", raising=False)
    monkeypatch.setenv("STUDIO_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("STUDIO_BFM_DIR", str(tmp_path / "BFM"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(dashboard_data, "run_doctor", lambda: list(doctor))
    st.cache_data.clear()
    return Registry()


def fake_result(
    n: int = 60,
    fps: float = 25.0,
    width: int = 320,
    height: int = 240,
    seed: int = 0,
    invalid: tuple[tuple[int, int], ...] = ((10, 14), (40, 40)),
    k: int = 5,
) -> VideoResult:
    """A plausible :class:`VideoResult`: smooth head motion, frames ``invalid`` (inclusive runs) flagged."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fps
    coeff = rng.normal(0, 0.3, (n, 257)).astype(np.float32)
    coeff[:, 224] = 0.2 * np.sin(t)  # pitch (rad)
    coeff[:, 225] = 0.4 * np.sin(0.5 * t)  # yaw
    coeff[:, 226] = 0.1 * np.cos(t)  # roll
    coeff[:, 254:257] = np.stack([0.1 * np.sin(t), 0.05 * np.cos(t), 0.3 + 0 * t], axis=1)
    tp = np.tile(np.array([width, height, 0.9, width / 2, height / 2], np.float32), (n, 1))
    tp[:, 3] += 5 * np.sin(t)
    valid = np.ones(n, bool)
    for a, b in invalid:
        valid[a : b + 1] = False
    lm = np.tile(np.array([[130, 100], [190, 100], [160, 130], [135, 165], [185, 165]], np.float32)[:k], (n, 1, 1))
    lm[~valid] = -1
    return VideoResult(
        info=MediaInfo(
            path=Path("clip.mp4"),
            kind="video",
            width=width,
            height=height,
            fps=fps,
            frame_count=n,
            duration=n / fps,
            codec="h264",
        ),
        coeff=coeff,
        trans_params=tp,
        landmarks_img_ydown=lm,
        valid=valid,
        reason=["" if v else "no_face" for v in valid],
        timestamps=t,
    )


def write_fake_outputs(out_base: Path, formats=("pirender", "npz", "csv", "landmarks"), **kwargs) -> dict[str, Path]:
    """Write the given formats of :func:`fake_result` at ``out_base`` (``out_base.npz`` ...)."""
    out_base.parent.mkdir(parents=True, exist_ok=True)
    return write_outputs(fake_result(**kwargs), out_base, formats)


def make_clip(path: Path, n: int = 60, size: tuple[int, int] = (320, 240)) -> Path:
    """A small mpeg4 clip of ``n`` frames (PyAV, no ffmpeg binary)."""
    from tests.media import make_video

    path.parent.mkdir(parents=True, exist_ok=True)
    return make_video(path, frames=n, size=size, fps=25)


def populate(reg, folder: Path, formats=("pirender", "npz", "csv", "landmarks")) -> dict[str, int]:
    """Put one job in every state into ``reg``, through the real service functions.

    Returns:
        status value → job id: ``running`` (30 of 60 frames at 12.5 frames/s), ``succeeded``
        (results written by the real writers), ``failed`` (no face), ``cancelled``, ``queued``.
    """
    from db import LOCAL, service
    from db.storage import sha256_file
    from db.views import ArtifactFile, QualitySummary

    clip = make_clip(folder / "clip.mp4")
    settings = {"landmarks": "mtcnn", "formats": list(formats)}
    service.register_worker(reg, "worker-test", hostname="testhost", pid=1, device="cpu", device_name="CPU")
    ids: dict[str, int] = {}

    job = service.submit_file(reg, clip, settings, original_name="talk_running.mp4")
    service.claim_next(reg, "worker-test", device="cpu")
    service.report_progress(reg, job.id, "worker-test", frames_done=30, frames_total=60, fps=12.5, stage="extract")
    ids["running"] = job.id

    job = service.submit_file(reg, clip, settings, original_name="talk_done.mp4")
    claimed = service.claim_next(reg, "worker-test-2", device="cpu")
    assert claimed is not None and claimed.id == job.id
    result = fake_result()
    paths = write_outputs(result, reg.result_dir(job.id) / "talk_done", formats)
    paths["overlay"] = make_clip(reg.result_dir(job.id) / "talk_done.overlay.mp4", n=5, size=(64, 48))
    files = [ArtifactFile(f, p, p.stat().st_size, sha256_file(p)) for f, p in paths.items()]
    quality = QualitySummary(
        frames=result.num_frames,
        valid_frames=int(result.valid.sum()),
        reasons={"no_face": int((~result.valid).sum())},
        longest_invalid_run=5,
    )
    service.complete_job(
        reg,
        job.id,
        "worker-test-2",
        artifacts=files,
        quality=quality,
        engine_version="0.1.0",
        checkpoint_sha256="0" * 64,
    )
    ids["succeeded"] = job.id

    job = service.submit_file(reg, clip, settings, original_name="talk_noface.mp4")
    service.claim_next(reg, "worker-test-2", device="cpu")
    service.fail_job(reg, job.id, "worker-test-2", error=f"{clip}: no face found in any of 60 frames", code="no_face")
    ids["failed"] = job.id

    job = service.submit_file(reg, clip, settings, original_name="talk_cancelled.mp4")
    service.cancel_job(reg, job.id, actor=LOCAL)
    ids["cancelled"] = job.id

    job = service.submit_file(reg, clip, settings, original_name="talk_waiting.mp4")
    ids["queued"] = job.id
    return ids


def add_image_folder(reg, folder: Path, names=("a.jpg", "b.jpg", "c.jpg")) -> list[int]:
    """Succeeded one-frame jobs for images ``faces/<name>`` imported from one folder; returns their ids."""
    from PIL import Image

    from db import service
    from db.storage import sha256_file
    from db.views import ArtifactFile, QualitySummary

    service.register_worker(reg, "worker-img", hostname="testhost", pid=2, device="cpu")
    ids = []
    for i, name in enumerate(names):
        path = folder / "faces" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((240, 320, 3), 60 + 40 * i, np.uint8)).save(path)
        job = service.submit_file(
            reg, path, {"landmarks": "mtcnn", "formats": ["npz"]}, copy=False, original_name=f"faces/{name}"
        )
        service.claim_next(reg, "worker-img", device="cpu")
        result = fake_result(n=1, invalid=(), seed=i)
        paths = write_outputs(result, reg.result_dir(job.id) / Path(name).stem, ["npz"])
        files = [ArtifactFile(f, p, p.stat().st_size, sha256_file(p)) for f, p in paths.items()]
        service.complete_job(
            reg,
            job.id,
            "worker-img",
            artifacts=files,
            quality=QualitySummary(frames=1, valid_frames=1, reasons={}, longest_invalid_run=0),
        )
        ids.append(job.id)
    return ids
