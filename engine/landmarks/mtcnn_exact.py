"""facenet-pytorch's MTCNN detection bit for bit, without its per-box loop (the exact path on CUDA).

facenet-pytorch 2.6.0's ``detect_face`` cuts the inputs of its second and third stages one
candidate box at a time: a slice of the frame at a device-tensor index (``.item()``: the host
waits for the GPU) and one ``interpolate(mode="area")`` per box. A 1080p talking-head frame has
~160 candidates at the second stage, so a worker waited for its GPU some 170 times per frame.

:func:`detect` runs the same steps with facenet-pytorch's own functions and networks in the same
order and batches (pyramid levels, P-Net, the NMS calls, box regression, ``rerec``, ``bbreg``,
R-/O-Net through ``fixed_batch_process``, the point formula). It finds the P-Net cells of all
levels with one wait for the GPU (:func:`engine.landmarks.mtcnn_gpu.pnet_cells`: the values and
order of facenet's ``generateBoundingBox``, level by level), and cuts all crops of a stage at
once from integral images
(:func:`engine.landmarks.mtcnn_gpu.integral_crops`). The crops are the same bits as facenet's:
frame values are integers, so every crop cell's window sum is an exact integer in float32,
whatever the order of summation, while it stays below 2**24 (:func:`sums_exact`); what is left
is the division by the window's pixel count, and :func:`area_rule` asks the installed torch's
own kernel which float32 expression it uses (:data:`AREA_RULES`). Where no rule matches, or a
window is too large for exact sums, :class:`~engine.landmarks.mtcnn.MtcnnLandmarker` runs
facenet-pytorch's ``detect_face`` itself.

One difference: a candidate box whose crop lies outside the frame is dropped, where
facenet-pytorch raises (its crop list gets shorter than its box list).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from engine.frames import to_torch
from engine.landmarks.mtcnn import pyramid_scales
from engine.landmarks.mtcnn_gpu import (
    EXACT_FLOAT32,
    ONET_SIZE,
    RNET_SIZE,
    frame_integral,
    integral_crops,
    join_detections,
    later_stages,
    packed_faces,
    pnet_cells,
    regressed_candidates,
)
from engine.structures import Detections

log = logging.getLogger(__name__)


def _two_divisions(total, rows, cols):
    """``sum / rows / cols`` in float32 (torch's kernels for contiguous input: CUDA; CPU in 2.14)."""
    return total.float() / rows.float() / cols.float()


def _one_division(total, rows, cols):
    """``sum / (rows · cols)`` in float32 (the CPU kernel of older torch source)."""
    return total.float() / (rows * cols).float()


def _reciprocal(total, rows, cols):
    """``sum · (1 / (rows · cols))`` in float32 (torch's channels-last CUDA kernel)."""
    import torch

    count = (rows * cols).float()
    return total.float() * torch.div(torch.ones_like(count), count)


#: Candidate float32 expressions of an area average, exact window sum → value.
AREA_RULES: dict[str, Callable] = {"two_divisions": _two_divisions, "one_division": _one_division,
                                   "reciprocal": _reciprocal}


def area_rule(device) -> str | None:
    """The :data:`AREA_RULES` entry that gives facenet-pytorch's crops on ``device``, or None.

    Asks the kernel itself: facenet's per-box call (a slice of the frames permuted to
    (B, 3, H, W) and converted to float32, ``interpolate(mode="area")`` to 24² and 48²) on 96
    windows of random sizes (1…300 px a side) and random pixel values, against each rule on
    the same windows. A rule that differs in any bit is out; the first that matches all is kept.
    """
    import torch
    from facenet_pytorch.models.utils import detect_face as fd

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 300, 320, 3), dtype=np.uint8)
    x0 = rng.integers(0, 319, 96)
    y0 = rng.integers(0, 299, 96)
    regions = np.stack([x0, y0, x0 + 1 + rng.integers(0, 320 - x0), y0 + 1 + rng.integers(0, 300 - y0)], axis=1)
    rows = rng.integers(0, 2, 96)
    with torch.inference_mode():
        planes = torch.as_tensor(frames, device=device)
        imgs = planes.permute(0, 3, 1, 2).float()  # facenet's layout
        integral = frame_integral(planes)
        dev_rows = torch.as_tensor(rows, device=device)
        matching = list(AREA_RULES)
        for size in (RNET_SIZE, ONET_SIZE):
            want = torch.cat([fd.imresample(imgs[int(r), :, b:d, a:c].unsqueeze(0), (size, size))
                              for r, (a, b, c, d) in zip(rows, regions.tolist(), strict=True)])
            matching = [name for name in matching
                        if torch.equal(integral_crops(integral, dev_rows, regions, size, AREA_RULES[name]), want)]
    if not matching:
        log.warning("no float32 rule reproduces interpolate(mode='area') on %s: MTCNN crops one box at a time",
                    device)
        return None
    return matching[0]


def sums_exact(regions: np.ndarray, size: int) -> bool:
    """Whether every cell of these crops (int64 (M, 4) ``x0, y0, x1, y1``) resampled to ``size``²
    sums fewer than 2**24 / 255 pixels (so float32 holds its sum exactly, as facenet's kernel does)."""
    if not len(regions):
        return True
    sides = regions[:, 2:] - regions[:, :2]
    cell = (-(-sides // size) + 1).prod(axis=1)  # a cell spans at most ceil(n / size) + 1 pixels a side
    return bool(255 * int(cell.max()) < EXACT_FLOAT32)


def detect(net, images, device, rule: str, grids: dict | None = None) -> Detections | None:
    """facenet-pytorch's ``detect_face`` for ``net`` (its MTCNN) on uint8 (B, H, W, 3) RGB ``images``
    (numpy, or a tensor), one call: every face with box, probability and 5 points, pixels of
    ``images``, y down, frames in order and facenet's order within a frame. None where a crop is
    too large for exact float32 sums (:func:`sums_exact`): run facenet-pytorch's own ``detect_face`` then.

    ``rule``: :func:`area_rule`'s answer for ``device``; ``grids``: the caller's cache of P-Net
    cell corners (:class:`~engine.landmarks.mtcnn_gpu.LevelGrid`), None: made at each call.
    """
    import torch
    from facenet_pytorch.models.utils import detect_face as fd

    n = len(images)
    if n == 0:
        return Detections.empty(0)
    with torch.inference_mode():
        frames = to_torch(images, device)
        imgs = frames.permute(0, 3, 1, 2).float()  # channels-last strides, as facenet's: the same kernels
        h, w = imgs.shape[2:4]
        boxes, inds = _first_stage(net, imgs, pyramid_scales(net, h, w), net.thresholds[0], grids)
        if not len(boxes):
            return Detections.empty(n)
        found = later_stages(net, frame_integral(frames), boxes, inds, w, h, average=AREA_RULES[rule],
                             forward=lambda stage, x: fd.fixed_batch_process(x, stage), crops_ok=sums_exact)
        if found is None:
            return None
        boxes, points, inds = found
        return packed_faces(boxes, points, inds, n) if len(boxes) else Detections.empty(n)


def detect_faces(net, images, frames_per_call: int, device, rule: str, grids: dict | None = None) -> Detections:
    """:func:`detect` on ``frames_per_call`` frames at a time, joined; a chunk it declines goes
    through facenet-pytorch's ``detect_face`` (:func:`engine.landmarks.mtcnn.detect_faces`)."""
    from engine.landmarks.mtcnn import detect_faces as facenet_faces

    parts = []
    for lo in range(0, len(images), max(1, frames_per_call)):
        chunk = images[lo:lo + frames_per_call]
        found = detect(net, chunk, device, rule, grids)
        parts.append(facenet_faces(net, chunk, len(chunk)) if found is None else found)
    return join_detections(parts)


def _first_stage(net, imgs, scales: list[float], threshold: float, grids: dict | None = None):
    """facenet's first stage on float32 (N, 3, H, W) ``imgs``: per pyramid level P-Net, the cells
    above ``threshold``, NMS 0.5 per frame; then NMS 0.7 per frame over all levels, the box
    regression and squaring. Returns float32 (K, 5) boxes with score and int64 (K,) frames.

    The cells of all levels come from :func:`~engine.landmarks.mtcnn_gpu.pnet_cells` (facenet's
    values and order, one wait for the GPU). The NMS stays one ``batched_nms`` call per level
    on exactly facenet's array of that level: a call over all levels would sort a different
    array, and torchvision's sort does not keep the order of equal scores, so the other one of
    two tied, overlapping boxes could survive. ``grids``: as ``pnet_cells``'.
    """
    import torch
    from torchvision.ops.boxes import batched_nms

    dev = imgs.device
    if not scales:  # frames smaller than the minimum face (facenet-pytorch would raise)
        return torch.zeros((0, 5), device=dev), torch.zeros(0, dtype=torch.int64, device=dev)
    boxes, inds, level = pnet_cells(net.pnet, imgs, scales, threshold, grids)
    if not len(boxes):
        return boxes[:, :5], inds
    ends = torch.searchsorted(level, torch.arange(len(scales), device=dev), right=True).tolist()  # level ends
    picks = [batched_nms(boxes[lo:hi, :4], boxes[lo:hi, 4], inds[lo:hi], 0.5) + lo
             for lo, hi in zip([0, *ends[:-1]], ends, strict=True) if hi > lo]
    pick = torch.cat(picks)
    boxes, inds = boxes[pick], inds[pick]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
    return regressed_candidates(boxes[pick]), inds[pick]
