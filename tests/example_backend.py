"""A test-only landmark backend, written the way a new backend is added: this module (``create``,
``status``, the backend) plus one line in :data:`engine.landmarks.BACKENDS` (the tests add that
line with ``monkeypatch.setitem``).

``centre``: its detector reports one box in the middle of every frame; its landmarker puts
Deep3D's 5-point template (eyes, nose, mouth corners) into whichever box it is given.
"""

from __future__ import annotations

import numpy as np

from engine.align import TEMPLATE_5P
from engine.landmarks.base import BackendStatus, BoundDetector, faces_to_mark, landmarks_from_list
from engine.structures import Detections, FrameBatch, Landmarks

NAME = "centre"


def template_in_box(box_img_ydown: np.ndarray) -> np.ndarray:
    """float32 (5, 2) y-down pixels: the template's x, y (y up) scaled into ``x1, y1, x2, y2``."""
    x1, y1, x2, y2 = (float(v) for v in box_img_ydown)
    unit = (TEMPLATE_5P[:, :2] - TEMPLATE_5P[:, :2].min(0)) / np.ptp(TEMPLATE_5P[:, :2], axis=0)
    x = x1 + unit[:, 0] * (x2 - x1)
    y = y2 - unit[:, 1] * (y2 - y1)  # template y is up, image y is down
    return np.stack([x, y], axis=1).astype(np.float32)


class CentreLandmarker:
    name = NAME
    num_points = 5

    @property
    def detector(self) -> BoundDetector:
        return BoundDetector("centre-box", self.detect)

    def detect(self, frames: FrameBatch) -> Detections:
        n = len(frames)
        h, w = frames.images.shape[1:3]
        box = np.array([0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h])
        return Detections(np.tile(box, (n, 1)), np.ones(n), np.arange(n, dtype=np.int64), n)

    def __call__(self, frames: FrameBatch, faces: Detections | None = None) -> Landmarks:
        faces = faces_to_mark(self, frames, faces)
        where = faces.face_of_frame()
        per_frame = [None if j < 0 else template_in_box(faces.boxes_img_ydown[j]) for j in where]
        return landmarks_from_list(per_frame, self.num_points)

    def close(self) -> None:
        pass


def create(config, device: str, source=None) -> CentreLandmarker:
    return CentreLandmarker()


def status() -> BackendStatus:
    return BackendStatus(NAME, True, "test-only: the template in a box in the middle of the frame")
