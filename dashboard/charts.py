"""Plotly figure builders for the results page: a :func:`~dashboard.results.result_frame` table in,
a :class:`plotly.graph_objects.Figure` out. Pure: no Streamlit, no file access.

Every time-series chart has x = time in seconds, shows the frame index on hover (``customdata``),
shades frames flagged invalid in grey (and the chosen quality flags, one colour and legend entry
each), breaks its lines where a frame has no usable face (the filler values are not drawn), and
can mark the frame shown in the viewer with a dashed vertical line. Traces carry markers so a
click or box selection returns points. Angles arrive wrapped to −180…180
(:func:`engine.conventions.wrap_deg`, in ``result_frame``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.results import EXP_COLUMNS, frame_at_time, invalid_runs
from engine import quality

#: Above this many frames the WebGL scatter is used (the SVG one gets slow).
WEBGL_FROM = 3000
#: At most this many shaded rectangles per chart; closer runs are merged beyond it.
MAX_SHADED_RUNS = 200
#: The heat map keeps at most this many time columns (every k-th frame beyond it).
HEATMAP_MAX_COLUMNS = 1500

INVALID_FILL = "rgba(120, 120, 120, 0.22)"
MARKER_COLOUR = "#111827"
#: One fixed colour per series name, so a quantity keeps its colour on every chart.
SERIES_COLOURS = {
    "yaw": "#2563eb",
    "pitch": "#16a34a",
    "roll": "#ea580c",
    "tx (left–right)": "#2563eb",
    "ty (up–down)": "#16a34a",
    "tz (depth)": "#ea580c",
    "scale s": "#7c3aed",
    "centre x": "#2563eb",
    "centre y (down)": "#16a34a",
}
CHART_HEIGHT = 320
#: One colour per quality flag (``no_face`` is the grey invalid band).
FLAG_COLOURS = {
    "several_faces": "rgba(234, 179, 8, 0.25)",
    "other_face_kept": "rgba(220, 38, 38, 0.25)",
    "low_confidence": "rgba(147, 51, 234, 0.20)",
    "crop_outside": "rgba(14, 165, 233, 0.20)",
    "extreme_pose": "rgba(249, 115, 22, 0.22)",
    "abrupt_jump": "rgba(190, 18, 60, 0.45)",
    "filled": "rgba(100, 116, 139, 0.30)",
    "no_face": INVALID_FILL,
}

POSE_SERIES = {"yaw_deg": "yaw", "pitch_deg": "pitch", "roll_deg": "roll"}
TRANSLATION_SERIES = {"tx": "tx (left–right)", "ty": "ty (up–down)", "tz": "tz (depth)"}


def _frame_duration(df: pd.DataFrame) -> float:
    """Typical time between two frames in seconds (median step; 1/25 s for a single frame)."""
    t = df["t"].to_numpy()
    if t.size < 2:
        return 0.04
    step = float(np.median(np.diff(t)))
    return step if step > 0 else 0.04


def merge_runs(runs: list[tuple[int, int]], max_runs: int = MAX_SHADED_RUNS) -> list[tuple[int, int]]:
    """Merge the runs separated by the smallest gaps until at most ``max_runs`` remain.

    >>> merge_runs([(0, 0), (2, 2), (10, 12)], max_runs=2)
    [(0, 2), (10, 12)]
    """
    if len(runs) <= max_runs:
        return list(runs)
    gaps = np.array([b[0] - a[1] for a, b in itertools.pairwise(runs)])
    # Merging every gap <= threshold leaves (#gaps > threshold + 1) runs.
    threshold = np.sort(gaps)[len(runs) - max_runs - 1]
    merged = [runs[0]]
    for (start, end), gap in zip(runs[1:], gaps, strict=True):
        if gap <= threshold:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def add_invalid_shading(fig: go.Figure, df: pd.DataFrame, **rect_kwargs) -> go.Figure:
    """Shade the time spans of invalid frames (grey) and add one legend entry explaining it.

    ``rect_kwargs`` go to :meth:`plotly.graph_objects.Figure.add_vrect` (e.g. ``row="all"``).
    """
    runs = merge_runs(invalid_runs(df["valid"].to_numpy()))
    if not runs:
        return fig
    t = df["t"].to_numpy()
    half = _frame_duration(df) / 2
    for first, last in runs:
        fig.add_vrect(
            x0=t[first] - half,
            x1=t[last] + half,
            fillcolor=INVALID_FILL,
            line_width=0,
            layer="below",
            **rect_kwargs,
        )
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            name="no face / invalid frame",
            marker={"symbol": "square", "size": 12, "color": INVALID_FILL},
            hoverinfo="skip",
        ),
        **({"row": 1, "col": 1} if rect_kwargs.get("row") else {}),
    )
    return fig


def add_flag_shading(fig: go.Figure, df: pd.DataFrame, flags: Sequence[str] = (), **rect_kwargs) -> go.Figure:
    """Shade the frames carrying each of ``flags`` (names of :data:`engine.quality.FLAGS`), one
    colour per flag, with one legend entry per flag shown (its label and frame count)."""
    if "flags" not in df or not flags:
        return fig
    t = df["t"].to_numpy()
    half = _frame_duration(df) / 2
    for name in flags:
        hit = quality.has_flag(df["flags"].to_numpy(), name)
        runs = merge_runs(invalid_runs(~hit))
        if not runs:
            continue
        colour = FLAG_COLOURS.get(name, "rgba(0, 0, 0, 0.15)")
        for first, last in runs:
            fig.add_vrect(x0=t[first] - half, x1=t[last] + half, fillcolor=colour, line_width=0, layer="below",
                          **rect_kwargs)
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="markers", name=f"{quality.FLAGS[name].label} ({int(hit.sum())})",
                       marker={"symbol": "square", "size": 12, "color": colour}, hoverinfo="skip"),
            **({"row": 1, "col": 1} if rect_kwargs.get("row") else {}),
        )
    return fig


def add_frame_marker(fig: go.Figure, df: pd.DataFrame, frame: int | None, **line_kwargs) -> go.Figure:
    """Draw a dashed vertical line at the time of ``frame`` (the one in the frame viewer)."""
    if frame is None or df.empty:
        return fig
    frame = int(np.clip(frame, 0, len(df) - 1))
    fig.add_vline(
        x=float(df["t"].iloc[frame]),
        line_dash="dash",
        line_color=MARKER_COLOUR,
        line_width=1.5,
        **line_kwargs,
    )
    return fig


def _scatter(df: pd.DataFrame, column: str, name: str, y_unit: str, y_format: str) -> go.Scatter:
    cls = go.Scattergl if len(df) >= WEBGL_FROM else go.Scatter
    return cls(
        x=df["t"],
        y=df[column].where(df["valid"]) if "valid" in df else df[column],  # no face: a gap, not the filler
        customdata=df["frame"],
        name=name,
        mode="lines+markers",
        marker={"size": 3, **({"color": SERIES_COLOURS[name]} if name in SERIES_COLOURS else {})},
        line={"width": 1.5, **({"color": SERIES_COLOURS[name]} if name in SERIES_COLOURS else {})},
        hovertemplate=(
            f"<b>{name}</b> %{{y:{y_format}}}{y_unit}<br>t = %{{x:.2f}} s · frame %{{customdata}}<extra></extra>"
        ),
    )


def _layout(fig: go.Figure, title: str, y_title: str, height: int = CHART_HEIGHT) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0, "xanchor": "left"},
        height=height,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        hovermode="closest",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1},
        # Not "select": Streamlit turns a chart with dragmode select/lasso to clickmode "event",
        # where a single click selects nothing. With zoom it uses "event+select": a click on a
        # point selects it (box select stays in the chart's toolbar).
        dragmode="zoom",
    )
    fig.update_xaxes(title_text="time (s)")
    fig.update_yaxes(title_text=y_title)
    return fig


def time_series_figure(
    df: pd.DataFrame,
    series: dict[str, str],
    title: str,
    y_title: str,
    *,
    y_unit: str = "",
    y_format: str = ".3f",
    frame: int | None = None,
    flags: Sequence[str] = (),
) -> go.Figure:
    """Generic chart: one line per ``series`` column (column → legend name) over time; ``flags``:
    quality flags to shade (:func:`add_flag_shading`)."""
    fig = go.Figure([_scatter(df, col, name, y_unit, y_format) for col, name in series.items()])
    _layout(fig, title, y_title)
    add_invalid_shading(fig, df)
    add_flag_shading(fig, df, flags)
    return add_frame_marker(fig, df, frame)


def pose_figure(df: pd.DataFrame, frame: int | None = None, flags: Sequence[str] = ()) -> go.Figure:
    """Head rotation (yaw, pitch, roll) in degrees over time."""
    return time_series_figure(
        df, POSE_SERIES, "Head pose", "rotation (degrees)", y_unit="°", y_format=".1f", frame=frame, flags=flags
    )


def translation_figure(df: pd.DataFrame, frame: int | None = None, flags: Sequence[str] = ()) -> go.Figure:
    """Head translation tx, ty, tz in the face model's units (decimetres) over time."""
    return time_series_figure(
        df,
        TRANSLATION_SERIES,
        "Head translation (face-model units: 1 = 1 dm = 10 cm)",
        "translation (dm)",
        y_unit=" dm",
        y_format=".3f",
        frame=frame,
        flags=flags,
    )


def crop_figure(df: pd.DataFrame, frame: int | None = None, flags: Sequence[str] = ()) -> go.Figure:
    """Alignment crop: scale (top) and face centre in image pixels, y down (bottom)."""
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.12,
        subplot_titles=("scale s (crop px per image px)", "face centre in the frame (px, y down)"),
    )
    fig.add_trace(_scatter(df, "crop_s", "scale s", "", ".4f"), row=1, col=1)
    fig.add_trace(_scatter(df, "crop_cx", "centre x", " px", ".1f"), row=2, col=1)
    fig.add_trace(_scatter(df, "crop_cy_ydown", "centre y (down)", " px", ".1f"), row=2, col=1)
    _layout(fig, "Alignment crop", "", height=CHART_HEIGHT + 160)
    fig.update_xaxes(title_text="", row=1, col=1)
    fig.update_xaxes(title_text="time (s)", row=2, col=1)
    fig.update_yaxes(title_text="scale", row=1, col=1)
    fig.update_yaxes(title_text="pixels", row=2, col=1)
    fig.update_layout(margin={"t": 80})
    add_invalid_shading(fig, df, row="all", col=1)
    add_flag_shading(fig, df, flags, row="all", col=1)
    return add_frame_marker(fig, df, frame, row="all", col=1)


def expression_figure(df: pd.DataFrame, indices: Sequence[int], frame: int | None = None,
                      flags: Sequence[str] = ()) -> go.Figure:
    """The chosen expression coefficients (0-based indices into the 64) over time."""
    series = {EXP_COLUMNS[i]: f"exp[{i}]" for i in indices}
    return time_series_figure(
        df,
        series,
        "Expression coefficients (selected)",
        "coefficient (unitless)",
        y_format=".3f",
        frame=frame,
        flags=flags,
    )


def expression_heatmap(df: pd.DataFrame, frame: int | None = None) -> go.Figure:
    """All 64 expression coefficients over time as a heat map (blue < 0 < red).

    Long videos keep every k-th frame so the map has at most :data:`HEATMAP_MAX_COLUMNS` columns.
    """
    step = max(1, int(np.ceil(len(df) / HEATMAP_MAX_COLUMNS)))
    sub = df.iloc[::step]
    z = sub[EXP_COLUMNS].to_numpy().T  # (64, M)
    zmax = float(np.nanpercentile(np.abs(z), 99)) if z.size else 0.0
    zmax = zmax if zmax > 0 else 1.0
    fig = go.Figure(
        go.Heatmap(
            x=sub["t"],
            y=np.arange(len(EXP_COLUMNS)),
            z=z,
            customdata=np.tile(sub["frame"].to_numpy(), (z.shape[0], 1)),
            colorscale="RdBu_r",
            zmid=0,
            zmin=-zmax,
            zmax=zmax,
            colorbar={"title": {"text": "value"}},
            hovertemplate="exp[%{y}] = %{z:.3f}<br>t = %{x:.2f} s · frame %{customdata}<extra></extra>",
        )
    )
    title = "All 64 expression coefficients"
    if step > 1:
        title += f" (one frame in {step} shown)"
    _layout(fig, title, "coefficient index", height=CHART_HEIGHT + 60)
    fig.update_layout(dragmode="zoom")
    fig.update_yaxes(range=[-0.5, len(EXP_COLUMNS) - 0.5])
    return add_frame_marker(fig, df, frame)


def selected_frame(selection, df: pd.DataFrame) -> int | None:
    """The frame picked by a ``st.plotly_chart`` selection event (first selected point), or ``None``.

    Accepts the selection state object/dict Streamlit returns; reads ``customdata`` (the frame
    index) when present, else the x value (seconds) and snaps it to the closest frame.
    """
    if selection is None:
        return None
    sel = selection.get("selection", selection) if hasattr(selection, "get") else selection
    points = sel.get("points", []) if hasattr(sel, "get") else []
    if not points:
        return None
    point = points[0]
    custom = point.get("customdata")
    if isinstance(custom, list):
        custom = custom[0] if custom else None
    if custom is not None:
        return int(custom)
    x = point.get("x")
    if x is None:
        return None
    return frame_at_time(df, float(x))


# --------------------------------------------------------------------------- coefficient groups


def expression_change_heatmap(df: pd.DataFrame, frame: int | None = None) -> go.Figure:
    """All 64 expression coefficients as their change from the video's median (per coefficient,
    over valid frames), so movement over time stands out whatever each coefficient's level."""
    valid = df["valid"].to_numpy(bool)
    ref = df.loc[valid if valid.any() else slice(None), EXP_COLUMNS].median()
    change = df.copy()
    change[EXP_COLUMNS] = df[EXP_COLUMNS] - ref
    fig = expression_heatmap(change, frame)
    title = fig.layout.title.text.replace("All 64 expression coefficients", "Change from the video's median")
    fig.update_layout(title={"text": title})
    fig.data[0].colorbar.title.text = "value − median"
    fig.data[0].hovertemplate = fig.data[0].hovertemplate.replace("= %{z:.3f}", "− median = %{z:.3f}")
    return fig


def coefficient_summary_figure(values: np.ndarray, valid: np.ndarray, group: str) -> go.Figure:
    """One coefficient group (``id``, ``tex``, ``gamma``…) of one video as a per-coefficient
    summary: median over valid frames (bar) with the 10th–90th percentile range (error bar).

    Args:
        values: float (N, K) the group's coefficients per frame (unitless).
        valid: bool (N,) frames to summarise (all frames when none is valid).
    """
    v = np.asarray(values, dtype=np.float64)
    keep = np.asarray(valid, bool)
    v = v[keep] if keep.any() else v
    med = np.median(v, axis=0)
    lo, hi = np.percentile(v, 10, axis=0), np.percentile(v, 90, axis=0)
    k = np.arange(v.shape[1])
    fig = go.Figure(
        go.Bar(
            x=k,
            y=med,
            error_y={"type": "data", "symmetric": False, "array": hi - med, "arrayminus": med - lo, "width": 0},
            marker_color="#2563eb",
            hovertemplate=f"{group}[%{{x}}] median %{{y:.3f}}<extra></extra>",
        )
    )
    _layout(fig, f"{group}: median per coefficient over the video (bars: 10th–90th percentile)", "coefficient")
    fig.update_xaxes(title_text="coefficient index")
    fig.update_layout(dragmode="zoom", showlegend=False)
    return fig


# --------------------------------------------------------------------------- dataset view

HIST_COLUMNS_PER_ROW = 3


def metric_histograms(table: pd.DataFrame, columns: dict[str, str]) -> go.Figure:
    """Histograms of dataset metrics, one panel per ``columns`` entry (column → title)."""
    cols = list(columns)
    rows = max(1, int(np.ceil(len(cols) / HIST_COLUMNS_PER_ROW)))
    fig = make_subplots(rows=rows, cols=HIST_COLUMNS_PER_ROW, subplot_titles=[columns[c] for c in cols],
                        vertical_spacing=0.18 if rows > 1 else 0.1, horizontal_spacing=0.08)
    for i, c in enumerate(cols):
        fig.add_trace(
            go.Histogram(x=table[c], name=columns[c], marker_color="#2563eb", nbinsx=20,
                         hovertemplate=f"{columns[c]} %{{x}}<br>%{{y}} jobs<extra></extra>"),
            row=i // HIST_COLUMNS_PER_ROW + 1,
            col=i % HIST_COLUMNS_PER_ROW + 1,
        )
    fig.update_layout(height=220 * rows + 60, showlegend=False, bargap=0.05,
                      margin={"l": 40, "r": 20, "t": 50, "b": 30})
    fig.update_yaxes(title_text="jobs", col=1)
    return fig


COMPARE_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")


def comparison_figure(
    videos: dict[str, pd.DataFrame], quantities: dict[str, str], x_of, x_title: str
) -> go.Figure:
    """Several videos' trajectories on shared axes: one panel per quantity, one colour per video.

    Args:
        videos: legend name → that video's :func:`~dashboard.results.result_frame`.
        quantities: panel title → column (e.g. ``{"yaw (°)": "yaw_deg"}``).
        x_of: ``df → x values`` (time from the start, or normalised position).
        x_title: the x axis title.
    """
    names = list(quantities)
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, subplot_titles=names,
                        vertical_spacing=min(0.08, 0.3 / max(1, len(names))))
    for v, (video, df) in enumerate(videos.items()):
        colour = COMPARE_PALETTE[v % len(COMPARE_PALETTE)]
        x = x_of(df)
        for r, title in enumerate(names, start=1):
            fig.add_trace(
                go.Scatter(x=x, y=df[quantities[title]], customdata=df["frame"], name=video, legendgroup=video,
                           showlegend=r == 1, mode="lines", line={"color": colour, "width": 1.5},
                           hovertemplate=f"<b>{video}</b><br>{title} %{{y:.3f}}<br>frame %{{customdata}}"
                           "<extra></extra>"),
                row=r, col=1,
            )
    fig.update_layout(height=180 * len(names) + 120, hovermode="x unified",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
                      margin={"l": 60, "r": 20, "t": 90, "b": 40})
    fig.update_xaxes(title_text=x_title, row=len(names), col=1)
    return fig
