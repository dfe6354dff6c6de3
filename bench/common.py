"""Shared helpers for the benchmarks: test media and a random-weight checkpoint.

Benchmarks never assert timings; they print a table to paste into docs/PERFORMANCE.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED", REPO.parent / "shared"))
TEST_CLIP = SHARED / "testdata" / "video" / "WDA_KatieHill_000.mp4"


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a Deep3D-layout ``{'net_recon': state_dict}`` with random weights (same shapes as epoch_20.pth)."""
    import torch

    from engine.regressor import ReconNet

    if path.exists():
        return path
    torch.manual_seed(seed)
    net = ReconNet()
    with torch.no_grad():
        for p in net.final_layers.parameters():
            p.normal_(0, 0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net_recon": net.state_dict()}, path)
    return path


def make_720p_clip(src: Path, dst: Path, frames: int, fps: int = 25) -> Path:
    """A 1280×720 H.264 (or MPEG-4) video of ``frames`` frames: the square clip scaled to 720 px
    high, centred on a grey canvas, looped as often as needed."""
    import av
    from PIL import Image

    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(src)) as c:
        clip = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    canvas = np.full((720, 1280, 3), 96, np.uint8)
    tmp = dst.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as out:
        try:
            stream = out.add_stream("libx264", rate=fps)
            stream.options = {"crf": "20", "preset": "veryfast"}
        except (av.error.FFmpegError, ValueError):
            stream = out.add_stream("mpeg4", rate=fps)
            stream.bit_rate = 4_000_000
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        for i in range(frames):
            j = i % (2 * len(clip) - 2)  # ping-pong so the motion stays continuous
            j = j if j < len(clip) else 2 * len(clip) - 2 - j
            face = np.asarray(Image.fromarray(clip[j]).resize((720, 720), Image.Resampling.BILINEAR))
            canvas[:, 280:1000] = face
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(dst)
    return dst


def python() -> str:
    return sys.executable
