"""Stage 1, the source: an input file → its :class:`~engine.structures.MediaInfo` and its frames.

The default, :class:`MediaSource`, decodes videos with PyAV and images with Pillow
(:mod:`engine.sources`), one batch ahead in a background thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from engine.sources import iter_frames, prefetch, probe
from engine.structures import FrameBatch, MediaInfo


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

    FFmpeg decodes with one thread per CPU; ``convert_threads`` threads turn the decoded frames
    into RGB beside it (``None``: :func:`~engine.sources.default_convert_threads`; see
    :func:`~engine.sources.iter_frames`). Pixels, order and timestamps do not depend on either.
    """

    def __init__(self, prefetch_depth: int = 2, convert_threads: int | None = None) -> None:
        self.prefetch_depth = prefetch_depth
        self.convert_threads = convert_threads

    def probe(self, path: Path) -> MediaInfo:
        return probe(path)

    def frames(self, path: Path, batch_size: int, start: int = 0) -> Iterator[FrameBatch]:
        frames = iter_frames(path, batch_size, start=start, convert_threads=self.convert_threads)
        return prefetch(frames, depth=self.prefetch_depth)
