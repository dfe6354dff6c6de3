"""An optional source that decodes videos on the GPU's video engine (NVDEC) with PyNvVideoCodec.

``pip install pynvvideocodec`` (NVIDIA's wheel; it needs an NVIDIA GPU with NVDEC and its
driver, and a CUDA build of torch to hand the frames over). Without it, :class:`NvdecSource`
raises :class:`NvdecUnavailable` with that advice; nothing else in the engine imports it.

What it gives is what :class:`~engine.stages.source.MediaSource` gives: :class:`FrameBatch`
of uint8 (B, H, W, 3) RGB frames, y down, display rotation applied, ``index`` counted from 0
in output order (``start`` frames skipped by seeking), ``timestamps`` in seconds from the
packets' presentation times (read with PyAV's demuxer, no decoding). The frames are converted
to RGB on the GPU (``OutputColorType.RGB``) and copied into one (B, H, W, 3) tensor, so the
frames PyNvVideoCodec lends are never held past the batch. With ``on_device=True`` that
tensor is the batch's ``images`` (the fast path's stages take device frames, see
:mod:`engine.frames`): no frame crosses PCIe and no CPU core decodes or converts. Otherwise
it is copied to a host numpy array.

Differences from :class:`MediaSource` (so it is for the fast path, never the exact one):

* NVDEC's YUV→RGB conversion rounds differently from FFmpeg's swscale: pixels may differ by
  a few levels (measure it with ``bench/throughput.py --decoder nvdec``);
* a stream that changes size mid-way is not rescaled; its frames fail with a DecodeError;
* images, and videos NVDEC cannot open (codec or size it does not support), go through
  PyAV (with a log line) unless ``fallback=False``.

Not testable without an NVIDIA GPU: ``tests/test_sources.py`` skips its NVDEC test then.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.errors import DecodeError, StudioError
from engine.sources import (
    FRAME_COUNT_SLACK,
    TruncatedVideoError,
    iter_frames,
    media_kind,
    prefetch,
    probe,
)
from engine.structures import FrameBatch, MediaInfo

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "NVDEC decoding needs PyNvVideoCodec: `pip install pynvvideocodec`, on a machine with an "
    "NVIDIA GPU, its driver and a CUDA build of torch; or use the default PyAV decoder"
)


class NvdecUnavailable(StudioError):
    """PyNvVideoCodec does not import, or there is no CUDA device to decode on."""

    code = "nvdec"


def import_pynvvideocodec():
    """The ``PyNvVideoCodec`` module.

    Raises:
        NvdecUnavailable: it is not installed or does not load (message: :data:`INSTALL_HINT`).
    """
    try:
        import PyNvVideoCodec
    except Exception as e:  # ImportError, or a missing libnvcuvid / driver when it loads
        raise NvdecUnavailable(f"{INSTALL_HINT} ({type(e).__name__}: {str(e).strip() or 'no detail'})") from None
    return PyNvVideoCodec


def presentation_times(path: str | Path) -> np.ndarray:
    """float64 (N,) presentation times in seconds of the video's frames in output order: the
    video packets' ``pts · time_base``, sorted (demuxing only, no decoding). Packets without a
    pts get the previous time + 1/fps. Empty for a stream without packets.
    """
    from engine.avcompat import fraction
    from engine.sources import _open_container, _stream_fps, _video_stream

    path = Path(path)
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        base = fraction(stream.time_base)
        step = 1.0 / _stream_fps(stream) if _stream_fps(stream) > 0 else 0.0
        stamps: list[float | None] = []
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's final flush packet
                continue
            stamps.append(None if packet.pts is None or base is None else float(packet.pts * base))
    known = sorted(t for t in stamps if t is not None)
    if len(known) == len(stamps):
        return np.asarray(known, dtype=np.float64)
    times, last = [], None  # some packets lack a pts: fill as iter_frames does
    for t in stamps:
        t = (0.0 if last is None else last + step) if t is None else t
        times.append(t)
        last = t
    return np.sort(np.asarray(times, dtype=np.float64))


class NvdecSource:
    """Videos decoded by NVDEC (PyNvVideoCodec), ``prefetch_depth`` batches ahead in a thread.

    Args:
        gpu_id: CUDA device index to decode on.
        prefetch_depth: batches decoded ahead (memory: that many batches, on the host or the GPU).
        on_device: keep the frames on the GPU (``images`` is a CUDA tensor); else host numpy.
        fallback: decode with PyAV (logged) when NVDEC cannot open a video; False raises
            a :class:`~engine.errors.DecodeError` instead.

    Raises:
        NvdecUnavailable: PyNvVideoCodec or torch's CUDA is missing (at construction).
    """

    name = "nvdec"

    def __init__(self, gpu_id: int = 0, prefetch_depth: int = 2, fallback: bool = True,
                 on_device: bool = False) -> None:
        self._nvc = import_pynvvideocodec()
        import torch

        if not torch.cuda.is_available():
            raise NvdecUnavailable(f"{INSTALL_HINT} (torch sees no CUDA device)")
        self.gpu_id = gpu_id
        self.prefetch_depth = prefetch_depth
        self.fallback = fallback
        self.on_device = on_device

    def probe(self, path: Path) -> MediaInfo:
        return probe(path)

    def frames(self, path: Path, batch_size: int, start: int = 0) -> Iterator[FrameBatch]:
        return prefetch(self._frames(Path(path), batch_size, start), depth=self.prefetch_depth)

    def _frames(self, path: Path, batch_size: int, start: int) -> Iterator[FrameBatch]:
        if batch_size < 1 or start < 0:
            raise ValueError(f"batch_size must be >= 1 and start >= 0, got {batch_size}, {start}")
        if media_kind(path) != "video":
            yield from iter_frames(path, batch_size, start)
            return
        info = probe(path)
        try:
            decoder = self._nvc.SimpleDecoder(
                str(path), gpu_id=self.gpu_id, use_device_memory=True,
                output_color_type=self._nvc.OutputColorType.RGB,
            )
        except Exception as e:  # unsupported codec / size, no NVDEC session left ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not self.fallback:
                raise DecodeError(f"{path}: NVDEC cannot decode it ({reason})") from None
            log.warning("%s: NVDEC cannot decode it (%s); decoding with PyAV", path, reason)
            yield from iter_frames(path, batch_size, start)
            return
        yield from self._decode(decoder, path, info, batch_size, start)

    def _device_context(self):
        """The CUDA device the frames are stacked on (a method, so tests without a GPU can swap it)."""
        import torch

        return torch.cuda.device(self.gpu_id)

    def _decode(self, decoder, path: Path, info: MediaInfo, batch_size: int, start: int) -> Iterator[FrameBatch]:
        import torch

        times = presentation_times(path)
        step = 1.0 / info.fps if info.fps > 0 else 0.0
        coded = (info.width, info.height) if info.rotation in (0, 180) else (info.height, info.width)
        if start:
            if start >= len(times):
                return
            decoder.seek_to_index(start)
        count = start
        while True:
            # Never ask past the last frame the demuxer saw: PyNvVideoCodec logs a warning for each.
            want = batch_size if not len(times) else min(batch_size, len(times) - count)
            if want <= 0:
                break
            try:
                frames = decoder.get_batch_frames(want)
                if not frames:
                    break
                with self._device_context():
                    images = torch.stack([_frame_tensor(f, coded, torch) for f in frames])
                    if not self.on_device:
                        images = images.cpu().numpy()
            except StudioError:
                raise
            except Exception as e:
                raise DecodeError(f"{path}: NVDEC decoding failed at frame {count} ({type(e).__name__}: {e})") from None
            del frames  # PyNvVideoCodec's buffers go back before the next call
            if info.rotation and self.on_device:
                images = torch.rot90(images, k=-(info.rotation // 90), dims=(1, 2)).contiguous()
            elif info.rotation:
                images = np.ascontiguousarray(np.rot90(images, k=-(info.rotation // 90), axes=(1, 2)))
            index = np.arange(count, count + len(images), dtype=np.int64)
            yield FrameBatch(images=images, index=index, timestamps=_times_of(index, times, step))
            count += len(images)
        announced = info.frame_count
        if announced and count < announced - FRAME_COUNT_SLACK:
            raise TruncatedVideoError(
                f"{path}: NVDEC decoding stopped at frame {count} of {announced} (file truncated or corrupt)",
                count, announced,
            )


def _frame_tensor(frame, coded: tuple[int, int], torch):
    """A decoded RGB frame as a uint8 (H, W, 3) CUDA tensor (a copy is made by the caller's stack).

    PyNvVideoCodec frames export DLPack (and the CUDA array interface); the (H, W, 3) shape is
    checked, so a planar or NV12 frame is an error, not a silently wrong picture.
    """
    tensor = torch.from_dlpack(frame) if hasattr(frame, "__dlpack__") else torch.as_tensor(frame, device="cuda")
    width, height = coded
    if tuple(tensor.shape) != (height, width, 3):
        if tensor.numel() == height * width * 3 and tensor.dtype == torch.uint8:
            tensor = tensor.reshape(height, width, 3)
        else:
            raise DecodeError(f"NVDEC returned a {tuple(tensor.shape)} {tensor.dtype} frame, expected "
                              f"({height}, {width}, 3) uint8 RGB")
    return tensor


def _times_of(index: np.ndarray, times: np.ndarray, step: float) -> np.ndarray:
    """Presentation times of frames ``index``: from ``times``, extrapolated by ``step`` past its end.

    >>> _times_of(np.array([1, 2, 3]), np.array([0.0, 0.04, 0.08]), 0.04).round(2).tolist()
    [0.04, 0.08, 0.12]
    """
    out = np.empty(len(index), dtype=np.float64)
    inside = index < len(times)
    out[inside] = times[index[inside]]
    last = times[-1] if len(times) else 0.0
    out[~inside] = last + (index[~inside] - (len(times) - 1)) * step
    return out


__all__ = ["INSTALL_HINT", "NvdecSource", "NvdecUnavailable", "import_pynvvideocodec", "presentation_times"]
