"""Seconds to render the full face (35,709 vertices, 70,789 triangles) at 224² with the built-in
torch rasterizer on the CPU: the figure tests/test_face3d_render.py used to assert (< 5 s), now
measured here instead.

Builds a synthetic BFM from Deep3D's index files (engine/face3d/synthetic.py), renders the mean
face once to warm up, then ``--repeat`` times, and prints a Markdown row for docs/PERFORMANCE.md::

    python bench/bench_render_cpu.py [--index ../shared/bfm_index] [--repeat 20] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED
from engine.face3d.bfm import MODEL_NAME
from engine.face3d.model import ParametricFaceModel
from engine.face3d.render import FaceRenderer
from engine.face3d.synthetic import write_synthetic_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, default=SHARED / "bfm_index")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not (folder / MODEL_NAME).is_file():
            write_synthetic_model(args.index, folder, seed=0)
        model = ParametricFaceModel.from_dir(folder, "cpu")
        renderer = FaceRenderer("cpu")
        geo = model.compute_for_render(np.zeros((1, 257), np.float32))
        renderer(geo.vertex_cam, model.tri, geo.color)  # warm-up
        seconds = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            renderer(geo.vertex_cam, model.tri, geo.color)
            seconds.append(time.perf_counter() - t)
    print("| machine | torch threads | renders | median s | max s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {platform.node()} ({platform.processor() or platform.machine()}) | {torch.get_num_threads()} | "
          f"{len(seconds)} | {statistics.median(seconds):.3f} | {max(seconds):.3f} |")


if __name__ == "__main__":
    main()
