"""Batched S3FD + 2D-FAN-4 for the fast path: the ``fan`` backend's recipe, a batch of frames at a time.

:class:`BatchedFan` runs the same networks, from the same weight files, as
:class:`~engine.landmarks.fan.FanLandmarker` (face_alignment 1.5.0), with the per-frame host
work moved into batched torch on the device:

* **Landmarks.** For each frame's box: face_alignment's centre/scale rule (centre of the box
  moved up by 0.12·box height, scale = (width + height) / 195), its integer crop window
  (the corners of the 256² input mapped back to the frame and truncated), the zero-padded
  window resized to 256² in integer torch with ``cv2.resize(INTER_LINEAR)``'s fixed-point
  weights and rounding (the same bytes), 2D-FAN-4 on all crops in one forward, then
  face_alignment's heat-map decoding: arg-max, a quarter pixel towards the larger neighbour,
  the -0.5 offset, the inverse 64² → frame transform and its truncation to whole pixels.
  Only each box's window is uploaded, never a whole frame.
  Confidence = the mean of the 68 heat-map peaks (as ``fan``).
* **Detection.** S3FD on frames downscaled on the device (antialiased bilinear) so their
  longest side is at most ``detect_max_side``; boxes are scaled back to full-frame pixels.
  Anchors scoring > 0.05, NMS at IoU 0.3 (face_alignment's sort and ``+1`` box areas), the
  boxes scoring > 0.5 kept, best first: face_alignment's boxes, in its order even among
  equal scores (its per-image path; NMS stops at the first score <= 0.5).
* **Precision.** ``"fp32"`` or ``"fp16"`` (weights and activations in half precision; S3FD's
  L2 normalisations are computed in fp32, where fp16 would overflow). Channels-last on CUDA.

All points are float32 pixel ``x, y`` of the full frame, y down (see :mod:`engine.landmarks.base`).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import WeightsMissingError
from engine.frames import on_device, to_torch, zeros_like_frames
from engine.landmarks import fan as fan_backend
from engine.landmarks.base import BoundDetector, faces_to_mark, landmarks_from_list
from engine.landmarks.fan import NAME, WEIGHTS, check_weights, load_failure, missing_weights, weights_dir
from engine.safe_load import load_weights
from engine.structures import Detections, FrameBatch, Landmarks

log = logging.getLogger(__name__)

#: Accepted ``precision`` values.
PRECISIONS = ("fp16", "fp32")

CROP_SIZE = 256  # FAN's input side, pixels
HEATMAP_SIZE = 64  # FAN's heat-map side, pixels
REFERENCE_SCALE = 195.0  # face_alignment: scale = (box width + box height) / 195
SCALE_FACTOR = 200.0  # face_alignment: the crop covers 200·scale frame pixels
CENTRE_Y_SHIFT = 0.12  # face_alignment: the crop centre sits 0.12·box height above the box centre
S3FD_MEAN_BGR = (104.0, 117.0, 123.0)
S3FD_VARIANCES = (0.1, 0.2)
NMS_IOU = 0.3
MIN_SCORE = 0.5  # face_alignment keeps boxes scoring > 0.5 ...
CANDIDATE_SCORE = 0.05  # ... of the anchors scoring > 0.05, after NMS


# --- weights ---------------------------------------------------------------------------------


def _weight_path(name: str, url: str) -> Path:
    """The weight file ``name`` in :func:`~engine.landmarks.fan.weights_dir`, downloaded when missing
    (only reached after :func:`~engine.landmarks.fan.check_weights` allowed downloading)."""
    path = weights_dir() / name
    if not path.is_file():
        from face_alignment.utils import load_file_from_url

        try:
            load_file_from_url(url)
        except OSError as e:  # URLError (failed download) is an OSError
            raise WeightsMissingError(fan_backend._missing_message(weights_dir(), missing_weights(), str(e))) from None
    return path


class _L2NormFp32(nn.Module):
    """S3FD's L2Norm (same ``weight`` parameter) computed in fp32: its sum of squares overflows fp16."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        norm = x32.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return (x32 / norm * self.weight.view(1, -1, 1, 1)).to(x.dtype)


def load_networks(device: str, precision: str = "fp16",
                  allow_download: bool | None = None) -> tuple[nn.Module, nn.Module]:
    """(S3FD, 2D-FAN-4) from the ``fan`` backend's files, weights-only, eval, on ``device``.

    Args:
        device: torch device string.
        precision: ``"fp16"`` or ``"fp32"`` (see the module docstring).
        allow_download: see :func:`engine.landmarks.fan.check_weights`.

    Raises:
        WeightsMissingError: weights absent and not downloadable.
        WeightsError: a file is there but does not load (asks for a Python object, damaged,
            wrong layout): the same messages as the ``fan`` backend.
        ValueError: unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check_weights(allow_download)
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    nets = []
    for (name, url), factory in zip(WEIGHTS, (s3fd, lambda: FAN(4)), strict=True):
        path = _weight_path(name, url)
        try:
            state = load_weights(path)
            if not isinstance(state, dict):
                raise ValueError(f"{name} holds a {type(state).__name__}, not a state dict")
            net = factory()
            net.load_state_dict(state)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise load_failure(e) from None
        nets.append(net)
    sfd, fan = nets
    for attr in ("conv3_3_norm", "conv4_3_norm", "conv5_3_norm"):
        old = getattr(sfd, attr)
        setattr(sfd, attr, _L2NormFp32(old.weight, old.eps))
    dtype = torch.float16 if precision == "fp16" else torch.float32
    channels_last = torch.device(device).type == "cuda"
    out = []
    for net in (sfd, fan):
        net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        out.append(net)
    for attr in ("conv3_3_norm", "conv4_3_norm", "conv5_3_norm"):  # back to fp32 after .to(dtype)
        getattr(out[0], attr).float()
    return out[0], out[1]


# --- boxes → crops (face_alignment's geometry) --------------------------------------------------


def centre_and_scale(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """face_alignment's crop centre (float64 (N, 2) frame px, y down) and scale (float64 (N,)).

    >>> c, s = centre_and_scale(np.array([[10.0, 20.0, 50.0, 120.0]]))
    >>> c.tolist(), round(float(s[0]), 6)
    ([[30.0, 58.0]], 0.717949)
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    centre = np.stack([x2 - (x2 - x1) / 2.0, y2 - (y2 - y1) / 2.0], axis=1)
    centre[:, 1] -= (y2 - y1) * CENTRE_Y_SHIFT
    return centre, (x2 - x1 + y2 - y1) / REFERENCE_SCALE  # summed left to right, as face_alignment


def _frame_to_crop(centre: np.ndarray, scale: np.ndarray, resolution: float) -> np.ndarray:
    """float64 (N, 3, 3): face_alignment's frame → crop affine (crop side ``resolution``)."""
    h = SCALE_FACTOR * scale
    t = np.zeros((len(scale), 3, 3))
    t[:, 0, 0] = t[:, 1, 1] = resolution / h
    t[:, 0, 2] = resolution * (-centre[:, 0] / h + 0.5)
    t[:, 1, 2] = resolution * (-centre[:, 1] / h + 0.5)
    t[:, 2, 2] = 1.0
    return t


def crop_windows(centre: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer frame corners of each face's crop window: (upper-left (N, 2), bottom-right (N, 2)) int64.

    The window is frame columns ``ul[0] .. br[0]-1`` and rows ``ul[1] .. br[1]-1`` (zeros
    outside the frame); it is resized to 256². As face_alignment: crop pixels (1, 1) and
    (256, 256) mapped back through the inverted float32 affine, truncated towards zero.
    """
    t = torch.from_numpy(_frame_to_crop(centre, scale, float(CROP_SIZE))).float()
    inv = torch.linalg.inv(t)
    corners = torch.tensor([[1.0, 1.0, 1.0], [CROP_SIZE, CROP_SIZE, 1.0]])  # (2, 3)
    mapped = torch.einsum("nij,kj->nki", inv, corners)[..., :2].to(torch.int32)  # truncation
    return mapped[:, 0].numpy().astype(np.int64), mapped[:, 1].numpy().astype(np.int64)


def gather_windows(images, rows: np.ndarray, ul: np.ndarray, br: np.ndarray, pin: bool = False) -> torch.Tensor:
    """uint8 (N, Hmax, Wmax, 3): face n's window of frame ``rows[n]`` in the top-left corner, zeros elsewhere.

    Only the part of each window inside its frame is copied; the rest (outside the frame, and
    the padding up to the largest window) stays zero. Host frames (numpy) give a host tensor
    (pinned when ``pin``); device frames (a tensor) give a tensor on their device.
    """
    sizes = br - ul  # (N, 2) width, height
    height, width = images.shape[1:3]
    shape = (len(rows), max(int(sizes[:, 1].max()), 1), max(int(sizes[:, 0].max()), 1), 3)
    if on_device(images):
        out = view = zeros_like_frames(images, shape)
    else:
        out = torch.zeros(shape, dtype=torch.uint8, pin_memory=pin)
        view = out.numpy()
    for n, (row, (x0, y0), (x1, y1)) in enumerate(zip(rows, ul, br, strict=True)):
        fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if fx1 > fx0 and fy1 > fy0:
            view[n, fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0] = images[row, fy0:fy1, fx0:fx1]
    return out


def linear_taps(sizes: np.ndarray, side: int = CROP_SIZE, clamp_weights: bool = True) -> tuple[np.ndarray, ...]:
    """OpenCV's INTER_LINEAR taps for resizing each of N lengths ``sizes`` to ``side``.

    Returns ``(i0, i1, w0, w1)``, each (N, side): output pixel u = (w0·src[i0] + w1·src[i1]),
    weights in 11-bit fixed point (sum 2048). As ``cv2.resize``: the source coordinate
    ``(u + 0.5)·size/side - 0.5`` in float32, floor and fraction, weights rounded half to even;
    indices clamped to the source. Horizontally (``clamp_weights``) a tap outside the source
    also moves its fraction to 0; vertically OpenCV keeps the fraction and repeats the edge row.
    """
    size = np.asarray(sizes, dtype=np.int64)[:, None]
    u = np.arange(side, dtype=np.float64)[None, :]
    f = ((u + 0.5) * (1.0 / (side / size)) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = (f - i0.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        f[(i0 < 0) | (i0 >= size - 1)] = 0
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
    w1 = np.rint(f * np.float32(2048)).astype(np.int32)
    top = np.broadcast_to(size - 1, i0.shape)
    return np.clip(i0, 0, top), np.clip(i0 + 1, 0, top), w0, w1


def resize_windows(windows: torch.Tensor, sizes: np.ndarray, side: int = CROP_SIZE) -> torch.Tensor:
    """Each window resized to side² exactly as ``cv2.resize(INTER_LINEAR)`` on uint8 (x86/ARM SIMD build).

    Args:
        windows: uint8 (N, Hmax, Wmax, 3) on the device (:func:`gather_windows`).
        sizes: int (N, 2) width, height of each window inside its padded slot.
        side: output side, pixels.

    Returns:
        float32 (N, 3, side, side), whole levels 0…255. Integer arithmetic as OpenCV's
        vectorised path: horizontal taps summed exactly (weights sum 2048), then each row
        ``(((h0 >> 4)·b0) >> 16) + (((h1 >> 4)·b1) >> 16)``, rounded ``(v + 2) >> 2``.
    """
    device = windows.device
    x0, x1, a0, a1 = (torch.from_numpy(t).to(device) for t in linear_taps(sizes[:, 0], side, True))
    y0, y1, b0, b1 = (torch.from_numpy(t).to(device) for t in linear_taps(sizes[:, 1], side, False))
    n = torch.arange(len(windows), device=device)[:, None, None]

    def row(y: torch.Tensor) -> torch.Tensor:  # (N, side, side, 3) int32: horizontal pass of rows y
        left = windows[n, y[:, :, None], x0[:, None, :]].to(torch.int32)
        right = windows[n, y[:, :, None], x1[:, None, :]].to(torch.int32)
        return left * a0[:, None, :, None] + right * a1[:, None, :, None]

    top = ((row(y0) >> 4) * b0[:, :, None, None]) >> 16
    bottom = ((row(y1) >> 4) * b1[:, :, None, None]) >> 16
    out = ((top + bottom + 2) >> 2).clamp_(0, 255)
    return out.permute(0, 3, 1, 2).float()


# --- heat maps → points ------------------------------------------------------------------------


def decode_heatmaps(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """face_alignment's heat-map decoding, batched: (points float32 (N, K, 2) heat-map px, peaks float32 (N, K)).

    Arg-max (the first of equal values), +1 (1-based), a quarter pixel towards the larger
    neighbour in x and in y for peaks off the border, then -0.5.
    """
    hm = heatmaps.float()
    n, k, h, w = hm.shape
    flat = hm.reshape(n, k, h * w)
    idx = flat.argmax(dim=-1)
    peaks = flat.gather(-1, idx[..., None])[..., 0]
    px, py = idx % w, idx // w
    inner = (px > 0) & (px < w - 1) & (py > 0) & (py < h - 1)

    def at(dy: int, dx: int) -> torch.Tensor:
        j = (py + dy).clamp(0, h - 1) * w + (px + dx).clamp(0, w - 1)
        return flat.gather(-1, j[..., None])[..., 0]

    step_x = torch.sign(at(0, 1) - at(0, -1)) * 0.25
    step_y = torch.sign(at(1, 0) - at(-1, 0)) * 0.25
    x = px.float() + 1 + torch.where(inner, step_x, torch.zeros_like(step_x)) - 0.5
    y = py.float() + 1 + torch.where(inner, step_y, torch.zeros_like(step_y)) - 0.5
    return torch.stack([x, y], dim=-1), peaks


def heatmap_to_frame(points: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Heat-map points (N, K, 2) → frame pixels, float32 (N, K, 2) y down, as face_alignment's
    ``transform_np(point, centre, scale, 64, invert=True)``: the float64 pseudo-inverse of the
    64² crop affine times ``(x, y, 1)``, truncated towards zero.

    The pseudo-inverse (not the closed-form inverse) keeps its last-bit rounding, which decides
    the truncation when a point lands on a whole pixel. face_alignment's numba-compiled
    ``pinv`` rounds differently from numpy's in such ties (1 px, seen only with round-number
    boxes); this follows numpy's, face_alignment's uncompiled code.
    """
    t = _frame_to_crop(np.asarray(centre, np.float64), np.asarray(scale, np.float64), float(HEATMAP_SIZE))
    inverse = np.linalg.pinv(t)  # (N, 3, 3)
    p = np.asarray(points, np.float64)
    homogeneous = np.concatenate([p, np.ones((*p.shape[:-1], 1))], axis=-1)  # (N, K, 3)
    frame = np.matmul(inverse[:, None], homogeneous[..., None])[..., :2, 0]
    return frame.astype(np.int32).astype(np.float32)


# --- S3FD decoding -----------------------------------------------------------------------------


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU, stop_at: float = -np.inf) -> np.ndarray:
    """Greedy NMS as face_alignment's (``argsort()[::-1]`` order, box areas with +1, a box is
    dropped when its overlap with a kept one is > ``iou``); int64 indices of the kept boxes,
    best first. ``stop_at``: stop once the best remaining score is <= it (those would be
    discarded anyway; the boxes kept before are the same).

    >>> nms(np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29]], float), np.array([0.9, 0.8, 0.7])).tolist()
    [0, 2]
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size and scores[order[0]] > stop_at:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return np.asarray(keep, dtype=np.int64)


def s3fd_candidates(outputs: list[torch.Tensor],
                    min_score: float = CANDIDATE_SCORE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S3FD's 12 outputs → every anchor scoring > ``min_score``: (frame row int64 (M,),
    box float64 (M, 4) x1 y1 x2 y2 in input px, score float64 (M,)), level by level, row-major
    (face_alignment's order for one image).

    The boxes decode as face_alignment's ``decode`` (variances 0.1, 0.2; anchors of side
    4·stride centred on each cell, strides 4 … 128), with the same float32/float64 steps.
    """
    rows, locs, priors, scores, sides = [], [], [], [], []
    for level in range(len(outputs) // 2):
        prob = F.softmax(outputs[2 * level].float(), dim=1)[:, 1]
        b, yy, xx = torch.nonzero(prob > min_score, as_tuple=True)
        reg = outputs[2 * level + 1].float()
        stride = 2 ** (level + 2)
        rows.append(b)
        scores.append(prob[b, yy, xx])
        locs.append(reg[b, :, yy, xx])
        priors.append(torch.stack([stride / 2 + xx * stride, stride / 2 + yy * stride], dim=1))
        sides.append(torch.full_like(prob[b, yy, xx], 4.0 * stride))
    row = torch.cat(rows).cpu().numpy().astype(np.int64)
    score = torch.cat(scores).cpu().numpy().astype(np.float64)
    loc = torch.cat(locs).cpu().numpy()  # float32, as face_alignment decodes it
    side = torch.cat(sides).cpu().numpy().astype(np.float64)[:, None]
    prior_xy = torch.cat(priors).cpu().numpy().astype(np.float64)
    v0, v1 = (np.float32(v) for v in S3FD_VARIANCES)
    xy = prior_xy + (loc[:, :2] * v0) * side
    wh = side * np.exp(loc[:, 2:] * v1)
    xy = xy - wh / 2
    return row, np.concatenate([xy, xy + wh], axis=1), score


def detections_from_candidates(rows: np.ndarray, boxes: np.ndarray, scores: np.ndarray, num_frames: int,
                               to_frame: tuple[float, float] = (1.0, 1.0)) -> Detections:
    """Per-frame NMS of S3FD candidates, boxes scoring > 0.5 kept, best first, scaled by ``to_frame`` (x, y).

    Candidates down to face_alignment's 0.05 go into the sort, so equal scores come out in its order.
    """
    keep = []
    for r in np.unique(rows):
        members = np.flatnonzero(rows == r)
        kept = members[nms(boxes[members], scores[members], stop_at=MIN_SCORE)]
        keep.append(kept[scores[kept] > MIN_SCORE])
    kept = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    if not len(kept):
        return Detections.empty(num_frames)
    out = boxes[kept] * np.array([to_frame[0], to_frame[1], to_frame[0], to_frame[1]])
    return Detections(boxes_img_ydown=out, scores=scores[kept], frame_rows=rows[kept], num_frames=num_frames)


def detect_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) of a frame downscaled so its longest side is at most ``max_side`` (never upscaled).

    >>> detect_size(1080, 1920, 640), detect_size(512, 512, 640)
    ((360, 640), (512, 512))
    """
    factor = max_side / max(height, width)
    if factor >= 1:
        return height, width
    return max(1, round(height * factor)), max(1, round(width * factor))


# --- the backend -------------------------------------------------------------------------------


class BatchedFan:
    """S3FD + 2D-FAN-4, batched on ``device``: the :class:`~engine.stages.landmark.Landmarker`
    of the fast path (68 points; on a given box, fp32, the ``fan`` backend's numbers).

    Build it once and reuse it (the networks load in the constructor).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        precision: ``"fp16"`` or ``"fp32"``.
        detect_max_side: S3FD sees frames downscaled to this longest side (pixels).
        max_batch: faces (or frames, for S3FD) per network forward; a batch larger than this
            runs in several forwards.
        allow_download: see :func:`engine.landmarks.fan.check_weights`.

    Raises:
        WeightsMissingError, WeightsError: as the ``fan`` backend.
        ValueError: bad precision, ``detect_max_side`` or ``max_batch``.
    """

    name = NAME
    num_points = 68

    def __init__(self, device: str = "cpu", precision: str = "fp16", detect_max_side: int = 640,
                 max_batch: int = 64, allow_download: bool | None = None):
        if detect_max_side < 32:
            raise ValueError(f"detect_max_side must be >= 32 pixels, got {detect_max_side}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device = torch.device(device)
        self.precision = precision
        self.detect_max_side = int(detect_max_side)
        self.max_batch = int(max_batch)
        self._sfd, self._fan = load_networks(device, precision, allow_download)
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        self._cuda = self.device.type == "cuda"
        log.info("batched S3FD + 2D-FAN-4 on %s (%s, S3FD at <= %d px)", device, precision, detect_max_side)

    @property
    def detector(self) -> BoundDetector:
        """S3FD on downscaled frames (shares this backend's networks)."""
        return BoundDetector("s3fd", self.detect)

    def _to_net(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self._dtype)
        return x.contiguous(memory_format=torch.channels_last) if self._cuda else x

    @torch.inference_mode()
    def detect(self, frames: FrameBatch) -> Detections:
        """Every face S3FD keeps in each frame (score > 0.5, NMS 0.3), best first, full-frame pixels."""
        images = frames.images
        num, height, width = images.shape[:3]
        if num == 0:
            return Detections.empty(0)
        small = detect_size(height, width, self.detect_max_side)
        mean = torch.tensor(S3FD_MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        parts = []
        for start in range(0, num, self.max_batch):
            x = to_torch(images[start:start + self.max_batch], self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float()
            if small != (height, width):
                x = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
            x = x.flip(1) - mean  # RGB → BGR, minus S3FD's means
            row, boxes, scores = s3fd_candidates(self._sfd(self._to_net(x)))
            parts.append((row + start, boxes, scores))
        rows, boxes, scores = (np.concatenate(p) for p in zip(*parts, strict=True))
        factors = (width / small[1], height / small[0])
        return detections_from_candidates(rows, boxes, scores, num, factors)

    @torch.inference_mode()
    def __call__(self, frames: FrameBatch, faces: Detections | None = None) -> Landmarks:
        faces = faces_to_mark(self, frames, faces)
        where = faces.face_of_frame()
        boxes = faces.boxes_img_ydown[np.maximum(where, 0)] if len(faces) else np.zeros((len(frames), 4))
        usable = (where >= 0) & np.isfinite(boxes).all(axis=1)
        usable &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # a degenerate box marks nothing
        rows = np.flatnonzero(usable)
        per_frame: list[np.ndarray | None] = [None] * len(frames)
        confidence = np.full(len(frames), np.nan)
        if len(rows):
            points, peaks = self.mark(frames.images, rows, boxes[rows])
            for n, row in enumerate(rows):
                per_frame[row] = points[n]
            confidence[rows] = peaks.mean(axis=1)
        return landmarks_from_list(per_frame, self.num_points, confidence)

    @torch.inference_mode()
    def mark(self, images, rows: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """2D-FAN-4 on box n of frame ``rows[n]``, all at once.

        Args:
            images: uint8 (B, H, W, 3) RGB frames (numpy, or a tensor on the device).
            rows: int (N,) frame of each box.
            boxes: float (N, 4) x1, y1, x2, y2 frame px, y down.

        Returns:
            (points float32 (N, 68, 2) frame px y down, heat-map peaks float32 (N, 68)).
        """
        centre, scale = centre_and_scale(boxes)
        ul, br = crop_windows(centre, scale)
        points, peaks = [], []
        for start in range(0, len(rows), self.max_batch):
            part = slice(start, start + self.max_batch)
            windows = gather_windows(images, np.asarray(rows)[part], ul[part], br[part], pin=self._cuda)
            crops = resize_windows(windows.to(self.device, non_blocking=True), br[part] - ul[part]) / 255.0
            heatmaps = self._fan(self._to_net(crops))[-1]
            hm_points, hm_peaks = decode_heatmaps(heatmaps)
            points.append(hm_points.cpu().numpy())
            peaks.append(hm_peaks.cpu().numpy())
        return heatmap_to_frame(np.concatenate(points), centre, scale), np.concatenate(peaks).astype(np.float32)

    def close(self) -> None:
        self._sfd = self._fan = None
