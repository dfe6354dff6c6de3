"""Stage 2, the face detector: frames → every face's box and score (:class:`Detections`).

A detector looks at each frame on its own and reports all the faces it finds, best first or
not; choosing the face to follow is the tracker's job (:mod:`engine.stages.track`). The bundled
detectors come with their landmark backend, which shares their networks
(``landmarker.detector``): S3FD for ``fan``, MTCNN for ``mtcnn``; ``file`` needs none.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np

from engine.structures import Detections, FrameBatch


@runtime_checkable
class Detector(Protocol):
    """Finds faces.

    Attributes:
        name: detector name (``"s3fd"``, ``"mtcnn"`` ...).
    """

    name: str

    def __call__(self, frames: FrameBatch) -> Detections:
        """Every face of every frame: boxes in image pixels, y down (see :class:`Detections`).

        A frame without a face simply has no row; the call never raises for it.
        """
        ...


def best_face_per_frame(detections: Detections) -> Detections:
    """Keep the most confident face of each frame (the first of equal scores).

    Faces whose score is NaN are never chosen; a frame with no finite score has no face.

    Args:
        detections: any number of faces per frame.

    Returns:
        :class:`Detections` with at most one face per frame, in frame order, with
        ``faces_found`` (faces in that frame) and ``kept_rank`` (0: this is the reference's choice).

    >>> d = Detections(np.zeros((3, 4)), np.array([0.5, 0.9, 0.7]), np.array([0, 0, 2]), 3)
    >>> best = best_face_per_frame(d)
    >>> best.frame_rows.tolist(), best.scores.tolist()
    ([0, 2], [0.9, 0.7])
    """
    chosen, found = [], []
    rows = detections.frame_rows
    for row in np.unique(rows):
        members = np.flatnonzero(rows == row)
        scores = detections.scores[members]
        if np.isfinite(scores).any():
            chosen.append(members[int(np.nanargmax(scores))])
            found.append(len(members))
    kept = detections.take(np.asarray(chosen, dtype=np.int64))
    return dataclasses.replace(kept, faces_found=np.asarray(found, dtype=np.int64),
                               kept_rank=np.zeros(len(chosen), dtype=np.int64))


def reference_order(scores: np.ndarray) -> np.ndarray:
    """int64 (F,): the faces of one frame in the reference's order, most confident first (the
    first of equal scores first; NaN scores last).

    >>> reference_order(np.array([0.5, 0.9, np.nan, 0.9])).tolist()
    [1, 3, 0, 2]
    """
    s = np.where(np.isfinite(scores), -np.asarray(scores, dtype=np.float64), np.inf)
    return np.argsort(s, kind="stable").astype(np.int64)
