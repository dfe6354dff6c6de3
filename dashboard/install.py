"""Weight files: where each one lives, whether it is there, and installing one after validating it.

Torch-free: validators that need torch run in a child process (:mod:`dashboard.validate`);
the face-model files are checked from their headers/sizes only.

Installing never leaves a half-written file: the candidate is validated where it lies (an
upload is first streamed to a temporary file in the destination folder), then copied/renamed
into place. A checkpoint that is replaced is renamed to ``<name>.replaced-<UTC time>`` so the
engine no longer sees it but nothing is lost.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from db.access import Actor, PermissionDenied
from engine.checks import regular_file_problem
from engine.errors import WeightsError
from engine.face3d import bfm
from engine.landmarks import fan as fan_backend
from engine.landmarks import mtcnn as mtcnn_backend
from engine.weights import CHECKPOINT_HELP, CHECKPOINT_SUFFIXES, bfm_dir, checkpoint_dir, list_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[1]
VALIDATE_TIMEOUT_S = 300

#: face_alignment's weight files by setup-page key: (file name, download URL).
FAN_FILES = dict(zip(("sfd", "fan"), fan_backend.WEIGHTS, strict=True))
MTCNN_FILES = mtcnn_backend.WEIGHT_FILES

#: Face-model files that can be installed into ``BFM/``, in the order the setup page lists them.
BFM_FILES = (bfm.MODEL_NAME, bfm.BFM09_NAME, bfm.EXP_NAME, *bfm.INDEX_NAMES)
BFM_SOURCE_HELP = (
    f"Only needed to draw the reconstructed face. Either install a {bfm.MODEL_NAME} you already have, "
    f"or install its sources and convert them here: {bfm.BFM09_HELP}; {bfm.EXP_HELP}; {bfm.INDEX_HELP}."
)


@dataclass(frozen=True)
class Validation:
    """Result of checking one candidate file: ``ok`` and a one-line ``message`` (why not, or what it is)."""

    ok: bool
    message: str


@dataclass(frozen=True)
class WeightStatus:
    """One row of the setup page.

    Attributes:
        key: ``checkpoint``, ``sfd``, ``fan``, ``mtcnn``, ``bfm``.
        title: what it is, for people.
        present: the file(s) are where the engine looks.
        path: where the engine looks (file or folder).
        detail: what was found.
        source: where to get it.
        required: needed to extract coefficients (``fan``/``sfd`` only for the FAN backend).
    """

    key: str
    title: str
    present: bool
    path: Path
    detail: str
    source: str
    required: bool = True


def torch_hub_checkpoints() -> Path:
    """``torch.hub.get_dir()/checkpoints`` computed without importing torch.

    ``$TORCH_HOME/hub/checkpoints``; ``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``
    (``~/.cache/torch``).
    """
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def mtcnn_dir() -> Path | None:
    """facenet-pytorch's bundled weight folder (``facenet_pytorch/data``), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def weight_statuses() -> list[WeightStatus]:
    """Where every weight file should be and whether it is there (presence only; see the doctor
    report for a full load check of the checkpoint)."""
    out = []
    ckpt_root = checkpoint_dir()
    found = list_checkpoints(ckpt_root)
    if len(found) == 1:
        p = found[0]
        detail = f"{p.relative_to(ckpt_root)} ({p.stat().st_size / 1e6:.1f} MB)"
    elif found:
        detail = (
            f"{len(found)} checkpoints found "
            f"({', '.join(str(p.relative_to(ckpt_root)) for p in found[:4])}); "
            "keep one, or pass --checkpoint"
        )
    else:
        detail = "no .pth / .safetensors file"
    out.append(
        WeightStatus(
            "checkpoint",
            "Reconstruction network (epoch_20.pth)",
            len(found) == 1,
            ckpt_root,
            detail,
            CHECKPOINT_HELP,
        )
    )
    hub = torch_hub_checkpoints()
    for key, title in (
        ("sfd", "Face detector S3FD (FAN backend)"),
        ("fan", "Landmarks 2D-FAN-4 (FAN backend)"),
    ):
        name, url = FAN_FILES[key]
        p = hub / name
        out.append(
            WeightStatus(
                key,
                title,
                p.is_file(),
                p,
                f"{p.stat().st_size / 1e6:.1f} MB" if p.is_file() else "not downloaded",
                f"face_alignment downloads it on first use from {url}; offline, install that file here.",
                required=False,
            )
        )
    data = mtcnn_dir()
    missing = [f for f in MTCNN_FILES if data is None or not (data / f).is_file()]
    out.append(
        WeightStatus(
            "mtcnn",
            "MTCNN face detector (MTCNN backend)",
            data is not None and not missing,
            data or Path("facenet_pytorch/data"),
            "bundled with facenet-pytorch"
            if data is not None and not missing
            else ("facenet-pytorch is not installed" if data is None else f"missing {', '.join(missing)}"),
            "ships inside the facenet-pytorch package: pip install facenet-pytorch --no-deps",
            required=False,
        )
    )
    folder = bfm_dir()
    status = bfm.bfm_status(folder)
    if status.model_ok:
        detail = f"{bfm.MODEL_NAME} ({(folder / bfm.MODEL_NAME).stat().st_size / 1e6:.0f} MB)"
    elif status.can_convert:
        detail = "sources present, not converted yet"
    elif status.sources_present:
        detail = f"sources incomplete: missing {', '.join(status.sources_missing)}"
    else:
        detail = "not installed (only needed to draw the reconstructed face)"
    out.append(
        WeightStatus(
            "bfm", "Face model BFM (visuals only)", status.model_ok, folder, detail, BFM_SOURCE_HELP, required=False
        )
    )
    return out


# --------------------------------------------------------------------------- validation


def validate_in_child(kind: str, path: str | Path) -> Validation:
    """Run ``python -m dashboard.validate KIND PATH`` (torch stays out of this process)."""
    from dashboard.data import run_json_child

    row = run_json_child(["-m", "dashboard.validate", kind, str(path)], VALIDATE_TIMEOUT_S)
    if isinstance(row, str):
        return Validation(False, f"the file could not be checked: {row}")
    return Validation(bool(row["ok"]), str(row["message"]))


def validate_bfm_file(path: str | Path, name: str) -> Validation:
    """Check a face-model file in the role ``name`` (one of :data:`BFM_FILES`) from its headers,
    size and small index arrays, with :mod:`engine.face3d.bfm`'s checks (NumPy/SciPy only)."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        return Validation(False, f"{path}: {problem}")
    if name not in BFM_FILES:
        raise ValueError(f"unknown face-model file {name!r}; expected one of {', '.join(BFM_FILES)}")
    try:
        bfm.check_file(path, name)
    except WeightsError as e:
        # The engine's messages start with the (temporary) path; name the role instead.
        return Validation(False, str(e).replace(str(path), name, 1))
    return Validation(True, f"a valid {name}")


def convert_face_model(*, actor: Actor) -> InstallResult:
    """Build ``BFM/BFM_model_front.mat`` from the sources installed in ``BFM/`` (NumPy; a few seconds).
    ``actor`` must be an admin (it writes into BFM/)."""
    try:
        actor.require("install")
    except PermissionDenied as e:
        return InstallResult(False, str(e))
    folder = bfm_dir()
    try:
        out = bfm.convert_bfm([folder], folder)
    except WeightsError as e:
        return InstallResult(False, f"The face model could not be converted: {e}")
    return InstallResult(True, f"Converted the face model: {out}", out)


def validate(key: str, path: str | Path, name: str | None = None) -> Validation:
    """Validate a candidate for weight ``key`` (``checkpoint``, ``sfd``, ``fan``, ``bfm``)."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        return Validation(False, f"{path}: {problem}")
    if path.stat().st_size == 0:
        return Validation(False, f"{path.name} is empty (0 bytes): the upload or copy did not finish")
    if key == "bfm":
        return validate_bfm_file(path, name or path.name)
    if key not in ("checkpoint", "sfd", "fan"):
        raise ValueError(f"unknown weight {key!r}")
    return validate_in_child(key, path)


# --------------------------------------------------------------------------- installing


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did: ``ok``, a one-line ``message``, the installed ``path`` (None if rejected)."""

    ok: bool
    message: str
    path: Path | None = None


def destination(key: str, name: str) -> Path:
    """Where weight ``key`` is installed; ``name`` is the candidate's file name."""
    if key == "checkpoint":
        suffix = ".safetensors" if name.lower().endswith(".safetensors") else Path(name).suffix.lower()
        if suffix not in CHECKPOINT_SUFFIXES:
            suffix = ".pth"
        return checkpoint_dir() / (Path(name).stem + suffix)
    if key in FAN_FILES:
        return torch_hub_checkpoints() / FAN_FILES[key][0]
    if key == "bfm":
        if name not in BFM_FILES:
            raise ValueError(f"a face-model file must be named one of {', '.join(BFM_FILES)}, not {name!r}")
        return bfm_dir() / name
    raise ValueError(f"unknown weight {key!r}")


def _set_aside(paths: list[Path]) -> list[Path]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    moved = []
    for p in paths:
        target = p.with_name(f"{p.name}.replaced-{stamp}")
        os.replace(p, target)
        moved.append(target)
    return moved


def install(
    key: str, source: str | Path | BinaryIO, name: str | None = None, *, actor: Actor
) -> InstallResult:
    """Validate a weight file and put it where the engine looks for it.

    Weight files are validated in a child process that reads them as data only
    (:mod:`dashboard.validate`): a pickle asking for Python objects is refused, never run.

    Args:
        key: ``checkpoint``, ``sfd``, ``fan`` or ``bfm``.
        source: a path on this machine (copied; the original stays) or a binary stream (an upload).
        name: the file's name (required for a stream; for ``bfm`` it picks the role).
        actor: who installs it; must be an admin.

    Returns:
        :class:`InstallResult`; a rejected file is not installed and ``message`` says why.
    """
    try:
        actor.require("install")
    except PermissionDenied as e:
        return InstallResult(False, str(e))
    if isinstance(source, (str, Path)):
        src = Path(source).expanduser()
        name = name or src.name
        problem = regular_file_problem(src)
        if problem:
            return InstallResult(False, f"{src}: {problem} on this server")
    elif name is None:
        raise ValueError("install(): pass name= with a stream")
    try:
        dest = destination(key, name)
    except ValueError as e:
        return InstallResult(False, str(e))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".part-{uuid.uuid4().hex[:12]}-{dest.name}"  # hidden, real suffix
    try:
        if isinstance(source, (str, Path)):
            check = validate(key, src, name)
            if not check.ok:
                return InstallResult(False, f"{name} was not installed: {check.message}")
            shutil.copyfile(src, tmp)
        else:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, length=1 << 20)
            check = validate(key, tmp, name)
            check = Validation(check.ok, check.message.replace(str(tmp), name))  # not the temporary name
            if not check.ok:
                return InstallResult(False, f"{name} was not installed: {check.message}")
        moved = []
        if key == "checkpoint":
            moved = _set_aside(list_checkpoints(dest.parent))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    note = f" Previous checkpoint(s) renamed to {', '.join(p.name for p in moved)}." if moved else ""
    return InstallResult(True, f"Installed {dest} ({check.message}).{note}", dest)


#: Landmark backend → the weight files (:func:`weight_statuses` keys) it needs to run offline.
BACKEND_WEIGHTS = {"fan": ("sfd", "fan"), "mtcnn": ("mtcnn",)}


def default_backend(statuses: list[WeightStatus], order: list[str]) -> str:
    """The first backend of ``order`` whose weight files are all present (FAN when its weights
    are installed, else MTCNN when facenet-pytorch is); ``order[0]`` when none is ready.
    Backends needing something per input (``file``) are never a default."""
    present = {s.key for s in statuses if s.present}
    for name in order:
        needs = BACKEND_WEIGHTS.get(name)
        if needs and all(k in present for k in needs):
            return name
    return order[0]
