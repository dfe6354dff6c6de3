"""GPU vs CPU: the same video, checkpoint and landmarks give the same coefficients (to ~1e-4).

Landmarks are computed once (MTCNN on the CPU) and fed to both runs through the keypoint
file, so the comparison isolates alignment + network numerics.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import TEST_CLIP, random_checkpoint
from engine import Engine, EngineConfig


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="studio-equal-"))
    ckpt = random_checkpoint(work / "ck.pth")
    base = dict(checkpoint=ckpt, formats=("npz", "landmarks"), batch_size=64)
    with Engine(EngineConfig(landmarks="mtcnn", device="cpu", **base)) as e:
        cpu = np.load(e.run(TEST_CLIP, work / "cpu" / "clip").outputs["npz"])
    keypoints = work / "cpu" / "clip.txt"
    with Engine(EngineConfig(landmarks="file", keypoints=keypoints, device="cuda", **base)) as e:
        gpu = np.load(e.run(TEST_CLIP, work / "gpu" / "clip").outputs["npz"])
    np.testing.assert_array_equal(cpu["transform_params"], gpu["transform_params"])
    diff = np.abs(cpu["coeff"] - gpu["coeff"])
    scale = np.abs(cpu["coeff"]).max()
    print(f"frames {len(diff)}; transform_params identical; coeff max |cpu-gpu| = {diff.max():.3e} "
          f"(max |coeff| {scale:.3f}), mean {diff.mean():.3e}")


if __name__ == "__main__":
    main()
