"""Host CPU time of the per-batch work that runs between a GPU worker's kernels.

On a GPU the fast path's stages launch kernels and wait; what each engine process spends on the
host between them (under one GIL) bounds its frames/s. This times those steps on synthetic
1080p batches, on the host, without a GPU: the POS fit of a batch, the crops' Pillow taps
(computed per window, and cut from :class:`engine.resample.TapsCache`'s tables), and the MTCNN
refinement's area-resampling matrices. ``python bench/host_costs.py [--batch 32] [--repeat 50]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.align import fit_batch
from engine.landmarks.mtcnn_gpu import area_matrix
from engine.resample import TapsCache, batch_crop_taps

#: 5 points of a face about 300 px between the eyes in a 1920×1080 frame, pixels y down.
FACE_5P = np.array([[800, 450], [1100, 450], [950, 600], [830, 750], [1070, 750]], dtype=np.float64)


def ms_per_call(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="frames per batch (the engine's default batch size)")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--jitter", type=float, default=1.0, help="landmark noise between frames, pixels (std)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one engine thread's cost, not a thread pool's
    rng = np.random.default_rng(0)
    b, frame_hw = args.batch, np.tile([1080, 1920], (args.batch, 1))
    batches = [(FACE_5P[None] * scale + rng.normal(0, args.jitter, (b, 5, 2))).astype(np.float32)
               for scale in np.linspace(0.9, 1.1, 20)]  # the face moves nearer over 20 batches
    fits = [fit_batch(1920, 1080, lm, np.zeros(b, bool), bad_landmarks="template") for lm in batches]
    cycle = iter(fits * (args.repeat + 2))
    cache = TapsCache()
    cycle_cached = iter(fits * (args.repeat + 2))
    lengths = rng.integers(380, 460, b)  # face windows, pixels
    rows = [
        ("POS fit (`engine.align.fit_batch`)",
         ms_per_call(lambda: fit_batch(1920, 1080, batches[0], np.zeros(b, bool), bad_landmarks="template"),
                     args.repeat)),
        ("crop taps, per window (`batch_crop_taps`)",
         ms_per_call(lambda: batch_crop_taps(frame_hw, next(cycle).crop_box), args.repeat)),
        ("crop taps, from `TapsCache` tables",
         ms_per_call(lambda: batch_crop_taps(frame_hw, next(cycle_cached).crop_box, cache=cache), args.repeat)),
        ("MTCNN area matrices, R-Net + O-Net, both axes, built on the CPU (on a GPU: device kernels)",
         ms_per_call(lambda: [area_matrix(lengths, s, int(lengths.max())) for s in (24, 24, 48, 48)], args.repeat)),
    ]
    print(f"batch of {b} 1080p frames, one thread; ms per batch (ms per frame)")
    print("| step | ms per batch | ms per frame |")
    print("|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / b:.3f} |")
    print(f"(TapsCache held {len(cache)} tables after {len(fits)} distinct batches)")


if __name__ == "__main__":
    main()
