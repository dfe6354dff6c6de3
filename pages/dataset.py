"""Dataset: every finished job of a search in one table with its quality metrics, filters,
histograms, CSV export, and a comparison of several videos on shared axes."""

from __future__ import annotations

import streamlit as st

from dashboard import charts
from dashboard.data import dataset_table, get_registry, result_data
from dashboard.dataset import (
    ALIGNMENTS,
    ID_COLUMNS,
    METRICS,
    TRAJECTORIES,
    FilterError,
    aligned_x,
    export_csv,
    filter_mask,
)
from dashboard.fmt import md_escape, rows_key
from dashboard.gate import current_actor
from dashboard.navigation import route_through_app
from db import service

route_through_app()
actor = current_actor()

COLUMNS = {
    "job": st.column_config.NumberColumn("Job", format="%d", width="small"),
    "name": st.column_config.TextColumn("Name", width=150),
    "input": st.column_config.TextColumn("Input", help="relative to the data folder or import root"),
    "result": st.column_config.TextColumn("Result (.npz)", help="relative to the data folder"),
    "demo": st.column_config.CheckboxColumn("Demo", help="synthetic coefficients from `python -m dashboard.demo`"),
    **{c: (st.column_config.TextColumn(m.label, help=m.help, width=140) if not m.histogram
           else st.column_config.NumberColumn(m.label, help=m.help, format=m.fmt)) for c, m in METRICS.items()},
}
DEFAULT_QUANTITIES = ["yaw (°)", "pitch (°)", "roll (°)"]


def _filtered():
    """The dataset table of the current search, with the filter applied (None when it does not parse)."""
    search = (st.session_state.get("ds_search") or "").strip() or None
    table = dataset_table(search, tuple(str(r) for r in actor.imports.roots or ()))
    text = (st.session_state.get("ds_filter") or "").strip()
    if not text:
        return table, table
    try:
        return table, table[filter_mask(table, text)].reset_index(drop=True)
    except FilterError as e:
        st.error(md_escape(f"Filter not applied: {e}"))
        return table, table


def _table(table) -> list[int]:
    """The sortable table (click a header to sort); returns the job ids of the selected rows."""
    event = st.dataframe(
        table,
        key=rows_key("ds_table", table["job"].tolist()),
        on_select="rerun",
        selection_mode="multi-row",
        hide_index=True,
        column_config=COLUMNS,
        column_order=ID_COLUMNS[:2] + list(METRICS) + ID_COLUMNS[2:],
        width="stretch",
        height=min(35 * (len(table) + 1) + 3, 560),
    )
    return [int(table["job"].iloc[r]) for r in event.selection.rows if r < len(table)]


def _compare(table, picked: list[int]) -> None:
    st.subheader("Compare videos")
    names = dict(zip(table["job"].astype(int), table["name"], strict=True))
    if not names:
        return
    if picked:
        st.session_state["ds_compare"] = [j for j in picked if j in names][:8]
    st.session_state.setdefault("ds_compare", list(names)[:3])
    st.session_state["ds_compare"] = [j for j in st.session_state["ds_compare"] if j in names]
    with st.container(horizontal=True, vertical_alignment="bottom"):
        chosen = st.multiselect("Videos (tick rows above, or pick here; up to 8)", list(names),
                                key="ds_compare", format_func=lambda j: f"{names[j]} (job {j})",
                                max_selections=8, width=520)
        quantities = st.multiselect("Quantities", list(TRAJECTORIES), default=DEFAULT_QUANTITIES,
                                    key="ds_quantities", width=420,
                                    help="pose (degrees, −180…180), translation (dm), expression coefficients")
        alignment = st.segmented_control("Align by", list(ALIGNMENTS), default="time", key="ds_align",
                                         required=True, format_func=lambda a: {"time": "time",
                                                                               "normalised": "normalised position"}[a])
    if not chosen or not quantities:
        st.info("Choose at least one video and one quantity.")
        return
    reg = get_registry()
    arts = service.artifacts_of(reg, chosen, "npz")
    videos = {}
    for j in chosen:
        if j in arts and arts[j].path.is_file():
            videos[f"{names[j]} (job {j})"] = result_data(arts[j].path).df
    fig = charts.comparison_figure(videos, {q: TRAJECTORIES[q] for q in quantities},
                                   lambda df: aligned_x(df, alignment), ALIGNMENTS[alignment])
    st.plotly_chart(fig, key="ds_compare_chart", config={"displaylogo": False})


st.title("Dataset")
with st.container(horizontal=True, vertical_alignment="bottom"):
    st.text_input("Search", key="ds_search", placeholder="name or job id", width=240)
    st.text_input(
        "Filter",
        key="ds_filter",
        placeholder="valid < 95 %, |yaw| > 45°",
        width=360,
        help="conditions joined by 'and' or commas: valid (%), frames, longest run, yaw / pitch / roll "
        "(° ; |yaw| is the largest absolute yaw), with < <= > >= =",
    )
full, table = _filtered()
if full.empty:
    st.info("No finished job with an .npz result yet. Jobs appear here once they have succeeded "
            "(`python -m dashboard.demo --jobs 24` adds demo jobs with synthetic coefficients).")
    st.stop()
if table["demo"].any():
    st.caption(":orange-badge[demo] Rows ticked *Demo* hold synthetic coefficients from "
               "`python -m dashboard.demo`, not results of the network.")
st.caption(f"{len(table)} of {len(full)} finished jobs · click a column header to sort · tick rows to compare them")
picked = _table(table)
st.download_button(
    f"Export these {len(table)} jobs (CSV)",
    data=export_csv(table),
    file_name="dataset.csv",
    mime="text/csv",
    icon=":material/download:",
    key="ds_export",
    help="paths relative to the data folder or import root, and every metric column",
)
hist = {c: m.label for c, m in METRICS.items() if m.histogram and c != "frames"}
if len(table):
    with st.expander("Histograms over these jobs", expanded=True, icon=":material/bar_chart:"):
        st.plotly_chart(charts.metric_histograms(table, hist), key="ds_hist", config={"displaylogo": False})
    _compare(table, picked)
