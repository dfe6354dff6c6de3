"""Decode rates of generated 1080p clips: one stream, several streams in threads of one process,
several processes. Tells whether decoding (and which part of it) bounds the engine's throughput.

Usage::

    python bench/decode_rates.py --clips 16 --seconds 4            # the clips bench/throughput.py makes
    python bench/decode_rates.py --video a.mp4 --video b.mp4

Rows (frames/s over every input, each input decoded once per row):

- ``decode only``: PyAV with FFmpeg's frame threads, frames left in YUV (no conversion).
- ``engine``: :func:`engine.sources.iter_frames` (YUV→RGB in its conversion pool, batches).
- ``engine ×K threads``: K inputs at once, each in its own thread of one process.
- ``engine ×K processes``: K inputs at once, each in its own process.

Never asserts anything about time.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench.decode_rates")


def decode_only(path: str) -> int:
    """Frames of ``path`` decoded by PyAV (frame threads), not converted."""
    from engine.avcompat import open_container

    n = 0
    with open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            n += 1
    return n


def engine_decode(path: str, batch_size: int = 32) -> int:
    """Frames of ``path`` through the engine's decoder (RGB batches)."""
    from engine.sources import iter_frames

    return sum(len(b) for b in iter_frames(path, batch_size))


def nvdec_host(path: str, batch_size: int = 32) -> int:
    """Frames of ``path`` through :class:`engine.stages.nvdec.NvdecSource` (RGB on the GPU, then
    copied to host batches, as the engine consumes them)."""
    from engine.stages.nvdec import NvdecSource

    return sum(len(b) for b in NvdecSource(fallback=False).frames(path, batch_size))


def nvdec_device(path: str, batch_size: int = 32) -> int:
    """Frames of ``path`` decoded by NVDEC to RGB and stacked into one CUDA tensor per batch, never
    copied to the host: the decoder's own ceiling."""
    import torch

    from engine.stages.nvdec import import_pynvvideocodec

    nvc = import_pynvvideocodec()
    decoder = nvc.SimpleDecoder(path, gpu_id=0, use_device_memory=True, output_color_type=nvc.OutputColorType.RGB)
    n = 0
    while frames := decoder.get_batch_frames(batch_size):
        torch.stack([torch.from_dlpack(f) for f in frames])
        n += len(frames)
    torch.cuda.synchronize()
    return n


def rate(fn, paths: list[str], workers: int = 1, processes: bool = False) -> float:
    """Frames/s of ``fn`` over ``paths``, ``workers`` inputs at once."""
    t = time.perf_counter()
    if workers == 1:
        n = sum(fn(p) for p in paths)
    else:
        pool_cls = cf.ProcessPoolExecutor if processes else cf.ThreadPoolExecutor
        with pool_cls(workers) as pool:
            n = sum(pool.map(fn, paths))
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    from bench.throughput import MediaSpec, make_set

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, action="append", help="an input video (repeatable)")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--clip", type=Path, default=None, help="the face video the clips are made from")
    ap.add_argument("--nvdec", action="store_true", help="also NVDEC rows (PyNvVideoCodec, a CUDA GPU)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-bench")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.video:
        paths = [str(p) for p in args.video]
    else:
        from bench.common import TEST_CLIP

        args.clip = args.clip or TEST_CLIP
        args.set = "clips"
        paths = [str(p) for p in make_set("clips", args, MediaSpec(args.width, args.height, args.fps), args.workdir)]
    print(f"{len(paths)} inputs, {os.cpu_count()} CPUs")
    decode_only(paths[0])  # warm the page cache and the libraries
    rows = [("decode only (YUV)", rate(decode_only, paths)), ("engine", rate(engine_decode, paths))]
    for k in args.workers:
        rows.append((f"decode only ×{k} threads", rate(decode_only, paths, k)))
        rows.append((f"engine ×{k} threads", rate(engine_decode, paths, k)))
        rows.append((f"engine ×{k} processes", rate(engine_decode, paths, k, processes=True)))
    if args.nvdec:
        nvdec_device(paths[0])  # CUDA context and decoder start-up outside the timing
        rows += [("NVDEC, frames kept on the GPU", rate(nvdec_device, paths)),
                 ("NVDEC, copied to the host (NvdecSource)", rate(nvdec_host, paths))]
        for k in args.workers:
            rows.append((f"NVDEC on the GPU ×{k} threads", rate(nvdec_device, paths, k)))
            rows.append((f"NVDEC to the host ×{k} threads", rate(nvdec_host, paths, k)))
    print("| decode | frames/s |\n|---|---:|")
    for name, r in rows:
        print(f"| {name} | {r:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
