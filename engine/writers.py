"""Sinks: one function per output format, all written atomically.

Every file is first written under a temporary name in the destination folder and then
renamed over the final name (``os.replace``), so an interrupted run never leaves a file
that looks complete. :func:`write_outputs` writes all requested formats of one input:
either every file lands or none does.

Formats and their suffixes (``<out_base><suffix>``):

=============  ===================  =====================================================
format         suffix               content
=============  ===================  =====================================================
pirender       ``.mat``             ``coeff`` (N,257) f32, ``transform_params`` (N,5) f32
                                    — PIRender ``face_recon_videos.py`` (spec §5.2)
sadtalker      ``.sadtalker.mat``   ``coeff_3dmm`` (N,73) f32, ``full_3dmm`` (1,257) f32
                                    — SadTalker ``CropAndExtract`` (spec §6.4)
deep3d         ``.deep3d.mat``      ``id exp tex angle gamma trans`` (N,k) f32 (+ ``lm68``)
                                    — Deep3DFaceRecon ``test.py`` (spec §4)
npz            ``.npz``             named arrays, see :func:`npz_arrays`
csv            ``.csv``             one row per frame, named columns, angles in degrees
landmarks      ``.txt``             PIRender keypoint file: N·K·2 values, one per line
overlay        ``.overlay.mp4``     review video [original | reconstruction + landmarks]
                                    (``.overlay.png`` for an image); needs the face model,
                                    written by :mod:`engine.face3d.overlay`
=============  ===================  =====================================================
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine import layout
from engine.config import OutputFormat
from engine.errors import OutputError, storage_error
from engine.structures import VideoResult

log = logging.getLogger(__name__)

SUFFIXES: dict[str, str] = {
    OutputFormat.PIRENDER.value: ".mat",
    OutputFormat.SADTALKER.value: ".sadtalker.mat",
    OutputFormat.DEEP3D.value: ".deep3d.mat",
    OutputFormat.NPZ.value: ".npz",
    OutputFormat.CSV.value: ".csv",
    OutputFormat.LANDMARKS.value: ".txt",
    OutputFormat.OVERLAY.value: ".overlay.mp4",
}

#: Suffix overrides for image inputs.
IMAGE_SUFFIXES: dict[str, str] = {OutputFormat.OVERLAY.value: ".overlay.png"}


#: Longest file name (bytes, UTF-8) common file systems accept (ext4, XFS, tmpfs, NTFS in UTF-16 units).
NAME_MAX = 255


def output_paths(out_base: str | Path, formats, kind: str = "video") -> dict[str, Path]:
    """Map each format to its file: ``f"{out_base}{suffix}"`` (``kind`` is ``"video"`` or ``"image"``).

    Raises:
        OutputError: a file name would exceed :data:`NAME_MAX` bytes (checked here, before
            any work, rather than when the finished results are written).
    """
    out_base = Path(out_base)
    out = {}
    for f in formats:
        name = OutputFormat(f).value
        suffix = IMAGE_SUFFIXES.get(name, SUFFIXES[name]) if kind == "image" else SUFFIXES[name]
        out[name] = out_base.with_name(out_base.name + suffix)
        size = len(out[name].name.encode("utf-8", "surrogateescape"))
        if size > NAME_MAX:
            raise OutputError(
                f"output name {out[name].name[:40]}…{suffix} is {size} bytes long, over the {NAME_MAX}-byte "
                "limit of file names: give the input a shorter name"
            )
    return out


def temp_name(path: str | Path, tag: str = "part", *, keep_suffix: bool = False) -> Path:
    """A temporary name for ``path`` in the same folder (so the final rename never crosses
    file systems): ``.<name>.<tag>-<pid>``, or ``.<stem>.<tag>-<pid><suffix>`` with
    ``keep_suffix`` (for writers that pick the format from the suffix). The name is
    shortened (a hash of it kept) when the result would exceed :data:`NAME_MAX` bytes.

    >>> temp_name("out/clip.npz").name.startswith(".clip.npz.part-")
    True
    >>> temp_name("out/a.overlay.mp4", "partial", keep_suffix=True).suffix
    '.mp4'
    >>> len(temp_name("out/" + "x" * 250 + ".sadtalker.mat").name.encode()) <= NAME_MAX
    True
    """
    path = Path(path)
    base, suffix = (path.stem, path.suffix) if keep_suffix else (path.name, "")
    tail = f".{tag}-{os.getpid()}{suffix}"
    name = f".{base}{tail}"
    if len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX:
        return path.with_name(name)
    digest = hashlib.sha256(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    keep = base.encode("utf-8", "surrogateescape")[:100].decode("utf-8", "ignore")
    return path.with_name(f".{keep}~{digest}{tail}")


# --------------------------------------------------------------------------- arrays per format


def pirender_arrays(r: VideoResult) -> dict[str, np.ndarray]:
    """PIRender ``.mat``: ``coeff`` (N,257) and ``transform_params`` (N,5) ``[w0,h0,s,tx,ty_yup]``."""
    return {
        "coeff": r.coeff.astype(np.float32),
        "transform_params": r.trans_params.astype(np.float32),
    }


def sadtalker_arrays(r: VideoResult) -> dict[str, np.ndarray]:
    """SadTalker ``.mat``: ``coeff_3dmm`` (N,73) = exp | angle | trans | (s, tx, ty_yup); ``full_3dmm`` (1,257).

    ``full_3dmm`` is the raw coefficient vector of the *first* frame only, as SadTalker
    stores it (spec §6.4).
    """
    c = r.coeff.astype(np.float32)
    coeff_3dmm = np.concatenate(
        [c[:, layout.EXP], c[:, layout.ANGLE], c[:, layout.TRANS], r.trans_params[:, 2:].astype(np.float32)],
        axis=1,
    )
    return {"coeff_3dmm": coeff_3dmm, "full_3dmm": c[:1]}


def deep3d_arrays(r: VideoResult) -> dict[str, np.ndarray]:
    """Deep3DFaceRecon ``test.py`` keys, one row per frame; ``lm68`` (N,68,2) 224-crop px y-down if known."""
    out = {name: np.ascontiguousarray(g, dtype=np.float32) for name, g in layout.split(r.coeff).items()}
    if "lm68_224_ydown" in r.extras:
        out["lm68"] = r.extras["lm68_224_ydown"].astype(np.float32)
    return out


def npz_arrays(r: VideoResult) -> dict[str, np.ndarray]:
    """Everything, named: coefficient groups, crop parameters, landmarks, validity, timestamps.

    Arrays: ``coeff`` (N,257) f32; ``id exp tex angle gamma trans`` f32 views of it;
    ``transform_params`` (N,5) f32; ``landmarks`` (N,K,2) f32 image px **y-down** as used
    for alignment (-1 where none); ``valid`` (N,) bool; ``reason`` (N,) str; ``timestamps``
    (N,) f64 seconds; ``fps``, ``width``, ``height`` scalars; plus any extras
    (``lm68`` (N,68,2) reprojected landmarks in image px y-down when the face model is set up).
    """
    out: dict[str, np.ndarray] = {"coeff": r.coeff.astype(np.float32)}
    out.update({name: np.ascontiguousarray(g, dtype=np.float32) for name, g in layout.split(r.coeff).items()})
    out.update(
        transform_params=r.trans_params.astype(np.float32),
        landmarks=r.landmarks_img_ydown.astype(np.float32),
        valid=r.valid.astype(bool),
        reason=np.asarray(r.reason, dtype=str),
        timestamps=r.timestamps.astype(np.float64),
        fps=np.float64(r.info.fps),
        width=np.int64(r.info.width),
        height=np.int64(r.info.height),
    )
    for name, arr in r.extras.items():
        out[name] = arr
    return out


def csv_header() -> list[str]:
    """Column names of the CSV output."""
    cols = ["frame", "timestamp_s", "valid", "reason"]
    cols += [f"id_{i:02d}" for i in range(80)]
    cols += [f"exp_{i:02d}" for i in range(64)]
    cols += [f"tex_{i:02d}" for i in range(80)]
    cols += ["pitch_deg", "yaw_deg", "roll_deg"]
    cols += [f"gamma_{c}{i}" for c in "rgb" for i in range(9)]
    cols += ["tx", "ty", "tz", "crop_s", "crop_tx", "crop_ty"]
    return cols


# --------------------------------------------------------------------------- encoders (bytes)


def _mat_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, arrays)
    return buf.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _csv_bytes(r: VideoResult) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(csv_header())
    c = r.coeff.astype(np.float64)
    angles_deg = np.degrees(c[:, layout.ANGLE])  # columns: x = pitch, y = yaw, z = roll
    for i in range(r.num_frames):
        row = [i, f"{r.timestamps[i]:.6f}", int(bool(r.valid[i])), r.reason[i]]
        row += [f"{v:.8g}" for v in c[i, layout.ID]]
        row += [f"{v:.8g}" for v in c[i, layout.EXP]]
        row += [f"{v:.8g}" for v in c[i, layout.TEX]]
        row += [f"{v:.8g}" for v in angles_deg[i]]
        row += [f"{v:.8g}" for v in c[i, layout.GAMMA]]
        row += [f"{v:.8g}" for v in c[i, layout.TRANS]]
        row += [f"{v:.8g}" for v in r.trans_params[i, 2:].astype(np.float64)]
        w.writerow(row)
    return buf.getvalue().encode()


def _landmarks_bytes(r: VideoResult) -> bytes:
    buf = io.StringIO()
    # PIRender's extract_kp_videos.py: np.savetxt of the flattened (N, K, 2) array, '%.18e'.
    np.savetxt(buf, r.landmarks_img_ydown.astype(np.float32).reshape(-1))
    return buf.getvalue().encode()


ENCODERS: dict[str, Callable[[VideoResult], bytes]] = {
    OutputFormat.PIRENDER.value: lambda r: _mat_bytes(pirender_arrays(r)),
    OutputFormat.SADTALKER.value: lambda r: _mat_bytes(sadtalker_arrays(r)),
    OutputFormat.DEEP3D.value: lambda r: _mat_bytes(deep3d_arrays(r)),
    OutputFormat.NPZ.value: lambda r: _npz_bytes(npz_arrays(r)),
    OutputFormat.CSV.value: _csv_bytes,
    OutputFormat.LANDMARKS.value: _landmarks_bytes,
}


# --------------------------------------------------------------------------- atomic writes


def _short(path: Path) -> str:
    """``results/12/clip.npz``: enough of a path to say where, without the server's folders."""
    return "/".join(path.parts[-3:])


def _write_tmp(path: Path, data: bytes) -> Path:
    """Write ``data`` next to ``path`` under a temporary name, fsynced; returns that name.

    Raises:
        OutputError: the write failed (the temporary file is removed); ``DiskFullError``
            or ``ReadOnlyError`` when the disk is full or the folder not writable.
    """
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(e, _short(path)) from e
    return tmp


def write_outputs(result: VideoResult, out_base: str | Path, formats) -> dict[str, Path]:
    """Encode and write every requested coefficient format of one input.

    Every file is complete before any is renamed into place, so a failure while encoding or
    writing (the usual case: a full disk) leaves none of them; only a failing rename after
    the first succeeded can leave a subset.

    The ``overlay`` format is not a coefficient file: it is skipped here (see
    :meth:`engine.pipeline.Engine.run`).

    Args:
        result: the finished per-frame results.
        out_base: path without suffix, e.g. ``out/train/clip``.
        formats: iterable of :class:`~engine.config.OutputFormat` (or their names).

    Returns:
        format name → written path.

    Raises:
        OutputError: a file could not be written (full disk, permissions); no output of
            this input is left behind.
    """
    paths = output_paths(out_base, [f for f in formats if OutputFormat(f).value in ENCODERS])
    staged: list[tuple[Path, Path]] = []
    try:
        for fmt, path in paths.items():
            staged.append((_write_tmp(path, ENCODERS[fmt](result)), path))
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise storage_error(e, _short(path)) from e
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    log.debug("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
