"""Overview: queue counts, workers, GPU, disk, and what is still missing to run."""

from __future__ import annotations

import streamlit as st

from dashboard.data import disk_free, doctor_checks, get_registry, gpus
from dashboard.fmt import (
    blocking_checks,
    check_text,
    fmt_age,
    fmt_bytes,
    fmt_duration,
    md_escape,
    status_markdown,
    worker_device,
)
from dashboard.gate import current_actor
from dashboard.navigation import route_through_app
from db import JobStatus, service
from db.access import relative_text
from db.lease import WAITING_STAGE

route_through_app()
current_actor()  # nothing below for a session that is not signed in

REFRESH_S = 3
LOW_DISK_BYTES = 10 * 2**30


def _queue(reg) -> None:
    counts = service.status_counts(reg)
    cols = st.columns(len(JobStatus))
    for col, status in zip(cols, JobStatus, strict=True):
        col.metric(status_markdown(status), counts[status], border=True)
    st.page_link("pages/jobs.py", label="Open the jobs table", icon=":material/list:")


def _job_text(j) -> str:
    """``**name** (45 %)``, or ``**name** (next in line)`` for a job claimed ahead."""
    state = "next in line" if j.stage == WAITING_STAGE else f"{j.progress:.0%}"
    return f"**{md_escape(j.name)}** ({state})"


def _workers(reg) -> None:
    """Per live worker (sorted by device; ``cuda:0 #1`` for one of several workers of a GPU): its jobs, frames/s
    and counts; then the queue's ETA."""
    load = service.throughput(reg)
    if not load.workers:
        st.warning(
            "No worker is running, so queued jobs wait. Start one with `make run` (or `python -m engine worker`)."
        )
        return
    for wl in load.workers:
        w = wl.worker
        if w.status == "paused":
            st.warning(f"Worker **{md_escape(w.worker_id)}** on {md_escape(worker_device(w.worker_id, w.device))} is "
                       f"{md_escape(w.message or 'paused')}. Its job went back to the queue without counting "
                       "an attempt; it resumes by itself once the disk is fixed.", icon=":material/pause_circle:")
            continue
        jobs = f" · working on {', '.join(_job_text(j) for j in wl.jobs)}" if wl.jobs else ""
        speed = f" · {wl.fps:.1f} frames/s" if wl.fps > 0 else ""
        device = worker_device(w.worker_id, w.device) + (f" ({w.device_name})" if w.device_name else "")
        st.markdown(
            f":green-badge[:material/bolt: alive] **{w.worker_id}** on {w.hostname} · {device} · "
            f"{w.status}{f' ({md_escape(w.message)})' if w.message else ''}{jobs}{speed} · "
            f"{w.jobs_done} done, {w.jobs_failed} failed · seen {fmt_age(w.heartbeat_at)}"
        )
    if load.frames_left:
        st.caption(f"Queue: {load.frames_left:,} frames left at {load.fps:.1f} frames/s · "
                   f"ETA {fmt_duration(load.eta_s) if load.eta_s is not None else 'unknown (no speed reported yet)'}")


@st.fragment(run_every=REFRESH_S)
def live_status() -> None:
    reg = get_registry()
    st.subheader("Queue")
    _queue(reg)
    st.subheader("Workers")
    _workers(reg)


def machine(reg) -> None:
    st.subheader("Machine")
    cols = st.columns(2)
    with cols[0]:
        found = gpus()
        if found:
            for g in found:
                st.metric(
                    f"GPU {g.index}: {g.name}",
                    f"{g.memory_used_mib / 1024:.1f} / {g.memory_total_mib / 1024:.0f} GiB used",
                    border=True,
                )
        else:
            st.metric(
                "GPU",
                "none found",
                border=True,
                help="no NVIDIA driver on this machine: workers run on the CPU (much slower)",
            )
    with cols[1]:
        free, total = disk_free(reg.data_dir)
        st.metric(
            "Free disk under data/",
            fmt_bytes(free),
            border=True,
            help=f"the data folder's file system: {fmt_bytes(total)} in all",
        )
        if free < LOW_DISK_BYTES:
            st.warning("Less than 10 GiB free: uploads and results may fail. Delete finished jobs or free space.")


def readiness() -> None:
    st.subheader("Ready to run?")
    checks = doctor_checks()
    blocking, optional = blocking_checks(checks)
    if not blocking:
        st.success("Everything needed to extract coefficients is installed.")
    for c in blocking:
        what, todo = check_text(c.detail, c.fix)
        what, todo = (md_escape(relative_text(t, get_registry().data_dir)) for t in (what, todo))
        st.error(f"**{c.name}** is missing: {what}" + (f" — {todo}" if todo else ""))
    for c in optional:
        what, _ = check_text(c.detail, c.fix)
        st.info(f"Optional: **{c.name}**: {md_escape(relative_text(what, get_registry().data_dir))}")
    st.page_link("pages/setup.py", label="Models / setup", icon=":material/build:")


st.title("3DMM Studio")
st.caption("Deep3DFaceRecon-compatible 3DMM coefficients from face videos.")
live_status()
machine(get_registry())
readiness()
