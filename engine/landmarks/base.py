"""The landmark-backend contract and helpers shared by the backends.

A backend (:class:`~engine.stages.landmark.Landmarker`) turns a
:class:`~engine.structures.FrameBatch` and the face the tracker chose in each frame into
:class:`~engine.structures.Landmarks`, one row per frame, always frame-aligned:

* points are float32 (B, K, 2) pixel ``x, y`` of the original frame, **y down**
  (``points_img_ydown``); K = 68 (iBUG order) or 5 (Deep3D order: left eye, right eye,
  nose, left mouth corner, right mouth corner, "left" meaning smaller x in the image);
* a frame without a face gets a NaN row, ``valid=False`` and reason ``"no_face"``; a
  faceless frame never raises and never yields ``None``.

A backend that works from boxes exposes the detector it pairs with as ``detector`` (a
:class:`BoundDetector` over its own networks); called without faces it runs that detector and
marks the most confident face of each frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.stages.detect import best_face_per_frame
from engine.stages.landmark import Landmarker
from engine.structures import Detections, FrameBatch, Landmarks

#: Reason stored for a frame in which the backend found no face.
NO_FACE = "no_face"


@dataclass(frozen=True)
class BoundDetector:
    """A backend's detection method as a :class:`~engine.stages.detect.Detector` (same networks).

    Attributes:
        name: detector name (``"s3fd"``, ``"mtcnn"``).
        detect: ``detect(frames) -> Detections``.
        device_frames: ``detect`` takes frames whose ``images`` are a torch tensor
            (:func:`engine.frames.takes_device_frames`).
    """

    name: str
    detect: Callable[[FrameBatch], Detections]
    device_frames: bool = False

    def __call__(self, frames: FrameBatch) -> Detections:
        return self.detect(frames)


def faces_to_mark(landmarker: Landmarker, frames: FrameBatch, faces: Detections | None) -> Detections:
    """``faces``, or, when None, the most confident face of each frame by the backend's detector."""
    if faces is not None:
        return faces
    return best_face_per_frame(landmarker.detector(frames))


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, for ``doctor``.

    Attributes:
        name: backend name.
        available: True when it can run now, offline.
        message: one line: what was found, or what to do to make it available.
    """

    name: str
    available: bool
    message: str


def no_face_landmarks(num_frames: int, num_points: int, reason: str = NO_FACE) -> Landmarks:
    """All-invalid :class:`Landmarks`: NaN float32 (num_frames, num_points, 2).

    >>> lm = no_face_landmarks(2, 5)
    >>> lm.points_img_ydown.shape, lm.valid.tolist(), lm.reason
    ((2, 5, 2), [False, False], ('no_face', 'no_face'))
    """
    return Landmarks(
        points_img_ydown=np.full((num_frames, num_points, 2), np.nan, dtype=np.float32),
        valid=np.zeros(num_frames, dtype=bool),
        reason=(reason,) * num_frames,
    )


def landmarks_from_array(points: np.ndarray, confidence: np.ndarray | None = None) -> Landmarks:
    """:func:`landmarks_from_list` for points already in one array: (B, K, 2), NaN rows = no face.

    A row with any non-finite value is invalid, ``"no_face"``; points are cast to float32.

    >>> lm = landmarks_from_array(np.stack([np.ones((5, 2)), np.full((5, 2), np.nan)]))
    >>> lm.points_img_ydown.dtype, lm.valid.tolist(), lm.reason
    (dtype('float32'), [True, False], ('', 'no_face'))
    """
    pts = np.asarray(points).astype(np.float32)
    if pts.ndim != 3 or pts.shape[2] != 2:
        raise ValueError(f"landmarks: expected shape (B, K, 2), got {pts.shape}")
    valid = np.isfinite(pts).all(axis=(1, 2))
    pts[~valid] = np.nan
    reason = tuple("" if v else NO_FACE for v in valid.tolist())
    conf = None
    if confidence is not None:
        conf = np.where(valid, np.asarray(confidence, dtype=np.float32), np.float32(np.nan)).astype(np.float32)
    return Landmarks(points_img_ydown=pts, valid=valid, reason=reason, confidence=conf)


def landmarks_from_list(per_frame: Sequence[np.ndarray | None], num_points: int,
                        confidence: Sequence[float] | None = None) -> Landmarks:
    """Pack one optional (num_points, 2) array per frame into :class:`Landmarks`.

    ``None`` (or a row with a non-finite value) becomes a NaN row, invalid, ``"no_face"``.
    ``confidence``: the backend's own confidence per frame (kept where the frame is valid).

    >>> lm = landmarks_from_list([np.ones((5, 2)), None], 5)
    >>> lm.points_img_ydown.dtype, lm.valid.tolist(), lm.reason
    (dtype('float32'), [True, False], ('', 'no_face'))
    """
    points = np.full((len(per_frame), num_points, 2), np.nan, dtype=np.float32)
    valid = np.zeros(len(per_frame), dtype=bool)
    for i, p in enumerate(per_frame):
        if p is None:
            continue
        p = np.asarray(p, dtype=np.float32)
        if p.shape != (num_points, 2):
            raise ValueError(f"landmarks of frame {i}: expected shape ({num_points}, 2), got {p.shape}")
        if np.isfinite(p).all():
            points[i] = p
            valid[i] = True
    reason = tuple("" if v else NO_FACE for v in valid)
    conf = None
    if confidence is not None:
        conf = np.where(valid, np.asarray(confidence, dtype=np.float32), np.float32(np.nan)).astype(np.float32)
    return Landmarks(points_img_ydown=points, valid=valid, reason=reason, confidence=conf)
