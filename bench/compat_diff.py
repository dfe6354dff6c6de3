"""Measured differences between the fast and the exact path on the same videos.

Usage::

    python bench/compat_diff.py --landmarks mtcnn --device cuda VIDEO [VIDEO ...]
    python bench/compat_diff.py --landmarks mtcnn --make-1080p 300 --device cuda

Runs ``extract`` twice per video (``mode="exact"`` and ``mode="fast"``, npz output), then
compares frame by frame and prints one Markdown table per video (paste into
``docs/compatibility.md``):

- landmarks: the 5 alignment points (68→5 for FAN) of the fast path against the exact one, in
  % of the exact inter-ocular distance (mean, 95th percentile, max);
- crops: both 224² crops re-cut from the decoded frame with each run's ``crop_box`` (Pillow,
  as the exact path cuts them; the fast path's GPU crops are bit-identical to that), mean and
  max |Δ| in 0–255 levels;
- ``transform_params``: max |Δ| of ``s``, ``tx``, ``ty``;
- coefficients: max and mean |Δ| per block (id, exp, tex, angle, gamma, trans);
- frames where the two paths disagree on whether there is a face, or chose different faces
  (the fast path's eye centre more than one inter-ocular distance from the exact one's).

``--decoder nvdec`` runs the fast path on NVDEC's frames and also prints how NVDEC's RGB pixels
differ from FFmpeg's (PyAV's) on the same frames.

Random-weight checkpoints are used when the real files are absent; then the coefficient
differences only show the numeric effect of fp16 and of the landmark differences, not their
size in a trained model, and FAN (random weights) shows only fp16/crop numerics. The output
says which weights ran.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TEST_CLIP, checkpoint_or_random

log = logging.getLogger("compat_diff")

BLOCKS = ("id", "exp", "tex", "angle", "gamma", "trans")


def run(video: Path, out_base: Path, mode: str, args, checkpoint: Path):
    from engine import EngineConfig, extract

    cfg = EngineConfig(checkpoint=checkpoint, landmarks=args.landmarks, formats=("npz",), device=args.device,
                       batch_size=args.batch_size, overwrite=True, mode=mode, detect_every=args.detect_every,
                       decoder=args.decoder if mode == "fast" else "pyav")
    report = extract(video, out_base, cfg)
    with np.load(report.outputs["npz"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, report


def decoded_pixel_diff(video: Path, frames: int = 200) -> str:
    """Mean and max |Δ| (0–255) and the share of differing values between NVDEC's RGB frames
    (copied to the host) and PyAV's, over the first ``frames`` frames of ``video``."""
    from engine.sources import iter_frames
    from engine.stages.nvdec import NvdecSource

    total = same = 0
    worst, sums = 0, 0.0
    pairs = zip(iter_frames(video, 32), NvdecSource(fallback=False).frames(video, 32), strict=False)
    for host, nv in pairs:
        d = np.abs(host.images.astype(np.int16) - nv.images.astype(np.int16))
        total, same, sums = total + d.size, same + int((d == 0).sum()), sums + float(d.sum())
        worst = max(worst, int(d.max()))
        if total >= frames * d[0].size:
            break
    return (f"NVDEC vs FFmpeg RGB on {video.name}: mean |Δ| {sums / total:.3f}, max {worst}, "
            f"{100 * (1 - same / total):.1f} % of values differ")


def frames_of(video: Path):
    """uint8 (H, W, 3) RGB frames of ``video``, decoded as the engine's exact path does."""
    from engine.sources import iter_frames

    for batch in iter_frames(video, 32):
        yield from batch.images


def crop(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The 224² crop ``crop_box`` = [left, up, w, h] describes (Pillow bicubic, zero padded)."""
    from PIL import Image

    left, up, w, h = (int(v) for v in box)
    img = Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img.crop((left, up, left + 224, up + 224)), dtype=np.int16)


def compare(video: Path, exact: dict, fast: dict, max_crop_frames: int) -> dict:
    from engine.align import lm68_to_lm5
    from engine.layout import GROUPS

    n = min(len(exact["coeff"]), len(fast["coeff"]))
    both = exact["valid"][:n] & fast["valid"][:n]
    lm_e = lm68_to_lm5(exact["landmarks"][:n]).astype(np.float64)
    lm_f = lm68_to_lm5(fast["landmarks"][:n]).astype(np.float64)
    iod = np.linalg.norm(lm_e[:, 0] - lm_e[:, 1], axis=-1)
    err = np.linalg.norm(lm_e - lm_f, axis=-1).mean(axis=-1) / np.where(iod > 0, iod, np.nan) * 100
    eye_shift = np.linalg.norm(lm_e[:, :2].mean(1) - lm_f[:, :2].mean(1), axis=-1) / np.where(iod > 0, iod, np.nan)
    other_face = both & (eye_shift > 1.0)
    keep = both & ~other_face
    out = {
        "frames": n, "valid_exact": int(exact["valid"][:n].sum()), "valid_fast": int(fast["valid"][:n].sum()),
        "face_disagree": int((exact["valid"][:n] != fast["valid"][:n]).sum()), "other_face": int(other_face.sum()),
        "lm_mean": float(np.nanmean(err[keep])) if keep.any() else np.nan,
        "lm_p95": float(np.nanpercentile(err[keep], 95)) if keep.any() else np.nan,
        "lm_max": float(np.nanmax(err[keep])) if keep.any() else np.nan,
    }
    tp = np.abs(exact["transform_params"][:n].astype(np.float64) - fast["transform_params"][:n])
    out.update(s=float(tp[keep, 2].max(initial=0)), tx=float(tp[keep, 3].max(initial=0)),
               ty=float(tp[keep, 4].max(initial=0)))
    d = np.abs(exact["coeff"][:n].astype(np.float64) - fast["coeff"][:n])[keep]
    for name, cols in GROUPS.items():
        out[f"{name}_max"] = float(d[:, cols].max(initial=0))
        out[f"{name}_mean"] = float(d[:, cols].mean()) if len(d) else np.nan
    diffs = []
    rows = np.flatnonzero(keep)
    step = max(1, len(rows) // max(max_crop_frames, 1))
    wanted = set(rows[::step].tolist())
    for i, frame in enumerate(frames_of(video)):
        if i >= n:
            break
        if i in wanted:
            diffs.append(np.abs(crop(frame, exact["crop_box"][i]) - crop(frame, fast["crop_box"][i])))
    out["crop_frames"] = len(diffs)
    out["crop_mean"] = float(np.mean([x.mean() for x in diffs])) if diffs else np.nan
    out["crop_max"] = int(max((x.max() for x in diffs), default=0))
    return out


def table(name: str, r: dict) -> str:
    lines = [
        f"**{name}**: {r['frames']} frames; a face in {r['valid_exact']} (exact) / {r['valid_fast']} (fast); "
        f"face found by one path only: {r['face_disagree']}; different face chosen: {r['other_face']}",
        "",
        "| quantity | mean | max |",
        "|---|---:|---:|",
        f"| 5 landmarks, % of inter-ocular distance (p95 {r['lm_p95']:.2f}) | {r['lm_mean']:.2f} | {r['lm_max']:.2f} |",
        f"| crop pixels, 0–255 ({r['crop_frames']} frames) | {r['crop_mean']:.3f} | {r['crop_max']} |",
        f"| `transform_params` s / tx / ty | | {r['s']:.2e} / {r['tx']:.3f} / {r['ty']:.3f} |",
    ]
    lines += [f"| coeff {b} | {r[b + '_mean']:.2e} | {r[b + '_max']:.2e} |" for b in BLOCKS]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("videos", nargs="*", type=Path)
    ap.add_argument("--landmarks", default="mtcnn")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--detect-every", type=int, default=8)
    ap.add_argument("--decoder", choices=("pyav", "nvdec"), default="pyav", help="the fast path's decoder")
    ap.add_argument("--checkpoint", type=Path, help="epoch_20.pth; default: random weights of the real layout")
    ap.add_argument("--make-1080p", type=int, default=0, metavar="FRAMES",
                    help="also compare on a generated 1080p clip of this many frames")
    ap.add_argument("--crop-frames", type=int, default=100, help="frames whose crops are re-cut and compared")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-compat")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    videos = list(args.videos) or [TEST_CLIP]
    if args.make_1080p:
        from bench.throughput import MediaSpec, make_video, source_faces

        spec = MediaSpec()
        videos.append(make_video(source_faces(TEST_CLIP, spec.face_size),
                                 args.workdir / f"clip1080p-{args.make_1080p}.mp4", args.make_1080p, 0, spec))
    checkpoint, weights = checkpoint_or_random(args.checkpoint, args.workdir)
    print(f"# fast vs exact, {datetime.date.today()}, {platform.node()}, device {args.device}, "
          f"landmarks {args.landmarks}, detect_every {args.detect_every}, fast path decoder {args.decoder}, {weights}")
    print(f"command: python {' '.join(sys.argv)}\n")
    for video in videos:
        exact, _ = run(video, args.workdir / "exact" / video.stem, "exact", args, checkpoint)
        fast, _ = run(video, args.workdir / "fast" / video.stem, "fast", args, checkpoint)
        print(table(video.name, compare(video, exact, fast, args.crop_frames)), "\n")
        if args.decoder == "nvdec":
            print(decoded_pixel_diff(video), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
