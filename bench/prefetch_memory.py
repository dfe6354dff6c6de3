"""Peak host RSS of one engine process running several 1080p inputs at once, with the bound on
the bytes of decoded batches waiting ready (``MediaSource(prefetch_bytes=...)``) and without it.

Each setting runs in a fresh process (``ru_maxrss`` is per process)::

    python bench/prefetch_memory.py --device cpu --mode fast --inputs 2 --frames 160

Prints one line per setting; never asserts anything about time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, TEST_CLIP, random_checkpoint
from bench.throughput import MediaSpec, make_video, source_faces

CHILD = """
import json, resource, sys, time
from pathlib import Path
from engine import Engine, EngineConfig
from engine.fast import default_source
from engine.many import InputJob
cfg, clips, out = EngineConfig(**json.loads(sys.argv[1])), json.loads(sys.argv[2]), Path(sys.argv[3])
source = default_source(cfg, cfg.device)  # as the engine builds it, with the bound of this run
source.prefetch_bytes = json.loads(sys.argv[4])
t = time.perf_counter()
with Engine(cfg, source=source) as engine:
    jobs = [InputJob(Path(c), out / Path(c).stem) for c in clips]
    for outcome in engine.run_many(jobs, concurrency=len(jobs)):
        if outcome.error is not None:
            raise outcome.error
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    from engine.stages.source import PREFETCH_BYTES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="fast", choices=("exact", "fast"))
    ap.add_argument("--landmarks", default="mtcnn")
    ap.add_argument("--inputs", type=int, default=2, help="inputs run at once")
    ap.add_argument("--frames", type=int, default=160, help="frames per 1080p input")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-bench")
    ap.add_argument("--clip", type=Path, default=TEST_CLIP)
    args = ap.parse_args()

    ckpt = random_checkpoint(args.workdir / "random_epoch_20.pth")
    spec = MediaSpec(1920, 1080)
    faces = source_faces(args.clip, spec.face_size)
    clips = [str(make_video(faces, args.workdir / f"prefetch_{args.frames}" / f"clip_{k}.mp4", args.frames,
                            37 * k, spec)) for k in range(args.inputs)]
    cfg = {"checkpoint": str(ckpt), "landmarks": args.landmarks, "device": args.device, "mode": args.mode,
           "formats": ["npz"], "overwrite": True}
    print(f"{args.inputs} × 1080p inputs of {args.frames} frames at once, mode {args.mode}, "
          f"landmarks {args.landmarks}, device {args.device}, batch 32", flush=True)
    settings = (("no byte bound (depth 2)", None), (f"prefetch_bytes {PREFETCH_BYTES >> 20} MiB", PREFETCH_BYTES))
    for name, limit in settings:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), json.dumps(clips),
                              str(args.workdir / "prefetch_out"), json.dumps(limit)],
                             cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
