"""Stage 1, the source: an input file → its :class:`~engine.structures.MediaInfo` and its frames.

The default, :class:`MediaSource`, decodes videos with PyAV and images with Pillow
(:mod:`engine.sources`), one batch ahead in a background thread; on the fast path on a GPU it
also copies each batch to the GPU in that thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from engine.sources import iter_frames, prefetch, probe
from engine.structures import FrameBatch, MediaInfo

#: Host bytes of decoded frames kept ready ahead of the engine, per input (at least one batch):
#: two batches of 32 frames up to 720p, one of 1080p.
PREFETCH_BYTES = 256 * 2**20


@runtime_checkable
class Source(Protocol):
    """Reads inputs."""

    def probe(self, path: Path) -> MediaInfo:
        """What the input is, before decoding (raises InputError / DecodeError)."""
        ...

    def frames(self, path: Path, batch_size: int, start: int = 0) -> Iterator[FrameBatch]:
        """Consecutive frames from frame ``start`` on, ``batch_size`` at a time (the last batch
        may be shorter). The engine closes the iterator when it stops early."""
        ...


class MediaSource:
    """Videos (PyAV) and images (Pillow), decoded ``prefetch_depth`` batches ahead in a thread.

    FFmpeg decodes a video with ``decode_threads`` threads (0: one per CPU, FFmpeg's choice);
    ``convert_threads`` threads turn the decoded frames into RGB beside it (``None``:
    :func:`~engine.sources.default_convert_threads`; see :func:`~engine.sources.iter_frames`).
    Pixels, order and timestamps do not depend on either.

    At most ``prefetch_depth`` batches wait ready, fewer when their frames would pass
    ``prefetch_bytes`` host bytes (:data:`PREFETCH_BYTES`; one batch always may wait).

    ``device``: a CUDA device to copy each batch to in the decode thread, so ``images`` is a
    uint8 (B, H, W, 3) tensor there, as from NVDEC (:mod:`engine.frames`); the host then holds
    only the batches being decoded. ``"auto"``: the GPU when torch sees one. ``None``, a CPU
    device, or ``"auto"`` without a GPU: numpy frames on the host. The same pixel values either way.

    ``rgb_device``: a torch device on which a video's frames become RGB (FFmpeg's arithmetic,
    :mod:`engine.yuv`; see :func:`~engine.sources.iter_frames`): only their YUV planes are copied
    on the host, and ``images`` is a tensor there. ``"auto"``: the GPU when torch sees one, else
    as None: FFmpeg converts on the host. The same pixel values either way.
    """

    def __init__(self, prefetch_depth: int = 2, convert_threads: int | None = None,
                 device: str | None = None, prefetch_bytes: int | None = PREFETCH_BYTES,
                 decode_threads: int = 0, rgb_device: str | None = None) -> None:
        self.prefetch_depth = prefetch_depth
        self.prefetch_bytes = prefetch_bytes
        self.convert_threads = convert_threads
        self.decode_threads = decode_threads
        self.device = device
        self.rgb_device = rgb_device

    def probe(self, path: Path) -> MediaInfo:
        return probe(path)

    def frames(self, path: Path, batch_size: int, start: int = 0) -> Iterator[FrameBatch]:
        rgb_device = self._rgb_device()
        frames = iter_frames(path, batch_size, start=start, convert_threads=self.convert_threads,
                             decode_threads=self.decode_threads, rgb_device=rgb_device)
        device = self._upload_device() or rgb_device
        if device is not None:  # the ready batches are on the device: no host bytes to bound
            return prefetch(_uploaded(frames, device), depth=self.prefetch_depth)
        return prefetch(frames, depth=self.prefetch_depth, max_bytes=self.prefetch_bytes)

    def _upload_device(self) -> str | None:
        """The CUDA device batches go to, or None (resolved per input, when torch is loaded)."""
        device = _resolved(self.device)
        if device is None:
            return None
        import torch

        return device if torch.device(device).type == "cuda" else None

    def _rgb_device(self) -> str | None:
        """The device frames become RGB on (``rgb_device``; ``"auto"``: ``cuda`` when torch sees a
        GPU), or None: FFmpeg converts on the host."""
        return _resolved(self.rgb_device)


def _resolved(device: str | None) -> str | None:
    """``device``, with ``"auto"`` made ``"cuda"`` when torch sees a GPU, else None."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _uploaded(frames: Iterator[FrameBatch], device: str) -> Iterator[FrameBatch]:
    """``frames`` with each batch's images copied to ``device`` (the host array is then freed);
    a batch already there as a tensor is passed on."""
    from engine.frames import to_torch

    try:
        for batch in frames:
            yield dataclasses.replace(batch, images=to_torch(batch.images, device))
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
