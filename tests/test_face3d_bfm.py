"""BFM conversion and validation (engine/face3d/bfm.py) with the real Deep3DFaceRecon index files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.io

from engine.errors import WeightsError, WeightsMissingError
from engine.face3d import bfm as B
from engine.face3d import face_model_available
from tests.conftest import REPO
from tests.face3d_helpers import synthetic_bfm  # noqa: F401  (fixture)


def _sparse_exp_pca(path, size=B.EXP_PCA_BYTES, dim=79):
    """An Exp_Pca.bin of ``size`` bytes (header ``dim``, zeros after), written sparse and fast."""
    with open(path, "wb") as f:
        f.write(np.array([dim], dtype="<i4").tobytes())
        f.truncate(size)
    return path


def _small_bfm09(path, drop=(), **override):
    """A tiny 01_MorphableModel.mat with the right keys (shapes are checked before sizes matter)."""
    arrays = {k: np.zeros(shape, np.float32) for k, shape in B.BFM09_SHAPES.items() if "PC" not in k}
    arrays["shapePC"] = np.zeros((9, 199), np.float32)  # replaced by the real shape where needed
    arrays["texPC"] = np.zeros((9, 199), np.float32)
    arrays.update(override)
    for k in drop:
        arrays.pop(k)
    scipy.io.savemat(str(path), arrays)
    return path


@pytest.mark.slow
def test_conversion_of_synthetic_bfm09_matches_reference_layout(tmp_path, bfm_index):
    from engine.face3d.synthetic import write_synthetic_sources

    src = write_synthetic_sources(bfm_index, tmp_path / "download", seed=1)
    out = B.convert_bfm([src, bfm_index], tmp_path / "BFM")
    assert out == tmp_path / "BFM" / "BFM_model_front.mat"

    info = {name: (tuple(shape), cls) for name, shape, cls in scipy.io.whosmat(str(out))}
    assert list(info) == list(B.MODEL_SHAPES)
    for key, shape in B.MODEL_SHAPES.items():
        assert info[key][0] == shape, key
    # The reference's NumPy arithmetic: float32 BFM09 stays float32; exBase is float32 × float64.
    assert {k: c for k, (_, c) in info.items()}["exBase"] == "double"
    assert all(info[k][1] == "single" for k in ("meanshape", "meantex", "idBase", "texBase"))

    model = scipy.io.loadmat(str(out))
    facemodel_info = scipy.io.loadmat(str(bfm_index / "facemodel_info.mat"))
    for key in B.INFO_SHAPES:
        np.testing.assert_array_equal(model[key], facemodel_info[key])

    # Values: the reference formula on a few vertices, computed independently.
    bfm09 = scipy.io.loadmat(str(src / "01_MorphableModel.mat"))
    idx = scipy.io.loadmat(str(bfm_index / "BFM_front_idx.mat"))["idx"].astype(np.int64).ravel() - 1
    trim = scipy.io.loadmat(str(bfm_index / "BFM_exp_idx.mat"))["trimIndex"].astype(np.int64).ravel() - 1
    std = np.loadtxt(str(bfm_index / "std_exp.txt"))
    basis = np.memmap(src / "Exp_Pca.bin", dtype="<f4", mode="r", offset=4 + 4 * 159645, shape=(79, 159645))
    for v in (0, 1234, 35708):
        for d in range(3):
            row, row09, rowexp = 3 * v + d, 3 * trim[idx[v]] + d, 3 * idx[v] + d
            want_id = (bfm09["shapePC"][row09] * bfm09["shapeEV"].reshape(-1))[:80] / 1e5
            np.testing.assert_array_equal(model["idBase"][row], want_id)
            want_tex = (bfm09["texPC"][row09] * bfm09["texEV"].reshape(-1))[:80]
            np.testing.assert_array_equal(model["texBase"][row], want_tex)
            want_ex = (basis[:, rowexp] * std)[:64] / 1e5
            np.testing.assert_array_equal(model["exBase"][row], want_ex)
            assert model["meanshape"][0, row] == bfm09["shapeMU"][row09, 0] / np.float32(1e5)
            assert model["meantex"][0, row] == bfm09["texMU"][row09, 0]

    loaded = B.load_model(out)
    assert loaded.num_vertices == B.N_FRONT and loaded.tri.min() == 0 and loaded.keypoints.shape == (68,)
    # An existing valid model is kept unless overwrite is asked for.
    mtime = out.stat().st_mtime_ns
    assert B.convert_bfm([src, bfm_index], tmp_path / "BFM") == out and out.stat().st_mtime_ns == mtime


def test_wrong_exp_pca_size_says_what_and_where(tmp_path, bfm_index):
    _small_bfm09(tmp_path / "01_MorphableModel.mat")
    _sparse_exp_pca(tmp_path / "Exp_Pca.bin", size=1_000_000)
    with pytest.raises(WeightsError) as e:
        B.convert_bfm([tmp_path, bfm_index], tmp_path / "BFM")
    msg = str(e.value)
    assert "Exp_Pca.bin" in msg and "1,000,000 bytes" in msg and "51,086,404" in msg and "CoarseData" in msg
    assert not (tmp_path / "BFM" / "BFM_model_front.mat").exists()


def test_exp_pca_with_wrong_header(tmp_path):
    with pytest.raises(WeightsError, match="header says 80 components, expected 79"):
        B.check_exp_pca(_sparse_exp_pca(tmp_path / "Exp_Pca.bin", dim=80))


def test_bfm09_missing_key(tmp_path, bfm_index):
    _small_bfm09(tmp_path / "01_MorphableModel.mat", drop=("shapePC",))
    _sparse_exp_pca(tmp_path / "Exp_Pca.bin")
    with pytest.raises(WeightsError) as e:
        B.convert_bfm([tmp_path, bfm_index], tmp_path / "BFM")
    msg = str(e.value)
    assert "missing key(s) shapePC" in msg and "01_MorphableModel.mat" in msg and "faces.dmi.unibas.ch" in msg


def test_bfm09_wrong_shape(tmp_path, bfm_index):
    _small_bfm09(tmp_path / "01_MorphableModel.mat")  # shapePC is (9, 199)
    _sparse_exp_pca(tmp_path / "Exp_Pca.bin")
    with pytest.raises(WeightsError, match=r"key shapePC has shape \(9, 199\), expected \(160470, 199\)"):
        B.convert_bfm([tmp_path, bfm_index], tmp_path / "BFM")


def test_missing_files_name_their_source(tmp_path, bfm_index):
    with pytest.raises(WeightsMissingError, match="Basel Face Model 2009"):
        B.convert_bfm([tmp_path], tmp_path / "BFM")
    _small_bfm09(tmp_path / "01_MorphableModel.mat")
    _sparse_exp_pca(tmp_path / "Exp_Pca.bin")
    with pytest.raises(WeightsMissingError) as e:  # no index files anywhere
        B.convert_bfm([tmp_path], tmp_path / "BFM")
    assert "std_exp.txt not found" in str(e.value) and "Deep3DFaceRecon_pytorch" in str(e.value)


def test_index_file_with_wrong_content(tmp_path, bfm_index):
    _small_bfm09(tmp_path / "01_MorphableModel.mat")
    _sparse_exp_pca(tmp_path / "Exp_Pca.bin")
    scipy.io.savemat(str(tmp_path / "BFM_front_idx.mat"), {"idx": np.full((35709, 1), 60000, np.float32)})
    with pytest.raises(WeightsError, match=r"idx spans 60000\.\.60000, expected 1-based ids within 1\.\.53215"):
        B.convert_bfm([tmp_path, bfm_index], tmp_path / "BFM")


def test_hdf5_mat_is_named(tmp_path):
    path = tmp_path / "01_MorphableModel.mat"
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + b"\0" * 8 + b"\x00\x02" + b"IM"
    path.write_bytes(header + b"\0" * 512)
    with pytest.raises(WeightsError, match=r"v7\.3"):
        B._whosmat(path)


def test_check_model_rejects_wrong_shapes_and_missing_keys(tmp_path, synthetic_bfm):  # noqa: F811
    good = scipy.io.loadmat(str(synthetic_bfm / B.MODEL_NAME))
    small = {k: good[k] for k in ("tri", "point_buf", "tri_mask2", "keypoints", "frontmask2_idx", "skinmask")}
    small.update(meanshape=good["meanshape"], meantex=good["meantex"], exBase=good["exBase"])
    bad = tmp_path / "BFM_model_front.mat"
    scipy.io.savemat(str(bad), {**small, "idBase": good["idBase"][:, :79], "texBase": good["texBase"]})
    with pytest.raises(WeightsError, match=r"idBase has shape \(107127, 79\), expected \(107127, 80\)"):
        B.check_model(bad)
    scipy.io.savemat(str(bad), {**small, "idBase": good["idBase"]})
    with pytest.raises(WeightsError, match=r"missing key\(s\) texBase"):
        B.check_model(bad)
    assert not face_model_available(tmp_path)
    assert face_model_available(synthetic_bfm)

    st = B.bfm_status(tmp_path)
    assert not st.model_ok and "texBase" in st.problem and "01_MorphableModel.mat" in st.sources_missing


def test_face_model_available_does_not_import_torch(synthetic_bfm):  # noqa: F811
    code = (
        "import sys, engine.face3d as f;"
        f"assert f.face_model_available({str(synthetic_bfm)!r});"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_extraction_modules_never_import_the_renderer():
    code = (
        "import sys, engine, engine.cli, engine.pipeline, engine.writers;"
        "engine.cli.build_parser();"
        "bad = [m for m in sys.modules if m.startswith(('engine.face3d.render', 'engine.face3d.raster',"
        " 'engine.face3d.nvdr', 'engine.face3d.model', 'nvdiffrast'))];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cli_bfm_convert_and_check_report_problems(tmp_path, capsys, synthetic_bfm):  # noqa: F811
    from engine.cli import main

    assert main(["bfm", "convert", "--from", str(tmp_path), "--to", str(tmp_path / "BFM")]) == 1
    assert "01_MorphableModel.mat not found" in capsys.readouterr().err
    assert main(["bfm", "check", "--dir", str(tmp_path)]) == 1
    assert "missing from" in capsys.readouterr().err
    assert main(["bfm", "check", "--dir", str(synthetic_bfm)]) == 0
    assert "ok:" in capsys.readouterr().out


def test_doctor_lines(monkeypatch, tmp_path, synthetic_bfm):  # noqa: F811
    from engine.face3d import doctor_checks

    monkeypatch.setenv("STUDIO_BFM_DIR", str(tmp_path))
    bfm, renderer = doctor_checks()
    assert not bfm["ok"] and not bfm["required"] and "faces.dmi.unibas.ch" in bfm["fix"]
    assert renderer["name"] == "renderer" and renderer["detail"]
    monkeypatch.setenv("STUDIO_BFM_DIR", str(synthetic_bfm))
    assert doctor_checks()[0]["ok"]
