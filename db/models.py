"""Tables of the job registry (SQLModel) and the job status machine.

All times are timezone-aware UTC ``datetime``s. SQLite has no time zone type, so
:class:`UTCDateTime` stores naive UTC there (fixed-width text, so ``<`` in SQL compares
correctly) and re-attaches UTC on the way out; PostgreSQL gets ``timestamptz``.

Status is stored as plain text (``JobStatus.value``) and only changes through
:func:`db.states.transition`, which checks :data:`TRANSITIONS`. Worker statuses
(:class:`WorkerStatus`) and job error codes (:class:`ErrorCode`) are stored as plain text
too: the enums name every value the project writes, so existing databases read as before.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum

from sqlalchemy import JSON, Column, DateTime, Index, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

#: Bump when a table changes; :mod:`db.registry` refuses (or migrates) other versions.
#: v2: ``jobs.submitted_by``, ``jobs.cancel_requested_at`` and ``workers.message``.
SCHEMA_VERSION = 2

#: How many times a job may be started before an abandoned run fails it for good.
DEFAULT_MAX_ATTEMPTS = 3


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A DateTime column that only accepts and only returns timezone-aware UTC datetimes."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: registry times must be timezone-aware UTC")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class JobStatus(str, Enum):
    """Lifecycle of a job: ``queued → running → succeeded | failed | cancelled``.

    A running job goes back to ``queued`` when its worker is lost (stale heartbeat) or
    shuts down (SIGTERM); ``failed`` and ``cancelled`` jobs go back to ``queued`` on retry.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


#: Allowed status changes: from → set of to.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
}


class WorkerStatus(str, Enum):
    """What a worker process is doing, as stored in ``workers.status``.

    ``lost`` is never stored: :class:`~db.views.WorkerView` shows it for a worker that has
    not sent a heartbeat within ``alive_within_s`` and did not stop cleanly.
    """

    IDLE = "idle"  #: waiting for a job
    BUSY = "busy"  #: running a job (``current_job_id``)
    PAUSED = "paused"  #: waiting for a full or read-only disk to be fixed (``message`` says which)
    STOPPED = "stopped"  #: exited cleanly
    LOST = "lost"  #: (views only) silent for too long


class ErrorCode(str, Enum):
    """Every short code stored in ``jobs.error_code``: why a job failed, or why it went back
    to the queue.

    The engine's codes are the ``code`` attributes of :class:`engine.errors.StudioError` and
    its subclasses (a test checks each one is a member here); :mod:`db.faults` sorts database
    and disk faults into the ``db_*``/``disk_*`` codes; the rest are the registry's and the
    worker's own (``abandoned``, ``requeued``, ``internal``).
    """

    # the engine (engine.errors and the modules that define their own StudioError)
    ERROR = "error"  #: a StudioError without a more precise code
    INPUT = "input"
    DECODE = "decode"
    NO_FACE = "no_face"
    WEIGHTS = "weights"
    CHECKPOINT = "checkpoint"
    WEIGHTS_MISSING = "weights_missing"
    SHAPE = "shape"
    OUTPUT = "output"
    CANCELLED = "cancelled"
    TOO_LARGE = "too_large"
    TOO_SMALL = "too_small"
    DISK_FULL = "disk_full"
    READ_ONLY = "read_only"
    ALIGN = "align"
    RENDERER = "renderer"
    NVDEC = "nvdec"  #: decoder nvdec asked for, but PyNvVideoCodec or a CUDA GPU is missing (engine.stages.nvdec)
    ENGINE_PROCESS = "engine_process"  #: an input run in an engine child process that died (engine.procs)
    # faults of the database and its disk (db.faults)
    DB_BUSY = "db_busy"
    DISK_IO = "disk_io"
    DB_UNAVAILABLE = "db_unavailable"
    # the registry and the worker
    ABANDONED = "abandoned"  #: the job's worker was lost (requeued), or every attempt was (failed)
    REQUEUED = "requeued"  #: the worker shut down and gave the job back
    INTERNAL = "internal"  #: an unexpected exception in the worker (a bug)


class Meta(SQLModel, table=True):
    """Key/value facts about the database itself (``schema_version``)."""

    __tablename__ = "meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(sa_column=Column(Text, nullable=False))


class Video(SQLModel, table=True):
    """One input file, identified by the SHA-256 of its bytes (stored once per content).

    ``duration`` is seconds, ``fps`` frames/s, ``width``/``height`` display pixels; the
    probe fields are NULL when the file could not be probed (the job then fails with
    the engine's reason).
    """

    __tablename__ = "videos"

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(max_length=64, unique=True, index=True)
    original_name: str
    stored_path: str = Field(sa_column=Column(Text, nullable=False))
    in_place: bool = False  #: registered where it lies (folder import), not copied into uploads/
    size_bytes: int = 0
    duration: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    frame_count: int | None = None
    codec: str | None = None
    probe_error: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class Job(SQLModel, table=True):
    """One extraction of one video with one set of settings (``EngineConfig.to_dict()``).

    ``attempts`` counts the times a worker started the job; ``frames_done``/``frames_total``
    and ``fps`` (frames/s) are the live progress; ``heartbeat_at`` is refreshed by the
    running worker every few seconds. ``cancel_requested_at`` is when a user asked to cancel
    (``finished_at`` of a cancelled job is when its worker had stopped and cleaned up: the
    two give the cancel latency, see ``bench/bench_cancel.py``).
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    video_id: int = Field(foreign_key="videos.id", index=True)
    name: str = ""  #: the name the input was submitted under (one video may be submitted under several)
    #: who queued it: a signed-in dashboard user, or "local" (the shell, a dashboard without sign-in);
    #: None for jobs queued before schema v2
    submitted_by: str | None = Field(default=None, max_length=128)
    settings: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default=JobStatus.QUEUED.value, max_length=16)
    stage: str | None = None
    frames_done: int = 0
    frames_total: int = 0
    fps: float = 0.0
    attempts: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    worker_id: str | None = Field(default=None, index=True)
    device: str | None = None
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    error: str | None = Field(default=None, sa_column=Column(Text))
    error_code: str | None = None  #: an :class:`ErrorCode` value
    cancel_requested: bool = False
    cancel_requested_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    engine_version: str | None = None
    checkpoint_sha256: str | None = None
    #: JSON summary of the engine's RunReport (seconds, fps, effective config, media info).
    report: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class Artifact(SQLModel, table=True):
    """A complete result file of a job (registered only after it was written atomically)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "format"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    format: str = Field(max_length=32)
    path: str = Field(sa_column=Column(Text, nullable=False))
    bytes: int
    sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class Quality(SQLModel, table=True):
    """Per-video quality summary of a finished job: how many frames had a usable face, and why not."""

    __tablename__ = "quality"

    job_id: int = Field(foreign_key="jobs.id", primary_key=True)
    video_id: int = Field(foreign_key="videos.id", index=True)
    frames: int
    valid_frames: int
    reasons: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    longest_invalid_run: int = 0


class WorkerRow(SQLModel, table=True):
    """A worker process: who it is, where it runs, what it is doing, when it was last seen.

    ``status`` is ``paused`` while the worker waits for a full or read-only disk to be fixed;
    ``message`` then says why (schema v2).
    """

    __tablename__ = "workers"

    worker_id: str = Field(primary_key=True, max_length=128)
    hostname: str
    pid: int
    device: str
    device_name: str | None = None
    status: str = WorkerStatus.IDLE.value  #: a :class:`WorkerStatus` value (never ``lost``)
    #: Why the worker is paused (a full or read-only disk), and until when; None otherwise.
    message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    current_job_id: int | None = None
    jobs_done: int = 0
    jobs_failed: int = 0
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    heartbeat_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    stopped_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
