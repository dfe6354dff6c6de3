"""Batched MTCNN for the fast path: R-Net/O-Net refinement of tracked boxes, full MTCNN on keyframes.

facenet-pytorch's MTCNN (:mod:`engine.landmarks.mtcnn`, the exact path) runs the P-Net image
pyramid on every frame. When a tracker already knows roughly where the face is (the box of
the previous keyframe or of the previous frame's landmarks), the pyramid can be skipped: the
box goes straight to the second and third stages, R-Net (24²) and O-Net (48²), for all the
frames of a batch at once. O-Net's probability says whether the box still holds a face.

What is facenet-pytorch's (2.6.0, :func:`facenet_pytorch.models.utils.detect_face.detect_face`)
and what differs:

* the square box (``rerec``), the integer crop clipped to the frame (``pad``: truncation toward
  zero, 1-based inclusive corners, so a box cut by the frame edge gives a non-square crop that
  is stretched to the square input), area resampling (``interpolate(mode="area")``), the
  input scaling ``(x - 127.5) / 128``, the box regression (``bbreg``) and the point formula are
  the same; area resampling is computed as two small averaging matrices per face (the same
  windows as ``adaptive_avg_pool2d``, in float64, so equal up to facenet's float32 rounding
  and unaffected by TF32) so faces of different sizes go through one batched product;
* no P-Net, no NMS (one box per frame), and R-Net's probability does not reject the box: only
  O-Net's (below ``thresholds[2]``, 0.7) makes the frame ``no_face``;
* only the crop window of each face is copied to the device (one padded stack per stage, in
  groups of at most :data:`WINDOW_PIXELS` pixels), never a whole frame.

The keyframe detector (:attr:`RefineMtcnn.detector`) is facenet-pytorch's full MTCNN on frames
shrunk to ``detect_max_side`` (OpenCV area resampling), its boxes and points scaled back to
full-frame pixels. On CUDA (:func:`detect_batched`) its first stage runs all pyramid levels
before it looks at any result (:func:`pnet_candidates`: the same candidates, two waits for the
GPU instead of four per level), and its R-Net/O-Net crops of all candidate boxes are cut at once
from integral images instead of facenet-pytorch's per-box loop: the same boxes and points up to
float32 rounding. Coordinates are pixels of the original frame, y down; points in Deep3D's
5-point order (left eye, right eye, nose, left mouth corner, right mouth corner).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.frames import shrink_area, to_numpy, to_torch, zeros_like_frames
from engine.landmarks.base import BoundDetector, faces_to_mark, landmarks_from_array
from engine.landmarks.mtcnn import NAME, detect_faces, pyramid_scales
from engine.structures import Detections, FrameBatch, Landmarks

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: facenet-pytorch's detection thresholds for P-Net, R-Net and O-Net.
THRESHOLDS = (0.6, 0.7, 0.7)
#: Side of R-Net's and O-Net's square inputs, pixels.
RNET_SIZE, ONET_SIZE = 24, 48
#: At most this many window pixels are resampled at once (float64 on the device: 24 bytes each).
WINDOW_PIXELS = 8_000_000
#: The keyframe detector's batched crops (:func:`integral_crops`) take at most this many faces at once.
CROP_CHUNK = 2048
#: Integers up to this are exact in float32 (:func:`grouped_nms`).
EXACT_FLOAT32 = 2**24


@dataclass(frozen=True)
class Refined:
    """What refinement found in each frame of a batch, one row per frame.

    Attributes:
        landmarks: 5 points per frame (invalid ``no_face`` rows where O-Net rejected the box
            or the frame had no box); ``confidence`` = O-Net's probability.
        boxes_img_ydown: float64 (B, 4) ``x1, y1, x2, y2``: O-Net's regressed box (the kind of
            box the detector reports), full-frame pixels, y down; NaN where the row is invalid.
        probability: float64 (B,) O-Net's face probability for the frame's box, also where it
            was below the threshold; NaN where the frame had no usable box.
    """

    landmarks: Landmarks
    boxes_img_ydown: np.ndarray
    probability: np.ndarray

    def detections(self) -> Detections:
        """The valid rows as :class:`Detections` (one face per frame, with points): a tracker's input."""
        rows = np.flatnonzero(self.landmarks.valid)
        return Detections(
            boxes_img_ydown=self.boxes_img_ydown[rows],
            scores=self.probability[rows],
            frame_rows=rows.astype(np.int64),
            num_frames=len(self.probability),
            points_img_ydown=self.landmarks.points_img_ydown[rows],
        )


# --- facenet-pytorch's box arithmetic, on host arrays (a few numbers per face) -----------------


def square_boxes(boxes: np.ndarray) -> np.ndarray:
    """float64 (M, 4): each box made square around its centre, side = its longer side (``rerec``)."""
    b = np.asarray(boxes, dtype=np.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    x1 = b[:, 0] + 0.5 * (w - side)
    y1 = b[:, 1] + 0.5 * (h - side)
    return np.stack([x1, y1, x1 + side, y1 + side], axis=1)


def regress_boxes(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """float64 (M, 4): ``boxes`` moved by the network's regression ``reg`` (M, 4) (``bbreg``).

    Offsets are fractions of the inclusive box size ``x2 - x1 + 1``.
    """
    b = np.asarray(boxes, dtype=np.float64)
    size = np.stack([b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1] * 2, axis=1)
    return b + np.asarray(reg, dtype=np.float64) * size


def crop_regions(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """int64 (M, 4) ``x0, y0, x1, y1``: the pixels facenet-pytorch crops for each box (``pad``).

    0-based, half-open (``image[y0:y1, x0:x1]``): corners truncated toward zero, then the
    1-based inclusive range ``[max(x1, 1), min(x2, W)]``. Empty (``x1 <= x0``) when the box misses
    the frame; non-finite boxes give an empty region.
    """
    b = np.asarray(boxes, dtype=np.float64)
    ok = np.isfinite(b).all(axis=1)
    t = np.trunc(np.where(ok[:, None], np.clip(b, -2**31, 2**31 - 1), 0)).astype(np.int64)
    x0 = np.maximum(t[:, 0], 1) - 1
    y0 = np.maximum(t[:, 1], 1) - 1
    x1 = np.minimum(t[:, 2], width)
    y1 = np.minimum(t[:, 3], height)
    out = np.stack([x0, y0, x1, y1], axis=1)
    out[~ok] = 0
    return out


def area_matrix(lengths: np.ndarray, size: int, span: int, device="cpu"):
    """float64 torch (M, size, span) on ``device``: row i averages input samples
    ``[floor(i·n/size), ceil((i+1)·n/size))``, its weights rounded to float32 first.

    ``n = lengths[m]`` (>= 1) samples of face m, zero-padded to ``span``; ``A @ x`` is area
    resampling of x to ``size`` samples (``adaptive_avg_pool`` windows). Built where it is used
    (a few small kernels on a GPU) instead of on the host.

    >>> area_matrix(np.array([4]), 2, 5)[0].tolist()
    [[0.5, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 0.0]]
    """
    import torch

    n = torch.as_tensor(np.asarray(lengths, dtype=np.int64)).to(device)[:, None, None]
    i = torch.arange(size, dtype=torch.int64, device=device)[None, :, None]
    j = torch.arange(span, dtype=torch.int64, device=device)[None, None, :]
    start = torch.div(i * n, size, rounding_mode="floor")
    stop = torch.div((i + 1) * n + size - 1, size, rounding_mode="floor")
    weight = (1.0 / (stop - start).double()).float().double()  # (M, size, 1): 1/count, float32-rounded
    return torch.where((j >= start) & (j < stop), weight, 0.0)


def gather_windows(images, rows: np.ndarray, regions: np.ndarray):
    """uint8 (M, Hmax, Wmax, 3): each face's crop region, top-left aligned, zero padded, where
    ``images`` are (numpy on the host: only these windows go to the device; a tensor on its device).

    ``regions`` must be non-empty.
    """
    sizes = regions[:, 2:] - regions[:, :2]
    stack = zeros_like_frames(images, (len(rows), int(sizes[:, 1].max()), int(sizes[:, 0].max()), 3))
    # Python ints (tolist): the loop's per-face indexing costs less than with numpy scalars.
    for k, (row, (x0, y0, x1, y1)) in enumerate(zip(np.asarray(rows).tolist(), regions.tolist(), strict=True)):
        stack[k, : y1 - y0, : x1 - x0] = images[row, y0:y1, x0:x1]
    return stack


def window_chunks(regions: np.ndarray, budget: int) -> list[slice]:
    """Consecutive groups of faces whose padded window stack holds at most ``budget`` pixels.

    A group always takes at least one face (a face larger than the budget goes alone).

    >>> window_chunks(np.array([[0, 0, 10, 10]] * 5), 250)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    sizes = (regions[:, 2:] - regions[:, :2]).tolist()  # Python ints: this loop runs once a face
    out, lo, wmax, hmax = [], 0, 0, 0
    for k, (w, h) in enumerate(sizes):
        wmax, hmax = max(wmax, w), max(hmax, h)
        if k > lo and (k - lo + 1) * wmax * hmax > budget:
            out.append(slice(lo, k))
            lo, wmax, hmax = k, w, h
    out.append(slice(lo, len(sizes)))
    return out


def area_crops(images, rows: np.ndarray, regions: np.ndarray, size: int, device):
    """float32 torch (M, 3, size, size) on ``device``: region m of ``images[rows[m]]`` area-resampled.

    ``images``: uint8 (B, H, W, 3) frames, numpy or a tensor on the device (:mod:`engine.frames`).

    ``regions`` int64 (M, 4) ``x0, y0, x1, y1`` (non-empty, :func:`crop_regions`); the windows
    are averaged in float64 with :func:`area_matrix` (``interpolate(mode="area")``'s windows),
    all faces of a chunk of :data:`WINDOW_PIXELS` in one batched product.
    """
    import torch

    parts = []
    for chunk in window_chunks(regions, WINDOW_PIXELS):
        windows = gather_windows(images, rows[chunk], regions[chunk])
        lengths = regions[chunk, 2:] - regions[chunk, :2]  # (width, height)
        with torch.inference_mode():  # float64: exact averages whatever the TF32 setting
            ay = area_matrix(lengths[:, 1], size, windows.shape[1], device)
            ax = area_matrix(lengths[:, 0], size, windows.shape[2], device)
            x = to_torch(windows, device).permute(0, 3, 1, 2).double()  # (m, 3, H, W)
            x = torch.matmul(x, ax.transpose(1, 2)[:, None])  # (m, 3, H, size)
            parts.append(torch.matmul(ay[:, None], x).float())  # (m, 3, size, size)
    return torch.cat(parts)


def float64_average(total, rows, cols):
    """float32 averages: ``total`` (exact window sums, integer tensor) divided by the window's pixel
    count ``rows · cols`` in float64, then rounded once (the keyframe detector's default)."""
    return (total.double() / (rows * cols).double()).float()


def frame_integral(frames):
    """int32 (or int64 for frames over 8.4 MP) torch (B, 3, H + 1, W + 1): zero-padded cumulative
    sums of uint8 (B, H, W, 3) ``frames`` (a tensor on their device), exact."""
    import torch

    height, width = frames.shape[1:3]
    dtype = torch.int32 if 255 * height * width < 2**31 else torch.int64
    planes = frames.permute(0, 3, 1, 2)
    return torch.nn.functional.pad(planes.cumsum(2, dtype=dtype).cumsum(3, dtype=dtype), (1, 0, 1, 0))


def integral_crops(integral, rows, regions: np.ndarray, size: int, average=float64_average):
    """float32 torch (M, 3, size, size): area resampling of each face's region from integral images.

    ``integral``: integer torch (B, 3, H + 1, W + 1) zero-padded cumulative sums of the frames
    (exact integers); ``rows``: int64 torch (M,) frame of each face; ``regions``: int64 (M, 4)
    ``x0, y0, x1, y1`` (non-empty). Cell i averages ``[floor(i·n/size), ceil((i+1)·n/size))``
    like ``interpolate(mode="area")``: an exact integer window sum turned into an average by
    ``average(total, rows, cols)`` (``total`` (m, 3, size, size), ``rows`` (m, 1, size, 1) and
    ``cols`` (m, 1, 1, size) the window's pixel rows and columns). The default, one float64
    division, is facenet-pytorch's float32 average up to that rounding;
    :mod:`engine.landmarks.mtcnn_exact` passes the installed kernel's own float32 rule.
    """
    import torch

    dev = integral.device
    reg = torch.as_tensor(regions, dtype=torch.int64, device=dev)
    i = torch.arange(size + 1, dtype=torch.int64, device=dev)
    n = reg[:, 2:] - reg[:, :2]  # (M, 2) width, height
    lo = (i[None, :size, None] * n[:, None, :]) // size  # (M, size, 2)
    hi = ((i[None, 1:, None]) * n[:, None, :] + size - 1) // size
    x0, x1 = reg[:, None, 0] + lo[..., 0], reg[:, None, 0] + hi[..., 0]  # (M, size)
    y0, y1 = reg[:, None, 1] + lo[..., 1], reg[:, None, 1] + hi[..., 1]
    hh, ww = integral.shape[2:]
    flat = integral.reshape(-1)
    plane = (torch.as_tensor(rows, device=dev)[:, None] * 3 + torch.arange(3, device=dev)) * (hh * ww)  # (M, 3)

    def at(y, x):  # (m, 3, size, size) sums at rows y (m, size), columns x (m, size) of faces k
        return flat[plane[k][:, :, None, None] + (y[:, :, None] * ww + x[:, None, :])[:, None]]

    parts = []
    for c in range(0, len(reg), CROP_CHUNK):  # bounds the (chunk, 3, size, size) index tensors
        k = slice(c, c + CROP_CHUNK)
        total = at(y1[k], x1[k]) - at(y0[k], x1[k]) - at(y1[k], x0[k]) + at(y0[k], x0[k])
        parts.append(average(total, (y1[k] - y0[k])[:, None, :, None], (x1[k] - x0[k])[:, None, None, :]))
    return torch.cat(parts)


def detect_batched(net, images, frames_per_call: int, device, grids: dict | None = None) -> Detections:
    """:func:`detect_chunk` on ``frames_per_call`` frames at a time (numpy, or a tensor on the
    device), joined."""
    return join_detections([detect_chunk(net, images[lo:lo + frames_per_call], device, grids)
                            for lo in range(0, len(images), max(1, frames_per_call))])


def join_detections(parts: list[Detections]) -> Detections:
    """The detections of consecutive chunks of one batch as one (frame rows shifted, in order)."""
    offsets = np.cumsum([0] + [p.num_frames for p in parts])
    with_faces = [k for k, p in enumerate(parts) if len(p)]
    if not with_faces:
        return Detections.empty(int(offsets[-1]))
    found = [parts[k] for k in with_faces]
    return Detections(
        boxes_img_ydown=np.concatenate([p.boxes_img_ydown for p in found]),
        scores=np.concatenate([p.scores for p in found]),
        frame_rows=np.concatenate([parts[k].frame_rows + offsets[k] for k in with_faces]),
        num_frames=int(offsets[-1]),
        points_img_ydown=np.concatenate([p.points_img_ydown.reshape(-1, 5, 2) for p in found]).astype(np.float32),
    )


def packed_faces(boxes, points, inds, n: int) -> Detections:
    """What facenet-pytorch's ``detect_face`` returns, packed: ``boxes`` float32 (K, 5) ``x1, y1, x2,
    y2, probability``, ``points`` (K, 5, 2) and ``inds`` int64 (K,) frames (device tensors, in its
    final NMS order) grouped by frame, that order kept within each (its ``np.where`` per frame)."""
    rows = inds.cpu().numpy().astype(np.int64)
    order = np.argsort(rows, kind="stable")
    b = boxes.cpu().numpy()[order]
    return Detections(boxes_img_ydown=b[:, :4].astype(np.float64), scores=b[:, 4].astype(np.float64),
                      frame_rows=rows[order], num_frames=n,
                      points_img_ydown=points.cpu().numpy()[order].astype(np.float32))


def corner_bound(height: int, width: int) -> int:
    """An upper bound of P-Net's box corners (+ 1) on a ``height`` × ``width`` frame: a cell's far
    corner is ``(2·cell + 12) / scale`` with ``cell < side · scale / 2`` and ``scale >= 12 / side``."""
    return 2 * max(height, width) + 13


def grouped_nms(boxes, scores, groups, iou: float, bound: int):
    """torchvision's ``batched_nms`` (NMS within each group) for boxes whose corners are integers.

    Always its "coordinate trick" (each group's boxes shifted apart by the largest corner + 1,
    one NMS call): its other way, for over 5,000 boxes, waits for the GPU once per group. The
    shifted corners are exact float32 integers, so the overlaps are the same bits, while
    ``bound`` (number of groups × (largest corner + 1), or more) is under 2**24; else
    ``batched_nms`` itself.

    Args:
        boxes: float32 (K, 4) ``x1, y1, x2, y2``; scores: (K,); groups: int64 (K,).
    Returns: int64 indices of the boxes kept, by decreasing score.
    """
    from torchvision.ops.boxes import batched_nms, nms

    if bound >= EXACT_FLOAT32 or not len(boxes):
        return batched_nms(boxes, scores, groups, iou)
    return nms(boxes + (groups.to(boxes.dtype) * (boxes.max() + 1))[:, None], scores, iou)


@dataclass(frozen=True)
class LevelGrid:
    """P-Net's output cells on every level of one pyramid, joined level after level (device tensors).

    Attributes:
        corners_x: float32 (sum of widths, 2): facenet's ``x1, x2`` of each column's box,
            ``floor((2·col + 1) / scale)`` and ``floor((2·col + 12) / scale)``, frame pixels.
        corners_y: float32 (sum of heights, 2): the same of each row (``y1, y2``).
        heights, widths: int64 (L,): each level's P-Net output size.
        col_at, row_at: int64 (L,): where each level's columns (rows) start in ``corners_x`` (``_y``).
    """

    corners_x: torch.Tensor
    corners_y: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor
    col_at: torch.Tensor
    row_at: torch.Tensor

    @classmethod
    def of(cls, sizes: list[tuple[int, int]], scales: list[float], device, dtype) -> LevelGrid:
        """The grid of levels of output ``sizes`` (hs, ws) made at ``scales``.

        Corners with facenet's own expression (a float32 tensor divided by the Python float
        ``scale``, which a device may compute as a product with its reciprocal): the same bits."""
        import torch

        def corners(length: int, scale: float):
            cell = torch.arange(length, device=device, dtype=dtype)
            return torch.stack([((2 * cell + 1) / scale).floor(), ((2 * cell + 12) / scale).floor()], 1)

        heights, widths = (torch.tensor(v, device=device) for v in zip(*sizes, strict=True))
        return cls(corners_x=torch.cat([corners(ws, s) for (_, ws), s in zip(sizes, scales, strict=True)]),
                   corners_y=torch.cat([corners(hs, s) for (hs, _), s in zip(sizes, scales, strict=True)]),
                   heights=heights, widths=widths,
                   col_at=torch.cumsum(widths, 0) - widths, row_at=torch.cumsum(heights, 0) - heights)


def pnet_cells(pnet, imgs, scales: list[float], threshold: float, grids: dict | None = None):
    """Every pyramid level's P-Net cells above ``threshold``, as facenet-pytorch's
    ``generateBoundingBox`` (2.6.0) gives them level by level, joined: the same values in the same
    order (level, then frame, row, column), with one wait for the GPU instead of three per level.

    Every level's P-Net runs first; the positions above ``threshold`` of all levels are found with
    one ``nonzero``; box corners are gathered from a :class:`LevelGrid` computed with facenet's own
    expression, so they are the same bits.

    Args:
        pnet: facenet-pytorch's P-Net.
        imgs: float32 (N, 3, H, W) frames, 0…255.
        scales: the pyramid's scales, largest first.
        threshold: P-Net's probability threshold.
        grids: a cache of :class:`LevelGrid` by pyramid (the caller's; None: none kept).

    Returns:
        float32 (K, 9) ``x1, y1, x2, y2, score, 4 regression offsets`` (frame pixels, y down),
        int64 (K,) the frame of each and int64 (K,) its level (index into ``scales``).
    """
    import torch
    from facenet_pytorch.models.utils import detect_face as fd

    n, dev = len(imgs), imgs.device
    h, w = imgs.shape[2:4]
    probs, regs, sizes = [], [], []
    for scale in scales:
        data = fd.imresample(imgs, (int(h * scale + 1), int(w * scale + 1)))
        reg, prob = pnet((data - 127.5) * 0.0078125)
        probs.append(prob[:, 1].reshape(-1))  # (n · hs · ws,) in (frame, y, x) order, as nonzero gives
        regs.append(reg.permute(0, 2, 3, 1).reshape(-1, 4))
        sizes.append(tuple(prob.shape[2:4]))
    prob = torch.cat(probs)
    flat = (prob >= threshold).nonzero()[:, 0]  # the one wait of the thresholds
    if not len(flat):
        none = torch.zeros(0, dtype=torch.int64, device=dev)
        return torch.zeros((0, 9), dtype=prob.dtype, device=dev), none, none
    key = (tuple(sizes), tuple(scales), str(dev), prob.dtype)
    grid = grids.get(key) if grids is not None else None
    if grid is None:
        grid = LevelGrid.of(sizes, scales, dev, prob.dtype)
        if grids is not None:
            if len(grids) >= 64:  # one entry per frame size seen: bounded all the same
                grids.clear()
            grids[key] = grid
    counts = n * grid.heights * grid.widths  # positions of each level in ``prob``
    ends = torch.cumsum(counts, 0)
    level = torch.searchsorted(ends, flat, right=True)
    local = flat - (ends - counts)[level]
    width = grid.widths[level]
    per_frame = grid.heights[level] * width
    frame, cell = local // per_frame, local % per_frame
    y, x = cell // width, cell % width
    cx, cy = grid.corners_x[grid.col_at[level] + x], grid.corners_y[grid.row_at[level] + y]
    score = prob[flat]
    boxes = torch.cat([cx[:, :1], cy[:, :1], cx[:, 1:], cy[:, 1:], score[:, None], torch.cat(regs)[flat]], dim=1)
    return boxes, frame, level


def pnet_candidates(pnet, imgs, scales: list[float], threshold: float, grids: dict | None = None):
    """MTCNN's first stage over the image pyramid: what facenet-pytorch's ``detect_face`` (2.6.0)
    keeps of each level (``generateBoundingBox`` then NMS at IoU 0.5 per frame), levels joined.

    The same values, with two waits for the GPU instead of four per level, and in the same order
    (where facenet's is defined: torchvision sorts a level of over 5,000 boxes, 1,000 on a CPU,
    without keeping the order of equal scores): the cells of :func:`pnet_cells`; one NMS call
    takes every (level, frame) pair as its own group; a stable sort restores facenet's order
    (level, then score descending, then position). Two tied boxes that overlap may keep the
    other one of the pair than facenet's per-level call would: the exact path keeps one NMS call
    per level (:func:`engine.landmarks.mtcnn_exact.detect`).

    Args and the frames' pixels: as :func:`pnet_cells`.

    Returns:
        float32 (K, 9) ``x1, y1, x2, y2, score, 4 regression offsets`` (frame pixels, y down) and
        int64 (K,) the frame of each.
    """
    import torch

    boxes, frame, level = pnet_cells(pnet, imgs, scales, threshold, grids)
    if not len(boxes):
        return boxes, frame
    n, (h, w) = len(imgs), imgs.shape[2:4]
    score = boxes[:, 4]
    pick = grouped_nms(boxes[:, :4], score, level * n + frame, 0.5, n * len(scales) * corner_bound(h, w))
    pick = pick.sort().values  # position order, then score (stable), then level (stable): facenet's
    pick = pick[torch.sort(-score[pick], stable=True).indices]
    pick = pick[torch.sort(level[pick], stable=True).indices]
    return boxes[pick], frame[pick]


def detect_chunk(net, images, device, grids: dict | None = None) -> Detections:
    """Full MTCNN (facenet-pytorch ``net``'s P/R/O-Nets, thresholds, pyramid) on uint8 (B, H, W, 3)
    RGB ``images``, with R-Net's and O-Net's per-box crops made by :func:`integral_crops`
    (a few batched gathers) instead of facenet-pytorch's Python loop over the boxes.

    The P-Net pyramid, NMS steps, box regression and squaring are facenet-pytorch's own
    functions (2.6.0 ``detect_face``); only the crops' resampling differs (float64 averages,
    so equal up to float32 rounding), and a box whose crop misses the frame is dropped
    (facenet-pytorch would misalign its outputs). Returns every face: box, probability,
    5 points, pixels of ``images``, y down.
    """
    import torch

    n = len(images)
    if n == 0:
        return Detections.empty(0)
    thr = net.thresholds
    with torch.inference_mode():
        frames = torch.as_tensor(images, device=device)
        imgs = frames.permute(0, 3, 1, 2).float()
        h, w = imgs.shape[2:4]
        scales = pyramid_scales(net, h, w)
        if not scales:  # frames smaller than the minimum face
            return Detections.empty(n)
        integral = frame_integral(frames)  # exact window sums: R-/O-Net crops in a few gathers
        boxes, inds = pnet_candidates(net.pnet, imgs, scales, thr[0], grids)
        pick = grouped_nms(boxes[:, :4], boxes[:, 4], inds, 0.7, n * corner_bound(h, w))
        boxes, inds = boxes[pick], inds[pick]
        boxes, points, inds = later_stages(net, integral, regressed_candidates(boxes), inds, w, h)
        return packed_faces(boxes, points, inds, n) if len(boxes) else Detections.empty(n)


def regressed_candidates(boxes):
    """facenet's end of the first stage: P-Net candidates (K, 9) ``x1, y1, x2, y2, score, 4 offsets``
    moved by their offsets (fractions of the box's ``x2 - x1``, ``y2 - y1``) and squared
    (``rerec``): float32 (K, 5) ``x1, y1, x2, y2, score``."""
    import torch
    from facenet_pytorch.models.utils import detect_face as fd

    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return fd.rerec(torch.stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                                 boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh, boxes[:, 4]], dim=1))


def later_stages(net, integral, boxes, inds, width: int, height: int, *, average=float64_average,
                 forward=None, crops_ok=None):
    """facenet-pytorch's second and third stages (R-Net, then O-Net) on first-stage candidates.

    Each stage crops every box as facenet's ``pad`` does (a box whose crop misses the frame is
    dropped), resamples the crops from ``integral`` (:func:`integral_crops` with ``average``),
    scales them as facenet does and runs the stage's network through ``forward(net, x)``
    (default: one call), then :func:`rnet_verdict` or :func:`onet_verdict`.

    Args:
        net: facenet-pytorch's MTCNN (its R-/O-Nets and thresholds).
        integral: the frames' integral images (:func:`integral_crops`).
        boxes: float32 (K, 5) squared candidates ``x1, y1, x2, y2, score``; inds: int64 (K,) frames.
        width, height: frame size, pixels.
        crops_ok: ``crops_ok(regions, size)`` False declines a stage's crops: None is returned.

    Returns:
        float32 boxes (F, 5), points (F, 5, 2) and int64 frames (F,) of the faces, facenet's
        final NMS order (device tensors; F may be 0), or None.
    """
    import torch

    points = torch.zeros(0, 5, 2, device=boxes.device)
    for stage, size in ((net.rnet, RNET_SIZE), (net.onet, ONET_SIZE)):
        regions = crop_regions(boxes[:, :4].double().cpu().numpy(), width, height)  # facenet's ``pad``
        ok = (regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1])
        if not ok.all():  # facenet-pytorch raises here: its crops would no longer line up with its boxes
            keep = torch.as_tensor(ok, device=boxes.device)
            boxes, inds, regions = boxes[keep], inds[keep], regions[ok]
        if not len(boxes):
            return boxes, points, inds
        if crops_ok is not None and not crops_ok(regions, size):
            return None
        x = (integral_crops(integral, inds, regions, size, average) - 127.5) * 0.0078125
        out = stage(x) if forward is None else forward(stage, x)
        if size == RNET_SIZE:
            boxes, inds = rnet_verdict(out, boxes, inds, net.thresholds[1])
        else:
            boxes, points, inds = onet_verdict(out, boxes, inds, net.thresholds[2])
    return boxes, points, inds


def rnet_verdict(out, boxes, inds, threshold: float):
    """R-Net's verdict (``out``: regression (K, 4), probabilities (K, 2)) on the candidates, as
    facenet's: those above ``threshold`` with R-Net's score, NMS 0.7 per frame, regressed, squared."""
    import torch
    from facenet_pytorch.models.utils import detect_face as fd
    from torchvision.ops.boxes import batched_nms

    score = out[1][:, 1]
    keep = score > threshold
    boxes = torch.cat((boxes[keep, :4], score[keep, None]), dim=1)
    inds, reg = inds[keep], out[0][keep]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
    return fd.rerec(fd.bbreg(boxes[pick], reg[pick])), inds[pick]


def onet_verdict(out, boxes, inds, threshold: float):
    """O-Net's verdict (``out``: regression (K, 4), points (K, 10), probabilities (K, 2)), as
    facenet's: the faces above ``threshold`` with their 5 points (from the box before
    regression), regressed, NMS 0.7 per frame by the smaller area ("Min").
    Returns boxes (F, 5), points (F, 5, 2), frames (F,)."""
    import torch
    from facenet_pytorch.models.utils import detect_face as fd

    score = out[2][:, 1]
    keep = score > threshold
    marks = out[1][keep]
    boxes = torch.cat((boxes[keep, :4], score[keep, None]), dim=1)
    inds, reg = inds[keep], out[0][keep]
    bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    points = torch.stack((bw[:, None] * marks[:, :5] + boxes[:, 0:1] - 1,
                          bh[:, None] * marks[:, 5:10] + boxes[:, 1:2] - 1), dim=2)
    boxes = fd.bbreg(boxes, reg)
    pick = fd.batched_nms_numpy(boxes[:, :4], boxes[:, 4], inds, 0.7, "Min")
    return boxes[pick], points[pick], inds[pick]


def scale_back(values: np.ndarray, ratio_x: float, ratio_y: float) -> np.ndarray:
    """Pixel coordinates ``(..., 2k)`` (x, y pairs) of a resized frame in the original frame.

    Pixel centres map onto pixel centres: ``x = (x_small + 0.5) · ratio - 0.5``.
    """
    v = np.asarray(values, dtype=np.float64).copy()
    v[..., 0::2] = (v[..., 0::2] + 0.5) * ratio_x - 0.5
    v[..., 1::2] = (v[..., 1::2] + 0.5) * ratio_y - 0.5
    return v


class RefineMtcnn:
    """MTCNN for the fast path (:class:`~engine.stages.landmark.Landmarker`, 5 points).

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        detect_max_side: the keyframe detector shrinks frames whose longer side exceeds this
            (pixels) to that size before full MTCNN; smaller frames are used as they are.
        max_pixels: the detector passes at most this many (shrunk) pixels through one call.
        batched_crops: the keyframe detector crops R-Net's and O-Net's inputs for all boxes at
            once (:func:`detect_batched`, a few gathers from integral images: no Python loop
            over the boxes); False runs facenet-pytorch's own ``detect`` (a loop of two small
            ops per box). They differ by float32 rounding (~1e-4 % of the eye distance). None:
            batched on CUDA (where the loop is GIL-bound), facenet's loop on the CPU (where the
            gathers over all candidate boxes are slower than the loop).
    """

    name = NAME
    num_points = 5

    def __init__(self, device: str = "cpu", detect_max_side: int = 640, max_pixels: int = 16_000_000,
                 batched_crops: bool | None = None):
        import torch
        from facenet_pytorch.models.mtcnn import MTCNN

        if detect_max_side < 12:
            raise ValueError(f"detect_max_side must be >= 12 pixels, got {detect_max_side}")
        self.device = torch.device(device)
        self.detect_max_side = int(detect_max_side)
        self.max_pixels = max_pixels
        self.batched_crops = self.device.type == "cuda" if batched_crops is None else batched_crops
        self._net = MTCNN(device=self.device, select_largest=False, keep_all=True,
                          thresholds=list(THRESHOLDS))
        self._net.eval()
        self._grids: dict = {}  # the keyframe detector's P-Net cells by pyramid (LevelGrid)

    # --- keyframe detection ------------------------------------------------------------------

    @property
    def detector(self) -> BoundDetector:
        """Full MTCNN on frames shrunk to ``detect_max_side`` (shares this backend's networks)."""
        return BoundDetector(NAME, self.detect)

    def detect(self, frames: FrameBatch) -> Detections:
        """Every face full MTCNN finds in each (shrunk) frame; boxes and points in full-frame pixels."""
        images = frames.images
        n = len(images)
        if n == 0:
            return Detections.empty(0)
        h, w = images.shape[1:3]
        scale = self.detect_max_side / max(h, w)
        if scale < 1:
            images = shrink_area(images, (max(1, round(w * scale)), max(1, round(h * scale))))
        sh, sw = images.shape[1:3]
        step = max(1, self.max_pixels // max(1, sh * sw))
        if self.batched_crops:
            found = detect_batched(self._net, images, step, self.device, self._grids)
        else:
            found = detect_faces(self._net, to_numpy(images), step)
        if (sh, sw) == (h, w) or len(found) == 0:
            return found
        rx, ry = w / sw, h / sh
        return Detections(
            boxes_img_ydown=scale_back(found.boxes_img_ydown, rx, ry),
            scores=found.scores,
            frame_rows=found.frame_rows,
            num_frames=found.num_frames,
            points_img_ydown=scale_back(found.points_img_ydown, rx, ry).astype(np.float32),
        )

    # --- refinement --------------------------------------------------------------------------

    def __call__(self, frames: FrameBatch, faces: Detections | None = None) -> Landmarks:
        """5 points of each frame's face by R-Net/O-Net on its box (the detector's when ``faces`` is None)."""
        return self.refine(frames, faces_to_mark(self, frames, faces)).landmarks

    def refine(self, frames: FrameBatch, faces: Detections) -> Refined:
        """R-Net then O-Net on each frame's box, all frames in one forward per stage.

        Args:
            frames: the frames (uint8 (B, H, W, 3) RGB).
            faces: at most one box per frame (full-frame pixels, y down); a frame without one,
                with a non-finite box, or whose box misses the frame gets a ``no_face`` row.
        """
        n = len(frames)
        boxes = np.full((n, 4), np.nan)
        prob = np.full(n, np.nan)
        points = np.full((n, self.num_points, 2), np.nan)
        where = faces.face_of_frame()
        rows = np.flatnonzero(where >= 0)
        if len(rows):
            images = frames.images
            h, w = images.shape[1:3]
            start = square_boxes(faces.boxes_img_ydown[where[rows]])
            regions = crop_regions(start, w, h)
            keep = (regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1])
            rows, start, regions = rows[keep], start[keep], regions[keep]
        if len(rows):
            reg, _ = self._forward(self._net.rnet, images, rows, regions, RNET_SIZE)
            second = square_boxes(regress_boxes(start, reg))
            regions = crop_regions(second, w, h)
            keep = (regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1])
            rows, second, regions = rows[keep], second[keep], regions[keep]
        if len(rows):
            pts, score, final = self.onet_stage(images, rows, second, regions)
            prob[rows] = score
            face = score >= THRESHOLDS[2]
            points[rows[face]] = pts[face]
            boxes[rows[face]] = final[face]
        landmarks = landmarks_from_array(points, confidence=prob)
        boxes[~landmarks.valid] = np.nan
        return Refined(landmarks, boxes, prob)

    def onet_stage(self, images: np.ndarray, rows: np.ndarray, boxes: np.ndarray,
                   regions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """O-Net on square boxes (M, 4) of frames ``images[rows]``: facenet-pytorch's third stage.

        Returns float64 points (M, 5, 2), probability (M,) and regressed boxes (M, 4), full-frame
        pixels y down, for every box (no threshold applied). Each box's crop must be non-empty.
        """
        h, w = images.shape[1:3]
        if regions is None:
            regions = crop_regions(boxes, w, h)
        reg, (marks, score) = self._forward(self._net.onet, images, rows, regions, ONET_SIZE)
        size = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], axis=1)
        points = size[:, None, :] * np.stack([marks[:, :5], marks[:, 5:]], axis=2) + boxes[:, None, :2] - 1
        return points, score, regress_boxes(boxes, reg)

    def _forward(self, net, images: np.ndarray, rows: np.ndarray, regions: np.ndarray, size: int):
        """Crop, area-resample to ``size``², normalise and run ``net`` on the device.

        Returns host float64 arrays: regression (M, 4) and, for O-Net, (points (M, 10),
        face probability (M,)); for R-Net the second item is the probability (M,).
        """
        import torch

        crops = area_crops(images, rows, regions, size, self.device)
        with torch.inference_mode():
            out = net((crops - 127.5) * 0.0078125)
        if len(out) == 2:  # R-Net: (regression, softmax)
            return out[0].double().cpu().numpy(), out[1][:, 1].double().cpu().numpy()
        reg, marks, soft = out
        return reg.double().cpu().numpy(), (marks.double().cpu().numpy(), soft[:, 1].double().cpu().numpy())

    def close(self) -> None:
        self._net = None


def create(config, device: str, source=None) -> RefineMtcnn:
    """A factory with the signature of :data:`engine.landmarks.BACKENDS` entries."""
    return RefineMtcnn(device=device)
