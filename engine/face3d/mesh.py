"""Mesh export of a reconstructed frame (OBJ with vertex colours, PLY) via trimesh.

Vertices are in Deep3D's **world** frame, as its ``save_mesh`` writes them: the model shape
rotated and translated (``p = R p_model + t``; decimetres, y up, the camera at (0, 0, 10)
looking down −z). Colours are the shaded per-vertex colours × 255, clamped, as uint8.
Triangles are the model's, unprocessed (``process=False``: no merging or reordering).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError, OutputError
from engine.face3d.model import ParametricFaceModel

MESH_SUFFIXES = (".obj", ".ply")


def frame_mesh(face_model: ParametricFaceModel, coeff: np.ndarray):
    """A ``trimesh.Trimesh`` of one frame's face.

    Args:
        coeff: (257,) or (1, 257) coefficients.

    Returns:
        ``trimesh.Trimesh`` with float32 (N, 3) world vertices, (F, 3) faces and uint8
        RGBA vertex colours.
    """
    import trimesh

    c = np.asarray(coeff, dtype=np.float32).reshape(1, -1)
    with torch.no_grad():
        geo = face_model.compute_for_render(c)
        world = face_model.to_camera(geo.vertex_cam)  # the camera flip is its own inverse
        color = (geo.color.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return trimesh.Trimesh(
        vertices=world[0].cpu().numpy(),
        faces=face_model.tri.cpu().numpy(),
        vertex_colors=color[0].cpu().numpy(),
        process=False,
    )


def export_mesh(face_model: ParametricFaceModel, coeff: np.ndarray, out_path: str | Path) -> Path:
    """Write one frame's face to ``out_path`` (``.obj`` or ``.ply``, chosen by suffix), atomically.

    Raises:
        InputError: unsupported suffix. OutputError: the file cannot be written.
    """
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise InputError(f"{out_path}: mesh format must be one of {', '.join(MESH_SUFFIXES)}, got '{suffix}'")
    mesh = frame_mesh(face_model, coeff)
    data = mesh.export(file_type=suffix[1:])
    if isinstance(data, str):
        data = data.encode()
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out_path}: cannot write the mesh ({e})") from None
    return out_path
