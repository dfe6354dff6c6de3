"""Every operation on the job registry, for the CLI, the dashboard and the workers, in one place.

A facade: the functions live in the modules of :mod:`db` named after their job, and are
re-exported here so that ``from db import service; service.submit_file(...)`` keeps working.
Each takes the :class:`~db.registry.Registry` first, runs in one transaction and returns
frozen views (:mod:`db.views`), never live ORM rows.

============================  ==========================================================
module                        what it holds
============================  ==========================================================
:mod:`db.states`              the status machine: :func:`transition` (the only way a job
                              changes status) and the errors :class:`JobNotFound`,
                              :class:`JobStateError`, :class:`LostJob`, :class:`FilesNotRemoved`
:mod:`db.mappers`             rows → views (internal)
:mod:`db.intake`              :func:`submit_file`, :func:`submit_upload`, :func:`import_folder`,
                              :func:`check_submission`, :func:`normalize_settings`
:mod:`db.queries`             :func:`list_jobs`, :func:`count_jobs`, :func:`status_counts`,
                              :func:`get_job`, :func:`list_artifacts`, :func:`artifacts_of`,
                              :func:`get_quality`, :func:`list_workers`, :func:`duplicates_of`,
                              :func:`throughput`
:mod:`db.actions`             :func:`cancel_job`, :func:`retry_job`, :func:`delete_job`
:mod:`db.bundle`              :func:`build_bundle` (and the checked reads of result files)
:mod:`db.lease`               the worker side: :func:`register_worker`, :func:`worker_heartbeat`,
                              :func:`stop_worker`, :func:`requeue_stale`, :func:`peek_next`,
                              :func:`claim_next`, :func:`claim_job`,
                              :func:`report_progress`, :func:`read_control`,
                              :func:`complete_job`, :func:`fail_job`, :func:`requeue_job`,
                              :func:`finish_cancelled`, :func:`adopt_job`
============================  ==========================================================

New code inside :mod:`db` imports from those modules directly; callers outside it may use
either.
"""

from __future__ import annotations

from db.actions import cancel_job, delete_job, retry_job
from db.bundle import build_bundle
from db.intake import check_submission, import_folder, normalize_settings, submit_file, submit_upload
from db.lease import (
    CLAIM_WINDOW,
    StaleAction,
    abandon,
    adopt_job,
    claim_job,
    claim_next,
    complete_job,
    device_accepts,
    fail_job,
    finish_cancelled,
    give_up_message,
    peek_next,
    read_control,
    register_worker,
    report_progress,
    requeue_job,
    requeue_stale,
    stop_worker,
    worker_heartbeat,
)
from db.queries import (
    artifacts_of,
    count_jobs,
    duplicates_of,
    get_job,
    get_quality,
    list_artifacts,
    list_jobs,
    list_workers,
    status_counts,
    throughput,
)
from db.states import FilesNotRemoved, JobNotFound, JobStateError, LostJob, transition
from db.views import Adoption

__all__ = [
    "CLAIM_WINDOW",
    "Adoption",
    "FilesNotRemoved",
    "JobNotFound",
    "JobStateError",
    "LostJob",
    "StaleAction",
    "abandon",
    "adopt_job",
    "artifacts_of",
    "build_bundle",
    "cancel_job",
    "check_submission",
    "claim_job",
    "claim_next",
    "complete_job",
    "count_jobs",
    "delete_job",
    "device_accepts",
    "duplicates_of",
    "fail_job",
    "finish_cancelled",
    "get_job",
    "get_quality",
    "give_up_message",
    "import_folder",
    "list_artifacts",
    "list_jobs",
    "list_workers",
    "normalize_settings",
    "peek_next",
    "read_control",
    "register_worker",
    "report_progress",
    "requeue_job",
    "requeue_stale",
    "retry_job",
    "status_counts",
    "stop_worker",
    "submit_file",
    "submit_upload",
    "throughput",
    "transition",
    "worker_heartbeat",
]
