"""The frame viewer's pixels: one decoded frame, landmarks drawn on it, the aligned crop.

Frames are uint8 (H, W, 3) RGB, y down, display rotation applied — the same pixels
:func:`engine.sources.iter_frames` gives the engine, so the stored landmarks line up.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.sources import IMAGE_EXTS, iter_frames, read_image_rgb, upright_rgb

log = logging.getLogger(__name__)

LANDMARK_COLOUR = (0, 229, 255)  # cyan: distinct from skin, lips and most eye colours
LM68_COLOUR = (255, 70, 200)


def read_frame(path: str | Path, index: int, t: float | None = None) -> np.ndarray:
    """Decode frame ``index`` of a video (or the image itself) as uint8 (H, W, 3) RGB, y down.

    With ``t`` (the frame's presentation time in seconds, from the result's ``timestamps``)
    the reader seeks to the key frame before ``t`` and decodes forward to the frame at ``t``,
    so any frame of a long video costs at most one GOP of decoding. Without ``t`` it decodes
    from the start (:func:`engine.sources.iter_frames`).

    Raises:
        engine.errors.InputError / DecodeError: the file is missing or unreadable.
        IndexError: the video has fewer than ``index + 1`` frames.
    """
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTS:
        return read_image_rgb(path)
    if t is not None:
        frame = _read_at_time(path, float(t))
        if frame is not None:
            return frame
        log.info("%s: seeking to %.3f s found no frame; decoding from the start", path, t)
    for batch in iter_frames(path, batch_size=1, start=int(index)):
        return batch.images[0]
    raise IndexError(f"{path}: no frame {index}")


def _read_at_time(path: Path, t: float) -> np.ndarray | None:
    from engine.avcompat import open_container

    with open_container(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        half_step = 0.5 / float(rate) if rate else 0.02
        if stream.time_base:
            container.seek(max(0, int((t - half_step) / stream.time_base)), stream=stream, backward=True)
        size = None
        for frame in container.decode(stream):
            if size is None:
                size = (frame.width, frame.height)
            if frame.time is None or frame.time < t - half_step:
                continue
            if frame.time > t + half_step:
                return None  # seeked past it (no frame at that time)
            return np.ascontiguousarray(upright_rgb(frame, size))
    return None


def _radius(image: Image.Image) -> float:
    return max(2.0, min(image.size) / 130)


def draw_points(
    image: np.ndarray | Image.Image,
    points_img_ydown: np.ndarray | None,
    colour: tuple[int, int, int] = LANDMARK_COLOUR,
) -> Image.Image:
    """Return a copy of ``image`` with dots at ``points_img_ydown`` (K, 2) px, y down.

    Rows that are NaN or negative (frames without landmarks store -1) are skipped.
    """
    out = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image.copy()
    if points_img_ydown is None:
        return out
    pts = np.asarray(points_img_ydown, dtype=np.float64).reshape(-1, 2)
    draw = ImageDraw.Draw(out)
    r = _radius(out)
    for x, y in pts:
        if not (np.isfinite(x) and np.isfinite(y)) or (x < 0 and y < 0):
            continue
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(0, 0, 0))
    return out


def has_points(points_img_ydown: np.ndarray | None) -> bool:
    """True when at least one landmark row is usable (finite and not the -1 placeholder)."""
    if points_img_ydown is None:
        return False
    pts = np.asarray(points_img_ydown, dtype=np.float64).reshape(-1, 2)
    usable = np.isfinite(pts).all(axis=1) & ~((pts[:, 0] < 0) & (pts[:, 1] < 0))
    return bool(usable.all()) and len(pts) > 0
