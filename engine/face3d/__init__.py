"""Face model and rendering for review: BFM conversion, reconstruction overlays, mesh export.

Optional: extraction never imports this package except, lazily, for :func:`lm68_extras` when
``BFM/BFM_model_front.mat`` exists. ``import engine.face3d`` is cheap (no torch); the torch
modules load on first use of the names below.

Modules: :mod:`.bfm` (convert/check/load, NumPy only), :mod:`.model` (ParametricFaceModel),
:mod:`.raster` (built-in rasterizer), :mod:`.nvdr` (nvdiffrast CUDA backend), :mod:`.render`
(``render_faces``, ``renderer_status``), :mod:`.overlay`, :mod:`.mesh`, :mod:`.cli`.
See ``docs/rendering.md``.
"""

from __future__ import annotations

from pathlib import Path

_LAZY = {
    "ParametricFaceModel": "engine.face3d.model",
    "reproject_landmarks": "engine.face3d.model",
    "lm68_extras": "engine.face3d.model",
    "FaceRenderer": "engine.face3d.render",
    "render_faces": "engine.face3d.render",
    "renderer_status": "engine.face3d.render",
    "write_overlay_video": "engine.face3d.overlay",
    "overlay_frame": "engine.face3d.overlay",
    "overlay_image": "engine.face3d.overlay",
    "export_mesh": "engine.face3d.mesh",
    "convert_bfm": "engine.face3d.bfm",
    "bfm_status": "engine.face3d.bfm",
}

__all__ = ["face_model_available", *_LAZY]


def face_model_available(bfm_dir: str | Path | None = None) -> bool:
    """True when ``bfm_dir/BFM_model_front.mat`` exists with the reference keys and shapes.

    Reads only headers and the small index arrays; never imports torch. ``None`` means
    :func:`engine.weights.bfm_dir`.
    """
    from engine.errors import WeightsError
    from engine.face3d.bfm import MODEL_NAME, check_model

    if bfm_dir is None:
        from engine.weights import bfm_dir as default_dir

        bfm_dir = default_dir()
    try:
        check_model(Path(bfm_dir) / MODEL_NAME)
    except WeightsError:
        return False
    return True


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine.face3d' has no attribute {name!r}")
