"""The job status machine: the registry's errors, and the one way a job changes status.

Every status change goes through :func:`transition`, inside :meth:`Registry.write
<db.registry.Registry.write>` (``BEGIN IMMEDIATE`` on SQLite), which checks the table
:data:`db.models.TRANSITIONS`. :func:`load_job` reads a job with its video, or raises
:class:`JobNotFound`.
"""

from __future__ import annotations

from enum import Enum

from sqlmodel import Session, select

from db.models import TRANSITIONS, Job, JobStatus, Video, utcnow
from engine.errors import ReadOnlyError


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


def transition(s: Session, job: Job, to: JobStatus, **fields) -> Job:
    """Move ``job`` to status ``to`` and set ``fields``, checking :data:`TRANSITIONS`.

    Must run inside :meth:`Registry.write` (the row was read under the write lock).
    Entering a finished status stamps ``finished_at``; leaving one clears it. An enum in
    ``fields`` (an :class:`~db.models.ErrorCode`) is stored as its value.

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
        setattr(job, name, value.value if isinstance(value, Enum) else value)
    s.add(job)
    return job


def load_job(s: Session, job_id: int) -> tuple[Job, Video]:
    """The job row with this id and its video row, read in session ``s``. Raises :class:`JobNotFound`."""
    q = select(Job, Video).join(Video, Job.video_id == Video.id).where(Job.id == int(job_id))
    row = s.exec(q).first()
    if row is None:
        raise JobNotFound(f"no job with id {job_id}")
    return row

