"""Pillow-exact crops in torch (engine.resample) and TorchAligner vs Deep3DAligner, on the CPU.

Every comparison is bit for bit against Pillow itself (the installed version) or against
:class:`~engine.stages.align.Deep3DAligner`, never against stored numbers.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import engine.resample as rs
from engine.align import align_batch, template_fallback_img_yup
from engine.conventions import img_yup_to_ydown
from engine.stages.align import Deep3DAligner, TorchAligner
from engine.structures import AlignedBatch, AlignPlan, FrameBatch, concat_rows, rows_of

STEMS = ("000002", "000006", "000031", "015259", "vd006")


def _pillow(img: np.ndarray, box) -> np.ndarray:
    """What engine.align does to pixels: resize the whole frame, then a zero-padded 224 crop."""
    left, up, w, h = (int(v) for v in box)
    resized = Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, up, left + 224, up + 224)))


def _torch(images, boxes, **kw) -> np.ndarray:
    return rs.resized_crops(images, np.asarray(boxes), **kw).numpy()


def _random_case(rng, kind: str):
    """A random frame and crop box of one kind of resize: (image (H, W, 3), [left, up, w, h])."""
    h0, w0 = (int(v) for v in rng.integers(3, 260, 2))
    sx = sy = 1.0
    if kind == "down":
        sx = sy = rng.uniform(0.1, 0.9)
    elif kind == "up":
        sx = sy = rng.uniform(1.1, 3.0)
    elif kind == "mixed":
        sx, sy = rng.uniform(0.1, 3.0, 2)
    elif kind == "width_same":
        sy = rng.uniform(0.1, 3.0)
    elif kind == "height_same":
        sx = rng.uniform(0.1, 3.0)
    elif kind == "tall_down":  # Pillow 13 runs the vertical pass first here
        h0, w0 = int(rng.integers(120, 300)), int(rng.integers(10, 50))
        sx = sy = rng.uniform(0.2, 0.9)
    elif kind == "tiny":
        h0, w0 = (int(v) for v in rng.integers(1, 5, 2))
        sx, sy = rng.uniform(0.5, 60.0, 2)
    w, h = max(1, int(w0 * sx)), max(1, int(h0 * sy))
    # Crop corners anywhere from fully left/above the resized frame to past its far edge.
    left = int(rng.integers(-260, w + 40))
    up = int(rng.integers(-260, h + 40))
    return rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8), [left, up, w, h]


KINDS = ("down", "up", "mixed", "width_same", "height_same", "same", "tall_down", "tiny")


@pytest.mark.parametrize("kind", KINDS)
def test_random_images_match_pillow_bit_for_bit(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    cases = [_random_case(rng, kind) for _ in range(14)]
    images, boxes = [c[0] for c in cases], [c[1] for c in cases]
    got = _torch(images, boxes)  # one call: frames of different sizes and scales in one batch
    assert got.shape == (14, 224, 224, 3) and got.dtype == np.uint8
    for img, box, crop in zip(images, boxes, got, strict=True):
        np.testing.assert_array_equal(crop, _pillow(img, box), err_msg=f"{img.shape} {box}")


def test_windows_outside_and_on_the_edges_are_zero_padded_like_pillow():
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    w, h = 80, 61  # smaller than the crop: every window leaves the resized frame somewhere
    boxes = [[0, 0, w, h], [-224, -224, w, h], [w, h, w, h], [-300, 10, w, h], [-10, -37, w, h],
             [w - 1, h - 1, w, h], [-223, -223, w, h], [5, -224, w, h], [-143, -162, w, h]]
    got = _torch([img] * len(boxes), boxes)
    for box, crop in zip(boxes, got, strict=True):
        np.testing.assert_array_equal(crop, _pillow(img, box), err_msg=str(box))
    assert not got[1].any() and not got[2].any() and not got[7].any()  # fully outside: all zero


def test_chunking_and_padding_do_not_change_results():
    rng = np.random.default_rng(3)
    cases = [_random_case(rng, k) for k in ("down", "up", "mixed", "tall_down", "tiny", "same")]
    images, boxes = [c[0] for c in cases], [c[1] for c in cases]
    together = _torch(images, boxes)
    one_by_one = _torch(images, boxes, max_bytes=1)  # every frame in its own chunk
    np.testing.assert_array_equal(together, one_by_one)
    for i, (img, box) in enumerate(cases):
        np.testing.assert_array_equal(together[i], _pillow(img, box))


def test_pass_order_rule_is_the_installed_pillows_and_the_old_order_is_width_then_height():
    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, (240, 40, 3), dtype=np.uint8)
    box = [-60, -30, 36, 90]  # the height shrinks by far more than twice the width
    assert rs.vertical_first((40, 240), (36, 90), rs.PILLOW13)
    assert not rs.vertical_first((40, 240), (36, 90), rs.HORIZONTAL_FIRST)
    new = _torch([img], [box], pass_order=rs.PILLOW13)[0]
    old = _torch([img], [box], pass_order=rs.HORIZONTAL_FIRST)[0]
    assert (new != old).any(), "the two pass orders must differ here, or this test proves nothing"
    # Pillow <= 12's order is two single-axis resizes (width, then height) on any Pillow.
    pil = Image.fromarray(img).resize((36, 240), Image.Resampling.BICUBIC).resize((36, 90), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(old, np.asarray(pil.crop((-60, -30, 164, 194))))
    installed = new if rs.installed_pass_order() == rs.PILLOW13 else old
    np.testing.assert_array_equal(_torch([img], [box])[0], installed)
    np.testing.assert_array_equal(installed, _pillow(img, box))


def test_float_weights_without_fixed_point_rounding_are_not_pillow(monkeypatch):
    """The comparison can fail: skipping Pillow's 22-bit rounding of the weights is caught."""
    rng = np.random.default_rng(5)
    cases = [_random_case(rng, k) for k in ("down", "up", "mixed") for _ in range(3)]
    images, boxes = [c[0] for c in cases], [c[1] for c in cases]
    exact = _torch(images, boxes)
    monkeypatch.setattr(rs, "to_fixed_point", lambda w: np.asarray(w, dtype=np.float64) * float(1 << 22))
    wrong = _torch(images, boxes)
    assert any((wrong[i] != _pillow(img, box)).any() for i, (img, box) in enumerate(cases))
    for i, (img, box) in enumerate(cases):
        np.testing.assert_array_equal(exact[i], _pillow(img, box))


def test_axis_taps_sum_to_one_in_fixed_point_and_skip_is_identity():
    t = rs.axis_taps(1000, 313, -5, 224)
    inside = t.weights.any(axis=1)
    assert inside.sum() == 224 - 5 and not inside[:5].any()
    assert np.all(np.abs(t.weights[inside].sum(axis=1) - (1 << 22)) <= t.weights.shape[1])
    assert np.array_equal(t.weights, np.round(t.weights))  # integer-valued
    same = rs.axis_taps(50, 50, 40, 224)
    assert same.weights.shape == (224, 1) and same.weights[:10, 0].tolist() == [1 << 22] * 10
    assert (same.src_start, same.src_stop) == (40, 50) and not same.weights[10:].any()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        rs.resized_crops([np.zeros((4, 4, 3), np.float32)], [[0, 0, 8, 8]])
    with pytest.raises(ValueError, match="2 images but 1"):
        rs.resized_crops([np.zeros((4, 4, 3), np.uint8)] * 2, [[0, 0, 8, 8]])
    with pytest.raises(ValueError, match="sizes must be positive"):
        rs.resized_crops([np.zeros((4, 4, 3), np.uint8)], [[0, 0, 0, 8]])
    with pytest.raises(ValueError, match="pass_order"):
        rs.resized_crops([np.zeros((4, 4, 3), np.uint8)], [[0, 0, 8, 8]], pass_order="vertical")
    assert rs.resized_crops([], np.zeros((0, 4), int)).shape == (0, 224, 224, 3)


# --------------------------------------------------------------------------- real media


def _load(test_images, stem):
    path = next(p for p in test_images.iterdir() if p.stem == stem and p.is_file())
    img = np.asarray(Image.open(path).convert("RGB"))
    lm = np.loadtxt(test_images / "detections" / f"{stem}.txt").astype(np.float32).reshape(-1, 2)
    return img, lm


def _scaled(lm: np.ndarray, factor: float) -> np.ndarray:
    """Landmarks scaled about their mean: a face ``factor`` times as big (the crop's scale / factor)."""
    c = lm.mean(axis=0, keepdims=True)
    return ((lm - c) * np.float32(factor) + c).astype(np.float32)


def _assert_same_batch(a: AlignedBatch, b: AlignedBatch) -> None:
    crops_b = b.crops.cpu().numpy() if isinstance(b.crops, torch.Tensor) else b.crops
    np.testing.assert_array_equal(a.crops, crops_b)
    for name in ("trans_params", "lm5_img_ydown", "crop_box", "used_template"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.reason == b.reason


def _frames(images: np.ndarray) -> FrameBatch:
    n = len(images)
    return FrameBatch(images, np.arange(n, dtype=np.int64), np.arange(n, dtype=np.float64) / 25)


# Face scale factors: crop scale s from ~10x down (a face 10x the template size) to ~4x up.
FACTORS = (0.25, 0.5, 0.8, 1.0, 1.3, 2.0, 3.5, 6.0, 10.0)


@pytest.mark.parametrize("stem", STEMS)
def test_torch_aligner_equals_deep3d_aligner_on_the_test_images(test_images, stem):
    img, lm = _load(test_images, stem)
    lms = np.stack([_scaled(lm, f) for f in FACTORS] + [lm, np.full_like(lm, np.nan), np.full_like(lm, 50.0)])
    use_template = np.zeros(len(lms), bool)
    use_template[9] = True  # planned template fallback
    frames, plan = _frames(np.stack([img] * len(lms))), AlignPlan(lms, use_template)
    ref = Deep3DAligner()(frames, plan)
    assert ref.reason[10:] == ("bad_landmarks", "bad_landmarks") and ref.used_template[9:].all()
    scales = ref.trans_params[:, 2]
    assert scales.min() < 0.2 and scales.max() > 1.5, scales  # downscales and upscales both covered
    _assert_same_batch(ref, TorchAligner("cpu")(frames, plan))
    _assert_same_batch(ref, TorchAligner("cpu", keep_on_device=True, max_bytes=1)(frames, plan))


def _video_frames_and_landmarks(test_video, n: int):
    from engine.landmarks import mtcnn
    from tests.media import first_frames

    status = mtcnn.status()
    if not status.available:
        pytest.skip(f"MTCNN unavailable: {status.message}")
    frames = np.stack(first_frames(test_video, n))
    found = mtcnn.MtcnnLandmarker("cpu")(_frames(frames))
    assert found.valid.all(), "the shared clip has a face in its first frames"
    return frames, found.points_img_ydown


@pytest.mark.slow
def test_torch_aligner_equals_deep3d_aligner_on_video_frames_with_mtcnn(test_video):
    frames, lm = _video_frames_and_landmarks(test_video, 6)
    # Real frames, real MTCNN points, and those points scaled (bigger / smaller faces).
    lms = np.stack([_scaled(lm[i % 6], f) for i, f in enumerate(FACTORS)] + list(lm))
    images = np.stack([frames[i % 6] for i in range(len(FACTORS))] + list(frames))
    plan = AlignPlan(lms, np.zeros(len(lms), bool))
    batch = _frames(images)
    ref = Deep3DAligner()(batch, plan)
    _assert_same_batch(ref, TorchAligner("cpu")(batch, plan))
    # Portrait crops of the same frames (H > 2 W): Pillow 13 resizes those vertically first.
    tall = np.ascontiguousarray(images[:, :, 156:356])
    plan_tall = AlignPlan(lms - np.array([156, 0], np.float32), np.zeros(len(lms), bool))
    ref_tall = Deep3DAligner()(_frames(tall), plan_tall)
    _assert_same_batch(ref_tall, TorchAligner("cpu")(_frames(tall), plan_tall))
    vfirst = [rs.vertical_first((200, 512), (int(w), int(h)), rs.installed_pass_order())
              for w, h in ref_tall.crop_box[:, 2:]]
    if rs.installed_pass_order() == rs.PILLOW13:
        assert any(vfirst), "some portrait frames must take Pillow 13's vertical-first path"


def test_resized_crops_on_video_frames_at_many_scales(test_video):
    from tests.media import first_frames

    frames = first_frames(test_video, 4)
    rng = np.random.default_rng(1)
    images, boxes = [], []
    for s in (0.1, 0.23, 0.5, 0.77, 0.9, 1.0, 1.1, 1.6, 2.2, 3.0):
        for img in frames[:2]:
            w, h = max(1, int(512 * s)), max(1, int(512 * s * rng.uniform(0.9, 1.1)))
            images.append(img)
            boxes.append([int(rng.integers(-200, w)), int(rng.integers(-200, h)), w, h])
    got = _torch(images, boxes)
    for img, box, crop in zip(images, boxes, got, strict=True):
        np.testing.assert_array_equal(crop, _pillow(img, box), err_msg=str(box))


def test_template_fallback_batch_equals_align_batch():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 90, 160, 3), dtype=np.uint8)
    lm = np.full((3, 68, 2), -1, np.float32)
    ref = align_batch(images, lm, np.ones(3, bool))
    got = TorchAligner()(_frames(images), AlignPlan(lm, np.ones(3, bool)))
    _assert_same_batch(ref, got)
    np.testing.assert_array_equal(got.lm5_img_ydown[0], img_yup_to_ydown(template_fallback_img_yup(160, 90), 90))
    empty = TorchAligner()(_frames(images[:0]), AlignPlan(lm[:0], np.zeros(0, bool)))
    _assert_same_batch(Deep3DAligner()(_frames(images[:0]), AlignPlan(lm[:0], np.zeros(0, bool))), empty)


def test_device_crops_slice_and_join_like_arrays():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (4, 64, 48, 3), dtype=np.uint8)
    plan = AlignPlan(np.zeros((4, 5, 2), np.float32), np.ones(4, bool))
    aligned = TorchAligner(keep_on_device=True)(_frames(images), plan)
    assert isinstance(aligned.crops, torch.Tensor) and aligned.crops.dtype == torch.uint8
    joined = concat_rows([rows_of(aligned, slice(0, 1)), rows_of(aligned, slice(1, 4))])
    assert isinstance(joined.crops, torch.Tensor)
    _assert_same_batch(TorchAligner()(_frames(images), plan), joined)


@pytest.mark.slow
def test_regressor_takes_device_crops_with_the_same_coefficients(recon_checkpoint):
    from engine.errors import ShapeError
    from engine.regressor import Regressor

    rng = np.random.default_rng(6)
    crops = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    reg = Regressor(recon_checkpoint, device="cpu")
    np.testing.assert_array_equal(reg.predict(crops), reg.predict(torch.from_numpy(crops)))
    with pytest.raises(ValueError, match="uint8"):
        reg.predict(torch.zeros((1, 224, 224, 3), dtype=torch.float32))
    with pytest.raises(ShapeError):
        reg.predict(torch.zeros((1, 3, 224, 224), dtype=torch.uint8))


@pytest.mark.slow
def test_engine_with_device_crops_writes_the_same_results(tmp_path, short_clip, recon_checkpoint):
    """The whole engine with TorchAligner(keep_on_device=True) gives the default aligner's outputs."""
    from engine.config import EngineConfig
    from engine.pipeline import Engine

    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=4, formats=("npz",))
    with Engine(cfg) as engine:
        ref = engine.run(short_clip, tmp_path / "a" / "clip")
    with Engine(cfg, aligner=TorchAligner("cpu", keep_on_device=True)) as engine:
        got = engine.run(short_clip, tmp_path / "b" / "clip")
    a, b = np.load(ref.outputs["npz"]), np.load(got.outputs["npz"])
    assert set(a.files) == set(b.files) and a["valid"].any()
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_taps_equal_the_per_window_taps_bit_for_bit():
    """The vectorised taps (all frames at once) are :func:`axis_taps` / :func:`crop_taps` per frame."""
    rng = np.random.default_rng(21)
    n = 120
    in_sizes = rng.integers(1, 3000, n)
    out_sizes = np.maximum(1, (in_sizes * rng.choice([0.05, 0.3, 0.7, 1.0, 1.6, 9.0], n)
                               * rng.uniform(0.8, 1.2, n)).astype(np.int64))
    out_sizes[::7] = in_sizes[::7]  # kept sizes: the identity taps
    starts = rng.integers(-400, out_sizes + 60)
    cache = rs.TapsCache(max_bytes=400_000)  # room for a few of the resizes: tables are dropped and rebuilt
    for batch in (rs.batch_axis_taps(in_sizes, out_sizes, starts, 224),
                  rs.batch_axis_taps(in_sizes, out_sizes, starts, 224, cache),
                  rs.batch_axis_taps(in_sizes, out_sizes, starts, 224, cache)):
        for i in range(n):
            one, got = rs.axis_taps(int(in_sizes[i]), int(out_sizes[i]), int(starts[i]), 224), batch.window(i)
            assert got.weights.shape == one.weights.shape, i
            np.testing.assert_array_equal(got.weights, one.weights, err_msg=str(i))
            np.testing.assert_array_equal(got.first, one.first, err_msg=str(i))
            assert (got.src_start, got.src_stop) == (one.src_start, one.src_stop), i
    assert 1 < len(cache) < len(set(zip(in_sizes.tolist(), out_sizes.tolist(), strict=True)))
    hw = rng.integers(1, 2200, (n, 2))
    boxes = np.concatenate([starts.reshape(-1, 1)[::-1], starts.reshape(-1, 1), out_sizes.reshape(-1, 1),
                            out_sizes.reshape(-1, 1)[::-1]], axis=1)
    for order, cache in itertools.product(rs.PASS_ORDERS, (None, rs.TapsCache())):
        for one, got in zip((rs.crop_taps(f, b, 224, order) for f, b in zip(hw, boxes, strict=True)),
                            rs.batch_crop_taps(hw, boxes, 224, order, cache), strict=True):
            assert got.vertical_first == one.vertical_first
            for a, b in ((got.y, one.y), (got.x, one.x)):
                np.testing.assert_array_equal(a.weights, b.weights)
                np.testing.assert_array_equal(a.first, b.first)
                assert (a.src_start, a.src_stop) == (b.src_start, b.src_stop)
