"""Small test media written with PyAV (no ffmpeg binary needed).

Sizes are ``(width, height)`` in pixels; frames are uint8 (H, W, 3) RGB. Everything is
written into a folder the test owns (``tmp_path``); nothing is kept in the repository.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

#: Colours of the four quadrants of :func:`quadrant_frame`: TL red, TR green, BL blue, BR white.
QUADRANT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))


def has_encoder(name: str) -> bool:
    """True when this PyAV build can encode with codec ``name``."""
    try:
        return av.codec.Codec(name, "w") is not None
    except Exception:
        return False


def quadrant_frame(size: tuple[int, int], i: int = 0) -> np.ndarray:
    """(H, W, 3) frame with four coloured quadrants (:data:`QUADRANT_COLOURS`) and a grey bar.

    The bar's row moves with ``i`` so consecutive frames differ; it stays out of the
    quadrants' centres.
    """
    w, h = size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = QUADRANT_COLOURS[0]
    img[: h // 2, w // 2 :] = QUADRANT_COLOURS[1]
    img[h // 2 :, : w // 2] = QUADRANT_COLOURS[2]
    img[h // 2 :, w // 2 :] = QUADRANT_COLOURS[3]
    img[(i * 2) % h, :] = 128
    return img


def vfr_timestamps(n: int, fps: float = 25.0) -> list[float]:
    """A variable-rate schedule: frame durations alternate 1/fps and 2/fps (seconds, ms-exact)."""
    out, t = [], 0
    step = round(1000 / fps)
    for i in range(n):
        out.append(t / 1000)
        t += step if i % 2 == 0 else 2 * step
    return out


def make_video(
    path: str | Path,
    frames: int | Sequence[np.ndarray] = 10,
    size: tuple[int, int] = (64, 48),
    fps: int = 25,
    color: tuple[int, int, int] | None = None,
    codec: str = "mpeg4",
    rotation: int | None = None,
    vfr: bool = False,
    timestamps: Sequence[float] | None = None,
    with_audio: bool = False,
    faststart: bool = False,
) -> Path:
    """Write a small video.

    Args:
        path: output file; the suffix picks the container (``.mp4``, ``.mkv``, ...).
        frames: a frame count (frames are :func:`quadrant_frame`, or solid ``color``) or
            the uint8 (H, W, 3) RGB frames themselves (``size`` is then taken from them).
        size: (width, height), even numbers (yuv420p).
        fps: nominal frame rate.
        codec: ``"mpeg4"`` (in every PyAV wheel) or ``"libx264"`` (see :func:`has_encoder`).
        rotation: clockwise degrees a player must turn the frames (what
            ``MediaInfo.rotation`` reports), stored as a display matrix; None for none.
        vfr: use :func:`vfr_timestamps` as presentation times.
        timestamps: explicit presentation times in seconds (ms resolution); overrides vfr.
        with_audio: add a mono 16 kHz AAC sine as long as the video.
        faststart: put the MP4 index (``moov``) before the data, so a truncated copy
            still opens.
    """
    path = Path(path)
    if isinstance(frames, int):
        count = frames

        def frame_at(i: int) -> np.ndarray:
            if color is not None:
                return np.full((size[1], size[0], 3), color, dtype=np.uint8)
            return quadrant_frame(size, i)
    else:
        count = len(frames)
        size = (frames[0].shape[1], frames[0].shape[0])

        def frame_at(i: int) -> np.ndarray:
            return np.ascontiguousarray(frames[i], dtype=np.uint8)

    if timestamps is None and vfr:
        timestamps = vfr_timestamps(count, fps)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        time_base = Fraction(1, 1000) if timestamps is not None else Fraction(1, fps)
        stream.codec_context.time_base = time_base
        audio = None
        if with_audio:
            audio = container.add_stream("aac", rate=16000)
            audio.layout = "mono"
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(frame_at(i), format="rgb24")
            frame.time_base = time_base
            frame.pts = round(timestamps[i] * 1000) if timestamps is not None else i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            seconds = (timestamps[-1] + 1 / fps) if timestamps is not None else count / fps
            _encode_sine(container, audio, seconds)
    if rotation:
        set_mp4_rotation(path, rotation)
    return path


def set_mp4_rotation(path: str | Path, rotation_cw: int) -> Path:
    """Store a display rotation in an MP4/MOV in place: the first track's ``tkhd`` matrix becomes
    a turn by ``rotation_cw`` degrees clockwise (0/90/180/270, what ``MediaInfo.rotation``
    reports). Works with every PyAV (``VideoStream.set_display_rotation`` needs PyAV ≥ 17).
    """
    if rotation_cw % 90:
        raise ValueError(f"rotation must be a multiple of 90, got {rotation_cw}")
    path = Path(path)
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    if at < 4:
        raise ValueError(f"{path}: no tkhd box (not an MP4/MOV?)")
    version = data[at + 4]
    matrix_at = at + 8 + (20 if version == 0 else 32) + 16  # times/ids/duration, then reserved/layer/volume
    one = 1 << 16
    cos, sin = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[rotation_cw % 360]
    matrix = (cos * one, sin * one, 0, -sin * one, cos * one, 0, 0, 0, 1 << 30)  # 16.16 (last column 2.30)
    data[matrix_at:matrix_at + 36] = struct.pack(">9i", *matrix)
    path.write_bytes(bytes(data))
    return path


def _encode_sine(container, stream, seconds: float, rate: int = 16000) -> None:
    t = np.arange(max(1, round(seconds * rate))) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
    frame.sample_rate = rate
    frame.pts = 0
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def make_solid_video(
    path: str | Path,
    frames: int = 10,
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = (90, 140, 200),
    fps: int = 25,
    **kwargs,
) -> Path:
    """A video whose frames are all one colour (no face anywhere)."""
    return make_video(path, frames, size=size, fps=fps, color=color, **kwargs)


def make_truncated_copy(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (an interrupted download)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def make_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An MP4 holding one AAC audio stream and no video."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        _encode_sine(container, stream, seconds)
    return path


def make_text_file(path: str | Path, text: str = "this is not a video\n") -> Path:
    """A text file (usually given a video suffix to fool the discovery)."""
    path = Path(path)
    path.write_text(text)
    return path


def make_empty_file(path: str | Path) -> Path:
    """A 0-byte file."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def make_image(path: str | Path, size: tuple[int, int] = (64, 48), color=None) -> Path:
    """A JPEG/PNG (by suffix): :func:`quadrant_frame`, or solid ``color``."""
    from PIL import Image

    path = Path(path)
    img = quadrant_frame(size) if color is None else np.full((size[1], size[0], 3), color, dtype=np.uint8)
    Image.fromarray(img).save(path)
    return path


def _frames_of(src: Path) -> Iterator[np.ndarray]:
    with av.open(str(src)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24", width=720, height=720)


def make_720p_from_clip(
    src: str | Path, dst: str | Path, frames: int, fps: int = 25, codec: str = "mpeg4"
) -> Path:
    """A 1280×720 video of ``frames`` frames built from a (square) clip, streaming.

    Each source frame is scaled to 720×720 and centred; the 280-px side bands are the
    mirrored edges of it, so the face stays in the middle at a realistic size. The
    source is looped (re-decoded) until ``frames`` frames are written; memory stays at a
    few frames whatever ``frames`` is.
    """
    src, dst = Path(src), Path(dst)
    written = 0
    with av.open(str(dst), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = 1280, 720
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 8_000_000
        canvas = np.empty((720, 1280, 3), dtype=np.uint8)
        while written < frames:
            before = written
            for face in _frames_of(src):
                canvas[:, 280:1000] = face
                canvas[:, :280] = face[:, 279::-1]
                canvas[:, 1000:] = face[:, :-281:-1]
                frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
                frame.pts = written
                for packet in stream.encode(frame):
                    container.mux(packet)
                written += 1
                if written >= frames:
                    break
            if written == before:
                raise ValueError(f"{src}: no frame decoded")
        for packet in stream.encode():
            container.mux(packet)
    return dst


def first_frames(src: str | Path, n: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The first ``n`` decoded frames of ``src`` as uint8 (H, W, 3) RGB, resized to ``size`` (w, h) if given."""
    w, h = size if size else (None, None)
    frames = []
    with av.open(str(src)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=w, height=h))
            if len(frames) == n:
                break
    return frames
