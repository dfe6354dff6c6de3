"""3DMM Studio dashboard: ``streamlit run streamlit_app.py`` (``make run`` also starts a worker).

The entry point first passes the sign-in gate (:mod:`dashboard.gate`: with sign-in configured,
or served on the network, nothing else is drawn until someone signs in), then builds the
navigation and the shared sidebar; every page lives in ``pages/`` and talks to the job
registry (:mod:`db`) and the engine's torch-free helpers. Extraction itself runs in worker
processes, never in this one.
"""

from __future__ import annotations

import streamlit as st

from dashboard.gate import gate, sidebar

st.set_page_config(page_title="3DMM Studio", page_icon=":material/face:", layout="wide")
actor = gate()  # before any page: deep links to pages are gated too

PAGES = [
    st.Page(
        "pages/overview.py",
        title="Overview",
        icon=":material/dashboard:",
        url_path="overview",
        default=True,
    ),
    st.Page("pages/upload.py", title="Upload", icon=":material/upload:", url_path="upload"),
    st.Page("pages/jobs.py", title="Jobs", icon=":material/list:", url_path="jobs"),
    st.Page("pages/results.py", title="Results", icon=":material/monitoring:", url_path="results"),
    st.Page("pages/dataset.py", title="Dataset", icon=":material/table_chart:", url_path="dataset"),
    st.Page("pages/setup.py", title="Models / setup", icon=":material/build:", url_path="setup"),
]

page = st.navigation(PAGES)

with st.sidebar:
    from dashboard.data import get_registry
    from db.access import display_path

    sidebar(actor)
    try:
        registry = get_registry()
        shown = display_path(registry.data_dir, registry.data_dir)
        st.caption(f"Data folder: {shown}/", help="All uploads, results and the job database")
    except Exception as e:
        st.error(f"The job database cannot be opened: {e}")

page.run()
