"""Stage 5, the temporal policy: what a frame without usable landmarks is aligned with.

It turns the landmarker's :class:`~engine.structures.Landmarks` into an
:class:`~engine.structures.AlignPlan` and carries what it remembers (the last landmarks used)
from batch to batch as an immutable state, which the resume state saves with every batch. It
never changes a frame's validity: a frame without a face stays invalid whatever it is
aligned with.

The default, :class:`NoFacePolicyStage`, implements :class:`~engine.config.NoFacePolicy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engine.config import EngineConfig, LandmarkBackend, NoFacePolicy
from engine.structures import AlignPlan, Landmarks


class PolicyState(Protocol):
    """What a temporal policy carries from one batch to the next (immutable)."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays for the resume state."""
        ...


@runtime_checkable
class TemporalPolicy(Protocol):
    """Decides the points each frame is aligned with."""

    def initial_state(self, saved: Mapping[str, np.ndarray] | None = None) -> PolicyState:
        """The state before an input's first frame, or the one ``saved`` by ``to_arrays``."""
        ...

    def __call__(self, landmarks: Landmarks, state: PolicyState) -> tuple[AlignPlan, PolicyState]:
        """The plan for these frames and the state after them."""
        ...


@dataclass(frozen=True)
class LastLandmarks:
    """The landmarks of the last frame that had a face: float32 (K, 2) image px y-down, or None."""

    last_lm: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.last_lm is None else {"last_lm": self.last_lm}


def plan_no_face(
    landmarks: Landmarks, last_lm: np.ndarray | None, carry: bool
) -> tuple[AlignPlan, np.ndarray | None]:
    """Choose the landmarks each frame is aligned with (a pure function).

    A frame with a face uses its own points. Without one, it reuses ``last_lm`` (the last
    frame that had a face) when ``carry`` and there is one, else the template.

    Args:
        landmarks: the landmarker's output for a batch.
        last_lm: float32 (K, 2) the last landmarks used before this batch, or None.
        carry: reuse the previous frame's landmarks for a frame without a face.

    Returns:
        (plan, last_lm after this batch).

    >>> nan = np.full((5, 2), np.nan, np.float32)
    >>> lms = Landmarks(np.stack([nan, np.ones((5, 2), np.float32), nan]), np.array([False, True, False]),
    ...                 ("no_face", "", "no_face"))
    >>> plan, last = plan_no_face(lms, None, carry=True)
    >>> plan.use_template.tolist(), float(plan.lm_img_ydown[2, 0, 0])
    ([True, False, False], 1.0)
    """
    pts = landmarks.points_img_ydown.astype(np.float32, copy=True)
    use_template = np.zeros(len(landmarks.valid), dtype=bool)
    for i, ok in enumerate(landmarks.valid):
        if ok:
            last_lm = pts[i].copy()
        elif carry and last_lm is not None:
            pts[i] = last_lm
        else:
            use_template[i] = True
            pts[i] = 0.0
    return AlignPlan(lm_img_ydown=pts, use_template=use_template), last_lm


class NoFacePolicyStage:
    """:class:`~engine.config.NoFacePolicy` as a stage.

    Args:
        carry: reuse the previous frame's landmarks for a frame without a face (``REFERENCE``
            with a detector, as PIRender's detector script does); False: the template
            (``TEMPLATE``, and ``REFERENCE`` with a keypoint file, as PIRender's reconstruction
            script gives every -1 row the template).
    """

    def __init__(self, carry: bool) -> None:
        self.carry = carry

    @classmethod
    def from_config(cls, config: EngineConfig) -> NoFacePolicyStage:
        return cls(carry=config.no_face == NoFacePolicy.REFERENCE and config.landmarks != LandmarkBackend.FILE)

    def initial_state(self, saved: Mapping[str, np.ndarray] | None = None) -> LastLandmarks:
        if saved is not None and "last_lm" in saved:
            return LastLandmarks(np.asarray(saved["last_lm"]))
        return LastLandmarks()

    def __call__(self, landmarks: Landmarks, state: LastLandmarks) -> tuple[AlignPlan, LastLandmarks]:
        plan, last_lm = plan_no_face(landmarks, state.last_lm, self.carry)
        return plan, LastLandmarks(last_lm)
