"""The output formats: one registry that says what each format is and which sink writes it.

Everything that names a format reads :data:`FORMATS`: the config (which names are valid), the
CLI (``--formats`` help), the dashboard (labels, help, download types), the writers (suffixes)
and the bundle README (the file list). Adding a format is one sink module and one line here
(see ``docs/architecture.md``); importing this module imports no sink.

Files are ``f"{out_base}{suffix}"`` (``image_suffix`` instead for an image input, when set).
"""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import OutputError

#: Longest file name (bytes, UTF-8) common file systems accept (ext4, XFS, tmpfs, NTFS in UTF-16 units).
NAME_MAX = 255


@dataclass(frozen=True)
class FormatSpec:
    """What one output format is.

    Attributes:
        suffix: appended to the output base, e.g. ``".sadtalker.mat"``.
        label: short name for people (``"PIRender .mat"``): dashboard buttons and downloads.
        help: one line on what the file holds (dashboard help, ``--formats`` help).
        details: a few lines for the bundle README (what a user of the file needs to know).
        sink: ``"module:attribute"`` of the sink factory, ``factory(context) -> Sink`` (see
            :mod:`engine.stages.sink`); imported on first use.
        image_suffix: suffix for an image input instead of ``suffix``; None: the same.
        mime: media type of the file, for downloads.
        needs_face_model: the format needs ``BFM/`` (checked before any work).
    """

    suffix: str
    label: str
    help: str
    details: str
    sink: str
    image_suffix: str | None = None
    mime: str = "application/octet-stream"
    needs_face_model: bool = False

    def path(self, out_base: str | Path, kind: str = "video") -> Path:
        """The file of this format for ``out_base`` (``kind``: ``"video"`` or ``"image"``).

        >>> FORMATS["sadtalker"].path("out/clip")
        PosixPath('out/clip.sadtalker.mat')
        """
        out_base = Path(out_base)
        suffix = self.image_suffix if kind == "image" and self.image_suffix else self.suffix
        path = out_base.with_name(out_base.name + suffix)
        size = len(path.name.encode("utf-8", "surrogateescape"))
        if size > NAME_MAX:  # checked before any work, not when the finished results are written
            raise OutputError(
                f"output name {path.name[:40]}…{suffix} is {size} bytes long, over the {NAME_MAX}-byte "
                "limit of file names: give the input a shorter name"
            )
        return path

    def sink_factory(self):
        """The sink factory named by :attr:`sink` (imports its module)."""
        module, _, attr = self.sink.partition(":")
        return getattr(importlib.import_module(module), attr)


#: Format name → what it is. Read-only by convention; the order is the order shown to users.
FORMATS: dict[str, FormatSpec] = {
    "pirender": FormatSpec(
        ".mat", "PIRender .mat", "coeff (N×257) + transform_params (N×5)",
        'PIRender layout: "coeff" (N, 257) and "transform_params" (N, 5)',
        "engine.writers:EncodedFileSink"),
    "sadtalker": FormatSpec(
        ".sadtalker.mat", "SadTalker .mat", "coeff_3dmm (N×73)",
        'SadTalker layout: "coeff_3dmm" (N, 73) holding exp (64), angle (3), trans (3) and then the '
        'three crop columns s, tx, ty from transform_params; "full_3dmm" holds the full 257 coefficients',
        "engine.writers:EncodedFileSink"),
    "deep3d": FormatSpec(
        ".deep3d.mat", "Deep3D .mat", "one array per coefficient group",
        "Deep3DFaceRecon's own per-group layout (id, exp, tex, angle, gamma, trans)",
        "engine.writers:EncodedFileSink"),
    "npz": FormatSpec(
        ".npz", "NumPy .npz", "everything, needed for the charts",
        "named arrays: coeff and each group, transform_params, landmarks (N, K, 2) in image pixels "
        "with y pointing down, valid (N,), reason (N,), timestamps (N,) in seconds, fps, crop_box "
        "(N, 4) [left, up, w, h] of each 224x224 crop in the frame resized to w x h",
        "engine.writers:EncodedFileSink"),
    "csv": FormatSpec(
        ".csv", "CSV", "one row per frame",
        "one line per frame with named columns",
        "engine.writers:EncodedFileSink", mime="text/csv"),
    "landmarks": FormatSpec(
        ".txt", "Landmarks .txt", "PIRender's keypoint file",
        "the landmarks used for alignment (PIRender keypoint format: N x K x 2 values, one per line; "
        "-1 where no face had been seen yet)",
        "engine.writers:EncodedFileSink", mime="text/plain"),
    "overlay": FormatSpec(
        ".overlay.mp4", "Overlay video", "the reconstruction drawn over every frame, for review (needs the face model)",
        "review video: each frame beside the reconstructed face drawn over it, with the audio",
        "engine.face3d.overlay:OverlaySink", image_suffix=".overlay.png", mime="video/mp4",
        needs_face_model=True),
}


def format_spec(name: str) -> FormatSpec:
    """The registered format ``name``.

    Raises:
        ValueError: not a registered format (the message lists them).
    """
    try:
        return FORMATS[str(getattr(name, "value", name))]
    except KeyError:
        raise ValueError(f"unknown output format {name!r}; known formats: {', '.join(FORMATS)}") from None


def output_paths(out_base: str | Path, formats: Iterable, kind: str = "video") -> dict[str, Path]:
    """Map each format to its file: ``f"{out_base}{suffix}"`` (``kind`` is ``"video"`` or ``"image"``)."""
    out = {}
    for f in formats:
        name = str(getattr(f, "value", f))
        out[name] = format_spec(name).path(out_base, kind)
    return out


def formats_help() -> str:
    """``"label: help · label: help …"`` of every format, for a help tooltip."""
    return " · ".join(f"{spec.label}: {spec.help}" for spec in FORMATS.values())


def readme_file_list(width: int = 88) -> str:
    """The bundle README's file list: ``*<suffix>`` and the format's details, wrapped.

    >>> readme_file_list().splitlines()[0]
    '  *.mat             PIRender layout: "coeff" (N, 257) and "transform_params" (N, 5)'
    """
    lines = []
    for spec in FORMATS.values():
        lines += textwrap.wrap(spec.details, width=width, initial_indent=f"  *{spec.suffix:<16} ",
                               subsequent_indent=" " * 20)
    return "\n".join(lines)
