"""Stage 3, the tracker: which face each frame's landmarks come from.

The tracker decides when to run the detector and which face to follow: it turns a batch of
frames into :class:`~engine.structures.Detections` with **at most one face per frame**, for
the landmarker. Its memory between batches is an explicit, immutable state object: the
engine passes it in and gets the next one back, and the resume state saves it with every
batch (:meth:`TrackerState.to_arrays`), so a resumed run continues exactly where it stopped.

The default, :class:`DetectEveryFrame`, runs the detector on every frame and keeps its most
confident face: today's behaviour, stateless. A tracker that detects every k frames and
follows the face in between fits the same protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engine.stages.detect import Detector, best_face_per_frame
from engine.structures import Detections, FrameBatch


class TrackerState(Protocol):
    """What a tracker carries from one batch to the next (immutable)."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays for the resume state (names are the tracker's own)."""
        ...


@runtime_checkable
class Tracker(Protocol):
    """Chooses the face of each frame."""

    def initial_state(self, saved: Mapping[str, np.ndarray] | None = None) -> TrackerState:
        """The state before an input's first frame, or the one ``saved`` by ``to_arrays``."""
        ...

    def __call__(
        self, frames: FrameBatch, detector: Detector | None, state: TrackerState
    ) -> tuple[Detections | None, TrackerState]:
        """The face to follow in each frame, and the state after these frames.

        Args:
            frames: the next frames of the input, in order.
            detector: the detector to run, or None when the landmark backend needs no boxes
                (then the tracker returns None for the faces).
            state: the state after the previous frames.
        """
        ...


@dataclass(frozen=True)
class StatelessTrack:
    """The state of a tracker that keeps nothing between batches."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {}


class DetectEveryFrame:
    """Run the detector on every frame and follow its most confident face there.

    >>> tracker = DetectEveryFrame()
    >>> faces, state = tracker(None, None, tracker.initial_state())
    >>> faces is None, state.to_arrays()
    (True, {})
    """

    name = "every-frame"

    def initial_state(self, saved: Mapping[str, np.ndarray] | None = None) -> StatelessTrack:
        return StatelessTrack()

    def __call__(
        self, frames: FrameBatch, detector: Detector | None, state: TrackerState
    ) -> tuple[Detections | None, TrackerState]:
        if detector is None:
            return None, state
        return best_face_per_frame(detector(frames)), state
