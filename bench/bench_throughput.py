"""Throughput of each stage and of the whole engine on one video.

Usage::

    python bench/bench_throughput.py --device cuda --frames 600 --batch-size 64

Stages are timed separately on the same decoded batches (decode, landmarks, align,
regress in fp32 and, on CUDA, fp16), then the engine end to end. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TEST_CLIP, make_720p_clip, random_checkpoint


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--landmarks", default="mtcnn")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-bench")
    args = ap.parse_args()

    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from engine import Engine, EngineConfig
    from engine.align import align_batch
    from engine.landmarks import create_landmarker
    from engine.regressor import Regressor
    from engine.sources import iter_frames

    ckpt = random_checkpoint(args.workdir / "random_epoch_20.pth")
    video = make_720p_clip(TEST_CLIP, args.workdir / f"clip720_{args.frames}.mp4", args.frames)
    cfg = EngineConfig(checkpoint=ckpt, landmarks=args.landmarks, device=args.device, batch_size=args.batch_size,
                       formats=("npz",), overwrite=True)
    rows = []

    t = time.perf_counter()
    batches = list(iter_frames(video, args.batch_size))
    n = sum(len(b) for b in batches)
    rows.append(("decode 720p (PyAV, threaded)", n / (time.perf_counter() - t)))

    lmk = create_landmarker(cfg, args.device, video)
    lmk(batches[0])  # warm-up
    sync(args.device)
    t = time.perf_counter()
    lms = [lmk(b) for b in batches]
    sync(args.device)
    rows.append((f"landmarks ({args.landmarks})", n / (time.perf_counter() - t)))

    pool = ThreadPoolExecutor(cfg.num_threads)
    t = time.perf_counter()
    aligned = [align_batch(b.images, np.nan_to_num(lm.points_img_ydown), ~lm.valid, executor=pool)
               for b, lm in zip(batches, lms, strict=True)]
    rows.append((f"align (Pillow, {cfg.num_threads} threads)", n / (time.perf_counter() - t)))

    precisions = ["fp32", "fp16"] if args.device.startswith("cuda") else ["fp32"]
    for precision in precisions:
        reg = Regressor(ckpt, device=args.device, precision=precision)
        reg.predict(aligned[0].crops)
        sync(args.device)
        t = time.perf_counter()
        for a in aligned:
            reg.predict(a.crops)
        sync(args.device)
        rows.append((f"regressor ResNet-50 {precision}", n / (time.perf_counter() - t)))
    del batches, aligned

    with Engine(cfg) as engine:
        engine.run(video, args.workdir / "warm", )  # warm-up: loads models
        t = time.perf_counter()
        report = engine.run(video, args.workdir / "thr")
        rows.append(("engine end to end (fp32)", report.num_frames / (time.perf_counter() - t)))

    print(f"\nhost {platform.node()}, device {args.device}, {n} frames 1280×720, batch {args.batch_size}")
    print("| stage | frames/s |")
    print("|---|---:|")
    for name, fps in rows:
        print(f"| {name} | {fps:.1f} |")


if __name__ == "__main__":
    main()
