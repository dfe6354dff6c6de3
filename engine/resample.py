"""Pillow's bicubic ``resize`` + zero-padded crop, computed only for the crop window, in torch.

:func:`engine.align.align_image` resizes the *whole* frame with Pillow
(``Image.resize((w, h), BICUBIC)``) and then cuts a 224×224 box out of it
(``crop((left, up, left + 224, up + 224))``, zero outside the resized frame). This module
gives the same uint8 pixels, bit for bit, while computing only the window, for many frames
at once, on any torch device.

Pillow's algorithm (libImaging ``Resample.c``, 8-bit images), as reproduced here:

* One axis at a time, per output index ``xx`` of an ``in → out`` resize: ``scale = in/out``,
  ``filterscale = max(scale, 1)``, ``support = 2 * filterscale``,
  ``center = (xx + 0.5) * scale``, taps ``x`` in ``[xmin, xmax)`` with
  ``xmin = max(trunc(center - support + 0.5), 0)`` and
  ``xmax = min(trunc(center + support + 0.5), in)``; weight of tap ``x`` is the Keys cubic
  (a = -0.5) at ``(x - center + 0.5) * (1 / filterscale)``, normalised by the taps' sum
  (summed in tap order), then made a 22-bit fixed-point integer
  (``trunc(w * 2**22 ± 0.5)``, rounding half away from zero).
* A horizontal pass (only when the width changes) and a vertical pass (only when the
  height changes), each ``acc = 2**21 + Σ pixel * weight``, ``out = clip(acc >> 22, 0, 255)``
  (arithmetic shift: floor), stored as uint8; the second pass reads the first one's uint8
  output. A skipped pass is the identity, which the tap ``weight = 2**22`` reproduces exactly.
* Pass order: Pillow ≤ 12 always runs the horizontal pass first; Pillow 13 runs the
  vertical one first when the height shrinks by more than twice as many pixels as the width
  (:func:`vertical_first`). The rounding between passes makes the orders differ, so the
  rule of the installed Pillow is followed by default (:func:`installed_pass_order`).

Exactness: every product ``uint8 × 22-bit int`` and every partial sum over a frame's source
window stays an integer below 2**53, so float64 matmuls are exact in any summation order
(also cuBLAS DGEMM, with or without FMA); ``floor(acc / 2**22)`` is exact too. The two passes
are therefore dense float64 band matrices restricted to the window:

* horizontal: ``(3·Hs, Ws) @ (Ws, 224)`` per frame,
* vertical: ``(224, Hs) @ (Hs, 224·3)`` per frame (vertical first: ``(224, Hs) @ (Hs, 3·Ws)``
  then ``(3·224, Ws) @ (Ws, 224)``),

where ``Hs × Ws`` is the frame's *source window* (the source rows/columns the 224 window's
taps read: about ``224 / s + 4 / min(s, 1)`` per axis for a resize by ``s``).

Cost model (per crop, float64): ``2·3·Hs·Ws·224 + 2·3·224·Hs·224`` FLOPs. A typical face
(``s ≈ 0.65``, window ≈ 350²) is ≈ 0.27 GFLOP; a 4K close-up (``s = 0.1``, window ≈ 2280²)
≈ 7.7 GFLOP; an upscale (``s ≥ 1``, window ≤ 228²) ≤ 0.14 GFLOP. Host → device traffic is the
uint8 source window (``3·Hs·Ws`` bytes, never the whole frame) plus the compact taps
(``2 · 224 · K`` float64, ``K = 2·ceil(2 / min(s, 1)) + 1``). Device memory per frame is about
``Hs·Ws·3·(1 + 8 + 8) + Hs·224·3·16 + 224·(Hs + Ws)·8`` bytes; frames are processed in chunks
that fit ``max_bytes``.

Frames: images are uint8 ``(H, W, 3)`` RGB, y down (rows first); a crop box is
``(left, up, w, h)``: the frame resized to ``w × h`` pixels, the crop's top-left corner at
``(left, up)`` in it (may be negative or past the edge), as
:attr:`engine.structures.AlignedBatch.crop_box`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.checks import check_shape
from engine.conventions import CROP_SIZE
from engine.frames import on_device, to_torch, zeros_like_frames

log = logging.getLogger(__name__)

#: Pillow's fixed-point precision for 8-bit images (``32 - 8 - 2``).
PRECISION_BITS = 22
_ONE = float(1 << PRECISION_BITS)
_HALF = float(1 << (PRECISION_BITS - 1))

#: Support of Pillow's bicubic filter, in source pixels at scale 1.
BICUBIC_SUPPORT = 2.0

#: Pass-order rules: Pillow ≤ 12 always resizes horizontally first (what Deep3DFaceRecon ran
#: with); Pillow 13 runs the vertical pass first when the height shrinks by more than twice
#: as many pixels as the width (``ImagingResampleInner``). The uint8 rounding between the
#: passes makes the two orders differ.
HORIZONTAL_FIRST = "horizontal-first"
PILLOW13 = "pillow13"
PASS_ORDERS = (HORIZONTAL_FIRST, PILLOW13)

#: Default device memory budget of one chunk of frames (bytes).
DEFAULT_MAX_BYTES = 512 << 20


def bicubic_filter(x: np.ndarray) -> np.ndarray:
    """Keys cubic with a = -0.5 (Pillow's ``BICUBIC``), float64, Pillow's order of operations.

    ``|x| < 1``: ``((1.5|x| - 2.5)|x|)|x| + 1``; ``1 ≤ |x| < 2``:
    ``(((|x| - 5)|x| + 8)|x| - 4)(-0.5)``; else 0.

    >>> bicubic_filter(np.array([0.0, 0.5, 1.5, 2.0])).tolist()
    [1.0, 0.5625, -0.0625, 0.0]
    """
    ax = np.abs(np.asarray(x, dtype=np.float64))
    near = ((1.5 * ax - 2.5) * ax) * ax + 1.0
    far = (((ax - 5.0) * ax + 8.0) * ax - 4.0) * -0.5
    return np.where(ax < 1.0, near, np.where(ax < 2.0, far, 0.0))


@dataclass(frozen=True)
class AxisTaps:
    """The taps of one axis of a resize, for a window of consecutive output indices.

    Attributes:
        first: int64 (L,) first source index read by each output index of the window (0 where
            the output index lies outside the resized axis).
        weights: float64 (L, K) weight of source index ``first + k``: integer-valued 22-bit
            fixed point (sums ≈ 2**22); 0 past an index's taps and on rows outside the axis
            (those crop pixels are the zero padding).
        src_start: first source index the window reads.
        src_stop: one past the last one (``src_start == src_stop``: the window reads nothing).
    """

    first: np.ndarray
    weights: np.ndarray
    src_start: int
    src_stop: int

    @property
    def src_size(self) -> int:
        """Number of source indices the window reads."""
        return self.src_stop - self.src_start


def _trunc_int(x: np.ndarray) -> np.ndarray:
    """C's ``(int)`` cast of doubles: truncation toward zero, as int64."""
    return np.trunc(x).astype(np.int64)


def to_fixed_point(w: np.ndarray) -> np.ndarray:
    """Pillow's ``normalize_coeffs_8bpc``: ``trunc(w·2**22 + 0.5)`` (``- 0.5`` for w < 0), float64.

    >>> to_fixed_point(np.array([0.5, -0.25, 1e-9])).tolist()
    [2097152.0, -1048576.0, 0.0]
    """
    scaled = np.asarray(w, dtype=np.float64) * _ONE
    return np.trunc(np.where(w < 0, -0.5 + scaled, 0.5 + scaled))


def axis_taps(in_size: int, out_size: int, start: int, length: int = CROP_SIZE) -> AxisTaps:
    """Fixed-point bicubic taps of output indices ``start .. start + length - 1`` of an ``in → out`` resize.

    Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for just those indices. When
    ``in_size == out_size`` Pillow skips the pass; the taps are then the identity
    (one tap of weight 2**22), which gives the same uint8 values.

    Args:
        in_size: source pixels along the axis (≥ 1).
        out_size: resized pixels along the axis (≥ 1).
        start: first output index of the window (may be negative or ≥ ``out_size``).
        length: window length (the crop size).

    Returns:
        :class:`AxisTaps` with ``L = length``.

    >>> t = axis_taps(4, 2, 0, 3)
    >>> t.first.tolist(), t.weights.sum(axis=1).tolist(), (t.src_start, t.src_stop)
    ([0, 0, 0], [4194304.0, 4194304.0, 0.0], (0, 4))
    """
    if in_size < 1 or out_size < 1 or length < 1:
        raise ValueError(f"axis_taps: sizes must be positive, got in={in_size}, out={out_size}, length={length}")
    xx = np.arange(start, start + length, dtype=np.int64)
    inside = (xx >= 0) & (xx < out_size)
    xv = xx[inside]
    if in_size == out_size:
        first = np.zeros(length, dtype=np.int64)
        first[inside] = xv
        weights = np.zeros((length, 1), dtype=np.float64)
        weights[inside, 0] = _ONE
        lo, hi = (int(xv[0]), int(xv[-1]) + 1) if xv.size else (0, 0)
        return AxisTaps(first, weights, lo, hi)

    scale = float(in_size) / float(out_size)
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (xv.astype(np.float64) + 0.5) * scale
    xmin = np.maximum(_trunc_int(center - support + 0.5), 0)
    xmax = np.minimum(_trunc_int(center + support + 0.5), in_size)
    count = xmax - xmin
    k = np.arange(ksize, dtype=np.int64)
    arg = ((k[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(k[None, :] < count[:, None], bicubic_filter(arg), 0.0)
    total = np.zeros(xv.shape[0], dtype=np.float64)
    for j in range(ksize):  # Pillow sums the taps in order; keep that order, not a pairwise sum
        total = total + w[:, j]
    safe = np.where(total != 0.0, total, 1.0)
    w = np.where(total[:, None] != 0.0, w / safe[:, None], w)

    first = np.zeros(length, dtype=np.int64)
    first[inside] = xmin
    weights = np.zeros((length, ksize), dtype=np.float64)
    weights[inside] = to_fixed_point(w)
    lo, hi = (int(xmin.min()), int(xmax.max())) if xv.size else (0, 0)
    return AxisTaps(first, weights, lo, hi)


@dataclass(frozen=True)
class BatchAxisTaps:
    """:class:`AxisTaps` of one axis for N windows at once (N resizes, each its own sizes).

    Attributes:
        first: int64 (N, L) as :attr:`AxisTaps.first`, per window.
        weights: float64 (N, L, K) as :attr:`AxisTaps.weights`, ``K`` = the largest tap count;
            window i uses the first ``ksize[i]`` columns (the rest are 0).
        ksize: int64 (N,) Pillow's tap count of each window's resize (1 where the size is kept).
        src_start: int64 (N,) first source index each window reads.
        src_stop: int64 (N,) one past the last one.
    """

    first: np.ndarray
    weights: np.ndarray
    ksize: np.ndarray
    src_start: np.ndarray
    src_stop: np.ndarray

    def window(self, i: int) -> AxisTaps:
        """Window ``i`` as :class:`AxisTaps` (views; weights cut to its own ``ksize``)."""
        return AxisTaps(self.first[i], self.weights[i, :, : int(self.ksize[i])],
                        int(self.src_start[i]), int(self.src_stop[i]))


def _resize_taps(xx: np.ndarray, in_sz: np.ndarray, scale: np.ndarray,
                 ksize: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps of output indices ``xx`` (G, L) of G resizes with one tap count ``ksize``.

    :func:`axis_taps`'s float64 operations, element for element. Returns xmin, xmax (int64
    (G, L)) and fixed-point weights (G, L, ksize); rows outside a resized axis are not masked.
    """
    filterscale = np.maximum(scale, 1.0)[:, None]
    support = BICUBIC_SUPPORT * filterscale
    center = (xx.astype(np.float64) + 0.5) * scale[:, None]
    xmin = np.maximum(_trunc_int(center - support + 0.5), 0)
    xmax = np.minimum(_trunc_int(center + support + 0.5), in_sz[:, None])
    k = np.arange(ksize, dtype=np.int64)
    arg = ((k + xmin[:, :, None]).astype(np.float64) - center[:, :, None] + 0.5) * (1.0 / filterscale)[:, :, None]
    w = np.where(k < (xmax - xmin)[:, :, None], bicubic_filter(arg), 0.0)
    total = np.zeros(xx.shape, dtype=np.float64)
    for j in range(ksize):  # Pillow sums the taps in order; keep that order, not a pairwise sum
        total = total + w[:, :, j]
    nonzero = total != 0.0
    w = np.where(nonzero[:, :, None], w / np.where(nonzero, total, 1.0)[:, :, None], w)
    return xmin, xmax, to_fixed_point(w)


class TapsCache:
    """Taps of whole resized axes, kept per ``(in_size, out_size)``, so a video's frames (whose
    crops resize the same frame to nearly the same size, frame after frame) reuse them.

    A window's taps are rows ``start .. start + L - 1`` of its axis' table: each output index's
    taps depend on the resize only, not on the window, so a cut of the table equals
    :func:`axis_taps` bit for bit. Keeps the tables used last, at most ``max_bytes`` of them
    (a 1080p frame's table is 20–100 kB); safe to share between threads (tables are read-only).
    Axes resized to more than ``max_rows`` pixels (small faces upscaled: a table would cost many
    windows) are left to :func:`batch_axis_taps`'s per-window computation.

    >>> cache = TapsCache()
    >>> xmin, xmax, w = cache.axis(4, 2)
    >>> xmin.tolist(), xmax.tolist(), w.sum(axis=1).tolist(), len(cache)
    ([0, 0], [4, 4], [4194304.0, 4194304.0], 1)
    """

    def __init__(self, max_bytes: int = 32 << 20, max_rows: int = 8 * CROP_SIZE) -> None:
        self.max_bytes, self.max_rows = max_bytes, max_rows
        self._tables: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tables)

    def axis(self, in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 (out,) ``xmin``, int64 (out,) ``xmax`` and float64 (out, K) fixed-point weights
        of every output index of an ``in_size → out_size`` resize (K: Pillow's tap count; 1 and
        the identity when the size is kept)."""
        key = (int(in_size), int(out_size))
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                return table
        table = _axis_table(*key)
        with self._lock:
            if key not in self._tables:
                self._tables[key] = table
                self._bytes += sum(a.nbytes for a in table)
            while self._bytes > self.max_bytes and len(self._tables) > 1:
                _, dropped = self._tables.popitem(last=False)
                self._bytes -= sum(a.nbytes for a in dropped)
        return table


def _axis_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`TapsCache.axis` computed: :func:`_resize_taps` over ``0 .. out_size - 1``."""
    xx = np.arange(out_size, dtype=np.int64)
    if in_size == out_size:
        xmin, xmax, w = xx, xx + 1, np.full((out_size, 1), _ONE)
    else:
        scale = np.array([float(in_size) / float(out_size)])
        ksize = int(np.ceil(BICUBIC_SUPPORT * max(scale[0], 1.0))) * 2 + 1
        xmin, xmax, w = (a[0] for a in _resize_taps(xx[None], np.array([in_size]), scale, ksize))
    for a in (xmin, xmax, w):
        a.setflags(write=False)
    return xmin, xmax, w


def batch_axis_taps(in_sizes: np.ndarray, out_sizes: np.ndarray, starts: np.ndarray,
                    length: int = CROP_SIZE, cache: TapsCache | None = None) -> BatchAxisTaps:
    """:func:`axis_taps` for N windows in one set of numpy operations (no per-window Python loop).

    Every element goes through the same float64 operations as in :func:`axis_taps` (the taps
    are summed in tap order too; columns past a window's own ``ksize`` are zeros and add
    nothing), so window i equals ``axis_taps(in_sizes[i], out_sizes[i], starts[i], length)``
    bit for bit.

    Args:
        in_sizes, out_sizes, starts: int (N,) per window, as :func:`axis_taps`'s arguments.
        length: window length (the crop size).
        cache: cut the windows from its whole-axis tables (:class:`TapsCache`; the same bits)
            instead of computing each window's taps.
    """
    in_sz = np.asarray(in_sizes, dtype=np.int64).reshape(-1)
    out_sz = np.asarray(out_sizes, dtype=np.int64).reshape(-1)
    start = np.asarray(starts, dtype=np.int64).reshape(-1)
    n = in_sz.shape[0]
    if out_sz.shape[0] != n or start.shape[0] != n:
        raise ValueError(f"batch_axis_taps: {n} in sizes, {out_sz.shape[0]} out sizes, {start.shape[0]} starts")
    if length < 1 or (n and (in_sz.min() < 1 or out_sz.min() < 1)):
        raise ValueError(f"batch_axis_taps: sizes must be positive (in ≥ 1, out ≥ 1, length={length} ≥ 1)")
    xx = start[:, None] + np.arange(length, dtype=np.int64)  # (N, L)
    inside = (xx >= 0) & (xx < out_sz[:, None])
    same = in_sz == out_sz
    scale = in_sz.astype(np.float64) / out_sz.astype(np.float64)
    support = BICUBIC_SUPPORT * np.maximum(scale, 1.0)
    ksize = np.where(same, 1, np.ceil(support).astype(np.int64) * 2 + 1)
    weights = np.zeros((n, length, int(ksize.max()) if n else 1), dtype=np.float64)
    # A kept size is the identity: one tap of weight 2**22 at the index itself.
    xmin, xmax = xx.copy(), xx + 1
    direct = np.ones(n, dtype=bool)  # windows whose taps are computed here, not cut from a table
    if cache is not None:  # a few distinct resizes per batch: one table cut each
        direct = out_sz > cache.max_rows
        tabled = np.flatnonzero(~direct)
        pairs, which = np.unique(np.stack([in_sz[tabled], out_sz[tabled]], axis=1), axis=0, return_inverse=True)
        for p, (i_sz, o_sz) in enumerate(pairs.tolist()):
            g = tabled[which.reshape(-1) == p]
            t_min, t_max, t_w = cache.axis(i_sz, o_sz)
            idx = np.clip(xx[g], 0, o_sz - 1)
            xmin[g], xmax[g], weights[g, :, :t_w.shape[1]] = t_min[idx], t_max[idx], t_w[idx]
    weights[same & direct, :, 0] = _ONE
    for kk in np.unique(ksize[~same & direct]):  # a few tap counts per batch: one vectorised group each
        g = np.flatnonzero(~same & direct & (ksize == kk))
        xmin[g], xmax[g], weights[g, :, :kk] = _resize_taps(xx[g], in_sz[g], scale[g], int(kk))
    weights[~inside] = 0.0
    first = np.where(inside, xmin, 0)
    any_inside = inside.any(axis=1)
    lo = np.where(inside, xmin, np.iinfo(np.int64).max).min(axis=1, initial=np.iinfo(np.int64).max)
    hi = np.where(inside, xmax, -1).max(axis=1, initial=-1)
    return BatchAxisTaps(first, weights, ksize, np.where(any_inside, lo, 0), np.where(any_inside, hi, 0))


def installed_pass_order() -> str:
    """The installed Pillow's pass-order rule: :data:`PILLOW13` from Pillow 13 on, else :data:`HORIZONTAL_FIRST`."""
    import PIL

    major = int(PIL.__version__.split(".")[0])
    return PILLOW13 if major >= 13 else HORIZONTAL_FIRST


def vertical_first(in_wh: tuple[int, int], out_wh: tuple[int, int], pass_order: str) -> bool:
    """Whether Pillow runs the vertical pass before the horizontal one for an ``in_wh → out_wh`` resize.

    :data:`HORIZONTAL_FIRST` (Pillow ≤ 12): never. :data:`PILLOW13`: when the height shrinks by
    more than twice as many pixels as the width (``h0 - h > 0`` and ``h0 - h > 2 (w0 - w)``).
    Only matters when both passes run (both sizes change).

    >>> vertical_first((100, 300), (90, 200), PILLOW13), vertical_first((100, 300), (90, 200), HORIZONTAL_FIRST)
    (True, False)
    """
    if pass_order not in PASS_ORDERS:
        raise ValueError(f"pass_order: expected one of {PASS_ORDERS}, got {pass_order!r}")
    (w0, h0), (w, h) = in_wh, out_wh
    return pass_order == PILLOW13 and h0 - h > 0 and h0 - h > 2 * (w0 - w)


@dataclass(frozen=True)
class CropTaps:
    """Everything one frame's crop needs: its taps per axis (y: rows, x: columns) and the pass order."""

    y: AxisTaps
    x: AxisTaps
    vertical_first: bool = False


def crop_taps(
    frame_hw: tuple[int, int], crop_box: Sequence[int], size: int = CROP_SIZE, pass_order: str = PILLOW13
) -> CropTaps:
    """Taps of the ``size × size`` crop at ``crop_box = (left, up, w, h)`` of an (H, W) frame resized to w × h."""
    h0, w0 = (int(v) for v in frame_hw)
    left, up, w, h = (int(v) for v in crop_box)
    return CropTaps(y=axis_taps(h0, h, up, size), x=axis_taps(w0, w, left, size),
                    vertical_first=vertical_first((w0, h0), (w, h), pass_order))


def batch_crop_taps(frame_hw: np.ndarray, crop_boxes: np.ndarray, size: int = CROP_SIZE,
                    pass_order: str = PILLOW13, cache: TapsCache | None = None) -> list[CropTaps]:
    """:func:`crop_taps` of N frames at once, bit for bit (:func:`batch_axis_taps` for both axes).

    Args:
        frame_hw: int (N, 2) each frame's (H, W).
        crop_boxes: int (N, 4) ``[left, up, w, h]`` per frame.
        size: crop side in pixels.
        pass_order: :data:`HORIZONTAL_FIRST` or :data:`PILLOW13`.
        cache: see :func:`batch_axis_taps`.
    """
    if pass_order not in PASS_ORDERS:
        raise ValueError(f"pass_order: expected one of {PASS_ORDERS}, got {pass_order!r}")
    hw = np.asarray(frame_hw, dtype=np.int64).reshape(-1, 2)
    boxes = np.asarray(crop_boxes, dtype=np.int64).reshape(-1, 4)
    n = hw.shape[0]
    if boxes.shape[0] != n:
        raise ValueError(f"batch_crop_taps: {n} frame sizes but {boxes.shape[0]} crop boxes")
    # Rows and columns of all frames in one call: windows 0..n-1 are the y axes, n..2n-1 the x axes.
    both = batch_axis_taps(np.concatenate([hw[:, 0], hw[:, 1]]), np.concatenate([boxes[:, 3], boxes[:, 2]]),
                           np.concatenate([boxes[:, 1], boxes[:, 0]]), size, cache)
    dh, dw = hw[:, 0] - boxes[:, 3], hw[:, 1] - boxes[:, 2]
    vfirst = (pass_order == PILLOW13) & (dh > 0) & (dh > 2 * dw)
    return [CropTaps(y=both.window(i), x=both.window(n + i), vertical_first=bool(vfirst[i])) for i in range(n)]


def _dense_band(first: torch.Tensor, weights: torch.Tensor, src_start: torch.Tensor, width: int) -> torch.Tensor:
    """float64 (B, L, width) band matrices from compact taps (B, L), (B, L, K), (B,) on one device."""
    b, length, k = weights.shape
    dense = torch.zeros((b, length, max(width, 1)), dtype=torch.float64, device=weights.device)
    idx = first - src_start[:, None]
    idx = (idx[:, :, None] + torch.arange(k, device=weights.device)).clamp_(0, max(width, 1) - 1)
    # Taps past an index's count have weight 0 and may be clamped onto a real column: adding 0 is harmless.
    return dense.scatter_add_(2, idx, weights)


def _shift_round(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's ``clip8``: ``clip((acc + 2**21) >> 22, 0, 255)`` on exact integer-valued float64."""
    return torch.floor((acc + _HALF) * (1.0 / _ONE)).clamp_(0.0, 255.0)


def _frame_bytes(hs: int, ws: int, size: int) -> int:
    """Estimated device bytes one frame of a chunk needs (uint8 + float64 window, intermediates, bands)."""
    return hs * ws * 3 * 17 + hs * size * 3 * 16 + size * (hs + ws) * 8 + size * size * 3 * 17


def _chunks(areas: list[tuple[int, int]], size: int, max_bytes: int) -> list[list[int]]:
    """Frame indices grouped so that ``len(group) × bytes(max window of the group)`` ≤ max_bytes (≥ 1 frame)."""
    order = sorted(range(len(areas)), key=lambda i: areas[i][0] * areas[i][1], reverse=True)
    groups: list[list[int]] = []
    cur: list[int] = []
    hmax = wmax = 0
    for i in order:
        hs, ws = areas[i]
        nh, nw = max(hmax, hs), max(wmax, ws)
        if cur and (len(cur) + 1) * _frame_bytes(nh, nw, size) > max_bytes:
            groups.append(cur)
            cur, nh, nw = [], hs, ws
        cur.append(i)
        hmax, wmax = nh, nw
    if cur:
        groups.append(cur)
    return groups


def crops_from_taps(
    images: Sequence[np.ndarray] | torch.Tensor,
    taps: Sequence[CropTaps],
    *,
    device: str | torch.device = "cpu",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Apply per-frame taps: one pass, uint8 rounding, the other pass, uint8 rounding.

    Horizontal first, or vertical first where ``taps[i].vertical_first``.

    Only each frame's source window (``taps.y.src_start:src_stop`` × ``taps.x…``) is copied
    and uploaded, padded with zeros to the chunk's largest window.

    Args:
        images: B uint8 (H_i, W_i, 3) RGB frames, y down (sizes may differ), or a (B, H, W, 3)
            tensor of frames kept on the device (their windows are cut there, no upload).
        taps: B :class:`CropTaps`, every one with the same window length L.
        device: where the matmuls run and the result lives.
        max_bytes: device memory budget of one chunk (a bigger single frame runs alone).

    Returns:
        uint8 (B, L, L, 3) tensor on ``device``.
    """
    if len(images) != len(taps):
        raise ValueError(f"crops_from_taps: {len(images)} images but {len(taps)} taps")
    device = torch.device(device)
    size = taps[0].x.first.shape[0] if taps else CROP_SIZE
    out = torch.zeros((len(images), size, size, 3), dtype=torch.uint8, device=device)
    if not taps:
        return out
    areas = [(t.y.src_size, t.x.src_size) for t in taps]
    groups = []
    for vfirst in (False, True):
        part = [i for i, t in enumerate(taps) if t.vertical_first == vfirst]
        groups += [[part[j] for j in g] for g in _chunks([areas[i] for i in part], size, max_bytes)]
    for group in groups:
        hs = max(1, max(areas[i][0] for i in group))
        ws = max(1, max(areas[i][1] for i in group))
        ky = max(taps[i].y.weights.shape[1] for i in group)
        kx = max(taps[i].x.weights.shape[1] for i in group)
        n = len(group)
        win = zeros_like_frames(images, (n, hs, ws, 3))  # on the host, or on the frames' device
        first = np.zeros((2, n, size), dtype=np.int64)
        start = np.zeros((2, n), dtype=np.int64)
        wy = np.zeros((n, size, ky), dtype=np.float64)
        wx = np.zeros((n, size, kx), dtype=np.float64)
        for j, i in enumerate(group):
            t = taps[i]
            src = images[i][t.y.src_start:t.y.src_stop, t.x.src_start:t.x.src_stop]
            win[j, :src.shape[0], :src.shape[1]] = src
            first[0, j], first[1, j] = t.y.first, t.x.first
            start[:, j] = (t.y.src_start, t.x.src_start)
            wy[j, :, :t.y.weights.shape[1]] = t.y.weights
            wx[j, :, :t.x.weights.shape[1]] = t.x.weights
        win_d = to_torch(win, device)
        first_d, start_d = torch.from_numpy(first).to(device), torch.from_numpy(start).to(device)
        band_y = _dense_band(first_d[0], torch.from_numpy(wy).to(device), start_d[0], hs)  # (n, L, hs)
        band_x = _dense_band(first_d[1], torch.from_numpy(wx).to(device), start_d[1], ws)  # (n, L, ws)
        src = win_d.permute(0, 3, 1, 2).to(torch.float64)  # (n, 3, hs, ws)
        if taps[group[0]].vertical_first:
            mid = _shift_round(torch.matmul(band_y[:, None], src))  # (n, 3, L, ws)
            del src
            res = _shift_round(torch.matmul(mid, band_x.transpose(1, 2)[:, None]))  # (n, 3, L, L)
        else:
            mid = _shift_round(torch.matmul(src, band_x.transpose(1, 2)[:, None]))  # (n, 3, hs, L)
            del src
            res = _shift_round(torch.matmul(band_y[:, None], mid))  # (n, 3, L, L)
        out[torch.as_tensor(group, device=device)] = res.permute(0, 2, 3, 1).to(torch.uint8)
    return out


def resized_crops(
    images: Sequence[np.ndarray] | np.ndarray,
    crop_boxes: np.ndarray | Sequence[Sequence[int]],
    *,
    size: int = CROP_SIZE,
    device: str | torch.device = "cpu",
    max_bytes: int = DEFAULT_MAX_BYTES,
    pass_order: str | None = None,
    taps_cache: TapsCache | None = None,
) -> torch.Tensor:
    """Pillow's ``img.resize((w, h), BICUBIC).crop((left, up, left + size, up + size))`` for many frames.

    Bit-identical to Pillow for RGB uint8 frames; computes only the crops.

    Args:
        images: B uint8 (H_i, W_i, 3) RGB frames, y down, or one (B, H, W, 3) array, or one
            (B, H, W, 3) tensor (frames kept on a device: no host copy is made).
        crop_boxes: int (B, 4) ``[left, up, w, h]`` per frame (``w, h ≥ 1``).
        size: crop side in pixels.
        device: torch device of the computation and of the result.
        max_bytes: device memory budget of one chunk of frames.
        pass_order: :data:`HORIZONTAL_FIRST` or :data:`PILLOW13`; None: the installed
            Pillow's rule (:func:`installed_pass_order`), i.e. what ``Image.resize`` does here.
        taps_cache: reuse the taps of resizes seen before (:class:`TapsCache`; the same bits).

    Returns:
        uint8 (B, size, size, 3) tensor on ``device``, zero where the crop leaves the resized frame.
    """
    order = installed_pass_order() if pass_order is None else pass_order
    boxes = np.asarray(crop_boxes, dtype=np.int64).reshape(-1, 4)
    if len(images) != boxes.shape[0]:
        raise ValueError(f"resized_crops: {len(images)} images but {boxes.shape[0]} crop boxes")
    if isinstance(images, np.ndarray) or on_device(images):  # one (B, H, W, 3) array or device tensor
        check_shape(images, ("B", "H", "W", "3"), "images")
        if images.dtype not in (np.uint8, torch.uint8):
            raise ValueError(f"image: expected dtype uint8, got {images.dtype}")
        frame_hw = np.broadcast_to(np.asarray(images.shape[1:3], dtype=np.int64), (len(images), 2))
    else:
        for img in images:
            check_shape(img, ("H", "W", "3"), "image")
            if img.dtype != np.uint8:
                raise ValueError(f"image: expected dtype uint8, got {img.dtype}")
        frame_hw = np.array([img.shape[:2] for img in images], dtype=np.int64).reshape(-1, 2)
    taps = batch_crop_taps(frame_hw, boxes, size, order, taps_cache)
    return crops_from_taps(images, taps, device=device, max_bytes=max_bytes)
