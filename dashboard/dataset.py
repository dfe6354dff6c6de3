"""Dataset-scale views: one summary row per finished job, filters, CSV export, comparison.

No Streamlit here (pure functions, tested in ``tests/test_dataset.py``); the page is
``pages/dataset.py`` and the cached loaders are in :mod:`dashboard.data`.

A job's summary (:func:`job_metrics`) is computed once per result file and cached by the
loader; adding a metric column is one entry in :data:`METRICS` plus its value in
:func:`job_metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dashboard.results import EXP_COLUMNS, quality_summary


@dataclass(frozen=True)
class Metric:
    """One metric column of the dataset table.

    Attributes:
        label: column header; help: tooltip with the unit; fmt: printf format for the table;
        histogram: whether it gets a histogram (numbers only).
    """

    label: str
    help: str
    fmt: str = "%.1f"
    histogram: bool = True


#: Column → how it is shown. Order is the table's order. One line per metric.
METRICS: dict[str, Metric] = {
    "frames": Metric("Frames", "frames in the result", "%d"),
    "valid_pct": Metric("Valid %", "share of frames with a usable face, percent"),
    "longest_invalid_run": Metric("Longest invalid run", "consecutive frames without a usable face", "%d"),
    "reasons": Metric("Reasons", "why frames were flagged invalid, with counts", "%s", histogram=False),
    "yaw_min": Metric("Yaw min (°)", "smallest yaw over valid frames, degrees in −180…180"),
    "yaw_max": Metric("Yaw max (°)", "largest yaw over valid frames, degrees in −180…180"),
    "pitch_min": Metric("Pitch min (°)", "smallest pitch over valid frames, degrees"),
    "pitch_max": Metric("Pitch max (°)", "largest pitch over valid frames, degrees"),
    "roll_min": Metric("Roll min (°)", "smallest roll over valid frames, degrees"),
    "roll_max": Metric("Roll max (°)", "largest roll over valid frames, degrees"),
}

#: Columns that identify a job in the table and the CSV (before the metrics).
ID_COLUMNS = ["job", "name", "input", "result", "demo"]

POSE = ("yaw", "pitch", "roll")


def job_metrics(df: pd.DataFrame) -> dict[str, float | int | str]:
    """The dataset-table metrics of one job from its :func:`~dashboard.results.result_frame`.

    Pose ranges are taken over valid frames only (NaN when there is none), in degrees
    already wrapped to −180…180 by ``result_frame``.
    """
    q = quality_summary(df)
    out: dict[str, float | int | str] = {
        "frames": q.num_frames,
        "valid_pct": 100.0 * q.valid_ratio,
        "longest_invalid_run": q.longest_invalid_run,
        "reasons": ", ".join(f"{k}: {v}" for k, v in q.reasons.items()),
    }
    good = df.loc[df["valid"]]
    for axis in POSE:
        col = good[f"{axis}_deg"]
        out[f"{axis}_min"] = float(col.min()) if len(col) else float("nan")
        out[f"{axis}_max"] = float(col.max()) if len(col) else float("nan")
    return out


def dataset_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """Rows (id columns + :func:`job_metrics`) → the table, columns :data:`ID_COLUMNS` + :data:`METRICS`."""
    return pd.DataFrame(list(rows), columns=ID_COLUMNS + list(METRICS))


# --------------------------------------------------------------------------- filters

_COND = re.compile(
    r"^\s*(?P<abs>\|)?\s*(?P<name>[a-z_ ]+?)\s*(?(abs)\|)\s*(?P<op><=|>=|<|>|=|==|!=)\s*"
    r"(?P<value>-?\d+(?:\.\d+)?)\s*(?P<unit>%|°|deg)?\s*$",
    re.IGNORECASE,
)
#: Words a user may write → the metric column (plain pose names are handled apart).
ALIASES = {
    "valid": "valid_pct",
    "valid %": "valid_pct",
    "valid_ratio": "valid_pct",
    "frames": "frames",
    "longest run": "longest_invalid_run",
    "longest invalid run": "longest_invalid_run",
    "run": "longest_invalid_run",
    "invalid run": "longest_invalid_run",
}
_OPS = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "=": np.isclose,
    "==": np.isclose,
    "!=": lambda a, b: ~np.isclose(a, b),
}


class FilterError(ValueError):
    """A filter the parser does not understand (the message says what is accepted)."""


def _series(table: pd.DataFrame, name: str, absolute: bool, op: str) -> pd.Series:
    """The values a condition compares: a metric column, or a pose angle's range."""
    name = " ".join(name.lower().split())
    axis = name.removesuffix(" deg").removesuffix("_deg")
    if axis in POSE:
        lo, hi = table[f"{axis}_min"], table[f"{axis}_max"]
        if absolute:  # the largest |angle| the video reaches
            return np.maximum(lo.abs(), hi.abs())
        # "yaw > 45": some frame goes above 45; "yaw < -45": some frame goes below -45
        return hi if op.startswith(">") else lo
    col = ALIASES.get(name, name.replace(" ", "_"))
    if col not in table.columns or col not in METRICS or not METRICS[col].histogram:
        known = ", ".join(sorted({*ALIASES, *POSE}))
        raise FilterError(f"unknown metric {name!r}: use one of {known}")
    values = table[col]
    return values.abs() if absolute else values


def filter_mask(table: pd.DataFrame, text: str) -> pd.Series:
    """Rows of ``table`` meeting every condition of ``text`` (``and`` / ``,`` / ``;`` between them).

    A condition is ``[|]metric[|] op number [%|°]``, e.g. ``valid < 95 %``, ``|yaw| > 45°``,
    ``longest run >= 10``. ``yaw > 45`` means *some valid frame has yaw above 45°*,
    ``|yaw| > 45`` *the largest |yaw| is above 45°*. NaN (no valid frame) never matches.

    Raises:
        FilterError: a condition that does not parse; the message names it.
    """
    mask = pd.Series(True, index=table.index)
    for part in re.split(r"\s*(?:\band\b|,|;|&)\s*", text.strip(), flags=re.IGNORECASE):
        if not part:
            continue
        m = _COND.match(part)
        if m is None:
            raise FilterError(f"cannot read {part!r}: write e.g. 'valid < 95 %' or '|yaw| > 45°'")
        op = m["op"]
        values = _series(table, m["name"], bool(m["abs"]), op).astype(float)
        hit = _OPS[op](values.to_numpy(), float(m["value"]))
        mask &= pd.Series(np.asarray(hit, bool), index=table.index) & values.notna()
    return mask


def export_csv(table: pd.DataFrame) -> bytes:
    """The table as UTF-8 CSV (paths relative to the data folder / import root, as shown)."""
    return table.to_csv(index=False, float_format="%.3f").encode("utf-8")


# --------------------------------------------------------------------------- comparison

#: Trajectory name → (column of a result_frame, axis label).
TRAJECTORIES = {
    "yaw (°)": "yaw_deg",
    "pitch (°)": "pitch_deg",
    "roll (°)": "roll_deg",
    "tx (dm)": "tx",
    "ty (dm)": "ty",
    "tz (dm)": "tz",
    **{f"exp[{i}]": c for i, c in enumerate(EXP_COLUMNS)},
}
ALIGNMENTS = {"time": "time (s)", "normalised": "position in the video (0 = start, 1 = end)"}


def aligned_x(df: pd.DataFrame, alignment: str) -> np.ndarray:
    """x values of a video's frames: seconds from its first frame (``time``), or the frame's
    position in the video in [0, 1] (``normalised``: frame index / (N − 1))."""
    if alignment == "normalised":
        n = len(df)
        return np.arange(n, dtype=np.float64) / max(1, n - 1)
    t = df["t"].to_numpy(dtype=np.float64)
    return t - t[0] if t.size else t
