"""engine.landmarks.mtcnn_exact: facenet-pytorch's MTCNN bit for bit, all crops of a stage at once.

Real MTCNN weights (bundled with facenet-pytorch) on the CPU, frames of the shared test video,
the face pasted onto a 1080p canvas, and noise; every array must be equal, not close.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("facenet_pytorch", reason="facenet-pytorch not installed (the MTCNN weights ship with it)")

from engine.landmarks import mtcnn_exact
from engine.landmarks.mtcnn import MtcnnLandmarker, detect_faces
from engine.landmarks.mtcnn_gpu import float64_average
from engine.sources import iter_frames
from engine.structures import FrameBatch


def _facenet(thresholds=(0.6, 0.7, 0.7)):
    from facenet_pytorch.models.mtcnn import MTCNN

    return MTCNN(device="cpu", select_largest=False, keep_all=True, thresholds=list(thresholds))


def _assert_same(got, want) -> None:
    assert got.num_frames == want.num_frames
    for field in ("boxes_img_ydown", "scores", "frame_rows", "points_img_ydown"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b, err_msg=field)


@pytest.fixture(scope="module")
def frames(test_video) -> np.ndarray:
    """uint8 (8, 512, 512, 3): six frames of the shared clip and two of noise."""
    clip = next(iter_frames(test_video, 6)).images
    noise = np.random.default_rng(5).integers(0, 256, (2, *clip.shape[1:]), dtype=np.uint8)
    return np.concatenate([clip, noise])


@pytest.fixture(scope="module")
def rule() -> str:
    found = mtcnn_exact.area_rule("cpu")
    assert found in mtcnn_exact.AREA_RULES
    return found


def test_the_probe_rejects_a_rule_that_rounds_differently(monkeypatch):
    """One float64 division (the keyframe detector's averages) is not the kernel's float32 rule:
    the probe must notice it, so a torch that changed its kernel cannot slip through."""
    monkeypatch.setattr(mtcnn_exact, "AREA_RULES", {"float64": float64_average})
    assert mtcnn_exact.area_rule("cpu") is None


@pytest.mark.parametrize("thresholds", [(0.6, 0.7, 0.7), (0.1, 0.1, 0.1)])
def test_detection_equals_facenets_bit_for_bit(frames, rule, thresholds):
    """Boxes, probabilities, points and their order equal facenet-pytorch's ``detect`` at its
    thresholds and at low ones (many candidates per frame, noise frames included), in calls of
    three frames (the last call shorter)."""
    net = _facenet(thresholds)
    want = detect_faces(net, frames, 3)
    got = mtcnn_exact.detect_faces(net, frames, 3, "cpu", rule)
    _assert_same(got, want)
    assert got.face_of_frame()[:6].min() >= 0, "the shared clip's face is missed"
    if thresholds[0] < 0.6:
        assert len(got) > len(frames), "low thresholds should leave several faces in some frames"


def test_face_on_a_1080p_canvas(test_video, rule):
    """The dataset benchmark's kind of frame: the face 864 px tall on a grey 1920×1080 canvas
    (~160 candidates per frame reach R-Net)."""
    import cv2

    face = cv2.resize(next(iter_frames(test_video, 1)).images[0], (864, 864), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((2, 1080, 1920, 3), 96, np.uint8)
    canvas[0, 100:964, 500:1364] = face
    canvas[1, 180:1044, 560:1424] = face
    net = _facenet()
    got = mtcnn_exact.detect_faces(net, canvas, 2, "cpu", rule)
    _assert_same(got, detect_faces(net, canvas, 2))
    assert len(got) >= 2


def test_windows_too_large_for_exact_sums_go_through_facenet(frames, rule, monkeypatch):
    """Where float32 could not hold a window's sum exactly, :func:`detect` declines and the
    chunk goes through facenet-pytorch's own loop: the result stays facenet's."""
    net = _facenet()
    want = detect_faces(net, frames[:4], 2)
    monkeypatch.setattr(mtcnn_exact, "EXACT_FLOAT32", 255 * 4)
    assert mtcnn_exact.detect(net, frames[:2], "cpu", rule) is None
    _assert_same(mtcnn_exact.detect_faces(net, frames[:4], 2, "cpu", rule), want)


@pytest.mark.parametrize("side", [15, 19])
def test_frames_smaller_than_the_minimum_face_have_no_face(rule, side):
    """Under 20 px (facenet's minimum face) the pyramid is empty: no face on either path
    (facenet-pytorch itself raises on an empty pyramid)."""
    net = _facenet()
    tiny = np.full((2, side, side + 4, 3), 128, np.uint8)
    for found in (detect_faces(net, tiny, 2), mtcnn_exact.detect_faces(net, tiny, 2, "cpu", rule)):
        assert len(found) == 0 and found.num_frames == 2


def test_sums_exact_bounds_the_largest_cell():
    # A 48-px crop to 24²: cells of at most 3×3 pixels (windows overlap by one where n/size is not whole).
    assert mtcnn_exact.sums_exact(np.array([[0, 0, 48, 48]]), 24)
    side = 24 * 256  # cells of up to 257×257 pixels: 255 · 257² ≥ 2**24 (256² would still be exact)
    assert mtcnn_exact.sums_exact(np.array([[0, 0, 24 * 255, 24 * 255]]), 24)
    assert not mtcnn_exact.sums_exact(np.array([[0, 0, 48, 48], [0, 0, side, side]]), 24)
    assert mtcnn_exact.sums_exact(np.zeros((0, 4), dtype=np.int64), 24)


@pytest.mark.parametrize("batch_frames", [False, True])
def test_landmarker_with_batched_crops_is_the_exact_path(frames, batch_frames, monkeypatch):
    """:class:`MtcnnLandmarker` with ``batched_crops`` (the CUDA default) detects exactly what it
    detects with facenet's loop, and falls back to the loop when the probe finds no rule."""
    batch = FrameBatch(frames, np.arange(len(frames)), np.arange(len(frames)) / 25.0)
    loop = MtcnnLandmarker("cpu", batch_frames=batch_frames, batched_crops=False, max_pixels=3 * 512 * 512)
    batched = MtcnnLandmarker("cpu", batch_frames=batch_frames, batched_crops=True, max_pixels=3 * 512 * 512)
    want = loop.detect(batch)
    _assert_same(batched.detect(batch), want)
    assert batched._area_rule in mtcnn_exact.AREA_RULES

    monkeypatch.setattr(mtcnn_exact, "AREA_RULES", {"float64": float64_average})
    unmatched = MtcnnLandmarker("cpu", batch_frames=batch_frames, batched_crops=True, max_pixels=3 * 512 * 512)
    _assert_same(unmatched.detect(batch), want)
    assert unmatched._area_rule is None


def test_the_first_stage_nms_sees_exactly_facenets_arrays_level_by_level(frames, rule, monkeypatch):
    """Each per-level NMS call gets facenet's own boxes, scores and frames for that level (same
    values, same order): one call over all levels could keep the other of two tied boxes, which
    no equality test on a few frames would be sure to show."""
    import torch
    import torchvision.ops.boxes as tv_boxes
    from facenet_pytorch.models.utils import detect_face as fd

    real = tv_boxes.batched_nms
    calls: dict[str, list] = {"facenet": [], "ours": []}

    def recording(who):
        def nms(boxes, scores, idxs, iou):
            calls[who].append((boxes.clone(), scores.clone(), idxs.clone(), iou))
            return real(boxes, scores, idxs, iou)
        return nms

    net = _facenet((0.1, 0.1, 0.1))
    chunk = frames[:3]
    monkeypatch.setattr(fd, "batched_nms", recording("facenet"))  # facenet imported it by name
    detect_faces(net, chunk, 3)
    monkeypatch.setattr(tv_boxes, "batched_nms", recording("ours"))  # mtcnn_exact imports it when called
    mtcnn_exact.detect_faces(net, chunk, 3, "cpu", rule)
    levels_of = {who: [c for c in made if c[3] == 0.5] for who, made in calls.items()}
    want = [c for c in levels_of["facenet"] if len(c[0])]  # we skip the empty levels' calls
    assert len(levels_of["ours"]) == len(want) >= 5
    for ours, theirs in zip(levels_of["ours"], want, strict=True):
        for a, b in zip(ours[:3], theirs[:3], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
