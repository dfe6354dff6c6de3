"""MTCNN 5-point landmarks (facenet-pytorch), the detector family of Deep3DFaceRecon's examples.

facenet-pytorch ships its P/R/O-Net weights inside the wheel, so this backend works
offline. Its five points are, in order, left eye, right eye, nose, left mouth corner,
right mouth corner ("left" = smaller image x), which is Deep3D's 5-point order, in
image pixels with y down. The most probable face of each frame is kept. Detection
thresholds, minimum face size and pyramid factor are facenet-pytorch's defaults
([0.6, 0.7, 0.7], 20 px, 0.709). About 0.05 s per 512² frame on one CPU core.
"""

from __future__ import annotations

import logging

import numpy as np

from engine.landmarks.base import BackendStatus, landmarks_from_list
from engine.structures import FrameBatch, Landmarks

log = logging.getLogger(__name__)

NAME = "mtcnn"
WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")


def status() -> BackendStatus:
    """Whether facenet-pytorch imports and its bundled weights are present."""
    try:
        from importlib.metadata import version
        from pathlib import Path

        import facenet_pytorch.models.mtcnn as module
    except Exception as e:  # any import failure is a doctor finding, not a crash
        return BackendStatus(
            NAME, False,
            f"facenet-pytorch does not import ({type(e).__name__}: {e}); "
            "install it with `pip install facenet-pytorch --no-deps` (needs torch, torchvision)",
        )
    data = Path(module.__file__).resolve().parents[1] / "data"
    missing = [f for f in WEIGHT_FILES if not (data / f).is_file()]
    if missing:
        return BackendStatus(NAME, False, f"facenet-pytorch weights missing in {data}: {', '.join(missing)}")
    message = f"facenet-pytorch {version('facenet-pytorch')}, weights bundled ({data})"
    return BackendStatus(NAME, True, message)


class MtcnnLandmarker:
    """5-point landmarks with facenet-pytorch's MTCNN.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_frames: detect a whole batch in one call (fast on a GPU). Batched and
            per-frame detection differ by ~1e-4 px, so per-frame keeps the results
            independent of the batch size. ``None``: batched on CUDA, per-frame on CPU.
        max_pixels: when batched, at most this many pixels go through one call
            (bounds the image pyramid's memory on large frames).
    """

    name = NAME
    num_points = 5

    def __init__(self, device: str = "cpu", batch_frames: bool | None = None, max_pixels: int = 16_000_000):
        import torch
        from facenet_pytorch.models.mtcnn import MTCNN

        self.device = torch.device(device)
        self.batch_frames = self.device.type == "cuda" if batch_frames is None else batch_frames
        self.max_pixels = max_pixels
        self._net = MTCNN(device=self.device, select_largest=False, keep_all=True)

    def __call__(self, frames: FrameBatch) -> Landmarks:
        images = frames.images
        n = len(images)
        if n == 0:
            return landmarks_from_list([], self.num_points)
        if self.batch_frames:
            h, w = images.shape[1:3]
            step = max(1, self.max_pixels // max(1, h * w))
        else:
            step = 1
        per_frame: list[np.ndarray | None] = []
        for lo in range(0, n, step):
            _, probs, points = self._net.detect(images[lo : lo + step], landmarks=True)
            per_frame.extend(_best_face(probs[i], points[i]) for i in range(len(probs)))
        return landmarks_from_list(per_frame, self.num_points)

    def close(self) -> None:
        self._net = None


def _best_face(probs, points) -> np.ndarray | None:
    """(5, 2) float32 points of the most probable face of one frame, or None.

    facenet-pytorch returns object arrays: ``points`` is None (no face) or (F, 5, 2),
    ``probs`` is ``[None]`` or (F,).
    """
    if points is None:
        return None
    p = np.asarray([np.nan if v is None else float(v) for v in np.ravel(probs)], dtype=np.float64)
    if p.size == 0 or not np.isfinite(p).any():
        return None
    best = int(np.nanargmax(p))
    return np.asarray(np.asarray(points)[best], dtype=np.float32).reshape(5, 2)
