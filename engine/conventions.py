"""Coordinate frames, in one place. See ``docs/conventions.md``.

Frames used in the project (the suffix every variable name carries):

* ``img_ydown`` — pixel coordinates of the original image, x right, **y down**, origin at
  the top-left pixel centre. Every detector returns this frame.
* ``img_yup`` — the same pixels with y flipped: ``y_up = H - 1 - y_down``. Deep3DFaceRecon's
  POS fit, ``align_img`` and ``trans_params`` live in this frame.
* ``224_yup`` — pixels of the aligned 224×224 crop, y up (Deep3D's projected landmarks).
* ``224_ydown`` — the crop's pixel rows, y down: ``y_down = 224 - 1 - y_up``.

All flips go through the functions below; nothing else in the project writes ``H - 1 - y``.
"""

from __future__ import annotations

import numpy as np

#: Side of the aligned crop fed to the network, in pixels.
CROP_SIZE = 224


def flip_y(points: np.ndarray, height: int | float) -> np.ndarray:
    """Flip the y coordinate between a y-down and a y-up pixel frame.

    ``y' = height - 1 - y``; the flip is its own inverse, so it converts both ways.

    Args:
        points: (..., 2) x, y pixel coordinates; dtype is kept.
        height: image height in pixels (the frame the points live in).

    Returns:
        (..., 2) array of the same dtype with y flipped; NaN stays NaN.

    >>> flip_y(np.array([[10.0, 0.0]]), 100).tolist()
    [[10.0, 99.0]]
    """
    points = np.asarray(points)
    out = points.copy()
    out[..., 1] = np.asarray(height - 1, dtype=points.dtype) - points[..., 1]
    return out


def img_ydown_to_yup(points_img_ydown: np.ndarray, height: int) -> np.ndarray:
    """Image pixels y-down → y-up (Deep3D's alignment frame). (..., 2) → (..., 2)."""
    return flip_y(points_img_ydown, height)


def img_yup_to_ydown(points_img_yup: np.ndarray, height: int) -> np.ndarray:
    """Image pixels y-up → y-down. (..., 2) → (..., 2)."""
    return flip_y(points_img_yup, height)


def crop_yup_to_ydown(points_224_yup: np.ndarray) -> np.ndarray:
    """Crop pixels y-up → crop pixel rows y-down (Deep3D's ``224 - 1 - v``). (..., 2)."""
    return flip_y(points_224_yup, CROP_SIZE)


def crop_to_img_yup(
    points_224_yup: np.ndarray, trans_params: np.ndarray, crop_box: np.ndarray | None = None
) -> np.ndarray:
    """Map points from the 224 crop back to the original image, both y-up.

    Inverts the landmark transform of ``align_img`` (spec §2.5):
    ``p_224 = (p_img - t + (w0/2, h0/2)) * s - (w/2 - 112, h/2 - 112)`` with ``(w, h)`` the
    size of the resized frame the crop was cut from.

    Args:
        points_224_yup: (..., K, 2) crop pixels, y up.
        trans_params: (5,) ``[w0, h0, s, tx, ty_yup]`` of that frame.
        crop_box: (4,) ``[left, up, w, h]`` as the aligner cut it
            (:attr:`engine.structures.AlignedBatch.crop_box`); None: ``w = int(w0 * s)``,
            ``h = int(h0 * s)`` recomputed from ``trans_params``, which from float32 values can
            be one pixel off the size used at extraction.

    Returns:
        (..., K, 2) float64 original-image pixels, y up.
    """
    w0, h0, s, tx, ty = (float(v) for v in np.asarray(trans_params, dtype=np.float64))
    if crop_box is None:
        w = float(np.int32(w0 * s))
        h = float(np.int32(h0 * s))
    else:
        w, h = (float(v) for v in np.asarray(crop_box)[2:4])
    p = np.asarray(points_224_yup, dtype=np.float64)
    out = np.empty_like(p)
    out[..., 0] = (p[..., 0] + (w / 2 - CROP_SIZE / 2)) / s + tx - w0 / 2
    out[..., 1] = (p[..., 1] + (h / 2 - CROP_SIZE / 2)) / s + ty - h0 / 2
    return out


def wrap_deg(angle_deg: np.ndarray | float) -> np.ndarray:
    """Wrap angles in degrees to [-180, 180): ``((a + 180) mod 360) - 180``. NaN stays NaN.

    Deep3D's stored angles are radians without a range; every display of an angle goes
    through this (charts, captions, tables, the frame viewer).

    >>> wrap_deg(np.array([346.9, 180.0, -190.0, 45.0])).round(1).tolist()
    [-13.1, -180.0, 170.0, 45.0]
    """
    a = np.asarray(angle_deg, dtype=np.float64)
    return np.mod(a + 180.0, 360.0) - 180.0
