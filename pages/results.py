"""Results of one job: quality, downloads, Plotly charts over time and a frame viewer.

The job comes from the ``?job=<id>`` query parameter (links from the Jobs page) or the picker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from dashboard import charts
from dashboard.data import checked_results, face_renderer, frame_rgb, get_registry, result_data, verified_bytes
from dashboard.demo import is_demo
from dashboard.fmt import explain_error, fmt_bytes, fmt_duration, md_escape, rows_key, status_markdown
from dashboard.gate import current_actor
from dashboard.navigation import route_through_app
from dashboard.results import ResultData, flag_table, folder_table, jitter_table, next_flagged, quality_summary
from db import JobNotFound, JobStatus, JobView, service
from db.access import display_path, may_read, relative_text, user_message
from db.bundle import FileCheck, build_bundle, read_checked
from engine import layout
from engine.formats import FORMATS

route_through_app()
actor = current_actor()

def _label(fmt: str) -> str:
    """The registry's label of an output format (the name itself for an unknown one)."""
    return FORMATS[fmt].label if fmt in FORMATS else fmt


def _pick_job(reg) -> int | None:
    """The job to show: ``?job=`` if given, else what the picker says (and the URL follows it)."""
    recent = service.list_jobs(reg, statuses=[JobStatus.SUCCEEDED], order_by="finished_at", limit=200)
    names = {j.id: f"{j.name} (job {j.id})" for j in recent}
    wanted = st.query_params.get("job")
    if wanted is not None and wanted.isdigit() and int(wanted) not in names:
        try:
            j = service.get_job(reg, int(wanted))
            names = {j.id: f"{j.name} (job {j.id})", **names}
        except JobNotFound:
            st.error(f"There is no job {wanted} (it may have been deleted).")
    if not names:
        st.info("No finished job yet. Jobs appear here once they have succeeded.")
        st.page_link("pages/jobs.py", label="Go to Jobs", icon=":material/list:")
        return None
    if wanted is not None and wanted.isdigit() and int(wanted) in names:
        st.session_state["res_job"] = int(wanted)

    def follow() -> None:
        st.query_params["job"] = str(st.session_state["res_job"])

    return st.selectbox("Job", list(names), format_func=names.__getitem__, key="res_job", on_change=follow)


def _header(job: JobView, data: ResultData | None) -> None:
    st.title(job.name)
    v = job.video
    facts = [f"job {job.id}"]
    if data is not None:
        facts.append(f"{data.num_frames} frames")
        if data.fps:
            facts.append(f"{data.fps:.2f} frames/s")
        facts.append(f"{data.width}×{data.height} px")
    elif v.width:
        facts.append(f"{v.width}×{v.height} px")
    if v.duration:
        facts.append(fmt_duration(v.duration))
    facts.append(fmt_bytes(v.size))
    backend = job.settings.get("landmarks")
    if backend:
        facts.append(f"landmarks: {backend}")
    st.caption(" · ".join(facts))
    if is_demo(job.engine_version):
        st.caption(":orange-badge[demo] Synthetic coefficients from `python -m dashboard.demo` "
                   "(a smooth made-up trajectory), not results of the network.")


def _quality(job: JobView, data: ResultData, frame_key: str) -> None:
    q = quality_summary(data.df)
    fps = data.fps or 0.0
    cols = st.columns(4)
    cols[0].metric("Valid frames", f"{q.valid_ratio:.1%}", help="frames where a face was found", border=True)
    cols[1].metric("Invalid frames", f"{q.num_frames - q.num_valid} of {q.num_frames}", border=True)
    label = "Longest invalid run"
    if fps and q.longest_invalid_run:
        label += f" ({q.longest_invalid_run / fps:.2f} s)"
    cols[2].metric(label, f"{q.longest_invalid_run} frames", border=True)
    reasons = ", ".join(f"{k}: {v}" for k, v in q.reasons.items()) or "none"
    cols[3].metric("Reasons", reasons, border=True, help="why frames were flagged invalid, with counts")
    if q.longest_invalid_run and st.button(
        "Show the longest invalid run in the frame viewer",
        icon=":material/visibility:",
        key="res_goto_invalid",
    ):
        st.session_state[frame_key] = q.longest_invalid_start
    if q.valid_ratio < 0.5:
        st.warning(
            "Fewer than half of the frames have a face: check the video, or try the other "
            "landmark backend (retry with other settings from the Upload page)."
        )


def _flags(job: JobView, data: ResultData, frame_key: str) -> list[str]:
    """The quality flags with their counts, "next flagged frame", jitter before/after smoothing;
    returns the flags to shade on the charts."""
    table = flag_table(data.df)
    present = table[table["frames"] > 0]
    st.subheader("Quality flags")
    if present.empty:
        st.caption("No frame carries a quality flag (results written before flags existed carry none).")
        chosen: list[str] = []
    else:
        st.dataframe(present[["label", "frames", "first", "meaning"]], hide_index=True, key="res_flag_table",
                     column_config={"label": "Flag", "frames": "Frames", "first": "First frame",
                                    "meaning": "What it means"})
        names = present["flag"].tolist()
        labels = dict(zip(table["flag"], table["label"], strict=True))
        with st.container(horizontal=True, vertical_alignment="bottom"):
            which = st.selectbox("Flag", names, format_func=labels.__getitem__, key=f"res_flag_pick_{job.id}")
            if st.button("Next flagged frame", icon=":material/skip_next:", key="res_flag_next"):
                nxt = next_flagged(data.df, which, int(st.session_state[frame_key]))
                if nxt is not None:
                    st.session_state[frame_key] = nxt
        chosen = st.multiselect("Shade on the charts", names, default=[n for n in names if n != "no_face"],
                                format_func=labels.__getitem__, key=f"res_flag_shade_{job.id}",
                                help="frames without a face are always shaded grey")
    with st.expander("Jitter (median absolute second difference over time)", icon=":material/timeline:"):
        jt = jitter_table(data)
        smoothed = data.coeff_raw is not None
        st.dataframe(jt if smoothed else jt.drop(columns=["smoothed"]), hide_index=True, key="res_jitter",
                     column_config={"raw": "Before smoothing" if smoothed else "Jitter", "smoothed": "After smoothing"})
        st.caption("Smoothed with a centred Savitzky–Golay window (raw values kept in the npz as coeff_raw)."
                   if smoothed else "Smoothing was off for this job (Upload page: smoothing window).")
    return chosen


def _downloads(reg, job: JobView, checks: list[FileCheck]) -> None:
    """Bundle and single-file downloads: only for files that still hold their registered bytes,
    and each served file is hashed again when it is fetched (:mod:`db.bundle`)."""
    stem = Path(job.name).stem
    good = [c.artifact for c in checks if c.problem is None]
    bad = [c.problem for c in checks if c.problem]
    with st.container(horizontal=True, vertical_alignment="center"):
        st.download_button(
            "Download bundle (.zip)",
            data=lambda: build_bundle(reg, job.id).read_bytes(),
            file_name=f"{stem}-job{job.id}.zip",
            mime="application/zip",
            type="primary",
            icon=":material/folder_zip:",
            key="res_bundle",
            disabled=bool(bad),
            help="not available: a result file changed or is missing (see below)" if bad else
            "every result file, the landmarks, manifest.json and a README explaining the layout",
        )
        for a in good:
            st.download_button(
                f"{_label(a.format)} · {fmt_bytes(a.bytes)}",
                data=lambda a=a: read_checked(reg, a),
                file_name=a.path.name,
                mime=FORMATS[a.format].mime if a.format in FORMATS else "application/octet-stream",
                key=f"res_dl_{a.format}",
                icon=":material/download:",
            )
    review = next((a for a in good if a.format == "overlay"), None)
    if review is not None:
        with st.expander("Overlay review video: the reconstruction drawn over every frame", icon=":material/movie:"):
            media = verified_bytes(review.path, review.sha256)
            if media is None:
                st.error(md_escape(f"{review.path.name} changed on disk while it was being read; re-run the job"))
            elif review.path.suffix.lower() == ".png":
                st.image(media, width="stretch")
            else:
                st.video(media, format="video/mp4")
    if bad:
        st.error(md_escape("Not served, because the results on disk are no longer the ones the job wrote: "
                           + "; ".join(bad) + "."))


def _select_frame(chart_key: str, frame_key: str) -> None:
    """Chart click/box selection → the frame viewer shows the first selected frame."""
    frame = charts.selected_frame(st.session_state.get(chart_key), None)
    if frame is not None:
        st.session_state[frame_key] = frame


def _chart(fig, chart_key: str, frame_key: str, selectable: bool = True) -> None:
    if selectable:
        st.plotly_chart(
            fig,
            key=chart_key,
            on_select=lambda: _select_frame(chart_key, frame_key),
            selection_mode=("points", "box"),
            config={"displaylogo": False},
        )
    else:
        st.plotly_chart(fig, key=chart_key, config={"displaylogo": False})


def _charts(job: JobView, data: ResultData, frame: int, frame_key: str, flags: list[str] = ()) -> None:
    df = data.df
    st.caption(
        "Click a point on a chart to show that frame below (drag to zoom; box select is in the "
        "chart's toolbar). Grey bands: frames without a usable face (the lines break there). "
        "Coloured bands: the quality flags chosen above. The dashed line marks the frame shown "
        "in the viewer. Angles in degrees, −180…180."
    )
    tabs = st.tabs(["Head pose", "Translation", "Crop", "Expression", "Expression heat maps",
                    "Identity · texture · lighting"])
    with tabs[0]:
        _chart(charts.pose_figure(df, frame, flags), "res_chart_pose", frame_key)
    with tabs[1]:
        _chart(charts.translation_figure(df, frame, flags), "res_chart_trans", frame_key)
    with tabs[2]:
        _chart(charts.crop_figure(df, frame, flags), "res_chart_crop", frame_key)
        st.caption(
            "Scale s: how much the whole frame was resized before the 224×224 crop was cut. "
            "Centre: where the face template's origin lies in the original frame, rows counted "
            "from the top (the files store it from the bottom, y up)."
        )
    with tabs[3]:
        stds = df[[f"exp_{i:02d}" for i in range(64)]].std().to_numpy()
        default = sorted(np.argsort(-np.nan_to_num(stds))[:4].tolist())
        chosen = st.multiselect(
            "Coefficients (0-based index into the 64 expression weights)",
            list(range(64)),
            default=default,
            key=f"res_exp_{job.id}",
            help="the default shows the four that vary most in this video",
        )
        if chosen:
            _chart(charts.expression_figure(df, chosen, frame, flags), "res_chart_exp", frame_key)
        else:
            st.info("Choose at least one coefficient.")
    with tabs[4]:
        left, right = st.columns(2)
        with left:
            _chart(charts.expression_heatmap(df, frame), "res_chart_heat", frame_key, selectable=False)
        with right:
            _chart(charts.expression_change_heatmap(df, frame), "res_chart_heat_change", frame_key,
                   selectable=False)
    with tabs[5]:
        groups = {"id": "identity (80, shape)", "tex": "texture (80, albedo)", "gamma": "lighting (27, SH)"}
        group = st.segmented_control("Group", list(groups), default="id", key=f"res_group_{job.id}",
                                     format_func=groups.__getitem__, required=True)
        st.caption("Deep3D predicts these per frame, but they describe the person and the light, so "
                   "they should barely change over a video: a wide bar means an unsteady estimate.")
        _chart(charts.coefficient_summary_figure(data.coeff[:, layout.GROUPS[group]], df["valid"].to_numpy(),
                                                 groups[group]), "res_chart_group", frame_key, selectable=False)


def _frame_viewer(job: JobView, data: ResultData, frame_key: str) -> None:
    from dashboard.viewer import frame_views, overlay_image

    st.subheader("Frame viewer")
    n = data.num_frames
    index = st.slider("Frame", 0, n - 1, key=frame_key) if n > 1 else 0
    row = data.df.iloc[index]
    state = "valid" if row["valid"] else f"invalid ({row['reason']})"
    st.caption(
        f"Frame {index} · t = {row['t']:.3f} s · {state} · yaw {row['yaw_deg']:.1f}°, "
        f"pitch {row['pitch_deg']:.1f}°, roll {row['roll_deg']:.1f}°"
    )
    path = job.input_path
    if not may_read(path, get_registry().data_dir, actor):
        st.warning(md_escape(f"{job.name} lies outside the data folder and the allowed import roots, so the "
                             "dashboard does not read its frames."))
        return
    if not Path(path).is_file():
        shown = display_path(path, get_registry().data_dir, actor.imports.roots)
        st.warning(md_escape(f"The input video is no longer at {shown}, so its frames cannot be shown."))
        return
    try:
        image = frame_rgb(str(path), int(index), float(row["t"]) if n > 1 else None)
    except Exception as e:
        why = relative_text(str(e).replace(str(path), job.name), get_registry().data_dir, actor.imports.roots)
        st.warning(md_escape(f"Frame {index} cannot be decoded: {why}"))
        return
    views = frame_views(image, data, int(index))
    cols = st.columns([2, 1, 1])
    with cols[0]:
        legend = "cyan: landmarks used for alignment"
        if data.lm68_img_ydown is not None:
            legend += "; magenta: the face model's 68 landmarks"
        st.image(views.original, caption=f"Original frame ({legend})", width="stretch")
    with cols[1]:
        if views.crop is not None:
            st.image(views.crop, caption="Aligned 224×224 crop (network input)", width="stretch")
        if views.crop_note:
            st.caption(views.crop_note)
    with cols[2]:
        if st.toggle(
            "Show reconstructed face",
            key=f"res_overlay_{job.id}",
            help="renders the face model on the CPU; needs the BFM face model",
        ):
            with st.spinner("Rendering the face model…"):
                try:
                    model, renderer = face_renderer()
                except Exception:  # not set up: overlay_image() says so in words
                    model = renderer = None
                overlay, why = overlay_image(image, data, int(index), model, renderer)
            if overlay is not None:
                st.image(
                    overlay,
                    width="stretch",
                    caption="Reconstructed face over the frame (blue: detector landmarks; red: the face "
                    "model's 68 landmarks; a red border marks a frame flagged invalid)",
                )
                _mesh_downloads(job, data, int(index), model)
            else:
                st.info(md_escape(why))
                st.page_link("pages/setup.py", label="Set up the face model", icon=":material/build:")


def _mesh_downloads(job: JobView, data: ResultData, index: int, model) -> None:
    """This frame's reconstructed face as a mesh, in the reference's world coordinates."""
    from dashboard.viewer import mesh_bytes

    stem = Path(job.name).stem
    for fmt, mime in (("obj", "model/obj"), ("ply", "application/octet-stream")):
        st.download_button(
            f"Mesh of frame {index} (.{fmt})",
            data=lambda fmt=fmt: mesh_bytes(model, data, index, fmt),
            file_name=f"{stem}_frame{index:06d}.{fmt}",
            mime=mime,
            icon=":material/download:",
            key=f"res_mesh_{fmt}_{job.id}",
            help="OBJ has per-vertex colours; both are in Deep3DFaceRecon's world coordinates",
        )


FOLDER_LIMIT = 1000


def _image_folder(reg, job: JobView) -> None:
    """An image's results next to the other images of its folder (jobs imported from one folder)."""
    parent = str(Path(job.name).parent)
    st.subheader("This image's folder" if parent != "." else "This image")
    if parent == ".":
        st.dataframe(
            folder_table([(job.name, result_data(_npz_path(reg, job)))]), hide_index=True, column_config=FOLDER_CONFIG
        )
        return
    siblings = [
        j
        for j in service.list_jobs(
            reg, statuses=[JobStatus.SUCCEEDED], search=parent, order_by="name", descending=False, limit=FOLDER_LIMIT
        )
        if str(Path(j.name).parent) == parent
    ]
    loaded = []
    for j in siblings:
        path = _npz_path(reg, j)
        if path is not None:
            loaded.append((j, result_data(path)))
    table = folder_table([(Path(j.name).name, d) for j, d in loaded])
    valid = int(table["valid"].sum())
    st.caption(f"{parent}/ · {len(table)} images with results · {valid} with a face · select a row to open that image")
    event = st.dataframe(
        table,
        hide_index=True,
        column_config=FOLDER_CONFIG,
        on_select="rerun",
        selection_mode="single-row",
        key=rows_key("res_folder", [j.id for j, _ in loaded]),
    )
    if event.selection.rows:
        chosen = loaded[event.selection.rows[0]][0]
        if chosen.id != job.id:
            st.query_params["job"] = str(chosen.id)
            st.rerun()


FOLDER_CONFIG = {
    "image": st.column_config.TextColumn("Image"),
    "valid": st.column_config.CheckboxColumn("Face found"),
    "reason": st.column_config.TextColumn("Reason"),
    "yaw_deg": st.column_config.NumberColumn("Yaw (°)", format="%.1f"),
    "pitch_deg": st.column_config.NumberColumn("Pitch (°)", format="%.1f"),
    "roll_deg": st.column_config.NumberColumn("Roll (°)", format="%.1f"),
    "tx": st.column_config.NumberColumn("tx (dm)", format="%.3f"),
    "ty": st.column_config.NumberColumn("ty (dm)", format="%.3f"),
    "tz": st.column_config.NumberColumn("tz (dm)", format="%.3f"),
    "crop_s": st.column_config.NumberColumn("Crop scale", format="%.3f"),
}


def _npz_path(reg, job: JobView) -> Path | None:
    npz = next((a for a in service.list_artifacts(reg, job.id) if a.format == "npz"), None)
    return npz.path if npz is not None and npz.path.is_file() else None


def _not_ready(job: JobView) -> None:
    st.title(job.name)
    st.info(f"This job is {status_markdown(job.status)}; results appear once it has succeeded.")
    if job.error:
        st.error(md_escape(user_message(explain_error(job.error, job.error_code), job.input_path, job.name,
                                        reg.data_dir)))
    if job.status == JobStatus.RUNNING:
        st.progress(job.progress, text=f"{job.frames_done} of {job.frames_total or '?'} frames")
    st.page_link("pages/jobs.py", label="Back to Jobs", icon=":material/list:")


reg = get_registry()
job_id = _pick_job(reg)
if job_id is not None:
    try:
        job = service.get_job(reg, job_id)
    except JobNotFound:
        st.error(f"Job {job_id} no longer exists.")
        st.stop()
    if job.status != JobStatus.SUCCEEDED:
        _not_ready(job)
        st.stop()
    checks = checked_results(reg, job.id)
    npz = next((c for c in checks if c.artifact.format == "npz"), None)
    data = None
    if npz is None:
        note = "This job did not write the npz format, which the charts are drawn from. Retry the video with "
        note += "the npz format selected to see charts and frames."
    elif npz.problem:
        note = "The charts are drawn from the npz result, which is not usable: see above."
    else:
        note = ""
        data = result_data(npz.artifact.path)
    _header(job, data)
    _downloads(reg, job, checks)
    if data is None:
        st.warning(md_escape(note))
        st.stop()
    frame_key = f"res_frame_{job.id}"
    st.session_state.setdefault(frame_key, 0)
    st.session_state[frame_key] = int(min(max(0, st.session_state[frame_key]), data.num_frames - 1))
    _quality(job, data, frame_key)
    shaded = _flags(job, data, frame_key) if data.num_frames > 1 else []
    if data.num_frames > 1:
        _charts(job, data, int(st.session_state[frame_key]), frame_key, shaded)
    _frame_viewer(job, data, frame_key)
    if data.num_frames == 1:
        _image_folder(reg, job)
