"""Limits on what an input may be: bytes, pixels per frame, frame size, duration.

A 20000×20000 PNG, a 3-frame 8000×8000 video or a 16-pixel video are not bugs to crash
on but inputs to refuse with a reason. :class:`InputLimits` holds the limits;
:meth:`InputLimits.check_file` reads only the file's size and its header (no decoding)
and runs before anything else, :meth:`InputLimits.check_media` checks what
:func:`engine.sources.probe` found. The job registry checks at submit time, the engine
again before it decodes.

Defaults (each can be set by an environment variable; ``0`` turns a maximum off):

====================  ==================  ===============================================
limit                 default             variable
====================  ==================  ===============================================
``max_bytes``         32 GiB              ``STUDIO_MAX_BYTES``
``max_pixels``        35 000 000 / frame  ``STUDIO_MAX_PIXELS`` (8K UHD, 7680×4320, fits)
``min_side``          32 px               ``STUDIO_MIN_SIDE`` (shorter side of a frame)
``max_duration_s``    4 h (14 400 s)      ``STUDIO_MAX_DURATION_S``
====================  ==================  ===============================================
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from engine.errors import InputError, InputTooLarge, InputTooSmall
from engine.structures import MediaInfo

log = logging.getLogger(__name__)

#: Environment variable of each limit.
ENV_VARS = {
    "max_bytes": "STUDIO_MAX_BYTES",
    "max_pixels": "STUDIO_MAX_PIXELS",
    "min_side": "STUDIO_MIN_SIDE",
    "max_duration_s": "STUDIO_MAX_DURATION_S",
}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


@dataclass(frozen=True)
class InputLimits:
    """What an input may be. ``0`` turns a maximum off.

    Attributes:
        max_bytes: largest file size, bytes.
        max_pixels: largest frame, width × height pixels (after rotation; rotation keeps it).
        min_side: smallest shorter side of a frame, pixels (a face detector needs ~20 px).
        max_duration_s: longest video, seconds.
    """

    max_bytes: int = 32 * 2**30
    max_pixels: int = 35_000_000
    min_side: int = 32
    max_duration_s: float = 4 * 3600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"input limit {f.name} must be >= 0, got {getattr(self, f.name)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InputLimits:
        """The defaults, overridden by ``STUDIO_MAX_BYTES`` etc. (see :data:`ENV_VARS`).

        Raises:
            ValueError: a variable is not a non-negative number (the message names it).
        """
        environ = os.environ if environ is None else environ
        values = {}
        for name, var in ENV_VARS.items():
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            try:
                values[name] = float(raw) if name == "max_duration_s" else int(float(raw))
            except ValueError:
                raise ValueError(f"{var}={raw!r}: expected a number") from None
        return cls(**values)

    # ------------------------------------------------------------------ checks

    def check_size(self, name: str, width: int, height: int) -> None:
        """Refuse a frame of ``width`` × ``height`` pixels outside the limits."""
        if width <= 0 or height <= 0:
            return  # unknown: the decoder has the last word
        if self.max_pixels and width * height > self.max_pixels:
            raise InputTooLarge(
                f"{name}: frames of {width}×{height} pixels ({width * height / 1e6:.0f} MP) exceed the limit "
                f"of {self.max_pixels / 1e6:.0f} MP per frame (STUDIO_MAX_PIXELS); scale it down first"
            )
        if min(width, height) < self.min_side:
            raise InputTooSmall(
                f"{name}: frames of {width}×{height} pixels are too small to find a face in "
                f"(the shorter side must be at least {self.min_side} px)"
            )

    def check_duration(self, name: str, seconds: float) -> None:
        """Refuse a video longer than ``max_duration_s``."""
        if self.max_duration_s and seconds > self.max_duration_s:
            raise InputTooLarge(
                f"{name}: {seconds / 60:.0f} min long, over the limit of {self.max_duration_s / 60:.0f} min "
                "(STUDIO_MAX_DURATION_S); cut it into parts"
            )

    def check_bytes(self, name: str, size: int) -> None:
        """Refuse a file larger than ``max_bytes``."""
        if self.max_bytes and size > self.max_bytes:
            raise InputTooLarge(
                f"{name}: {_fmt_bytes(size)} is over the limit of {_fmt_bytes(self.max_bytes)} per file "
                "(STUDIO_MAX_BYTES)"
            )

    def check_file(self, path: str | Path, name: str | None = None) -> None:
        """Check size and header of ``path`` without decoding it.

        Only what the header states is checked; a file whose header cannot be read passes
        here and gets its reason from :func:`engine.sources.probe`. ``name`` is used in
        messages (default: the file name).

        Raises:
            InputTooLarge, InputTooSmall: a limit is exceeded.
            InputError: ``path`` exists but is not a regular file (a FIFO would block a reader).
        """
        path = Path(path)
        name = name or path.name
        try:
            st = path.stat()
        except OSError:
            return  # missing: probe says so
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{name}: not a regular file ({_file_type(st.st_mode)}); expected a video or image file")
        self.check_bytes(name, st.st_size)
        from engine.sources import media_kind

        kind = media_kind(path)
        if kind == "image":
            self._check_image_header(path, name)
        elif kind == "video":
            self._check_video_header(path, name)

    def check_media(self, name: str, info: MediaInfo) -> None:
        """Check what :func:`engine.sources.probe` found (frame size, duration)."""
        self.check_size(name, int(info.width), int(info.height))
        if info.kind == "video":
            self.check_duration(name, float(info.duration or 0.0))

    def _check_image_header(self, path: Path, name: str) -> None:
        from PIL import Image

        try:
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
        except Image.DecompressionBombError as e:  # over Pillow's own limit, whatever ours is
            found = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "more pixels than Pillow's safety limit"
            limit = (f"the limit of {self.max_pixels / 1e6:.0f} MP per frame (STUDIO_MAX_PIXELS)"
                     if self.max_pixels else "the decompression-bomb limit of Pillow")
            raise InputTooLarge(f"{name}: the image has {size}, over {limit}; scale it down first") from None
        except Exception:  # unreadable header: probe gives the reason
            return
        self.check_size(name, width, height)

    def _check_video_header(self, path: Path, name: str) -> None:
        from engine.avcompat import fraction, open_container

        try:
            with open_container(path) as container:
                if not container.streams.video:
                    return
                stream = container.streams.video[0]
                width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
                seconds = 0.0
                if stream.duration and stream.time_base:
                    seconds = float(stream.duration * fraction(stream.time_base))
                elif container.duration:
                    seconds = container.duration / 1_000_000
        except Exception:  # unreadable header: probe gives the reason
            return
        self.check_size(name, width, height)
        self.check_duration(name, seconds)


def _file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
