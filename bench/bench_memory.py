"""Peak memory vs video length: the engine streams, so peak RSS must not grow with frames.

Runs ``python -m engine extract`` on a 720p video of each length in a fresh process and
reads that process's peak RSS. Usage::

    python bench/bench_memory.py --frames 600 2400 --device cuda --landmarks mtcnn

Prints a Markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, TEST_CLIP, random_checkpoint
from bench.throughput import MediaSpec, make_video, source_faces

CHILD = """
import json, resource, sys, time
from engine import Engine, EngineConfig
cfg = EngineConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
with Engine(cfg) as e:
    r = e.run(sys.argv[2], sys.argv[3])
print(json.dumps({"frames": r.num_frames, "valid": r.num_valid, "seconds": time.perf_counter() - t,
                  "fps": r.fps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[600, 2400])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--landmarks", default="mtcnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-bench")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--clip", type=Path, default=TEST_CLIP)
    args = ap.parse_args()

    ckpt = args.checkpoint or random_checkpoint(args.workdir / "random_epoch_20.pth")
    rows = []
    spec = MediaSpec(1280, 720)
    faces = source_faces(args.clip, spec.face_size)
    for n in args.frames:
        video = make_video(faces, args.workdir / f"clip720_{n}.mp4", n, 0, spec)
        cfg = {"checkpoint": str(ckpt), "landmarks": args.landmarks, "device": args.device,
               "batch_size": args.batch_size, "formats": ["pirender", "npz"], "overwrite": True}
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(video), str(args.workdir / f"out_{n}")],
                             cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"extract failed for {n} frames:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["wall_s"] = time.perf_counter() - t
        rows.append((n, r))
        print(f"{n} frames: {json.dumps(r)}", flush=True)

    print(f"\nhost: {platform.node()} ({platform.processor() or platform.machine()}), device {args.device}, "
          f"landmarks {args.landmarks}, batch {args.batch_size}")
    print("| frames (720p) | valid | engine frames/s | peak RSS (MB) |")
    print("|---:|---:|---:|---:|")
    for n, r in rows:
        print(f"| {n} | {r['valid']} | {r['fps']:.1f} | {r['peak_rss_mb']:.0f} |")
    if len(rows) >= 2:
        a, b = rows[0][1]["peak_rss_mb"], rows[-1][1]["peak_rss_mb"]
        print(f"\npeak RSS ratio {rows[-1][0]}/{rows[0][0]} frames: {b / a:.3f} ({(b / a - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
