"""An output ``.npz`` turned into what the results page shows: one DataFrame row per frame.

Units and frames of the columns of :func:`result_frame`:

* ``frame`` — 0-based frame index; ``t`` — presentation time in seconds.
* ``pitch_deg``, ``yaw_deg``, ``roll_deg`` — head rotation in degrees, wrapped to −180…180
  (:func:`engine.conventions.wrap_deg`; Deep3D's angle x = pitch, y = yaw, z = roll, stored in
  radians without a range).
* ``tx``, ``ty``, ``tz`` — head translation in the face model's world units (decimetres).
* ``crop_s`` — alignment scale: crop pixels per original-image pixel (``s = 102 / s_pos``).
* ``crop_cx``, ``crop_cy_ydown`` — where the face template's origin lands in the original
  image, in pixels, **y down** (the file stores ``ty`` y-up; it is flipped here for display).
* ``valid`` (bool), ``reason`` (str, "" when valid).
* ``flags`` — uint32 bitmask of the quality flags, bit ``FLAGS[name].bit`` of
  :data:`engine.quality.FLAGS` (0 for results written before flags existed).
* ``exp_00`` … ``exp_63`` — expression coefficients (unitless PCA weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from engine import layout, quality
from engine.conventions import flip_y, wrap_deg

NUM_EXP = layout.EXP.stop - layout.EXP.start  #: 64 expression coefficients
EXP_COLUMNS = [f"exp_{i:02d}" for i in range(NUM_EXP)]


@dataclass(frozen=True)
class ResultData:
    """One input's results, loaded from its ``.npz``.

    Attributes:
        df: per-frame table, columns documented in the module docstring.
        coeff: float32 (N, 257) raw coefficients ``[id 80 | exp 64 | tex 80 | angle 3 | gamma 27 | trans 3]``.
        landmarks_img_ydown: float32 (N, K, 2) detector landmarks used for alignment, image px,
            y down; rows of frames without any landmarks are -1 or NaN.
        lm68_img_ydown: float32 (N, 68, 2) landmarks re-projected from the face model, image
            px y down, or ``None`` when the face model was not set up for the run.
        transform_params: float32 (N, 5) ``[w0, h0, s, tx, ty_yup]`` per frame.
        fps: average frame rate (frames/s), 0 for an image.
        width, height: frame size in pixels.
        crop_box: int32 (N, 4) ``[left, up, w, h]`` of each crop as cut, or ``None`` (older
            results: recomputed from ``transform_params`` where needed).
    """

    df: pd.DataFrame
    coeff: np.ndarray
    landmarks_img_ydown: np.ndarray
    lm68_img_ydown: np.ndarray | None
    transform_params: np.ndarray
    fps: float
    width: int
    height: int
    crop_box: np.ndarray | None = None
    #: float32 (N, 257) the coefficients before smoothing, or None (smoothing was off).
    coeff_raw: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return len(self.df)


@dataclass(frozen=True)
class QualitySummary:
    """How usable one input's frames are.

    Attributes:
        num_frames: frames in the output.
        num_valid: frames where a face was found.
        reasons: reason → number of invalid frames with it, most frequent first.
        longest_invalid_run: length in frames of the longest run of consecutive invalid frames.
        longest_invalid_start: first frame index of that run (-1 when there is none).
    """

    num_frames: int
    num_valid: int
    reasons: dict[str, int]
    longest_invalid_run: int
    longest_invalid_start: int

    @property
    def valid_ratio(self) -> float:
        return self.num_valid / self.num_frames if self.num_frames else 0.0


def result_frame(arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """Build the per-frame table from the npz arrays (see module docstring for columns).

    Args:
        arrays: at least ``coeff`` (N,257) or ``angle``/``trans``/``exp``, plus
            ``transform_params`` (N,5), ``valid`` (N,), ``reason`` (N,), ``timestamps`` (N,).
    """
    if "angle" in arrays:
        angle, trans, exp = arrays["angle"], arrays["trans"], arrays["exp"]
    else:
        coeff = np.asarray(arrays["coeff"])
        angle, trans, exp = coeff[:, layout.ANGLE], coeff[:, layout.TRANS], coeff[:, layout.EXP]
    angle = np.asarray(angle, dtype=np.float64)
    n = angle.shape[0]
    tp = np.asarray(arrays["transform_params"], dtype=np.float64).reshape(n, 5)
    timestamps = np.asarray(arrays.get("timestamps", np.arange(n, dtype=np.float64)), dtype=np.float64)
    centre_img_ydown = flip_y(tp[:, 3:5], tp[:, 1])  # ty_yup -> y down, per frame height h0
    valid = np.asarray(arrays.get("valid", np.ones(n, bool)), dtype=bool)
    reason = np.asarray(arrays.get("reason", np.full(n, "")), dtype=str)
    trans = np.asarray(trans, dtype=np.float64)
    df = pd.DataFrame(
        {
            "frame": np.arange(n, dtype=np.int64),
            "t": timestamps,
            "pitch_deg": wrap_deg(np.degrees(angle[:, 0])),
            "yaw_deg": wrap_deg(np.degrees(angle[:, 1])),
            "roll_deg": wrap_deg(np.degrees(angle[:, 2])),
            "tx": trans[:, 0],
            "ty": trans[:, 1],
            "tz": trans[:, 2],
            "crop_s": tp[:, 2],
            "crop_cx": centre_img_ydown[:, 0],
            "crop_cy_ydown": centre_img_ydown[:, 1],
            "valid": valid,
            "reason": np.where(valid, "", np.where(reason == "", "invalid", reason)),
        }
    )
    df["flags"] = registry_flags(arrays, n)
    exp_df = pd.DataFrame(np.asarray(exp, dtype=np.float64), columns=EXP_COLUMNS)
    return pd.concat([df, exp_df], axis=1)


def registry_flags(arrays: dict[str, np.ndarray], n: int) -> np.ndarray:
    """uint32 (n,) the file's ``flags`` with bits as in :data:`engine.quality.FLAGS` (the file's
    bit ``i`` is ``flag_names[i]``; names the registry does not know are dropped); 0s when absent."""
    out = np.zeros(n, dtype=np.uint32)
    if "flags" not in arrays:
        return out
    raw = np.asarray(arrays["flags"]).astype(np.uint32).reshape(n)
    names = [str(x) for x in arrays.get("flag_names", quality.flag_names())]
    for i, name in enumerate(names):
        if name in quality.FLAGS:
            out |= np.where(raw & np.uint32(1 << i), np.uint32(quality.bit(name)), np.uint32(0))
    return out


def flag_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per quality flag: ``flag`` (name), ``label``, ``frames`` (count), ``first`` (first
    flagged frame, -1 for none), ``meaning``; registry order."""
    flags = df["flags"].to_numpy() if "flags" in df else np.zeros(len(df), np.uint32)
    rows = []
    for name, spec in quality.FLAGS.items():
        hit = np.flatnonzero(quality.has_flag(flags, name))
        rows.append({"flag": name, "label": spec.label, "frames": len(hit),
                     "first": int(hit[0]) if len(hit) else -1, "meaning": spec.description})
    return pd.DataFrame(rows, columns=["flag", "label", "frames", "first", "meaning"])


def next_flagged(df: pd.DataFrame, name: str, after: int) -> int | None:
    """The first frame after ``after`` carrying flag ``name``, wrapping to the start; None if none.

    >>> df = pd.DataFrame({"flags": np.array([0, 1, 0, 1], np.uint32)})
    >>> next_flagged(df, "no_face", 1), next_flagged(df, "no_face", 3), next_flagged(df, "filled", 0)
    (3, 1, None)
    """
    hit = np.flatnonzero(quality.has_flag(df["flags"].to_numpy(), name))
    if not len(hit):
        return None
    later = hit[hit > after]
    return int(later[0] if len(later) else hit[0])


def jitter_table(data: ResultData) -> pd.DataFrame:
    """Jitter (:func:`engine.quality.jitter`) of the shown coefficients, and of the raw ones when
    the run smoothed them: columns ``quantity``, ``unit``, ``raw``, ``smoothed`` (NaN when off)."""
    valid = data.df["valid"].to_numpy()
    shown = quality.jitter(data.coeff, data.transform_params, valid)
    raw = quality.jitter(data.coeff_raw, data.transform_params, valid) if data.coeff_raw is not None else None
    units = {"pitch_deg": "°/frame²", "yaw_deg": "°/frame²", "roll_deg": "°/frame²", "trans": "dm/frame²",
             "crop_scale": "log s/frame²", "exp10": "1/frame²"}
    return pd.DataFrame([
        {"quantity": k, "unit": units.get(k, ""), "raw": (raw or shown)[k],
         "smoothed": shown[k] if raw is not None else float("nan")} for k in shown])


def load_result(path: str | Path) -> ResultData:
    """Read an output ``.npz`` into a :class:`ResultData` (no torch, no pickle)."""
    with np.load(Path(path), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    df = result_frame(arrays)
    n = len(df)
    tp = np.asarray(arrays["transform_params"], dtype=np.float32).reshape(n, 5)
    lm = np.asarray(arrays.get("landmarks", np.full((n, 0, 2), np.nan)), dtype=np.float32)
    lm68 = arrays.get("lm68")
    width = int(arrays["width"]) if "width" in arrays else (int(tp[0, 0]) if n else 0)
    height = int(arrays["height"]) if "height" in arrays else (int(tp[0, 1]) if n else 0)
    coeff = arrays.get("coeff")
    if coeff is None:
        coeff = np.concatenate([arrays[g] for g in layout.GROUPS], axis=1)
    return ResultData(
        df=df,
        coeff=np.asarray(coeff, dtype=np.float32),
        landmarks_img_ydown=lm,
        lm68_img_ydown=None if lm68 is None else np.asarray(lm68, dtype=np.float32),
        transform_params=tp,
        fps=float(arrays.get("fps", 0.0)),
        width=width,
        height=height,
        crop_box=np.asarray(arrays["crop_box"], dtype=np.int32) if "crop_box" in arrays else None,
        coeff_raw=np.asarray(arrays["coeff_raw"], dtype=np.float32) if "coeff_raw" in arrays else None,
    )


def invalid_runs(valid: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive invalid frames as ``(first, last)`` inclusive frame indices.

    >>> invalid_runs(np.array([True, False, False, True, False]))
    [(1, 2), (4, 4)]
    """
    bad = ~np.asarray(valid, dtype=bool)
    if not bad.any():
        return []
    edges = np.diff(np.concatenate([[0], bad.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def quality_summary(df: pd.DataFrame) -> QualitySummary:
    """Valid ratio, reasons and the longest invalid run of a :func:`result_frame` table."""
    runs = invalid_runs(df["valid"].to_numpy())
    longest = max(runs, key=lambda r: r[1] - r[0], default=None)
    counts = df.loc[~df["valid"], "reason"].value_counts()
    return QualitySummary(
        num_frames=len(df),
        num_valid=int(df["valid"].sum()),
        reasons={str(k): int(v) for k, v in counts.items()},
        longest_invalid_run=0 if longest is None else longest[1] - longest[0] + 1,
        longest_invalid_start=-1 if longest is None else longest[0],
    )


def frame_at_time(df: pd.DataFrame, t: float) -> int:
    """Index of the frame whose timestamp is closest to ``t`` seconds."""
    if df.empty:
        return 0
    return int(df["frame"].iloc[int(np.abs(df["t"].to_numpy() - float(t)).argmin())])


#: Columns of :func:`folder_table`, with their units.
FOLDER_COLUMNS = ["image", "valid", "reason", "yaw_deg", "pitch_deg", "roll_deg", "tx", "ty", "tz", "crop_s"]


def folder_table(results: list[tuple[str, ResultData]]) -> pd.DataFrame:
    """One row per image of a folder: its name and the first (only) frame's pose, translation and crop.

    Args:
        results: (image name, its results) in display order; videos contribute their first frame.
    """
    rows = []
    for name, data in results:
        if data.num_frames == 0:
            continue
        first = data.df.iloc[0]
        rows.append({"image": name, **{c: first[c] for c in FOLDER_COLUMNS[1:]}})
    return pd.DataFrame(rows, columns=FOLDER_COLUMNS)
