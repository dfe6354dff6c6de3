"""Deep3D alignment (spec §2): known answers, truncation, zero padding, frames, batching."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from engine.align import (
    TEMPLATE_5P,
    AlignmentError,
    _fit_rows,
    align_batch,
    align_image,
    crops_to_tensor_input,
    fit_alignment,
    fit_batch,
    lm68_to_lm5,
    pos,
    template_fallback_img_yup,
)
from engine.conventions import crop_to_img_yup, img_ydown_to_yup, img_yup_to_ydown
from engine.errors import ShapeError

pytestmark = pytest.mark.filterwarnings("error")  # NumPy 2 / Pillow deprecations must not fire

STEMS = ("000002", "000006", "000031", "015259", "vd006")


def _load(test_images, stem):
    path = next(p for p in test_images.iterdir() if p.stem == stem and p.is_file())
    img = Image.open(path).convert("RGB")
    lm_img_ydown = np.loadtxt(test_images / "detections" / f"{stem}.txt").astype(np.float32).reshape(-1, 2)
    return img, lm_img_ydown


def _pillow_crop(img: Image.Image, w: int, h: int, left: int, up: int) -> np.ndarray:
    resized = img.resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, up, left + 224, up + 224)))


def test_known_answer_000002(test_images):
    img, lm = _load(test_images, "000002")
    face = align_image(img, lm)
    assert face.trans_params.dtype == np.float64 and face.trans_params.shape == (5,)
    # Spec §2.5 prints s to 6 decimals and t to 3: match those digits exactly.
    w0, h0, s, tx, ty_yup = face.trans_params.tolist()
    assert (w0, h0) == (423, 594)
    assert (round(s, 6), round(tx, 3), round(ty_yup, 3)) == (0.729374, 196.614, 355.063)
    assert 102 / s == pytest.approx(139.8459, abs=5e-5)  # s_pos
    left, up, w, h = face.crop_box
    assert (w, h) == (308, 433)
    assert (left, up) == (31, 62)
    assert face.crop.dtype == np.uint8 and face.crop.shape == (224, 224, 3)
    np.testing.assert_array_equal(face.crop, _pillow_crop(img, w, h, left, up))
    # The same frame given as an array gives the same result.
    face_arr = align_image(np.asarray(img), lm)
    np.testing.assert_array_equal(face_arr.crop, face.crop)
    np.testing.assert_array_equal(face_arr.trans_params, face.trans_params)


def test_template_matches_bfm_index_file(bfm_index):
    from scipy.io import loadmat

    lm68 = loadmat(bfm_index / "similarity_Lm3D_all.mat")["lm"]
    assert lm68.dtype == np.float32 and lm68.shape == (68, 3)
    np.testing.assert_array_equal(lm68_to_lm5(lm68), TEMPLATE_5P)
    assert TEMPLATE_5P.dtype == np.float32 and not TEMPLATE_5P.flags.writeable


def test_lm68_to_lm5_index_rule():
    rng = np.random.default_rng(0)
    lm = rng.uniform(0, 500, size=(68, 2)).astype(np.float32)
    lm5 = lm68_to_lm5(lm)
    assert lm5.dtype == np.float32 and lm5.shape == (5, 2)
    np.testing.assert_array_equal(lm5[0], (lm[36] + lm[39]) / np.float32(2))
    np.testing.assert_array_equal(lm5[1], (lm[42] + lm[45]) / np.float32(2))
    np.testing.assert_array_equal(lm5[2], lm[30])
    np.testing.assert_array_equal(lm5[3], lm[48])
    np.testing.assert_array_equal(lm5[4], lm[54])
    batch = rng.uniform(0, 500, size=(7, 68, 2)).astype(np.float32)
    out = lm68_to_lm5(batch)
    assert out.shape == (7, 5, 2)
    for i in range(7):
        np.testing.assert_array_equal(out[i], lm68_to_lm5(batch[i]))
    assert lm68_to_lm5(lm5) is lm5
    with pytest.raises(ShapeError):
        lm68_to_lm5(np.zeros((10, 2), np.float32))


def test_pos_recovers_a_similarity():
    rng = np.random.default_rng(1)
    a = 0.3
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0]])
    x3d = TEMPLATE_5P.astype(np.float64)
    xp = 140.0 * x3d @ rot.T + np.array([200.0, 310.0])
    t, s = pos(xp, x3d)
    assert type(s) is float
    assert t.dtype == np.float64 and t.shape == (2,)
    np.testing.assert_allclose(t, [200.0, 310.0], atol=1e-9)
    assert s == pytest.approx(140.0, abs=1e-9)
    # A float32 right-hand side is used as is (the reference does not upcast it first).
    t32, s32 = pos(xp.astype(np.float32), x3d)
    assert abs(s32 - s) < 1e-3 and np.all(np.abs(t32 - t) < 1e-3)
    del rng


def _face_near_top_left(width, height, dx, dy):
    """Template-shaped y-down landmarks whose crop corner falls outside the frame."""
    lm_img_yup = template_fallback_img_yup(width, height) * np.float32(0.5)
    lm_img_yup = lm_img_yup + np.array([dx, height * 0.5 + dy], np.float32)
    return img_ydown_to_yup(lm_img_yup, height)  # the flip is its own inverse


def test_negative_corner_truncates_toward_zero_and_pads_with_zeros():
    width, height = 200, 160
    img = np.full((height, width, 3), 255, np.uint8)
    for dx in np.linspace(-3, 3, 13):
        lm_img_ydown = _face_near_top_left(width, height, dx, dx)
        t, s_pos = pos(img_ydown_to_yup(lm_img_ydown, height), TEMPLATE_5P)
        s = 102.0 / s_pos
        w, h = int(width * s), int(height * s)
        left_f = w / 2 - 112 + (t[0] - width / 2) * s
        up_f = h / 2 - 112 + (height / 2 - t[1]) * s
        if left_f < 0 and up_f < 0 and math.floor(left_f) != math.trunc(left_f):
            break
    else:
        pytest.fail("no test case with a negative, non-integral crop corner")
    face = align_image(img, lm_img_ydown)
    left, up, rw, rh = face.crop_box
    assert (rw, rh) == (w, h)
    assert left == math.trunc(left_f) and up == math.trunc(up_f)
    assert left > math.floor(left_f)  # truncation, not floor
    # Outside the resized frame the crop is black; inside it is the white image.
    assert np.all(face.crop[:, :-left] == 0) and np.all(face.crop[:-up, :] == 0)
    inner = face.crop[-up + 2 : min(224, h - up) - 2, -left + 2 : min(224, w - left) - 2]
    assert inner.size > 0 and np.all(inner == 255)
    np.testing.assert_array_equal(face.crop, _pillow_crop(Image.fromarray(img), w, h, left, up))


def test_crop_landmarks_round_trip_to_image(test_images):
    img, lm = _load(test_images, "000002")
    face = align_image(img, lm)
    back_img_yup = crop_to_img_yup(face.lm_224_yup, face.trans_params)
    np.testing.assert_allclose(back_img_yup, img_ydown_to_yup(lm, img.height), atol=1e-6, rtol=0)


def test_68_point_input_flips_before_reducing(test_images):
    img, lm5 = _load(test_images, "000006")
    rng = np.random.default_rng(2)
    lm68 = rng.uniform(0, min(img.size), size=(68, 2)).astype(np.float32)
    lm68[[36, 39]] = lm5[0] + np.array([[-3, 0.5], [3, -0.5]], np.float32)
    lm68[[42, 45]] = lm5[1] + np.array([[-3, 0.25], [3, -0.25]], np.float32)
    lm68[[30, 48, 54]] = lm5[2:]
    face = align_image(img, lm68)
    assert face.lm_224_yup.shape == (68, 2)
    ref = align_image(img, lm_img_yup=lm68_to_lm5(img_ydown_to_yup(lm68, img.height)))
    np.testing.assert_array_equal(face.trans_params, ref.trans_params)
    np.testing.assert_array_equal(face.crop, ref.crop)


@pytest.mark.parametrize("stem", STEMS)
def test_every_test_image_aligns(test_images, stem):
    img, lm = _load(test_images, stem)
    face = align_image(img, lm)
    assert np.all(np.isfinite(face.trans_params))
    assert tuple(face.trans_params[:2]) == img.size
    assert 0.1 < face.trans_params[2] < 10
    assert face.crop.shape == (224, 224, 3) and face.crop.any()


def test_align_batch_matches_single_frames_and_fallback(test_images):
    img, lm5 = _load(test_images, "000031")
    frames = np.stack([np.asarray(img)] * 3)
    lm = np.stack([lm5, np.full((5, 2), np.nan, np.float32), lm5 + np.float32(2)])
    use_fallback = np.array([False, True, False])
    batch = align_batch(frames, lm, use_fallback)
    assert batch.crops.shape == (3, 224, 224, 3) and batch.crops.dtype == np.uint8
    assert batch.trans_params.dtype == np.float32 and batch.trans_params.shape == (3, 5)
    assert batch.lm5_img_ydown.dtype == np.float32 and batch.lm5_img_ydown.shape == (3, 5, 2)
    for i in (0, 2):
        face = align_image(img, lm[i])
        np.testing.assert_array_equal(batch.crops[i], face.crop)
        np.testing.assert_array_equal(batch.trans_params[i], face.trans_params.astype(np.float32))
        np.testing.assert_array_equal(batch.lm5_img_ydown[i], lm[i])
    fallback = align_image(img, lm_img_yup=template_fallback_img_yup(img.width, img.height))
    np.testing.assert_array_equal(batch.crops[1], fallback.crop)
    np.testing.assert_array_equal(batch.trans_params[1], fallback.trans_params.astype(np.float32))
    with ThreadPoolExecutor(2) as pool:
        threaded = align_batch(frames, lm, use_fallback, executor=pool)
    np.testing.assert_array_equal(threaded.crops, batch.crops)
    np.testing.assert_array_equal(threaded.trans_params, batch.trans_params)


def test_template_fallback_is_float32_and_centred():
    pts = template_fallback_img_yup(640, 480)
    assert pts.dtype == np.float32 and pts.shape == (5, 2)
    unit = (TEMPLATE_5P[:, :2] + np.float32(1)) / np.float32(2)
    np.testing.assert_array_equal(pts[:, 0], unit[:, 0] * np.float32(640))
    np.testing.assert_array_equal(pts[:, 1], unit[:, 1] * np.float32(480))
    assert pts[0, 1] > 240  # eyes above the centre in y-up pixels


def test_bad_landmarks_raise_alignment_error():
    img = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(AlignmentError, match="NaN"):
        align_image(img, np.full((5, 2), np.nan, np.float32))
    for same_point in (50.0, -1.0):  # -1 rows are PIRender's no-face marker: use the fallback
        with pytest.raises(AlignmentError, match="degenerate"):
            align_image(img, np.full((5, 2), same_point, np.float32))
    with pytest.raises(TypeError):
        align_image(img)


def test_crops_to_tensor_input_matches_reference_formula_bitwise():
    values = np.arange(256, dtype=np.uint8)
    crops = np.resize(values, (2, 224, 224, 3)).astype(np.uint8)
    got = crops_to_tensor_input(crops)
    assert got.dtype == np.float32 and got.shape == (2, 3, 224, 224) and got.flags.c_contiguous
    for i in range(2):  # Deep3D/PIRender: torch.tensor(np.array(img) / 255., dtype=float32).permute(2, 0, 1)
        ref = torch.tensor(crops[i] / 255.0, dtype=torch.float32).permute(2, 0, 1).numpy()
        np.testing.assert_array_equal(got[i].view(np.uint32), ref.view(np.uint32))
    np.testing.assert_array_equal(got[0, 0, 0, :10], (values[0:30:3] / 255.0).astype(np.float32))


def _fit_batch_per_frame(width, height, lm, use_fallback):
    """fit_batch's former frame-by-frame form: fit_alignment per frame, template on failure."""
    fallback_yup = template_fallback_img_yup(width, height)
    trans, boxes, lm5, reasons = [], [], [], []
    for i in range(len(lm)):
        reason = ""
        try:
            fit = None if use_fallback[i] else fit_alignment(width, height, lm[i])
        except AlignmentError:
            fit, reason = None, "bad_landmarks"
        if fit is None:
            fit = fit_alignment(width, height, lm_img_yup=fallback_yup)
            lm5.append(img_yup_to_ydown(fallback_yup, height))
        else:
            lm5.append(lm68_to_lm5(lm[i]))
        trans.append(fit.trans_params.astype(np.float32))
        boxes.append(fit.crop_box)
        reasons.append(reason)
    return (np.array(trans), np.array(boxes, dtype=np.int32), np.array(lm5, dtype=np.float32), tuple(reasons))


@pytest.mark.parametrize("points,dtype", [(5, np.float32), (68, np.float32), (5, np.float64)])
def test_fit_batch_equals_fit_alignment_per_frame(points, dtype):
    """The vectorised fit_batch is fit_alignment frame by frame, bit for bit (10,000 random frames,
    with NaN, degenerate, absurd and template rows)."""
    rng = np.random.default_rng(points)
    n, width, height = 10_000, 1920, 1080
    centre = rng.uniform([-200, -200], [2100, 1300], (n, 1, 2))
    size = rng.lognormal(np.log(150), 1.2, (n, 1, 1))
    lm = (centre + size * rng.normal(0, 1, (n, points, 2))).astype(dtype)
    lm[rng.random(n) < 0.03, rng.integers(0, points)] = np.nan
    lm[rng.random(n) < 0.02] = 50.0  # all points equal: a degenerate POS scale
    lm[rng.random(n) < 0.02] *= np.asarray(1e-7, dtype)  # a tiny face: an absurd resize
    use_fallback = rng.random(n) < 0.1
    batch = fit_batch(width, height, lm, use_fallback, bad_landmarks="template")
    trans, boxes, lm5, reasons = _fit_batch_per_frame(width, height, lm, use_fallback)
    assert 0 < sum(map(bool, reasons)) < n // 5
    assert batch.reason == reasons
    np.testing.assert_array_equal(batch.used_template, use_fallback | np.array([bool(r) for r in reasons]))
    assert batch.trans_params.dtype == np.float32 and batch.crop_box.dtype == np.int32
    np.testing.assert_array_equal(batch.trans_params, trans)
    np.testing.assert_array_equal(batch.crop_box, boxes)
    np.testing.assert_array_equal(batch.lm5_img_ydown, lm5)
    with pytest.raises(AlignmentError):
        fit_batch(width, height, lm, use_fallback, bad_landmarks="raise")
    # The float64 fit before the float32 output, too.
    params, crop, ok = _fit_rows(width, height, lm[:2000])
    for i in range(2000):
        try:
            fit = fit_alignment(width, height, lm[i])
        except AlignmentError:
            assert not ok[i]
            continue
        assert ok[i]
        np.testing.assert_array_equal(params[i], fit.trans_params)
        assert tuple(crop[i]) == fit.crop_box
