"""Helpers of the Streamlit dashboard.

Pure modules (no Streamlit import, unit-tested directly):

* :mod:`dashboard.results` — an output ``.npz`` → per-frame :class:`pandas.DataFrame`.
* :mod:`dashboard.charts` — Plotly figure builders, DataFrame in, figure out.
* :mod:`dashboard.frames` — single-frame reader and landmark drawing for the frame viewer.
* :mod:`dashboard.fmt` — small formatters (durations, sizes, job states) shared by pages.

:mod:`dashboard.data` holds the Streamlit-cached loaders the pages call. The dashboard never
runs GPU work: it only talks to :mod:`db` and the engine's public, torch-free helpers;
torch loads lazily and only for the on-demand crop/overlay of one frame.
"""
