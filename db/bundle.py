"""Checked results: every result file is verified against its registered SHA-256 before it is served.

A job's result files are registered with their size and SHA-256 when the job succeeds
(:func:`db.lease.complete_job`). Nothing is handed out without checking them again:

* :func:`check_artifact` / :func:`check_artifacts` say, per file, whether it still holds
  the registered bytes, and if not, in words (``results/12/clip.npz changed on disk since
  the job finished (SHA-256 mismatch); re-run the job``);
* :func:`read_checked` returns a file's bytes only when those very bytes hash to the
  registered digest (single-file downloads);
* :func:`build_bundle` zips every result file, ``manifest.json`` and ``README.txt``, hashing
  each file while it is copied into the zip, so the zip holds exactly the verified bytes. It
  is built under a temporary name and renamed to ``results/<job id>/bundle-<job id>.zip``.
  The zip's comment holds a key of everything it was built from (files, digests, manifest);
  a cached zip is served again only when that key still matches and each entry still
  hashes to its registered digest, else it is rebuilt.

Any problem raises :class:`ResultFileError` with every bad file named: a changed or missing
result is never served.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from db import storage
from db.models import Job, JobStatus, utcnow
from db.queries import get_job, get_quality, list_artifacts
from db.registry import Registry
from db.states import JobStateError
from db.views import ArtifactView
from engine.checks import regular_file_problem
from engine.formats import readme_file_list

README = """\
3DMM Studio results
===================

Each file in this bundle holds one row per video frame, in decoding order. Frames
where no face was found keep their row: the "valid" flag (npz/csv) says which rows
come from a detected face.

The 257 coefficients of a frame
-------------------------------
Columns, 0-based and end-exclusive, as in Deep3DFaceRecon_pytorch:

    0:80     id      identity (face shape) weights of the Basel Face Model PCA basis
    80:144   exp     expression weights (64 components)
    144:224  tex     texture (albedo) weights
    224:227  angle   head rotation in radians: pitch (x), yaw (y), roll (z)
    227:254  gamma   scene lighting: 27 spherical-harmonics coefficients, 9 per colour
                     channel, laid out R[0:9], G[9:18], B[18:27]
    254:257  trans   head translation (x, y, z) in the face model's units

Alignment of each frame (transform_params)
------------------------------------------
Five numbers per frame, [w0, h0, s, tx, ty]:
    w0, h0   width and height of the original frame in pixels
    s        scale applied to the whole frame before the 224x224 crop was cut
    tx, ty   where the face template's origin lands in the original frame, in pixels;
             tx counts from the left edge, ty counts from the BOTTOM edge (y up), so in
             ordinary image rows (y down) that point is at row h0 - 1 - ty.
The crop's top-left corner in the scaled frame is roughly
(w0*s/2 - 112 + (tx - w0/2)*s, h0*s/2 - 112 + (h0/2 - ty)*s).

Files
-----
""" + readme_file_list() + """

manifest.json lists the input (name, SHA-256), the frame count and rate, the settings,
the engine version, the checkpoint used (file name and SHA-256) and the size and SHA-256 of
every file in this bundle. Its "quality" part counts the frames carrying each quality flag
(with what the flag means), the jitter of the coefficients (after smoothing, and before it
as "jitter_raw" when smoothing was on) and the smoothing settings. The npz holds the
per-frame flags ("flags" bitmask, bit i = "flag_names"[i]); the CSV a "flags" column.
"""


class ResultFileError(RuntimeError):
    """A registered result file is missing or no longer holds the bytes registered for it."""


@dataclass(frozen=True)
class FileCheck:
    """Whether one result file still holds its registered bytes.

    Attributes:
        artifact: the registered file.
        shown: its path relative to the data folder (``results/12/clip.npz``).
        problem: None when the file matches; else one line saying what is wrong.
    """

    artifact: ArtifactView
    shown: str
    problem: str | None


def _shown(reg: Registry, path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(reg.data_dir).as_posix()
    except ValueError:
        return Path(path).name


def _problem(reg: Registry, a: ArtifactView, shown: str) -> str | None:
    """Why ``a`` cannot be served as is, without reading its bytes (None: go on and hash it)."""
    path = Path(a.path)
    if not path.resolve().is_relative_to(reg.results_dir.resolve()):
        return f"{shown} is not inside the results folder, so it is not served; re-run the job"
    problem = regular_file_problem(path)
    if problem == "no such file":
        return f"{shown} is missing from disk (deleted after the job finished); re-run the job"
    if problem:
        return f"{shown} cannot be read ({problem}); re-run the job"
    return None


def _mismatch(shown: str) -> str:
    return f"{shown} changed on disk since the job finished (SHA-256 mismatch); re-run the job"


def check_artifact(reg: Registry, a: ArtifactView, digest=storage.sha256_file) -> FileCheck:
    """Hash one result file (with ``digest(path)``, e.g. a cached one) and compare it with its
    registered SHA-256."""
    shown = _shown(reg, a.path)
    problem = _problem(reg, a, shown)
    if problem is None:
        try:
            if digest(a.path) != a.sha256:
                problem = _mismatch(shown)
        except OSError as e:
            problem = f"{shown} cannot be read ({e.strerror or e}); re-run the job"
    return FileCheck(a, shown, problem)


def check_artifacts(reg: Registry, job_id: int, digest=storage.sha256_file) -> list[FileCheck]:
    """:func:`check_artifact` for every registered result file of a job."""
    return [check_artifact(reg, a, digest) for a in list_artifacts(reg, job_id)]


def read_checked(reg: Registry, a: ArtifactView) -> bytes:
    """The bytes of a result file, only if exactly these bytes hash to the registered SHA-256.

    Raises:
        ResultFileError: missing, not a regular file, outside the results folder, or changed.
    """
    shown = _shown(reg, a.path)
    problem = _problem(reg, a, shown)
    if problem:
        raise ResultFileError(problem)
    try:
        data = Path(a.path).read_bytes()
    except OSError as e:
        raise ResultFileError(f"{shown} cannot be read ({e.strerror or e}); re-run the job") from None
    if hashlib.sha256(data).hexdigest() != a.sha256:
        raise ResultFileError(_mismatch(shown))
    return data


def _manifest(reg: Registry, job, artifacts: list[ArtifactView]) -> dict:
    """manifest.json of a bundle (without its creation time); no absolute server path in it."""
    quality = get_quality(reg, job.id)
    with reg.session() as s:
        report = dict(s.get(Job, job.id).report or {})
    settings = dict(job.settings)
    for key in ("checkpoint", "keypoints"):  # absolute server paths: keep only the file name
        if settings.get(key):
            settings[key] = Path(settings[key]).name
    checkpoint_name = report.get("checkpoint_name") or settings.get("checkpoint")
    return {
        "job_id": job.id,
        "input": {
            "name": job.name,
            "sha256": job.video.sha256,
            "bytes": job.video.size,
            "width": job.video.width,
            "height": job.video.height,
        },
        "frames": quality.frames if quality else job.frames_total,
        "valid_frames": quality.valid_frames if quality else None,
        "invalid_reasons": quality.reasons if quality else {},
        "quality": _quality_manifest(report.get("quality") or {}),
        "fps": report.get("media_fps", job.video.fps),
        "settings": settings,
        "engine_version": job.engine_version,
        "checkpoint": {"name": checkpoint_name, "sha256": job.checkpoint_sha256},
        "checkpoint_sha256": job.checkpoint_sha256,
        "files": [
            {"name": a.path.name, "format": a.format, "bytes": a.bytes, "sha256": a.sha256} for a in artifacts
        ],
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def _quality_manifest(summary: dict) -> dict:
    """The quality part of a manifest: flag counts with what each flag means, jitter, smoothing."""
    from engine.quality import FLAGS

    if not summary:
        return {}
    out = {k: v for k, v in summary.items() if k != "flags"}
    out["flags"] = {name: {"frames": int(summary.get("flags", {}).get(name, 0)), "meaning": spec.description}
                    for name, spec in FLAGS.items()}
    return out


def _bundle_key(manifest: dict) -> str:
    """Digest of everything a bundle is built from (its files' digests are in the manifest)."""
    text = json.dumps({"manifest": manifest, "readme": README}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _cached_ok(dest: Path, key: str, artifacts: list[ArtifactView]) -> bool:
    """Whether the zip at ``dest`` was built from ``key`` and each entry still hashes as registered."""
    try:
        with zipfile.ZipFile(dest) as zf:
            if zf.comment != key.encode():
                return False
            for a in artifacts:
                h = hashlib.sha256()
                with zf.open(a.path.name) as f:
                    for block in iter(lambda f=f: f.read(storage.CHUNK), b""):
                        h.update(block)
                if h.hexdigest() != a.sha256:
                    return False
    except (OSError, KeyError, zipfile.BadZipFile, EOFError):
        return False
    return True


def _copy_checked(zf: zipfile.ZipFile, reg: Registry, a: ArtifactView) -> None:
    """Copy one result file into the zip while hashing the bytes copied; raise if they differ."""
    shown = _shown(reg, a.path)
    problem = _problem(reg, a, shown)
    if problem:
        raise ResultFileError(problem)
    info = zipfile.ZipInfo.from_file(a.path, a.path.name)
    info.compress_type = zipfile.ZIP_DEFLATED
    h = hashlib.sha256()
    with open(a.path, "rb") as src, zf.open(info, "w", force_zip64=a.bytes >= 2**31) as dst:
        while block := src.read(storage.CHUNK):
            h.update(block)
            dst.write(block)
    if h.hexdigest() != a.sha256:
        raise ResultFileError(_mismatch(shown))


def build_bundle(reg: Registry, job_id: int) -> Path:
    """Build (or return the cached, still valid) zip of a succeeded job, every file checked.

    Raises:
        JobNotFound: no such job.
        JobStateError: the job has not succeeded.
        ResultFileError: a result file is missing or changed (every bad file is named).
    """
    job = get_job(reg, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise JobStateError(f"job {job_id} is {job.status.value}: only succeeded jobs have a bundle")
    out_dir = reg.result_dir(job.id)
    dest = out_dir / f"bundle-{job.id}.zip"
    artifacts = list_artifacts(reg, job.id)
    bad = [c.problem for c in (check_artifact(reg, a) for a in artifacts) if c.problem]
    if bad:
        raise ResultFileError("; ".join(bad))
    manifest = _manifest(reg, job, artifacts)
    key = _bundle_key(manifest)
    if dest.is_file() and _cached_ok(dest, key, artifacts):
        return dest
    tmp = storage.temp_path(out_dir, f"bundle-{job.id}.zip")  # beside the target: same file system
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for a in artifacts:
                _copy_checked(zf, reg, a)
            stamped = {**manifest, "created_at": utcnow().isoformat()}
            zf.writestr("manifest.json", json.dumps(stamped, indent=2, default=str))
            zf.writestr("README.txt", README)
            zf.comment = key.encode()
        storage.fsync_replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
