"""Frozen snapshots of registry rows handed to callers (CLI, dashboard, worker).

Views never hold a database session: they can be cached, compared and passed between
threads. Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from db.models import JobStatus


@dataclass(frozen=True)
class VideoView:
    """An input file. ``size`` is bytes, ``duration`` seconds, ``fps`` frames/s; probe
    fields are None when the file could not be probed."""

    id: int
    sha256: str
    original_name: str
    path: Path
    in_place: bool
    size: int
    duration: float | None
    fps: float | None
    width: int | None
    height: int | None
    frame_count: int | None
    codec: str | None
    probe_error: str | None


@dataclass(frozen=True)
class JobView:
    """A job with its video. ``fps`` is the processing speed (frames/s); ``eta_s`` the
    estimated seconds left (None unless running with a known speed).

    ``error`` is the one-line reason of a failed job. On a queued job it tells why an
    earlier attempt ended (``error_code`` ``"abandoned"``: its worker was lost;
    ``"requeued"``: its worker shut down); it is cleared when the job succeeds.
    """

    id: int
    video_id: int
    name: str
    input_path: Path
    status: JobStatus
    stage: str | None
    frames_done: int
    frames_total: int
    fps: float
    eta_s: float | None
    attempts: int
    max_attempts: int
    error: str | None
    error_code: str | None
    worker_id: str | None
    device: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    cancel_requested: bool
    settings: dict
    result_dir: Path
    video: VideoView
    engine_version: str | None = None
    checkpoint_sha256: str | None = None
    submitted_by: str | None = None  #: who queued it (a dashboard user, or "local"; None: before schema v2)
    cancel_requested_at: datetime | None = None

    @property
    def progress(self) -> float:
        """Fraction of frames done in [0, 1] (0 while the total is unknown)."""
        if self.status == JobStatus.SUCCEEDED:
            return 1.0
        if self.frames_total <= 0:
            return 0.0
        return min(1.0, self.frames_done / self.frames_total)


@dataclass(frozen=True)
class ArtifactView:
    """A complete result file: ``bytes`` is its size, ``sha256`` its hex digest."""

    job_id: int
    format: str
    path: Path
    bytes: int
    sha256: str
    created_at: datetime


@dataclass(frozen=True)
class QualityView:
    """How many frames of a finished job had a usable face.

    ``reasons`` maps an invalid-frame reason (``"no_face"``...) to its frame count;
    ``longest_invalid_run`` is the longest stretch of consecutive invalid frames.
    ``flags`` maps each quality flag (:data:`engine.quality.FLAGS`) to its frame count and
    ``jitter`` / ``jitter_raw`` are the jitter metrics after / before smoothing
    (:func:`engine.quality.video_metrics`); empty for jobs run before they existed.
    """

    job_id: int
    video_id: int
    frames: int
    valid_frames: int
    valid_ratio: float
    reasons: dict[str, int]
    longest_invalid_run: int
    flags: dict[str, int] = field(default_factory=dict)
    jitter: dict[str, float | None] = field(default_factory=dict)
    jitter_raw: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerView:
    """A worker process; ``alive`` means its heartbeat is recent and it has not stopped.
    ``status`` is a :class:`~db.models.WorkerStatus` value: ``idle``, ``busy``, ``paused``
    (see ``message``), ``stopped`` or ``lost``."""

    worker_id: str
    hostname: str
    pid: int
    device: str
    device_name: str | None
    status: str
    current_job_id: int | None
    jobs_done: int
    jobs_failed: int
    heartbeat_at: datetime
    started_at: datetime
    stopped_at: datetime | None
    alive: bool
    #: Why the worker is ``paused`` (a full or read-only disk) and when it tries again; None otherwise.
    message: str | None = None


@dataclass(frozen=True)
class WorkerLoad:
    """What a live worker is doing: its jobs (in flight and claimed ahead, stage ``waiting``;
    oldest claim first) and its speed in frames/s (see :func:`db.queries.throughput`)."""

    worker: WorkerView
    jobs: tuple[JobView, ...]
    fps: float


@dataclass(frozen=True)
class Throughput:
    """The live workers' loads and the queue's outlook: ``frames_left`` of queued and running jobs
    (a job that never ran counts its video's probed frame count), ``fps`` the workers' summed
    frames/s, ``eta_s`` = ``frames_left / fps`` seconds (None while no worker reports a speed)."""

    workers: tuple[WorkerLoad, ...]
    frames_left: int
    fps: float
    eta_s: float | None


@dataclass(frozen=True)
class ArtifactFile:
    """A result file a worker is about to register (already complete on disk)."""

    format: str
    path: Path
    bytes: int
    sha256: str


@dataclass(frozen=True)
class QualitySummary:
    """What a worker records about a finished run (see :class:`QualityView`)."""

    frames: int
    valid_frames: int
    reasons: dict[str, int]
    longest_invalid_run: int


@dataclass(frozen=True)
class JobControl:
    """What a running job's worker learns at each heartbeat.

    ``owned`` is False when the job was taken from this worker (the janitor judged it
    lost, or it was deleted): the worker must stop without touching the job again.
    """

    cancel_requested: bool
    owned: bool


@dataclass(frozen=True)
class Adoption:
    """A job handed by a dispatcher (the Ray driver) to the process that runs it
    (:func:`db.lease.adopt_job`).

    Attributes:
        job: the job, now running under the adopting process's worker id.
        retried_from: when the job was still held by another process of the dispatcher, that
            process's worker id: it was lost mid-job and Ray retried the job here (one more
            attempt was counted). None for a first hand-over or a re-adoption by the same process.
        note: the retry in words (``"<id> was lost mid-job (attempt 1 of 3)"``); None unless retried.
    """

    job: JobView
    retried_from: str | None = None
    note: str | None = None

    @property
    def retried(self) -> bool:
        """Whether this hand-over is a Ray retry of a lost process's attempt."""
        return self.retried_from is not None
