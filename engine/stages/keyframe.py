"""The fast path's tracker: detect on keyframes, follow the face in between, re-detect where lost.

:class:`KeyframeTracker` runs the detector only on **keyframes** of a batch:

* the first frame of an input;
* the frame ``detect_every`` frames after the previous keyframe (8 by default);
* the last frame of every batch (so each batch ends on a detected face, the next batch's start);
* both sides of a **scene cut**: the frame after the cut and the one before it. A cut is a mean
  absolute difference above :data:`CUT_MIN_MAD` between the zero-mean grey 32×18 thumbnails
  (:func:`thumbnails`) of two consecutive frames (the previous batch's last thumbnail is kept
  in the state).

All keyframes of a batch go to the detector in one call. Between two keyframes whose faces are
the same person (the later box continues the earlier one, the tests of
:func:`~engine.stages.track.continuing_face`) each frame's box is interpolated linearly between
the two, so the landmarker still marks the whole batch in one call. Frames between a keyframe
with a face and one without (the face left or came), or between two keyframes whose faces do
not continue each other, get no box at first and are re-detected.

After the landmarker, :meth:`KeyframeTracker.verify` names the tracked frames to detect again:
the landmarker found no face in the box; its confidence fell under :data:`CONFIDENCE_DROP` of
the keyframes' (or under ``min_confidence``); the box the landmarks imply drifts from the
tracked box (IoU under :data:`DRIFT_MIN_IOU`); or it lies mostly outside the frame (under
:data:`LEAVE_MIN_INSIDE` of it inside). Those frames go to the detector in one more call and
to the landmarker again (:func:`~engine.stages.track.mark_faces`).

Quality fields: keyframes and re-detected frames carry what their detection found. A tracked
frame carries its two keyframes' values, the one that raises a flag: the larger ``faces_found``
and ``kept_rank``, the lower ``score`` (so ``several_faces`` and ``low_confidence`` hold over
the stretch between two keyframes as they do at its ends). Detector points (MTCNN's five) are
kept on detected frames only, NaN on tracked ones: a landmarker used with this tracker must mark
the box itself (FAN; MTCNN's refinement stages), else tracked frames come back without a face
and are all re-detected.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from engine.config import KeepPerson
from engine.frames import on_device, to_numpy
from engine.stages.detect import Detector, reference_order
from engine.stages.track import CONTINUITY_MAX_SHIFT, CONTINUITY_MIN_IOU, box_iou, continuing_face, pair_iou
from engine.structures import Detections, FrameBatch, Landmarks, rows_of

#: Keyframe interval: detect on every this-many-th frame (with the other keyframes).
DEFAULT_DETECT_EVERY = 8
#: Thumbnail size for cut detection, (width, height) pixels.
THUMB_SIZE = (32, 18)
#: A cut: the mean absolute difference of two consecutive frames' zero-mean grey thumbnails is
#: above this (grey levels 0…255). On the test clip (512², a talking head, head motion) consecutive
#: frames differ by 3.4 on average and 11.8 at most; the clip spliced to a mirrored or 40 px
#: shifted copy of itself differs by 40-48; the mean is removed first, so a global brightness
#: change (+30 levels: 0.7) is no cut.
CUT_MIN_MAD = 20.0
#: Tracking is lost where the box implied by the landmarks overlaps the tracked box less than this
#: (IoU; 0.6 is a shift of a quarter of the box's width).
DRIFT_MIN_IOU = 0.6
#: ... or where the landmarker's confidence falls under this fraction of its confidence at the
#: two keyframes (the lower of them): relative, as FAN's heat-map peak is not calibrated yet.
CONFIDENCE_DROP = 0.5
#: ... or where less than this fraction of the face's box is inside the frame.
LEAVE_MIN_INSIDE = 0.5


def thumbnails(images: np.ndarray) -> np.ndarray:
    """float32 (B, 18, 32): each frame's grey thumbnail, its mean removed.

    Samples a 72×128 grid of pixels (4×4 per thumbnail pixel, at their centres), converts it to
    grey (ITU-R 601 weights) and averages each 4×4 block: cheap at any frame size.

    Args:
        images: uint8 (B, H, W, 3) RGB, numpy or a device tensor (sampled there; only the
            thumbnails come back).
    """
    w, h = THUMB_SIZE
    k = 4
    height, width = images.shape[1:3]
    ys = ((np.arange(h * k) + 0.5) * height / (h * k)).astype(np.int64)
    xs = ((np.arange(w * k) + 0.5) * width / (w * k)).astype(np.int64)
    if on_device(images):
        import torch

        ys_d, xs_d = torch.from_numpy(ys).to(images.device), torch.from_numpy(xs).to(images.device)
        rgb = to_numpy(images.index_select(1, ys_d).index_select(2, xs_d))
    else:
        rgb = np.ascontiguousarray(images[:, ys][:, :, xs])  # the layout sets the sums' order below
    rgb = rgb.astype(np.float32)  # elementwise (not a BLAS product): the same bits whatever the layout
    grey = rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)
    thumb = grey.reshape(len(images), h, k, w, k).mean(axis=(2, 4))
    return (thumb - thumb.mean(axis=(1, 2), keepdims=True)).astype(np.float32)


def cut_before(previous: np.ndarray | None, thumbs: np.ndarray) -> np.ndarray:
    """bool (B,): a scene cut lies between each frame and the one before it (the first frame's
    predecessor is ``previous``, the last thumbnail of the batch before; None: there is none).

    >>> t = np.zeros((3, 18, 32), np.float32); t[2] += np.where(np.arange(32) < 16, 30, -30)
    >>> cut_before(None, t).tolist()
    [False, False, True]
    """
    before = np.concatenate([thumbs[:1] if previous is None else previous[None], thumbs[:-1]])
    return np.abs(thumbs - before).mean(axis=(1, 2)) > CUT_MIN_MAD


def keyframes(n: int, since: int, cuts: np.ndarray, detect_every: int) -> np.ndarray:
    """bool (n,): the keyframes of a batch of ``n`` frames.

    Args:
        since: frames after the previous batch's last keyframe (-1: this is the input's start).
        cuts: bool (n,) from :func:`cut_before`.

    >>> keyframes(10, 0, np.zeros(10, bool), 4).nonzero()[0].tolist()
    [3, 7, 9]
    >>> keyframes(10, -1, np.eye(10, dtype=bool)[5], 4).nonzero()[0].tolist()
    [0, 4, 5, 9]
    """
    key = [False] * n  # Python lists: this loop runs once a frame
    cut = np.asarray(cuts, dtype=bool).tolist()
    last = -1 if since < 0 else -1 - since
    for r in range(n):
        if (r == 0 and since < 0) or r - last >= detect_every or r == n - 1:
            key[r] = True
        if cut[r]:
            key[r] = True
            if r > 0:
                key[r - 1] = True
        if key[r]:
            last = r
    return np.array(key, dtype=bool)


def continues(previous: np.ndarray, box: np.ndarray) -> bool:
    """``box`` (4,) continues ``previous`` (4,): the same tests as
    :func:`~engine.stages.track.continuing_face` (IoU, else centre shift in box widths).

    >>> old = np.array([0., 0, 10, 10])
    >>> continues(old, np.array([8., 0, 18, 10])), continues(old, np.array([30., 0, 40, 10]))
    (True, False)
    """
    if box_iou(previous, box[None])[0] >= CONTINUITY_MIN_IOU:
        return True
    width = max(previous[2] - previous[0], 1.0)
    shift = np.hypot(*((box[:2] + box[2:]) / 2 - (previous[:2] + previous[2:]) / 2)) / width
    return bool(shift <= CONTINUITY_MAX_SHIFT)


def landmark_box(points: np.ndarray) -> np.ndarray:
    """float64 (B, 4) ``x1, y1, x2, y2`` around each row of ``points`` (B, K, 2); NaN rows stay NaN."""
    p = np.asarray(points, dtype=np.float64)
    with _quiet():
        return np.concatenate([np.nanmin(p, axis=1), np.nanmax(p, axis=1)], axis=1)


def relative(box: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """float64 (..., 4): ``inner`` in the coordinates of ``box`` (0, 0 its top-left, 1, 1 its
    bottom-right); the inverse of :func:`implied_box`."""
    size = np.concatenate([box[..., 2:] - box[..., :2]] * 2, axis=-1)
    origin = np.concatenate([box[..., :2]] * 2, axis=-1)
    with np.errstate(all="ignore"):
        return (inner - origin) / size


def implied_box(inner: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """float64 (..., 4): the box in which ``inner`` sits at relative place ``rel`` (see
    :func:`relative`): where the landmarks say the detector's box would be.

    >>> implied_box(np.array([2., 2, 4, 4]), relative(np.array([0., 0, 8, 8]), np.array([2., 2, 4, 4]))).tolist()
    [0.0, 0.0, 8.0, 8.0]
    """
    with np.errstate(all="ignore"):
        size = (inner[..., 2:] - inner[..., :2]) / (rel[..., 2:] - rel[..., :2])
        origin = inner[..., :2] - rel[..., :2] * size
    return np.concatenate([origin, origin + size], axis=-1)


def inside_fraction(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """float64 (B,): the fraction of each box's area (B, 4) inside a ``width`` × ``height`` frame."""
    clipped = np.stack([np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 1], 0, height),
                        np.clip(boxes[:, 2], 0, width), np.clip(boxes[:, 3], 0, height)], axis=1)
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    full = area(boxes)
    return np.where(full > 0, area(clipped) / np.where(full > 0, full, 1), 0.0)


@contextlib.contextmanager
def _quiet():
    """Silence numpy's 'All-NaN slice' warnings (NaN rows are expected: frames without a face)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@dataclass(frozen=True)
class _Plan:
    """One batch as the tracker left it for :meth:`KeyframeTracker.verify` and ``merge``.

    ``box`` float64 (B, 4) (NaN: no face), ``score`` float64 (B,), ``found``/``rank`` int64 (B,),
    ``points`` float32 (B, P, 2) or None; ``key`` bool (B,) detected here; ``cut`` bool (B,) a
    cut before the frame; ``pending`` bool (B,) no box yet but maybe a face (re-detect);
    ``left``/``right`` int64 (B,) the keyframes a tracked frame lies between (-1: the previous
    batch's last frame); ``follow`` the face followed before the batch (None: none, or a cut).
    """

    box: np.ndarray
    score: np.ndarray
    found: np.ndarray
    rank: np.ndarray
    points: np.ndarray | None
    key: np.ndarray
    cut: np.ndarray
    pending: np.ndarray
    left: np.ndarray
    right: np.ndarray
    follow: np.ndarray | None

    def detections(self) -> Detections:
        """At most one face a frame, packed, with the quality fields."""
        has = np.flatnonzero(np.isfinite(self.box).all(axis=1))
        return Detections(self.box[has], self.score[has], has.astype(np.int64), len(self.box),
                          None if self.points is None else self.points[has], self.found[has], self.rank[has])


@dataclass(frozen=True, eq=False)
class KeyframeState:
    """What :class:`KeyframeTracker` carries from one batch to the next.

    Attributes:
        since: frames after the last keyframe (-1: no frame seen yet, the next is the input's first).
        thumb: float32 (18, 32) the last frame's thumbnail (:func:`thumbnails`), or None.
        box: float64 (4,) ``x1, y1, x2, y2`` px y-down, the face at the last keyframe (None: none).
        score, found, rank: that face's detector score, faces in its frame, rank (NaN, 0, -1: none).
        follow: float64 (4,) the last face followed (kept over frames without a face; reset at a
            cut), for :func:`~engine.stages.track.continuing_face`; None before the first face.
        rel: float64 (4,) the landmarks' box relative to ``box`` (:func:`relative`), or None.
        confidence: the landmarker's confidence at the last keyframe (NaN: none).
        plan: the last batch's plan, between ``__call__`` and ``merge`` only (never saved).

    Compared by identity (it holds arrays); compare ``to_arrays()`` for equal contents.
    """

    since: int = -1
    thumb: np.ndarray | None = None
    box: np.ndarray | None = None
    score: float = float("nan")
    found: int = 0
    rank: int = -1
    follow: np.ndarray | None = None
    rel: np.ndarray | None = None
    confidence: float = float("nan")
    plan: _Plan | None = field(default=None, repr=False)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"since": np.int64(self.since),
               "key_face": np.array([self.score, self.found, self.rank, self.confidence], dtype=np.float64)}
        for name in ("thumb", "box", "follow", "rel"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_arrays(cls, saved: Mapping[str, np.ndarray]) -> KeyframeState:
        """The inverse of :meth:`to_arrays`."""
        def opt(name: str, dtype) -> np.ndarray | None:
            return np.asarray(saved[name], dtype=dtype) if name in saved else None

        score, found, rank, confidence = (float(v) for v in np.asarray(saved["key_face"], dtype=np.float64))
        return cls(int(saved["since"]), opt("thumb", np.float32), opt("box", np.float64), score, int(found),
                   int(rank), opt("follow", np.float64), opt("rel", np.float64), confidence)


class KeyframeTracker:
    """Detect on keyframes, interpolate the face's box in between, re-detect where tracking is lost
    (see the module's text). A :class:`~engine.stages.track.VerifyingTracker`.

    Args:
        detect_every: keyframe interval in frames (>= 1; 1 detects every frame).
        keep_person: at a keyframe with several faces, ``CONTINUITY`` keeps the face that continues
            the previous one (:func:`~engine.stages.track.continuing_face`), ``REFERENCE`` the
            most confident; between keyframes the face is followed either way.
        min_confidence: also re-detect tracked frames whose landmark confidence is under this
            (absolute; 0: only the relative :data:`CONFIDENCE_DROP` test).
    """

    name = "keyframes"

    def __init__(self, detect_every: int = DEFAULT_DETECT_EVERY, keep_person: KeepPerson = KeepPerson.CONTINUITY,
                 min_confidence: float = 0.0) -> None:
        if int(detect_every) < 1:
            raise ValueError(f"detect_every must be at least 1, got {detect_every}")
        self.detect_every = int(detect_every)
        self.keep_person = KeepPerson(keep_person)
        self.min_confidence = float(min_confidence)

    def initial_state(self, saved: Mapping[str, np.ndarray] | None = None) -> KeyframeState:
        if saved is not None and "since" in saved:
            return KeyframeState.from_arrays(saved)
        return KeyframeState()

    # ------------------------------------------------------------------ track

    def __call__(self, frames: FrameBatch, detector: Detector | None,
                 state: KeyframeState) -> tuple[Detections | None, KeyframeState]:
        if detector is None:
            return None, state
        n = len(frames)
        if n == 0:
            return Detections.empty(0), state
        thumbs = thumbnails(frames.images)
        cuts = cut_before(state.thumb, thumbs)
        key = keyframes(n, state.since, cuts, self.detect_every)
        key_rows = np.flatnonzero(key)
        found = detector(rows_of(frames, key_rows))

        box = np.full((n, 4), np.nan)
        score = np.full(n, np.nan)
        count = np.zeros(n, dtype=np.int64)
        rank = np.full(n, -1, dtype=np.int64)
        points = None
        if found.points_img_ydown is not None:
            points = np.full((n, *found.points_img_ydown.shape[1:]), np.nan, dtype=np.float32)
        follow = state.follow
        for i, r in enumerate(key_rows):
            if cuts[r]:
                follow = None
            j = self._choose(found, i, follow)
            if j is None:
                continue
            box[r], score[r] = found.boxes_img_ydown[j], found.scores[j]
            count[r], rank[r] = self._found_and_rank(found, i, j)
            if points is not None:
                points[r] = found.points_img_ydown[j]
            follow = box[r]

        left = np.full(n, -1, dtype=np.int64)
        right = np.full(n, -1, dtype=np.int64)
        pending = np.zeros(n, dtype=bool)
        prev_box = np.full(4, np.nan) if state.box is None else state.box
        prev = (prev_box, state.score, state.found, state.rank)
        a = -1
        for b in key_rows:
            b_face = (box[b], score[b], count[b], rank[b])
            rows = np.arange(a + 1, b)
            left[rows], right[rows] = a, b
            self._between(rows, (rows - a) / (b - a), prev, b_face, box, score, count, rank, pending)
            a, prev = b, b_face
        plan = _Plan(box, score, count, rank, points, key, cuts, pending, left, right, state.follow)
        last = n - 1
        has_last = bool(np.isfinite(box[last]).all())
        after = replace(state, since=0, thumb=thumbs[last], box=box[last].copy() if has_last else None,
                        score=float(score[last]), found=int(count[last]), rank=int(rank[last]),
                        follow=None if follow is None else np.array(follow, dtype=np.float64), plan=plan)
        return plan.detections(), after

    def _choose(self, found: Detections, row: int, follow: np.ndarray | None) -> int | None:
        """Packed position in ``found`` of the face kept in its frame ``row``, or None."""
        members = np.flatnonzero(found.frame_rows == row)
        scores = found.scores[members]
        if not np.isfinite(scores).any():
            return None
        if self.keep_person == KeepPerson.CONTINUITY:
            return int(members[continuing_face(follow, found.boxes_img_ydown[members], scores)])
        return int(members[reference_order(scores)[0]])

    @staticmethod
    def _found_and_rank(found: Detections, row: int, j: int) -> tuple[int, int]:
        members = np.flatnonzero(found.frame_rows == row)
        local = int(np.flatnonzero(members == j)[0])
        return len(members), int(np.flatnonzero(reference_order(found.scores[members]) == local)[0])

    @staticmethod
    def _between(r, t, a_face, b_face, box, score, count, rank, pending) -> None:
        """Frames ``r`` (int64 (R,)) between two keyframes, fractions ``t`` (float64 (R,)) of the
        way from keyframe face ``a_face`` to ``b_face`` (box, score, faces found, rank): the
        interpolated box, or pending (re-detect), or none. All frames of the span at once."""
        if not len(r):
            return
        a_box, b_box = a_face[0], b_face[0]
        a_has, b_has = bool(np.isfinite(a_box).all()), bool(np.isfinite(b_box).all())
        if a_has and b_has and continues(a_box, b_box):
            box[r] = (1 - t)[:, None] * a_box + t[:, None] * b_box
            score[r] = min(a_face[1], b_face[1])
            count[r] = max(a_face[2], b_face[2])
            rank[r] = max(a_face[3], b_face[3])
        elif a_has or b_has:
            pending[r] = True

    # ------------------------------------------------------------------ verify

    def verify(self, frames: FrameBatch, faces: Detections, landmarks: Landmarks,
               state: KeyframeState) -> np.ndarray:
        """int64 (R,) the frames to detect again (see the module's text)."""
        plan = state.plan
        if plan is None or len(frames) == 0:
            return np.zeros(0, dtype=np.int64)
        rel, conf = self._key_measures(plan, landmarks, state)
        tracked = np.isfinite(plan.box).all(axis=1) & ~plan.key
        lost = plan.pending.copy()
        lost |= tracked & ~landmarks.valid.astype(bool)

        conf_now = (np.full(len(frames), np.nan) if landmarks.confidence is None
                    else landmarks.confidence.astype(np.float64))
        with _quiet():
            conf_keys = np.nanmin(np.stack([conf[plan.left], conf[plan.right]]), axis=0)
        dropped = np.isfinite(conf_now) & (
            (np.isfinite(conf_keys) & (conf_now < CONFIDENCE_DROP * conf_keys)) | (conf_now < self.min_confidence))
        lost |= tracked & dropped

        rows = np.flatnonzero(tracked & landmarks.valid.astype(bool))
        if rows.size:
            t = (rows - plan.left[rows]) / (plan.right[rows] - plan.left[rows])
            ra, rb = rel[plan.left[rows]], rel[plan.right[rows]]
            ra = np.where(np.isfinite(ra), ra, rb)
            rb = np.where(np.isfinite(rb), rb, ra)
            rel_r = (1 - t)[:, None] * ra + t[:, None] * rb
            seen = implied_box(landmark_box(landmarks.points_img_ydown[rows]), rel_r)
            known = np.isfinite(seen).all(axis=1)
            with _quiet():  # rows without a landmark box (NaN) are not compared: IoU 1
                iou = np.where(known, pair_iou(plan.box[rows], seen), 1.0)
            height, width = frames.images.shape[1:3]
            where = np.where(known[:, None], seen, plan.box[rows])
            lost[rows] |= (iou < DRIFT_MIN_IOU) | (inside_fraction(where, width, height) < LEAVE_MIN_INSIDE)
        return np.flatnonzero(lost).astype(np.int64)

    @staticmethod
    def _key_measures(plan: _Plan, landmarks: Landmarks, state: KeyframeState) -> tuple[np.ndarray, np.ndarray]:
        """At each keyframe with a face, the landmarks' box relative to its box (float64 (B+1, 4),
        :func:`relative`) and the landmark confidence (float64 (B+1,)); NaN elsewhere. Row ``r``
        is frame ``r``; the extra last row, reached as row -1, the previous batch's last keyframe."""
        n = len(plan.box)
        rel = np.full((n + 1, 4), np.nan)
        conf = np.full(n + 1, np.nan)
        keys = np.flatnonzero(plan.key & np.isfinite(plan.box).all(axis=1) & landmarks.valid.astype(bool))
        rel[keys] = relative(plan.box[keys], landmark_box(landmarks.points_img_ydown[keys]))
        if landmarks.confidence is not None:
            conf[keys] = landmarks.confidence[keys]
        if state.rel is not None:
            rel[-1] = state.rel
        conf[-1] = state.confidence
        rel[~(np.isfinite(rel).all(axis=1) & (rel[:, 2] > rel[:, 0]) & (rel[:, 3] > rel[:, 1]))] = np.nan
        return rel, conf

    # ------------------------------------------------------------------ merge

    def merge(self, frames: FrameBatch, faces: Detections, landmarks: Landmarks, rows: np.ndarray,
              found: Detections, state: KeyframeState) -> tuple[Detections, KeyframeState]:
        """The faces after re-detecting ``rows`` (continuity as on keyframes), and the state after
        the batch (the last keyframe's landmark measures; the plan dropped)."""
        plan = state.plan
        if plan is None:
            return faces, state
        box, score = plan.box.copy(), plan.score.copy()
        count, rank = plan.found.copy(), plan.rank.copy()
        points = None if plan.points is None and found.points_img_ydown is None else (
            plan.points.copy() if plan.points is not None
            else np.full((len(box), *found.points_img_ydown.shape[1:]), np.nan, np.float32))
        again = dict(zip(np.asarray(rows, dtype=np.int64).tolist(), range(len(rows)), strict=True))
        follow = plan.follow
        cut = plan.cut.tolist()  # Python lists: this loop runs once a frame
        finite = np.isfinite(box).all(axis=1).tolist()
        for r in range(len(box)):
            if cut[r]:
                follow = None
            if r in again:
                box[r], score[r], count[r], rank[r] = np.nan, np.nan, 0, -1
                if points is not None:
                    points[r] = np.nan
                j = self._choose(found, again[r], follow)
                if j is not None:
                    box[r], score[r] = found.boxes_img_ydown[j], found.scores[j]
                    count[r], rank[r] = self._found_and_rank(found, again[r], j)
                    if points is not None and found.points_img_ydown is not None:
                        points[r] = found.points_img_ydown[j]
                finite[r] = bool(np.isfinite(box[r]).all())
            if finite[r]:
                follow = box[r]
        merged = replace(plan, box=box, score=score, found=count, rank=rank, points=points)
        last = len(box) - 1
        rel, conf = self._key_measures(plan, landmarks, state)
        after = replace(state, plan=None, rel=None if not np.isfinite(rel[last]).all() else rel[last].copy(),
                        confidence=float(conf[last]),
                        follow=None if follow is None else np.array(follow, dtype=np.float64))
        return merged.detections(), after


def keyframe_tracker(detect_every: int = DEFAULT_DETECT_EVERY,
                     keep_person: KeepPerson = KeepPerson.CONTINUITY) -> KeyframeTracker:
    """The fast path's tracker (:class:`KeyframeTracker`), for ``engine/fast.py``."""
    return KeyframeTracker(detect_every, keep_person)
