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

__all__ = ["doctor_checks", "face_model_available", *_LAZY]


def face_model_available(bfm_dir: str | Path | None = None) -> bool:
    """True when ``bfm_dir/BFM_model_front.mat`` is valid; cheap, never imports torch (see :mod:`.bfm`)."""
    from engine.face3d.bfm import face_model_available as available

    return available(bfm_dir)


def doctor_checks() -> list[dict]:
    """``doctor``'s face-model lines: the BFM folder and the renderer backend (no compiling).

    Each dict holds ``name, ok, detail, fix, required`` of :class:`engine.doctor.Check`.
    """
    from engine.face3d.bfm import BFM09_HELP, EXP_HELP, INDEX_HELP, bfm_status
    from engine.weights import bfm_dir

    st = bfm_status(bfm_dir())
    if st.model_ok:
        bfm = {"name": "BFM_model_front.mat", "ok": True, "detail": f"{st.folder} (valid)", "fix": ""}
    elif st.can_convert:
        bfm = {"name": "BFM_model_front.mat", "ok": False, "detail": "sources present, not converted yet",
               "fix": f"python -m engine bfm convert --from {st.folder}"}
    else:
        fix = (
            f"only needed for overlay videos, meshes and lm68. Missing in {st.folder}: "
            f"{', '.join(st.sources_missing)}. {BFM09_HELP}; {EXP_HELP}; {INDEX_HELP}"
        )
        bfm = {"name": "BFM_model_front.mat", "ok": False, "detail": st.problem.split("; ")[0], "fix": fix}
    out = [{**bfm, "required": False}]
    try:
        from engine.face3d.render import renderer_status

        rs = renderer_status()
        fix = "" if rs.backend == "nvdiffrast" or rs.device == "cpu" else rs.reason
        out.append({"name": "renderer", "ok": True, "detail": rs.describe(), "fix": fix, "required": False})
    except ImportError as e:
        out.append({"name": "renderer", "ok": False, "detail": str(e), "fix": "pip install torch",
                    "required": False})
    return out


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine.face3d' has no attribute {name!r}")
