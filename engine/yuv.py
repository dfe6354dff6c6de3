"""FFmpeg's YUV 4:2:0 → RGB conversion, bit for bit, as a torch function (so it can run on a GPU).

PyAV's ``to_ndarray(format="rgb24")`` of an 8-bit ``yuv420p`` frame of even height goes through
libswscale's unscaled converter. On x86-64 that is its SSSE3 routine, which works in 16-bit
fixed point: each sample is shifted left by 3, the offset taken off, and multiplied by a
coefficient with ``pmulhw`` (the high 16 bits of the 32-bit product, i.e. ``(a * b) >> 16``
rounded towards −∞); the terms are added and the result clamped to 0…255. Each chroma sample
serves the 2×2 luma samples it covers (no interpolation). The coefficients come from the
frame's colour matrix (BT.601 or BT.709) and range (limited or full), as libswscale derives
them in ``ff_yuv2rgb_c_init_tables``.

:func:`to_rgb` does the same arithmetic with torch's integer types on any device. Integer
arithmetic has one answer on every device, so a GPU gives the same bytes as the CPU. Which frames qualify is not
assumed: :func:`agrees_with_ffmpeg` converts random planes of each supported matrix and range
with the installed PyAV and compares every byte (another CPU, e.g. an ARM one with its own
NEON routine, or another FFmpeg may round differently); :func:`frame_matrix` then says which
frames may take this path. Everything else stays with FFmpeg on the host.

Coordinates: planes are image rows top to bottom (y down), as decoded; luma (H, W), chroma
(ceil(H/2), ceil(W/2)); the RGB output is uint8 (..., H, W, 3).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: libswscale's YUV → RGB coefficients per colour matrix, in units of 2**-16, in its order:
#: V → R, U → B, U → G, V → G (the two green ones are subtracted).
MATRIX_COEFFS = {"bt601": (104597, 132201, 25675, 53279), "bt709": (117489, 138438, 13975, 34925)}

#: FFmpeg's ``AVColorSpace`` values → the matrix libswscale uses for them. Other values
#: (FCC, SMPTE 240M, BT.2020, ...) are left to FFmpeg.
MATRIX_OF_COLORSPACE = {1: "bt709", 2: "bt601", 5: "bt601", 6: "bt601"}

#: FFmpeg's ``AVColorRange`` values → full range (JPEG) or not (MPEG; 0 is "unspecified").
FULL_RANGE_OF_COLOR_RANGE = {0: False, 1: False, 2: True}


@dataclass(frozen=True)
class Coefficients:
    """libswscale's fixed-point coefficients of one matrix and range (int16 values)."""

    y: int
    v_r: int
    u_b: int
    u_g: int
    v_g: int
    y_offset: int


def _round_to_int16(value: int) -> int:
    """libswscale's ``roundToInt16``: ``value`` in units of 2**-16, rounded, clamped to int16."""
    r = (value + (1 << 15)) >> 16
    return -0x8000 if r < -0x7FFF else min(0x7FFF, r)


def _scaled(c: int, num: int, den: int) -> int:
    """``c * num / den`` truncated towards zero, as C's int64 division."""
    q = abs(c) * num // den
    return q if c >= 0 else -q


def coefficients(matrix: str, full_range: bool) -> Coefficients:
    """The coefficients libswscale derives for ``matrix`` (:data:`MATRIX_COEFFS`) and range, with
    its default brightness (0), contrast and saturation (1).

    >>> coefficients("bt601", False)
    Coefficients(y=9539, v_r=13075, u_b=16525, u_g=-3209, v_g=-6660, y_offset=128)
    """
    v_r, u_b, u_g, v_g = MATRIX_COEFFS[matrix]
    u_g, v_g = -u_g, -v_g
    y, y_offset = 1 << 16, 0
    if full_range:
        v_r, u_b, u_g, v_g = (_scaled(c, 224, 255) for c in (v_r, u_b, u_g, v_g))
    else:
        y, y_offset = _scaled(y, 255, 219), 16 << 16
    return Coefficients(y=_round_to_int16(y << 13), v_r=_round_to_int16(v_r << 13), u_b=_round_to_int16(u_b << 13),
                        u_g=_round_to_int16(u_g << 13), v_g=_round_to_int16(v_g << 13),
                        y_offset=_round_to_int16(y_offset << 3))


def to_rgb(y, u, v, coeffs: Coefficients):
    """uint8 (..., H, W, 3) RGB of 8-bit 4:2:0 planes, libswscale's fixed-point arithmetic.

    The chroma terms depend on chroma alone, so they are computed at chroma resolution and then
    spread over the 2×2 luma samples of each; the sums fit int16, which keeps the full-size
    temporaries at 2 bytes a value.

    Args:
        y: uint8 (..., H, W) luma tensor.
        u, v: uint8 (..., ceil(H/2), ceil(W/2)) chroma tensors, on ``y``'s device.
        coeffs: :func:`coefficients` of the frames' matrix and range.
    """
    import torch

    h, w = y.shape[-2:]

    def high(a, k: int):  # pmulhw: the high half of the 32-bit product, rounded towards −∞
        return torch.bitwise_right_shift(a * k, 16)

    cu = u.to(torch.int32) * 8 - 1024  # (U − 128) << 3
    cv = v.to(torch.int32) * 8 - 1024
    chroma = torch.stack([high(cv, coeffs.v_r), high(cu, coeffs.u_g) + high(cv, coeffs.v_g), high(cu, coeffs.u_b)],
                         dim=-1).to(torch.int16)  # (..., ceil(H/2), ceil(W/2), 3): R, G, B terms
    chroma = chroma.repeat_interleave(2, dim=-3).repeat_interleave(2, dim=-2)[..., :h, :w, :]
    luma = high(y.to(torch.int32) * 8 - coeffs.y_offset, coeffs.y).to(torch.int16)
    return (luma.unsqueeze(-1) + chroma).clamp_(0, 255).to(torch.uint8)


def frame_matrix(frame) -> tuple[str, bool] | None:
    """(matrix, full range) of a decoded PyAV frame this module converts as FFmpeg does, or None:
    not 8-bit ``yuv420p``, odd height (libswscale then takes its general path), a colour matrix
    or range outside :data:`MATRIX_OF_COLORSPACE` / :data:`FULL_RANGE_OF_COLOR_RANGE`, or one
    :func:`agrees_with_ffmpeg` did not confirm."""
    if frame.format.name != "yuv420p" or frame.height % 2:
        return None
    matrix = MATRIX_OF_COLORSPACE.get(int(getattr(frame, "colorspace", 2)))
    full = FULL_RANGE_OF_COLOR_RANGE.get(int(getattr(frame, "color_range", 0)))
    if matrix is None or full is None or (matrix, full) not in agrees_with_ffmpeg():
        return None
    return matrix, full


def _plane_view(plane, rows: int, cols: int) -> np.ndarray:
    """uint8 (rows, cols) view of a PyAV frame plane, each row's padding (``line_size``) cut off."""
    return np.frombuffer(plane, dtype=np.uint8)[: rows * plane.line_size].reshape(rows, plane.line_size)[:, :cols]


def planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Y, U and V planes of a ``yuv420p`` PyAV frame as uint8 (H, W) and (ceil(H/2), ceil(W/2))
    views (each row's padding cut off)."""
    w, h = frame.width, frame.height
    chroma = ((h + 1) // 2, (w + 1) // 2)
    y, u, v = (_plane_view(p, *shape) for p, shape in zip(frame.planes, ((h, w), chroma, chroma), strict=True))
    return y, u, v


def frame_of(y: np.ndarray, u: np.ndarray, v: np.ndarray, fmt: str = "yuv420p", colorspace: int = 2,
             color_range: int = 1):
    """A PyAV frame of format ``fmt`` holding the uint8 planes ``y`` (H, W), ``u`` and ``v``,
    tagged with FFmpeg's ``colorspace`` and ``color_range`` values (default: BT.601, limited).

    Raises:
        AttributeError, TypeError, ValueError: a PyAV whose frames cannot be tagged.
    """
    import av

    h, w = y.shape
    frame = av.VideoFrame(w, h, fmt)
    for plane, values in zip(frame.planes, (y, u, v), strict=True):
        _plane_view(plane, *values.shape)[:] = values
    frame.colorspace, frame.color_range = colorspace, color_range
    return frame


@functools.cache
def agrees_with_ffmpeg() -> frozenset[tuple[str, bool]]:
    """The (matrix, full range) pairs for which :func:`to_rgb` gives the installed PyAV's bytes.

    Converts random planes (every value 0…255 occurs; an even height and an odd width) tagged
    with each supported matrix and range through ``engine.avcompat.to_rgb24``, the engine's own
    host conversion, and keeps the pairs that match in every byte. Asked once per process.
    """
    import torch

    from engine.avcompat import to_rgb24

    rng = np.random.default_rng(0)
    h, w = 48, 250
    y = rng.integers(0, 256, (h, w), dtype=np.uint8)
    u, v = (rng.integers(0, 256, (h // 2, (w + 1) // 2), dtype=np.uint8) for _ in range(2))
    for plane, order in ((y, 1), (u, 1), (v, -1)):  # every value, for certain
        plane.flat[:256] = np.arange(256, dtype=np.uint8)[::order]
    agreed = set()
    colorspace_of = {"bt601": 2, "bt709": 1}
    for matrix, colorspace in colorspace_of.items():
        for full, color_range in ((False, 1), (True, 2)):
            try:
                frame = frame_of(y, u, v, colorspace=colorspace, color_range=color_range)
            except (AttributeError, TypeError, ValueError):  # a PyAV without these setters: FFmpeg keeps them
                return frozenset()
            want = to_rgb24(frame)
            got = to_rgb(*(torch.from_numpy(p) for p in (y, u, v)), coefficients(matrix, full)).numpy()
            if np.array_equal(got, want):
                agreed.add((matrix, full))
    if len(agreed) < 4:
        log.info("FFmpeg's YUV→RGB differs from engine.yuv for %s: those frames convert on the host",
                 sorted({(m, f) for m in colorspace_of for f in (False, True)} - agreed))
    return frozenset(agreed)
