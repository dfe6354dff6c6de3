"""MTCNN 5-point landmarks (facenet-pytorch), the detector family of Deep3DFaceRecon's examples.

facenet-pytorch ships its P/R/O-Net weights inside the wheel, so this backend works
offline. Its five points are, in order, left eye, right eye, nose, left mouth corner,
right mouth corner ("left" = smaller image x), which is Deep3D's 5-point order, in
image pixels with y down. The most probable face of each frame is kept. Detection
thresholds, minimum face size and pyramid factor are facenet-pytorch's defaults
([0.6, 0.7, 0.7], 20 px, 0.709). About 0.05 s per 512² frame on one CPU core. On CUDA the
second and third stages cut all their crops at once (:mod:`engine.landmarks.mtcnn_exact`, the
same bits as facenet-pytorch's per-box loop, which waits for the GPU at every box).
"""

from __future__ import annotations

import logging

import numpy as np

from engine.landmarks.base import BackendStatus, BoundDetector, faces_to_mark, landmarks_from_list
from engine.structures import Detections, FrameBatch, Landmarks

log = logging.getLogger(__name__)

NAME = "mtcnn"
WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")


def status() -> BackendStatus:
    """Whether facenet-pytorch imports and its bundled weights are present."""
    try:
        from importlib.metadata import version
        from pathlib import Path

        import facenet_pytorch.models.mtcnn as module
    except Exception as e:  # any import failure is a doctor finding, not a crash
        return BackendStatus(
            NAME, False,
            f"facenet-pytorch does not import ({type(e).__name__}: {e}); "
            "install it with `pip install facenet-pytorch --no-deps` (needs torch, torchvision)",
        )
    data = Path(module.__file__).resolve().parents[1] / "data"
    missing = [f for f in WEIGHT_FILES if not (data / f).is_file()]
    if missing:
        return BackendStatus(NAME, False, f"facenet-pytorch weights missing in {data}: {', '.join(missing)}")
    message = f"facenet-pytorch {version('facenet-pytorch')}, weights bundled ({data})"
    return BackendStatus(NAME, True, message)


#: Frame pixels per batched MTCNN call (:func:`default_max_pixels`): ``LARGE_CALL_PIXELS`` on a
#: GPU of at least ``LARGE_CALL_MIN_GIB``, else ``CALL_PIXELS``. A call of 32 1080p frames
#: peaks ~2.2 GiB above five calls of 7: 3.1 against 0.9 GiB, measured with the same tensors on
#: the CPU. On H200s it gave the exact path 505.5 against 442.6 frames/s on one GPU, 945.0–953.1
#: against 805.5 on two (docs/PERFORMANCE.md).
CALL_PIXELS = 16_000_000
LARGE_CALL_PIXELS = 32 * 1920 * 1080
LARGE_CALL_MIN_GIB = 40.0


def default_max_pixels(device: str, gpu_gib: float | None = None) -> int:
    """Frame pixels per batched MTCNN call on ``device``: a whole 32-frame batch of 1080p
    (:data:`LARGE_CALL_PIXELS`) on a GPU with at least :data:`LARGE_CALL_MIN_GIB` GiB (``gpu_gib``;
    None: asked of torch), else :data:`CALL_PIXELS` (7 such frames a call).

    >>> default_max_pixels("cuda:0", 141.0), default_max_pixels("cuda:0", 24.0), default_max_pixels("cpu")
    (66355200, 16000000, 16000000)
    """
    if not str(device).startswith("cuda"):
        return CALL_PIXELS
    if gpu_gib is None:
        from engine.procs import gpu_memory_gib

        gpu_gib = gpu_memory_gib(device)
    return LARGE_CALL_PIXELS if gpu_gib is not None and gpu_gib >= LARGE_CALL_MIN_GIB else CALL_PIXELS


class MtcnnLandmarker:
    """5-point landmarks with facenet-pytorch's MTCNN.

    MTCNN finds the points together with the box (its O-Net), so the detector
    (:attr:`detector`) reports them in :attr:`Detections.points_img_ydown` and the landmarker
    hands on the points of the face the tracker chose. A face without points (a box a tracker
    made up) is treated as no face.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_frames: detect a whole batch in one call (fast on a GPU). Batched and
            per-frame detection differ by ~1e-4 px, so per-frame keeps the results
            independent of the batch size. ``None``: batched on CUDA, per-frame on CPU.
        max_pixels: when batched, at most this many frame pixels (width × height) go through one
            call; it bounds the image pyramid's memory. ``None``: :func:`default_max_pixels`.
        batched_crops: cut the second and third stages' crops of all candidate boxes at once
            (:mod:`engine.landmarks.mtcnn_exact`: the same bits, without facenet-pytorch's
            per-box loop, which waits for a GPU at every box). ``None``: on CUDA. Which float32
            rule the installed kernel follows is asked here (:func:`~engine.landmarks.mtcnn_exact.area_rule`);
            when none matches, facenet's loop stays.
    """

    name = NAME
    num_points = 5
    #: Frames may come as a torch tensor (facenet-pytorch's ``detect_face`` takes one).
    device_frames = True

    def __init__(self, device: str = "cpu", batch_frames: bool | None = None, max_pixels: int | None = None,
                 batched_crops: bool | None = None):
        import torch
        from facenet_pytorch.models.mtcnn import MTCNN

        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.batch_frames = on_cuda if batch_frames is None else batch_frames
        self.max_pixels = default_max_pixels(device) if max_pixels is None else max_pixels
        self._net = MTCNN(device=self.device, select_largest=False, keep_all=True)
        if batched_crops is None:
            batched_crops = on_cuda
        self._area_rule: str | None = None  # None: facenet's per-box loop
        self._grids: dict = {}  # the P-Net cells' corners by pyramid (mtcnn_gpu.LevelGrid)
        if batched_crops:
            from engine.landmarks import mtcnn_exact

            self._area_rule = mtcnn_exact.area_rule(self.device)

    @property
    def detector(self) -> BoundDetector:
        """MTCNN's detection, boxes with their 5 points (shares this backend's networks)."""
        return BoundDetector(NAME, self.detect, device_frames=True)

    def frames_per_call(self, height: int, width: int) -> int:
        """How many frames of ``height`` × ``width`` pixels go through one detector call: as many
        as :attr:`max_pixels` holds (at least one) when batched, else one."""
        return max(1, self.max_pixels // max(1, height * width)) if self.batch_frames else 1

    def detect(self, frames: FrameBatch) -> Detections:
        """Every face MTCNN finds in each frame: box, probability and 5 points."""
        images = frames.images
        n = len(images)
        if n == 0:
            return Detections.empty(0)
        step = self.frames_per_call(*images.shape[1:3])
        if self._area_rule is not None:
            from engine.landmarks import mtcnn_exact

            return mtcnn_exact.detect_faces(self._net, images, step, self.device, self._area_rule, self._grids)
        return detect_faces(self._net, images, step)

    def __call__(self, frames: FrameBatch, faces: Detections | None = None) -> Landmarks:
        faces = faces_to_mark(self, frames, faces)
        where = faces.face_of_frame()
        points = faces.points_img_ydown
        per_frame = [None if j < 0 or points is None else points[j] for j in where]
        return landmarks_from_list(per_frame, self.num_points)

    def close(self) -> None:
        self._net = None


def create(config, device: str, source=None) -> MtcnnLandmarker:
    """The backend factory of :data:`engine.landmarks.BACKENDS`."""
    return MtcnnLandmarker(device=device)


def pyramid_scales(net, height: int, width: int) -> list[float]:
    """The scales of facenet-pytorch's image pyramid for ``height`` × ``width`` frames (its
    ``detect_face``): from 12 / ``net.min_face_size`` down by ``net.factor`` while the shorter
    side stays at least 12 pixels; empty for frames smaller than the minimum face."""
    m = 12.0 / net.min_face_size
    scales, minl = [], min(height, width) * m
    while minl >= 12:
        scales.append(m)
        m, minl = m * net.factor, minl * net.factor
    return scales


def detect_faces(net, images: np.ndarray, frames_per_call: int) -> Detections:
    """Every face facenet-pytorch's MTCNN ``net`` finds in each of ``images`` (uint8 (B, H, W, 3)
    RGB), ``frames_per_call`` frames per ``net.detect`` call: box, probability and 5 points, in
    the pixels of ``images``. Frames smaller than the minimum face have none (facenet-pytorch
    would raise: its image pyramid is empty)."""
    if len(images) and not pyramid_scales(net, *images.shape[1:3]):
        return Detections.empty(len(images))
    per_frame = []
    for lo in range(0, len(images), frames_per_call):
        boxes, probs, points = net.detect(images[lo : lo + frames_per_call], landmarks=True)
        per_frame.extend(_faces(boxes[i], probs[i], points[i]) for i in range(len(probs)))
    return _pack(per_frame)


def _faces(boxes, probs, points) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(boxes float64 (F, 4), probabilities float64 (F,), points float32 (F, 5, 2)) of one frame.

    facenet-pytorch returns object arrays: ``points`` is None (no face) or (F, 5, 2),
    ``probs`` is ``[None]`` or (F,). A missing probability becomes NaN (never chosen).
    """
    if points is None:
        return None
    p = np.asarray([np.nan if v is None else float(v) for v in np.ravel(probs)], dtype=np.float64)
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)
    b = np.full((len(p), 4), np.nan) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return b, p, pts


def _pack(per_frame: list) -> Detections:
    rows = [(i, f) for i, f in enumerate(per_frame) if f is not None and len(f[1])]
    if not rows:
        return Detections.empty(len(per_frame))
    return Detections(
        boxes_img_ydown=np.concatenate([f[0] for _, f in rows]),
        scores=np.concatenate([f[1] for _, f in rows]),
        frame_rows=np.concatenate([np.full(len(f[1]), i, dtype=np.int64) for i, f in rows]),
        num_frames=len(per_frame),
        points_img_ydown=np.concatenate([f[2] for _, f in rows]),
    )
