"""The dataclasses stages hand each other (see ``docs/architecture.md``).

source → :class:`FrameBatch` → detector → :class:`Detections` → tracker → :class:`Detections`
(at most one face a frame) → landmarker → :class:`Landmarks` → temporal policy →
:class:`AlignPlan` → aligner → :class:`AlignedBatch` → regressor → coefficients, joined into
one :class:`FrameResults` per batch for the sinks.

All arrays are numpy. Batches are *packed*: one row per frame, ``index`` gives the
frame number inside its input. Invalid rows are kept (never dropped) so every output
stays frame-aligned with the video. Validity flows one way: each stage reports its own
``reason`` per frame and never edits another stage's arrays; :class:`FrameResults` joins them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class MediaInfo:
    """What the probe learned about an input before decoding it.

    Attributes:
        path: the input file.
        kind: ``"video"`` or ``"image"``.
        width, height: display size in pixels, after rotation metadata is applied.
        fps: average frame rate (frames/s); 0.0 for an image.
        frame_count: frames expected (from the container; an estimate for some
            formats, exact after decoding); 1 for an image.
        duration: seconds; 0.0 for an image.
        rotation: clockwise degrees applied to decoded frames (0, 90, 180, 270).
        codec: decoder name (``"h264"``, ``"mpeg4"``, ``"png"`` ...).
        has_audio: True when the container has an audio stream.
    """

    path: Path
    kind: str
    width: int
    height: int
    fps: float = 0.0
    frame_count: int = 1
    duration: float = 0.0
    rotation: int = 0
    codec: str = ""
    has_audio: bool = False


@dataclass(frozen=True)
class FrameBatch:
    """Consecutive decoded frames of one input.

    Attributes:
        images: uint8 (B, H, W, 3) RGB, y down, rotation already applied.
        index: int64 (B,) frame numbers, 0-based, in decoding order.
        timestamps: float64 (B,) presentation time of each frame in seconds (real
            timestamps: variable-frame-rate videos are not assumed constant-rate).
    """

    images: np.ndarray
    index: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class Detections:
    """Faces found in a batch of frames, *packed*: one row per face, ``frame_rows`` says whose.

    Attributes:
        boxes_img_ydown: float64 (N, 4) ``x1, y1, x2, y2`` in pixels of the original frame,
            y down (top-left to bottom-right corner), exactly as the detector gave them.
        scores: float64 (N,) the detector's confidence, higher is better (NaN: none given).
        frame_rows: int64 (N,) the row of the :class:`FrameBatch` each face belongs to
            (``0 <= row < num_frames``), non-decreasing; within a frame, the detector's order.
        num_frames: B, rows of the batch (a frame may have no face, or several).
        points_img_ydown: float32 (N, P, 2) landmarks the detector found with each box
            (MTCNN: its 5 points, Deep3D order), pixels, y down; None when it gives none.
        faces_found: int64 (N,) set by a tracker: how many faces the detector reported in this
            face's frame; None before a tracker chose.
        kept_rank: int64 (N,) set by a tracker: rank of this (kept) face in the reference's
            order, most confident first (0: the reference's own choice); None before a tracker chose.
    """

    boxes_img_ydown: np.ndarray
    scores: np.ndarray
    frame_rows: np.ndarray
    num_frames: int
    points_img_ydown: np.ndarray | None = None
    faces_found: np.ndarray | None = None
    kept_rank: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.frame_rows.shape[0])

    @classmethod
    def empty(cls, num_frames: int) -> Detections:
        """No face in any of ``num_frames`` frames.

        >>> len(Detections.empty(3)), Detections.empty(3).num_frames
        (0, 3)
        """
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), num_frames)

    def take(self, rows: np.ndarray) -> Detections:
        """The faces at packed positions ``rows`` (int (M,)), same batch."""
        rows = np.asarray(rows, dtype=np.int64)
        def pick(a):
            return None if a is None else a[rows]

        return Detections(self.boxes_img_ydown[rows], self.scores[rows], self.frame_rows[rows], self.num_frames,
                          pick(self.points_img_ydown), pick(self.faces_found), pick(self.kept_rank))

    def face_of_frame(self) -> np.ndarray:
        """int64 (num_frames,): packed position of each frame's face, -1 for none.

        Only meaningful when a frame has at most one face (a tracker's output).
        """
        where = np.full(self.num_frames, -1, dtype=np.int64)
        rows, first = np.unique(self.frame_rows, return_index=True)  # first face of each frame
        where[rows] = first
        return where


@dataclass(frozen=True)
class Landmarks:
    """Facial landmarks for a batch of frames, one face per frame.

    Attributes:
        points_img_ydown: float32 (B, K, 2) pixel x, y in the original frame, y down;
            K is 68 (FAN/iBUG order) or 5 (Deep3D order: left eye, right eye, nose,
            left mouth corner, right mouth corner). Rows of invalid frames are NaN.
        valid: bool (B,) a face was found in the frame.
        reason: (B,) empty string for valid frames, else why not (``"no_face"``...).
        confidence: float32 (B,) the landmarker's own confidence in its points, 0…1 (FAN: the
            mean heat-map peak of its 68 points), NaN where no face; None for backends that give
            none (MTCNN, keypoint files): the detector's score stands in for them.
    """

    points_img_ydown: np.ndarray
    valid: np.ndarray
    reason: tuple[str, ...]
    confidence: np.ndarray | None = None

    @property
    def num_points(self) -> int:
        return int(self.points_img_ydown.shape[1])


@dataclass(frozen=True)
class FaceChoice:
    """What the tracker chose in each frame of a batch, for the quality flags.

    Attributes:
        faces_found: int64 (B,) faces the detector reported (-1: unknown, no detector ran).
        kept_rank: int64 (B,) rank of the kept face in the reference's order, most confident
            first (0: the reference's choice; -1: no face kept).
        score: float64 (B,) the kept face's detector score (NaN: none).
        detector: the detector's name (``"mtcnn"``, ``"s3fd"`` ...; ``""``: none), which says
            what ``score`` is.
    """

    faces_found: np.ndarray
    kept_rank: np.ndarray
    score: np.ndarray
    detector: str = ""

    @classmethod
    def of(cls, faces: Detections | None, num_frames: int, detector: str = "") -> FaceChoice:
        """Per-frame arrays from a tracker's output (at most one face a frame; None: no detector)."""
        found = np.full(num_frames, -1, dtype=np.int64)
        rank = np.full(num_frames, -1, dtype=np.int64)
        score = np.full(num_frames, np.nan)
        if faces is not None:
            where = faces.face_of_frame()
            has = where >= 0
            found[:] = 0
            if faces.faces_found is not None:
                found[has] = faces.faces_found[where[has]]
            else:
                found[has] = 1
            rank[has] = 0 if faces.kept_rank is None else faces.kept_rank[where[has]]
            score[has] = faces.scores[where[has]]
        return cls(found, rank, score, detector)


@dataclass(frozen=True)
class AlignPlan:
    """What the temporal (no-face) policy decided for a batch: the points each frame is aligned with.

    Attributes:
        lm_img_ydown: float32 (B, K, 2) pixels of the original frame, y down; rows where
            ``use_template`` are 0 and unused.
        use_template: bool (B,) align this frame with the centred 5-point template instead
            (:func:`engine.align.template_fallback_img_yup`).
    """

    lm_img_ydown: np.ndarray
    use_template: np.ndarray


@dataclass(frozen=True)
class AlignedBatch:
    """Output of the aligner for a batch.

    Attributes:
        crops: uint8 (B, 224, 224, 3) RGB aligned crops (Pillow bicubic, zero padded): a numpy
            array, or a torch uint8 tensor on the aligner's device
            (``TorchAligner(keep_on_device=True)``).
        trans_params: float32 (B, 5) ``[w0, h0, s, tx, ty_yup]`` (spec §2.5).
        lm5_img_ydown: float32 (B, 5, 2) the 5 points used for the fit, y down.
        crop_box: int32 (B, 4) ``[left, up, w, h]``: the frame was resized to ``(w, h)`` pixels
            and the crop is the 224×224 box whose top-left corner is ``(left, up)`` in it (may be
            negative), exactly as cut (the int32 truncations of the float64 fit).
        used_template: bool (B,) the frame was aligned with the template: planned so, or its
            landmarks admitted no fit.
        reason: (B,) ``"bad_landmarks"`` where the aligner had to fall back to the template on
            its own, else ``""`` (the aligner's verdict only; see :class:`FrameResults`).
    """

    crops: np.ndarray
    trans_params: np.ndarray
    lm5_img_ydown: np.ndarray
    crop_box: np.ndarray
    used_template: np.ndarray
    reason: tuple[str, ...]


@dataclass(frozen=True)
class FrameResults:
    """Everything known about one batch of frames after regression: what every sink receives.

    A frame is valid when the landmarker found a face and the aligner could use its points;
    ``reason`` names the last stage that rejected it (``"bad_landmarks"`` from the aligner over
    the landmarker's ``"no_face"``).

    Attributes:
        index: int64 (B,) frame numbers in the input, 0-based.
        timestamps: float64 (B,) presentation times, seconds.
        coeff: float32 (B, 257) ``[id 80 | exp 64 | tex 80 | angle 3 | gamma 27 | trans 3]``.
        trans_params: float32 (B, 5) ``[w0, h0, s, tx, ty_yup]``.
        crop_box: int32 (B, 4) ``[left, up, w, h]`` of the crop (see :class:`AlignedBatch`).
        landmarks_img_ydown: float32 (B, K, 2) the landmarks each frame was aligned with (after
            the no-face policy), pixels y down; -1 rows where the template was used.
        valid: bool (B,). reason: str (B,) ``""`` where valid.
        extras: optional per-frame arrays (e.g. ``lm68`` from the face model), B rows each.
        quality: per-frame quality arrays, B rows each (see :mod:`engine.quality`): ``flags``
            uint32 bitmask, ``faces_found`` int16, ``kept_rank`` int16, ``score`` float32,
            ``landmark_confidence`` float32;
            ``coeff_raw`` float32 (B, 257) when smoothing replaced ``coeff``.
    """

    index: np.ndarray
    timestamps: np.ndarray
    coeff: np.ndarray
    trans_params: np.ndarray
    crop_box: np.ndarray
    landmarks_img_ydown: np.ndarray
    valid: np.ndarray
    reason: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    quality: dict[str, np.ndarray] = field(default_factory=dict)

    #: Array names of :meth:`to_arrays` (resume files); extras are not saved, quality arrays are
    #: (prefixed :data:`QUALITY_PREFIX`).
    ARRAYS = ("index", "timestamps", "coeff", "trans_params", "crop_box", "landmarks_img_ydown", "valid", "reason")
    QUALITY_PREFIX = "quality_"

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain named arrays (for ``np.savez``); :meth:`from_arrays` is the inverse."""
        out = {name: getattr(self, name) for name in self.ARRAYS}
        out.update({self.QUALITY_PREFIX + k: v for k, v in self.quality.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays) -> FrameResults:
        names = list(arrays.keys()) if hasattr(arrays, "keys") else list(arrays.files)
        quality = {k[len(cls.QUALITY_PREFIX):]: np.asarray(arrays[k]) for k in names
                   if k.startswith(cls.QUALITY_PREFIX)}
        return cls(**{name: np.asarray(arrays[name]) for name in cls.ARRAYS}, quality=quality)

    @classmethod
    def is_saved_array(cls, name: str) -> bool:
        """``name`` is one of :meth:`to_arrays`'s (not a stage's state saved beside them)."""
        return name in cls.ARRAYS or name.startswith(cls.QUALITY_PREFIX)

    @classmethod
    def concat(cls, parts) -> FrameResults:
        """One :class:`FrameResults` of consecutive batches (extras every part has, too)."""
        return concat_rows(list(parts))


def rows_of(batch, rows: slice):
    """The frames ``rows`` of a per-frame dataclass (:class:`FrameBatch`, :class:`AlignPlan` ...):
    every array, tensor and tuple field sliced along its first axis."""
    values = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        values[f.name] = v[rows] if isinstance(v, (np.ndarray, tuple)) or _is_tensor(v) else v
    return type(batch)(**values)


def _is_tensor(v) -> bool:
    """True for a torch tensor (without importing torch where no tensor can exist)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def concat_rows(parts: list):
    """Join per-frame dataclasses of consecutive frames (the inverse of :func:`rows_of`).

    Arrays and torch tensors are concatenated along their first axis, tuples joined, dicts of arrays joined key
    by key (keys every part has), None stays None. A single part is returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    values = {}
    for f in fields(parts[0]):
        vs = [getattr(p, f.name) for p in parts]
        if vs[0] is None:
            values[f.name] = None
        elif isinstance(vs[0], np.ndarray):
            values[f.name] = np.concatenate(vs, axis=0)
        elif _is_tensor(vs[0]):  # crops kept on a torch device
            values[f.name] = sys.modules["torch"].cat(vs, dim=0)
        elif isinstance(vs[0], tuple):
            values[f.name] = sum(vs, ())
        elif isinstance(vs[0], dict):
            keys = [k for k in vs[0] if all(k in v for v in vs)]
            values[f.name] = {k: np.concatenate([v[k] for v in vs], axis=0) for k in keys}
        elif all(v == vs[0] for v in vs):  # a per-batch constant (a name)
            values[f.name] = vs[0]
        else:
            raise TypeError(f"{type(parts[0]).__name__}.{f.name}: cannot join values of type {type(vs[0]).__name__}")
    return type(parts[0])(**values)


@dataclass
class VideoResult:
    """Everything the sinks need for one input; grows by one row per frame.

    Attributes:
        info: the probe of the input.
        coeff: float32 (N, 257) ``[id 80 | exp 64 | tex 80 | angle 3 | gamma 27 | trans 3]``.
        trans_params: float32 (N, 5) ``[w0, h0, s, tx, ty_yup]``.
        landmarks_img_ydown: float32 (N, K, 2) detector landmarks as used for alignment
            (after the no-face policy); -1 rows where nothing could be used.
        valid: bool (N,) a face was detected in that frame.
        reason: (N,) why a frame is invalid, "" when valid.
        timestamps: float64 (N,) seconds.
        crop_box: int32 (N, 4) ``[left, up, w, h]`` of each crop as cut (see
            :class:`AlignedBatch`); None when unknown (results made elsewhere).
        extras: optional additional per-frame arrays (e.g. ``lm68`` from the face model).
        quality: per-frame quality arrays (see :class:`FrameResults`); empty when unknown.
    """

    info: MediaInfo
    coeff: np.ndarray
    trans_params: np.ndarray
    landmarks_img_ydown: np.ndarray
    valid: np.ndarray
    reason: list[str]
    timestamps: np.ndarray
    crop_box: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    quality: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.coeff.shape[0])

    @classmethod
    def from_batches(cls, info: MediaInfo, batches) -> VideoResult:
        """Join the :class:`FrameResults` of an input's batches, in order."""
        r = FrameResults.concat(batches)
        return cls(
            info=info,
            coeff=r.coeff,
            trans_params=r.trans_params,
            landmarks_img_ydown=r.landmarks_img_ydown,
            valid=r.valid,
            reason=[str(x) for x in r.reason],
            timestamps=r.timestamps,
            crop_box=r.crop_box,
            extras=dict(r.extras),
            quality=dict(r.quality),
        )
