"""Deep3DFaceRecon's face alignment: 5 landmarks → POS fit → 224×224 crop (spec §2).

The numbers match ``util/preprocess.py:align_img`` of Deep3DFaceRecon_pytorch (and the
copies in PIRender and SadTalker) bit for bit: the same float32 landmarks, the same float64
least squares, the same int32 truncations and the same Pillow bicubic resize of the whole
frame followed by a zero-padded 224 crop. Only the NumPy ≥ 1.24 breakages of the reference
(1-element arrays inside ``trans_params``, spec §2.7) are gone: ``t`` is a plain float64
vector and ``trans_params`` a float vector.

Convention: detectors give ``img_ydown`` pixels; the fit, ``trans_params`` and the crop
landmarks live in y-up frames (``img_yup``, ``224_yup``), see :mod:`engine.conventions`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.checks import check_shape
from engine.conventions import CROP_SIZE, img_ydown_to_yup, img_yup_to_ydown
from engine.errors import StudioError
from engine.structures import AlignedBatch

log = logging.getLogger(__name__)

#: Deep3D's 5-point 3D template (x, y, z; face-model units, y up): left eye, right eye,
#: nose tip, left mouth corner, right mouth corner. ``load_lm3d`` applied to
#: ``BFM/similarity_Lm3D_all.mat`` (spec §2.3); the digits are the shortest that round-trip
#: to the same float32 values.
TEMPLATE_5P: np.ndarray = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032534988, -0.046179324, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ],
    dtype=np.float32,
)
TEMPLATE_5P.flags.writeable = False

#: One template unit becomes this many pixels of the 224 crop (``rescale_factor``).
RESCALE_FACTOR = 102.0

#: Refuse resizes above this many pixels: they only come from degenerate landmarks.
MAX_RESIZED_PIXELS = 1 << 28

# 0-based 68-point indices: nose tip, left eye corners, right eye corners, mouth corners.
_NOSE, _EYE_L, _EYE_R, _MOUTH_L, _MOUTH_R = 30, (36, 39), (42, 45), 48, 54

# uint8 value → value / 255. computed in float64 then cast to float32 (spec §1.2).
_UINT8_TO_UNIT = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
_UINT8_TO_UNIT.flags.writeable = False


#: Reason of a frame whose landmarks admitted no fit (aligned with the template instead).
BAD_LANDMARKS = "bad_landmarks"


class AlignmentError(StudioError, ValueError):
    """The landmarks cannot be aligned (not finite, or a degenerate fit)."""

    code = "align"


@dataclass(frozen=True)
class AlignedFace:
    """One aligned face (spec §2.5).

    Attributes:
        crop: uint8 (224, 224, 3) RGB crop, y down (image rows); zero outside the frame.
        trans_params: float64 (5,) ``[w0, h0, s, tx, ty_yup]``: original width and height in
            pixels, the rescaled scale ``s = 102 / s_pos`` (crop px per original px), and
            where the template origin projects, in original pixels, y up.
        lm_224_yup: float64 (K, 2) the input landmarks (all K of them) mapped into the crop,
            y up, with the un-truncated offsets of the reference.
        crop_box: ``(left, up, w, h)`` ints: the crop's top-left corner inside the resized
            frame (may be negative) and the resized frame's size.
    """

    crop: np.ndarray
    trans_params: np.ndarray
    lm_224_yup: np.ndarray
    crop_box: tuple[int, int, int, int]


def lm68_to_lm5(lm68: np.ndarray) -> np.ndarray:
    """Deep3D's 68 → 5 landmark rule (spec §2.2); 5-point input passes through unchanged.

    The 5 points are, in order: mean of the left eye corners (0-based 36, 39), mean of the
    right eye corners (42, 45), nose tip (30), left mouth corner (48), right mouth corner
    (54). Means are taken in the input dtype, as the reference does. Any frame works (the
    rule commutes with the y flip except for float rounding: flip first, as the reference).

    Args:
        lm68: (68, D) or (B, 68, D) points, D = 2 (landmarks) or 3 (Deep3D's 3D template
            ``similarity_Lm3D_all.mat`` is reduced by the same rule); 5-row input is
            returned as-is.

    Returns:
        (5, D) or (B, 5, D) array of the input dtype.

    >>> lm = np.arange(136, dtype=np.float32).reshape(68, 2)
    >>> lm68_to_lm5(lm).tolist()
    [[75.0, 76.0], [87.0, 88.0], [60.0, 61.0], [96.0, 97.0], [108.0, 109.0]]
    """
    lm68 = np.asarray(lm68)
    check_shape(lm68, ("*", "K", "D"), "landmarks")
    if lm68.shape[-2] == 5:
        return lm68
    check_shape(lm68, ("*", "68", "D"), "landmarks")
    eye_l = np.mean(lm68[..., _EYE_L, :], axis=-2)
    eye_r = np.mean(lm68[..., _EYE_R, :], axis=-2)
    nose, mouth_l, mouth_r = lm68[..., _NOSE, :], lm68[..., _MOUTH_L, :], lm68[..., _MOUTH_R, :]
    return np.stack([eye_l, eye_r, nose, mouth_l, mouth_r], axis=-2)


def template_fallback_img_yup(width: int, height: int) -> np.ndarray:
    """PIRender's no-face fallback: the template's (x, y) mapped onto the frame (spec §5.2).

    ``((X + 1) / 2) * (W, H)`` in float32, used as y-up image pixels without a flip (so an
    upright face in the middle of the frame).

    Returns:
        float32 (5, 2) image pixels, y up.

    >>> [round(float(v), 2) for v in template_fallback_img_yup(224, 224)[2]]  # nose tip
    [112.36, 106.83]
    """
    unit = (TEMPLATE_5P[:, :2] + 1) / 2.0
    return np.concatenate([unit[:, :1] * width, unit[:, 1:2] * height], axis=1)


def pos(xp_yup: np.ndarray, x3d: np.ndarray) -> tuple[np.ndarray, float]:
    """Weak-perspective least-squares fit of image points to 3D points (spec §2.4).

    Solves ``[x; y] = [R1·X + tx; R2·X + ty]`` for (R1, tx, R2, ty) with a float64 (2N, 8)
    system and ``np.linalg.lstsq``; the right-hand side keeps the landmark dtype, as in the
    reference.

    Args:
        xp_yup: (N, 2) image points, y up (float32 landmarks).
        x3d: (N, 3) template points.

    Returns:
        ``(t, s)``: float64 (2,) translation ``(tx, ty_yup)`` in image pixels, and the scale
        ``(|R1| + |R2|) / 2`` in pixels per template unit (a Python float).

    >>> t, s = pos(TEMPLATE_5P[:, :2] * 100 + 50, TEMPLATE_5P)
    >>> [round(float(v), 3) for v in t], round(s, 3)
    ([50.0, 50.0], 100.0)
    """
    xp_yup = np.asarray(xp_yup)
    x3d = np.asarray(x3d)
    check_shape(xp_yup, ("N", "2"), "xp_yup")
    check_shape(x3d, (xp_yup.shape[0], "3"), "x3d")
    npts = xp_yup.shape[0]
    a = np.zeros((2 * npts, 8))
    a[0 : 2 * npts - 1 : 2, 0:3] = x3d
    a[0 : 2 * npts - 1 : 2, 3] = 1
    a[1 : 2 * npts : 2, 4:7] = x3d
    a[1 : 2 * npts : 2, 7] = 1
    b = np.reshape(xp_yup, (2 * npts, 1))  # x0, y0, x1, y1, ... in the landmark dtype
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    t = np.array([k[3, 0], k[7, 0]], dtype=np.float64)
    return t, float(s)


def _as_rgb_image(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    arr = np.asarray(img)
    check_shape(arr, ("H", "W", "3"), "image")
    if arr.dtype != np.uint8:
        raise AlignmentError(f"image: expected dtype uint8, got {arr.dtype}")
    return Image.fromarray(arr, mode="RGB")


@dataclass(frozen=True)
class AlignmentFit:
    """The geometry of one aligned face, without pixels (see :class:`AlignedFace`).

    Attributes:
        trans_params: float64 (5,) ``[w0, h0, s, tx, ty_yup]``.
        lm_224_yup: float64 (K, 2) the input landmarks mapped into the crop, y up.
        crop_box: ``(left, up, w, h)`` ints: the crop's top-left corner inside the frame
            resized to ``w × h`` pixels (may be negative).
    """

    trans_params: np.ndarray
    lm_224_yup: np.ndarray
    crop_box: tuple[int, int, int, int]


def fit_alignment(
    width: int,
    height: int,
    lm_img_ydown: np.ndarray | None = None,
    *,
    lm_img_yup: np.ndarray | None = None,
) -> AlignmentFit:
    """Deep3D's ``align_img`` without the pixels: POS fit, resize size and crop corner (spec §2.5).

    Args:
        width, height: the frame's size in pixels (``w0, h0``).
        lm_img_ydown: (5, 2) or (68, 2) image pixels, y down (flipped with ``height`` first).
        lm_img_yup: (5, 2) or (68, 2) image pixels, y up. Pass exactly one of the two.

    Returns:
        :class:`AlignmentFit`.

    Raises:
        AlignmentError: landmarks not finite, or a fit implying an absurd resize.
    """
    if (lm_img_ydown is None) == (lm_img_yup is None):
        raise TypeError("fit_alignment: pass exactly one of lm_img_ydown or lm_img_yup")
    w0, h0 = int(width), int(height)
    if lm_img_yup is None:
        lm_img_ydown = np.asarray(lm_img_ydown)
        check_shape(lm_img_ydown, ("K", "2"), "lm_img_ydown")
        lm_img_yup = img_ydown_to_yup(lm_img_ydown, h0)
    lm_img_yup = np.asarray(lm_img_yup)
    check_shape(lm_img_yup, ("K", "2"), "lm_img_yup")
    if not np.all(np.isfinite(lm_img_yup)):
        raise AlignmentError("landmarks contain NaN or inf; align such frames with the template fallback")
    lm5_img_yup = lm68_to_lm5(lm_img_yup)

    # 1. POS fit, rescaled so that one template unit is 102 px of the crop.
    t, s_pos = pos(lm5_img_yup, TEMPLATE_5P)
    if not s_pos > 1e-12:
        raise AlignmentError(f"landmarks give a POS scale of {s_pos:.4g}; the landmarks are degenerate")
    s = np.float64(RESCALE_FACTOR) / np.float64(s_pos)
    t0, t1 = np.float64(t[0]), np.float64(t[1])

    # 2. Size of the resized frame and crop corner, C-truncated like the reference's int32 casts.
    if not (np.isfinite(s) and s > 0 and w0 * s * h0 * s <= MAX_RESIZED_PIXELS):
        raise AlignmentError(
            f"landmarks give scale {float(s):.4g} for a {w0}x{h0} image "
            "(expected a resize of at most 2^28 px); the landmarks are degenerate"
        )
    w = (w0 * s).astype(np.int32)
    h = (h0 * s).astype(np.int32)
    half = CROP_SIZE / 2.0
    left_f = w / 2 - half + (t0 - w0 / 2) * s
    up_f = h / 2 - half + (h0 / 2 - t1) * s
    if w < 1 or h < 1 or not (abs(left_f) < 2**30 and abs(up_f) < 2**30):
        raise AlignmentError(
            f"landmarks give a {int(w)}x{int(h)} resize of a {w0}x{h0} image with the crop at "
            f"({float(left_f):.4g}, {float(up_f):.4g}); expected a face inside the frame"
        )
    left = left_f.astype(np.int32)
    up = up_f.astype(np.int32)

    # 3. Landmarks into the crop (un-truncated offsets, float64).
    lm64 = lm_img_yup.astype(np.float64)
    lm_224_yup = np.stack([lm64[:, 0] - t0 + w0 / 2, lm64[:, 1] - t1 + h0 / 2], axis=1) * s
    lm_224_yup = lm_224_yup - np.array([[w / 2 - half, h / 2 - half]])

    trans_params = np.array([w0, h0, s, t0, t1], dtype=np.float64)
    return AlignmentFit(trans_params=trans_params, lm_224_yup=lm_224_yup,
                        crop_box=(int(left), int(up), int(w), int(h)))


def pillow_crop(img: Image.Image | np.ndarray, crop_box: tuple[int, int, int, int]) -> np.ndarray:
    """The reference's pixels: Pillow bicubic of the whole frame to ``(w, h)``, then a zero-padded 224 crop.

    Args:
        img: RGB image, PIL or uint8 (H, W, 3), y down.
        crop_box: ``(left, up, w, h)`` (:attr:`AlignmentFit.crop_box`).

    Returns:
        uint8 (224, 224, 3).
    """
    left, up, w, h = (int(v) for v in crop_box)
    resized = _as_rgb_image(img).resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, up, left + CROP_SIZE, up + CROP_SIZE)), dtype=np.uint8)


def align_image(
    img: Image.Image | np.ndarray,
    lm_img_ydown: np.ndarray | None = None,
    *,
    lm_img_yup: np.ndarray | None = None,
) -> AlignedFace:
    """Deep3D's ``align_img``: fit, resize the whole frame, crop 224×224 (spec §2.5).

    :func:`fit_alignment` then :func:`pillow_crop`. Pass exactly one of ``lm_img_ydown``
    (detector output; y is flipped with the image height first, as every reference caller
    does) or ``lm_img_yup`` (points already y up, e.g. :func:`template_fallback_img_yup`).

    Args:
        img: RGB image, PIL (converted to RGB if needed) or uint8 (H, W, 3), y down.
        lm_img_ydown: (5, 2) or (68, 2) image pixels, y down; float32 for exact results.
        lm_img_yup: (5, 2) or (68, 2) image pixels, y up.

    Returns:
        :class:`AlignedFace`.

    Raises:
        AlignmentError: landmarks not finite, or a fit implying an absurd resize.
    """
    if (lm_img_ydown is None) == (lm_img_yup is None):
        raise TypeError("align_image: pass exactly one of lm_img_ydown or lm_img_yup")
    pil = _as_rgb_image(img)
    fit = fit_alignment(*pil.size, lm_img_ydown, lm_img_yup=lm_img_yup)
    return AlignedFace(crop=pillow_crop(pil, fit.crop_box), trans_params=fit.trans_params,
                       lm_224_yup=fit.lm_224_yup, crop_box=fit.crop_box)


@dataclass(frozen=True)
class BatchFit:
    """The geometry of a batch of aligned frames: :class:`~engine.structures.AlignedBatch` less the crops.

    Attributes:
        trans_params: float32 (B, 5). lm5_img_ydown: float32 (B, 5, 2). crop_box: int32 (B, 4).
        used_template: bool (B,). reason: (B,) ``"bad_landmarks"`` or ``""``.
        (All as in :class:`~engine.structures.AlignedBatch`.)
    """

    trans_params: np.ndarray
    lm5_img_ydown: np.ndarray
    crop_box: np.ndarray
    used_template: np.ndarray
    reason: tuple[str, ...]

    def with_crops(self, crops) -> AlignedBatch:
        """The :class:`~engine.structures.AlignedBatch` of these fits and ``crops`` (B, 224, 224, 3)."""
        return AlignedBatch(crops=crops, trans_params=self.trans_params, lm5_img_ydown=self.lm5_img_ydown,
                            crop_box=self.crop_box, used_template=self.used_template, reason=self.reason)


def fit_batch(
    width: int,
    height: int,
    lm_img_ydown: np.ndarray,
    use_fallback: np.ndarray | Sequence[bool],
    *,
    bad_landmarks: str = "raise",
) -> BatchFit:
    """Fit every frame of a batch; frames flagged ``use_fallback`` get the template fallback.

    Args:
        width, height: the frames' size in pixels.
        lm_img_ydown: (B, K, 2) landmarks, K = 5 or 68, y down (ignored where
            ``use_fallback``; those rows may be NaN or -1).
        use_fallback: bool (B,) align with :func:`template_fallback_img_yup` instead.
        bad_landmarks: ``"raise"`` an :class:`AlignmentError` for a frame whose landmarks admit
            no fit, or ``"template"``: the template fallback and reason ``"bad_landmarks"``.

    Returns:
        :class:`BatchFit` (see :func:`align_batch`).

    Raises:
        AlignmentError: a frame's landmarks admit no fit and ``bad_landmarks="raise"``.
    """
    if bad_landmarks not in ("raise", "template"):
        raise ValueError(f"bad_landmarks must be 'raise' or 'template', got {bad_landmarks!r}")
    lm_img_ydown = np.asarray(lm_img_ydown)
    check_shape(lm_img_ydown, ("B", "K", "2"), "lm_img_ydown")
    n = lm_img_ydown.shape[0]
    use_fallback = np.asarray(use_fallback, dtype=bool)
    check_shape(use_fallback, (n,), "use_fallback")

    fallback_img_yup = template_fallback_img_yup(width, height)
    trans_params64 = np.empty((n, 5), dtype=np.float64)
    crop_box = np.empty((n, 4), dtype=np.int32)
    rows = np.flatnonzero(~use_fallback)
    fit_params, fit_box, ok = _fit_rows(width, height, lm_img_ydown[rows])
    trans_params64[rows[ok]], crop_box[rows[ok]] = fit_params[ok], fit_box[ok]
    reasons = [""] * n
    for i in rows[~ok].tolist():  # no fit: fit_alignment says why (the same error as frame by frame)
        try:
            fit = fit_alignment(width, height, lm_img_ydown[i])
        except AlignmentError as e:
            if bad_landmarks == "raise":
                raise
            log.info("frame %d of the batch: %s; using the template fallback", i, e)
            reasons[i] = BAD_LANDMARKS
            continue
        trans_params64[i], crop_box[i] = fit.trans_params, fit.crop_box

    used_template = use_fallback | np.array([bool(r) for r in reasons], dtype=bool).reshape(n)
    lm5_img_ydown = np.empty((n, 5, 2), dtype=np.float32)
    if used_template.any():  # the template fit is the same for every such frame
        fallback = fit_alignment(width, height, lm_img_yup=fallback_img_yup)
        trans_params64[used_template], crop_box[used_template] = fallback.trans_params, fallback.crop_box
        lm5_img_ydown[used_template] = img_yup_to_ydown(fallback_img_yup, height)
    if not used_template.all():
        lm5_img_ydown[~used_template] = lm68_to_lm5(lm_img_ydown[~used_template])
    trans_params = trans_params64.astype(np.float32)
    return BatchFit(trans_params=trans_params, lm5_img_ydown=lm5_img_ydown, crop_box=crop_box,
                    used_template=used_template, reason=tuple(reasons))


def _fit_rows(width: int, height: int, lm_img_ydown: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_alignment`'s ``trans_params`` and ``crop_box`` of M frames (M, K, 2), y down.

    The same float64 operations element for element; only the POS least squares and its two
    norms stay per frame (the very calls :func:`pos` makes), so every fitted frame equals
    ``fit_alignment(width, height, lm_img_ydown[m])`` bit for bit.

    Returns:
        float64 (M, 5) ``trans_params``, int64 (M, 4) ``crop_box`` and bool (M,) ``ok``: False
        where :func:`fit_alignment` raises (those rows' values are meaningless).
    """
    w0, h0 = int(width), int(height)
    m = lm_img_ydown.shape[0]
    trans_params = np.zeros((m, 5), dtype=np.float64)
    crop_box = np.zeros((m, 4), dtype=np.int64)
    lm_img_yup = img_ydown_to_yup(lm_img_ydown, h0)
    ok = np.isfinite(lm_img_yup).all(axis=(1, 2))
    if not ok.any():
        return trans_params, crop_box, ok
    lm5 = lm68_to_lm5(lm_img_yup)
    npts = TEMPLATE_5P.shape[0]
    a = np.zeros((2 * npts, 8))  # pos()'s design matrix: the template's, the same for every frame
    a[0 : 2 * npts - 1 : 2, 0:3] = TEMPLATE_5P
    a[0 : 2 * npts - 1 : 2, 3] = 1
    a[1 : 2 * npts : 2, 4:7] = TEMPLATE_5P
    a[1 : 2 * npts : 2, 7] = 1
    t = np.zeros((m, 2), dtype=np.float64)
    s_pos = np.zeros(m, dtype=np.float64)
    for i in np.flatnonzero(ok).tolist():
        k = np.linalg.lstsq(a, np.reshape(lm5[i], (2 * npts, 1)), rcond=None)[0]
        s_pos[i] = float((np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2)
        t[i] = k[3, 0], k[7, 0]
    with np.errstate(all="ignore"):
        ok &= s_pos > 1e-12
        s = np.float64(RESCALE_FACTOR) / np.where(ok, s_pos, 1.0)
        ok &= np.isfinite(s) & (s > 0) & (w0 * s * h0 * s <= MAX_RESIZED_PIXELS)
        s = np.where(ok, s, 1.0)
        w = (w0 * s).astype(np.int32)
        h = (h0 * s).astype(np.int32)
        half = CROP_SIZE / 2.0
        left_f = w / 2 - half + (t[:, 0] - w0 / 2) * s
        up_f = h / 2 - half + (h0 / 2 - t[:, 1]) * s
        ok &= (w >= 1) & (h >= 1) & (np.abs(left_f) < 2**30) & (np.abs(up_f) < 2**30)
        left = np.where(ok, left_f, 0.0).astype(np.int32)
        up = np.where(ok, up_f, 0.0).astype(np.int32)
    trans_params[:] = np.stack([np.full(m, float(w0)), np.full(m, float(h0)), s, t[:, 0], t[:, 1]], axis=1)
    crop_box[:] = np.stack([left, up, w, h], axis=1)
    return trans_params, crop_box, ok


def align_batch(
    images: np.ndarray,
    lm_img_ydown: np.ndarray,
    use_fallback: np.ndarray | Sequence[bool],
    executor: Executor | None = None,
    *,
    bad_landmarks: str = "raise",
) -> AlignedBatch:
    """Align a batch of frames; frames flagged ``use_fallback`` get the template fallback.

    :func:`fit_batch` then :func:`pillow_crop` per frame.

    Args:
        images: uint8 (B, H, W, 3) RGB frames, y down.
        lm_img_ydown: (B, K, 2) landmarks, K = 5 or 68, y down (ignored where
            ``use_fallback``; those rows may be NaN or -1).
        use_fallback: bool (B,) align with :func:`template_fallback_img_yup` instead.
        executor: optional thread pool to crop frames in parallel (Pillow releases the
            GIL while resizing); results do not depend on it.
        bad_landmarks: what a frame whose landmarks admit no fit (not finite, degenerate)
            gets: ``"raise"`` an :class:`AlignmentError`, or ``"template"``: the template
            fallback and reason ``"bad_landmarks"`` in the result.

    Returns:
        :class:`~engine.structures.AlignedBatch` with float32 ``trans_params`` (what every
        reference writes), the 5 points used for each fit, y down (for fallback frames:
        the template points flipped to y down), the exact crop boxes, which frames used the
        template and the reason of those that fell back on their own.

    Raises:
        AlignmentError: a frame's landmarks admit no fit and ``bad_landmarks="raise"``.
    """
    images = np.asarray(images)
    check_shape(images, ("B", "H", "W", "3"), "images")
    lm_img_ydown = np.asarray(lm_img_ydown)
    check_shape(lm_img_ydown, (images.shape[0], "K", "2"), "lm_img_ydown")
    n, height, width = images.shape[:3]
    fits = fit_batch(width, height, lm_img_ydown, use_fallback, bad_landmarks=bad_landmarks)

    def one(i: int) -> np.ndarray:
        return pillow_crop(images[i], tuple(int(v) for v in fits.crop_box[i]))

    crops = np.empty((n, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for i, crop in enumerate(executor.map(one, range(n)) if executor is not None else map(one, range(n))):
        crops[i] = crop
    return fits.with_crops(crops)


def crops_to_tensor_input(crops: np.ndarray) -> np.ndarray:
    """Network input from aligned crops: ``uint8 / 255.`` in float64, cast to float32 (spec §1.2).

    Done through a 256-entry table holding exactly those float32 values, so no float64
    temporary of the whole batch is made.

    Args:
        crops: uint8 (B, 224, 224, 3) RGB crops.

    Returns:
        float32 (B, 3, 224, 224), values in [0, 1], C-contiguous.

    >>> crops_to_tensor_input(np.full((1, 224, 224, 3), 255, np.uint8)).shape
    (1, 3, 224, 224)
    """
    crops = np.asarray(crops)
    check_shape(crops, ("B", "224", "224", "3"), "crops")
    if crops.dtype != np.uint8:
        raise AlignmentError(f"crops: expected dtype uint8, got {crops.dtype}")
    return np.ascontiguousarray(_UINT8_TO_UNIT[crops].transpose(0, 3, 1, 2))


def uint8_to_unit_table() -> np.ndarray:
    """float32 (256,) read-only table: ``table[v] == np.float32(v / 255.)`` (float64 division)."""
    return _UINT8_TO_UNIT
