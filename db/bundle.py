"""Download bundle of a succeeded job: every result file, ``manifest.json`` and ``README.txt``.

The zip is built once under a temporary name and renamed to
``results/<job id>/bundle-<job id>.zip``; later calls return the cached file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from db import storage
from db.models import JobStatus, utcnow
from db.registry import Registry
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
the engine version, the SHA-256 of the checkpoint used and the size and SHA-256 of every
file in this bundle.
"""


def build_bundle(reg: Registry, job_id: int) -> Path:
    """Build (or return the cached) zip of a succeeded job.

    Raises:
        JobNotFound: no such job.
        JobStateError: the job has not succeeded.
    """
    from db import service  # circular at import time

    job = service.get_job(reg, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise service.JobStateError(f"job {job_id} is {job.status.value}: only succeeded jobs have a bundle")
    out_dir = reg.result_dir(job.id)
    dest = out_dir / f"bundle-{job.id}.zip"
    if dest.exists():
        return dest
    artifacts = service.list_artifacts(reg, job.id)
    quality = service.get_quality(reg, job.id)
    with reg.session() as s:
        from db.models import Job

        report = dict(s.get(Job, job.id).report or {})
    manifest = {
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
        "fps": report.get("media_fps", job.video.fps),
        "settings": job.settings,
        "engine_version": job.engine_version,
        "checkpoint_sha256": job.checkpoint_sha256,
        "files": [
            {"name": a.path.name, "format": a.format, "bytes": a.bytes, "sha256": a.sha256} for a in artifacts
        ],
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "created_at": utcnow().isoformat(),
    }
    tmp = storage.temp_path(reg.tmp_dir, f"bundle-{job.id}.zip")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for a in artifacts:
                zf.write(a.path, arcname=a.path.name)
            zf.writestr("manifest.json", json.dumps(manifest, indent=2, default=str))
            zf.writestr("README.txt", README)
        storage.fsync_replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
