"""Stage 4, the landmarker: each frame's face → its landmarks (:class:`~engine.structures.Landmarks`).

The backends live in :mod:`engine.landmarks` (``fan``, ``mtcnn``, ``file``) and are picked by
name from :data:`engine.landmarks.BACKENDS`. A backend works from the faces the tracker chose
and brings the detector it pairs with (``detector``, sharing its networks), or ``None`` when
it needs no boxes (``file`` replays saved landmarks by frame number).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from engine.stages.detect import Detector
from engine.structures import Detections, FrameBatch, Landmarks


@runtime_checkable
class Landmarker(Protocol):
    """A landmark backend.

    Attributes:
        name: backend name (``"fan"``, ``"mtcnn"``, ``"file"``).
        num_points: K, points per face: 68 or 5.
        detector: the detector this backend pairs with (the engine's default detector), or
            None when it needs no boxes.
    """

    name: str
    num_points: int
    detector: Detector | None

    def __call__(self, frames: FrameBatch, faces: Detections | None = None) -> Landmarks:
        """Landmarks of each frame's face, one row per frame (see :mod:`engine.landmarks.base`).

        Args:
            frames: the frames.
            faces: at most one face per frame (a tracker's output): the face to mark in each
                frame; a frame without one gets an invalid ``"no_face"`` row. None: the backend
                runs its own detector and marks the most confident face of each frame (a
                backend without a detector ignores ``faces``).
        """
        ...

    def close(self) -> None:
        """Release models/files. Idempotent; the bundled backends all implement it."""
        ...
