"""engine.landmarks.mtcnn_gpu: R-Net/O-Net refinement of a box against facenet-pytorch's full MTCNN.

Real MTCNN weights (bundled with facenet-pytorch), real frames of the shared test video and
the shared photos, on the CPU. Errors are reported (log, INFO) in pixels and in % of the
inter-ocular distance (IOD: full MTCNN's eye-to-eye distance in that frame).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from engine.landmarks.base import NO_FACE
from engine.sources import iter_frames
from engine.stages.detect import Detector, best_face_per_frame
from engine.stages.landmark import Landmarker
from engine.structures import Detections, FrameBatch

pytest.importorskip("facenet_pytorch", reason="facenet-pytorch not installed (the MTCNN weights ship with it)")

from engine.landmarks import mtcnn_gpu
from engine.landmarks.mtcnn import MtcnnLandmarker
from engine.landmarks.mtcnn_gpu import RefineMtcnn

log = logging.getLogger(__name__)

VIDEO_FRAMES = 16
IMAGE_NAMES = ("000002.jpg", "000006.jpg", "000031.jpg", "015259.jpg", "vd006.png")
# Documented bounds (docs/compatibility.md, "Fast path: MTCNN refinement"), as % of the IOD.
# Full MTCNN itself moves its points by a few pixels depending on which P-Net candidate wins its
# final NMS; refinement starts from a different O-Net input box, so it lands within that noise.
SAME_FRAME_MAX_PCT, SAME_FRAME_MEAN_PCT = 10.0, 4.0
TRACKED_MAX_PCT, TRACKED_MEAN_PCT = 10.0, 4.0
DETECT_MIN_IOU = 0.8


def _batch(images: np.ndarray) -> FrameBatch:
    n = len(images)
    return FrameBatch(images, np.arange(n, dtype=np.int64), np.arange(n) / 25.0)


def _one_face_per_frame(boxes: np.ndarray, rows: np.ndarray, num_frames: int) -> Detections:
    return Detections(np.asarray(boxes, dtype=np.float64), np.ones(len(rows)),
                      np.asarray(rows, dtype=np.int64), num_frames)


@pytest.fixture(scope="module")
def refiner() -> RefineMtcnn:
    return RefineMtcnn("cpu")


@pytest.fixture(scope="module")
def exact() -> MtcnnLandmarker:
    return MtcnnLandmarker("cpu", batch_frames=False)


@pytest.fixture(scope="module")
def video(test_video, exact):
    """(frames, full MTCNN's best face per frame) of the first VIDEO_FRAMES frames."""
    batch = next(iter_frames(test_video, VIDEO_FRAMES))
    full = best_face_per_frame(exact.detect(batch))
    assert full.face_of_frame().min() >= 0, "full MTCNN misses a face in the test video"
    return batch, full


@pytest.fixture(scope="module")
def photos(test_images, exact):
    """[(name, frame batch of one, full MTCNN's best face)] for the shared photos."""
    out = []
    for name in IMAGE_NAMES:
        batch = next(iter_frames(test_images / name, 1))
        out.append((name, batch, best_face_per_frame(exact.detect(batch))))
    return out


def _errors(points: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(px (B, 5), % of IOD (B, 5)) point errors against ``reference`` (B, 5, 2)."""
    px = np.linalg.norm(points.astype(np.float64) - reference, axis=2)
    iod = np.linalg.norm(reference[:, 1] - reference[:, 0], axis=1)
    return px, 100 * px / iod[:, None]


def _report(what: str, px: np.ndarray, pct: np.ndarray) -> None:
    log.info("%s: %d frames, max %.2f px (%.2f%% IOD), mean %.2f px (%.2f%% IOD)",
             what, len(px), px.max(), pct.max(), px.mean(), pct.mean())


def test_is_a_landmarker_with_a_detector(refiner):
    assert isinstance(refiner, Landmarker) and refiner.name == "mtcnn" and refiner.num_points == 5
    assert isinstance(refiner.detector, Detector) and refiner.detector.name == "mtcnn"


def test_crop_and_area_resampling_match_facenet():
    """The batched crop + averaging matrices equal facenet's pad + interpolate(mode="area")."""
    import torch
    from facenet_pytorch.models.utils.detect_face import imresample, pad

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 90, 70, 3), dtype=np.uint8)
    boxes = np.array([[-10.7, 5.2, 40.9, 60.1], [20.3, 30.8, 69.5, 89.9], [3.5, 4.5, 13.2, 14.9]])
    rows = np.array([0, 1, 1])
    regions = mtcnn_gpu.crop_regions(boxes, 70, 90)
    y, ey, x, ex = pad(torch.from_numpy(boxes.astype(np.float32)), 70, 90)
    np.testing.assert_array_equal(regions, np.stack([x - 1, y - 1, ex, ey], axis=1))
    windows = mtcnn_gpu.gather_windows(images, rows, regions)
    assert windows.shape[1:3] == tuple((regions[:, 2:] - regions[:, :2]).max(axis=0)[::-1])  # only the boxes
    for k, (row, (x0, y0, x1, y1)) in enumerate(zip(rows, regions, strict=True)):
        crop = torch.from_numpy(images[row, y0:y1, x0:x1]).permute(2, 0, 1)[None].float()
        want = imresample(crop, (24, 24))[0].numpy()
        ay = mtcnn_gpu.area_matrix(np.array([y1 - y0]), 24, windows.shape[1])[0].float().numpy()
        ax = mtcnn_gpu.area_matrix(np.array([x1 - x0]), 24, windows.shape[2])[0].float().numpy()
        got = np.einsum("ih,hwc,jw->cij", ay, windows[k].astype(np.float32), ax)
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_onet_stage_reproduces_facenet_third_stage(refiner, exact, video, monkeypatch):
    """Given the square boxes facenet feeds O-Net, the batched stage gives facenet's own points."""
    import facenet_pytorch.models.utils.detect_face as facenet

    seen = []

    def recording_pad(boxes, w, h):
        seen.append(boxes[:, :4].cpu().numpy().astype(np.float64))
        return original(boxes, w, h)

    original = facenet.pad
    monkeypatch.setattr(facenet, "pad", recording_pad)
    batch, _ = video
    for i in range(3):
        seen.clear()
        boxes, _, points = exact._net.detect(batch.images[i : i + 1], landmarks=True)
        candidates = seen[-1]  # the second pad call: O-Net's input boxes
        pts, _, final = refiner.onet_stage(batch.images, np.full(len(candidates), i), candidates)
        for box, want in zip(np.asarray(boxes[0], dtype=np.float64), np.asarray(points[0], dtype=np.float64),
                             strict=True):
            k = int(np.argmin(np.abs(final - box).max(axis=1)))
            np.testing.assert_allclose(final[k], box, atol=1e-2)
            np.testing.assert_allclose(pts[k], want, atol=1e-2)


def test_refine_on_same_frame_box_matches_full_mtcnn(refiner, video, photos):
    """(a) The box full MTCNN found in a frame, refined: points close to full MTCNN's."""
    batch, full = video
    refined = refiner.refine(batch, full)
    assert refined.landmarks.valid.all()
    assert (refined.probability >= 0.7).all() and np.array_equal(refined.landmarks.confidence,
                                                                 refined.probability.astype(np.float32))
    px, pct = _errors(refined.landmarks.points_img_ydown, full.points_img_ydown.astype(np.float64))
    _report("same-frame box, video", px, pct)
    assert pct.max() < SAME_FRAME_MAX_PCT and pct.mean() < SAME_FRAME_MEAN_PCT
    for name, one, face in photos:
        lm = refiner(one, face)
        assert lm.valid.tolist() == [True], name
        px, pct = _errors(lm.points_img_ydown, face.points_img_ydown.astype(np.float64))
        _report(f"same-frame box, {name}", px, pct)
        assert pct.max() < SAME_FRAME_MAX_PCT, name


def test_refine_on_previous_frame_box_tracks(refiner, video):
    """(b) Tracking: frame t+1 refined on frame t's box (full MTCNN's, then refinement's own, chained)."""
    batch, full = video
    n = len(batch)
    shifted = dataclasses.replace(full.take(np.arange(n - 1)), frame_rows=np.arange(1, n, dtype=np.int64))
    refined = refiner.refine(batch, shifted)
    assert refined.landmarks.valid.tolist() == [False] + [True] * (n - 1)  # frame 0 had no box
    ref = full.points_img_ydown[1:].astype(np.float64)
    px, pct = _errors(refined.landmarks.points_img_ydown[1:], ref)
    _report("previous frame's full-MTCNN box, video", px, pct)
    assert pct.max() < TRACKED_MAX_PCT and pct.mean() < TRACKED_MEAN_PCT

    box, points = full.boxes_img_ydown[:1], []  # a tracker carrying refinement's own box
    for i in range(1, n):
        one = refiner.refine(_batch(batch.images[i : i + 1]), _one_face_per_frame(box, [0], 1))
        assert one.landmarks.valid.all(), f"lost the face at frame {i}"
        box = one.boxes_img_ydown
        points.append(one.landmarks.points_img_ydown[0])
    px, pct = _errors(np.stack(points), ref)
    _report(f"chained over {n - 1} frames, video", px, pct)
    assert pct.max() < TRACKED_MAX_PCT and pct.mean() < TRACKED_MEAN_PCT


def test_box_without_a_face_is_no_face(refiner, video):
    """(c) A box moved off the face, a black frame, a box outside the frame, a NaN box: no_face."""
    batch, full = video
    frame = batch.images[0]
    h, w = frame.shape[:2]
    box = full.boxes_img_ydown[0]
    side = box[2] - box[0]
    corner = np.array([0.0, h - side / 2, side / 2, h])  # bottom-left corner: shoulders/background
    images = np.stack([frame, frame, np.zeros_like(frame), frame, frame, frame])
    boxes = np.stack([box, corner, box, box + np.array([w + 50, 0, w + 50, 0]), np.full(4, np.nan), box])
    rows = np.array([0, 1, 2, 3, 4])  # frame 5: no box at all
    refined = refiner.refine(_batch(images), _one_face_per_frame(boxes[:5], rows, 6))
    lm = refined.landmarks
    assert lm.valid.tolist() == [True, False, False, False, False, False]
    assert lm.reason == ("",) + (NO_FACE,) * 5
    assert np.isnan(lm.points_img_ydown[1:]).all() and np.isnan(refined.boxes_img_ydown[1:]).all()
    assert (refined.probability[1:3] < 0.7).all() and np.isnan(refined.probability[3:]).all()
    assert np.isnan(lm.confidence[1:]).all()
    empty = refiner(_batch(frame[:0]), Detections.empty(0))
    assert empty.points_img_ydown.shape == (0, 5, 2)


def test_batch_equals_one_by_one(refiner, video, monkeypatch):
    """(d) Refining N frames in one batch gives each frame's result alone (float32 rounding)."""
    batch, full = video
    # boxes of different sizes in one batch: the padded windows differ per face
    boxes = full.boxes_img_ydown + np.linspace(-8, 8, len(full))[:, None] * [1, 1, -1, -1]
    faces = dataclasses.replace(full, boxes_img_ydown=boxes)
    together = refiner.refine(batch, faces)
    for i in range(len(batch)):
        alone = refiner.refine(_batch(batch.images[i : i + 1]), _one_face_per_frame(boxes[i : i + 1], [0], 1))
        np.testing.assert_allclose(together.landmarks.points_img_ydown[i], alone.landmarks.points_img_ydown[0],
                                   atol=1e-3)
        np.testing.assert_allclose(together.boxes_img_ydown[i], alone.boxes_img_ydown[0], atol=1e-3)
        np.testing.assert_allclose(together.probability[i], alone.probability[0], atol=1e-5)
    assert together.detections().frame_rows.tolist() == list(range(len(batch)))
    monkeypatch.setattr(mtcnn_gpu, "WINDOW_PIXELS", 1)  # every window uploaded and resampled alone
    grouped = refiner.refine(batch, faces)
    np.testing.assert_allclose(grouped.landmarks.points_img_ydown, together.landmarks.points_img_ydown, atol=1e-3)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area - inter)


@pytest.mark.parametrize("side", [320, 256])
def test_downscaled_detector_boxes_match_full_resolution(video, photos, side):
    """(e) Full MTCNN on frames shrunk to ``side`` px finds the full-resolution boxes (IoU)."""
    small = RefineMtcnn("cpu", detect_max_side=side)
    batch, full = video
    found = best_face_per_frame(small.detector(batch))
    assert found.frame_rows.tolist() == list(range(len(batch)))
    iou = _iou(found.boxes_img_ydown, full.boxes_img_ydown)
    px, pct = _errors(found.points_img_ydown, full.points_img_ydown.astype(np.float64))
    log.info("detector at %d px, video: IoU min %.3f mean %.3f", side, iou.min(), iou.mean())
    _report(f"detector at {side} px, points, video", px, pct)
    assert iou.min() > DETECT_MIN_IOU
    refined = small.refine(batch, found)  # keyframe: refine the shrunk detector's box at full resolution
    px, pct = _errors(refined.landmarks.points_img_ydown, full.points_img_ydown.astype(np.float64))
    _report(f"refined on the {side} px detector's box, video", px, pct)
    assert pct.max() < SAME_FRAME_MAX_PCT and pct.mean() < SAME_FRAME_MEAN_PCT
    for name, one, face in photos:
        got = best_face_per_frame(small.detector(one))
        assert len(got) == 1, name
        iou = _iou(got.boxes_img_ydown, face.boxes_img_ydown)
        log.info("detector at %d px, %s: IoU %.3f", side, name, iou[0])
        assert iou.min() > DETECT_MIN_IOU, name


def test_detector_without_downscaling_is_full_mtcnn(refiner, video):
    """Frames no larger than ``detect_max_side`` go to full MTCNN unchanged."""
    batch, full = video
    found = best_face_per_frame(refiner.detector(_batch(batch.images[:2])))
    np.testing.assert_allclose(found.boxes_img_ydown, full.boxes_img_ydown[:2], atol=0.01)
    np.testing.assert_allclose(found.points_img_ydown, full.points_img_ydown[:2], atol=0.01)


def test_call_without_faces_uses_the_detector(refiner, video):
    batch, full = video
    lm = refiner(_batch(batch.images[:2]))
    assert lm.valid.all()
    px, _ = _errors(lm.points_img_ydown, full.points_img_ydown[:2].astype(np.float64))
    assert px.max() < 0.1 * np.linalg.norm(full.points_img_ydown[0, 1] - full.points_img_ydown[0, 0])


def test_integral_crops_match_facenet_area_resampling():
    """The keyframe detector's batched crops (integral images) equal facenet's per-box interpolate(mode="area")."""
    import torch
    from facenet_pytorch.models.utils.detect_face import imresample

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 90, 70, 3), dtype=np.uint8)
    boxes = np.array([[-10.7, 5.2, 40.9, 60.1], [20.3, 30.8, 69.5, 89.9], [3.5, 4.5, 13.2, 14.9], [0, 0, 70, 90]])
    rows = np.array([0, 1, 1, 0])
    regions = mtcnn_gpu.crop_regions(boxes, 70, 90)
    integral = torch.nn.functional.pad(torch.from_numpy(images).permute(0, 3, 1, 2).long().cumsum(2).cumsum(3),
                                       (1, 0, 1, 0))
    for size in (24, 48):
        got = mtcnn_gpu.integral_crops(integral, torch.from_numpy(rows), regions, size).numpy()
        for k, (row, (x0, y0, x1, y1)) in enumerate(zip(rows, regions, strict=True)):
            crop = torch.from_numpy(images[row, y0:y1, x0:x1]).permute(2, 0, 1)[None].float()
            np.testing.assert_allclose(got[k], imresample(crop, (size, size))[0].numpy(), rtol=1e-6, atol=1e-4)


def test_batched_keyframe_detector_matches_facenets_loop(video):
    """Batched R-/O-Net crops (the CUDA default) find the same faces as facenet-pytorch's own loop."""
    batch, _ = video
    loop = RefineMtcnn("cpu", batched_crops=False)
    batched = RefineMtcnn("cpu", batched_crops=True)
    frames = _batch(batch.images[:6])
    want, got = loop.detector(frames), batched.detector(frames)
    np.testing.assert_array_equal(got.frame_rows, want.frame_rows)
    np.testing.assert_allclose(got.boxes_img_ydown, want.boxes_img_ydown, atol=0.01)
    np.testing.assert_allclose(got.points_img_ydown, want.points_img_ydown, atol=0.01)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
    assert len(got) >= 6


@pytest.mark.parametrize("threshold", [0.6, 0.05, 0.999])
def test_pnet_candidates_are_facenets_first_stage_bit_for_bit(refiner, video, threshold):
    """All levels at once give facenet's boxes, scores, offsets and frames, in facenet's order:
    real frames and noise, at facenet's threshold, at a low one (hundreds of overlapping
    candidates, ties in score among them) and at one nothing but the face passes. Small frames:
    every level stays under the 1,000 boxes above which torchvision's NMS sorts a level without
    keeping the order of equal scores (facenet's order is not defined there; ``bench/gpu_checks.py``
    then asks for the same boxes and scores up to the order of ties)."""
    import torch

    from bench.gpu_checks import facenet_first_stage

    batch, _ = video
    rng = np.random.default_rng(3)
    frames = np.concatenate([batch.images[:4], rng.integers(0, 256, (2, *batch.images.shape[1:]), dtype=np.uint8)])
    imgs = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    imgs = torch.nn.functional.interpolate(imgs, size=(144, 144), mode="area")  # small: a quick test
    scales = [0.6 * 0.709**k for k in range(6)]
    grids: dict = {}
    with torch.inference_mode():
        want_boxes, want_frames = facenet_first_stage(refiner._net.pnet, imgs, scales, threshold)
        got_boxes, got_frames = mtcnn_gpu.pnet_candidates(refiner._net.pnet, imgs, scales, threshold)
        cached = [mtcnn_gpu.pnet_candidates(refiner._net.pnet, imgs[k:], scales, threshold, grids) for k in (0, 3)]
    if threshold < 0.5:
        assert len(want_boxes) > 500 and len(torch.unique(want_boxes[:, 4])) < len(want_boxes)  # ties in score
    assert len(want_boxes) > 0
    assert torch.equal(got_frames, want_frames)
    assert torch.equal(got_boxes, want_boxes)
    assert len(grids) == 1  # one pyramid: its cells made once, for 6 frames then for 3
    assert torch.equal(cached[0][0], want_boxes) and torch.equal(cached[0][1], want_frames)
    with torch.inference_mode():
        want_3 = facenet_first_stage(refiner._net.pnet, imgs[3:], scales, threshold)
    assert torch.equal(cached[1][0], want_3[0]) and torch.equal(cached[1][1], want_3[1])


def test_pnet_candidates_with_nothing_above_the_threshold_are_empty(refiner):
    import torch

    imgs = torch.zeros((2, 3, 60, 80))
    with torch.inference_mode():
        boxes, frames = mtcnn_gpu.pnet_candidates(refiner._net.pnet, imgs, [0.6, 0.4], 1.01)
    assert boxes.shape == (0, 9) and frames.shape == (0,) and frames.dtype == torch.int64


@pytest.mark.parametrize("count", [300, 3000])  # torchvision's two ways on a CPU: under and over 1,000 boxes
def test_grouped_nms_keeps_what_batched_nms_keeps(count, monkeypatch):
    """Integer corners, many groups, many ties in score: the same boxes kept, in the same order of
    scores; the fallback (corners too large to shift exactly) is batched_nms itself."""
    import torch
    from torchvision.ops.boxes import batched_nms

    rng = np.random.default_rng(count)
    xy = rng.integers(0, 200, (count, 2))
    size = rng.integers(12, 60, (count, 1))
    boxes = torch.from_numpy(np.concatenate([xy, xy + size], 1)).float()
    scores = torch.from_numpy(rng.integers(0, 20, count) / 20).float()  # ties in score
    groups = torch.from_numpy(rng.integers(0, 40, count))
    want = batched_nms(boxes, scores, groups, 0.5)
    got = mtcnn_gpu.grouped_nms(boxes, scores, groups, 0.5, 40 * 261)
    assert sorted(got.tolist()) == sorted(want.tolist()) and len(want) < count
    assert torch.equal(scores[got], scores[want])
    monkeypatch.setattr(mtcnn_gpu, "EXACT_FLOAT32", 100)
    assert torch.equal(mtcnn_gpu.grouped_nms(boxes, scores, groups, 0.5, 40 * 261), want)
