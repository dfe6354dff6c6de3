"""The coefficient files: how each is laid out and encoded, and the sink that writes them.

What a format is (suffix, label, help) lives in :data:`engine.formats.FORMATS`; this module
holds how each coefficient file is laid out and encoded. Every file is written under a
temporary name in the destination folder and renamed over the final name once every file
of the input is complete (:mod:`engine.stages.sink`), so an interrupted run never leaves a
file that looks complete.

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
                                    written by :class:`engine.face3d.overlay.OverlaySink`
=============  ===================  =====================================================
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine import layout
from engine.config import OutputFormat, name_of
from engine.formats import FORMATS, format_spec, output_paths
from engine.quality import flags_text
from engine.stages.sink import SinkContext, SinkHooks, commit, discard, stage_bytes
from engine.structures import FrameResults, MediaInfo, VideoResult

log = logging.getLogger(__name__)

#: Format name → suffix of the built-in formats (a view of :data:`engine.formats.FORMATS`).
SUFFIXES: dict[str, str] = {name: spec.suffix for name, spec in FORMATS.items()}

#: Suffix overrides for image inputs.
IMAGE_SUFFIXES: dict[str, str] = {name: spec.image_suffix for name, spec in FORMATS.items() if spec.image_suffix}


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
    (N,) f64 seconds; ``fps``, ``width``, ``height`` scalars; ``crop_box`` (N,4) int32
    ``[left, up, w, h]`` of each crop as cut (when known); plus any extras (``lm68`` (N,68,2)
    reprojected landmarks in image px y-down when the face model is set up).

    Quality (when known, see :mod:`engine.quality`): ``flags`` (N,) uint32 bitmask, bit
    ``i`` = ``flag_names[i]``; ``flag_names`` (F,) str; ``faces_found`` (N,) int16 faces the
    detector reported (-1: no detector); ``kept_rank`` (N,) int16 the kept face's rank in the
    reference's order (0: its choice, -1: none); ``score`` (N,) f32 the kept face's detector
    score; ``landmark_confidence`` (N,) f32 the landmarker's own confidence (FAN: mean heat-map
    peak; NaN where none); ``coeff_raw`` (N,257) f32 the coefficients before smoothing (only when smoothed:
    ``coeff`` and its groups are then the smoothed ones).
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
    if r.crop_box is not None:
        out["crop_box"] = r.crop_box.astype(np.int32)
    for name, arr in r.extras.items():
        out[name] = arr
    if "flags" in r.quality:
        from engine.quality import flag_names

        out["flag_names"] = np.asarray(flag_names(), dtype=str)
    for name, arr in r.quality.items():
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
    cols += ["flags"]  # names joined by "|" (engine.quality.FLAGS), "" for none
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
    flags = r.quality.get("flags")
    for i in range(r.num_frames):
        row = [i, f"{r.timestamps[i]:.6f}", int(bool(r.valid[i])), r.reason[i]]
        row += [f"{v:.8g}" for v in c[i, layout.ID]]
        row += [f"{v:.8g}" for v in c[i, layout.EXP]]
        row += [f"{v:.8g}" for v in c[i, layout.TEX]]
        row += [f"{v:.8g}" for v in angles_deg[i]]
        row += [f"{v:.8g}" for v in c[i, layout.GAMMA]]
        row += [f"{v:.8g}" for v in c[i, layout.TRANS]]
        row += [f"{v:.8g}" for v in r.trans_params[i, 2:].astype(np.float64)]
        row += [flags_text(int(flags[i])) if flags is not None else ""]
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


# --------------------------------------------------------------------------- the sink


class EncodedFileSink:
    """A sink writing one file per input, encoded once from all its batches.

    The registry's sink for every format in :data:`ENCODERS`; a format of another module can
    subclass it and override :meth:`encode`. The file goes to the format's path in
    :data:`engine.formats.FORMATS`.

    Args:
        context: from the engine; ``context.format`` names the format.
    """

    def __init__(self, context: SinkContext) -> None:
        self.format = context.format
        self._info: MediaInfo | None = None
        self._path: Path | None = None
        self._parts: list[FrameResults] = []
        self._staged: Path | None = None

    def encode(self, result: VideoResult) -> bytes:
        """The whole file's content."""
        return ENCODERS[self.format](result)

    def start(self, info: MediaInfo, out_base: Path) -> dict[str, Path]:
        self.abort()
        self._info, self._path = info, format_spec(self.format).path(out_base, info.kind)
        return {self.format: self._path}

    def add(self, results: FrameResults) -> None:
        self._parts.append(results)

    def finish(self, hooks: SinkHooks) -> dict[str, Path]:
        data = self.encode(VideoResult.from_batches(self._info, self._parts))
        self._parts = []
        self._staged = stage_bytes(self._path, data)
        return {self.format: self._staged}

    def abort(self) -> None:
        discard(self._staged)
        self._staged, self._parts = None, []


def write_outputs(result: VideoResult, out_base: str | Path, formats) -> dict[str, Path]:
    """Encode and write every requested coefficient format of one finished result (for results
    made outside :class:`~engine.pipeline.Engine`, e.g. test fixtures).

    Every file is complete before any is renamed, so a failure while encoding or writing
    (the usual case: a full disk) leaves none of them. Formats that are not files of the
    result alone (``overlay``) are skipped.

    Args:
        result: the finished per-frame results.
        out_base: path without suffix, e.g. ``out/train/clip``.
        formats: iterable of :class:`~engine.config.OutputFormat` (or their names).

    Returns:
        format name → written path.

    Raises:
        OutputError: a file could not be written; no output of this input is left behind.
    """
    paths = output_paths(out_base, [f for f in formats if name_of(f) in ENCODERS], result.info.kind)
    staged: dict[Path, Path] = {}
    try:
        for fmt, path in paths.items():
            staged[stage_bytes(path, ENCODERS[fmt](result))] = path
        commit(staged)
    except BaseException:
        for tmp in staged:
            discard(tmp)
        raise
    log.debug("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


__all__ = [
    "ENCODERS",
    "IMAGE_SUFFIXES",
    "SUFFIXES",
    "EncodedFileSink",
    "csv_header",
    "deep3d_arrays",
    "npz_arrays",
    "output_paths",
    "pirender_arrays",
    "sadtalker_arrays",
    "write_outputs",
]
