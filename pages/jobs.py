"""Jobs: a live, paginated table of every job with cancel / retry / delete / open results."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from dashboard.data import get_registry
from dashboard.fmt import (
    DECODER_LABELS,
    STATUS_COLOURS,
    explain_error,
    fmt_age,
    fmt_duration,
    md_escape,
    rows_key,
    status_label,
    status_markdown,
)
from dashboard.gate import current_actor
from dashboard.navigation import route_through_app
from db import JobNotFound, JobStateError, JobStatus, JobView, PermissionDenied, service
from db.access import display_path, user_message

route_through_app()
actor = current_actor()

REFRESH_S = 2
PAGE_SIZES = (25, 50, 100, 250)
#: label → (db order_by, descending)
SORTS = {
    "Newest first": ("created_at", True),
    "Oldest first": ("created_at", False),
    "Name (A–Z)": ("name", False),
    "Status": ("status", False),
    "Progress (most done first)": ("progress", True),
    "Speed (fastest first)": ("fps", True),
    "Recently finished": ("finished_at", True),
}

#: Widths in pixels, chosen so that at 1280 px (sidebar open) ID, name, status (also
#: "running (cancelling)") and the error are on screen without scrolling; the rest follows.
COLUMNS = {
    "ID": st.column_config.NumberColumn("ID", format="%d", width=55),
    "Name": st.column_config.TextColumn("Name", width=170),
    "Status": st.column_config.TextColumn("Status", width=165),
    "Error": st.column_config.TextColumn("Error", width=250, help="select the row to read it in full"),
    "Progress": st.column_config.ProgressColumn("Progress", min_value=0.0, max_value=1.0, format="percent",
                                                width=100),
    "Frames": st.column_config.TextColumn("Frames", help="frames done / frames in the video", width=90),
    "Speed": st.column_config.TextColumn(
        "Speed", help="frames per second: live while running, the average once finished", width=80),
    "Time": st.column_config.TextColumn(
        "Time", help="time left while running (estimate); how long the run took once finished", width=85),
    "Attempts": st.column_config.TextColumn("Attempts", help="runs started / allowed", width=70),
    "Submitted": st.column_config.TextColumn("Submitted", width=95),
}


#: Stage of a running job → what the table says while no time left is known yet.
STAGE_WORDS = {"starting": "starting", "waiting": "claimed, next in line", "loading": "loading models", "extract": "",
               "register": "saving"}


def run_time(j: JobView) -> tuple[float | None, float | None]:
    """(seconds the last run took, its average frames/s) of a finished job; (None, None) otherwise."""
    if j.started_at is None or j.finished_at is None or j.status == JobStatus.RUNNING:
        return None, None
    took = (j.finished_at - j.started_at).total_seconds()
    if took <= 0:
        return took, None
    return took, (j.frames_done / took if j.frames_done else None)


def jobs_frame(jobs: list[JobView], data_dir) -> pd.DataFrame:
    """One display row per job (columns of :data:`COLUMNS`); no absolute server path in it."""
    rows = []
    for j in jobs:
        total = j.frames_total or j.video.frame_count or 0
        took, average = run_time(j)
        if j.status == JobStatus.RUNNING:
            speed = f"{j.fps:.1f} /s" if j.fps > 0 else ""
            time = f"{fmt_duration(j.eta_s)} left" if j.eta_s is not None else STAGE_WORDS.get(j.stage, j.stage or "")
        else:
            speed = f"{average:.1f} /s" if average else ""
            time = ("< 1 s" if took < 1 else fmt_duration(took)) if took is not None else ""
        rows.append(
            {
                "ID": j.id,
                "Name": j.name,
                "Status": status_label(j.status)
                + (" (cancelling)" if j.cancel_requested and j.status == JobStatus.RUNNING else ""),
                "Progress": j.progress,
                "Frames": f"{j.frames_done} / {total}" if total else f"{j.frames_done}",
                "Speed": speed,
                "Time": time,
                "Attempts": f"{j.attempts} / {j.max_attempts}",
                "Submitted": fmt_age(j.created_at),
                "Error": user_message(j.error, j.input_path, j.name, data_dir) if j.error else "",
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _flash(kind: str, text: str) -> None:
    st.session_state["jobs_flash"] = (kind, text)


def _apply(action: str, jobs: list[JobView]) -> None:
    """Run cancel/retry/delete on each job; collect one message per outcome."""
    reg = get_registry()
    done, problems = [], []
    for j in jobs:
        try:
            if action == "cancel":
                service.cancel_job(reg, j.id, actor=actor)
            elif action == "retry":
                service.retry_job(reg, j.id, actor=actor)
            elif action == "delete":
                service.delete_job(reg, j.id, actor=actor, remove_files=True)
            done.append(j.name)
        except (JobStateError, JobNotFound, PermissionDenied, service.FilesNotRemoved) as e:
            problems.append(str(e))
    verbs = {"cancel": "Cancel requested for", "retry": "Queued again:", "delete": "Deleted"}
    if done:
        _flash("success", f"{verbs[action]} {', '.join(done[:5])}{' …' if len(done) > 5 else ''}")
    if problems:
        _flash("warning", " ".join(problems))
    st.session_state.pop("jobs_confirm_delete", None)


def _confirm_delete(ids: list[int]) -> None:
    st.session_state["jobs_confirm_delete"] = ids


def _keep() -> None:
    st.session_state.pop("jobs_confirm_delete", None)


def _action_bar(selected: list[JobView]) -> None:
    """Buttons acting on the selected rows, enabled only where the action makes sense.

    Actions run in ``on_click`` callbacks, i.e. before the rerun that redraws the table, so the
    table always shows their effect.
    """
    def allowed(j: JobView, own: str, anyone: str) -> bool:  # the service layer checks again
        return actor.may(own if actor.owns(j.submitted_by) else anyone)

    cancellable = [j for j in selected if j.status in (JobStatus.QUEUED, JobStatus.RUNNING)
                   and allowed(j, "cancel_own", "cancel_any")]
    retryable = [j for j in selected if j.status in (JobStatus.FAILED, JobStatus.CANCELLED)
                 and allowed(j, "retry_own", "retry_any")]
    deletable = [j for j in selected if j.status != JobStatus.RUNNING and actor.may("delete")]
    openable = [j for j in selected if j.status == JobStatus.SUCCEEDED]
    bar = st.container(horizontal=True, vertical_alignment="center")
    bar.markdown(
        f"**{len(selected)} selected**" if selected else "Tick rows (left column) to act on them.",
        width="content",
    )
    if bar.button(
        "Open results",
        icon=":material/monitoring:",
        disabled=len(openable) != 1,
        key="jobs_open",
        help="only for one succeeded job",
    ):
        st.switch_page("pages/results.py", query_params={"job": str(openable[0].id)})
    bar.button(
        f"Cancel ({len(cancellable)})",
        icon=":material/stop_circle:",
        disabled=not cancellable,
        key="jobs_cancel",
        on_click=_apply,
        args=("cancel", cancellable),
    )
    bar.button(
        f"Retry ({len(retryable)})",
        icon=":material/replay:",
        disabled=not retryable,
        key="jobs_retry",
        on_click=_apply,
        args=("retry", retryable),
    )
    bar.button(
        f"Delete ({len(deletable)})",
        icon=":material/delete:",
        disabled=not deletable,
        key="jobs_delete",
        help="running jobs must be cancelled first" if actor.may("delete") else "deleting jobs needs the admin role",
        on_click=_confirm_delete,
        args=([j.id for j in deletable],),
    )

    pending = st.session_state.get("jobs_confirm_delete")
    # By status only: the role is the service layer's to check (delete_job refuses non-admins).
    to_delete = [j for j in selected if j.status != JobStatus.RUNNING and pending and j.id in pending]
    if to_delete:
        names = [md_escape(j.name) for j in to_delete]
        st.warning(
            f"Delete {len(names)} job(s) and their result files? {', '.join(names[:5])}"
            f"{' …' if len(names) > 5 else ''}. Uploaded videos used by no other job are removed too; "
            "videos imported from a folder stay where they are."
        )
        confirm = st.container(horizontal=True)
        confirm.button(
            "Yes, delete", type="primary", key="jobs_delete_yes", on_click=_apply, args=("delete", to_delete)
        )
        confirm.button("Keep them", key="jobs_delete_no", on_click=_keep)


def _details(job: JobView) -> None:
    """What one selected job is: input, settings, error in plain words, timing."""
    with st.container(border=True):
        st.markdown(f"**{md_escape(job.name)}** · job {job.id} · {status_markdown(job.status)}")
        reg = get_registry()
        if job.error:
            # named by the uploaded name, also for errors stored before the worker did so itself
            text = md_escape(user_message(explain_error(job.error, job.error_code), job.input_path, job.name,
                                          reg.data_dir))
            if job.status == JobStatus.FAILED:
                st.error(text)
            else:
                st.info(text)
        same = service.duplicates_of(reg, job.id)
        if same:
            st.warning(md_escape(
                f"Job {', '.join(str(j.id) for j in same[:5])} ({same[0].status.value}) has the same video "
                "content and settings: this job repeats its work."))
        stored = display_path(job.input_path, reg.data_dir, actor.imports.roots)
        took, average = run_time(job)
        info = {
            "Input file": job.name if job.video.in_place or stored == job.name else f"{job.name} (stored as {stored})",
            "Submitted by": job.submitted_by or "",
            "Registered in place": "yes (folder import)" if job.video.in_place else "no (uploaded copy)",
            "Stage": job.stage or "",
            "Worker": f"{job.worker_id} ({job.device})" if job.worker_id else "",
            "Started": fmt_age(job.started_at) if job.started_at else "",
            "Finished": fmt_age(job.finished_at) if job.finished_at else "",
            "Run took": (fmt_duration(took) + (f" · {average:.1f} frames/s on average" if average else ""))
            if took is not None else "",
            "Settings": ", ".join(f"{k}={v}" for k, v in job.settings.items() if v not in (None, "")),
        }
        st.table(pd.Series(info, name="value"))
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            _retry_with(job)


def _retry_with(job: JobView) -> None:
    """Retry this job with another landmark backend or batch size (the service checks the role)."""
    from engine.config import MODE_HELP, Decoder, Mode
    from engine.landmarks import BACKENDS

    current = job.settings.get("landmarks") or "fan"
    with st.container(horizontal=True, vertical_alignment="bottom"):
        backend = st.radio("Landmark backend for the retry", list(BACKENDS),
                           index=list(BACKENDS).index(current) if current in BACKENDS else 0,
                           format_func=lambda b: BACKENDS[b].label, key=f"jobs_retry_backend_{job.id}",
                           horizontal=True, width="content")
        batch = st.number_input("Batch size", 1, 1024, int(job.settings.get("batch_size") or 32),
                                key=f"jobs_retry_batch_{job.id}", width=130)
        modes = [m.value for m in Mode]
        mode = st.radio("Mode", modes, index=modes.index(job.settings.get("mode") or "exact")
                        if (job.settings.get("mode") or "exact") in modes else 0,
                        key=f"jobs_retry_mode_{job.id}", horizontal=True, width="content", help=MODE_HELP)
        changes = {"landmarks": backend, "batch_size": int(batch), "mode": mode}
        decoders = [d.value for d in Decoder]
        current_decoder = job.settings.get("decoder") or Decoder.PYAV.value
        if mode == Mode.FAST.value:
            changes["decoder"] = st.radio(
                "Decoder", decoders, index=decoders.index(current_decoder) if current_decoder in decoders else 0,
                format_func=DECODER_LABELS.__getitem__,
                key=f"jobs_retry_decoder_{job.id}", horizontal=True, width="content")
        elif current_decoder != Decoder.PYAV.value:
            changes["decoder"] = Decoder.PYAV.value  # the exact path decodes with FFmpeg only
        st.button("Retry with these settings", icon=":material/replay:", key=f"jobs_retry_with_{job.id}",
                  on_click=_retry_changed, args=(job, changes))


def _retry_changed(job: JobView, changes: dict) -> None:
    try:
        service.retry_job(get_registry(), job.id, actor=actor, settings={**job.settings, **changes})
        _flash("success", f"Queued again with {', '.join(f'{k}={v}' for k, v in changes.items())}: {job.name}")
    except (JobStateError, JobNotFound, PermissionDenied, ValueError) as e:
        _flash("warning", str(e))


def _table() -> None:
    reg = get_registry()
    flash = st.session_state.pop("jobs_flash", None)
    if flash:
        getattr(st, flash[0])(md_escape(flash[1]))
    notice = st.session_state.pop("jobs_notice", None)
    if notice:
        st.warning(md_escape(notice), icon=":material/content_copy:")
    statuses = st.session_state.get("jobs_status") or None
    search = (st.session_state.get("jobs_search") or "").strip() or None
    order_by, descending = SORTS[st.session_state.get("jobs_sort", "Newest first")]
    size = int(st.session_state.get("jobs_size", PAGE_SIZES[1]))

    total = service.count_jobs(reg, statuses=statuses, search=search)
    pages = max(1, math.ceil(total / size))
    page_no = min(int(st.session_state.get("jobs_page", 1)), pages)
    jobs = service.list_jobs(
        reg,
        statuses=statuses,
        search=search,
        order_by=order_by,
        descending=descending,
        limit=size,
        offset=(page_no - 1) * size,
    )
    if not jobs:
        if total == 0 and not statuses and not search:
            st.info("No jobs yet. Submit videos on the Upload page.")
            st.page_link("pages/upload.py", label="Go to Upload", icon=":material/upload:")
        else:
            st.info("No job matches these filters.")
        return

    # The table's key follows the rows shown, so a selection always maps to the jobs it was made on:
    # when rows come or go (new job, filter), the selection starts afresh instead of shifting.
    key = rows_key("jobs_table", [j.id for j in jobs])
    table = jobs_frame(jobs, reg.data_dir).style.map(
        lambda v: f"color: {STATUS_COLOURS.get(v.split(' ')[0], 'inherit')}; font-weight: 600",
        subset=["Status"],
    )
    event = st.dataframe(
        table,
        key=key,
        on_select="rerun",
        selection_mode="multi-row",
        hide_index=True,
        column_config=COLUMNS,
        width="stretch",
        height=min(35 * (len(jobs) + 1) + 3, 720),
    )
    selected = [jobs[r] for r in event.selection.rows if r < len(jobs)]
    first, last = (page_no - 1) * size + 1, (page_no - 1) * size + len(jobs)
    st.caption(f"Jobs {first}–{last} of {total} · page {page_no} of {pages}")
    _action_bar(selected)
    if len(selected) == 1:
        _details(selected[0])


st.title("Jobs")
with st.container(horizontal=True, vertical_alignment="bottom"):
    st.pills(
        "Status",
        [s.value for s in JobStatus],
        selection_mode="multi",
        key="jobs_status",
        format_func=status_label,
    )
    st.text_input("Search", key="jobs_search", placeholder="name or job id", width=220)
    st.selectbox("Sort", list(SORTS), key="jobs_sort", width=230)
    st.selectbox("Rows per page", PAGE_SIZES, index=1, key="jobs_size", width=120)
    st.number_input("Page", min_value=1, step=1, key="jobs_page", width=110)
    st.toggle("Live updates", value=True, key="jobs_live", help=f"refresh the table every {REFRESH_S} s")

st.fragment(run_every=REFRESH_S if st.session_state.get("jobs_live", True) else None)(_table)()
