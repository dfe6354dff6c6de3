"""Models / setup: every weight file, where it comes from, installing one (validated), the doctor report."""

from __future__ import annotations

import streamlit as st

from dashboard.data import doctor_checks, get_registry
from dashboard.fmt import blocking_checks, check_text, md_escape
from dashboard.gate import current_actor
from dashboard.install import BFM_FILES, convert_face_model, install, weight_statuses
from dashboard.navigation import route_through_app
from db.access import display_path, relative_text

route_through_app()
actor = current_actor()


def _rel(text: str) -> str:
    """Outside text with server paths shown relative (data folder, project, home), Markdown-safe."""
    return md_escape(relative_text(text, get_registry().data_dir))

INSTALLABLE = {
    "checkpoint": "Reconstruction network (epoch_20.pth or SadTalker .safetensors)",
    "sfd": "S3FD face detector (s3fd-619a316812.pth)",
    "fan": "2D-FAN-4 landmarks (2DFAN4-11f355bf06.pth.tar)",
    "bfm": "Face model file (BFM_model_front.mat, or its sources: 01_MorphableModel.mat, Exp_Pca.bin, …)",
}


def _status_table() -> None:
    st.subheader("Weight files")
    for w in weight_statuses():
        if w.present:
            mark = ":green[:material/check_circle:]"
        else:
            mark = ":red[:material/cancel:]" if w.required else ":gray[:material/do_not_disturb_on:]"
        need = "" if w.required else " · optional"
        with st.expander(f"{mark} **{w.title}** — {w.detail}{need}", expanded=w.required and not w.present):
            st.markdown(f"**Where the engine looks:** `{display_path(w.path, get_registry().data_dir)}`")
            st.markdown(f"**Where it comes from:** {_rel(w.source)}")


def _install_form() -> None:
    st.subheader("Install a weight file")
    if not actor.may("install"):
        st.info(f"Installing weight files needs the admin role; {actor.name} is signed in as {actor.role}.")
        return
    key = st.selectbox("What", list(INSTALLABLE), format_func=INSTALLABLE.__getitem__, key="setup_kind")
    how = st.segmented_control(
        "From", ["Upload", "Path on this server"], default="Upload", required=True, key="setup_how"
    )
    name = None
    if key == "bfm":
        name = st.radio("Which face-model file", BFM_FILES, horizontal=True, key="setup_bfm_name")
    if how == "Upload":
        upload = st.file_uploader(
            "Weight file",
            key=f"setup_upload_{key}",
            help="the file is checked before it is installed; a wrong file is rejected",
        )
        path = ""
    else:
        upload = None
        path = st.text_input("Path", key="setup_path", placeholder="/home/me/Downloads/epoch_20.pth").strip()
    ready = upload is not None or bool(path)
    if st.button(
        "Check and install",
        type="primary",
        disabled=not ready,
        key="setup_install",
        icon=":material/verified:",
    ):
        with st.spinner("Checking the file…"):
            if upload is not None:
                upload.seek(0)
                result = install(key, upload, name or upload.name, actor=actor)
            else:
                result = install(key, path, name, actor=actor)
        if result.ok:
            st.success(_rel(result.message))
            doctor_checks.clear()
        else:
            st.error(_rel(result.message))


def _doctor() -> None:
    st.subheader("Installation check (doctor)")
    if st.button("Run again", icon=":material/refresh:", key="setup_doctor_again"):
        doctor_checks.clear()
    checks = doctor_checks()
    blocking, _ = blocking_checks(checks)
    group = None
    for c in checks:
        if c.group != group:
            group = c.group
            st.markdown(f"**{group.capitalize()}**")
        what, todo = check_text(c.detail, c.fix)
        text = f"**{c.name}**: {_rel(what)}" + (f"\n\n→ {_rel(todo)}" if todo else "")
        if c.ok:
            st.markdown(f":green[:material/check_circle:] {c.name}: {_rel(c.detail)}")
        elif c in blocking:
            st.error(text)
        else:
            st.info(text.replace(f"**{c.name}**", f"**{c.name}** (optional)", 1))
    if blocking:
        st.warning(f"Not ready to extract: fix {', '.join(c.name for c in blocking)}.")
    else:
        st.success("Ready to extract.")


def _face_model_convert() -> None:
    """Offer the BFM conversion when its sources are installed but the converted model is not."""
    face = next(w for w in weight_statuses() if w.key == "bfm")
    if face.present or face.detail != "sources present, not converted yet":
        return
    st.info(
        "The face model's sources are installed in BFM/ but not converted to BFM_model_front.mat yet "
        "(the same as `python -m engine bfm convert`)."
    )
    if actor.may("install") and st.button("Convert the face model", icon=":material/build:", key="setup_convert"):
        with st.spinner("Converting the face model (reads the 200 MB Basel model)…"):
            result = convert_face_model(actor=actor)
        (st.success if result.ok else st.error)(_rel(result.message))
        doctor_checks.clear()


st.title("Models / setup")
_status_table()
_face_model_convert()
_install_form()
_doctor()
