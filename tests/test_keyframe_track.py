"""The fast path's keyframe tracker (issue 12): detections on keyframes only, re-detection where
tracking is lost (a cut, the face leaving, a drop in confidence, drift), one person kept, resume.

Faces are bright squares on a dark synthetic scene; the stub detector finds them (connected
bright pixels) and records every call; the stub landmarker marks the bright pixels inside the
box it is given, so landmarks follow the real square and drift from a wrong box.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from engine import Engine, EngineConfig
from engine.config import KeepPerson
from engine.landmarks.base import landmarks_from_list
from engine.stages.detect import best_face_per_frame
from engine.stages.keyframe import (
    CUT_MIN_MAD,
    KeyframeTracker,
    cut_before,
    keyframe_tracker,
    thumbnails,
)
from engine.stages.track import DetectEveryFrame, FollowPerson, mark_faces
from engine.structures import Detections, FaceChoice, FrameBatch
from tests.example_backend import template_in_box

W, H = 192, 112
FACE = 24  # side of a face square, px


# --- synthetic scenes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Face:
    """A face square: top-left corner per frame (None: absent) and brightness (its score)."""

    corner: Callable[[int], tuple[float, float] | None]
    value: int = 230


def background(kind: str) -> np.ndarray:
    """uint8 (H, W, 3): ``"ramp"`` a horizontal ramp, ``"checks"`` 16 px checks (dark: faces stay the brightest)."""
    if kind == "ramp":
        grey = np.tile(np.linspace(0, 100, W), (H, 1))
    else:
        yy, xx = np.mgrid[:H, :W]
        grey = np.where(((yy // 16) + (xx // 16)) % 2 == 0, 10, 110)
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def scene(n: int, faces: list[Face], kind: str = "ramp") -> np.ndarray:
    """uint8 (n, H, W, 3)."""
    out = np.repeat(background(kind)[None], n, axis=0)
    for i in range(n):
        for f in faces:
            c = f.corner(i)
            if c is None:
                continue
            x, y = round(c[0]), round(c[1])
            out[i, max(y, 0):max(y + FACE, 0), max(x, 0):max(x + FACE, 0)] = f.value
    return out


def batches(images: np.ndarray, size: int, start: int = 0):
    for lo in range(start, len(images), size):
        hi = min(lo + size, len(images))
        yield FrameBatch(images[lo:hi], np.arange(lo, hi, dtype=np.int64), np.arange(lo, hi) / 25.0)


# --- stubs ---------------------------------------------------------------------------------------


@dataclass
class SquareDetector:
    """Finds bright squares (> 180 grey) of at least 40 px; score = brightness / 255. Records calls."""

    name: str = "squares"
    calls: list[list[int]] = field(default_factory=list)

    def __call__(self, frames: FrameBatch) -> Detections:
        self.calls.append([int(i) for i in frames.index])
        boxes, scores, rows = [], [], []
        for r, image in enumerate(frames.images):
            grey = image[..., 0].astype(np.int64)
            labels, _ = ndimage.label(grey > 180)
            for k, sl in enumerate(ndimage.find_objects(labels), start=1):
                mask = labels[sl] == k
                if mask.sum() < 40:
                    continue
                boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
                scores.append(grey[sl][mask].mean() / 255)
                rows.append(r)
        return Detections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64),
                          np.asarray(rows, dtype=np.int64), len(frames))

    @property
    def frames_detected(self) -> list[int]:
        return sorted(i for call in self.calls for i in call)


@dataclass
class SquareLandmarker:
    """Five points (Deep3D's template) in the bounding box of the bright pixels inside the given box;
    confidence 0.9, or 0.1 on the frames in ``low``. No bright pixel in the box: no face."""

    name: str = "squares"
    num_points: int = 5
    detector: SquareDetector | None = None
    low: frozenset[int] = frozenset()
    calls: list[list[int]] = field(default_factory=list)

    def __call__(self, frames: FrameBatch, faces: Detections | None = None) -> object:
        self.calls.append([int(i) for i in frames.index])
        if faces is None:
            faces = best_face_per_frame(self.detector(frames))
        where = faces.face_of_frame()
        per_frame, conf = [], []
        for r, j in enumerate(where):
            points = None
            if j >= 0:
                x1, y1, x2, y2 = (round(v) for v in faces.boxes_img_ydown[j])
                x1, y1 = max(x1, 0), max(y1, 0)
                ys, xs = np.nonzero(frames.images[r, y1:max(y2, y1), x1:max(x2, x1), 0] > 180)
                if len(xs) >= 10:
                    points = template_in_box(np.array([x1 + xs.min(), y1 + ys.min(), x1 + xs.max() + 1,
                                                       y1 + ys.max() + 1], dtype=np.float64))
            per_frame.append(points)
            conf.append(0.1 if int(frames.index[r]) in self.low else 0.9)
        return landmarks_from_list(per_frame, self.num_points, conf)

    def close(self) -> None:
        pass


@dataclass
class Run:
    """Per frame of a tracked video: the kept box (NaN: none), landmarks valid, the FaceChoice arrays."""

    boxes: np.ndarray
    valid: np.ndarray
    faces_found: np.ndarray
    kept_rank: np.ndarray
    state: object


def track(tracker, images: np.ndarray, detector, landmarker, batch: int = 32, state=None, start: int = 0) -> Run:
    """Every batch through :func:`mark_faces`, as the engine does."""
    state = tracker.initial_state() if state is None else state
    boxes, valid, found, rank = [], [], [], []
    for frames in batches(images, batch, start):
        faces, landmarks, state = mark_faces(tracker, frames, detector, landmarker, state)
        b = np.full((len(frames), 4), np.nan)
        where = faces.face_of_frame()
        b[where >= 0] = faces.boxes_img_ydown[where[where >= 0]]
        choice = FaceChoice.of(faces, len(frames), detector.name)
        boxes.append(b)
        valid.append(landmarks.valid)
        found.append(choice.faces_found)
        rank.append(choice.kept_rank)
    cat = np.concatenate
    return Run(cat(boxes), cat(valid), cat(found), cat(rank), state)


def truth(images: np.ndarray, value: int | None = None) -> np.ndarray:
    """(N, 4) the box of the square of brightness ``value`` (any bright one when None) per frame."""
    out = np.full((len(images), 4), np.nan)
    for i, image in enumerate(images):
        grey = image[..., 0]
        mask = grey > 180 if value is None else grey == value
        if mask.sum() >= 40:
            ys, xs = np.nonzero(mask)
            out[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return out


def steady(i: int) -> tuple[float, float]:
    return 20 + 1.5 * i, 30 + 0.5 * i


# --- (1) a steady face: detections on keyframes only ----------------------------------------------


def test_a_steady_face_is_detected_on_keyframes_only():
    images = scene(64, [Face(steady)])
    det, lm = SquareDetector(), SquareLandmarker()
    run = track(KeyframeTracker(8), images, det, lm, batch=32)
    # first frame, every 8 frames, the last frame of each batch of 32
    assert det.frames_detected == [0, 8, 16, 24, 31, 39, 47, 55, 63]
    assert len(det.calls) == 2  # one per batch: nothing was re-detected
    assert run.valid.all()
    assert np.abs(run.boxes - truth(images)).max() <= 1.0  # linear motion: interpolation is exact to rounding


def test_detect_every_one_detects_every_frame_and_matches_per_frame_detection():
    images = scene(20, [Face(steady)])
    det = SquareDetector()
    run = track(KeyframeTracker(1), images, det, SquareLandmarker(), batch=8)
    assert det.frames_detected == list(range(20))
    every = track(DetectEveryFrame(), images, SquareDetector(), SquareLandmarker(), batch=8)
    np.testing.assert_array_equal(run.boxes, every.boxes)


# --- (2) a scene cut: re-detection exactly at the cut ---------------------------------------------


@pytest.mark.parametrize(("cut", "keyframes"), [
    (20, [0, 8, 16, 19, 20, 28, 31, 39, 47]),  # the frames either side of the cut; the schedule restarts there
    (32, [0, 8, 16, 24, 31, 32, 40, 47]),  # a cut at a batch's first frame (the last thumbnail is carried)
])
def test_two_spliced_scenes_are_re_detected_exactly_at_the_cut(cut, keyframes):
    a = scene(cut, [Face(steady)], "ramp")
    b = scene(48 - cut, [Face(lambda i: (140 - i, 70))], "checks")
    images = np.concatenate([a, b])
    assert cut_before(None, thumbnails(images)).nonzero()[0].tolist() == [cut]
    det = SquareDetector()
    run = track(KeyframeTracker(8), images, det, SquareLandmarker(), batch=32)
    assert det.frames_detected == keyframes
    assert len(det.calls) == 2  # no frame needed a second look
    np.testing.assert_allclose(run.boxes, truth(images), atol=1.0)


def test_real_frames_spliced_with_a_mirrored_shifted_copy_are_cut_exactly_there(test_video):
    from tests.media import first_frames

    frames = np.stack(first_frames(test_video, 40))
    other = np.roll(frames[20:], 40, axis=2)[:, :, ::-1]
    images = np.ascontiguousarray(np.concatenate([frames[:20], other]))
    cuts = cut_before(None, thumbnails(images))
    assert cuts.nonzero()[0].tolist() == [20], "a cut in the real clip's own motion, or none at the splice"
    diffs = np.abs(np.diff(thumbnails(frames), axis=0)).mean(axis=(1, 2))
    assert diffs.max() < CUT_MIN_MAD / 1.5  # the threshold keeps a margin over the clip's own motion

    width = images.shape[2]
    box_a = np.array([180.0, 120, 330, 320])
    box_b = np.array([width - (box_a[2] + 40), 120, width - (box_a[0] + 40), 320])

    class Scripted(SquareDetector):
        def __call__(self, frames):
            self.calls.append([int(i) for i in frames.index])
            boxes = [box_a if i < 20 else box_b for i in frames.index]
            return Detections(np.array(boxes), np.full(len(boxes), 0.99), np.arange(len(boxes)), len(boxes))

    class InBox:
        name, num_points, detector = "in-box", 5, None

        def __call__(self, frames, faces=None):
            where = faces.face_of_frame()
            return landmarks_from_list([template_in_box(faces.boxes_img_ydown[j]) for j in where], 5,
                                       np.full(len(where), 0.9))

    det = Scripted()
    run = track(KeyframeTracker(8), images, det, InBox(), batch=32)
    assert det.frames_detected == [0, 8, 16, 19, 20, 28, 31, 39]
    assert len(det.calls) == 2
    np.testing.assert_allclose(run.boxes[:20], np.tile(box_a, (20, 1)))
    np.testing.assert_allclose(run.boxes[20:], np.tile(box_b, (20, 1)))


# --- (3) the face leaves the frame and comes back -------------------------------------------------


def test_a_face_that_leaves_the_frame_is_no_face_there_and_re_detected_when_it_returns():
    def corner(i):
        if i < 40:
            return 100 + 3 * i, 40  # reaches the right edge at frame 23, gone from frame 31
        if i < 45:
            return None
        return 30, 50  # back, elsewhere

    images = scene(64, [Face(corner)])
    det = SquareDetector()
    run = track(KeyframeTracker(8), images, det, SquareLandmarker(), batch=32)
    expected = truth(images)
    gone = ~np.isfinite(expected).all(axis=1)
    assert gone.nonzero()[0].tolist() == list(range(31, 45))
    assert not run.valid[gone].any()
    assert np.isnan(run.boxes[gone]).all()
    assert run.valid[~gone].all()
    # the detector's box of a face cut by the frame's edge shrinks, a little faster than linearly
    np.testing.assert_allclose(run.boxes[~gone], expected[~gone], atol=3.0)
    # keyframe 24 has the face, 31 not: 25-30 were detected again (in one call); 39 not, 47 again
    # has it: 40-46 too
    assert det.calls == [[0, 8, 16, 24, 31], list(range(25, 31)), [39, 47, 55, 63], list(range(40, 47))]


# --- (4) a second face appears: the same person is kept -------------------------------------------


def test_a_second_more_confident_face_does_not_take_over():
    first = Face(steady, value=210)
    second = Face(lambda i: (150, 20 + i) if i >= 10 else None, value=250)  # more confident
    images = scene(64, [first, second])
    det = SquareDetector()
    run = track(keyframe_tracker(8, KeepPerson.CONTINUITY), images, det, SquareLandmarker(), batch=32)
    np.testing.assert_allclose(run.boxes, truth(images, 210), atol=1.0)
    assert run.valid.all()
    assert (run.faces_found[10:] == 2).all() and (run.kept_rank[10:] == 1).all()
    assert (run.faces_found[:9] == 1).all() and (run.kept_rank[:9] == 0).all()
    # the reference's rule (the most confident face) switches person: the test can tell
    other = track(keyframe_tracker(8, KeepPerson.REFERENCE), images, SquareDetector(), SquareLandmarker(), batch=32)
    assert np.nanmax(np.abs(other.boxes[16:] - truth(images, 250)[16:])) <= 1.0


# --- (5) confidence drop and drift: re-detect ------------------------------------------------------


def test_a_drop_in_landmark_confidence_is_re_detected():
    images = scene(32, [Face(steady)])
    det = SquareDetector()
    track(KeyframeTracker(8), images, det, SquareLandmarker(low=frozenset({11, 12})), batch=32)
    assert det.calls == [[0, 8, 16, 24, 31], [11, 12]]


def test_a_face_that_moves_off_the_interpolated_box_is_re_detected():
    def corner(i):
        x, y = steady(i)
        return (x + 12, y) if i in (4, 5) else (x, y)  # half a face off the line between keyframes

    images = scene(16, [Face(corner)])
    det = SquareDetector()
    run = track(KeyframeTracker(8), images, det, SquareLandmarker(), batch=16)
    assert det.calls == [[0, 8, 15], [4, 5]]
    np.testing.assert_allclose(run.boxes, truth(images), atol=1.0)


def test_a_box_mostly_outside_the_frame_is_re_detected():
    """A detector may report a face's box past the frame's edge (S3FD does); where less than half
    of the tracked box is inside, the frame is detected again."""
    images = scene(16, [])
    outside = np.array([-16.0, 40, 8, 64])  # a third inside

    class Edge(SquareDetector):
        def __call__(self, frames):
            self.calls.append([int(i) for i in frames.index])
            n = len(frames)
            return Detections(np.tile(outside, (n, 1)), np.full(n, 0.99), np.arange(n), n)

    class InBox:
        name, num_points, detector = "in-box", 5, None

        def __call__(self, frames, faces=None):
            where = faces.face_of_frame()
            return landmarks_from_list([None if j < 0 else template_in_box(faces.boxes_img_ydown[j]) for j in where],
                                       5, np.full(len(where), 0.9))

    det = Edge()
    track(KeyframeTracker(8), images, det, InBox(), batch=16)
    assert det.calls == [[0, 8, 15], [*range(1, 8), *range(9, 15)]]


# --- (6) resume -----------------------------------------------------------------------------------


def assert_same_state(a, b) -> None:
    arrays_a, arrays_b = a.to_arrays(), b.to_arrays()
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def busy_scene() -> np.ndarray:
    """A cut, a second face, the face leaving and coming back: every rule at work."""
    a = scene(40, [Face(lambda i: (20 + 4 * i, 40) if i < 36 else None, 210),
                   Face(lambda i: (150, 80) if i >= 12 else None, 250)])
    b = scene(40, [Face(lambda i: (100 - i, 30) if not 10 <= i < 20 else None)], "checks")
    return np.concatenate([a, b])


def test_a_resumed_run_makes_the_same_choices_as_an_uninterrupted_one(tmp_path):
    images = busy_scene()
    tracker = KeyframeTracker(8)
    whole_det = SquareDetector()
    whole = track(tracker, images, whole_det, SquareLandmarker(), batch=16)

    first_det = SquareDetector()
    first = track(tracker, images[:48], first_det, SquareLandmarker(), batch=16)
    np.savez(tmp_path / "state.npz", **first.state.to_arrays())
    with np.load(tmp_path / "state.npz", allow_pickle=False) as z:
        restored = tracker.initial_state({k: z[k] for k in z.files})
    assert_same_state(restored, first.state)
    rest_det = SquareDetector()
    rest = track(tracker, images, rest_det, SquareLandmarker(), batch=16, state=restored, start=48)

    np.testing.assert_array_equal(np.concatenate([first.boxes, rest.boxes]), whole.boxes)
    np.testing.assert_array_equal(np.concatenate([first.faces_found, rest.faces_found]), whole.faces_found)
    np.testing.assert_array_equal(np.concatenate([first.kept_rank, rest.kept_rank]), whole.kept_rank)
    assert first_det.calls + rest_det.calls == whole_det.calls


@dataclass
class CropMeans:
    """A regressor stand-in (the network is not what is tested): each crop's mean colour, per row
    block of 8, as the first 3 × 28 coefficients, so the coefficients depend on every crop."""

    checkpoint_path: Path
    checkpoint_sha256: str = ""

    def predict(self, crops: np.ndarray) -> np.ndarray:
        out = np.zeros((len(crops), 257), dtype=np.float32)
        out[:, :84] = crops.reshape(len(crops), 28, 8, 224, 3).mean(axis=(2, 3)).reshape(len(crops), 84) / 255
        return out

    def numerics(self):
        return contextlib.nullcontext()


def test_the_engine_saves_and_restores_the_keyframe_state(tmp_path):
    import json

    from engine import Cancelled
    from tests.media import make_video

    images = busy_scene()[:24]
    clip = make_video(tmp_path / "busy.mp4", list(images), fps=25)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not read")
    cfg = EngineConfig(checkpoint=weights, landmarks="mtcnn", device="cpu", batch_size=8, formats=("npz",))
    state = tmp_path / "state"

    def engine_run(out: str, **kw):
        det = SquareDetector()
        with Engine(cfg, tracker=KeyframeTracker(8), detector=det, landmarker=SquareLandmarker(),
                    regressor=CropMeans(weights)) as engine:
            return engine.run(clip, tmp_path / out, **kw), det

    def saved_frames() -> int:
        meta = state / "state.json"
        return json.loads(meta.read_text())["frames"] if meta.is_file() else 0

    whole, whole_det = engine_run("whole")
    with pytest.raises(Cancelled):
        engine_run("part", state_dir=state, should_stop=lambda: saved_frames() >= 8)
    resumed, resumed_det = engine_run("part", state_dir=state)
    assert resumed.resumed_from >= 8
    # the schedule goes on where it stopped (a fresh state would detect the first frame again)
    assert resumed_det.calls == [c for c in whole_det.calls if c[0] >= resumed.resumed_from]
    a, b = np.load(whole.outputs["npz"]), np.load(resumed.outputs["npz"])
    for name in ("valid", "landmarks", "transform_params", "coeff", "faces_found", "kept_rank", "flags"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert len(whole_det.frames_detected) < len(images)  # it tracked, inside the engine too


# --- (7) batched detection, and the other trackers untouched ----------------------------------------


def test_the_detector_is_called_once_per_batch_per_kind():
    images = busy_scene()
    det, lm = SquareDetector(), SquareLandmarker()
    track(KeyframeTracker(8), images, det, lm, batch=16)
    per_batch = {}
    for call in det.calls:
        per_batch.setdefault(call[0] // 16, []).append(call)
    assert set(per_batch) == set(range(5))
    for b, calls in per_batch.items():
        assert 1 <= len(calls) <= 2, f"batch {b}: {calls}"
        assert all(i // 16 == b for call in calls for i in call)
        assert len(calls[0]) >= 2  # the keyframes of a batch together
    # the landmarker too: the whole batch once, the re-detected frames once more
    assert len(lm.calls) == len(det.calls)


@pytest.mark.parametrize("tracker", [DetectEveryFrame(), FollowPerson()], ids=lambda t: t.name)
def test_mark_faces_is_tracker_then_landmarker_for_the_other_trackers(tracker):
    images = busy_scene()[:16]
    frames = next(batches(images, 16))
    det, lm = SquareDetector(), SquareLandmarker()
    faces, landmarks, _ = mark_faces(tracker, frames, det, lm, tracker.initial_state())
    expected, _ = tracker(frames, SquareDetector(), tracker.initial_state())
    np.testing.assert_array_equal(faces.boxes_img_ydown, expected.boxes_img_ydown)
    assert det.calls == [list(range(16))] and lm.calls == [list(range(16))]
    np.testing.assert_array_equal(landmarks.valid, lm(frames, expected).valid)


def test_the_state_round_trips_through_its_arrays():
    tracker = KeyframeTracker(8)
    assert_same_state(tracker.initial_state(tracker.initial_state().to_arrays()), tracker.initial_state())
    with pytest.raises(ValueError, match="detect_every"):
        KeyframeTracker(0)



def test_pair_iou_equals_box_iou_row_by_row():
    """The vectorised row-wise IoU (the drift check) is the per-pair box_iou, bit for bit."""
    from engine.stages.track import box_iou, pair_iou

    rng = np.random.default_rng(4)
    a = rng.uniform(-50, 500, (400, 2))
    a = np.concatenate([a, a + rng.uniform(-5, 200, (400, 2))], axis=1)  # some inverted boxes
    b = a + rng.normal(0, 30, (400, 4))
    b[::9] = a[::9]  # identical
    b[1::11, 0] = a[1::11, 2]  # touching edges
    b[2::13] = np.nan
    got = pair_iou(a, b)
    want = np.array([box_iou(x, y[None])[0] for x, y in zip(a, b, strict=True)])
    np.testing.assert_array_equal(got, want)
    assert (got == 1).any() and (got == 0).any() and ((got > 0) & (got < 1)).any()


def test_between_interpolates_a_whole_span_like_frame_by_frame():
    """The span-at-once interpolation between two keyframes equals the per-frame formula, bit for bit."""
    from engine.stages.keyframe import KeyframeTracker

    rng = np.random.default_rng(8)
    for a, b in ((-1, 9), (3, 4), (5, 37)):
        corner = rng.uniform(100, 200, 2)
        a_box = np.concatenate([corner, corner + rng.uniform(40, 90, 2)])
        b_box = a_box + rng.normal(0, 3, 4)
        a_face, b_face = (a_box, 0.97, 2, 0), (b_box, 0.91, 1, 1)
        n = b + 1
        box, score = np.full((n, 4), np.nan), np.full(n, np.nan)
        count, rank, pending = np.zeros(n, np.int64), np.full(n, -1, np.int64), np.zeros(n, bool)
        rows = np.arange(a + 1, b)
        KeyframeTracker._between(rows, (rows - a) / (b - a), a_face, b_face, box, score, count, rank, pending)
        for r in range(a + 1, b):
            t = (r - a) / (b - a)
            np.testing.assert_array_equal(box[r], (1 - t) * a_box + t * b_box)
        assert np.all(score[rows] == 0.91) and np.all(count[rows] == 2) and np.all(rank[rows] == 1)
        assert not pending.any()


def test_landmarks_from_array_equals_landmarks_from_list():
    from engine.landmarks.base import landmarks_from_array

    rng = np.random.default_rng(9)
    pts = rng.uniform(-10, 900, (40, 5, 2))
    pts[::5] = np.nan
    pts[3, 2, 1] = np.inf
    conf = rng.uniform(0, 1, 40)
    want = landmarks_from_list([None if np.isnan(p).all() else p for p in pts], 5, confidence=conf)
    got = landmarks_from_array(pts, confidence=conf)
    np.testing.assert_array_equal(got.points_img_ydown, want.points_img_ydown)
    assert got.points_img_ydown.dtype == want.points_img_ydown.dtype
    np.testing.assert_array_equal(got.valid, want.valid)
    np.testing.assert_array_equal(got.confidence, want.confidence)
    assert got.reason == want.reason and not got.valid[3] and not got.valid[0]
