"""Cached loaders the pages call. The only module of the package that imports Streamlit.

* :func:`get_registry` — one :class:`db.Registry` per (database URL, data folder): a
  ``cache_resource`` singleton, never mutated.
* Result files, decoded frames and the doctor report are ``cache_data`` with bounded
  size or a time-to-live; result loaders key on the file's mtime so a rewritten file is re-read.
* The doctor runs in a child process (``python -m engine doctor`` machinery imports torch and
  may touch the GPU; the dashboard process stays torch-free for it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from dashboard.results import ResultData, load_result
from engine.doctor import Check

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Seconds the doctor report is reused before it is run again.
DOCTOR_TTL_S = 60
#: Seconds the doctor child process may take.
DOCTOR_TIMEOUT_S = 120


@st.cache_resource(show_spinner=False)
def _registry(url: str | None, data_dir: str | None):
    from db import Registry

    return Registry(url=url, data_dir=data_dir)


def get_registry():
    """The registry of this installation (``$STUDIO_DB_URL`` / ``$STUDIO_DATA_DIR``, else ``./data``).

    Keyed on the environment so tests that point the variables at a temporary folder get
    their own registry.
    """
    return _registry(os.environ.get("STUDIO_DB_URL") or None, os.environ.get("STUDIO_DATA_DIR") or None)


@st.cache_data(max_entries=16, show_spinner="Loading results…")
def _load_result(path: str, mtime: float) -> ResultData:
    return load_result(path)


def result_data(path: str | Path) -> ResultData:
    """The :class:`~dashboard.results.ResultData` of an output ``.npz`` (re-read when the file changes)."""
    p = Path(path)
    return _load_result(str(p), p.stat().st_mtime)


def _stat_key(path: str | Path) -> tuple[int, ...]:
    """What changes whenever a file's bytes change: size, mtime, ctime (not settable by users), inode."""
    s = os.stat(path)
    return (s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, s.st_dev)


@st.cache_data(max_entries=512, show_spinner=False)
def _sha256(path: str, key: tuple[int, ...]) -> str:
    from db.storage import sha256_file

    return sha256_file(path)


def cached_sha256(path: str | Path) -> str:
    """SHA-256 of a file, recomputed whenever its size, times or inode change."""
    return _sha256(str(path), _stat_key(path))


def checked_results(reg, job_id: int):
    """Every result file of a job with its check (:class:`db.bundle.FileCheck`) against the
    registered SHA-256 (hashes cached per file state)."""
    from db.bundle import check_artifacts

    return check_artifacts(reg, job_id, digest=cached_sha256)


@st.cache_data(max_entries=2, show_spinner=False)
def _verified_bytes(path: str, sha256: str, key: tuple[int, ...]) -> bytes | None:
    import hashlib

    data = Path(path).read_bytes()
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def verified_bytes(path: str | Path, sha256: str) -> bytes | None:
    """A file's bytes if they hash to ``sha256`` (None otherwise); cached while the file is unchanged."""
    try:
        return _verified_bytes(str(path), sha256, _stat_key(path))
    except OSError:
        return None


@st.cache_data(max_entries=64, show_spinner=False)
def frame_rgb(path: str, index: int, t: float | None) -> np.ndarray:
    """Decoded frame ``index`` (time ``t`` s) of an input, uint8 (H, W, 3) RGB, y down."""
    from dashboard.frames import read_frame

    return read_frame(path, index, t)


@st.cache_resource(show_spinner="Loading the face model…", max_entries=1)
def _face_renderer(bfm_dir: str, mtime: float):
    from engine.face3d import FaceRenderer, ParametricFaceModel

    model = ParametricFaceModel.from_dir(bfm_dir, "cpu")
    return model, FaceRenderer(model.device)


def face_renderer():
    """(face model, renderer) on the CPU, loaded once per installed ``BFM_model_front.mat``
    (torch loads here, on first use of the overlay only). Raises if the model is not set up."""
    from engine.weights import bfm_dir

    path = bfm_dir() / "BFM_model_front.mat"
    return _face_renderer(str(path.parent), path.stat().st_mtime)


# --------------------------------------------------------------------------- doctor


def run_json_child(args: list[str], timeout_s: float):
    """Run ``python ARGS`` from the repository and return the JSON of its last stdout line.

    Heavy checks (torch) run this way so the dashboard process never imports torch.

    Returns:
        the parsed value, or a one-line string saying why there is none (timeout, crash,
        no report).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s,
                              cwd=REPO_ROOT, env=env, check=False)
    except subprocess.TimeoutExpired:
        return f"it took over {timeout_s:.0f} s"
    last_error = (proc.stderr.strip().splitlines() or ["it printed nothing"])[-1]
    if proc.returncode != 0:
        return last_error
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return last_error


_DOCTOR_SNIPPET = (
    "import json; from engine.doctor import run_checks; print(json.dumps([c.to_dict() for c in run_checks()]))"
)


def run_doctor() -> list[Check]:
    """Run ``engine.doctor.run_checks()`` in a child Python and parse its report.

    A crash or timeout of the child becomes one failed check that says what happened.
    """
    rows = run_json_child(["-c", _DOCTOR_SNIPPET], DOCTOR_TIMEOUT_S)
    if isinstance(rows, str):
        return [Check("system", "doctor", False, f"the installation check failed: {rows}",
                      "run `python -m engine doctor` in a terminal for the full message")]
    return [Check(**row) for row in rows]


@st.cache_data(ttl=DOCTOR_TTL_S, show_spinner="Checking the installation…")
def doctor_checks() -> list[Check]:
    """:func:`run_doctor`, reused for :data:`DOCTOR_TTL_S` seconds."""
    return run_doctor()


# --------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as ``nvidia-smi`` reports it; memory in MiB."""

    index: int
    name: str
    memory_used_mib: int
    memory_total_mib: int


@st.cache_data(ttl=10, show_spinner=False)
def gpus() -> list[GpuInfo]:
    """GPUs of this machine from ``nvidia-smi`` (empty without an NVIDIA driver); no torch involved."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            try:
                found.append(GpuInfo(int(parts[0]), parts[1], int(float(parts[2])), int(float(parts[3]))))
            except ValueError:
                continue
    return found


def disk_free(path: str | Path) -> tuple[int, int]:
    """(free bytes, total bytes) of the file system holding ``path``."""
    usage = shutil.disk_usage(Path(path))
    return usage.free, usage.total


# --------------------------------------------------------------------------- dataset view

#: At most this many finished jobs are summarised in one dataset table.
DATASET_LIMIT = 5000


@st.cache_data(max_entries=DATASET_LIMIT * 2, show_spinner=False)
def _job_metrics(path: str, mtime: float) -> dict:
    from dashboard.dataset import job_metrics

    return job_metrics(load_result(path).df)


def job_metrics_cached(path: str | Path) -> dict:
    """:func:`dashboard.dataset.job_metrics` of one result ``.npz``, computed once per file state."""
    p = Path(path)
    return _job_metrics(str(p), p.stat().st_mtime)


@st.cache_data(ttl=15, max_entries=16, show_spinner="Summarising the finished jobs…")
def dataset_table(search: str | None, roots: tuple[str, ...] = ()):
    """One row per succeeded job matching ``search`` (newest first, at most :data:`DATASET_LIMIT`):
    id columns (paths relative to the data folder / import roots) and metrics.

    Cost: two queries plus one cached summary per job (each ``.npz`` is read once per change).
    """
    from dashboard.dataset import dataset_frame
    from dashboard.demo import is_demo
    from db import JobStatus, service
    from db.access import display_path

    reg = get_registry()
    jobs = service.list_jobs(reg, statuses=[JobStatus.SUCCEEDED], search=search, order_by="finished_at",
                             limit=DATASET_LIMIT)
    npz = service.artifacts_of(reg, [j.id for j in jobs], "npz")
    root_paths = [Path(r) for r in roots]
    rows = []
    for j in jobs:
        art = npz.get(j.id)
        if art is None or not art.path.is_file():
            continue
        try:
            metrics = job_metrics_cached(art.path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("job %d: result not readable for the dataset view: %s", j.id, e)
            continue
        rows.append({
            "job": j.id,
            "name": j.name,
            "input": display_path(j.input_path, reg.data_dir, root_paths),
            "result": display_path(art.path, reg.data_dir, root_paths),
            "demo": is_demo(j.engine_version),
            **metrics,
        })
    return dataset_frame(rows)
