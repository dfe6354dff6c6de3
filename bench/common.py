"""Shared helpers for the benchmarks: test media and a random-weight checkpoint.

Benchmarks never assert timings; they print a table to paste into docs/PERFORMANCE.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED", REPO.parent / "shared"))
TEST_CLIP = SHARED / "testdata" / "video" / "WDA_KatieHill_000.mp4"


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a Deep3D-layout ``{'net_recon': state_dict}`` with random weights (same shapes as epoch_20.pth)."""
    import torch

    from engine.regressor import ReconNet

    if path.exists():
        return path
    torch.manual_seed(seed)
    net = ReconNet()
    with torch.no_grad():
        for p in net.final_layers.parameters():
            p.normal_(0, 0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net_recon": net.state_dict()}, path)
    return path


def checkpoint_or_random(checkpoint: Path | None, workdir: Path) -> tuple[Path, str]:
    """The checkpoint a bench runs with and how to say so in its output: ``checkpoint`` when
    given, else random weights of the real layout written to ``workdir`` (speed does not depend
    on the values)."""
    if checkpoint is not None:
        return Path(checkpoint), f"checkpoint {checkpoint}"
    return (random_checkpoint(Path(workdir) / "random_epoch_20.pth"),
            "RANDOM Deep3D checkpoint (ResNet-50, the real architecture)")


def python() -> str:
    return sys.executable
