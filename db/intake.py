"""Intake: queueing jobs for files on this machine, uploads and whole folders.

A submission is checked against the engine's own input rules first (:func:`check_submission`:
suffix, regular file, :mod:`engine.limits`), its settings are validated
(:func:`normalize_settings`), and its bytes are stored once per content (``uploads/`` by
SHA-256, or registered in place for a folder import); then one ``queued`` job is created.
Every function checks the actor's role (:mod:`db.access`) before anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePath
from typing import BinaryIO

from sqlmodel import select

from db import storage
from db.access import LOCAL, Actor
from db.models import Job, Video
from db.queries import get_job
from db.registry import Registry
from db.views import JobView
from engine.checks import regular_file_problem
from engine.config import EngineConfig
from engine.errors import InputError

log = logging.getLogger(__name__)


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


def same_settings(a: dict | None, b: dict | None) -> bool:
    """Whether two stored settings dicts mean the same run: compared after
    :func:`normalize_settings`, so a row written before a setting existed (no ``mode`` key,
    say) equals one that spells out that setting's default. Invalid settings compare as stored.

    >>> same_settings({"landmarks": "mtcnn"}, {"landmarks": "mtcnn", "mode": "exact", "detect_every": 8})
    True
    """
    try:
        return normalize_settings(dict(a or {})) == normalize_settings(dict(b or {}))
    except (ValueError, TypeError):
        return (a or {}) == (b or {})


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
