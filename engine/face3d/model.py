"""Deep3DFaceRecon's parametric face model in torch (spec §3.4), batched, CPU or GPU.

Frames (suffix in variable names):

* ``model`` — face-model space, decimetres, x right, y up, z towards the camera.
* ``world`` — after rotation and translation: ``p_world = R p_model + t``.
* ``cam`` — camera at (0, 0, 10) looking down −z: ``(x, y, 10 − z_world)``; z is the depth.
* ``224_yup`` — pixels of the 224 crop, y up: ``u = f·x/z + c``, ``v = f·y/z + c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine import layout
from engine.checks import check_shape
from engine.conventions import CROP_SIZE, crop_to_img_yup, crop_yup_to_ydown, img_yup_to_ydown
from engine.face3d.bfm import MODEL_NAME, FaceModelArrays, load_model

FOCAL = 1015.0
CENTER = 112.0
CAMERA_DISTANCE = 10.0
INIT_LIT = (0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

# Spherical-harmonics constants a·c of bands 0, 1, 2 (spec §3.4).
_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_C = (
    1 / math.sqrt(4 * math.pi),
    math.sqrt(3.0) / math.sqrt(4 * math.pi),
    3 * math.sqrt(5.0) / math.sqrt(12 * math.pi),
)
SH_AC = (_A[0] * _C[0], _A[1] * _C[1], _A[2] * _C[2])  # 0.886227, 1.772454, 2.427032


def rotation_matrix(angle: torch.Tensor) -> torch.Tensor:
    """R = Rz(z) · Ry(y) · Rx(x) for column vectors (``p' = R p``).

    Args:
        angle: (B, 3) radians (x = pitch, y = yaw, z = roll).

    Returns:
        (B, 3, 3) same dtype/device. Deep3D's ``compute_rotation`` returns the transpose.

    >>> r = rotation_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]]))  # roll 90°: x axis → y axis
    >>> (r[0] @ torch.tensor([1.0, 0.0, 0.0])).round().abs().tolist()
    [0.0, 1.0, 0.0]
    """
    check_shape(angle, ("B", "3"), "angle")
    x, y, z = angle[:, 0], angle[:, 1], angle[:, 2]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    cx, sx, cy, sy, cz, sz = (
        torch.cos(x),
        torch.sin(x),
        torch.cos(y),
        torch.sin(y),
        torch.cos(z),
        torch.sin(z),
    )
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], dim=1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], dim=1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], dim=1).view(-1, 3, 3)
    return rz @ ry @ rx


def sh_basis(normal: torch.Tensor) -> torch.Tensor:
    """The 9 SH basis values (with Deep3D's a·c factors and signs) of unit normals (..., 3) → (..., 9)."""
    x, y, z = normal[..., 0], normal[..., 1], normal[..., 2]
    k0, k1, k2 = SH_AC
    return torch.stack(
        [
            torch.full_like(x, k0),
            -k1 * y,
            k1 * z,
            -k1 * x,
            k2 * x * y,
            -k2 * y * z,
            k2 / (2 * math.sqrt(3.0)) * (3 * z * z - 1),
            -k2 * x * z,
            k2 / 2 * (x * x - y * y),
        ],
        dim=-1,
    )


@dataclass(frozen=True)
class FaceGeometry:
    """``compute_for_render`` of Deep3D (spec §3.4), batched.

    Attributes:
        vertex_cam: (B, N, 3) vertices in the camera frame (z = depth, about 10).
        texture: (B, N, 3) albedo RGB in [0, 1] (not clamped).
        color: (B, N, 3) shaded RGB (albedo × SH irradiance; not clamped).
        lm68_224_yup: (B, 68, 2) projected landmarks, crop pixels, y up.
        rotation: (B, 3, 3) R (column-vector convention).
    """

    vertex_cam: torch.Tensor
    texture: torch.Tensor
    color: torch.Tensor
    lm68_224_yup: torch.Tensor
    rotation: torch.Tensor


class ParametricFaceModel:
    """BFM front face model with Deep3D's camera and lighting.

    Tensors live on ``device`` in float32. Coefficients are ``(B, 257)`` laid out as in
    :mod:`engine.layout`. Construct with :meth:`from_dir` or from loaded arrays.
    """

    def __init__(
        self,
        arrays: FaceModelArrays,
        device: str | torch.device = "cpu",
        *,
        recenter: bool = True,
        focal: float = FOCAL,
        center: float = CENTER,
        camera_distance: float = CAMERA_DISTANCE,
    ) -> None:
        mean_shape = arrays.mean_shape
        if recenter:  # subtract the vertex centroid, in float32 as the reference
            xyz = mean_shape.reshape(-1, 3)
            mean_shape = (xyz - np.mean(xyz, axis=0, keepdims=True)).reshape(-1)
        dev = torch.device(device)
        self.device = dev
        self.focal, self.center, self.camera_distance = float(focal), float(center), float(camera_distance)
        self.mean_shape = torch.as_tensor(mean_shape, dtype=torch.float32, device=dev)
        self.id_base = torch.as_tensor(arrays.id_base, device=dev)
        self.exp_base = torch.as_tensor(arrays.exp_base, device=dev)
        self.mean_tex = torch.as_tensor(arrays.mean_tex, device=dev)
        self.tex_base = torch.as_tensor(arrays.tex_base, device=dev)
        self.tri = torch.as_tensor(arrays.tri, device=dev)
        self.point_buf = torch.as_tensor(arrays.point_buf, device=dev)
        self.keypoints = torch.as_tensor(arrays.keypoints, device=dev)
        self.init_lit = torch.tensor(INIT_LIT, dtype=torch.float32, device=dev)
        # Rows of the 68 landmark vertices in the xyz-interleaved bases (cheap landmark path).
        self._kp_rows = (3 * self.keypoints[:, None] + torch.arange(3, device=dev)).reshape(-1)

    @classmethod
    def from_dir(cls, bfm_dir: str | Path | None = None, device: str | torch.device = "cpu", **kwargs):
        """Load ``bfm_dir/BFM_model_front.mat`` (default: :func:`engine.weights.bfm_dir`)."""
        if bfm_dir is None:
            from engine.weights import bfm_dir as default_dir

            bfm_dir = default_dir()
        return cls(load_model(Path(bfm_dir) / MODEL_NAME), device, **kwargs)

    @property
    def num_vertices(self) -> int:
        return int(self.mean_shape.shape[0] // 3)

    # -- geometry ------------------------------------------------------------------------

    def shape_model(self, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
        """(B, 80), (B, 64) → (B, N, 3) vertices in the model frame, decimetres."""
        flat = id_coeff @ self.id_base.T + exp_coeff @ self.exp_base.T + self.mean_shape
        return flat.view(id_coeff.shape[0], -1, 3)

    def texture(self, tex_coeff: torch.Tensor) -> torch.Tensor:
        """(B, 80) → (B, N, 3) albedo RGB, ``(texBase·δ + meantex) / 255``."""
        flat = (tex_coeff @ self.tex_base.T + self.mean_tex) / 255.0
        return flat.view(tex_coeff.shape[0], -1, 3)

    def vertex_normals(self, shape: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) vertices → (B, N, 3) unit vertex normals (same frame), as Deep3D's ``compute_norm``."""
        v1, v2, v3 = (shape[:, self.tri[:, i]] for i in range(3))
        face_n = F.normalize(torch.linalg.cross(v1 - v2, v2 - v3, dim=-1), dim=-1, p=2)
        face_n = torch.cat([face_n, face_n.new_zeros(face_n.shape[0], 1, 3)], dim=1)  # padding row
        return F.normalize(face_n[:, self.point_buf].sum(dim=2), dim=-1, p=2)

    def shade(self, texture: torch.Tensor, normal_world: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Per-vertex colour = (SH basis · (γ_c + init_lit)) × albedo_c.

        Args:
            texture: (B, N, 3) albedo. normal_world: (B, N, 3) rotated unit normals.
            gamma: (B, 27) laid out R[0:9], G[9:18], B[18:27].
        """
        lit = gamma.view(-1, 3, 9) + self.init_lit  # (B, 3, 9)
        irradiance = sh_basis(normal_world) @ lit.transpose(1, 2)  # (B, N, 3)
        return irradiance * texture

    def to_camera(self, points_world: torch.Tensor) -> torch.Tensor:
        """(..., 3) world → camera frame: ``z ← camera_distance − z``."""
        return torch.cat([points_world[..., :2], self.camera_distance - points_world[..., 2:]], dim=-1)

    def project(self, points_cam: torch.Tensor) -> torch.Tensor:
        """(..., 3) camera frame → (..., 2) crop pixels, y up: ``f·(x, y)/z + c``."""
        return self.focal * points_cam[..., :2] / points_cam[..., 2:] + self.center

    def _split(self, coeff: torch.Tensor) -> dict[str, torch.Tensor]:
        check_shape(coeff, ("B", str(layout.NUM_COEFFS)), "coeff")
        coeff = torch.as_tensor(coeff, dtype=torch.float32, device=self.device)
        return {name: coeff[:, s] for name, s in layout.GROUPS.items()}

    def compute_for_render(self, coeff: torch.Tensor | np.ndarray) -> FaceGeometry:
        """Coefficients (B, 257) → :class:`FaceGeometry` (Deep3D's ``compute_for_render``)."""
        c = self._split(torch.as_tensor(coeff))
        shape = self.shape_model(c["id"], c["exp"])
        rot = rotation_matrix(c["angle"])
        world = shape @ rot.transpose(1, 2) + c["trans"][:, None, :]
        vertex_cam = self.to_camera(world)
        lm = self.project(vertex_cam[:, self.keypoints])
        tex = self.texture(c["tex"])
        normal_world = self.vertex_normals(shape) @ rot.transpose(1, 2)
        color = self.shade(tex, normal_world, c["gamma"])
        return FaceGeometry(vertex_cam, tex, color, lm, rot)

    def world_vertices(self, coeff: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 257) → (B, N, 3) vertices in the world frame (what Deep3D's ``save_mesh`` writes)."""
        c = self._split(torch.as_tensor(coeff))
        rot = rotation_matrix(c["angle"])
        return self.shape_model(c["id"], c["exp"]) @ rot.transpose(1, 2) + c["trans"][:, None, :]

    def landmarks_224_yup(self, coeff: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 257) → (B, 68, 2) projected landmarks, crop pixels y up; only the 68 vertices are built."""
        c = self._split(torch.as_tensor(coeff))
        rows = self._kp_rows
        flat = c["id"] @ self.id_base[rows].T + c["exp"] @ self.exp_base[rows].T + self.mean_shape[rows]
        rot = rotation_matrix(c["angle"])
        world = flat.view(-1, 68, 3) @ rot.transpose(1, 2) + c["trans"][:, None, :]
        return self.project(self.to_camera(world))


def _params_ok(trans_params: np.ndarray) -> np.ndarray:
    tp = np.asarray(trans_params, dtype=np.float64)
    return np.all(np.isfinite(tp), axis=1) & (tp[:, 2] > 0) & (tp[:, 0] > 0) & (tp[:, 1] > 0)


def reproject_landmarks(
    face_model: ParametricFaceModel,
    coeff: np.ndarray,
    trans_params: np.ndarray,
    *,
    space: str = "img",
    chunk: int = 8192,
    crop_box: np.ndarray | None = None,
) -> np.ndarray:
    """The 68 model landmarks of every frame, projected and mapped back to image pixels.

    ``space="img"``: original-image pixels, **y down** (crop y-up → image y-up by inverting the
    alignment, :func:`engine.conventions.crop_to_img_yup`, then flipped with the height ``h0``).
    ``space="crop"``: the reference's ``lm68`` of ``test.py`` — 224-crop pixels, y down
    (``224 − 1 − v``); ``trans_params`` is then unused.

    Args:
        face_model: the loaded model.
        coeff: float (N, 257) coefficients.
        trans_params: float (N, 5) ``[w0, h0, s, tx, ty_yup]`` of each frame.
        crop_box: int (N, 4) ``[left, up, w, h]`` of each crop as cut, or None (recomputed
            from ``trans_params``; see :func:`engine.conventions.crop_to_img_yup`).

    Returns:
        float32 (N, 68, 2); rows whose ``trans_params`` are not usable (non-finite, s ≤ 0)
        are NaN in ``img`` space.
    """
    if space not in ("img", "crop"):
        raise ValueError(f"space must be 'img' or 'crop', got {space!r}")
    coeff = np.asarray(coeff)
    trans_params = np.asarray(trans_params)
    check_shape(coeff, ("N", str(layout.NUM_COEFFS)), "coeff")
    check_shape(trans_params, (coeff.shape[0], "5"), "trans_params")
    n = coeff.shape[0]
    lm_224_yup = np.empty((n, 68, 2), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, n, chunk):
            part = torch.from_numpy(np.ascontiguousarray(coeff[i : i + chunk], dtype=np.float32))
            lm_224_yup[i : i + chunk] = face_model.landmarks_224_yup(part).cpu().numpy()
    if space == "crop":
        return crop_yup_to_ydown(lm_224_yup).astype(np.float32)
    out = np.full((n, 68, 2), np.nan, dtype=np.float32)
    ok = _params_ok(trans_params)
    for i in np.flatnonzero(ok):
        tp = trans_params[i]
        lm_img_yup = crop_to_img_yup(lm_224_yup[i], tp, None if crop_box is None else crop_box[i])
        out[i] = img_yup_to_ydown(lm_img_yup, float(tp[1]))
    return out


def lm68_extras(
    coeff: np.ndarray, trans_params: np.ndarray, face_model: ParametricFaceModel, crop_box: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-frame arrays the writers add when the face model is set up (``crop_box``: see
    :func:`reproject_landmarks`).

    Returns:
        ``{"lm68": float32 (N, 68, 2) image px y-down, "lm68_224_ydown": float32 (N, 68, 2)
        crop px y-down (the reference's ``lm68``)}``.
    """
    return {
        "lm68": reproject_landmarks(face_model, coeff, trans_params, space="img", crop_box=crop_box),
        "lm68_224_ydown": reproject_landmarks(face_model, coeff, trans_params, space="crop"),
    }


__all__ = [
    "CROP_SIZE",
    "FaceGeometry",
    "ParametricFaceModel",
    "lm68_extras",
    "reproject_landmarks",
    "rotation_matrix",
    "sh_basis",
]
