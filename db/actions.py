"""What users do to jobs: cancel, retry and delete, and the removal of a job's files.

Each action checks the actor's role (:mod:`db.access`; their own jobs as ``user``, anyone's
as ``admin``), changes the job through :func:`db.states.transition` in one write
transaction, and only then touches files. Bundles of results are built by
:func:`db.bundle.build_bundle`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import delete, func
from sqlmodel import select

from db import storage
from db.access import Actor
from db.intake import normalize_settings, same_settings
from db.models import Artifact, Job, JobStatus, Quality, utcnow
from db.queries import get_job
from db.registry import Registry
from db.states import FilesNotRemoved, JobStateError, load_job, transition
from db.views import JobView
from engine.config import EngineConfig
from engine.errors import short_path

log = logging.getLogger(__name__)


def remove_job_files(reg: Registry, job_id: int, *, results: bool = True, state: bool = True) -> list[Path]:
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
        job, _ = load_job(s, job_id)
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
        remove_job_files(reg, job_id)  # state left by an earlier, interrupted attempt
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
        job, _ = load_job(s, job_id)
        actor.require("retry_own" if actor.owns(job.submitted_by) else "retry_any")
        status = JobStatus(job.status)
        if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise JobStateError(
                f"job {job_id} is {status.value}: only failed or cancelled jobs can be retried"
            )
        changed = new is not None and not same_settings(new, job.settings)
        extra = {"settings": new} if changed else {}
        transition(
            s, job, JobStatus.QUEUED, attempts=0, error=None, error_code=None, cancel_requested=False,
            cancel_requested_at=None,
            worker_id=None, heartbeat_at=None, started_at=None, frames_done=0, fps=0.0, stage=None,
            **extra,
        )
    remove_job_files(reg, job_id, state=changed)
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
            _, video = load_job(s, job_id)
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
        job, video = load_job(s, job_id)
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
        left = remove_job_files(reg, job_id)
        if orphan_upload is not None and reg.uploads_dir in orphan_upload.parents:
            left += storage.remove_tree(orphan_upload)
        if left:
            names = ", ".join(short_path(p) for p in left[:3]) + (" …" if len(left) > 3 else "")
            raise FilesNotRemoved(
                f"job {job_id} was deleted, but {len(left)} of its files could not be removed "
                f"({names}): remove them by hand"
            )
    log.info("deleted job %d", job_id)

