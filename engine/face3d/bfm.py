"""BFM setup: check the licensed sources, convert them to ``BFM_model_front.mat``, load it (spec §3).

Pure NumPy/SciPy (no torch): the dashboard's setup page and ``doctor`` use it.

Sources (searched in the given folders, in order):

* ``01_MorphableModel.mat`` — Basel Face Model 2009 (licensed), keys ``shapeMU shapePC shapeEV
  texMU texPC texEV`` over 53,490 vertices, xyz interleaved, shape in µm, texture 0–255.
* ``Exp_Pca.bin`` — Guo et al.'s expression basis (from the CoarseData archive): int32 79, a
  float32 mean of 159,645 values (unused), then 79 × 159,645 float32, component-major.
* ``std_exp.txt``, ``BFM_front_idx.mat``, ``BFM_exp_idx.mat``, ``facemodel_info.mat`` — index
  files from Deep3DFaceRecon_pytorch's ``BFM/`` folder.

Output: ``BFM_model_front.mat`` with exactly the reference keys and shapes (:data:`MODEL_SHAPES`),
written with ``savemat`` defaults (MAT v5, uncompressed). Dtypes follow the reference's NumPy
arithmetic, which keeps the input dtype: with a single-precision BFM09 (the usual file)
``meanshape meantex idBase texBase`` are float32, and ``exBase`` is float64 because the
reference multiplies the float32 basis by the float64 ``std_exp.txt`` values. The values are
the reference's bit for bit: the same element-wise products and divisions, only restricted to
the columns kept (80/64/80), which also keeps peak memory under ~1.5 GB.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import WeightsError, WeightsMissingError

log = logging.getLogger(__name__)

MODEL_NAME = "BFM_model_front.mat"
BFM09_NAME = "01_MorphableModel.mat"
EXP_NAME = "Exp_Pca.bin"
STD_EXP_NAME = "std_exp.txt"
FRONT_IDX_NAME = "BFM_front_idx.mat"
EXP_IDX_NAME = "BFM_exp_idx.mat"
INFO_NAME = "facemodel_info.mat"
INDEX_NAMES = (STD_EXP_NAME, FRONT_IDX_NAME, EXP_IDX_NAME, INFO_NAME)

N_BFM09 = 53490  #: vertices of BFM09
N_EXP = 53215  #: vertices of Guo et al.'s expression mesh
N_FRONT = 35709  #: vertices of the front face model
N_TRI = 70789  #: triangles of the front face model
N_ID, N_EXP_KEPT, N_TEX = 80, 64, 80
EXP_DIM = 79
EXP_PCA_BYTES = 4 + 4 * 3 * N_EXP + 4 * EXP_DIM * 3 * N_EXP  # 51,086,404

#: Keys of ``01_MorphableModel.mat`` used, with their shapes.
BFM09_SHAPES: dict[str, tuple[int, int]] = {
    "shapeMU": (3 * N_BFM09, 1),
    "shapePC": (3 * N_BFM09, 199),
    "shapeEV": (199, 1),
    "texMU": (3 * N_BFM09, 1),
    "texPC": (3 * N_BFM09, 199),
    "texEV": (199, 1),
}

#: Keys of ``facemodel_info.mat`` copied verbatim into the model.
INFO_SHAPES: dict[str, tuple[int, int]] = {
    "tri": (N_TRI, 3),
    "point_buf": (N_FRONT, 8),
    "tri_mask2": (54681, 3),
    "keypoints": (1, 68),
    "frontmask2_idx": (27660, 1),
    "skinmask": (1, N_FRONT),
}

#: Every key of ``BFM_model_front.mat`` with its shape, in the reference's order.
MODEL_SHAPES: dict[str, tuple[int, int]] = {
    "meanshape": (1, 3 * N_FRONT),
    "meantex": (1, 3 * N_FRONT),
    "idBase": (3 * N_FRONT, N_ID),
    "exBase": (3 * N_FRONT, N_EXP_KEPT),
    "texBase": (3 * N_FRONT, N_TEX),
    **INFO_SHAPES,
}

BFM09_HELP = (
    "01_MorphableModel.mat is the Basel Face Model 2009: register on the BFM09 download page "
    "(faces.dmi.unibas.ch) and take PublicMM1/01_MorphableModel.mat from the archive"
)
EXP_HELP = (
    "Exp_Pca.bin is Guo et al.'s expression basis: download the CoarseData archive linked from "
    "Deep3DFaceRecon_pytorch's README ('Prepare prerequisite models') and take Exp_Pca.bin from it"
)
INDEX_HELP = (
    "the index files (std_exp.txt, BFM_front_idx.mat, BFM_exp_idx.mat, facemodel_info.mat) come "
    "from the BFM/ folder of Deep3DFaceRecon_pytorch (github.com/sicxu/Deep3DFaceRecon_pytorch)"
)
MODEL_HELP = (
    f"build it with 'python -m engine bfm convert --from DIR', where DIR holds {BFM09_NAME} and "
    f"{EXP_NAME} (and the Deep3DFaceRecon index files)"
)


def _help_for(name: str) -> str:
    if name == BFM09_NAME:
        return BFM09_HELP
    if name == EXP_NAME:
        return EXP_HELP
    if name == MODEL_NAME:
        return MODEL_HELP
    return INDEX_HELP


# ---------------------------------------------------------------------------------------
# Finding and checking the sources


@dataclass(frozen=True)
class BFMSources:
    """Where each conversion input was found (all checked by :func:`check_sources`)."""

    bfm09: Path
    exp_pca: Path
    std_exp: Path
    front_idx: Path
    exp_idx: Path
    info: Path


def find_file(name: str, folders: Sequence[str | Path]) -> Path:
    """The first ``folder/name`` that exists.

    Raises:
        WeightsMissingError: in none of them; the message says where the file comes from.
    """
    tried = []
    for folder in folders:
        if folder is None:
            continue
        path = Path(folder) / name
        if path.is_file():
            return path
        tried.append(str(Path(folder)))
    where = ", ".join(dict.fromkeys(tried)) or "(no folder given)"
    raise WeightsMissingError(f"{name} not found in {where}; {_help_for(name)}")


def find_sources(folders: Sequence[str | Path]) -> BFMSources:
    """Locate the six conversion inputs; each is taken from the first folder that has it."""
    return BFMSources(
        bfm09=find_file(BFM09_NAME, folders),
        exp_pca=find_file(EXP_NAME, folders),
        std_exp=find_file(STD_EXP_NAME, folders),
        front_idx=find_file(FRONT_IDX_NAME, folders),
        exp_idx=find_file(EXP_IDX_NAME, folders),
        info=find_file(INFO_NAME, folders),
    )


def _whosmat(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name → (shape, MATLAB class) of every variable, without reading the data."""
    import scipy.io

    try:
        return {name: (tuple(shape), cls) for name, shape, cls in scipy.io.whosmat(str(path))}
    except NotImplementedError:  # scipy says "Please use HDF reader for matlab v7.3 files"
        raise WeightsError(
            f"{path}: a MATLAB v7.3 (HDF5) file; expected a v5/v7 .mat as distributed "
            f"({_help_for(path.name)})"
        ) from None
    except (ValueError, TypeError, OSError, EOFError) as e:
        raise WeightsError(f"{path}: not a readable MATLAB .mat file ({e}); {_help_for(path.name)}") from None


def _check_mat_shapes(
    path: Path, shapes: dict[str, tuple[int, int]], vectors: Sequence[str] = ()
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Raise :class:`WeightsError` unless ``path`` holds every key of ``shapes`` with that shape.

    Keys named in ``vectors`` may be stored as a row or a column (only the size must match,
    as the reference reshapes them).
    """
    info = _whosmat(path)
    missing = [k for k in shapes if k not in info]
    if missing:
        found = ", ".join(sorted(info)) or "nothing"
        raise WeightsError(
            f"{path}: missing key(s) {', '.join(missing)} (found {found}); {_help_for(path.name)}"
        )
    for key, want in shapes.items():
        got = info[key][0]
        ok = got == want
        if key in vectors:
            ok = len(got) == 2 and 1 in got and int(np.prod(got)) == int(np.prod(want))
        if not ok:
            raise WeightsError(f"{path}: key {key} has shape {got}, expected {want}; {_help_for(path.name)}")
    return info


def _load_mat(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path), variable_names=list(keys))
    except (ValueError, TypeError, OSError, EOFError) as e:
        raise WeightsError(f"{path}: cannot be read ({e}); {_help_for(path.name)}") from None


def _check_index(path: Path, key: str, arr: np.ndarray, size: int, max_value: int) -> np.ndarray:
    """A 1-based integer index vector of ``size`` entries in ``[1, max_value]`` → 0-based int64."""
    flat = np.asarray(arr).reshape(-1)
    if flat.size != size:
        raise WeightsError(f"{path}: {key} has {flat.size} entries, expected {size}; {INDEX_HELP}")
    as_float = flat.astype(np.float64)
    if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
        raise WeightsError(
            f"{path}: {key} holds non-integer values; expected 1-based vertex ids; {INDEX_HELP}"
        )
    lo, hi = int(as_float.min()), int(as_float.max())
    if lo < 1 or hi > max_value:
        raise WeightsError(
            f"{path}: {key} spans {lo}..{hi}, expected 1-based ids within 1..{max_value}; {INDEX_HELP}"
        )
    return as_float.astype(np.int64) - 1


def check_exp_pca(path: Path) -> None:
    """Raise :class:`WeightsError` unless ``path`` looks like Guo et al.'s ``Exp_Pca.bin``."""
    size = path.stat().st_size
    if size != EXP_PCA_BYTES:
        raise WeightsError(
            f"{path}: {size:,} bytes, expected {EXP_PCA_BYTES:,} (int32 79 + float32 mean of "
            f"{3 * N_EXP} + float32 79x{3 * N_EXP} basis); {EXP_HELP}"
        )
    with open(path, "rb") as f:
        dim = int(np.frombuffer(f.read(4), dtype="<i4")[0])
    if dim != EXP_DIM:
        raise WeightsError(f"{path}: header says {dim} components, expected {EXP_DIM}; {EXP_HELP}")


def read_std_exp(path: Path) -> np.ndarray:
    """``std_exp.txt`` → float64 (79,) expression standard deviations (as ``np.loadtxt`` reads them)."""
    try:
        values = np.loadtxt(str(path), dtype=np.float64).reshape(-1)
    except ValueError as e:
        raise WeightsError(f"{path}: not a list of numbers ({e}); {INDEX_HELP}") from None
    if values.size != EXP_DIM or not np.all(np.isfinite(values)):
        raise WeightsError(f"{path}: {values.size} values, expected {EXP_DIM} finite numbers; {INDEX_HELP}")
    return values


def check_file(path: str | Path, name: str) -> None:
    """Check one face-model file in the role ``name`` (its file name in ``BFM/``) from its
    headers, size and small index arrays, without reading the large bases.

    Raises:
        ValueError: ``name`` is not a face-model file name.
        WeightsError: the file is not a valid ``name`` (message says what is wrong and where
            the right file comes from).
    """
    path = Path(path)
    checks = {
        MODEL_NAME: lambda: check_model(path),
        EXP_NAME: lambda: check_exp_pca(path),
        STD_EXP_NAME: lambda: read_std_exp(path),
        BFM09_NAME: lambda: _check_mat_shapes(path, BFM09_SHAPES, vectors=("shapeMU", "shapeEV", "texMU", "texEV")),
        FRONT_IDX_NAME: lambda: _check_mat_shapes(path, {"idx": (N_FRONT, 1)}, vectors=("idx",)),
        EXP_IDX_NAME: lambda: _check_mat_shapes(path, {"trimIndex": (N_EXP, 1)}, vectors=("trimIndex",)),
        INFO_NAME: lambda: _check_mat_shapes(path, INFO_SHAPES),
    }
    if name not in checks:
        raise ValueError(f"unknown face-model file {name!r}; expected one of {', '.join(checks)}")
    checks[name]()


def check_sources(src: BFMSources) -> None:
    """Validate every conversion input without reading the large arrays.

    Raises:
        WeightsError: the first problem found, naming the file, what is wrong and where the
            right file comes from.
    """
    for path, name in ((src.exp_pca, EXP_NAME), (src.std_exp, STD_EXP_NAME), (src.front_idx, FRONT_IDX_NAME),
                       (src.exp_idx, EXP_IDX_NAME), (src.info, INFO_NAME)):
        check_file(path, name)
    load_indices(src)
    check_file(src.bfm09, BFM09_NAME)


def load_indices(src: BFMSources) -> tuple[np.ndarray, np.ndarray]:
    """(index_exp, index_shape): 0-based int64 (35709,) ids into the expression and BFM09 meshes."""
    index_exp = _check_index(src.front_idx, "idx", _load_mat(src.front_idx, ["idx"])["idx"], N_FRONT, N_EXP)
    trim = _check_index(
        src.exp_idx, "trimIndex", _load_mat(src.exp_idx, ["trimIndex"])["trimIndex"], N_EXP, N_BFM09
    )
    return index_exp, trim[index_exp]


# ---------------------------------------------------------------------------------------
# Conversion


def read_exp_basis(path: Path, keep: int = N_EXP_KEPT) -> np.ndarray:
    """The expression basis of ``Exp_Pca.bin``: float32 (159645, keep), vertex-major rows.

    The file stores 79 component rows of 159,645 values after a 4-byte count and the
    (discarded) mean; only the first ``keep`` components are read.
    """
    check_exp_pca(path)
    n = 3 * N_EXP
    offset = 4 + 4 * n
    basis = np.fromfile(str(path), dtype="<f4", count=keep * n, offset=offset).reshape(keep, n)
    return np.ascontiguousarray(basis.T).astype(np.float32, copy=False)


def _gather_vertices(flat: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(3V, K) or (3V, 1) xyz-interleaved rows → the rows of vertices ``index``, (3·len(index), K)."""
    k = flat.shape[1]
    return flat.reshape(-1, 3, k)[index].reshape(-1, k)


def convert_bfm(
    folders: Sequence[str | Path],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build ``out_dir/BFM_model_front.mat`` from BFM09, Exp_Pca.bin and the index files.

    Every input is looked up in ``folders`` in order (e.g. ``[user_download, "BFM"]``) and
    validated before anything is written; the output is written atomically.

    Args:
        folders: folders to search for the six inputs.
        out_dir: destination folder (created if needed).
        overwrite: replace an existing model (otherwise it is validated and kept).
        progress: optional callback receiving one short line per step.

    Returns:
        The path of ``BFM_model_front.mat``.

    Raises:
        WeightsMissingError: an input is missing (the message says where it comes from).
        WeightsError: an input is not the expected file; or an existing model is invalid.
    """
    say = progress or (lambda msg: log.info("%s", msg))
    out_dir = Path(out_dir)
    out = out_dir / MODEL_NAME
    if out.is_file() and not overwrite:
        check_model(out)
        say(f"{out} exists and is valid; kept (use overwrite to rebuild)")
        return out

    src = find_sources(folders)
    say("checking inputs")
    check_sources(src)
    index_exp, index_shape = load_indices(src)

    say(f"reading {src.bfm09}")
    bfm = _load_mat(src.bfm09, list(BFM09_SHAPES))

    def first_cols(pc: np.ndarray, ev: np.ndarray, k: int) -> np.ndarray:
        # The reference multiplies all 199 columns then keeps k; the element-wise products are
        # the same restricted to the kept columns, so only those are computed.
        return pc[:, :k] * np.reshape(ev, (1, -1))[:, :k]

    id_base = first_cols(bfm["shapePC"], bfm["shapeEV"], N_ID) / 1e5
    tex_base = first_cols(bfm["texPC"], bfm["texEV"], N_TEX)
    mean_shape = np.reshape(bfm["shapeMU"], (-1, 3)) / 1e5
    mean_tex = np.reshape(bfm["texMU"], (-1, 3))
    del bfm

    say(f"reading {src.exp_pca}")
    exp_pc = read_exp_basis(src.exp_pca)
    exp_ev = read_std_exp(src.std_exp)
    ex_base = first_cols(exp_pc, exp_ev, N_EXP_KEPT) / 1e5  # float32 × float64 → float64, as the reference
    del exp_pc

    model = {
        "meanshape": mean_shape[index_shape].reshape(1, -1),
        "meantex": mean_tex[index_shape].reshape(1, -1),
        "idBase": _gather_vertices(id_base, index_shape),
        "exBase": _gather_vertices(ex_base, index_exp),
        "texBase": _gather_vertices(tex_base, index_shape),
    }
    del id_base, tex_base, ex_base
    info = _load_mat(src.info, list(INFO_SHAPES))
    model.update({k: info[k] for k in INFO_SHAPES})
    for key, want in MODEL_SHAPES.items():  # internal consistency, cannot fail on checked inputs
        assert model[key].shape == want, (key, model[key].shape, want)

    say(f"writing {out}")
    atomic_savemat(out, model)
    return out


def atomic_savemat(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            scipy.io.savemat(f, arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------
# The converted model


def check_model(path: str | Path) -> None:
    """Raise unless ``path`` is a ``BFM_model_front.mat`` with the reference keys, shapes and indices.

    Reads only the headers and the small index arrays.

    Raises:
        WeightsMissingError: no such file.
        WeightsError: a key is missing or has another shape, or an index is out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsMissingError(f"{path} not found; {MODEL_HELP}")
    _check_mat_shapes(path, MODEL_SHAPES)
    small = _load_mat(path, ["tri", "point_buf", "keypoints"])
    _check_index(path, "tri", small["tri"], 3 * N_TRI, N_FRONT)
    _check_index(path, "point_buf", small["point_buf"], 8 * N_FRONT, N_TRI + 1)
    _check_index(path, "keypoints", small["keypoints"], 68, N_FRONT)


@dataclass(frozen=True)
class FaceModelArrays:
    """``BFM_model_front.mat`` as the face model uses it (spec §3.4 construction).

    Attributes:
        mean_shape: float32 (3N,) mean shape, decimetres, xyz interleaved (not recentred).
        id_base: float32 (3N, 80) identity basis.
        exp_base: float32 (3N, 64) expression basis.
        mean_tex: float32 (3N,) mean albedo, 0–255.
        tex_base: float32 (3N, 80) albedo basis.
        tri: int64 (F, 3) vertex ids per triangle, **0-based**.
        point_buf: int64 (N, 8) adjacent triangle ids per vertex, 0-based; ``F`` is padding.
        keypoints: int64 (68,) vertex ids of the 68 landmarks, 0-based.
    """

    mean_shape: np.ndarray
    id_base: np.ndarray
    exp_base: np.ndarray
    mean_tex: np.ndarray
    tex_base: np.ndarray
    tri: np.ndarray
    point_buf: np.ndarray
    keypoints: np.ndarray

    @property
    def num_vertices(self) -> int:
        return int(self.mean_shape.shape[0] // 3)


def load_model(path: str | Path) -> FaceModelArrays:
    """Load and check ``BFM_model_front.mat``: bases cast to float32, indices made 0-based.

    Raises:
        WeightsMissingError, WeightsError: as :func:`check_model`.
    """
    path = Path(path)
    check_model(path)
    m = _load_mat(
        path, ["meanshape", "meantex", "idBase", "exBase", "texBase", "tri", "point_buf", "keypoints"]
    )

    def f32(key: str) -> np.ndarray:
        return np.ascontiguousarray(m[key], dtype=np.float32)

    return FaceModelArrays(
        mean_shape=f32("meanshape").reshape(-1),
        id_base=f32("idBase"),
        exp_base=f32("exBase"),
        mean_tex=f32("meantex").reshape(-1),
        tex_base=f32("texBase"),
        tri=m["tri"].astype(np.int64) - 1,
        point_buf=m["point_buf"].astype(np.int64) - 1,
        keypoints=m["keypoints"].reshape(-1).astype(np.int64) - 1,
    )


@dataclass(frozen=True)
class BFMStatus:
    """What a BFM folder holds, for ``doctor`` and the dashboard's setup page.

    Attributes:
        folder: the folder inspected.
        model_ok: ``BFM_model_front.mat`` is present and valid.
        problem: why the model is unusable (empty when ``model_ok``).
        sources_present: conversion inputs found in the folder, by file name.
        sources_missing: conversion inputs not in the folder, by file name.
    """

    folder: Path
    model_ok: bool
    problem: str
    sources_present: tuple[str, ...]
    sources_missing: tuple[str, ...]

    @property
    def can_convert(self) -> bool:
        return not self.sources_missing


def bfm_status(folder: str | Path) -> BFMStatus:
    """Inspect ``folder`` (cheap: headers and small arrays only)."""
    folder = Path(folder)
    problem = ""
    try:
        check_model(folder / MODEL_NAME)
        ok = True
    except WeightsError as e:
        ok, problem = False, str(e)
    names = (BFM09_NAME, EXP_NAME, *INDEX_NAMES)
    present = tuple(n for n in names if (folder / n).is_file())
    missing = tuple(n for n in names if n not in present)
    return BFMStatus(folder, ok, problem, present, missing)


def face_model_available(bfm_dir: str | Path | None = None) -> bool:
    """True when ``bfm_dir/BFM_model_front.mat`` exists with the reference keys and shapes.

    Reads only headers and the small index arrays. ``None`` means :func:`engine.weights.bfm_dir`.
    """
    if bfm_dir is None:
        from engine.weights import bfm_dir as default_dir

        bfm_dir = default_dir()
    try:
        check_model(Path(bfm_dir) / MODEL_NAME)
    except WeightsError:
        return False
    return True
