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
full-frame pixels. Coordinates are pixels of the original frame, y down; points in Deep3D's
5-point order (left eye, right eye, nose, left mouth corner, right mouth corner).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from engine.landmarks.base import BoundDetector, faces_to_mark, landmarks_from_list
from engine.landmarks.mtcnn import NAME, detect_faces
from engine.structures import Detections, FrameBatch, Landmarks

log = logging.getLogger(__name__)

#: facenet-pytorch's detection thresholds for P-Net, R-Net and O-Net.
THRESHOLDS = (0.6, 0.7, 0.7)
#: Side of R-Net's and O-Net's square inputs, pixels.
RNET_SIZE, ONET_SIZE = 24, 48
#: At most this many window pixels are resampled at once (float64 on the device: 24 bytes each).
WINDOW_PIXELS = 8_000_000


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


def area_matrix(lengths: np.ndarray, size: int, span: int) -> np.ndarray:
    """float32 (M, size, span): row i averages input samples ``[floor(i·n/size), ceil((i+1)·n/size))``.

    ``n = lengths[m]`` (>= 1) samples of face m, zero-padded to ``span``; ``A @ x`` is area
    resampling of x to ``size`` samples (``adaptive_avg_pool`` windows).

    >>> area_matrix(np.array([4]), 2, 5)[0].tolist()
    [[0.5, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 0.0]]
    """
    n = np.asarray(lengths, dtype=np.int64)[:, None, None]
    i = np.arange(size, dtype=np.int64)[None, :, None]
    j = np.arange(span, dtype=np.int64)[None, None, :]
    start = (i * n) // size
    stop = ((i + 1) * n + size - 1) // size
    inside = (j >= start) & (j < stop)
    return (inside / (stop - start)).astype(np.float32)


def gather_windows(images: np.ndarray, rows: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """uint8 (M, Hmax, Wmax, 3): each face's crop region, top-left aligned, zero padded.

    Only these windows go to the device. ``regions`` must be non-empty.
    """
    sizes = regions[:, 2:] - regions[:, :2]
    stack = np.zeros((len(rows), int(sizes[:, 1].max()), int(sizes[:, 0].max()), 3), dtype=np.uint8)
    for k, (row, (x0, y0, x1, y1)) in enumerate(zip(rows, regions, strict=True)):
        stack[k, : y1 - y0, : x1 - x0] = images[row, y0:y1, x0:x1]
    return stack


def window_chunks(regions: np.ndarray, budget: int) -> list[slice]:
    """Consecutive groups of faces whose padded window stack holds at most ``budget`` pixels.

    A group always takes at least one face (a face larger than the budget goes alone).

    >>> window_chunks(np.array([[0, 0, 10, 10]] * 5), 250)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    sizes = regions[:, 2:] - regions[:, :2]
    out, lo, wmax, hmax = [], 0, 0, 0
    for k, (w, h) in enumerate(sizes):
        wmax, hmax = max(wmax, int(w)), max(hmax, int(h))
        if k > lo and (k - lo + 1) * wmax * hmax > budget:
            out.append(slice(lo, k))
            lo, wmax, hmax = k, int(w), int(h)
    out.append(slice(lo, len(sizes)))
    return out


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
    """

    name = NAME
    num_points = 5

    def __init__(self, device: str = "cpu", detect_max_side: int = 640, max_pixels: int = 16_000_000):
        import torch
        from facenet_pytorch.models.mtcnn import MTCNN

        if detect_max_side < 12:
            raise ValueError(f"detect_max_side must be >= 12 pixels, got {detect_max_side}")
        self.device = torch.device(device)
        self.detect_max_side = int(detect_max_side)
        self.max_pixels = max_pixels
        self._net = MTCNN(device=self.device, select_largest=False, keep_all=True,
                          thresholds=list(THRESHOLDS))
        self._net.eval()

    # --- keyframe detection ------------------------------------------------------------------

    @property
    def detector(self) -> BoundDetector:
        """Full MTCNN on frames shrunk to ``detect_max_side`` (shares this backend's networks)."""
        return BoundDetector(NAME, self.detect)

    def detect(self, frames: FrameBatch) -> Detections:
        """Every face full MTCNN finds in each (shrunk) frame; boxes and points in full-frame pixels."""
        import cv2

        images = frames.images
        n = len(images)
        if n == 0:
            return Detections.empty(0)
        h, w = images.shape[1:3]
        scale = self.detect_max_side / max(h, w)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))  # (width, height)
            images = np.stack([cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images])
        sh, sw = images.shape[1:3]
        step = max(1, self.max_pixels // max(1, sh * sw))
        found = detect_faces(self._net, images, step)
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
        points: list[np.ndarray | None] = [None] * n
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
            for k, row in enumerate(rows):
                if score[k] >= THRESHOLDS[2]:
                    points[row] = pts[k]
                    boxes[row] = final[k]
        landmarks = landmarks_from_list(points, self.num_points, confidence=prob)
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

        parts = []
        for chunk in window_chunks(regions, WINDOW_PIXELS):
            windows = gather_windows(images, rows[chunk], regions[chunk])
            lengths = regions[chunk, 2:] - regions[chunk, :2]  # (width, height)
            ay = torch.from_numpy(area_matrix(lengths[:, 1], size, windows.shape[1])).to(self.device)
            ax = torch.from_numpy(area_matrix(lengths[:, 0], size, windows.shape[2])).to(self.device)
            with torch.inference_mode():  # float64: exact averages whatever the TF32 setting
                x = torch.from_numpy(windows).to(self.device).permute(0, 3, 1, 2).double()  # (m, 3, H, W)
                x = torch.matmul(x, ax.double().transpose(1, 2)[:, None])  # (m, 3, H, size)
                parts.append(torch.matmul(ay.double()[:, None], x).float())  # (m, 3, size, size)
        with torch.inference_mode():
            out = net((torch.cat(parts) - 127.5) * 0.0078125)
        if len(out) == 2:  # R-Net: (regression, softmax)
            return out[0].double().cpu().numpy(), out[1][:, 1].double().cpu().numpy()
        reg, marks, soft = out
        return reg.double().cpu().numpy(), (marks.double().cpu().numpy(), soft[:, 1].double().cpu().numpy())

    def close(self) -> None:
        self._net = None


def create(config, device: str, source=None) -> RefineMtcnn:
    """A factory with the signature of :data:`engine.landmarks.BACKENDS` entries."""
    return RefineMtcnn(device=device)
