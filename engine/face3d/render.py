"""Render reconstructed faces: one entry point, two backends (spec §4).

``render_faces(vertex_cam, tri, color)`` projects with Deep3D's camera (focal 1015, centre
112, near 5, far 15, y negated so rows run top-down) and rasterizes at 224×224 with:

* ``nvdiffrast`` — nvdiffrast's CUDA rasterizer (``RasterizeCudaContext``; never OpenGL), used
  automatically for CUDA tensors when it is installed and its plugin builds;
* ``torch`` — the built-in rasterizer of :mod:`engine.face3d.raster` (CPU or GPU, no compiler).

``STUDIO_RENDERER=torch|nvdiffrast|auto`` overrides the automatic choice. ``renderer_status()``
tells ``doctor`` which backend a device would get and why.

Pixel convention (both backends): pixel (r, c) samples the centre (c + 0.5, r + 0.5), so the
image is offset by half a pixel from the landmark convention ``(u, 223 − v)`` (spec §4).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from engine.checks import check_shape
from engine.face3d import raster
from engine.face3d.model import CENTER, FOCAL
from engine.face3d.nvdr import RendererError, cuda_problem, nvdiffrast_problem

log = logging.getLogger(__name__)

Z_NEAR = 5.0
Z_FAR = 15.0
BACKENDS = ("auto", "nvdiffrast", "torch")


def camera_to_clip(
    vertex_cam: torch.Tensor,
    focal: float = FOCAL,
    center: float = CENTER,
    znear: float = Z_NEAR,
    zfar: float = Z_FAR,
) -> torch.Tensor:
    """Camera-frame vertices (B, N, 3) → clip space (B, N, 4), as Deep3D's ``MeshRenderer``.

    ``clip = (f/c·x, −f/c·y, (zf+zn)/(zf−zn)·z − 2·zf·zn/(zf−zn), z)``: y is negated so that
    image rows run top-down, and z ∈ [znear, zfar] maps to NDC z ∈ [−1, 1].
    """
    check_shape(vertex_cam, ("B", "N", "3"), "vertex_cam")
    k = focal / center
    x, y, z = vertex_cam.unbind(-1)
    a = (zfar + znear) / (zfar - znear)
    b = -2 * zfar * znear / (zfar - znear)
    return torch.stack([k * x, -k * y, a * z + b, z], dim=-1)


@dataclass(frozen=True)
class RenderResult:
    """Rendered faces; row 0 is the top of the crop.

    Attributes:
        mask: float32 (B, 1, H, W), 1 where the face covers the pixel.
        depth: float32 (B, 1, H, W) camera-frame z of the surface × mask (each item its own
            depth; Deep3D used item 0's z for every item, a bug not reproduced).
        image: float32 (B, C, H, W) interpolated ``color`` × mask (not clamped).
        backend: ``"nvdiffrast"`` or ``"torch"``.
    """

    mask: torch.Tensor
    depth: torch.Tensor
    image: torch.Tensor
    backend: str


class TorchBackend:
    """The built-in rasterizer (:mod:`engine.face3d.raster`)."""

    name = "torch"

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)

    def render(
        self, pos_clip: torch.Tensor, tri: torch.Tensor, attrs: torch.Tensor, resolution: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as :meth:`engine.face3d.nvdr.NvdiffrastBackend.render`."""
        r = raster.rasterize(pos_clip, tri, resolution)
        return r.mask, raster.interpolate(attrs, r, tri)


def _wanted(backend: str | None) -> str:
    backend = (backend or os.environ.get("STUDIO_RENDERER") or "auto").strip().lower()
    if backend not in BACKENDS:
        raise RendererError(f"unknown renderer {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


class FaceRenderer:
    """Picks a backend once for a device and renders batches with it.

    Args:
        device: where the inputs will live (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        backend: ``"auto"`` (default, or ``STUDIO_RENDERER``), ``"nvdiffrast"`` or ``"torch"``.
            ``"auto"`` takes nvdiffrast on CUDA when it loads, else the torch rasterizer, and
            logs why; an explicit ``"nvdiffrast"`` raises :class:`RendererError` instead.
        size: output side in pixels (224 for Deep3D's crop; other sizes sample the same view).
    """

    def __init__(
        self, device: str | torch.device = "cpu", backend: str | None = None, size: int = 224
    ) -> None:
        self.device = torch.device(device)
        self.size = int(size)
        wanted = _wanted(backend)
        self.fallback_reason = ""
        if wanted == "torch" or (wanted == "auto" and self.device.type != "cuda"):
            self.backend = TorchBackend(self.device)
            return
        if self.device.type != "cuda":
            raise RendererError(f"nvdiffrast renders on CUDA devices only; device is {self.device}")
        try:
            from engine.face3d.nvdr import NvdiffrastBackend

            self.backend = NvdiffrastBackend(self.device)
        except RendererError as e:
            if wanted == "nvdiffrast":
                raise
            self.fallback_reason = str(e)
            log.warning("nvdiffrast unavailable (%s); using the built-in torch rasterizer", e)
            self.backend = TorchBackend(self.device)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __call__(self, vertex_cam: torch.Tensor, tri: torch.Tensor, color: torch.Tensor) -> RenderResult:
        """Render camera-frame meshes.

        Args:
            vertex_cam: float (B, N, 3) camera frame (:class:`~engine.face3d.model.FaceGeometry`).
            tri: int (F, 3) 0-based vertex ids.
            color: float (B, N, C) per-vertex values (e.g. shaded RGB in [0, 1]).

        Returns:
            :class:`RenderResult` on ``vertex_cam``'s device.
        """
        check_shape(color, (vertex_cam.shape[0], vertex_cam.shape[1], "C"), "color")
        vertex_cam = vertex_cam.to(self.device, torch.float32)
        pos = camera_to_clip(vertex_cam)  # NDC does not depend on the output size
        attrs = torch.cat([color.to(self.device, torch.float32), vertex_cam[..., 2:]], dim=-1)
        mask, image = self.backend.render(pos, tri.to(self.device), attrs, (self.size, self.size))
        image = image.permute(0, 3, 1, 2)
        return RenderResult(
            mask=mask[:, None].float(),
            depth=image[:, -1:].contiguous(),
            image=image[:, :-1].contiguous(),
            backend=self.backend.name,
        )


def render_faces(
    vertex_cam: torch.Tensor, tri: torch.Tensor, color: torch.Tensor, backend: str | None = None
) -> RenderResult:
    """One-shot :class:`FaceRenderer` on ``vertex_cam``'s device (reuse a FaceRenderer for many batches)."""
    return FaceRenderer(vertex_cam.device, backend)(vertex_cam, tri, color)


@dataclass(frozen=True)
class RendererStatus:
    """Which backend renders on a device, for ``doctor``.

    Attributes:
        device: the device asked about.
        backend: the backend ``"auto"`` would use there.
        nvdiffrast_ok: nvdiffrast is usable (``probe``: it was loaded; otherwise: nothing
            is known to be missing).
        reason: plain-words reason nvdiffrast is not used ("" when it is).
        probed: the plugin was actually built/loaded to decide.
    """

    device: str
    backend: str
    nvdiffrast_ok: bool
    reason: str
    probed: bool

    def describe(self) -> str:
        if self.backend == "nvdiffrast":
            how = "loaded" if self.probed else "found; its CUDA plugin builds or loads on first use"
            return f"nvdiffrast on {self.device} ({how})"
        return f"built-in torch rasterizer on {self.device}" + (
            f" — nvdiffrast not used: {self.reason}" if self.reason else ""
        )


def renderer_status(device: str | None = None, probe: bool = False) -> RendererStatus:
    """Report the backend ``FaceRenderer(device, "auto")`` picks, and why.

    Args:
        device: ``None`` means ``"cuda"`` when torch sees a GPU, else ``"cpu"``.
        probe: build/load nvdiffrast's plugin to be sure (the first time takes minutes);
            without it only cheap checks run (GPU, package, toolkit, compiled plugin on disk).
    """
    if device is None:
        device = "cpu" if cuda_problem() else "cuda"
    wanted = _wanted(None)
    dev = torch.device(device)
    if wanted == "torch":
        return RendererStatus(str(dev), "torch", False, "STUDIO_RENDERER=torch", False)
    if dev.type != "cuda":
        reason = cuda_problem() or f"device {dev} is not a CUDA device"
        return RendererStatus(str(dev), "torch", False, reason, False)
    if probe:
        try:
            from engine.face3d.nvdr import load_nvdiffrast

            load_nvdiffrast()
        except RendererError as e:
            return RendererStatus(str(dev), "torch", False, str(e), True)
        return RendererStatus(str(dev), "nvdiffrast", True, "", True)
    problem = nvdiffrast_problem()
    if problem:
        return RendererStatus(str(dev), "torch", False, problem, False)
    return RendererStatus(str(dev), "nvdiffrast", True, "", False)
