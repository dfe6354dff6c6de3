"""Every operation on the job registry, for the CLI, the dashboard and the workers.

Plain functions: each takes the :class:`~db.registry.Registry` first, runs in one
transaction and returns frozen views (:mod:`db.views`), never live ORM rows. Status
changes go through :func:`transition` only, inside a write transaction (``BEGIN
IMMEDIATE`` on SQLite).

User side: :func:`submit_file`, :func:`submit_upload`, :func:`import_folder`,
:func:`list_jobs`, :func:`count_jobs`, :func:`status_counts`, :func:`get_job`,
:func:`cancel_job`, :func:`retry_job`, :func:`delete_job`, :func:`list_artifacts`,
:func:`get_quality`, :func:`list_workers`, :func:`build_bundle`.

Worker side: :func:`register_worker`, :func:`worker_heartbeat`, :func:`stop_worker`,
:func:`requeue_stale`, :func:`claim_next`, :func:`report_progress`, :func:`read_control`,
:func:`complete_job`, :func:`fail_job`, :func:`requeue_job`, :func:`finish_cancelled`,
:func:`adopt_job`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePath
from typing import BinaryIO

from sqlalchemy import case, delete, func, or_
from sqlmodel import Session, select

from db import storage
from db.access import LOCAL, Actor
from db.models import (
    TRANSITIONS,
    Artifact,
    Job,
    JobStatus,
    Quality,
    Video,
    WorkerRow,
    utcnow,
)
from db.registry import Registry
from db.views import (
    ArtifactFile,
    ArtifactView,
    JobControl,
    JobView,
    QualitySummary,
    QualityView,
    VideoView,
    WorkerView,
)
from engine.checks import regular_file_problem
from engine.config import EngineConfig
from engine.errors import InputError, ReadOnlyError

log = logging.getLogger(__name__)

#: File extensions :func:`import_folder` treats as videos when the engine's discovery is unavailable.
class JobNotFound(KeyError):
    """No job has this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "job not found"


class JobStateError(ValueError):
    """The operation does not apply to the job in its current status."""


class LostJob(RuntimeError):
    """A worker tried to update a job that is no longer running under its id."""


class FilesNotRemoved(ReadOnlyError):
    """A job's files could not be deleted (their folder is read-only or not writable)."""


# --------------------------------------------------------------------------------------
# status machine


def transition(s: Session, job: Job, to: JobStatus, **fields) -> Job:
    """Move ``job`` to status ``to`` and set ``fields``, checking :data:`TRANSITIONS`.

    Must run inside :meth:`Registry.write` (the row was read under the write lock).
    Entering a finished status stamps ``finished_at``; leaving one clears it.

    Raises:
        JobStateError: the change is not in the transition table.
    """
    frm = JobStatus(job.status)
    if to not in TRANSITIONS[frm]:
        raise JobStateError(f"job {job.id} is {frm.value}: it cannot become {to.value}")
    now = utcnow()
    job.status = to.value
    if to.finished:
        job.finished_at = now
    else:
        job.finished_at = None
    for name, value in fields.items():
        if name not in Job.model_fields:
            raise AttributeError(f"Job has no column {name!r}")
        setattr(job, name, value)
    s.add(job)
    return job


# --------------------------------------------------------------------------------------
# views


def _video_view(v: Video) -> VideoView:
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


def _job_view(reg: Registry, j: Job, v: Video) -> JobView:
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
        video=_video_view(v),
        engine_version=j.engine_version,
        checkpoint_sha256=j.checkpoint_sha256,
        submitted_by=j.submitted_by,
        cancel_requested_at=j.cancel_requested_at,
    )


def _artifact_view(a: Artifact) -> ArtifactView:
    return ArtifactView(
        job_id=a.job_id, format=a.format, path=Path(a.path), bytes=a.bytes, sha256=a.sha256,
        created_at=a.created_at,
    )


def _quality_view(q: Quality) -> QualityView:
    return QualityView(
        job_id=q.job_id,
        video_id=q.video_id,
        frames=q.frames,
        valid_frames=q.valid_frames,
        valid_ratio=(q.valid_frames / q.frames) if q.frames else 0.0,
        reasons={str(k): int(v) for k, v in (q.reasons or {}).items()},
        longest_invalid_run=q.longest_invalid_run,
    )


def _worker_view(w: WorkerRow, now, alive_within_s: float) -> WorkerView:
    alive = w.stopped_at is None and (now - w.heartbeat_at).total_seconds() <= alive_within_s
    return WorkerView(
        worker_id=w.worker_id,
        hostname=w.hostname,
        pid=w.pid,
        device=w.device,
        device_name=w.device_name,
        status=w.status if alive or w.status == "stopped" else "lost",
        message=w.message,
        current_job_id=w.current_job_id,
        jobs_done=w.jobs_done,
        jobs_failed=w.jobs_failed,
        heartbeat_at=w.heartbeat_at,
        started_at=w.started_at,
        stopped_at=w.stopped_at,
        alive=alive,
    )


def _load(s: Session, job_id: int) -> tuple[Job, Video]:
    q = select(Job, Video).join(Video, Job.video_id == Video.id).where(Job.id == int(job_id))
    row = s.exec(q).first()
    if row is None:
        raise JobNotFound(f"no job with id {job_id}")
    return row


# --------------------------------------------------------------------------------------
# submitting


def normalize_settings(settings: EngineConfig | dict | None) -> dict:
    """Validate settings and return them as ``EngineConfig.to_dict()`` with absolute paths.

    Raises:
        ValueError: unknown setting or invalid value (message names it).
    """
    if settings is None:
        cfg = EngineConfig()
    elif isinstance(settings, EngineConfig):
        cfg = settings
    else:
        cfg = EngineConfig.from_dict(dict(settings))
    d = cfg.to_dict()
    for key in ("checkpoint", "keypoints"):
        if d.get(key):
            d[key] = str(Path(d[key]).expanduser().resolve())
    return d


def _probe(path: Path) -> dict:
    """Probe fields for a Video row; never raises (a bad file is the worker's to report)."""
    try:
        from engine import probe

        info = probe(path)
    except Exception as e:
        msg = str(e) if getattr(e, "code", None) else f"{type(e).__name__}: {e}"
        return {"probe_error": msg[:500]}
    return {
        "duration": float(info.duration),
        "fps": float(info.fps),
        "width": int(info.width),
        "height": int(info.height),
        "frame_count": int(info.frame_count),
        "codec": str(info.codec or ""),
        "probe_error": None,
    }


def check_submission(path: Path | None, name: str) -> None:
    """The engine's own input rules, applied when a file is submitted: a supported suffix
    of ``name`` (as ``python -m engine extract`` demands) and, for the file at ``path``
    (None: the suffix only), a regular file within the input limits of :mod:`engine.limits`
    (bytes, pixels per frame, frame size, duration; read from the header only).

    Raises:
        InputError (``InputTooLarge``, ``InputTooSmall``): the file is refused; the message
            names ``name``.
    """
    from engine.limits import InputLimits
    from engine.sources import MEDIA_EXTS, media_kind

    shown = PurePath(name).name
    if media_kind(shown) is None:
        raise InputError(
            f"{shown}: unsupported file type {PurePath(shown).suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(sorted(MEDIA_EXTS))}"
        )
    if path is not None:
        InputLimits.from_env().check_file(path, shown)


def _get_or_create_video(
    reg: Registry, *, sha: str, size: int, stored: Path, original_name: str, in_place: bool
) -> int:
    with reg.session() as s:
        existing = s.exec(select(Video).where(Video.sha256 == sha)).first()
        probed = existing is not None and existing.probe_error is None
    probe_fields = {} if probed else _probe(stored)
    with reg.write() as s:
        v = s.exec(select(Video).where(Video.sha256 == sha)).first()
        if v is None:
            v = Video(
                sha256=sha, original_name=original_name, stored_path=str(stored), in_place=in_place,
                size_bytes=size, **probe_fields,
            )
        else:
            # Same bytes as a known video: keep one row; prefer a copy we own over an in-place file.
            if (v.in_place and not in_place) or not Path(v.stored_path).exists():
                v.stored_path, v.in_place = str(stored), in_place
            for k, val in probe_fields.items():
                setattr(v, k, val)
        s.add(v)
        s.flush()
        return v.id


def _create_job(reg: Registry, video_id: int, settings: dict, name: str, actor: Actor) -> JobView:
    with reg.write() as s:
        job = Job(video_id=video_id, settings=settings, name=name, submitted_by=actor.name)
        s.add(job)
        s.flush()
        job_id = job.id
    return get_job(reg, job_id)


def submit_file(
    reg: Registry,
    path: str | Path,
    settings: EngineConfig | dict | None = None,
    *,
    copy: bool = True,
    original_name: str | None = None,
    actor: Actor = LOCAL,
) -> JobView:
    """Queue a job for a file on this machine.

    Args:
        path: the input video or image.
        settings: engine settings (validated now; stored with the job as JSON).
        copy: True stores the file under ``uploads/`` by content hash (once per content);
            False registers it where it lies (server-side folder import).
        original_name: the name shown for the job (default: the file name).
        actor: who queues it (needs the ``user`` role; recorded as the job's owner).

    Raises:
        InputError: ``path`` is not an existing regular file.
        ValueError: invalid settings.
        PermissionDenied: the actor may not queue jobs.
    """
    actor.require("submit")
    src = Path(path).expanduser().resolve()
    problem = regular_file_problem(src)
    if problem:
        raise InputError(f"{original_name or Path(path).name}: {problem}; expected a video or image file")
    cfg = normalize_settings(settings)
    name = original_name or src.name
    check_submission(src, name)
    if copy:
        stored, sha, size = storage.store_copy(src, reg.uploads_dir, name)
    else:
        stored, sha, size = src, storage.sha256_file(src), src.stat().st_size
    video_id = _get_or_create_video(
        reg, sha=sha, size=size, stored=stored, original_name=name, in_place=not copy
    )
    job = _create_job(reg, video_id, cfg, name, actor)
    log.info("queued job %d: %s (%s, %d bytes)", job.id, name, sha[:12], size)
    return job


def submit_upload(
    reg: Registry, fileobj: BinaryIO, original_name: str, settings: EngineConfig | dict | None = None,
    *, actor: Actor = LOCAL,
) -> JobView:
    """Queue a job for an uploaded stream (``fileobj.read(n)`` gives bytes).

    The stream is written to a temporary file beside the uploads while being hashed, checked
    (:func:`check_submission`), then moved to ``uploads/<sha[:2]>/<sha><ext>``; bytes already
    stored (under any extension) are not stored again. ``actor`` needs the ``user`` role and is
    recorded as the job's owner.
    """
    from engine.limits import InputLimits

    actor.require("submit")
    cfg = normalize_settings(settings)
    name = Path(original_name).name
    check_submission(None, name)  # the suffix, before reading a byte
    limit = InputLimits.from_env().max_bytes
    tmp, sha, size = storage.stream_to_temp(fileobj, reg.uploads_dir, name=name, max_bytes=limit)
    try:
        check_submission(tmp, name)
        dest = storage.find_stored(reg.uploads_dir, sha)
        if dest is None:
            dest = storage.upload_path(reg.uploads_dir, sha, name)
            storage.store_temp(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    video_id = _get_or_create_video(reg, sha=sha, size=size, stored=dest, original_name=name, in_place=False)
    job = _create_job(reg, video_id, cfg, name, actor)
    log.info("queued job %d: upload %s (%s, %d bytes)", job.id, original_name, sha[:12], size)
    return job


def _discover(folder: Path) -> list[Path]:
    """Every video and image under ``folder``, as the engine's CLI would find them."""
    from engine import discover_inputs

    return [item.path for item in discover_inputs([folder])]


def import_folder(
    reg: Registry, folder: str | Path, settings: EngineConfig | dict | None = None,
    *, actor: Actor, refused: list[str] | None = None,
) -> list[JobView]:
    """Queue one job per input found under ``folder`` (registered in place, not copied).

    ``actor`` needs the ``admin`` role; the folder, resolved, must lie under one of its
    allowed import roots, and so must every file found (a link pointing out is skipped).

    Args:
        refused: when given, a file refused at submit time (over a limit, not a regular
            file) is skipped and its one-line reason appended here; otherwise the first
            refusal raises.

    Raises:
        InputError: ``folder`` is not a directory (or a file is refused, without ``refused``).
        PermissionDenied: not an admin, importing is off, or the folder is outside the roots.
    """
    actor.require("import")
    root = actor.imports.folder(folder)
    if not root.is_dir():
        raise InputError(f"{folder}: not a folder")
    cfg = normalize_settings(settings)
    found, outside = actor.imports.split(_discover(root))
    for p in outside:
        log.warning("import of %s: skipped %s, it leads outside the allowed import roots", folder, p)
    jobs = []
    for p in found:
        try:
            jobs.append(submit_file(reg, p, cfg, copy=False, original_name=str(p.relative_to(root)), actor=actor))
        except InputError as e:
            if refused is None:
                raise
            refused.append(str(e))
    return jobs


# --------------------------------------------------------------------------------------
# reading

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
        return [_job_view(reg, j, v) for j, v in s.exec(q).all()]


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
    """The job with this id. Raises :class:`JobNotFound`."""
    with reg.session() as s:
        return _job_view(reg, *_load(s, job_id))


def list_artifacts(reg: Registry, job_id: int) -> list[ArtifactView]:
    """The registered result files of a job, ordered by format."""
    with reg.session() as s:
        rows = s.exec(select(Artifact).where(Artifact.job_id == int(job_id)).order_by(Artifact.format)).all()
        return [_artifact_view(a) for a in rows]


def duplicates_of(reg: Registry, job_id: int) -> list[JobView]:
    """Other jobs with the same input content (same video row, i.e. SHA-256) and the same
    settings that are queued, running or succeeded: submitting again would redo their work."""
    live = [JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.SUCCEEDED.value]
    with reg.session() as s:
        job, _ = _load(s, job_id)
        rows = s.exec(
            select(Job, Video).join(Video, Job.video_id == Video.id).where(
                Job.video_id == job.video_id, Job.id != job.id, Job.status.in_(live)
            ).order_by(Job.id)
        ).all()
        return [_job_view(reg, j, v) for j, v in rows if (j.settings or {}) == (job.settings or {})]


def artifacts_of(reg: Registry, job_ids: Sequence[int], fmt: str) -> dict[int, ArtifactView]:
    """Job id → its result file of format ``fmt``, for many jobs in one query (dataset views)."""
    ids = [int(i) for i in job_ids]
    if not ids:
        return {}
    with reg.session() as s:
        rows = s.exec(select(Artifact).where(Artifact.job_id.in_(ids), Artifact.format == fmt)).all()
        return {a.job_id: _artifact_view(a) for a in rows}


def get_quality(reg: Registry, job_id: int) -> QualityView | None:
    """The quality summary of a succeeded job (None before it succeeded)."""
    with reg.session() as s:
        q = s.get(Quality, int(job_id))
        return None if q is None else _quality_view(q)


def list_workers(reg: Registry, *, alive_within_s: float = 30) -> list[WorkerView]:
    """Every worker that registered, newest first; ``alive`` if seen within ``alive_within_s`` seconds."""
    now = utcnow()
    with reg.session() as s:
        rows = s.exec(select(WorkerRow).order_by(WorkerRow.started_at.desc())).all()
        return [_worker_view(w, now, alive_within_s) for w in rows]


# --------------------------------------------------------------------------------------
# user actions


def _remove_job_files(reg: Registry, job_id: int, *, results: bool = True, state: bool = True) -> list[Path]:
    """Delete a job's result and/or state folder; returns what could not be deleted."""
    left: list[Path] = []
    if results:
        left += storage.remove_tree(reg.result_dir(job_id))
    if state:
        left += storage.remove_tree(reg.state_dir(job_id))
    return left


def cancel_job(reg: Registry, job_id: int, *, actor: Actor) -> JobView:
    """Cancel a job: a queued one at once, a running one by asking its worker (it stops
    within one engine batch and removes its partial files). ``actor`` cancels their own
    jobs with the ``user`` role, anyone's as ``admin``.

    Raises:
        JobNotFound, JobStateError (the job already finished), PermissionDenied.
    """
    with reg.write() as s:
        job, _ = _load(s, job_id)
        actor.require("cancel_own" if actor.owns(job.submitted_by) else "cancel_any")
        status = JobStatus(job.status)
        if status == JobStatus.QUEUED:
            transition(s, job, JobStatus.CANCELLED, cancel_requested=True, cancel_requested_at=utcnow(), stage=None)
        elif status == JobStatus.RUNNING:
            if not job.cancel_requested:  # a second click keeps the time of the first
                job.cancel_requested, job.cancel_requested_at = True, utcnow()
            s.add(job)
        else:
            raise JobStateError(
                f"job {job_id} is already {status.value}: only queued or running jobs can be cancelled"
            )
    if status == JobStatus.QUEUED:
        _remove_job_files(reg, job_id)  # state left by an earlier, interrupted attempt
    log.info("cancel requested for job %d (%s)", job_id, status.value)
    return get_job(reg, job_id)


def retry_job(
    reg: Registry, job_id: int, *, actor: Actor, settings: EngineConfig | dict | None = None
) -> JobView:
    """Queue a failed or cancelled job again (attempts reset to 0; a saved engine state is kept
    so a long video resumes). ``actor`` retries their own jobs as ``user``, anyone's as ``admin``.

    Args:
        settings: new engine settings for the retry (validated like a submission, e.g. another
            landmark backend); None keeps the job's. Changed settings drop the saved state, whose
            frames were made with the old ones.

    Raises:
        JobNotFound, JobStateError (the job is queued, running or succeeded), PermissionDenied,
        ValueError (invalid settings; nothing changed).
    """
    new = None if settings is None else normalize_settings(settings)
    with reg.write() as s:
        job, _ = _load(s, job_id)
        actor.require("retry_own" if actor.owns(job.submitted_by) else "retry_any")
        status = JobStatus(job.status)
        if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise JobStateError(
                f"job {job_id} is {status.value}: only failed or cancelled jobs can be retried"
            )
        changed = new is not None and new != (job.settings or {})
        extra = {"settings": new} if changed else {}
        transition(
            s, job, JobStatus.QUEUED, attempts=0, error=None, error_code=None, cancel_requested=False,
            cancel_requested_at=None,
            worker_id=None, heartbeat_at=None, started_at=None, frames_done=0, fps=0.0, stage=None,
            **extra,
        )
    _remove_job_files(reg, job_id, state=changed)
    log.info("job %d queued again%s", job_id, " with new settings" if changed else "")
    return get_job(reg, job_id)


def delete_job(reg: Registry, job_id: int, *, actor: Actor, remove_files: bool = True) -> None:
    """Delete a job that is not running, with its artifacts and quality rows; with
    ``remove_files`` also its result/work folders and, when no other job uses it, its
    uploaded input (never an input registered in place). ``actor`` must be an admin.

    Raises:
        JobNotFound, JobStateError (the job is running: cancel it first), PermissionDenied.
        FilesNotRemoved: the files cannot be removed (read-only or not writable folder):
            nothing was deleted; or some could not be removed after the job was deleted
            (the message names them).
    """
    actor.require("delete")
    if remove_files:  # refuse up front rather than delete the rows and silently keep the files
        with reg.session() as s:
            _, video = _load(s, job_id)
            upload = Path(video.stored_path) if not video.in_place else None
        candidates = [reg.result_dir(job_id), reg.state_dir(job_id)]
        if upload is not None and reg.uploads_dir in upload.parents:
            candidates.append(upload)
        for path in candidates:
            problem = storage.removal_problem(path)
            if problem:
                raise FilesNotRemoved(
                    f"job {job_id} was not deleted: its files cannot be removed ({problem}); "
                    "make the folder writable, then delete it again"
                )
    orphan_upload: Path | None = None
    with reg.write() as s:
        job, video = _load(s, job_id)
        if JobStatus(job.status) == JobStatus.RUNNING:
            raise JobStateError(f"job {job_id} is running: cancel it before deleting it")
        s.exec(delete(Artifact).where(Artifact.job_id == job.id))
        s.exec(delete(Quality).where(Quality.job_id == job.id))
        s.delete(job)
        s.flush()
        others = s.exec(select(func.count(Job.id)).where(Job.video_id == video.id)).one()
        if not others:
            if not video.in_place:
                orphan_upload = Path(video.stored_path)
            s.delete(video)
    if remove_files:
        left = _remove_job_files(reg, job_id)
        if orphan_upload is not None and reg.uploads_dir in orphan_upload.parents:
            left += storage.remove_tree(orphan_upload)
        if left:
            names = ", ".join("/".join(p.parts[-3:]) for p in left[:3]) + (" …" if len(left) > 3 else "")
            raise FilesNotRemoved(
                f"job {job_id} was deleted, but {len(left)} of its files could not be removed "
                f"({names}): remove them by hand"
            )
    log.info("deleted job %d", job_id)


def build_bundle(reg: Registry, job_id: int) -> Path:
    """Zip of a succeeded job's results with manifest.json and README.txt (built once,
    atomically, at ``results/<job id>/bundle-<job id>.zip``). See :mod:`db.bundle`."""
    from db.bundle import build_bundle as _build

    return _build(reg, job_id)


# --------------------------------------------------------------------------------------
# worker side


def register_worker(
    reg: Registry, worker_id: str, *, hostname: str, pid: int, device: str, device_name: str | None = None
) -> WorkerView:
    """Create (or restart) the row of a worker process."""
    now = utcnow()
    with reg.write() as s:
        w = s.get(WorkerRow, worker_id)
        if w is None:
            w = WorkerRow(worker_id=worker_id, hostname=hostname, pid=pid, device=device)
        w.hostname, w.pid, w.device, w.device_name = hostname, pid, device, device_name
        w.status, w.current_job_id, w.started_at, w.heartbeat_at, w.stopped_at = "idle", None, now, now, None
        w.message = None
        s.add(w)
        s.flush()
        return _worker_view(w, now, float("inf"))


def worker_heartbeat(
    reg: Registry, worker_id: str, *, status: str | None = None, current_job_id: int | None = None,
    message: str | None = None,
) -> None:
    """Refresh a worker's heartbeat (and optionally its status, current job and message:
    a new status replaces the message, e.g. ``"paused"`` with why, ``"idle"`` with None)."""
    with reg.write() as s:
        w = s.get(WorkerRow, worker_id)
        if w is None:
            return
        w.heartbeat_at = utcnow()
        if status is not None:
            w.status, w.current_job_id, w.message = status, current_job_id, message
        s.add(w)


def stop_worker(reg: Registry, worker_id: str) -> None:
    """Mark a worker as cleanly stopped."""
    with reg.write() as s:
        w = s.get(WorkerRow, worker_id)
        if w is not None:
            w.status, w.current_job_id, w.stopped_at = "stopped", None, utcnow()
            s.add(w)


@dataclass(frozen=True)
class StaleAction:
    """What the janitor did with a job whose worker stopped sending heartbeats."""

    job_id: int
    status: JobStatus
    message: str


def requeue_stale(reg: Registry, *, stale_after_s: float) -> list[StaleAction]:
    """Janitor: requeue running jobs whose heartbeat is older than ``stale_after_s`` seconds.

    1. A job whose cancel was requested becomes cancelled (its files are removed).
    2. A job that already used ``max_attempts`` starts fails with the last error.
    3. Any other job goes back to the queue (its saved state is kept, so the next worker
       resumes it); the next claim counts one more attempt.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_after_s)
    actions: list[StaleAction] = []
    with reg.write() as s:
        stale = s.exec(
            select(Job).where(
                Job.status == JobStatus.RUNNING.value,
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
            )
        ).all()
        for job in stale:
            seen = job.heartbeat_at or job.started_at or now
            note = (
                f"worker {job.worker_id} stopped sending heartbeats {(now - seen).total_seconds():.0f} s ago "
                f"(attempt {job.attempts} of {job.max_attempts})"
            )
            if job.cancel_requested:
                transition(s, job, JobStatus.CANCELLED, stage=None, fps=0.0)
                actions.append(StaleAction(job.id, JobStatus.CANCELLED, note))
            elif job.attempts >= job.max_attempts:
                msg = abandon(s, job, note)
                actions.append(StaleAction(job.id, JobStatus.FAILED, msg))
            else:
                transition(
                    s, job, JobStatus.QUEUED, error=note, error_code="abandoned", worker_id=None,
                    heartbeat_at=None, stage=None, fps=0.0,
                )
                actions.append(StaleAction(job.id, JobStatus.QUEUED, note))
        # Forget workers that have been silent for a day.
        s.exec(delete(WorkerRow).where(WorkerRow.heartbeat_at < now - timedelta(days=1)))
    for a in actions:
        if a.status == JobStatus.CANCELLED:
            _remove_job_files(reg, a.job_id)
        elif a.status == JobStatus.FAILED:
            _remove_job_files(reg, a.job_id, state=True)
        log.warning("job %d %s: %s", a.job_id, "requeued" if a.status == JobStatus.QUEUED else a.status.value,
                    a.message)
    return actions


def give_up_message(attempts: int, last: str) -> str:
    """The error of a job that used all its attempts (worker lost each time)."""
    return f"gave up after {attempts} attempts; last: {last}"


def abandon(s: Session, job: Job, note: str) -> str:
    """Fail ``job``, whose attempts are used up, with code ``abandoned``; returns the message."""
    msg = give_up_message(job.attempts, note)
    transition(s, job, JobStatus.FAILED, error=msg, error_code="abandoned", stage=None, fps=0.0)
    return msg


#: Queued jobs looked at per claim when some ask for a device this worker does not have.
CLAIM_WINDOW = 64


def device_accepts(requested: str | None, worker_device: str | None) -> bool:
    """Whether a worker on ``worker_device`` may run a job whose settings ask for ``requested``.

    ``None`` (any device) runs anywhere; ``"cpu"`` only on CPU workers; ``"cuda"`` on any GPU
    worker; ``"cuda:N"`` only on the worker of that GPU. A Ray driver (``"ray"``) takes any job.

    >>> device_accepts(None, "cuda:1"), device_accepts("cpu", "cuda:0"), device_accepts("cuda", "cuda:1")
    (True, False, True)
    """
    if not requested or worker_device in (None, "ray"):  # a Ray driver places tasks itself
        return True
    if requested == "cuda":
        return worker_device.startswith("cuda")
    if requested == "cuda:0" and worker_device == "cuda":
        return True
    return requested == worker_device


def claim_next(reg: Registry, worker_id: str, *, device: str | None = None) -> JobView | None:
    """Atomically take the oldest queued job that ``device`` may run (None when there is none).

    Jobs whose settings ask for another device (``settings["device"]``) are left for a worker
    that has it (see :func:`device_accepts`).

    SQLite: the select and update run under one ``BEGIN IMMEDIATE`` write lock;
    PostgreSQL: the row is locked with ``FOR UPDATE SKIP LOCKED``. Either way two
    workers can never claim the same job.
    """
    now = utcnow()
    q = (
        select(Job)
        .where(Job.status == JobStatus.QUEUED.value)
        .order_by(Job.created_at.asc(), Job.id.asc())
        .limit(CLAIM_WINDOW)
    )
    if not reg.is_sqlite:
        q = q.with_for_update(skip_locked=True)
    with reg.write() as s:
        job = next((j for j in s.exec(q) if device_accepts((j.settings or {}).get("device"), device)), None)
        if job is None:
            return None
        transition(
            s, job, JobStatus.RUNNING, worker_id=worker_id, device=device, attempts=job.attempts + 1,
            started_at=now, heartbeat_at=now, fps=0.0, stage="starting", cancel_requested=False,
            cancel_requested_at=None,
        )
        w = s.get(WorkerRow, worker_id)
        if w is not None:
            w.status, w.current_job_id, w.heartbeat_at = "busy", job.id, now
            s.add(w)
        job_id = job.id
    return get_job(reg, job_id)


def claim_job(reg: Registry, job_id: int, worker_id: str, *, device: str | None = None) -> JobView | None:
    """Take one given queued job (not the oldest) for ``worker_id``; None when it is not queued.

    For producers that made the job themselves and must not take anyone else's (the demo
    command, :mod:`dashboard.demo`).
    """
    now = utcnow()
    with reg.write() as s:
        job = s.get(Job, int(job_id))
        if job is None or job.status != JobStatus.QUEUED.value:
            return None
        transition(
            s, job, JobStatus.RUNNING, worker_id=worker_id, device=device, attempts=job.attempts + 1,
            started_at=now, heartbeat_at=now, fps=0.0, stage="starting", cancel_requested=False,
            cancel_requested_at=None,
        )
    return get_job(reg, job_id)


def _owned(s: Session, job_id: int, worker_id: str) -> Job | None:
    job = s.get(Job, int(job_id))
    if job is None or job.status != JobStatus.RUNNING.value or job.worker_id != worker_id:
        return None
    return job


def report_progress(
    reg: Registry,
    job_id: int,
    worker_id: str,
    *,
    frames_done: int | None = None,
    frames_total: int | None = None,
    fps: float | None = None,
    stage: str | None = None,
) -> JobControl:
    """Heartbeat of a running job (and its worker), with the latest progress.

    Returns whether a cancel was requested and whether the job still belongs to the worker.
    """
    now = utcnow()
    with reg.write() as s:
        job = _owned(s, job_id, worker_id)
        if job is None:
            return JobControl(cancel_requested=False, owned=False)
        job.heartbeat_at = now
        if frames_done is not None:
            job.frames_done = int(frames_done)
        if frames_total is not None:
            job.frames_total = int(frames_total)
        if fps is not None:
            job.fps = float(fps)
        if stage is not None:
            job.stage = stage
        s.add(job)
        w = s.get(WorkerRow, worker_id)
        if w is not None:
            w.heartbeat_at = now
            s.add(w)
        return JobControl(cancel_requested=bool(job.cancel_requested), owned=True)


def read_control(reg: Registry, job_id: int, worker_id: str) -> JobControl:
    """Read-only check of a running job's cancel flag and ownership (cheaper than a heartbeat)."""
    with reg.session() as s:
        job = _owned(s, job_id, worker_id)
        if job is None:
            return JobControl(cancel_requested=False, owned=False)
        return JobControl(cancel_requested=bool(job.cancel_requested), owned=True)


def _bump_worker(s: Session, worker_id: str, *, failed: bool) -> None:
    w = s.get(WorkerRow, worker_id)
    if w is not None:
        w.status, w.current_job_id, w.heartbeat_at, w.message = "idle", None, utcnow(), None
        if failed:
            w.jobs_failed += 1
        else:
            w.jobs_done += 1
        s.add(w)


def complete_job(
    reg: Registry,
    job_id: int,
    worker_id: str,
    *,
    artifacts: Sequence[ArtifactFile],
    quality: QualitySummary,
    engine_version: str | None = None,
    checkpoint_sha256: str | None = None,
    report: dict | None = None,
) -> JobView:
    """Register a finished job's files and quality and mark it succeeded, in one transaction.

    Raises:
        LostJob: the job no longer runs under ``worker_id`` (nothing is written).
    """
    with reg.write() as s:
        job = _owned(s, job_id, worker_id)
        if job is None:
            raise LostJob(f"job {job_id} is no longer running on worker {worker_id}")
        s.exec(delete(Artifact).where(Artifact.job_id == job.id))
        for a in artifacts:
            s.add(Artifact(job_id=job.id, format=a.format, path=str(a.path), bytes=a.bytes, sha256=a.sha256))
        s.exec(delete(Quality).where(Quality.job_id == job.id))
        s.add(
            Quality(
                job_id=job.id, video_id=job.video_id, frames=int(quality.frames),
                valid_frames=int(quality.valid_frames),
                reasons={str(k): int(v) for k, v in quality.reasons.items()},
                longest_invalid_run=int(quality.longest_invalid_run),
            )
        )
        transition(
            s, job, JobStatus.SUCCEEDED, error=None, error_code=None, stage="done",
            frames_done=int(quality.frames), frames_total=int(quality.frames),
            engine_version=engine_version, checkpoint_sha256=checkpoint_sha256, report=report,
            heartbeat_at=utcnow(),
        )
        _bump_worker(s, worker_id, failed=False)
    return get_job(reg, job_id)


def fail_job(
    reg: Registry, job_id: int, worker_id: str, *, error: str, code: str = "error"
) -> JobView | None:
    """Mark a running job failed with a readable one-line reason (None if it was taken away)."""
    with reg.write() as s:
        job = _owned(s, job_id, worker_id)
        if job is None:
            return None
        transition(s, job, JobStatus.FAILED, error=error[:2000], error_code=code, stage=None, fps=0.0)
        _bump_worker(s, worker_id, failed=True)
    return get_job(reg, job_id)


def requeue_job(
    reg: Registry, job_id: int, worker_id: str, *, reason: str, penalty: bool = False, code: str = "requeued"
) -> JobView | None:
    """Put a running job back in the queue (a worker shutting down, or a full or read-only
    disk: ``code`` ``disk_full``/``read_only``). Without ``penalty`` the attempt is not
    counted. Returns None if the job was taken away meanwhile."""
    with reg.write() as s:
        job = _owned(s, job_id, worker_id)
        if job is None:
            return None
        attempts = job.attempts if penalty else max(0, job.attempts - 1)
        transition(
            s, job, JobStatus.QUEUED, attempts=attempts, worker_id=None, heartbeat_at=None, stage=None,
            fps=0.0, error=reason[:2000], error_code=code,
        )
        w = s.get(WorkerRow, worker_id)
        if w is not None:
            w.current_job_id = None
            s.add(w)
    return get_job(reg, job_id)


def finish_cancelled(reg: Registry, job_id: int, worker_id: str) -> JobView | None:
    """Remove a stopped job's partial files, then mark it cancelled (so a reader who sees
    ``cancelled`` never sees its partial files). None if the job was taken away."""
    if read_control(reg, job_id, worker_id).owned:
        _remove_job_files(reg, job_id)
    with reg.write() as s:
        job = _owned(s, job_id, worker_id)
        if job is None:
            return None
        transition(s, job, JobStatus.CANCELLED, stage=None, fps=0.0)
        w = s.get(WorkerRow, worker_id)
        if w is not None:
            w.status, w.current_job_id = "idle", None
            s.add(w)
    return get_job(reg, job_id)


def adopt_job(
    reg: Registry, job_id: int, worker_id: str, *, dispatcher: str, device: str | None = None,
    claimed_at: datetime | None = None,
) -> JobView | None:
    """Hand a job claimed by a dispatcher (the Ray driver) to the process that runs it.

    The dispatcher claims with :func:`claim_next` under its own id and sends the job to a
    process whose id is ``f"{dispatcher}/..."``; that process adopts it before starting.
    If the job already runs under another ``f"{dispatcher}/..."`` id, that process was lost
    and Ray retried the job here: one more attempt is counted (a job that already used
    ``max_attempts`` fails as ``abandoned`` instead). The lost process no longer owns the
    job, so anything it still writes is refused (:class:`LostJob`, ``owned=False``).
    ``claimed_at`` (the claim's ``started_at``) ties the hand-over to one claim: a late Ray
    retry from an earlier claim of a job that was requeued and claimed again meanwhile
    gets None.

    Returns:
        The job, or None when it no longer runs for ``dispatcher`` (requeued by a janitor,
        cancelled or failed meanwhile) or was given up here.
    """
    now = utcnow()
    gave_up = None
    with reg.write() as s:
        job = s.get(Job, int(job_id))
        owner = (job.worker_id or "") if job is not None else ""
        if job is None or job.status != JobStatus.RUNNING.value or not (
            owner == dispatcher or owner.startswith(f"{dispatcher}/")
        ) or (claimed_at is not None and job.started_at != claimed_at):
            return None
        if owner not in (dispatcher, worker_id):
            note = f"{owner} was lost mid-job (attempt {job.attempts} of {job.max_attempts})"
            if job.attempts >= job.max_attempts:
                gave_up = abandon(s, job, note)
            else:
                job.attempts += 1
                job.error, job.error_code = f"retried: {note}", "abandoned"
        if gave_up is None:
            job.worker_id, job.device, job.heartbeat_at, job.stage, job.fps = worker_id, device, now, "starting", 0.0
            s.add(job)
            w = s.get(WorkerRow, worker_id)
            if w is not None:
                w.status, w.current_job_id, w.heartbeat_at = "busy", job.id, now
                s.add(w)
    if gave_up is not None:
        _remove_job_files(reg, job_id)
        log.warning("job %d failed: %s", job_id, gave_up)
        return None
    return get_job(reg, job_id)
