"""Test data factories: random-weight reconstruction checkpoints in every layout users have.

The real ``epoch_20.pth`` is not available to tests; these files have the same keys,
shapes and container formats (spec §1.3) with random values, so loading, inference and
layout handling are exercised for real. Key names come straight from torchvision's
ResNet (not from :mod:`engine.regressor`), so the 332-key layout is checked independently.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torchvision

from engine.layout import HEAD_SIZES

#: ``layout`` argument of :func:`make_checkpoint`.
LAYOUTS = ("deep3d", "bare", "module", "no_nbt", "sadtalker")

_LAST_DIM = {"resnet18": 512, "resnet50": 2048}


def reference_key_shapes(arch: str = "resnet50") -> dict[str, tuple[int, ...]]:
    """Deep3D ``net_recon`` keys → shapes, built from torchvision's ResNet (spec §1.3 table)."""
    with torch.device("meta"):
        resnet = getattr(torchvision.models, arch)(weights=None)
    shapes = {
        f"backbone.{k}": tuple(v.shape) for k, v in resnet.state_dict().items() if not k.startswith("fc.")
    }
    for i, k in enumerate(HEAD_SIZES):
        shapes[f"final_layers.{i}.weight"] = (k, _LAST_DIM[arch], 1, 1)
        shapes[f"final_layers.{i}.bias"] = (k,)
    return shapes


@functools.lru_cache(maxsize=2)
def _random_state(seed: int, arch: str) -> dict[str, torch.Tensor]:
    """Random but well-scaled weights: He-scaled convs, random BN affine and running stats."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in reference_key_shapes(arch).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.randint(1, 10_000, (), generator=g, dtype=torch.int64)
        elif key.endswith("running_mean"):
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.startswith("final_layers") and key.endswith("weight"):
            out[key] = torch.randn(shape, generator=g) * 0.02
        elif key.endswith("bias"):
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BN weight
            out[key] = torch.rand(shape, generator=g) * 0.5 + 0.25
        else:  # conv weight
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return out


def random_state_dict(seed: int = 0, arch: str = "resnet50") -> dict[str, torch.Tensor]:
    """The ``net_recon`` state dict :func:`make_checkpoint` writes for ``(seed, arch)``, without a file.

    The tensors are shared with a per-session cache: don't modify them.
    """
    return dict(_random_state(seed, arch))


def _fake_adam_state(sd: dict[str, torch.Tensor]) -> dict:
    """A small stand-in for Deep3D's ``opt_00`` (Adam state of two parameters)."""
    state = {
        i: {"step": torch.tensor(20.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.ones(4)}
        for i in range(2)
    }
    group = {
        "lr": 1e-4,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0,
        "amsgrad": False,
        "params": [0, 1],
    }
    return {"state": state, "param_groups": [group]}


def make_checkpoint(path: str | Path, layout: str, seed: int = 0, arch: str = "resnet50") -> dict:
    """Write a random-weight reconstruction checkpoint and return its ``net_recon`` state dict.

    Args:
        path: file to write (parents are created).
        layout: ``"deep3d"`` (``{net_recon, opt_00, sched_00}`` torch pickle, as
            ``epoch_20.pth``), ``"bare"`` (the state dict alone), ``"module"`` (keys prefixed
            ``module.``), ``"no_nbt"`` (``num_batches_tracked`` removed), ``"sadtalker"``
            (safetensors, ``face_3drecon.`` prefix plus other SadTalker groups).
        seed: same seed → same weights (generated once per session).
        arch: ``"resnet50"`` or ``"resnet18"``.

    Returns:
        The state dict as stored, without prefixes (332 keys for ResNet-50; 279 for
        ``"no_nbt"``). The tensors are shared with a per-session cache: don't modify them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(seed, arch)
    if layout == "no_nbt":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if layout == "deep3d":
        sched = {"step_size": 10, "gamma": 0.2, "base_lrs": [1e-4], "last_epoch": 20, "_last_lr": [4e-6]}
        torch.save({"net_recon": sd, "opt_00": _fake_adam_state(sd), "sched_00": sched}, path)
    elif layout == "module":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif layout == "sadtalker":
        from safetensors.torch import save_file

        tensors = {f"face_3drecon.{k}": v.contiguous() for k, v in sd.items()}
        g = torch.Generator().manual_seed(seed + 1)
        for name in ("kp_extractor.conv.weight", "generator.first.conv.weight", "audio2exp.netG.fc.weight"):
            tensors[name] = torch.randn(4, 3, generator=g)
        tensors["audio2pose.netG.bias"] = torch.randn(5, generator=g)
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:  # bare, no_nbt
        torch.save(sd, path)
    return sd


@pytest.fixture(scope="session")
def recon_checkpoint(tmp_path_factory) -> Path:
    """A random-weight ``epoch_20.pth`` (Deep3D layout, ResNet-50), written once per session."""
    path = tmp_path_factory.mktemp("checkpoints") / "epoch_20.pth"
    make_checkpoint(path, "deep3d")
    return path
