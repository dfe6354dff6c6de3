"""PyAV compatibility: the calls whose API differs between the PyAV releases pip installs
on Python 3.10–3.13 (12.x to 19.x). Code that reads or writes media goes through these;
everything else calls PyAV directly.

What differs, and what this module does about it:

* ``av.open(..., metadata_errors=...)``: PyAV ≤ 18 decodes metadata tags as strict UTF-8
  unless told otherwise, so a file with, say, a Latin-1 title would not open; PyAV 19
  removed the argument (tags are always read with ``surrogateescape`` and never fail),
  so passing it raises ``TypeError`` for every input. :func:`open_container` passes it
  only where it exists.
* rational attributes (``time_base``, ``average_rate``, ``guessed_rate``, ``base_rate``,
  ``Packet.time_base``): ``fractions.Fraction`` or ``None`` up to 18, ``av.AVRational``
  from 19 (``0/1`` when unset, never ``None``). :func:`fraction` turns either into a
  ``Fraction``, or ``None`` when unset.
* ``VideoFrame.rotation`` exists from 14 on; 12 and 13 only expose the frame's display
  matrix as side data. :func:`frame_rotation` reads either. Iterating ``frame.side_data``
  gives its entries up to 18 and their keys from 19: :func:`side_data` gives the entries.
* copying a stream into an output container: ``OutputContainer.add_stream_from_template``
  from 14 on, ``add_stream(template=...)`` before. :func:`add_stream_like` uses either.
* ``VideoFrame.to_ndarray`` / ``reformat``: from 17 on, every conversion that is not told
  ``threads=1`` starts its own swscale thread pool, one thread per CPU (``threads=0``, the
  default). Converting frame by frame, on a 16-core machine with a few inputs decoding at once,
  the thread start-ups cost more than the conversion itself and the pools oversubscribe the
  cores (1080p RGB conversion stalled at ~170 frames/s on a 16-core H200 host). The pixels are the same
  either way; :func:`to_rgb24` converts on the calling thread, as PyAV ≤ 16 always did.
* exceptions: ``av.error.FFmpegError`` and its subclasses (``InvalidDataError``,
  ``PermissionError``, …) exist in every supported release; ``av.AVError`` was removed in
  14, and since 17 FFmpeg's argument errors are ``av.ArgumentError`` (a subclass of both
  ``FFmpegError`` and ``ValueError``). Catch ``av.error.FFmpegError``, never ``av.AVError``.

``import engine.avcompat`` does not import PyAV; each function imports it when called.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
from fractions import Fraction
from pathlib import Path

log = logging.getLogger(__name__)

def to_rgb24(frame, width: int | None = None, height: int | None = None):
    """uint8 (H, W, 3) RGB of a decoded ``av.VideoFrame`` (scaled to ``width`` × ``height`` when
    given), converted on the calling thread (``threads=1`` where PyAV has the argument)."""
    kwargs = {"format": "rgb24"}
    if width is not None:
        kwargs.update(width=width, height=height)
    if av_version() >= (17, 0):
        kwargs["threads"] = 1
    return frame.to_ndarray(**kwargs)


@functools.cache
def av_version() -> tuple[int, int]:
    """(major, minor) of the installed PyAV (requirements.txt allows 12.0 to 19.x).

    >>> av_version() >= (12, 0)
    True
    """
    import av

    major, minor = [*av.__version__.split("."), "0"][:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def open_container(path: str | Path, mode: str = "r", **options):
    """``av.open(str(path), mode, **options)`` on every supported PyAV.

    An input container (``mode="r"``) tolerates undecodable metadata tags: PyAV ≤ 18 gets
    ``metadata_errors="ignore"``, PyAV 19 (which dropped that argument and never fails on
    tags) gets nothing. Errors are PyAV's own (``av.error.FFmpegError`` and subclasses,
    ``OSError``); turning them into user messages is the caller's job.

    Args:
        path: file to open.
        mode: ``"r"`` (read) or ``"w"`` (write).
        options: further ``av.open`` keyword arguments (``format``, ``options``, …).
    """
    import av

    if mode == "r" and av_version() < (19, 0):
        try:
            return av.open(str(path), mode, metadata_errors="ignore", **options)
        except TypeError as e:  # a build without the argument: open as PyAV 19 does
            if "metadata_errors" not in str(e):
                raise
    return av.open(str(path), mode, **options)


def fraction(value) -> Fraction | None:
    """A PyAV rational (``Fraction`` or ``None`` up to PyAV 18, ``av.AVRational`` from 19; an
    ``int`` also works) as a ``Fraction``; ``None`` when unset (``None`` or zero).

    >>> fraction(Fraction(1, 25)), fraction(None), fraction(Fraction(0))
    (Fraction(1, 25), None, None)
    """
    num, den = getattr(value, "numerator", None), getattr(value, "denominator", None)
    if num is None or not den:
        return None
    return Fraction(int(num), int(den)) or None


def add_stream_like(output, template):
    """A stream in ``output`` with the codec parameters of input stream ``template``, for
    muxing its packets unchanged (stream copy)."""
    make = getattr(output, "add_stream_from_template", None)
    return make(template) if make is not None else output.add_stream(template=template)


def frame_rotation(frame) -> float:
    """Counter-clockwise display rotation of a decoded frame in degrees, in [-180, 180]; 0 when
    the frame has no display matrix. ``VideoFrame.rotation`` on PyAV ≥ 14, the frame's
    ``DISPLAYMATRIX`` side data on 12 and 13 (the same value, computed as FFmpeg's
    ``av_display_rotation_get`` does)."""
    rotation = getattr(frame, "rotation", None)
    if rotation is not None:
        return float(rotation or 0)
    for side in side_data(frame):
        if str(side.type).rsplit(".", 1)[-1] == "DISPLAYMATRIX":
            return display_matrix_rotation(bytes(side))
    return 0.0


def side_data(frame) -> list:
    """The side data entries of a decoded frame (``.type`` and ``bytes(entry)``): iterating
    ``frame.side_data`` gives the entries up to PyAV 18 and their type keys from 19."""
    container = getattr(frame, "side_data", None) or ()
    return [entry if hasattr(entry, "type") else container[entry] for entry in container]


def display_matrix_rotation(matrix: bytes) -> float:
    """Counter-clockwise degrees of a 3×3 display matrix (9 native-endian int32, 16.16 fixed
    point), as FFmpeg's ``av_display_rotation_get``; 0 for a degenerate matrix.

    >>> one = 1 << 16
    >>> display_matrix_rotation(struct.pack("=9i", 0, one, 0, -one, 0, 0, 0, 0, 1 << 30))
    -90.0
    """
    m = struct.unpack("=9i", matrix[:36])
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0 or scale1 == 0:
        return 0.0
    return -math.degrees(math.atan2(m[1] / scale1, m[0] / scale0)) + 0.0


__all__ = ["add_stream_like", "av_version", "display_matrix_rotation", "fraction", "frame_rotation", "open_container",
           "side_data"]
