"""Stage 3, the tracker: which face each frame's landmarks come from.

The tracker decides when to run the detector and which face to follow: it turns a batch of
frames into :class:`~engine.structures.Detections` with **at most one face per frame**, for
the landmarker. Its memory between batches is an explicit, immutable state object: the
engine passes it in and gets the next one back, and the resume state saves it with every
batch (:meth:`TrackerState.to_arrays`), so a resumed run continues exactly where it stopped.

The default, :class:`DetectEveryFrame`, runs the detector on every frame and keeps its most
confident face: today's behaviour (the reference's), stateless. :class:`FollowPerson` keeps the
face whose box continues the previous frame's (``--keep-person continuity``). Both report
per kept face how many faces the frame had and the kept face's rank in the reference's order,
for the quality flags. :class:`~engine.stages.keyframe.KeyframeTracker` (the fast path) detects
only on keyframes and follows the face in between; it is a :class:`VerifyingTracker`, whose boxes
are checked against the landmarks and re-detected where tracking was lost (:func:`mark_faces`,
which the engine calls for every tracker).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np

from engine.config import EngineConfig, KeepPerson, Mode
from engine.stages.detect import Detector, best_face_per_frame, reference_order
from engine.stages.landmark import Landmarker
from engine.structures import Detections, FrameBatch, Landmarks, rows_of


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


#: :class:`FollowPerson`: a face continues the previous box when their IoU is at least this ...
CONTINUITY_MIN_IOU = 0.1
#: ... or, failing that, when its centre is within this many previous-box widths of the old centre.
CONTINUITY_MAX_SHIFT = 1.0


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64 (F,): intersection over union of ``box`` (4,) with each of ``boxes`` (F, 4),
    all ``x1, y1, x2, y2`` pixels.

    >>> box_iou(np.array([0., 0, 2, 2]), np.array([[0., 0, 2, 2], [1, 0, 3, 2], [5, 5, 6, 6]])).round(3).tolist()
    [1.0, 0.333, 0.0]
    """
    return pair_iou(np.asarray(box, dtype=np.float64).reshape(1, 4), np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def _box_area(b: np.ndarray) -> np.ndarray:
    """Areas of boxes (..., 4) ``x1, y1, x2, y2``; a negative side counts as 0."""
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (N,): IoU of ``a[i]`` with ``b[i]`` for boxes (N, 4) (or broadcastable (1, 4)),
    ``x1, y1, x2, y2`` pixels; 0 where the union is empty. One set of numpy operations.

    >>> pair_iou(np.array([[0., 0, 2, 2], [0, 0, 2, 2]]), np.array([[1., 0, 3, 2], [5, 5, 6, 6]])).round(3).tolist()
    [0.333, 0.0]
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    union = _box_area(a) + _box_area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def continuing_face(previous: np.ndarray | None, boxes: np.ndarray, scores: np.ndarray) -> int:
    """Index of the face (of ``boxes`` (F, 4), ``scores`` (F,)) that continues ``previous`` (4,).

    The face with the largest IoU with the previous box when it reaches
    :data:`CONTINUITY_MIN_IOU`; else the face whose centre is nearest the previous centre when
    within :data:`CONTINUITY_MAX_SHIFT` box widths; else (no previous box, or the person is
    gone: a cut) the reference's choice, the most confident face.

    >>> continuing_face(np.array([0., 0, 10, 10]), np.array([[50., 0, 70, 20], [1, 1, 11, 11]]), np.array([.99, .9]))
    1
    """
    order = reference_order(scores)
    finite = np.isfinite(scores)
    if previous is None or not np.all(np.isfinite(previous)):
        return int(order[0])
    iou = np.where(finite, box_iou(previous, boxes), -1.0)
    if iou.max() >= CONTINUITY_MIN_IOU:
        return int(np.argmax(iou))
    centre = (previous[:2] + previous[2:]) / 2
    width = max(previous[2] - previous[0], 1.0)
    dist = np.hypot(*((boxes[:, :2] + boxes[:, 2:]) / 2 - centre).T) / width
    dist = np.where(finite, dist, np.inf)
    if dist.min() <= CONTINUITY_MAX_SHIFT:
        return int(np.argmin(dist))
    return int(order[0])


@dataclass(frozen=True)
class LastBox:
    """The box of the face followed in the last frame that had one: float64 (4,) ``x1, y1, x2, y2``
    px y-down, or None before the first face."""

    box: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.box is None else {"last_box": self.box}


class FollowPerson:
    """Run the detector on every frame and keep the face whose box continues the previous frame's
    (:func:`continuing_face`), so one person is followed through the video.

    Where it keeps another face than the reference would (the most confident), the face's
    ``kept_rank`` is above 0 and the frame is flagged ``other_face_kept``.
    """

    name = "continuity"

    def initial_state(self, saved: Mapping[str, np.ndarray] | None = None) -> LastBox:
        if saved is not None and "last_box" in saved:
            return LastBox(np.asarray(saved["last_box"], dtype=np.float64))
        return LastBox()

    def __call__(
        self, frames: FrameBatch, detector: Detector | None, state: LastBox
    ) -> tuple[Detections | None, LastBox]:
        if detector is None:
            return None, state
        faces = detector(frames)
        previous = state.box
        chosen, found, rank = [], [], []
        for row in np.unique(faces.frame_rows):
            members = np.flatnonzero(faces.frame_rows == row)
            scores = faces.scores[members]
            if not np.isfinite(scores).any():
                continue
            j = continuing_face(previous, faces.boxes_img_ydown[members], scores)
            chosen.append(members[j])
            found.append(len(members))
            rank.append(int(np.flatnonzero(reference_order(scores) == j)[0]))
            previous = faces.boxes_img_ydown[members[j]].astype(np.float64)
        kept = faces.take(np.asarray(chosen, dtype=np.int64))
        kept = replace(kept, faces_found=np.asarray(found, dtype=np.int64), kept_rank=np.asarray(rank, dtype=np.int64))
        return kept, LastBox(None if previous is None else np.array(previous, dtype=np.float64))


@runtime_checkable
class VerifyingTracker(Tracker, Protocol):
    """A tracker that does not detect every frame and checks its boxes once the landmarks are in
    (:class:`~engine.stages.keyframe.KeyframeTracker`); :func:`mark_faces` drives it.

    The state its ``__call__`` returns may carry what ``verify`` and ``merge`` need about the
    batch; the one ``merge`` returns is the state after the batch (saved for resume).
    """

    def verify(self, frames: FrameBatch, faces: Detections, landmarks: Landmarks,
               state: TrackerState) -> np.ndarray:
        """int64 (R,) ascending rows of ``frames`` to run the detector on again (tracking lost)."""
        ...

    def merge(self, frames: FrameBatch, faces: Detections, landmarks: Landmarks, rows: np.ndarray,
              found: Detections, state: TrackerState) -> tuple[Detections, TrackerState]:
        """``faces`` with the face chosen among ``found`` (all faces the detector found in
        ``rows``; its ``frame_rows`` index ``rows``) in each of ``rows``, and the state after
        the batch. Called with no rows too."""
        ...


def mark_faces(tracker: Tracker, frames: FrameBatch, detector: Detector | None, landmarker: Landmarker,
               state: TrackerState) -> tuple[Detections | None, Landmarks, TrackerState]:
    """Tracker → landmarker for one batch; for a :class:`VerifyingTracker` then verify, and run the
    detector and the landmarker again on the rows it names (one call each, those rows only).

    Returns the faces (None when the backend needs no detector), their landmarks (one row per
    frame) and the tracker's state after the batch. For the other trackers this is exactly
    ``tracker(...)`` then ``landmarker(frames, faces)``.
    """
    faces, state = tracker(frames, detector, state)
    landmarks = landmarker(frames, faces)
    if faces is None or detector is None or not isinstance(tracker, VerifyingTracker):
        return faces, landmarks, state
    rows = np.asarray(tracker.verify(frames, faces, landmarks, state), dtype=np.int64)
    found = detector(rows_of(frames, rows)) if rows.size else Detections.empty(0)
    faces, state = tracker.merge(frames, faces, landmarks, rows, found, state)
    if rows.size:
        again = landmarker(rows_of(frames, rows), faces_in_rows(faces, rows))
        landmarks = replace_rows(landmarks, rows, again)
    return faces, landmarks, state


def faces_in_rows(faces: Detections, rows: np.ndarray) -> Detections:
    """The faces of frames ``rows`` (int64 (R,) ascending) as a batch of R frames (``frame_rows``
    renumbered 0…R-1).

    >>> d = Detections(np.arange(12.).reshape(3, 4), np.ones(3), np.array([0, 2, 3]), 4)
    >>> sub = faces_in_rows(d, np.array([2, 3]))
    >>> sub.frame_rows.tolist(), sub.num_frames, sub.boxes_img_ydown[:, 0].tolist()
    ([0, 1], 2, [4.0, 8.0])
    """
    rows = np.asarray(rows, dtype=np.int64)
    packed = np.flatnonzero(np.isin(faces.frame_rows, rows))
    sub = faces.take(packed)
    return replace(sub, frame_rows=np.searchsorted(rows, sub.frame_rows).astype(np.int64), num_frames=len(rows))


def replace_rows(landmarks: Landmarks, rows: np.ndarray, again: Landmarks) -> Landmarks:
    """``landmarks`` with frames ``rows`` (int64 (R,)) replaced by the R rows of ``again``."""
    points = landmarks.points_img_ydown.copy()
    valid = landmarks.valid.copy()
    reason = list(landmarks.reason)
    points[rows], valid[rows] = again.points_img_ydown, again.valid
    for i, r in enumerate(rows):
        reason[r] = again.reason[i]
    confidence = landmarks.confidence
    if confidence is not None or again.confidence is not None:
        confidence = (np.full(len(valid), np.nan, np.float32) if confidence is None
                      else confidence.astype(np.float32, copy=True))
        confidence[rows] = np.nan if again.confidence is None else again.confidence
    return Landmarks(points, valid, tuple(reason), confidence)


def tracker_from_config(config: EngineConfig) -> Tracker:
    """The tracker ``config`` asks for: on the fast path (``mode="fast"``) the
    :class:`~engine.stages.keyframe.KeyframeTracker` (``detect_every``, ``keep_person``); else the
    one ``config.keep_person`` names: :class:`DetectEveryFrame` (``reference``) or
    :class:`FollowPerson` (``continuity``)."""
    if config.mode == Mode.FAST:
        from engine.stages.keyframe import keyframe_tracker  # it builds on this module

        return keyframe_tracker(config.detect_every, config.keep_person)
    return FollowPerson() if config.keep_person == KeepPerson.CONTINUITY else DetectEveryFrame()
