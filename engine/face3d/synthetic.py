"""Synthetic stand-ins for the licensed BFM files, for tests, benchmarks and demos.

:func:`write_synthetic_sources` writes ``01_MorphableModel.mat`` and ``Exp_Pca.bin`` with the
real layouts (keys, shapes, dtypes, byte layout) and made-up values; together with the real
Deep3DFaceRecon index files they convert like the real thing. The values are **not** a face
model: the mean shape is a smooth face-sized cap on the real front-face mesh (a Tutte
embedding of its triangles, placed so that the 68 keypoints sit near Deep3D's 3D landmark
template), and the bases are smooth random fields, so renders look like a plausible mask and
both renderers can be compared on realistic triangle sizes. Rows of vertices the front model
does not use are plain random numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.face3d import bfm as B


def _outer_boundary(tri: np.ndarray, n: int) -> np.ndarray:
    """Vertex ids of the longest boundary loop of a triangle mesh, in order."""
    edges = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    lo, hi = edges.min(1), edges.max(1)
    key = lo * n + hi
    uniq, counts = np.unique(key, return_counts=True)
    on_boundary = np.isin(key, uniq[counts == 1])
    succ = dict(zip(edges[on_boundary, 0].tolist(), edges[on_boundary, 1].tolist(), strict=True))
    loops, seen = [], set()
    for start in succ:
        if start in seen:
            continue
        loop, v = [start], succ[start]
        seen.add(start)
        while v != start:
            loop.append(v)
            seen.add(v)
            v = succ[v]
        loops.append(loop)
    return np.asarray(max(loops, key=len), dtype=np.int64)


def _tutte_embedding(tri: np.ndarray, n: int) -> np.ndarray:
    """float64 (n, 2): a planar layout of a disk-like mesh (boundary on the unit circle)."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    edges = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    adj = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    adj = ((adj + adj.T) > 0).astype(np.float64)
    lap = sp.diags(np.asarray(adj.sum(1)).ravel()) - adj
    boundary = _outer_boundary(tri, n)
    angle = 2 * np.pi * np.arange(len(boundary)) / len(boundary)
    xy_b = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    inner = np.setdiff1d(np.arange(n), boundary)
    lap = lap.tocsr()
    solve = spl.factorized(lap[inner][:, inner].tocsc())
    rhs = -(lap[inner][:, boundary] @ xy_b)
    xy = np.zeros((n, 2))
    xy[boundary] = xy_b
    xy[inner] = np.stack([solve(rhs[:, 0]), solve(rhs[:, 1])], axis=1)
    return xy


def synthetic_front_shape(index_dir: str | Path) -> np.ndarray:
    """float64 (35709, 3) face-sized cap on the front mesh, decimetres, y up, nose towards +z."""
    import scipy.io

    index_dir = Path(index_dir)
    info = scipy.io.loadmat(str(index_dir / B.INFO_NAME), variable_names=["tri", "keypoints"])
    tri = info["tri"].astype(np.int64) - 1
    keypoints = info["keypoints"].reshape(-1).astype(np.int64) - 1
    xy = _tutte_embedding(tri, B.N_FRONT)

    lm_path = index_dir / "similarity_Lm3D_all.mat"
    if lm_path.is_file():
        lm3d = scipy.io.loadmat(str(lm_path))["lm"].astype(np.float64)
    else:  # a generic oval: keypoints spread over ±0.8 dm
        lm3d = np.c_[0.8 * xy[keypoints], np.zeros(68)]
    # Affine map of the layout that puts the keypoints nearest the template's x, y.
    a = np.c_[xy[keypoints], np.ones(68)]
    affine = np.linalg.lstsq(a, lm3d[:, :2], rcond=None)[0]
    xy = np.c_[xy, np.ones(B.N_FRONT)] @ affine

    def quad(p: np.ndarray) -> np.ndarray:
        return np.c_[np.ones(len(p)), p, p**2, p[:, 0] * p[:, 1]]

    cz = np.linalg.lstsq(quad(xy[keypoints]), lm3d[:, 2], rcond=None)[0]
    return np.c_[xy, quad(xy) @ cz]


def _smooth_fields(xy: np.ndarray, k: int, rng: np.random.Generator, freq: float) -> np.ndarray:
    """float32 (V·3, k) smooth random fields over vertices at ``xy`` (V, 2), xyz interleaved."""
    v = xy.shape[0]
    f = rng.normal(0.0, freq, size=(2, k)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(3, k)).astype(np.float32)
    arg = xy.astype(np.float32) @ f  # (V, k)
    out = np.cos(arg[:, None, :] + phase[None])  # (V, 3, k)
    return out.reshape(v * 3, k).astype(np.float32)


class _Recipe:
    """The made-up values on the 35,709 front vertices, shared by both writers."""

    def __init__(self, index_dir: Path, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        src = B.BFMSources(
            bfm09=Path(),
            exp_pca=Path(),
            std_exp=index_dir / B.STD_EXP_NAME,
            front_idx=index_dir / B.FRONT_IDX_NAME,
            exp_idx=index_dir / B.EXP_IDX_NAME,
            info=index_dir / B.INFO_NAME,
        )
        self.index_exp, self.index_shape = B.load_indices(src)
        self.std_exp = B.read_std_exp(src.std_exp)
        front = synthetic_front_shape(index_dir)  # (35709, 3) dm
        self.xy = front[:, :2]
        self.shape_mu = (front * 1e5).reshape(-1).astype(np.float32)  # µm, xyz interleaved
        skin = np.array([205.0, 160.0, 140.0])
        shade = 1.0 - 0.15 * np.clip((self.xy**2).sum(1), 0, 1)
        self.tex_mu = (shade[:, None] * skin[None]).reshape(-1).astype(np.float32)
        k = np.arange(1, 200, dtype=np.float32)
        self.shape_ev = (1e5 * 0.03 / np.sqrt(k)).astype(np.float32).reshape(-1, 1)  # ~0.03 dm per unit
        self.tex_ev = (12.0 / np.sqrt(k)).astype(np.float32).reshape(-1, 1)

    def shape_pc(self, k: int) -> np.ndarray:
        return _smooth_fields(self.xy, k, self.rng, 1.5)

    def tex_pc(self, k: int) -> np.ndarray:
        return _smooth_fields(self.xy, k, self.rng, 2.0)

    def exp_pc(self, k: int) -> np.ndarray:
        # × std_exp / 1e5 (≈ 4.5 for the first component) gives ≈ 0.02 dm per unit coefficient.
        return _smooth_fields(self.xy, k, self.rng, 2.0) * np.float32(0.005)


def _rows(index: np.ndarray) -> np.ndarray:
    """Row ids of vertices ``index`` in an xyz-interleaved (3V, K) array."""
    return (3 * index[:, None] + np.arange(3)).reshape(-1)


def write_synthetic_sources(index_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a fake ``01_MorphableModel.mat`` and ``Exp_Pca.bin`` (real layouts) to ``out_dir``.

    Args:
        index_dir: folder with Deep3DFaceRecon's index files (``std_exp.txt``,
            ``BFM_front_idx.mat``, ``BFM_exp_idx.mat``, ``facemodel_info.mat``, optionally
            ``similarity_Lm3D_all.mat``).
        out_dir: destination folder (created). The index files are not copied.
        seed: random seed.

    Returns:
        ``out_dir``. Peak memory is about 0.6 GB (two float32 160470×199 arrays).
    """
    import scipy.io

    index_dir, out_dir = Path(index_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r = _Recipe(index_dir, seed)
    rng = r.rng
    rows_shape, rows_exp = _rows(r.index_shape), _rows(r.index_exp)

    def big(fields: np.ndarray, k: int) -> np.ndarray:
        out = rng.standard_normal((3 * B.N_BFM09, k), dtype=np.float32)
        out[rows_shape] = fields
        return out

    shape_mu = rng.standard_normal((3 * B.N_BFM09, 1), dtype=np.float32) * np.float32(1e4)
    shape_mu[rows_shape, 0] = r.shape_mu
    tex_mu = rng.uniform(0, 255, size=(3 * B.N_BFM09, 1)).astype(np.float32)
    tex_mu[rows_shape, 0] = r.tex_mu
    bfm09 = {
        "shapeMU": shape_mu,
        "shapePC": big(r.shape_pc(199), 199),
        "shapeEV": r.shape_ev,
        "texMU": tex_mu,
        "texPC": big(r.tex_pc(199), 199),
        "texEV": r.tex_ev,
        "segbin": np.zeros((B.N_BFM09, 4), dtype=np.uint8),  # present in the real file, unused
    }
    scipy.io.savemat(str(out_dir / B.BFM09_NAME), bfm09)
    del bfm09

    n_exp = 3 * B.N_EXP
    exp_pc = rng.standard_normal((n_exp, B.EXP_DIM), dtype=np.float32) * np.float32(0.005)
    exp_pc[rows_exp] = r.exp_pc(B.EXP_DIM)
    with open(out_dir / B.EXP_NAME, "wb") as f:
        f.write(np.array([B.EXP_DIM], dtype="<i4").tobytes())
        f.write(np.zeros(n_exp, dtype="<f4").tobytes())
        f.write(np.ascontiguousarray(exp_pc.T, dtype="<f4").tobytes())
    return out_dir


def write_synthetic_model(index_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a fake ``BFM_model_front.mat`` straight away (no BFM09-sized arrays; ~1 s).

    Same keys, shapes and dtypes as a conversion of :func:`write_synthetic_sources` output
    (not the same values). ``index_dir`` as there.

    Returns:
        The path of ``out_dir/BFM_model_front.mat``.
    """
    import scipy.io

    index_dir = Path(index_dir)
    r = _Recipe(index_dir, seed)
    info = scipy.io.loadmat(str(index_dir / B.INFO_NAME), variable_names=list(B.INFO_SHAPES))
    model = {
        "meanshape": (r.shape_mu / np.float32(1e5)).reshape(1, -1),
        "meantex": r.tex_mu.reshape(1, -1),
        "idBase": r.shape_pc(B.N_ID) * r.shape_ev[: B.N_ID].reshape(1, -1) / 1e5,
        "exBase": r.exp_pc(B.N_EXP_KEPT) * r.std_exp[: B.N_EXP_KEPT].reshape(1, -1) / 1e5,
        "texBase": r.tex_pc(B.N_TEX) * r.tex_ev[: B.N_TEX].reshape(1, -1),
        **{k: info[k] for k in B.INFO_SHAPES},
    }
    out = Path(out_dir) / B.MODEL_NAME
    B.atomic_savemat(out, model)
    return out
