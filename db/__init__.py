"""Job registry: SQLModel tables, the database engine and the service functions (:mod:`db.service`).

``import db`` never imports torch: the dashboard uses it to queue jobs and read status.

    from db import Registry, service

    reg = Registry()                                 # data/studio.db (or $STUDIO_DB_URL)
    job = service.submit_file(reg, "clip.mp4", {"landmarks": "mtcnn"})
    service.get_job(reg, job.id).status              # JobStatus.QUEUED
"""

from __future__ import annotations

from db import service
from db.access import LOCAL, Actor, ImportPolicy, PermissionDenied
from db.models import SCHEMA_VERSION, TRANSITIONS, ErrorCode, JobStatus, WorkerStatus
from db.registry import Registry, SchemaError
from db.service import (
    JobNotFound,
    JobStateError,
    LostJob,
    build_bundle,
    cancel_job,
    count_jobs,
    delete_job,
    get_job,
    get_quality,
    import_folder,
    list_artifacts,
    list_jobs,
    list_workers,
    retry_job,
    status_counts,
    submit_file,
    submit_upload,
    transition,
)
from db.views import ArtifactView, JobView, QualityView, VideoView, WorkerView

__all__ = [
    "LOCAL",
    "SCHEMA_VERSION",
    "TRANSITIONS",
    "Actor",
    "ArtifactView",
    "ErrorCode",
    "ImportPolicy",
    "JobNotFound",
    "JobStateError",
    "JobStatus",
    "JobView",
    "LostJob",
    "PermissionDenied",
    "QualityView",
    "Registry",
    "SchemaError",
    "VideoView",
    "WorkerStatus",
    "WorkerView",
    "build_bundle",
    "cancel_job",
    "count_jobs",
    "delete_job",
    "get_job",
    "get_quality",
    "import_folder",
    "list_artifacts",
    "list_jobs",
    "list_workers",
    "retry_job",
    "service",
    "status_counts",
    "submit_file",
    "submit_upload",
    "transition",
]
