"""Registry rows → frozen views (:mod:`db.views`): what every query and action hands out.

Pure functions of the rows read in a session (plus ``now`` for a worker's liveness); they
never touch the database, so a view outlives its session.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from db.models import Artifact, Job, JobStatus, Quality, Video, WorkerRow, WorkerStatus
from db.registry import Registry
from db.views import ArtifactView, JobView, QualityView, VideoView, WorkerView


def video_view(v: Video) -> VideoView:
    """A video row as a view (``path`` is where its bytes are stored)."""
    return VideoView(
        id=v.id,
        sha256=v.sha256,
        original_name=v.original_name,
        path=Path(v.stored_path),
        in_place=v.in_place,
        size=v.size_bytes,
        duration=v.duration,
        fps=v.fps,
        width=v.width,
        height=v.height,
        frame_count=v.frame_count,
        codec=v.codec,
        probe_error=v.probe_error,
    )


def job_view(reg: Registry, j: Job, v: Video) -> JobView:
    """A job row and its video row as one view; ``eta_s`` (seconds) only for a running job with a speed."""
    status = JobStatus(j.status)
    eta = None
    if status == JobStatus.RUNNING and j.fps > 0 and j.frames_total > j.frames_done:
        eta = (j.frames_total - j.frames_done) / j.fps
    return JobView(
        id=j.id,
        video_id=j.video_id,
        name=j.name or v.original_name,
        input_path=Path(v.stored_path),
        status=status,
        stage=j.stage,
        frames_done=j.frames_done,
        frames_total=j.frames_total,
        fps=j.fps,
        eta_s=eta,
        attempts=j.attempts,
        max_attempts=j.max_attempts,
        error=j.error,
        error_code=j.error_code,
        worker_id=j.worker_id,
        device=j.device,
        created_at=j.created_at,
        started_at=j.started_at,
        finished_at=j.finished_at,
        heartbeat_at=j.heartbeat_at,
        cancel_requested=j.cancel_requested,
        settings=dict(j.settings or {}),
        result_dir=reg.result_dir(j.id),
        video=video_view(v),
        engine_version=j.engine_version,
        checkpoint_sha256=j.checkpoint_sha256,
        submitted_by=j.submitted_by,
        cancel_requested_at=j.cancel_requested_at,
    )


def artifact_view(a: Artifact) -> ArtifactView:
    """A registered result file as a view."""
    return ArtifactView(
        job_id=a.job_id, format=a.format, path=Path(a.path), bytes=a.bytes, sha256=a.sha256,
        created_at=a.created_at,
    )


def quality_view(q: Quality, report: dict | None = None) -> QualityView:
    """A quality row as a view, with ``valid_ratio`` in [0, 1]; flag counts and jitter come from
    the engine's quality summary in the job's ``report`` (``report["quality"]``)."""
    extra = dict((report or {}).get("quality") or {})
    return QualityView(
        job_id=q.job_id,
        video_id=q.video_id,
        frames=q.frames,
        valid_frames=q.valid_frames,
        valid_ratio=(q.valid_frames / q.frames) if q.frames else 0.0,
        reasons={str(k): int(v) for k, v in (q.reasons or {}).items()},
        longest_invalid_run=q.longest_invalid_run,
        flags={str(k): int(v) for k, v in (extra.get("flags") or {}).items()},
        jitter=dict(extra.get("jitter") or {}),
        jitter_raw=dict(extra.get("jitter_raw") or {}),
    )


def worker_view(w: WorkerRow, now: datetime, alive_within_s: float) -> WorkerView:
    """A worker row as seen at ``now`` (UTC): ``alive`` when it has not stopped and its heartbeat is
    at most ``alive_within_s`` seconds old; a silent worker that did not stop shows as ``lost``."""
    alive = w.stopped_at is None and (now - w.heartbeat_at).total_seconds() <= alive_within_s
    return WorkerView(
        worker_id=w.worker_id,
        hostname=w.hostname,
        pid=w.pid,
        device=w.device,
        device_name=w.device_name,
        status=w.status if alive or w.status == WorkerStatus.STOPPED else WorkerStatus.LOST.value,
        message=w.message,
        current_job_id=w.current_job_id,
        jobs_done=w.jobs_done,
        jobs_failed=w.jobs_failed,
        heartbeat_at=w.heartbeat_at,
        started_at=w.started_at,
        stopped_at=w.stopped_at,
        alive=alive,
    )

