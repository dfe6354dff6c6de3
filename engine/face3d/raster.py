"""A z-buffer triangle rasterizer in plain torch: CPU or GPU, batched, no compiler.

It follows nvdiffrast's conventions so both backends give the same images:

* input positions are clip space ``(x, y, z, w)``; NDC = xyz / w;
* pixel ``(row r, column c)`` samples NDC ``((c + 0.5)/W·2 − 1, (r + 0.5)/H·2 − 1)``: pixel
  centres at half-integers and row 0 at NDC y = −1 (so callers that negate y, as Deep3D does,
  get top-down rows);
* the nearest surface wins on NDC z (linear in screen space, the hardware depth); pixels
  whose NDC z falls outside [−1, 1] are clipped;
* barycentrics are perspective-correct; no back-face culling, no antialiasing.

Differences: triangles with a vertex behind the eye (w ≤ 0) are dropped instead of being
clipped (Deep3D's faces sit at z ≈ 10 with the near plane at 5, so this never happens there);
a pixel centre exactly on an edge counts as inside both neighbours (the depth test picks one)
instead of following a top-left rule; equal depths resolve to the highest triangle id.

Algorithm: every triangle lists the pixel centres of its bounding box (vectorised with
``repeat_interleave``, processed in chunks of ``max_pairs`` candidates), tests them with edge
functions, and writes its depth with ``scatter_reduce(amin)``; a second pass writes the
triangle id where its depth equals the buffer, and barycentrics are computed once per pixel.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.checks import check_shape

#: Candidate (triangle, pixel) pairs handled at once; bounds the temporary memory
#: (about 100 bytes per pair) and does not change the result.
DEFAULT_MAX_PAIRS = 1 << 21


@dataclass(frozen=True)
class Raster:
    """What a rasterizer hands to interpolation.

    Attributes:
        tri_id: int64 (B, H, W) id of the visible triangle, −1 where nothing is drawn.
        bary: float32 (B, H, W, 3) perspective-correct barycentrics of the triangle's
            vertices 0, 1, 2 (0 where nothing is drawn).
        depth_ndc: float32 (B, H, W) NDC z of the visible surface (+inf where nothing is drawn).
    """

    tri_id: torch.Tensor
    bary: torch.Tensor
    depth_ndc: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """bool (B, H, W): a triangle covers the pixel."""
        return self.tri_id >= 0


@dataclass(frozen=True)
class _Screen:
    """Per-triangle screen data, flattened over the batch (T = B·F triangles)."""

    x: torch.Tensor  # (T, 3) pixel x of the vertices (continuous; centres at c + 0.5)
    y: torch.Tensor  # (T, 3) pixel y
    z: torch.Tensor  # (T, 3) NDC z
    area: torch.Tensor  # (T,) twice the signed area
    c0: torch.Tensor  # (T,) first column of the bounding box (int64)
    r0: torch.Tensor  # (T,) first row
    bw: torch.Tensor  # (T,) bounding-box width in pixels (≥ 0)
    count: torch.Tensor  # (T,) candidate pixels (0 for culled triangles)


def _screen(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int) -> _Screen:
    w = pos[..., 3:]
    safe_w = torch.where(w > 0, w, torch.ones_like(w))
    scale = pos.new_tensor([width / 2, height / 2, 1.0])
    offset = pos.new_tensor([width / 2, height / 2, 0.0])
    screen = torch.cat([torch.addcmul(offset, pos[..., :3] / safe_w, scale), w], dim=-1)  # (B, N, 4)
    v = screen[:, tri].reshape(-1, 3, 4)  # (T, 3 vertices, x y z w)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    live = (v[..., 3] > 0).all(-1) & torch.isfinite(v[..., :3]).flatten(1).all(-1)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    lo, hi = v[..., :3].amin(1), v[..., :3].amax(1)  # (T, 3) bounding box in x, y, z
    live &= (area != 0) & (lo[:, 2] <= 1) & (hi[:, 2] >= -1)

    # Pixel centres c + 0.5 inside [min, max]: c from ceil(min − 0.5) to floor(max − 0.5).
    first = torch.ceil(lo[:, :2] - 0.5)
    last = torch.floor(hi[:, :2] - 0.5)
    c0 = first[:, 0].clamp(0, width).long()
    r0 = first[:, 1].clamp(0, height).long()
    bw = (last[:, 0].clamp(-1, width - 1).long() - c0 + 1).clamp(min=0)
    bh = (last[:, 1].clamp(-1, height - 1).long() - r0 + 1).clamp(min=0)
    count = torch.where(live, bw * bh, torch.zeros_like(bw))
    return _Screen(x, y, z, area, c0, r0, bw, count)


def _chunks(count: torch.Tensor, max_pairs: int) -> Iterator[torch.Tensor]:
    """Ids of triangles with candidates, split so that each chunk has about ``max_pairs`` pairs."""
    ids = torch.nonzero(count > 0).squeeze(1)
    if ids.numel() == 0:
        return
    csum = torch.cumsum(count[ids], 0)
    group = torch.div(csum - 1, max_pairs, rounding_mode="floor")
    bounds = torch.searchsorted(group, torch.unique(group), right=True).tolist()
    start = 0
    for end in bounds:
        yield ids[start:end]
        start = end


def _candidates(s: _Screen, ids: torch.Tensor, height: int, width: int, faces_per_item: int):
    """(pixel linear id, triangle id, NDC z) of the covered candidate pixels of triangles ``ids``."""
    counts = s.count[ids]
    owner = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(owner.numel(), device=ids.device) - first[owner]
    t = ids[owner]
    col = s.c0[t] + k % s.bw[t]
    row = s.r0[t] + torch.div(k, s.bw[t], rounding_mode="floor")
    bary = _edge_bary(s, t, col, row)
    inside = (bary >= 0).all(-1)
    z = (bary * s.z[t]).sum(-1)
    inside &= (z >= -1) & (z <= 1)
    t, col, row, z = t[inside], col[inside], row[inside], z[inside]
    item = torch.div(t, faces_per_item, rounding_mode="floor")
    pix = (item * height + row) * width + col
    return pix, t, z


def _edge_bary(s: _Screen, t: torch.Tensor, col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentrics (P, 3) of pixel centres (col + 0.5, row + 0.5) in triangles ``t``."""
    x, y = s.x[t], s.y[t]
    px = col.to(x.dtype) + 0.5
    py = row.to(x.dtype) + 0.5
    e0 = (x[:, 2] - x[:, 1]) * (py - y[:, 1]) - (y[:, 2] - y[:, 1]) * (px - x[:, 1])
    e1 = (x[:, 0] - x[:, 2]) * (py - y[:, 2]) - (y[:, 0] - y[:, 2]) * (px - x[:, 2])
    e2 = (x[:, 1] - x[:, 0]) * (py - y[:, 0]) - (y[:, 1] - y[:, 0]) * (px - x[:, 0])
    return torch.stack([e0, e1, e2], dim=-1) / s.area[t, None]


def rasterize(
    pos_clip: torch.Tensor,
    tri: torch.Tensor,
    resolution: tuple[int, int],
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> Raster:
    """Rasterize B meshes sharing one triangle list.

    Args:
        pos_clip: float32 (B, N, 4) clip-space positions (see the module docstring).
        tri: int (F, 3) vertex ids, 0-based.
        resolution: (H, W) in pixels.
        max_pairs: candidate pixels per chunk (memory only).

    Returns:
        :class:`Raster` on ``pos_clip``'s device.
    """
    check_shape(pos_clip, ("B", "N", "4"), "pos_clip")
    check_shape(tri, ("F", "3"), "tri")
    height, width = (int(v) for v in resolution)
    b = pos_clip.shape[0]
    dev = pos_clip.device
    pos = pos_clip.float()
    tri = tri.to(device=dev, dtype=torch.long)
    n_faces = tri.shape[0]
    s = _screen(pos, tri, height, width)

    n_pix = b * height * width
    zbuf = torch.full((n_pix,), float("inf"), device=dev)
    chunks = list(_chunks(s.count, max_pairs))
    kept = None
    for ids in chunks:  # pass 1: nearest depth per pixel
        pix, t, z = _candidates(s, ids, height, width, n_faces)
        zbuf.scatter_reduce_(0, pix, z, reduce="amin", include_self=True)
        if len(chunks) == 1:
            kept = (pix, t, z)
    winner = torch.full((n_pix,), -1, dtype=torch.long, device=dev)
    for ids in chunks:  # pass 2: the triangle that owns that depth
        pix, t, z = kept if kept is not None else _candidates(s, ids, height, width, n_faces)
        hit = z == zbuf[pix]
        winner.scatter_reduce_(0, pix[hit], t[hit], reduce="amax", include_self=True)

    # Perspective-correct barycentrics of the winning triangle at each covered pixel.
    bary = torch.zeros((n_pix, 3), device=dev)
    covered = torch.nonzero(winner >= 0).squeeze(1)
    if covered.numel():
        t = winner[covered]
        rem = covered % (height * width)
        row = torch.div(rem, width, rounding_mode="floor")
        col = rem % width
        screen_bary = _edge_bary(s, t, col, row).clamp(min=0)
        item = torch.div(t, n_faces, rounding_mode="floor")
        vid = tri[t % n_faces]  # (P, 3)
        w = pos[item[:, None], vid, 3]  # (P, 3) clip w
        persp = screen_bary / w
        bary[covered] = persp / persp.sum(-1, keepdim=True)
    tri_id = torch.where(winner >= 0, winner % n_faces, winner)
    return Raster(
        tri_id=tri_id.view(b, height, width),
        bary=bary.view(b, height, width, 3),
        depth_ndc=zbuf.view(b, height, width),
    )


def interpolate(attr: torch.Tensor, raster: Raster, tri: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes with the raster's barycentrics.

    Args:
        attr: (B, N, C) or (N, C) per-vertex values.
        raster: from :func:`rasterize` with the same ``tri``.
        tri: int (F, 3).

    Returns:
        (B, H, W, C) in ``attr``'s dtype; 0 where nothing is drawn.
    """
    b, h, w = raster.tri_id.shape
    if attr.dim() == 2:
        attr = attr.unsqueeze(0).expand(b, -1, -1)
    check_shape(attr, (b, "N", "C"), "attr")
    n, c = attr.shape[1], attr.shape[2]
    tri = tri.to(device=attr.device, dtype=torch.long)
    mask = raster.mask
    vid = tri[raster.tri_id.clamp(min=0)]  # (B, H, W, 3)
    base = (torch.arange(b, device=attr.device) * n).view(b, 1, 1, 1)
    values = attr.reshape(b * n, c)[(vid + base).reshape(-1)].view(b, h, w, 3, c)
    out = (values * raster.bary.to(attr.dtype)[..., None]).sum(dim=3)
    return out * mask[..., None].to(attr.dtype)
