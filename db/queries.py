"""Reading the registry: pages of jobs, counts, one job, its result files and quality, the workers.

Each function opens one read session and returns frozen views (:mod:`db.mappers`), never
live rows. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import case, func, or_
from sqlmodel import select

from db.mappers import artifact_view, job_view, quality_view, worker_view
from db.models import Artifact, Job, JobStatus, Quality, Video, WorkerRow, utcnow
from db.registry import Registry
from db.states import load_job
from db.views import ArtifactView, JobView, QualityView, Throughput, WorkerLoad, WorkerView

#: ``order_by`` names of :func:`list_jobs` → the column (or expression) sorted on.
_ORDER = {
    "created_at": Job.created_at,
    "id": Job.id,
    "status": Job.status,
    "name": Job.name,
    "started_at": Job.started_at,
    "finished_at": Job.finished_at,
    "fps": Job.fps,
    "attempts": Job.attempts,
    "progress": case((Job.frames_total > 0, Job.frames_done * 1.0 / Job.frames_total), else_=0.0),
}


def _filtered(query, statuses, search):
    """``query`` narrowed to ``statuses`` and to a name substring or job id ``search``."""
    if statuses:
        query = query.where(Job.status.in_([JobStatus(st).value for st in statuses]))
    if search:
        term = search.strip()
        escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        cond = Job.name.ilike(f"%{escaped}%", escape="\\")
        if term.isdigit():
            cond = or_(cond, Job.id == int(term))
        query = query.where(cond)
    return query


def list_jobs(
    reg: Registry,
    *,
    statuses: Sequence[JobStatus | str] | None = None,
    search: str | None = None,
    order_by: str = "created_at",
    descending: bool = True,
    limit: int = 50,
    offset: int = 0,
) -> list[JobView]:
    """One page of jobs (paginated in SQL).

    Args:
        statuses: keep only these statuses (None: all).
        search: case-insensitive substring of the video name, or a job id.
        order_by: one of ``created_at, id, status, name, started_at, finished_at, fps,
            attempts, progress``; ties are broken by id.
    """
    if order_by not in _ORDER:
        raise ValueError(f"order_by must be one of {sorted(_ORDER)}, got {order_by!r}")
    col = _ORDER[order_by]
    q = _filtered(select(Job, Video).join(Video, Job.video_id == Video.id), statuses, search)
    q = q.order_by(col.desc(), Job.id.desc()) if descending else q.order_by(col.asc(), Job.id.asc())
    q = q.limit(max(0, int(limit))).offset(max(0, int(offset)))
    with reg.session() as s:
        return [job_view(reg, j, v) for j, v in s.exec(q).all()]


def count_jobs(
    reg: Registry, *, statuses: Sequence[JobStatus | str] | None = None, search: str | None = None
) -> int:
    """How many jobs :func:`list_jobs` would list without pagination."""
    q = _filtered(select(func.count(Job.id)).join(Video, Job.video_id == Video.id), statuses, search)
    with reg.session() as s:
        return int(s.exec(q).one())


def status_counts(reg: Registry) -> dict[JobStatus, int]:
    """Number of jobs in each status (every status present, zeros included)."""
    out = {st: 0 for st in JobStatus}
    with reg.session() as s:
        for status, n in s.exec(select(Job.status, func.count(Job.id)).group_by(Job.status)).all():
            out[JobStatus(status)] = int(n)
    return out


def get_job(reg: Registry, job_id: int) -> JobView:
    """The job with this id. Raises :class:`~db.states.JobNotFound`."""
    with reg.session() as s:
        return job_view(reg, *load_job(s, job_id))


def list_artifacts(reg: Registry, job_id: int) -> list[ArtifactView]:
    """The registered result files of a job, ordered by format."""
    with reg.session() as s:
        rows = s.exec(select(Artifact).where(Artifact.job_id == int(job_id)).order_by(Artifact.format)).all()
        return [artifact_view(a) for a in rows]


def duplicates_of(reg: Registry, job_id: int) -> list[JobView]:
    """Other jobs with the same input content (same video row, i.e. SHA-256) and the same
    settings that are queued, running or succeeded: submitting again would redo their work."""
    from db.intake import same_settings  # db.intake imports this module

    live = [JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.SUCCEEDED.value]
    with reg.session() as s:
        job, _ = load_job(s, job_id)
        rows = s.exec(
            select(Job, Video).join(Video, Job.video_id == Video.id).where(
                Job.video_id == job.video_id, Job.id != job.id, Job.status.in_(live)
            ).order_by(Job.id)
        ).all()
        return [job_view(reg, j, v) for j, v in rows if same_settings(j.settings, job.settings)]


def artifacts_of(reg: Registry, job_ids: Sequence[int], fmt: str) -> dict[int, ArtifactView]:
    """Job id → its result file of format ``fmt``, for many jobs in one query (dataset views)."""
    ids = [int(i) for i in job_ids]
    if not ids:
        return {}
    with reg.session() as s:
        rows = s.exec(select(Artifact).where(Artifact.job_id.in_(ids), Artifact.format == fmt)).all()
        return {a.job_id: artifact_view(a) for a in rows}


def get_quality(reg: Registry, job_id: int) -> QualityView | None:
    """The quality summary of a succeeded job (None before it succeeded)."""
    with reg.session() as s:
        q = s.get(Quality, int(job_id))
        if q is None:
            return None
        job = s.get(Job, int(job_id))
        return quality_view(q, job.report if job is not None else None)


def list_workers(reg: Registry, *, alive_within_s: float = 30) -> list[WorkerView]:
    """Every worker that registered, newest first; ``alive`` if seen within ``alive_within_s`` seconds."""
    now = utcnow()
    with reg.session() as s:
        rows = s.exec(select(WorkerRow).order_by(WorkerRow.started_at.desc())).all()
        return [worker_view(w, now, alive_within_s) for w in rows]



#: Seconds of finished jobs a worker's speed is averaged over while none of its jobs reports one.
RECENT_S = 60.0


def throughput(reg: Registry, *, alive_within_s: float = 30, recent_s: float = RECENT_S) -> Throughput:
    """Per live worker its jobs and frames/s, and the queue's frames left and ETA (the overview).

    A worker's frames/s is the sum of its running jobs' own speeds (``fps``, as the engine reports
    it); while none reports one (between short clips) it is the frames of the jobs it finished in
    the last ``recent_s`` seconds, per second of the span from the earliest of their starts to now.
    Derived from the jobs' progress and timestamps: no column of its own.
    """
    now = utcnow()
    since = now - timedelta(seconds=recent_s)
    left = case(
        (Job.frames_total > Job.frames_done, Job.frames_total - Job.frames_done),
        (Job.frames_total > 0, 0),
        else_=func.coalesce(Video.frame_count, 0),
    )
    live = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
    with reg.session() as s:
        workers = [worker_view(w, now, alive_within_s)
                   for w in s.exec(select(WorkerRow).order_by(WorkerRow.device, WorkerRow.worker_id)).all()]
        workers = [w for w in workers if w.alive]
        running = s.exec(
            select(Job, Video).join(Video, Job.video_id == Video.id)
            .where(Job.status == JobStatus.RUNNING.value).order_by(Job.started_at.asc(), Job.id.asc())
        ).all()
        recent = s.exec(
            select(Job.worker_id, func.sum(Job.frames_total), func.min(Job.started_at))
            .where(Job.status == JobStatus.SUCCEEDED.value, Job.finished_at >= since)
            .group_by(Job.worker_id)
        ).all()
        frames_left = int(s.exec(
            select(func.coalesce(func.sum(left), 0)).select_from(Job).join(Video, Job.video_id == Video.id)
            .where(Job.status.in_(live))
        ).one())
        jobs = [job_view(reg, j, v) for j, v in running]
    finished = {wid: (int(frames or 0), start) for wid, frames, start in recent}
    loads = []
    for w in workers:
        mine = tuple(j for j in jobs if j.worker_id == w.worker_id)
        fps = sum(j.fps for j in mine)
        if fps <= 0 and w.worker_id in finished:
            frames, start = finished[w.worker_id]
            span = (now - max(start, since)).total_seconds() if start else recent_s
            fps = frames / max(span, 1.0)
        loads.append(WorkerLoad(w, mine, float(fps)))
    total = sum(ld.fps for ld in loads)
    return Throughput(tuple(loads), frames_left, total, frames_left / total if total > 0 else None)
