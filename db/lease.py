"""The worker lease protocol: how workers register, claim jobs, keep them and give them back.

A worker registers (:func:`register_worker`), then loops: the janitor (:func:`requeue_stale`)
requeues or fails jobs whose worker went silent, :func:`claim_next` takes the oldest queued
job its device may run (:func:`device_accepts`), and while the job runs
:func:`report_progress` is its heartbeat and :func:`read_control` its cancel check. Every
update checks that the job still runs under the worker's id, so a worker that lost its job
cannot write to it (:class:`~db.states.LostJob`, ``owned=False``). A job ends with
:func:`complete_job`, :func:`fail_job`, :func:`requeue_job` or :func:`finish_cancelled`; a
Ray driver hands its claims to the processes that run them with :func:`adopt_job`.
Worker statuses are :class:`~db.models.WorkerStatus` values, job error codes
:class:`~db.models.ErrorCode` values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_
from sqlmodel import Session, select

from db.actions import remove_job_files
from db.mappers import worker_view
from db.models import Artifact, ErrorCode, Job, JobStatus, Quality, WorkerRow, WorkerStatus, utcnow
from db.queries import get_job
from db.registry import Registry
from db.states import LostJob, transition
from db.views import Adoption, ArtifactFile, JobControl, JobView, QualitySummary, WorkerView

log = logging.getLogger(__name__)


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
        w.status, w.current_job_id, w.message = WorkerStatus.IDLE.value, None, None
        w.started_at, w.heartbeat_at, w.stopped_at = now, now, None
        s.add(w)
        s.flush()
        return worker_view(w, now, float("inf"))


def worker_heartbeat(
    reg: Registry, worker_id: str, *, status: WorkerStatus | str | None = None, current_job_id: int | None = None,
    message: str | None = None,
) -> None:
    """Refresh a worker's heartbeat (and optionally its status, current job and message:
    a new status replaces the message, e.g. ``paused`` with why, ``idle`` with None).

    Raises:
        ValueError: ``status`` is not a :class:`WorkerStatus` value.
    """
    with reg.write() as s:
        w = s.get(WorkerRow, worker_id)
        if w is None:
            return
        w.heartbeat_at = utcnow()
        if status is not None:
            w.status, w.current_job_id, w.message = WorkerStatus(status).value, current_job_id, message
        s.add(w)


def stop_worker(reg: Registry, worker_id: str) -> None:
    """Mark a worker as cleanly stopped."""
    with reg.write() as s:
        w = s.get(WorkerRow, worker_id)
        if w is not None:
            w.status, w.current_job_id, w.stopped_at = WorkerStatus.STOPPED.value, None, utcnow()
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
                    s, job, JobStatus.QUEUED, error=note, error_code=ErrorCode.ABANDONED, worker_id=None,
                    heartbeat_at=None, stage=None, fps=0.0,
                )
                actions.append(StaleAction(job.id, JobStatus.QUEUED, note))
        # Forget workers that have been silent for a day.
        s.exec(delete(WorkerRow).where(WorkerRow.heartbeat_at < now - timedelta(days=1)))
    for a in actions:
        if a.status == JobStatus.CANCELLED:
            remove_job_files(reg, a.job_id)
        elif a.status == JobStatus.FAILED:
            remove_job_files(reg, a.job_id, state=True)
        log.warning("job %d %s: %s", a.job_id, "requeued" if a.status == JobStatus.QUEUED else a.status.value,
                    a.message)
    return actions


def give_up_message(attempts: int, last: str) -> str:
    """The error of a job that used all its attempts (worker lost each time)."""
    return f"gave up after {attempts} attempts; last: {last}"


def abandon(s: Session, job: Job, note: str) -> str:
    """Fail ``job``, whose attempts are used up, with code ``abandoned``; returns the message."""
    msg = give_up_message(job.attempts, note)
    transition(s, job, JobStatus.FAILED, error=msg, error_code=ErrorCode.ABANDONED, stage=None, fps=0.0)
    return msg


#: Stage of a job its worker claimed ahead, waiting for the engine (it is ``running`` and leased).
WAITING_STAGE = "waiting"

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


def _queued(limit: int = CLAIM_WINDOW):
    """The oldest queued jobs first: the order claims take them in."""
    return (select(Job).where(Job.status == JobStatus.QUEUED.value)
            .order_by(Job.created_at.asc(), Job.id.asc()).limit(limit))


def peek_next(reg: Registry, *, device: str | None = None) -> JobView | None:
    """The job :func:`claim_next` would take now, without taking it (None when there is none);
    another worker may claim it first. A worker reads its settings to load their models before
    it claims anything."""
    with reg.session() as s:
        job = next((j for j in s.exec(_queued()) if device_accepts((j.settings or {}).get("device"), device)), None)
        job_id = None if job is None else job.id
    return None if job_id is None else get_job(reg, job_id)


def claim_next(
    reg: Registry, worker_id: str, *, device: str | None = None, ahead: bool = False, alive_within_s: float = 30.0,
) -> JobView | None:
    """Atomically take the oldest queued job that ``device`` may run (None when there is none).

    Jobs whose settings ask for another device (``settings["device"]``) are left for a worker
    that has it (see :func:`device_accepts`).

    ``ahead``: the worker already holds a job, so this one would wait on it or share its engine.
    Such a claim is made only while more jobs it may run are queued (among the oldest
    :data:`CLAIM_WINDOW`) than there are other live workers that may run the oldest of them
    (``idle`` or ``busy``, heard from within ``alive_within_s`` seconds): the queue's last jobs
    then go one each to workers that have none, instead of queueing behind another worker's.

    SQLite: the select and update run under one ``BEGIN IMMEDIATE`` write lock;
    PostgreSQL: the row is locked with ``FOR UPDATE SKIP LOCKED``. Either way two
    workers can never claim the same job.
    """
    now = utcnow()
    q = _queued()
    if not reg.is_sqlite:
        q = q.with_for_update(skip_locked=True)
    with reg.write() as s:
        jobs = [j for j in s.exec(q) if device_accepts((j.settings or {}).get("device"), device)]
        if not jobs:
            return None
        if ahead and len(jobs) <= _other_live_workers(s, worker_id, jobs[0], now, alive_within_s):
            return None  # the queue's last jobs: left to workers that have none
        job = jobs[0]
        _start(s, job, worker_id, device, now)
        w = s.get(WorkerRow, worker_id)
        if w is not None:
            _busy(w, job.id, now)
            s.add(w)
        job_id = job.id
    return get_job(reg, job_id)


def _other_live_workers(s: Session, worker_id: str, job: Job, now: datetime, alive_within_s: float) -> int:
    """Workers other than ``worker_id`` that could claim ``job`` at ``now``: ``idle`` or ``busy`` and
    alive as :func:`~db.mappers.worker_view` tells it (not stopped, heard from within
    ``alive_within_s`` seconds), on a device the job accepts."""
    wanted = (job.settings or {}).get("device")
    rows = s.exec(select(WorkerRow).where(WorkerRow.worker_id != worker_id))
    views = (worker_view(w, now, alive_within_s) for w in rows)
    return sum(v.alive and v.status in (WorkerStatus.IDLE.value, WorkerStatus.BUSY.value)
               and device_accepts(wanted, v.device) for v in views)


def claim_job(reg: Registry, job_id: int, worker_id: str, *, device: str | None = None) -> JobView | None:
    """Take one given queued job (not the oldest) for ``worker_id``; None when it is not queued.

    For producers that made the job themselves and must not take anyone else's (the demo
    command, :mod:`dashboard.demo`).
    """
    with reg.write() as s:
        job = s.get(Job, int(job_id))
        if job is None or job.status != JobStatus.QUEUED.value:
            return None
        _start(s, job, worker_id, device, utcnow())
    return get_job(reg, job_id)


def _start(s: Session, job: Job, worker_id: str, device: str | None, now: datetime) -> None:
    """queued → running for ``worker_id`` (one more attempt, fresh heartbeat and progress)."""
    transition(
        s, job, JobStatus.RUNNING, worker_id=worker_id, device=device, attempts=job.attempts + 1,
        started_at=now, heartbeat_at=now, fps=0.0, stage="starting", cancel_requested=False,
        cancel_requested_at=None,
    )


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


def _busy(w: WorkerRow, job_id: int, now: datetime) -> None:
    """Worker ``w`` took job ``job_id``: ``busy`` with it (a new status: its message goes)."""
    w.status, w.current_job_id, w.heartbeat_at, w.message = WorkerStatus.BUSY.value, job_id, now, None


def _after_job(s: Session, w: WorkerRow) -> None:
    """A job of worker ``w`` ended or went back: ``busy`` with its oldest other running job (a worker
    may hold several: in flight and claimed ahead), else ``idle`` (a ``paused`` worker stays paused)."""
    other = s.exec(
        select(Job.id).where(Job.worker_id == w.worker_id, Job.status == JobStatus.RUNNING.value)
        .order_by(Job.started_at.asc(), Job.id.asc()).limit(1)
    ).first()
    w.current_job_id = other
    if w.status != WorkerStatus.PAUSED.value:
        w.status = (WorkerStatus.BUSY if other is not None else WorkerStatus.IDLE).value
        w.message = None


def _bump_worker(s: Session, worker_id: str, *, failed: bool) -> None:
    w = s.get(WorkerRow, worker_id)
    if w is not None:
        w.heartbeat_at = utcnow()
        _after_job(s, w)
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
    reg: Registry, job_id: int, worker_id: str, *, error: str, code: ErrorCode | str = ErrorCode.ERROR
) -> JobView | None:
    """Mark a running job failed with a readable one-line reason and its :class:`ErrorCode` (an
    engine error's ``code`` string is stored as it is). None if the job was taken away."""
    with reg.write() as s:
        job = _owned(s, job_id, worker_id)
        if job is None:
            return None
        transition(s, job, JobStatus.FAILED, error=error[:2000], error_code=code, stage=None, fps=0.0)
        _bump_worker(s, worker_id, failed=True)
    return get_job(reg, job_id)


def requeue_job(
    reg: Registry, job_id: int, worker_id: str, *, reason: str, penalty: bool = False,
    code: ErrorCode | str = ErrorCode.REQUEUED,
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
            _after_job(s, w)
            s.add(w)
    return get_job(reg, job_id)


def finish_cancelled(reg: Registry, job_id: int, worker_id: str) -> JobView | None:
    """Remove a stopped job's partial files, then mark it cancelled (so a reader who sees
    ``cancelled`` never sees its partial files). None if the job was taken away."""
    if read_control(reg, job_id, worker_id).owned:
        remove_job_files(reg, job_id)
    with reg.write() as s:
        job = _owned(s, job_id, worker_id)
        if job is None:
            return None
        transition(s, job, JobStatus.CANCELLED, stage=None, fps=0.0)
        w = s.get(WorkerRow, worker_id)
        if w is not None:
            _after_job(s, w)
            s.add(w)
    return get_job(reg, job_id)


def adopt_job(
    reg: Registry, job_id: int, worker_id: str, *, dispatcher: str, device: str | None = None,
    claimed_at: datetime | None = None,
) -> Adoption | None:
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
        The :class:`~db.views.Adoption`: the job, and whether this hand-over is a Ray retry
        (``retried_from``: the lost process; ``note``: in words, also kept in the job's
        ``error`` as ``"retried: <note>"`` for the dashboard). None when the job no longer
        runs for ``dispatcher`` (requeued by a janitor, cancelled or failed meanwhile) or was
        given up here.
    """
    now = utcnow()
    gave_up = None
    retried_from = note = None
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
                job.error, job.error_code = f"retried: {note}", ErrorCode.ABANDONED.value
                retried_from = owner
        if gave_up is None:
            job.worker_id, job.device, job.heartbeat_at, job.stage, job.fps = worker_id, device, now, "starting", 0.0
            s.add(job)
            w = s.get(WorkerRow, worker_id)
            if w is not None:
                _busy(w, job.id, now)
                s.add(w)
    if gave_up is not None:
        remove_job_files(reg, job_id)
        log.warning("job %d failed: %s", job_id, gave_up)
        return None
    return Adoption(get_job(reg, job_id), retried_from=retried_from, note=note if retried_from else None)
