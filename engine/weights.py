"""Where weight files live, and where users get them.

Folders (each overridable by an environment variable):

* ``checkpoints/`` (``STUDIO_CHECKPOINT_DIR``): the reconstruction network —
  Deep3DFaceRecon's ``epoch_20.pth`` or SadTalker's ``SadTalker_V0.0.2_256.safetensors``.
* ``BFM/`` (``STUDIO_BFM_DIR``): the face model, for visuals only.
* face_alignment's cache, ``$TORCH_HOME/hub/checkpoints/``: SFD and 2D-FAN-4 weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import WeightsMissingError

REPO_ROOT = Path(__file__).resolve().parents[1]

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")

CHECKPOINT_HELP = (
    "Get epoch_20.pth from the pretrained-model link in Deep3DFaceRecon_pytorch's README "
    "(github.com/sicxu/Deep3DFaceRecon_pytorch, 'Inference with a pre-trained model') and put it at "
    "checkpoints/<name>/epoch_20.pth, or use SadTalker's SadTalker_V0.0.2_256.safetensors "
    "(its reconstruction net is stored under 'face_3drecon.'); then pass --checkpoint or keep it "
    "the only checkpoint under checkpoints/."
)


def checkpoint_dir() -> Path:
    """The folder searched for the reconstruction checkpoint."""
    return Path(os.environ.get("STUDIO_CHECKPOINT_DIR", REPO_ROOT / "checkpoints"))


def bfm_dir() -> Path:
    """The folder holding the face model (``BFM_model_front.mat`` or its sources)."""
    return Path(os.environ.get("STUDIO_BFM_DIR", REPO_ROOT / "BFM"))


def list_checkpoints(root: Path | None = None) -> list[Path]:
    """Every candidate checkpoint file under ``root`` (recursive, sorted)."""
    root = checkpoint_dir() if root is None else Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES and not p.name.startswith(".")
    )


def find_checkpoint(explicit: str | Path | None = None, root: Path | None = None) -> Path:
    """Resolve the checkpoint to use: ``explicit`` if given, else the single one under ``root``.

    Raises:
        WeightsMissingError: the explicit file is missing, or ``root`` holds none or several.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise WeightsMissingError(f"checkpoint not found: {path}. {CHECKPOINT_HELP}")
        return path
    root = checkpoint_dir() if root is None else Path(root)
    found = list_checkpoints(root)
    if not found:
        raise WeightsMissingError(f"no reconstruction checkpoint under {root}/. {CHECKPOINT_HELP}")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found[:5])
        raise WeightsMissingError(
            f"{len(found)} checkpoints under {root}/ ({names}); choose one with --checkpoint PATH"
        )
    return found[0]
