"""Inputs: discovery, probing and streaming decode of videos and images.

Videos are read with PyAV, i.e. FFmpeg's libraries called in-process. The choice:

* one dependency does probing *and* decoding: stream counts, codec, frame rate, frame
  count, duration and audio come from the demuxer without spawning ``ffprobe``;
* frames arrive one at a time (memory stays O(batch), never the whole video, unlike the
  reference scripts that hold every frame in RAM, spec §5.5);
* real presentation timestamps (``pts · time_base``), so variable-frame-rate phone
  videos get their true times instead of ``i / fps``;
* the display-matrix rotation of phone videos is read per frame and applied here;
* the wheels carry FFmpeg, so nothing needs a system ``ffmpeg`` binary (there is none
  on a fresh machine), and decoding releases the GIL so :func:`prefetch` can overlap it
  with GPU work.

Images (``.jpg``, ``.jpeg``, ``.png``) are read with Pillow exactly as Deep3DFaceRecon's
``test.py`` does, ``Image.open(p).convert("RGB")``. **EXIF orientation is not applied**
(no ``ImageOps.exif_transpose``): the reference does not apply it either, and its
``detections/<stem>.txt`` landmarks are in the stored pixel grid, so applying it would
break compatibility with those files.

Frames are uint8 RGB (H, W, 3), y down, in the pixel grid FFmpeg decodes (the
sample aspect ratio is ignored, as OpenCV does in the reference scripts). The YUV → RGB
conversion uses the colour matrix the stream is tagged with (BT.601 when untagged); the
pixels are identical to ``cv2.VideoCapture`` + ``COLOR_BGR2RGB`` (OpenCV 5, the decode
of PIRender's scripts), for the shared test clip and for a BT.709-tagged H.264 clip.
Display rotation is applied, as current OpenCV does by default; OpenCV builds of the
PIRender era ignored it, so a rotated phone video gave sideways frames there.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from engine.config import usable_cpus
from engine.errors import DecodeError, InputError
from engine.structures import FrameBatch, MediaInfo

log = logging.getLogger(__name__)

#: Video file suffixes accepted (compared lower-case).
VIDEO_EXTS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm"})
#: Image file suffixes accepted (compared lower-case).
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png"})
MEDIA_EXTS = VIDEO_EXTS | IMAGE_EXTS

#: A container that states its frame count may decode this many frames fewer without
#: being called truncated (edit lists and decoder delay drop a frame or two).
FRAME_COUNT_SLACK = 2

_MP4_FAMILY = frozenset({".mp4", ".mov", ".m4v", ".3gp"})


class TruncatedVideoError(DecodeError):
    """The video ended (or broke) before the frames its container announces.

    Raised by :func:`iter_frames` *after* every frame that could be decoded was yielded.

    Attributes:
        decoded_frames: frames decoded before the stream stopped.
        expected_frames: frames announced by the container (an estimate from the
            duration for containers without a frame count); 0 when unknown.
    """

    def __init__(self, message: str, decoded_frames: int, expected_frames: int = 0):
        super().__init__(message)
        self.decoded_frames = decoded_frames
        self.expected_frames = expected_frames


@dataclass(frozen=True)
class InputItem:
    """One media file to process and where its outputs go.

    Attributes:
        path: the file.
        root: the folder it was discovered in, or ``None`` for a file given directly.
        rel_stem: output name without suffix: ``Path(stem)`` for a file given directly,
            the path relative to ``root`` without its suffix for a discovered file.
            Outputs go to ``OUT/<rel_stem><suffix>``.
    """

    path: Path
    root: Path | None
    rel_stem: Path

    @property
    def kind(self) -> str:
        """``"video"`` or ``"image"`` (from the suffix)."""
        return media_kind(self.path) or "video"

    def output_path(self, out_dir: str | Path, suffix: str) -> Path:
        """``out_dir/<rel_stem><suffix>``; keeps dots inside the stem.

        >>> InputItem(Path("a/b.c.mp4"), None, Path("b.c")).output_path("out", ".mat").as_posix()
        'out/b.c.mat'
        """
        return Path(out_dir) / self.rel_stem.parent / (self.rel_stem.name + suffix)


def media_kind(path: str | Path) -> str | None:
    """``"video"``, ``"image"`` or ``None`` from the file suffix (case-insensitive).

    >>> media_kind("CLIP.MP4"), media_kind("face.Jpeg"), media_kind("notes.txt")
    ('video', 'image', None)
    """
    ext = Path(path).suffix.lower()
    if ext in VIDEO_EXTS:
        return "video"
    if ext in IMAGE_EXTS:
        return "image"
    return None


# ---------------------------------------------------------------------------------------
# Discovery


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_media(root: Path) -> list[Path]:
    """Every video/image under ``root``, recursively, hidden files/dirs skipped, sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if not _is_hidden(name) and media_kind(name) is not None:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def discover_inputs(paths: Iterable[str | Path]) -> list[InputItem]:
    """Expand files and folders into the media files to process.

    A file is taken as is (its suffix must be a supported video/image suffix). A folder
    contributes every video/image below it, recursively and sorted, skipping hidden
    files and folders (names starting with ``.``). The same file given twice is kept
    once.

    Args:
        paths: files and/or folders.

    Returns:
        The items, in argument order, each folder's files sorted by relative path.
        A folder without media contributes nothing (a warning is logged).

    Raises:
        InputError: a path does not exist, a file has an unsupported suffix, or two
            inputs would write the same outputs (same ``rel_stem``).
    """
    items: list[InputItem] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if path.is_dir():
            files = _walk_media(path)
            if not files:
                log.warning("%s: no video or image files found (suffixes: %s)", path, _ext_list())
            candidates = [InputItem(f, path, f.relative_to(path).with_suffix("")) for f in files]
        else:
            if media_kind(path) is None:
                raise InputError(
                    f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
                    f"expected one of {_ext_list()}"
                )
            candidates = [InputItem(path, None, Path(path.stem))]
        for item in candidates:
            key = item.path.resolve()
            if key not in seen:
                seen.add(key)
                items.append(item)
    by_stem: dict[Path, InputItem] = {}
    for item in items:
        other = by_stem.setdefault(item.rel_stem, item)
        if other is not item:
            raise InputError(
                f"{other.path} and {item.path} would write the same outputs "
                f"({item.rel_stem.as_posix()}.*); rename one or process them separately"
            )
    return items


def _ext_list() -> str:
    return ", ".join(sorted(MEDIA_EXTS))


# ---------------------------------------------------------------------------------------
# Probing


def _check_file(path: Path) -> str:
    """Common checks before opening; returns the media kind."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    kind = media_kind(path)
    if kind is None:
        raise InputError(f"{path}: unsupported file type {path.suffix!r}; expected one of {_ext_list()}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    return kind


def _mp4_lacks_moov(path: Path) -> bool:
    """True for an MP4/MOV whose top-level boxes start with ``ftyp`` but have no ``moov``.

    That is what an interrupted recording or download looks like: the index box that
    FFmpeg needs is written last.
    """
    try:
        total = path.stat().st_size
        types: list[bytes] = []
        with path.open("rb") as f:
            offset = 0
            while offset + 8 <= total and len(types) < 10_000:
                f.seek(offset)
                header = f.read(8)
                size = int.from_bytes(header[:4], "big")
                if size == 1:
                    size = int.from_bytes(f.read(8), "big")
                elif size == 0:
                    size = total - offset
                if size < 8:
                    break
                types.append(header[4:8])
                offset += size
    except OSError:
        return False
    return bool(types) and types[0] == b"ftyp" and b"moov" not in types


def _open_container(path: Path):
    """``av.open`` with FFmpeg's errors turned into one-line :class:`DecodeError` messages."""
    import av

    from engine.avcompat import open_container

    try:
        return open_container(path)
    except av.error.InvalidDataError:
        if path.suffix.lower() in _MP4_FAMILY and _mp4_lacks_moov(path):
            raise DecodeError(
                f"{path}: truncated or unfinished MP4/MOV (no 'moov' index box; "
                "the recording or download was probably interrupted)"
            ) from None
        raise DecodeError(
            f"{path}: not a video FFmpeg can read (invalid data found when processing input)"
        ) from None
    except av.error.PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except av.error.FFmpegError as e:
        raise DecodeError(f"{path}: FFmpeg cannot open it ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text).strip().rstrip(".").lower()


def _video_stream(container, path: Path):
    if not container.streams.video:
        what = " (audio only)" if container.streams.audio else ""
        raise DecodeError(f"{path}: has no video stream{what}")
    return container.streams.video[0]


def _stream_fps(stream) -> float:
    """Average frame rate in frames/s; the guessed rate when the container has none; 0 if unknown."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


def _stream_duration(container, stream) -> float:
    """Duration in seconds from the stream, else the container; 0.0 when unknown."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return 0.0


def _stream_start(stream) -> float:
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    return 0.0


def _rotation_cw(frame) -> int:
    """Clockwise degrees (0, 90, 180, 270) to turn a decoded frame upright.

    PyAV reports the display matrix as a counter-clockwise angle in [-180, 180].
    """
    from engine.avcompat import frame_rotation

    ccw = frame_rotation(frame)
    quarter = round(ccw / 90.0)
    if abs(ccw - 90 * quarter) > 1:
        log.warning("display rotation %.1f° is not a multiple of 90°; using %d°", ccw, 90 * quarter)
    return (-90 * quarter) % 360


def _rotate(image: np.ndarray, rotation_cw: int) -> np.ndarray:
    """Rotate an (H, W, 3) image clockwise by 0/90/180/270 degrees (a view)."""
    return np.rot90(image, k=-(rotation_cw // 90)) if rotation_cw else image


def probe(path: str | Path) -> MediaInfo:
    """Learn size, rate, length, rotation and codec of an input without decoding it all.

    For a video the first frame is decoded (to read its rotation and to prove the stream
    decodes); ``width``/``height`` are the display size after rotation.
    ``frame_count`` is the container's count, or ``round(duration · fps)`` when the
    container has none (Matroska/WebM).

    Raises:
        InputError: missing, empty or unsupported file.
        DecodeError: FFmpeg/Pillow cannot read it, truncated MP4, no video stream.
    """
    path = Path(path)
    if _check_file(path) == "image":
        return _probe_image(path)
    return _probe_video(path)


def _probe_image(path: Path) -> MediaInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            width, height = im.size
            codec = (im.format or "").lower()
            orientation = im.getexif().get(0x0112, 1)
    except UnidentifiedImageError:
        raise DecodeError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"{path}: image cannot be decoded ({_reason(e)})") from None
    if orientation not in (None, 1):
        log.info("%s: EXIF orientation %s is ignored (as Deep3DFaceRecon's test.py does)", path, orientation)
    return MediaInfo(path=path, kind="image", width=width, height=height, codec=codec)


def _probe_video(path: Path) -> MediaInfo:
    import av

    with _open_container(path) as container:
        stream = _video_stream(container, path)
        fps = _stream_fps(stream)
        duration = _stream_duration(container, stream)
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as e:
            raise DecodeError(f"{path}: first frame cannot be decoded ({_reason(e)})") from None
        if first is None:
            raise DecodeError(f"{path}: video stream has no decodable frame")
        rotation = _rotation_cw(first)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        frame_count = int(stream.frames or 0)
        if frame_count <= 0:
            frame_count = max(1, round(duration * fps)) if duration and fps else 0
        if not duration and frame_count and fps:
            duration = frame_count / fps
        return MediaInfo(
            path=path,
            kind="video",
            width=int(width),
            height=int(height),
            fps=fps,
            frame_count=frame_count,
            duration=float(duration),
            rotation=rotation,
            codec=stream.codec_context.name,
            has_audio=bool(container.streams.audio),
        )


def declared_frame_count(path: str | Path) -> int:
    """Frames the container states for its video stream (MP4/MOV/AVI), 0 when it states none.

    Unlike ``MediaInfo.frame_count`` this is never an estimate. Images give 1.
    """
    path = Path(path)
    if _check_file(path) == "image":
        return 1
    with _open_container(path) as container:
        return int(_video_stream(container, path).frames or 0)


# ---------------------------------------------------------------------------------------
# Decoding


def iter_frames(
    path: str | Path, batch_size: int, start: int = 0, *, convert_threads: int | None = None,
    decode_threads: int = 0, rgb_device: str | None = None,
) -> Iterator[FrameBatch]:
    """Decode an input into batches of consecutive frames, streaming.

    Memory is O(batch_size): only the current batch is held. Frames are uint8 RGB
    (H, W, 3), y down, display rotation applied. ``index`` counts frames from 0 in the
    decoder's output order; a late ``start`` gives exactly the frames, indices and timestamps
    of decoding from 0 (it seeks to the keyframe before frame ``start`` where the packets'
    timestamps prove the numbering, else decodes and drops the first ``start`` frames; see
    ``_seek_to_frame``), so a resumed run continues at frame ``start``. ``timestamps``
    are presentation times ``pts · time_base`` in seconds as stored in the file (the
    first frame is usually 0.0); a frame without a pts gets the previous time + 1/fps.

    An image gives one batch of one frame (index 0, timestamp 0.0), opened with
    ``Image.open(p).convert("RGB")`` and no EXIF transpose (module docstring).

    Args:
        path: video or image file.
        batch_size: frames per batch (>= 1); the last batch may be shorter.
        start: first frame index to yield (>= 0).
        convert_threads: threads that turn decoded YUV frames into RGB (swscale, which runs
            without the GIL) while the demux/decode thread goes on; frames keep their order.
            ``None``: :func:`default_convert_threads`; 0 or 1: convert on the decode thread.
            The pixels are the same either way.
        decode_threads: FFmpeg's decoding threads for a video (``thread_count``): 0, FFmpeg's
            choice (one per CPU of the process, frame and slice threading); 1, decode on the
            reading thread. The pixels are the same either way.
        rgb_device: a torch device (``"cuda:0"``, or ``"cpu"``) on which a video's frames become
            RGB with FFmpeg's own arithmetic (:mod:`engine.yuv`): the decode thread only copies
            each frame's YUV planes (half the bytes of RGB), and a batch's ``images`` is then a
            uint8 (B, H, W, 3) tensor on that device. Frames :func:`engine.yuv.frame_matrix`
            declines, scaled frames and rotated videos are converted by FFmpeg on the host as
            usual (and copied there). None: FFmpeg converts every frame, ``images`` is numpy.
            The pixels are the same either way.

    Raises:
        ValueError: ``batch_size < 1``, ``start < 0``, ``convert_threads < 0`` or
            ``decode_threads < 0`` (at the call).
        InputError: missing, empty or unsupported file (at the call).
        DecodeError: as :func:`probe` (at the first ``next()``).
        TruncatedVideoError: after the last decodable frame was yielded, when the stream
            stops before the frames its container announces (truncated file).
        DecodeError: after the frames decoded so far were yielded, when FFmpeg fails
            mid-stream; the message names the frame index.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    threads = default_convert_threads() if convert_threads is None else convert_threads
    if threads < 0:
        raise ValueError(f"convert_threads must be >= 0, got {convert_threads}")
    if decode_threads < 0:
        raise ValueError(f"decode_threads must be >= 0, got {decode_threads}")
    path = Path(path)
    kind = _check_file(path)
    if kind == "image":
        return _iter_image(path, start)
    return _iter_video(path, batch_size, start, threads, decode_threads, rgb_device)


def default_convert_threads(cpu_count: int | None = None) -> int:
    """Colour-conversion threads beside FFmpeg's own decoding threads: half the usable CPUs
    (:func:`~engine.config.usable_cpus`), at most 8;
    1 (convert on the decode thread) on a machine of 2 or 3 CPUs.

    FFmpeg decodes with ``thread_count`` 0 (one thread per CPU, frame and slice threading);
    converting a 1080p frame to RGB costs about as much as decoding it, so at ~1,000 frames/s
    one converting thread would be the bottleneck.

    >>> default_convert_threads(2), default_convert_threads(16), default_convert_threads(64)
    (1, 8, 8)
    """
    cpus = cpu_count if cpu_count is not None else usable_cpus()
    return max(1, min(8, cpus // 2))


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image as Deep3DFaceRecon's ``test.py`` does: uint8 (H, W, 3) RGB, no EXIF transpose."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise DecodeError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"{path}: image cannot be decoded ({_reason(e)})") from None


def _iter_image(path: Path, start: int) -> Iterator[FrameBatch]:
    if start > 0:
        return
    image = read_image_rgb(path)
    yield FrameBatch(
        images=image[None],
        index=np.zeros(1, dtype=np.int64),
        timestamps=np.zeros(1, dtype=np.float64),
    )


def _iter_video(path: Path, batch_size: int, start: int, convert_threads: int = 1,
                decode_threads: int = 0, rgb_device: str | None = None) -> Iterator[FrameBatch]:
    pool = ThreadPoolExecutor(convert_threads, thread_name_prefix="rgb") if convert_threads > 1 else None
    try:
        yield from _decode_video(path, batch_size, start, pool, decode_threads, rgb_device)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _decode_video(path: Path, batch_size: int, start: int, pool: ThreadPoolExecutor | None,
                  decode_threads: int = 0, rgb_device: str | None = None) -> Iterator[FrameBatch]:
    """:func:`iter_frames` for a video; RGB conversion in ``pool`` when given (see ``convert_threads``),
    or on ``rgb_device``; ``decode_threads`` FFmpeg threads (0: FFmpeg's choice).

    A late ``start`` seeks to the keyframe before frame ``start`` when :func:`_seek_to_frame`
    can prove the numbering; otherwise every frame from 0 is decoded and the first ``start``
    dropped. Both give the same frames, indices and timestamps.
    """
    if start > 0:
        with _open_container(path) as container:
            stream = _open_video_stream(container, path, decode_threads)
            resumed = _seek_to_frame(path, container, stream, start)
            if resumed is not None:
                frames, size, rotation = resumed
                yield from _decode_stream(path, container, stream, frames, batch_size, start, pool,
                                          count=start, size=size, rotation=rotation, rgb_device=rgb_device)
                return
    with _open_container(path) as container:
        stream = _open_video_stream(container, path, decode_threads)
        yield from _decode_stream(path, container, stream, _decoded_frames(container.demux(stream)),
                                  batch_size, start, pool, rgb_device=rgb_device)


def _open_video_stream(container, path: Path, threads: int = 0):
    """The first video stream, set to decode with frame + slice threads, ``threads`` of them
    (FFmpeg's ``thread_count``; 0: one per CPU)."""
    stream = _video_stream(container, path)
    stream.thread_type = "AUTO"
    stream.thread_count = threads
    return stream


def _decoded_frames(packets: Iterable) -> Iterator:
    """Frames of ``packets`` in the decoder's output order (the final empty packet flushes it).

    Raises ``av.error.FFmpegError`` as FFmpeg does."""
    for packet in packets:
        yield from packet.decode()


def _decode_stream(
    path: Path,
    container,
    stream,
    frames: Iterator,
    batch_size: int,
    start: int,
    pool: ThreadPoolExecutor | None,
    *,
    count: int = 0,
    size: tuple[int, int] | None = None,
    rotation: int = 0,
    rgb_device: str | None = None,
) -> Iterator[FrameBatch]:
    """Batches of ``frames`` from frame index ``start`` on (RGB made on ``rgb_device`` where it can be).

    ``count`` is the index of the first of ``frames`` (0, or ``start`` after a seek); ``size``
    (W, H) and ``rotation`` are those of frame 0 (None: read from the first of ``frames``).
    """
    import av

    fps = _stream_fps(stream)
    step = 1.0 / fps if fps > 0 else 0.0
    announced = int(stream.frames or 0)
    duration = _stream_duration(container, stream)
    stream_end = _stream_start(stream) + duration

    batch: _Batch | None = None  # the batch being filled
    last_time: float | None = None
    error: DecodeError | None = None
    resized = False
    try:
        for frame in frames:
            if frame.pts is not None and frame.time is not None:
                t = float(frame.time)
            else:
                t = 0.0 if last_time is None else last_time + step
            last_time = t
            if size is None:
                size = (frame.width, frame.height)
                rotation = _rotation_cw(frame)
            if count >= start:
                if (frame.width, frame.height) != size and not resized:
                    resized = True
                    log.warning(
                        "%s: frame %d is %dx%d, the stream started at %dx%d; scaling such frames",
                        path, count, frame.width, frame.height, *size,
                    )
                if batch is None:
                    batch = _Batch(batch_size, size, rotation, pool, rgb_device)
                batch.add(frame, count, t)
                if batch.full:
                    done, failed = batch.finish()
                    if failed is not None:
                        raise failed
                    yield done
                    batch = None
            count += 1
    except av.error.FFmpegError as e:
        error = DecodeError(f"{path}: decoding failed at frame {count} ({_reason(e)})")
    if batch is not None:
        done, failed = batch.finish()
        if failed is not None and error is None:
            error = DecodeError(f"{path}: decoding failed at frame {batch.index[len(done)]} ({_reason(failed)})")
        if len(done):
            yield done
    if error is not None:
        raise error
    if count == 0:
        raise DecodeError(f"{path}: video stream has no decodable frame")
    _check_complete(path, count, announced, last_time, step, fps, stream_end, duration)


# ---------------------------------------------------------------------------------------
# Seeking to a late start

#: Demuxers (``container.format.name`` entries) whose packets carry trusted presentation
#: timestamps and a keyframe index: MP4/MOV and Matroska/WebM. Others (AVI, MPEG-TS, ...)
#: always decode from frame 0.
_SEEKABLE_FORMATS = frozenset({"mov", "matroska"})


@dataclass(frozen=True)
class _SeekPlan:
    """Where frame ``start`` is, learnt by demuxing (no decoding past frame 0).

    Attributes:
        target: pts of frame ``start`` (stream time_base units).
        pts: sorted pts of every frame up to and including ``target``.
        keyframes: pts of keyframe packets at or before ``target`` (a decoder may start there).
        landing: (pts, dts) of the last such keyframe, the seek's aim (dts may be None).
        size: (W, H) of frame 0; rotation: its clockwise display rotation (degrees).
    """

    target: int
    pts: tuple[int, ...]
    keyframes: frozenset[int]
    landing: tuple[int, int | None]
    size: tuple[int, int]
    rotation: int


class _NoSeek(Exception):
    """Why a late start cannot seek exactly (the caller decodes from frame 0 instead)."""


def _seek_to_frame(path: Path, container, stream, start: int) -> tuple[Iterator, tuple[int, int], int] | None:
    """Seek ``container`` so that decoding resumes at frame ``start`` with today's numbering.

    Frame ``i`` is the ``i``-th frame in output order, i.e. the packet with the ``i``-th
    smallest pts. The seek lands on the last keyframe at or before that pts; the frames
    decoded after it are checked against the packets' pts (every frame between the keyframe
    and frame ``start`` must come out, in order, then frame ``start`` itself) before any is
    kept. Nothing is yielded before that check passes.

    Returns:
        (frames from frame ``start`` on, frame 0's (W, H), frame 0's rotation), or None when
        exactness cannot be shown (the reason is logged at debug level); the caller then
        decodes from frame 0 in a fresh container.
    """
    import av

    try:
        plan = _plan_seek(container, stream, start)
        frames, land_pts = _land(container, stream, plan)
    except _NoSeek as e:
        log.debug("%s: frame %d: decoding from frame 0 and dropping %d frames (no exact seek: %s)",
                  path, start, start, e)
        return None
    except av.error.FFmpegError as e:
        log.debug("%s: frame %d: decoding from frame 0 and dropping %d frames (seek failed: %s)",
                  path, start, start, _reason(e))
        return None
    landed = plan.pts.index(land_pts)
    log.debug("%s: frame %d: seeked to the keyframe at frame %d (pts %d); %d frames decoded and dropped",
              path, start, landed, land_pts, start - landed)
    return frames, plan.size, plan.rotation


def _plan_seek(container, stream, start: int) -> _SeekPlan:
    """Demux from the start until frame ``start``'s pts is known; decode only frame 0.

    Raises:
        _NoSeek: the container or its packets leave the numbering in doubt.
    """
    names = set((container.format.name or "").split(","))
    if not names & _SEEKABLE_FORMATS:
        raise _NoSeek(f"container format {container.format.name!r} is not one whose timestamps are trusted")
    announced = int(stream.frames or 0)
    if announced and start >= announced:
        raise _NoSeek(f"start is at or past the {announced} frames the container announces")
    smallest: list[int] = []  # max-heap (negated) of the start + 1 smallest pts seen
    seen: set[int] = set()
    keyframes: list[tuple[int, int | None]] = []
    first: tuple[tuple[int, int], int, int] | None = None  # frame 0: size, rotation, pts
    last_dts: int | None = None
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's final flush packet
            continue
        pts, dts = packet.pts, packet.dts
        if pts is None:
            raise _NoSeek("a packet has no pts")
        # The flags exist on PyAV's Packet from 12.x/14 on; an older one that lacks them marks nothing.
        discard, corrupt = getattr(packet, "is_discard", False), getattr(packet, "is_corrupt", False)
        if discard or corrupt:
            raise _NoSeek(f"the packet at pts {pts} is marked {'discard' if discard else 'corrupt'}")
        if not seen and not packet.is_keyframe:
            raise _NoSeek("the first packet is not a keyframe")
        if pts in seen:
            raise _NoSeek(f"two packets share pts {pts}")
        if dts is not None and ((last_dts is not None and dts < last_dts) or pts < dts):
            raise _NoSeek(f"the packet at pts {pts} has dts {dts} out of order")
        seen.add(pts)
        last_dts = dts if dts is not None else last_dts
        if packet.is_keyframe:
            keyframes.append((pts, dts))
        if first is None:
            for frame in packet.decode():
                if frame.pts is None:
                    raise _NoSeek("frame 0 has no pts")
                first = ((frame.width, frame.height), _rotation_cw(frame), frame.pts)
                break
        if len(smallest) <= start:
            heapq.heappush(smallest, -pts)
        elif pts < -smallest[0]:
            heapq.heapreplace(smallest, -pts)
        # Every later packet has pts >= its dts >= this dts: frame `start`'s pts is settled.
        if first is not None and len(smallest) > start and dts is not None and dts > -smallest[0]:
            break
    if len(smallest) <= start:
        raise _NoSeek(f"start is past the {len(smallest)} frames the demuxer sees")
    if first is None:
        raise _NoSeek("frame 0 did not decode from the first packets")
    target = -smallest[0]
    pts_sorted = tuple(sorted(-p for p in smallest))
    if first[2] != pts_sorted[0]:
        raise _NoSeek(f"frame 0 has pts {first[2]}, the smallest packet pts is {pts_sorted[0]}")
    usable = [(p, d) for p, d in keyframes if p <= target]
    landing = max(usable)  # the first packet is a keyframe at pts[0] <= target
    return _SeekPlan(target, pts_sorted, frozenset(p for p, _ in usable), landing, first[0], first[1])


def _land(container, stream, plan: _SeekPlan) -> tuple[Iterator, int]:
    """Seek to ``plan.landing`` and decode up to frame ``start``; the frames from it on, and
    the pts of the keyframe the seek landed on.

    Raises:
        _NoSeek: the seek landed elsewhere than on a planned keyframe, or the frames decoded
            after it are not exactly the planned ones up to the target.
    """
    land_pts, land_dts = plan.landing
    why = "no seek offset"
    for offset in dict.fromkeys(o for o in (land_pts, land_dts) if o is not None):
        container.seek(offset, stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)  # ends with the empty packet that drains the decoder
        packet = next(packets, None)
        if packet is None or not packet.size or not packet.is_keyframe or packet.pts not in plan.keyframes:
            why = f"seeking to {offset} landed on pts {None if packet is None else packet.pts}, not a planned keyframe"
            continue
        return _lead_in(_decoded_frames(itertools.chain([packet], packets)), packet.pts, plan), packet.pts
    raise _NoSeek(why)


def _lead_in(frames: Iterator, land_pts: int, plan: _SeekPlan) -> Iterator:
    """Decode ``frames`` up to the planned target; ``frames`` from it on (the target first)."""
    expected = [p for p in plan.pts if land_pts <= p < plan.target]
    got = 0
    for frame in frames:
        if frame.pts is None:
            raise _NoSeek("a frame after the seek has no pts")
        if frame.pts < land_pts:  # leading frames of an open GOP: not what decoding from 0 gives
            continue
        if frame.pts == plan.target and got == len(expected):
            return itertools.chain([frame], frames)
        due = expected[got] if got < len(expected) else plan.target
        if frame.pts != due:
            raise _NoSeek(f"after the seek, a frame with pts {frame.pts} came where pts {due} was due")
        got += 1
    raise _NoSeek("the stream ended before the target frame")


class _Batch:
    """One batch being decoded: each frame is converted (on the decode thread, or in ``pool``)
    straight into its row of one uint8 (capacity, H, W, 3) array, so the decode thread never
    copies or stacks frames (a ``np.stack`` of 32 fresh 1080p frames cost it ~4 ms a frame).

    With ``rgb_device`` each frame's YUV planes are copied into rows of three plane arrays
    instead, and the batch becomes RGB on that device when it is finished (:mod:`engine.yuv`);
    a frame :func:`engine.yuv.frame_matrix` declines, a scaled or rotated one, or one whose
    matrix differs from the batch's first is converted by FFmpeg on the host and copied into
    its row there."""

    def __init__(self, capacity: int, size: tuple[int, int], rotation: int, pool: ThreadPoolExecutor | None,
                 rgb_device: str | None = None) -> None:
        width, height = size
        self.shape = (width, height) if rotation in (90, 270) else (height, width)  # rows, columns upright
        self.capacity = capacity
        self.size, self.rotation, self.pool, self.rgb_device = size, rotation, pool, rgb_device
        self.index: list[int] = []
        self.times: list[float] = []
        self.pending: list[Future | None] = []
        if rgb_device is None:
            self.images = np.empty((capacity, *self.shape, 3), dtype=np.uint8)  # pages are touched by the converters
        self.planes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # made for the first planes row
        self.matrix: tuple[str, bool] | None = None  # (colour matrix, full range) of the planes rows
        self.on_host: dict[int, np.ndarray] = {}  # with rgb_device: row -> RGB converted by FFmpeg

    @property
    def full(self) -> bool:
        return len(self.index) == self.capacity

    def add(self, frame, index: int, t: float) -> None:
        row = len(self.index)
        self.index.append(index)
        self.times.append(t)
        convert = self._copy_planes if self._takes_planes(frame) else self._convert
        if self.pool is None:
            convert(row, frame)
            self.pending.append(None)
        else:
            self.pending.append(self.pool.submit(convert, row, frame))

    def _takes_planes(self, frame) -> bool:
        """Whether ``frame`` goes to ``rgb_device`` as planes (decided in decoding order): not
        scaled, not rotated, a matrix :func:`engine.yuv.frame_matrix` vouches for, the batch's."""
        from engine.yuv import frame_matrix

        if self.rgb_device is None or self.rotation or (frame.width, frame.height) != self.size:
            return False
        matrix = frame_matrix(frame)
        if matrix is None or self.matrix not in (None, matrix):
            return False
        if self.planes is None:
            width, height = self.size
            chroma = (self.capacity, (height + 1) // 2, (width + 1) // 2)
            self.planes = (np.empty((self.capacity, height, width), dtype=np.uint8),
                           np.empty(chroma, dtype=np.uint8), np.empty(chroma, dtype=np.uint8))
        self.matrix = matrix
        return True

    def _convert(self, row: int, frame) -> None:
        rgb = upright_rgb(frame, self.size, self.rotation)
        if self.rgb_device is None:
            self.images[row] = rgb
        else:
            self.on_host[row] = rgb

    def _copy_planes(self, row: int, frame) -> None:
        from engine.yuv import planes

        for rows, plane in zip(self.planes, planes(frame), strict=True):
            rows[row] = plane

    def finish(self) -> tuple[FrameBatch, Exception | None]:
        """The frames converted, in order, up to the first whose conversion failed, and that
        failure (None when all converted)."""
        ok = 0
        for job in self.pending:
            if job is not None:
                try:
                    job.result()
                except Exception as e:  # FFmpeg's error, re-raised by the decode loop
                    return self._batch(ok), e
            ok += 1
        return self._batch(ok), None

    def _batch(self, n: int) -> FrameBatch:
        images = self.images[:n] if self.rgb_device is None else self._device_rgb(n)
        return FrameBatch(images=images, index=np.asarray(self.index[:n], dtype=np.int64),
                          timestamps=np.asarray(self.times[:n], dtype=np.float64))

    def _device_rgb(self, n: int):
        """uint8 (n, H, W, 3) tensor on ``rgb_device``: the planes rows converted there, the rows
        FFmpeg converted copied in."""
        import torch

        from engine.yuv import coefficients, to_rgb

        if self.planes is None:
            images = torch.empty((n, *self.shape, 3), dtype=torch.uint8, device=self.rgb_device)
        else:
            y, u, v = (torch.from_numpy(p[:n]).to(self.rgb_device) for p in self.planes)
            images = to_rgb(y, u, v, coefficients(*self.matrix))
        for row, rgb in self.on_host.items():
            if row < n:  # a rotated frame is a view with negative strides: copied first
                images[row] = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.rgb_device)
        return images


def upright_rgb(frame, size: tuple[int, int], rotation_cw: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a decoded PyAV frame as the engine sees it: scaled to the stream's
    coded ``size`` = (W, H) if it differs, then turned upright (``rotation_cw`` degrees, by
    default the frame's own display rotation). May be a view."""
    from engine.avcompat import to_rgb24

    image = to_rgb24(frame, *(size if (frame.width, frame.height) != size else (None, None)))
    return _rotate(image, _rotation_cw(frame) if rotation_cw is None else rotation_cw)


def _check_complete(
    path: Path,
    count: int,
    announced: int,
    last_time: float | None,
    step: float,
    fps: float,
    stream_end: float,
    duration: float,
) -> None:
    """Raise :class:`TruncatedVideoError` when decoding stopped well before the announced end."""
    if announced > 0:
        if count < announced - FRAME_COUNT_SLACK:
            raise TruncatedVideoError(
                f"{path}: decoding stopped at frame {count} of {announced} (file truncated or corrupt)",
                count,
                announced,
            )
        return
    if duration > 0 and last_time is not None:
        decoded_end = last_time + step
        if decoded_end < stream_end - max(1.0, 0.02 * duration):
            expected = round(duration * fps) if fps else 0
            raise TruncatedVideoError(
                f"{path}: decoding stopped at frame {count} ({decoded_end:.2f} s of {duration:.2f} s; "
                "file truncated or corrupt)",
                count,
                expected,
            )


# ---------------------------------------------------------------------------------------
# Prefetch

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 2, *, max_bytes: int | None = None) -> Iterator[T]:
    """Run ``items`` in a background thread, keeping up to ``depth`` results ready.

    PyAV decodes without the GIL, so decoding the next batch overlaps the caller's work
    on the current one. Exceptions of the source are re-raised in the caller, after the
    items produced before them. Closing the returned generator stops the thread and
    closes the source.

    Memory: at most ``depth + 2`` items alive (ready, being produced, being used). With
    ``max_bytes``, an item waits to join the ready ones while their ``images.nbytes``
    (:class:`~engine.structures.FrameBatch`; 0 for other items) would pass it, though one is
    always let through: large frames (a batch of 32 1080p frames is 199 MB) then keep fewer
    batches ready than small ones.

    >>> list(prefetch(iter(range(5))))
    [0, 1, 2, 3, 4]
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    ready: collections.deque = collections.deque()  # (item, error, nbytes)
    held = 0  # bytes of the ready items
    stop = False
    changed = threading.Condition()

    def room(nbytes: int) -> bool:
        return not ready or (len(ready) < depth and (max_bytes is None or held + nbytes <= max_bytes))

    def put(item, error=None) -> bool:
        nonlocal held
        images = getattr(item, "images", None)
        nbytes = int(getattr(images, "nbytes", 0)) if max_bytes is not None else 0
        with changed:
            changed.wait_for(lambda: stop or room(nbytes))
            if stop:
                return False
            ready.append((item, error, nbytes))
            held += nbytes
            changed.notify_all()
            return True

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put(item):
                    break
            else:
                put(_END)
        except BaseException as e:  # re-raised in the consumer
            put(_END, e)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            with changed:
                changed.wait_for(lambda: ready)
                item, error, nbytes = ready.popleft()
                held -= nbytes
                changed.notify_all()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        with changed:
            stop = True
            changed.notify_all()
        worker.join()


__all__ = [
    "IMAGE_EXTS",
    "MEDIA_EXTS",
    "VIDEO_EXTS",
    "InputItem",
    "TruncatedVideoError",
    "declared_frame_count",
    "default_convert_threads",
    "discover_inputs",
    "iter_frames",
    "media_kind",
    "prefetch",
    "probe",
    "read_image_rgb",
    "upright_rgb",
]
