"""Keep every page behind the app's own navigation.

The dashboard's pages live in ``pages/`` (the project's layout). Streamlit also treats a
``pages/`` folder beside the entry point as its older file-based multipage mode: until
``streamlit_app.py`` has run once in the server process, a deep link such as ``/jobs``
runs ``pages/jobs.py`` on its own — without the navigation, sidebar and wide layout the
entry point sets up. :func:`route_through_app` detects that case and runs the entry point
instead, which builds the real navigation and then shows the requested page.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import streamlit as st

ENTRY_POINT = Path(__file__).resolve().parents[1] / "streamlit_app.py"


def route_through_app() -> None:
    """Call first in every page script; a no-op when the page was reached through ``st.navigation``."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:  # set to False by the first st.navigation call
        runpy.run_path(str(ENTRY_POINT), run_name="__main__")
        st.stop()
