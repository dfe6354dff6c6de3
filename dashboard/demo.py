"""Demo jobs without any checkpoint: ``python -m dashboard.demo --jobs 24``.

Each demo job is a real job in the registry (succeeded, with an ``.npz`` written by the real
writers and its quality row) whose coefficients come from a **smooth synthetic trajectory**,
not from the network: head turns, nods, a talking mouth, some stretches without a face. They
exist so the charts, the dataset view and the comparison can be judged by eye. Every demo job
is named ``demo-….mp4`` and carries the engine version :data:`DEMO_VERSION`, which the pages
show as a "demo" badge. Its input is a small synthetic clip (a drawn head that turns as the
trajectory says), stored like an upload.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from engine import layout
from engine.structures import MediaInfo, VideoResult

log = logging.getLogger(__name__)

#: Engine version recorded on demo jobs; the UI labels such jobs "demo".
DEMO_VERSION = "demo (synthetic coefficients)"
DEMO_WORKER = "demo-generator"
SIZE = (160, 120)  #: (width, height) px of the demo clips
FPS = 25.0


def is_demo(engine_version: str | None) -> bool:
    """Whether a job's results come from :mod:`dashboard.demo` (not from the network)."""
    return bool(engine_version) and str(engine_version).startswith("demo")


def demo_trajectory(seed: int, n: int = 100, fps: float = FPS) -> VideoResult:
    """A smooth synthetic result of ``n`` frames: coefficients are sums of slow sines.

    Angles are radians in the files (as Deep3D writes them); every fourth video stores yaw
    offset by a full turn (2π), as unconstrained networks do, so the wrapped display can be
    checked. Seeds 3, 7, 11… have a stretch of frames without a face (``valid`` False).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fps
    coeff = np.zeros((n, 257), np.float32)
    coeff[:, layout.ID] = rng.normal(0, 0.8, layout.ID.stop - layout.ID.start)
    coeff[:, layout.TEX] = rng.normal(0, 0.8, layout.TEX.stop - layout.TEX.start)
    gamma = rng.normal(0, 0.1, 27)
    gamma[0] += 0.8
    coeff[:, layout.GAMMA] = gamma
    phase = rng.uniform(0, 2 * np.pi, 64)
    freq = rng.uniform(0.2, 1.2, 64)
    amp = rng.uniform(0.05, 0.6, 64) * np.exp(-np.arange(64) / 24)
    coeff[:, layout.EXP] = amp * np.sin(2 * np.pi * freq * t[:, None] + phase)
    yaw_amp = np.radians(rng.uniform(10, 70))
    coeff[:, 225] = yaw_amp * np.sin(2 * np.pi * rng.uniform(0.15, 0.4) * t + rng.uniform(0, 6))  # yaw
    coeff[:, 224] = np.radians(rng.uniform(3, 20)) * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6))  # pitch
    coeff[:, 226] = np.radians(rng.uniform(2, 12)) * np.sin(2 * np.pi * 0.2 * t)  # roll
    if seed % 4 == 0:
        coeff[:, 225] += 2 * np.pi
    coeff[:, 254] = 0.15 * np.sin(2 * np.pi * 0.1 * t + seed)
    coeff[:, 255] = 0.08 * np.sin(2 * np.pi * 0.25 * t)
    coeff[:, 256] = 0.4 + 0.1 * np.sin(2 * np.pi * 0.05 * t)
    valid = np.ones(n, bool)
    if seed % 4 == 3:
        start = int(rng.integers(n // 5, max(n // 5 + 1, n // 2)))
        valid[start : start + int(rng.integers(2, max(3, n // 4)))] = False
    w, h = SIZE
    tp = np.tile(np.array([w, h, 1.2, w / 2, h / 2], np.float32), (n, 1))
    tp[:, 3] += (8 * np.sin(coeff[:, 225])).astype(np.float32)
    base = np.array([[-14, 8], [14, 8], [0, -4], [-10, -16], [10, -16]], np.float32)  # eyes, nose, mouth; y up
    lm_img_ydown = np.empty((n, 5, 2), np.float32)
    lm_img_ydown[:, :, 0] = tp[:, 3:4] + base[:, 0] * np.cos(coeff[:, 225:226])
    lm_img_ydown[:, :, 1] = (h - 1 - tp[:, 4:5]) - base[:, 1]
    lm_img_ydown[~valid] = -1
    return VideoResult(
        info=MediaInfo(path=Path(f"demo-{seed:02d}.mp4"), kind="video", width=w, height=h, fps=fps,
                       frame_count=n, duration=n / fps, codec="mpeg4"),
        coeff=coeff,
        trans_params=tp,
        landmarks_img_ydown=lm_img_ydown,
        valid=valid,
        reason=["" if v else "no_face" for v in valid],
        timestamps=t,
    )


def write_clip(path: Path, result: VideoResult) -> Path:
    """A small mpeg4 clip drawing a head (ellipse, eyes) that moves as ``result`` says (PyAV)."""
    import av
    from PIL import Image, ImageDraw

    from engine.avcompat import open_container

    w, h = SIZE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_container(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=int(FPS))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(result.num_frames):
            img = Image.new("RGB", (w, h), (40, 48, 64))
            if result.valid[i]:
                d = ImageDraw.Draw(img)
                cx = float(result.trans_params[i, 3])
                cy = h - 1 - float(result.trans_params[i, 4])
                d.ellipse([cx - 26, cy - 34, cx + 26, cy + 34], fill=(224, 182, 150))
                for x, y in result.landmarks_img_ydown[i][:2]:
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 30, 30))
                mx, my = result.landmarks_img_ydown[i][3:5].mean(axis=0)
                open_px = 2 + 6 * abs(float(result.coeff[i, layout.EXP.start]))
                d.ellipse([mx - 9, my - open_px, mx + 9, my + open_px], fill=(150, 40, 40))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_demo_jobs(reg, count: int, *, frames: int = 100, first_seed: int = 0) -> list[int]:
    """Add ``count`` succeeded demo jobs to ``reg``; returns their ids.

    Each job goes through the real service functions (submit, claim this very job, complete
    with artifacts and quality), so the pages see it exactly like a finished extraction.
    """
    from dashboard.results import invalid_runs
    from db import service
    from db.storage import sha256_file
    from db.views import ArtifactFile, QualitySummary
    from engine.writers import write_outputs

    service.register_worker(reg, DEMO_WORKER, hostname="demo", pid=0, device="demo", device_name="demo")
    ids = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(first_seed, first_seed + count):
            result = demo_trajectory(seed, frames)
            name = f"demo-{seed:02d}.mp4"
            clip = write_clip(Path(tmp) / name, result)
            # device "demo": no real worker accepts it (db.service.device_accepts), so none can take
            # the job between its submission and the claim below
            job = service.submit_file(reg, clip, {"landmarks": "mtcnn", "formats": ["npz", "csv"], "device": "demo"},
                                      original_name=name)
            if service.claim_job(reg, job.id, DEMO_WORKER, device="demo") is None:
                continue
            paths = write_outputs(result, reg.result_dir(job.id) / Path(name).stem, ["npz", "csv"])
            files = [ArtifactFile(f, p, p.stat().st_size, sha256_file(p)) for f, p in paths.items()]
            runs = invalid_runs(result.valid)
            quality = QualitySummary(
                frames=result.num_frames,
                valid_frames=int(result.valid.sum()),
                reasons={"no_face": int((~result.valid).sum())} if runs else {},
                longest_invalid_run=max((b - a + 1 for a, b in runs), default=0),
            )
            service.complete_job(reg, job.id, DEMO_WORKER, artifacts=files, quality=quality,
                                 engine_version=DEMO_VERSION)
            ids.append(job.id)
    service.stop_worker(reg, DEMO_WORKER)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboard.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24, help="how many demo jobs to add (default 24)")
    parser.add_argument("--frames", type=int, default=100, help="frames per demo video (default 100)")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first job (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from db import Registry

    reg = Registry()
    ids = make_demo_jobs(reg, args.jobs, frames=args.frames, first_seed=args.first_seed)
    log.info("added %d demo jobs (synthetic coefficients, not from the network): %s", len(ids),
             ", ".join(map(str, ids)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
