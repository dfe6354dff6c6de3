"""Face model (engine/face3d/model.py) and the built-in rasterizer (raster.py, render.py) on CPU.

Analytic cases first (one triangle, two overlapping triangles, a tilted plane), then the
full 35,709-vertex face of a synthetic BFM against a brute-force visibility check.
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from engine.face3d import raster
from engine.face3d.bfm import FaceModelArrays
from engine.face3d.model import SH_AC, ParametricFaceModel, rotation_matrix
from engine.face3d.nvdr import RendererError
from engine.face3d.render import FaceRenderer, camera_to_clip, render_faces, renderer_status
from tests.face3d_helpers import face_model, random_coeff, synthetic_bfm  # noqa: F401  (fixtures)

# -- face model -----------------------------------------------------------------------------


def _tiny_model(vertices: np.ndarray, recenter: bool = False) -> ParametricFaceModel:
    """One triangle, zero bases, grey albedo: enough to test transforms, normals and shading."""
    n = len(vertices)
    arrays = FaceModelArrays(
        mean_shape=np.asarray(vertices, np.float32).reshape(-1),
        id_base=np.zeros((3 * n, 80), np.float32),
        exp_base=np.zeros((3 * n, 64), np.float32),
        mean_tex=np.full(3 * n, 127.5, np.float32),
        tex_base=np.zeros((3 * n, 80), np.float32),
        tri=np.array([[0, 1, 2]]),
        point_buf=np.array([[0, 1, 1, 1, 1, 1, 1, 1]] * n),  # face 0, then the zero padding row
        keypoints=np.zeros(68, np.int64),
    )
    return ParametricFaceModel(arrays, "cpu", recenter=recenter)


def _rx(a):
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _ry(a):
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _rz(a):
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def test_rotation_is_rz_ry_rx():
    angles = torch.tensor([[0.3, -0.5, 0.2], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    r = rotation_matrix(angles).numpy()
    np.testing.assert_allclose(r[0], _rz(0.2) @ _ry(-0.5) @ _rx(0.3), atol=1e-12)
    np.testing.assert_allclose(r[1], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(r[2] @ [0, 1, 0], [0, math.cos(1), math.sin(1)], atol=1e-12)  # pitch tilts y to z
    np.testing.assert_allclose(r[0] @ r[0].T, np.eye(3), atol=1e-12)


def test_projection_and_transform_of_known_points():
    m = _tiny_model(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32))
    coeff = np.zeros((1, 257), np.float32)
    coeff[0, 225] = math.pi / 2  # yaw 90°: model x → world −z
    coeff[0, 254:257] = [0.1, 0.2, 0.5]
    geo = m.compute_for_render(coeff)
    cam = geo.vertex_cam[0].numpy()
    np.testing.assert_allclose(cam[0], [0.1, 0.2, 9.5], atol=1e-6)
    np.testing.assert_allclose(cam[1], [0.1, 0.2, 10.5], atol=1e-6)  # moved away from the camera
    uv = m.project(torch.tensor([[0.0, 0.0, 10.0], [1.0, 0.5, 10.0]])).numpy()
    np.testing.assert_allclose(uv, [[112, 112], [112 + 101.5, 112 + 50.75]], atol=1e-4)


def test_normals_and_sh_shading():
    m = _tiny_model(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32))  # counter-clockwise → +z
    geo = m.compute_for_render(np.zeros((1, 257), np.float32))
    np.testing.assert_allclose(geo.texture[0].numpy(), 0.5, atol=1e-7)
    np.testing.assert_allclose(geo.color[0].numpy(), 0.8 * SH_AC[0] * 0.5, atol=1e-6)  # ambient only
    coeff = np.zeros((1, 257), np.float32)
    coeff[0, 227 + 2] = 1.0  # red channel, band-1 z term: a1c1 · n_z with n = +z
    coeff[0, 227 + 9 + 3] = 1.0  # green channel, −a1c1 · n_x = 0 here
    color = m.compute_for_render(coeff).color[0].numpy()
    np.testing.assert_allclose(color[:, 0], (0.8 * SH_AC[0] + SH_AC[1]) * 0.5, atol=1e-6)
    np.testing.assert_allclose(color[:, 1], 0.8 * SH_AC[0] * 0.5, atol=1e-6)
    assert pytest.approx((0.886227, 1.772454, 2.427032), abs=1e-6) == SH_AC


# -- analytic rasterization -----------------------------------------------------------------


def _clip_from_pixels(xy_px: np.ndarray, z_ndc: float, size: int = 224, w: float = 1.0) -> torch.Tensor:
    """Clip positions whose pixel coordinates (x right, row down; centres at +0.5) are ``xy_px``."""
    ndc = xy_px / size * 2 - 1
    pts = np.c_[ndc * w, np.full(len(xy_px), z_ndc * w), np.full(len(xy_px), w)]
    return torch.tensor(pts, dtype=torch.float32)[None]


def _inside(tri_px: np.ndarray, size: int = 224) -> np.ndarray:
    """bool (size, size) pixel centres strictly inside the triangle (float64 half-planes)."""
    c = np.arange(size) + 0.5
    px, py = np.meshgrid(c, c, indexing="xy")
    sides = []
    for i in range(3):
        (x0, y0), (x1, y1) = tri_px[i], tri_px[(i + 1) % 3]
        sides.append((x1 - x0) * (py - y0) - (y1 - y0) * (px - x0))
    s = np.stack(sides)
    return np.all(s > 0, axis=0) | np.all(s < 0, axis=0)


def test_single_triangle_coverage_and_colour():
    tri_px = np.array([[20.3, 30.1], [180.7, 60.2], [90.4, 200.9]])
    pos = _clip_from_pixels(tri_px, 0.1)
    tri = torch.tensor([[0, 1, 2]])
    r = raster.rasterize(pos, tri, (224, 224))
    np.testing.assert_array_equal(r.mask[0].numpy(), _inside(tri_px))

    # A constant colour stays constant; an attribute linear in screen space gives the pixel centre.
    red = torch.tensor([[[1.0, 0.0, 0.0]] * 3])
    img = raster.interpolate(red, r, tri)[0].numpy()
    inside = _inside(tri_px)
    np.testing.assert_allclose(img[inside, 0], 1.0, atol=1e-6)
    assert img[~inside].max() == 0 and img[..., 1:].max() == 0
    xy_attr = torch.tensor(tri_px, dtype=torch.float32)[None]
    got = raster.interpolate(xy_attr, r, tri)[0].numpy()
    rows, cols = np.nonzero(_inside(tri_px))
    np.testing.assert_allclose(got[rows, cols, 0], cols + 0.5, atol=2e-3)
    np.testing.assert_allclose(got[rows, cols, 1], rows + 0.5, atol=2e-3)

    # Winding does not matter (no culling).
    r2 = raster.rasterize(pos, torch.tensor([[0, 2, 1]]), (224, 224))
    assert torch.equal(r2.mask, r.mask)


def test_two_overlapping_triangles_depth_order():
    near = np.array([[30.2, 40.3], [150.6, 50.1], [60.9, 170.7]])
    far = np.array([[80.1, 20.4], [200.3, 120.2], [70.6, 190.8]])
    pos = torch.cat([_clip_from_pixels(near, -0.2), _clip_from_pixels(far, 0.4)], dim=1)
    colours = torch.tensor([[[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 3])
    in_near, in_far = _inside(near), _inside(far)
    assert (in_near & in_far).sum() > 1000  # they do overlap
    for tri in (torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[3, 4, 5], [0, 1, 2]])):
        r = raster.rasterize(pos, tri, (224, 224))
        img = raster.interpolate(colours, r, tri)[0].numpy()
        np.testing.assert_array_equal(img[..., 0] > 0.5, in_near)  # the near one wins wherever it is
        np.testing.assert_array_equal(img[..., 1] > 0.5, in_far & ~in_near)
        np.testing.assert_allclose(r.depth_ndc[0].numpy()[in_near], -0.2, atol=1e-6)


def test_perspective_correct_depth_of_a_tilted_plane():
    # A triangle on the camera-space plane z = 10 + 0.8·x, rendered through the real camera.
    verts = np.array([[-0.8, -0.6], [0.9, -0.5], [0.1, 0.8]])
    z = 10 + 0.8 * verts[:, 0]
    cam = torch.tensor(np.c_[verts, z], dtype=torch.float32)[None]
    res = render_faces(cam, torch.tensor([[0, 1, 2]]), torch.ones(1, 3, 3), backend="torch")
    mask = res.mask[0, 0].numpy() > 0
    rows, cols = np.nonzero(mask)
    # Ray through pixel centre (c + .5, r + .5): x/z = (c + .5 − 112)/1015, y/z = (112 − (r + .5))/1015.
    kx = (cols + 0.5 - 112) / 1015
    want = 10 / (1 - 0.8 * kx)
    np.testing.assert_allclose(res.depth[0, 0].numpy()[rows, cols], want, rtol=2e-6)
    # The top vertex (y = 0.8 up) is drawn near the top rows: rows run top-down.
    assert rows.min() < 112 - 60 and res.image.shape == (1, 3, 224, 224)


def test_intersecting_triangles_split_where_depths_cross():
    # Flat triangle at z = 10 and a tilted one z = 10 + 0.5·x crossing it along x = 0.
    flat = np.array([[-0.9, -0.9, 10.0], [0.9, -0.9, 10.0], [0.0, 0.9, 10.0]])
    tilt_xy = np.array([[-0.8, -0.8], [0.8, -0.7], [0.0, 0.85]])
    tilt = np.c_[tilt_xy, 10 + 0.5 * tilt_xy[:, 0]]
    cam = torch.tensor(np.r_[flat, tilt], dtype=torch.float32)[None]
    colour = torch.tensor([[[1.0, 0, 0]] * 3 + [[0, 0, 1.0]] * 3])
    res = render_faces(cam, torch.tensor([[0, 1, 2], [3, 4, 5]]), colour, backend="torch")
    img = res.image[0].numpy()
    only_flat = render_faces(cam[:, :3], torch.tensor([[0, 1, 2]]), colour[:, :3], backend="torch").mask[0, 0]
    only_tilt = render_faces(cam[:, 3:], torch.tensor([[0, 1, 2]]), colour[:, 3:], backend="torch").mask[0, 0]
    both = (only_flat * only_tilt).numpy() > 0
    col = np.broadcast_to(np.arange(224)[None, :], (224, 224))
    blue = img[2] > 0.5
    # Left of the line x = 0 the tilted one is nearer (z < 10); right of it the flat one.
    assert (both & (col < 111)).sum() > 500 and (both & (col > 112)).sum() > 500
    assert blue[both & (col < 111)].all()
    assert not blue[both & (col > 112)].any()


def test_chunking_and_batching_do_not_change_the_result(face_model):  # noqa: F811
    geo = face_model.compute_for_render(random_coeff(2, seed=3))
    pos = camera_to_clip(geo.vertex_cam)
    full = raster.rasterize(pos, face_model.tri, (224, 224))
    small = raster.rasterize(pos, face_model.tri, (224, 224), max_pairs=5000)
    one = raster.rasterize(pos[1:], face_model.tri, (224, 224))
    assert torch.equal(full.tri_id, small.tri_id) and torch.equal(full.bary, small.bary)
    assert torch.equal(full.tri_id[1], one.tri_id[0]) and torch.allclose(full.bary[1], one.bary[0])


# -- the full face ----------------------------------------------------------------------------


def test_full_face_mask_is_sane(face_model):  # noqa: F811
    """What the full face looks like; how fast it renders is bench/bench_render_cpu.py's job."""
    assert face_model.num_vertices == 35709 and face_model.tri.shape == (70789, 3)
    renderer = FaceRenderer("cpu")
    assert renderer.backend_name == "torch"
    coeff = np.zeros((1, 257), np.float32)
    geo = face_model.compute_for_render(coeff)
    res = renderer(geo.vertex_cam, face_model.tri, geo.color)
    mask = res.mask[0, 0].numpy() > 0
    assert 0.15 < mask.mean() < 0.7
    rows, cols = np.nonzero(mask)
    assert abs(rows.mean() - 112) < 20 and abs(cols.mean() - 112) < 20  # mean face sits in the crop centre
    # Watertight: no uncovered pixel whose four neighbours are all covered (no cracks between triangles).
    inner = mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    assert int((inner & ~mask[1:-1, 1:-1]).sum()) == 0
    img = res.image[0].numpy()
    assert img[:, ~mask].max() == 0 and img[:, mask].min() > 0.2  # shaded skin inside, black outside
    # The projected landmarks lie on the rendered face (0.5 px convention offset, spec §4).
    lm = geo.lm68_224_yup[0].numpy()
    r_lm = np.clip(np.round(223 - lm[:, 1]).astype(int), 0, 223)
    c_lm = np.clip(np.round(lm[:, 0]).astype(int), 0, 223)
    assert mask[r_lm, c_lm].mean() > 0.9


def test_full_face_visibility_matches_brute_force(face_model):  # noqa: F811
    coeff = random_coeff(1, seed=5, pose=0.0)
    coeff[0, 224:227] = [0.2, 0.7, 0.1]  # strong yaw: the cap occludes part of itself
    geo = face_model.compute_for_render(coeff)
    pos = camera_to_clip(geo.vertex_cam)
    r = raster.rasterize(pos, face_model.tri, (224, 224))
    p = pos[0].double().numpy()
    ndc = p[:, :3] / p[:, 3:]
    px = (ndc[:, 0] + 1) * 112
    py = (ndc[:, 1] + 1) * 112
    tri = face_model.tri.numpy()
    x, y, z = px[tri], py[tri], ndc[tri, 2]
    rng = np.random.default_rng(0)
    covered = np.argwhere(r.mask[0].numpy())
    checked = 0
    for row, col in covered[rng.choice(len(covered), 40, replace=False)]:
        cx, cy = col + 0.5, row + 0.5
        e = [(x[:, (i + 2) % 3] - x[:, (i + 1) % 3]) * (cy - y[:, (i + 1) % 3])
             - (y[:, (i + 2) % 3] - y[:, (i + 1) % 3]) * (cx - x[:, (i + 1) % 3]) for i in range(3)]
        e = np.stack(e, 1)
        area = e.sum(1)
        hit = np.all(e * np.sign(area)[:, None] >= 0, axis=1) & (area != 0)
        depth = (e[hit] / area[hit, None] * z[hit]).sum(1)
        nearest = np.flatnonzero(hit)[np.argmin(depth)]
        got = int(r.tri_id[0, row, col])
        assert got == nearest or abs(depth.min() - depth[np.flatnonzero(hit) == got].min()) < 1e-6
        checked += 1
    assert checked == 40


# -- backend choice -----------------------------------------------------------------------------


def test_renderer_status_on_cpu(monkeypatch):
    monkeypatch.delenv("STUDIO_RENDERER", raising=False)
    st = renderer_status("cpu")
    assert st.backend == "torch" and not st.nvdiffrast_ok and st.reason
    assert "built-in torch rasterizer" in st.describe()
    if not torch.cuda.is_available():
        assert renderer_status().device == "cpu"
        assert "NVIDIA" in st.reason or "CPU-only" in st.reason
        with pytest.raises(RendererError, match="CUDA devices only"):
            FaceRenderer("cpu", "nvdiffrast")
    monkeypatch.setenv("STUDIO_RENDERER", "opengl")
    with pytest.raises(RendererError, match="unknown renderer 'opengl'"):
        FaceRenderer("cpu")


def test_missing_toolkit_is_reported_in_plain_words(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from engine.face3d import nvdr

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert "no CUDA toolkit found" in nvdr.toolkit_problem() and "nvcc" in nvdr.toolkit_problem()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert nvdr.toolkit_problem().startswith("no CUDA toolkit found: nvdiffrast compiles")


def test_loader_fix_registers_the_built_plugin(monkeypatch):
    """nvdiffrast imports its plugin by name after torch built it; torch no longer registers it."""
    import importlib

    from torch.utils import cpp_extension

    from engine.face3d import nvdr

    name = "nvdiffrast_plugin_fake_torch"
    built = types.ModuleType(name)
    calls = []

    def get_plugin(gl=False):  # nvdiffrast 0.3.3's loader, minus the build
        calls.append(gl)
        return importlib.import_module(name)

    ops = types.ModuleType("nvdiffrast.torch.ops")
    ops._get_plugin = get_plugin
    dr = types.ModuleType("nvdiffrast.torch")
    dr.ops = ops
    monkeypatch.setitem(sys.modules, "nvdiffrast", types.ModuleType("nvdiffrast"))
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", dr)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch.ops", ops)
    monkeypatch.setattr(nvdr, "nvdiffrast_problem", lambda: None)
    monkeypatch.setattr(cpp_extension, "_import_module_from_library", lambda n, path, py: built)
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert nvdr.load_nvdiffrast() is dr
        assert sys.modules[name] is built and calls == [False, False]
    finally:
        sys.modules.pop(name, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_render_compare.py there)")
def test_backends_agree_on_gpu(synthetic_bfm):  # noqa: F811
    pytest.importorskip("nvdiffrast")
    model = ParametricFaceModel.from_dir(synthetic_bfm, "cuda")
    geo = model.compute_for_render(random_coeff(8, seed=11))
    a = FaceRenderer("cuda", "nvdiffrast")(geo.vertex_cam, model.tri, geo.color)
    b = FaceRenderer("cuda", "torch")(geo.vertex_cam, model.tri, geo.color)
    ma, mb = a.mask[:, 0] > 0, b.mask[:, 0] > 0
    iou = (ma & mb).flatten(1).sum(1) / (ma | mb).flatten(1).sum(1)
    both = (ma & mb)[:, None]
    diff = ((a.image.clamp(0, 1) - b.image.clamp(0, 1)).abs() * both).flatten(1).sum(1)
    mean_diff = diff / (3 * both.flatten(1).sum(1)) * 255
    assert iou.min() >= 0.99 and mean_diff.max() < 2.0
