"""The dataclasses stages hand each other: source → frames → landmarks → crops → coefficients.

All arrays are numpy. Batches are *packed*: one row per frame, ``index`` gives the
frame number inside its input. Invalid rows are kept (never dropped) so every output
stays frame-aligned with the video.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class Landmarks:
    """Facial landmarks for a batch of frames, one face per frame.

    Attributes:
        points_img_ydown: float32 (B, K, 2) pixel x, y in the original frame, y down;
            K is 68 (FAN/iBUG order) or 5 (Deep3D order: left eye, right eye, nose,
            left mouth corner, right mouth corner). Rows of invalid frames are NaN.
        valid: bool (B,) a face was found in the frame.
        reason: (B,) empty string for valid frames, else why not (``"no_face"``...).
    """

    points_img_ydown: np.ndarray
    valid: np.ndarray
    reason: tuple[str, ...]

    @property
    def num_points(self) -> int:
        return int(self.points_img_ydown.shape[1])


@dataclass(frozen=True)
class AlignedBatch:
    """Output of the aligner for a batch.

    Attributes:
        crops: uint8 (B, 224, 224, 3) RGB aligned crops (Pillow bicubic, zero padded).
        trans_params: float32 (B, 5) ``[w0, h0, s, tx, ty_yup]`` (spec §2.5).
        lm5_img_ydown: float32 (B, 5, 2) the 5 points used for the fit, y down.
    """

    crops: np.ndarray
    trans_params: np.ndarray
    lm5_img_ydown: np.ndarray


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
        extras: optional additional per-frame arrays (e.g. ``lm68`` from the face model).
    """

    info: MediaInfo
    coeff: np.ndarray
    trans_params: np.ndarray
    landmarks_img_ydown: np.ndarray
    valid: np.ndarray
    reason: list[str]
    timestamps: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.coeff.shape[0])
