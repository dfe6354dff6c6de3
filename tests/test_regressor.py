"""Reconstruction net and checkpoint loading (spec §1): layouts, errors, inference."""

from __future__ import annotations

import argparse
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.nn import functional as F

from engine.align import crops_to_tensor_input
from engine.errors import CheckpointError, ShapeError
from engine.regressor import (
    LAYOUT_DEEP3D,
    LAYOUT_SADTALKER,
    LAYOUT_STATE_DICT,
    ReconNet,
    Regressor,
    expected_shapes,
    inspect_checkpoint,
    load_checkpoint,
    uint8_nhwc_to_input,
)
from tests.factories import LAYOUTS, make_checkpoint, random_state_dict, reference_key_shapes

HEADS = (80, 64, 80, 3, 27, 2, 1)  # spec §1.1, written out independently of engine.layout


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    """One random ResNet-50 checkpoint (seed 0) written in every layout."""
    d = tmp_path_factory.mktemp("layouts")
    for layout in LAYOUTS:
        make_checkpoint(d / f"{layout}.ckpt", layout)
    return d


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(1, 224, 224, 3), dtype=np.uint8)
    smooth = np.linspace(0, 255, 224 * 224 * 3).reshape(1, 224, 224, 3).astype(np.uint8)
    return np.concatenate([base, smooth])


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600
    return msg


@pytest.fixture(scope="module")
def coeff_deep3d(ckpt_dir, crops) -> np.ndarray:
    """Coefficients of ``crops`` from the Deep3D-layout file (computed once)."""
    return Regressor(ckpt_dir / "deep3d.ckpt", device="cpu").predict(crops)


@pytest.fixture(scope="module")
def r18_dir(tmp_path_factory) -> Path:
    """A random ResNet-18 checkpoint (seed 3) in every layout (cheaper forwards)."""
    d = tmp_path_factory.mktemp("layouts18")
    for layout in LAYOUTS:
        make_checkpoint(d / f"{layout}.ckpt", layout, seed=3, arch="resnet18")
    return d


@pytest.fixture(scope="module")
def r18_path(r18_dir) -> Path:
    return r18_dir / "deep3d.ckpt"


def test_key_layout_matches_spec():
    shapes = reference_key_shapes("resnet50")
    assert len(shapes) == 332
    assert sum(1 for k in shapes if not k.endswith("num_batches_tracked")) == 279
    assert not any(".fc." in k for k in shapes)
    assert expected_shapes("resnet50") == shapes
    params = sum(
        int(np.prod(s))
        for k, s in shapes.items()
        if not k.endswith(("running_mean", "running_var", "tracked"))
    )
    buffers = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith(("running_mean", "running_var")))
    assert (params, buffers) == (24_034_625, 53_120)  # spec §1.3
    assert shapes["backbone.layer1.0.conv3.weight"] == (256, 64, 1, 1)
    assert [shapes[f"final_layers.{i}.weight"] for i in range(7)] == [(k, 2048, 1, 1) for k in HEADS]
    assert expected_shapes("resnet18") == reference_key_shapes("resnet18")
    assert set(ReconNet("resnet50").state_dict()) == set(shapes)


def test_all_layouts_load_identical_weights(ckpt_dir):
    ref_sd = random_state_dict()
    for layout in LAYOUTS:
        sd = load_checkpoint(ckpt_dir / f"{layout}.ckpt")
        assert set(sd) == set(ref_sd), layout  # 332 keys, num_batches_tracked filled in for no_nbt
        for k, v in ref_sd.items():
            assert sd[k].dtype == v.dtype, (layout, k)
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(sd[k], v), (layout, k)


def test_all_layouts_give_identical_coefficients(r18_dir, crops):
    outputs = {
        layout: Regressor(r18_dir / f"{layout}.ckpt", device="cpu", arch="resnet18").predict(crops[:1])
        for layout in LAYOUTS
    }
    first = outputs["deep3d"]
    assert first.dtype == np.float32 and first.shape == (1, 257) and np.all(np.isfinite(first))
    for layout, out in outputs.items():
        assert np.array_equal(out, first), layout


def test_forward_matches_torchvision_resnet_plus_heads(crops, coeff_deep3d):
    sd = random_state_dict()
    resnet = torchvision.models.resnet50(weights=None).eval()
    missing, unexpected = resnet.load_state_dict(
        {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}, strict=False
    )
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    trunk = torch.nn.Sequential(*list(resnet.children())[:-1])  # everything but fc
    x = torch.from_numpy(crops_to_tensor_input(crops))
    with torch.inference_mode():
        feat = trunk(x)
        heads = [
            F.conv2d(feat, sd[f"final_layers.{i}.weight"], sd[f"final_layers.{i}.bias"]) for i in range(7)
        ]
    expected = torch.cat(heads, 1).flatten(1).numpy()
    got = coeff_deep3d
    assert got.dtype == np.float32 and got.shape == (2, 257) and np.all(np.isfinite(got))
    assert not np.array_equal(got[0], got[1])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got[:, 254:256], heads[5].flatten(1).numpy())  # tx, ty
    np.testing.assert_array_equal(got[:, 256], heads[6].flatten().numpy())  # tz


def test_predict_contract(r18_path, crops):
    reg = Regressor(r18_path, device="cpu", arch="resnet18")
    out = reg.predict(crops[:1])
    assert out.shape == (1, 257) and out.dtype == np.float32 and np.all(np.isfinite(out))
    empty = reg.predict(np.zeros((0, 224, 224, 3), np.uint8))
    assert empty.shape == (0, 257) and empty.dtype == np.float32
    with pytest.raises(ShapeError):
        reg.predict(np.zeros((1, 3, 224, 224), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        reg.predict(crops.astype(np.float32))
    info = reg.describe()
    assert info["arch"] == "resnet18" and info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["params"] == sum(
        int(np.prod(s))
        for k, s in reference_key_shapes("resnet18").items()
        if "running" not in k and "tracked" not in k
    )
    assert info["checkpoint"] == str(r18_path)
    assert reg.checkpoint_sha256 == hashlib.sha256(r18_path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="precision"):
        Regressor(r18_path, device="cpu", precision="int8", arch="resnet18")


def test_bf16_autocast_runs_and_stays_close(r18_path, crops):
    exact = Regressor(r18_path, device="cpu", arch="resnet18").predict(crops[:1])
    fast = Regressor(r18_path, device="cpu", precision="bf16", arch="resnet18").predict(crops[:1])
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    assert not np.array_equal(fast, exact)
    assert np.corrcoef(fast.ravel(), exact.ravel())[0, 1] > 0.95


def test_input_conversion_is_the_reference_float64_division(crops):
    values = np.resize(np.arange(256, dtype=np.uint8), (1, 224, 224, 3))
    batch = np.concatenate([crops, values])
    ref = np.stack([torch.tensor(c / 255.0, dtype=torch.float32).permute(2, 0, 1).numpy() for c in batch])
    got_np = crops_to_tensor_input(batch)
    got_torch = uint8_nhwc_to_input(torch.from_numpy(batch))
    assert got_torch.dtype == torch.float32 and got_torch.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(got_np.view(np.uint32), ref.view(np.uint32))
    np.testing.assert_array_equal(got_torch.numpy().view(np.uint32), ref.view(np.uint32))
    # A reciprocal multiply (a common shortcut) would not match: the check above can fail.
    assert not np.array_equal(values.astype(np.float32) * np.float32(1 / 255), values / 255.0)


def test_resnet18_checkpoint_needs_arch(r18_path):
    msg = _one_line_error(load_checkpoint, r18_path)
    assert "ResNet-18" in msg and "arch='resnet18'" in msg and "another shape" in msg
    assert len(load_checkpoint(r18_path, arch="resnet18")) == len(reference_key_shapes("resnet18"))


def test_missing_file_says_where_to_get_it(tmp_path):
    msg = _one_line_error(load_checkpoint, tmp_path / "checkpoints" / "face_recon" / "epoch_20.pth")
    assert "not found" in msg and "README" in msg and "checkpoints/<name>/epoch_20.pth" in msg
    info = inspect_checkpoint(tmp_path / "nope.pth")
    assert not info.ok and info.bytes == 0 and info.layout is None and "not found" in info.message


def test_truncated_files(ckpt_dir, tmp_path):
    for layout in ("deep3d", "sadtalker"):
        data = (ckpt_dir / f"{layout}.ckpt").read_bytes()
        cut = tmp_path / f"{layout}_cut.ckpt"
        cut.write_bytes(data[: len(data) // 3])
        msg = _one_line_error(load_checkpoint, cut)
        assert "truncated" in msg and str(len(data) // 3) in msg
    assert "289 MB" in _one_line_error(load_checkpoint, tmp_path / "deep3d_cut.ckpt")
    legacy = tmp_path / "legacy.pth"
    torch.save({"net_recon": {"a": torch.zeros(1000)}}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-200])
    assert "truncated or corrupt" in _one_line_error(load_checkpoint, legacy)


def test_files_that_are_not_checkpoints(tmp_path, test_images):
    cases = {
        "notes.txt": (b"epoch 20, lr 1e-4\n" * 10, "text file"),
        "page.pth": (b"<!DOCTYPE html><html><body>Google Drive</body></html>", "HTML"),
        "lfs.safetensors": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS"),
        "empty.pth": (b"", "empty"),
        "noise.pth": (bytes(range(256)) * 4, "unknown binary"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert expected in _one_line_error(load_checkpoint, tmp_path / name), name
    jpeg = test_images / "000002.jpg"
    assert "JPEG" in _one_line_error(load_checkpoint, jpeg)
    with zipfile.ZipFile(tmp_path / "checkpoints.zip", "w") as z:
        z.writestr("face_recon/readme.txt", "hi")
    assert "zip archive" in _one_line_error(load_checkpoint, tmp_path / "checkpoints.zip")
    assert "folder" in _one_line_error(load_checkpoint, tmp_path)


def test_wrong_architectures_are_named(tmp_path):
    # A dict of random tensors: counts of missing and unexpected keys, with examples.
    torch.save({f"w{i}": torch.randn(3) for i in range(5)}, tmp_path / "random.pth")
    msg = _one_line_error(load_checkpoint, tmp_path / "random.pth")
    assert "332 of 332 keys missing" in msg and "5 unexpected" in msg and "w0" in msg
    # face_alignment's FAN (key names of the real network, tiny tensors).
    fan_keys = [
        "conv1.weight",
        "m0.b1_2.conv1.weight",
        "top_m_0.conv1.weight",
        "conv_last0.weight",
        "l0.weight",
    ]
    torch.save({k: torch.zeros(1) for k in fan_keys}, tmp_path / "2DFAN4.pth")
    assert "FAN" in _one_line_error(load_checkpoint, tmp_path / "2DFAN4.pth")
    # An ImageNet classifier (a real torchvision state dict).
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18-imagenet.pth")
    assert "ImageNet" in _one_line_error(load_checkpoint, tmp_path / "resnet18-imagenet.pth")
    # A head of the wrong width.
    sd = random_state_dict()
    sd["final_layers.0.weight"] = torch.zeros(81, 2048, 1, 1)
    torch.save(sd, tmp_path / "wide.pth")
    msg = _one_line_error(load_checkpoint, tmp_path / "wide.pth")
    assert "final_layers.0.weight" in msg and "(80, 2048, 1, 1)" in msg and "(81, 2048, 1, 1)" in msg


def test_sadtalker_file_without_face_3drecon(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"kp_extractor.a": torch.zeros(2), "generator.b": torch.zeros(2)}, str(tmp_path / "st.safetensors")
    )
    msg = _one_line_error(load_checkpoint, tmp_path / "st.safetensors")
    assert "face_3drecon" in msg and "332 of 332 keys missing" in msg


def test_python_objects_in_a_checkpoint_are_refused_not_unpickled(tmp_path, monkeypatch):
    """A file that needs any global beyond the data-only allow-list is refused, naming it;
    there is no weights_only=False fallback, not even when the environment asks for one."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sd = random_state_dict()
    path = tmp_path / "with_options.pth"
    torch.save({"net_recon": sd, "opt": argparse.Namespace(net_recon="resnet50")}, path)
    msg = _one_line_error(load_checkpoint, path)
    assert "asks for the Python object 'argparse.Namespace'" in msg and "loaded as data only" in msg
    info = inspect_checkpoint(path)
    assert not info.ok and "argparse.Namespace" in info.message


def test_scheduler_states_with_counters_load(tmp_path):
    """MultiStepLR keeps its milestones in a collections.Counter: allowed (plain data)."""
    from collections import Counter

    sd = random_state_dict()
    sched = {"milestones": Counter({10: 1, 15: 1}), "gamma": 0.2, "base_lrs": [1e-4], "last_epoch": 20}
    torch.save({"net_recon": sd, "opt_00": {"state": {}, "param_groups": []}, "sched_00": sched},
               tmp_path / "multistep.pth")
    loaded = load_checkpoint(tmp_path / "multistep.pth")
    assert torch.equal(loaded["final_layers.3.bias"], sd["final_layers.3.bias"])


def test_inspect_checkpoint(ckpt_dir, r18_path):
    expected = {
        "deep3d": (LAYOUT_DEEP3D, 332),
        "bare": (LAYOUT_STATE_DICT, 332),
        "module": (LAYOUT_STATE_DICT, 332),
        "no_nbt": (LAYOUT_STATE_DICT, 279),
        "sadtalker": (LAYOUT_SADTALKER, 332),
    }
    for layout, (name, count) in expected.items():
        info = inspect_checkpoint(ckpt_dir / f"{layout}.ckpt")
        assert info.ok, info.message
        assert (info.layout, info.num_tensors) == (name, count), layout
        assert info.bytes == (ckpt_dir / f"{layout}.ckpt").stat().st_size
    info = inspect_checkpoint(r18_path)
    assert "ResNet-18" in info.message
    assert not info.ok and info.layout == LAYOUT_DEEP3D
    assert inspect_checkpoint(r18_path, arch="resnet18").ok
