"""Numerical checks that need a GPU (the CPU suite covers the same code on the CPU).

Usage::

    python bench/gpu_checks.py --device cuda [--frames 200]

1. ``TorchAligner`` on the device against Pillow (``Deep3DAligner``): crops, ``trans_params`` and
   ``crop_box`` of every frame of the shared clip and of a 1080p copy, with MTCNN's landmarks;
   the crops must be the same bits.
2. The exact path end to end on the device as the engine composes it (frames made RGB on the
   device from their YUV planes, ``engine.yuv``; GPU crops), with FFmpeg's RGB on the host
   (``MediaSource()``), and with Pillow's aligner (host frames): every npz array the same.
3. ``BatchedFan`` (random 2D-FAN-4 weights of the real architecture) in fp32 and fp16 against
   face_alignment's per-frame FAN on the same boxes: point differences in % of the inter-ocular
   distance (random weights: this shows fp16 and batching numerics only).
4. The fast path's keyframe detector: MTCNN's first stage over all pyramid levels at once
   (``engine.landmarks.mtcnn_gpu.pnet_candidates``) against facenet-pytorch's per-level loop on
   the 1080p copy shrunk to 640×360, at facenet's threshold and at a low one: the same bits.
5. The exact path's MTCNN with all crops of a stage at once (``engine.landmarks.mtcnn_exact``)
   against facenet-pytorch's per-box loop, on the shared clip and the 1080p copy, at facenet's
   thresholds and at low ones: the same bits; with wall and CPU time per frame of each.
6. Frames made RGB on the device from their YUV planes (``iter_frames(rgb_device=...)``,
   ``engine.yuv``) against FFmpeg's RGB on the host (PyAV), every frame of the shared clip and of
   the 1080p copy: the same bytes; with the decode thread's CPU time per frame of each
   (``--only-rgb``: this check and the exact path's end to end with it).

Prints one Markdown line per check; exits 1 when a must-be-equal check differs.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TEST_CLIP, random_checkpoint


def clip_frames(path: Path, n: int):
    from engine.sources import iter_frames

    out = []
    for batch in iter_frames(path, 32):
        out.append(batch)
        if sum(len(b) for b in out) >= n:
            break
    from engine.structures import concat_rows, rows_of

    whole = concat_rows(out)
    return rows_of(whole, slice(0, n))


def mtcnn_faces(frames, device: str):
    from engine.landmarks.mtcnn import MtcnnLandmarker
    from engine.stages.detect import best_face_per_frame

    mt = MtcnnLandmarker(device)
    faces = best_face_per_frame(mt.detect(frames))
    return faces, mt(frames, faces)


def check_aligner(frames, landmarks, device: str, name: str) -> bool:
    from engine.stages.align import Deep3DAligner, TorchAligner
    from engine.structures import AlignPlan

    plan = AlignPlan(np.nan_to_num(landmarks.points_img_ydown), ~landmarks.valid)
    ref = Deep3DAligner(4)(frames, plan)
    got = TorchAligner(device)(frames, plan)
    same = {k: bool(np.array_equal(getattr(ref, k), getattr(got, k)))
            for k in ("crops", "trans_params", "crop_box", "used_template")}
    differing = int((ref.crops != got.crops).any(axis=(1, 2, 3)).sum())
    verdict = "identical" if all(same.values()) else "DIFFERENT"
    print(f"- TorchAligner on {device} vs Pillow, {name}, {len(frames)} frames: "
          f"{verdict} ({same}; frames with any differing pixel: {differing})")
    return all(same.values())


def check_exact_engine(video: Path, device: str, work: Path) -> bool:
    from engine import EngineConfig
    from engine.pipeline import Engine
    from engine.stages.align import Deep3DAligner

    ckpt = random_checkpoint(work / "random_epoch_20.pth")
    cfg = EngineConfig(checkpoint=ckpt, landmarks="mtcnn", formats=("npz",), device=device, overwrite=True)
    from engine.stages.source import MediaSource

    outs = {}
    variants = {"default": {}, "host-rgb": {"source": MediaSource()}, "pillow": {"aligner": Deep3DAligner(4)}}
    for label, parts in variants.items():
        with Engine(cfg, **parts) as engine:
            report = engine.run(video, work / label / video.stem)
        with np.load(report.outputs["npz"], allow_pickle=False) as z:
            outs[label] = {k: z[k] for k in z.files}
    a = outs["default"]
    ok = True
    for label, said in (("host-rgb", "FFmpeg's RGB on the host"), ("pillow", "Pillow aligner")):
        b = outs[label]
        diff = [k for k in a if not np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")]
        print(f"- exact path on {device}, {video.name}: default (RGB on the device, GPU crops) vs {said}: "
              f"{'every npz array identical' if not diff else 'DIFFERENT: ' + ', '.join(diff)} "
              f"({len(a['coeff'])} frames)")
        ok &= not diff
    return ok


def check_rgb_on_device(video: Path, device: str, name: str) -> bool:
    """Every frame of ``video`` made RGB on ``device`` (engine.yuv) against FFmpeg's host RGB."""
    import time

    from engine.frames import to_numpy
    from engine.sources import iter_frames

    got = {}
    for label, where in (("host", None), ("device", device)):
        t = time.process_time()
        batches = [to_numpy(b.images) for b in iter_frames(video, 32, convert_threads=0, rgb_device=where)]
        got[label] = (np.concatenate(batches), time.process_time() - t)
    (host, host_s), (dev, dev_s) = got["host"], got["device"]
    same = host.shape == dev.shape and np.array_equal(host, dev)
    print(f"- RGB made on {device} from YUV planes vs FFmpeg's on the host, {name}: "
          f"{'same bytes' if same else 'DIFFERENT'} ({len(host)} frames {host.shape[2]}×{host.shape[1]}; "
          f"CPU time per frame, decoding included: host {1e3 * host_s / len(host):.2f} ms, "
          f"device {1e3 * dev_s / len(host):.2f} ms)")
    return same


def check_fan(frames, faces, device: str, work: Path) -> None:
    from bench.throughput import prepare_fan_weights
    from engine.align import lm68_to_lm5
    from engine.landmarks.fan import FanLandmarker
    from engine.landmarks.fan_gpu import BatchedFan

    print(f"- FAN weights: {prepare_fan_weights(work)}")
    ref = FanLandmarker(device)(frames, faces)
    for precision in ("fp32", "fp16"):
        got = BatchedFan(device, precision=precision)(frames, faces)
        ok = ref.valid & got.valid
        e5 = lm68_to_lm5(ref.points_img_ydown[ok]).astype(np.float64)
        iod = np.linalg.norm(e5[:, 0] - e5[:, 1], axis=-1)[:, None]
        delta = ref.points_img_ydown[ok].astype(np.float64) - got.points_img_ydown[ok]
        err = np.linalg.norm(delta, axis=-1) / iod * 100
        same = float((err == 0).mean() * 100) if err.size else float("nan")
        print(f"- BatchedFan {precision} on {device} vs face_alignment per frame ({int(ok.sum())} frames, 68 points): "
              f"{same:.2f} % of points identical; error % IOD mean {err.mean():.3f}, p99 {np.percentile(err, 99):.3f}, "
              f"max {err.max():.3f}")


def facenet_first_stage(pnet, imgs, scales, threshold):
    """The per-level loop of facenet-pytorch 2.6.0's ``detect_face`` (P-Net, ``generateBoundingBox``,
    NMS at 0.5 per frame) that ``pnet_candidates`` replaces: (boxes (K, 9), frame of each (K,))."""
    import torch
    from facenet_pytorch.models.utils import detect_face as fd
    from torchvision.ops.boxes import batched_nms

    h, w = imgs.shape[2:4]
    boxes, inds = [], []
    for scale in scales:
        reg, probs = pnet((fd.imresample(imgs, (int(h * scale + 1), int(w * scale + 1))) - 127.5) * 0.0078125)
        b, i = fd.generateBoundingBox(reg, probs[:, 1], scale, threshold)
        pick = batched_nms(b[:, :4], b[:, 4], i, 0.5)
        boxes.append(b[pick])
        inds.append(i[pick])
    return torch.cat(boxes), torch.cat(inds)


def same_up_to_ties(got, want) -> bool:
    """(boxes (K, 9), frames (K,)) pairs with the same rows and the same sequence of scores: only
    boxes of equal score may stand in another order. torchvision's NMS sorts a level of over 5,000
    boxes (1,000 on a CPU) without keeping the order of equal scores, so facenet's order is not
    defined there."""
    import torch

    def rows(pair):
        return sorted(map(tuple, torch.cat([pair[0], pair[1][:, None].to(pair[0].dtype)], 1).tolist()))

    return torch.equal(got[0][:, 4], want[0][:, 4]) and rows(got) == rows(want)


def check_first_stage(frames, device: str) -> bool:
    import torch

    from engine.frames import shrink_area
    from engine.landmarks.mtcnn_gpu import RefineMtcnn, pnet_candidates, pyramid_scales

    net = RefineMtcnn(device)._net
    small = shrink_area(frames.images, (640, 360))
    imgs = torch.as_tensor(small, device=device).permute(0, 3, 1, 2).float()
    scales = pyramid_scales(net, 360, 640)
    ok = True
    for threshold in (net.thresholds[0], 0.05):
        with torch.inference_mode():
            want = facenet_first_stage(net.pnet, imgs, scales, threshold)
            got = pnet_candidates(net.pnet, imgs, scales, threshold)
        if all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
            verdict = "same bits, same order"
        elif same_up_to_ties(got, want):
            verdict = "same bits; boxes of equal score in another order (facenet sorts unstably there)"
        else:
            verdict, ok = "DIFFERENT", False
        print(f"- MTCNN first stage, all levels at once vs facenet's loop on {device} ({len(imgs)} frames 640×360, "
              f"threshold {threshold}, {len(want[0])} boxes): {verdict}")
    return ok


def check_exact_mtcnn(frames, device: str, name: str, repeats: int = 3, max_pixels: int | None = None) -> bool:
    """Item 5: ``MtcnnLandmarker`` with ``batched_crops`` against facenet's loop, bit for bit.

    ``max_pixels``: frame pixels per call, the frames batched on any device (``None``: the
    landmarker's defaults on ``device``: batched on CUDA, one frame a call on the CPU).
    """
    import time

    import torch

    from engine.landmarks.mtcnn import MtcnnLandmarker

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    ok = True
    for thresholds in ([0.6, 0.7, 0.7], [0.1, 0.1, 0.1]):
        found, cost = {}, {}
        for batched in (False, True):
            mt = MtcnnLandmarker(device, batched_crops=batched, max_pixels=max_pixels,
                                 batch_frames=True if max_pixels is not None else None)
            mt._net.thresholds = thresholds
            found[batched] = mt.detect(frames)  # warm-up (cuDNN plans, the probe), and the result
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                mt.detect(frames)
            sync()
            n = max(1, repeats * len(frames))
            cost[batched] = (1e3 * (time.perf_counter() - wall) / n, 1e3 * (time.process_time() - cpu) / n)
        want, got = found[False], found[True]
        same = got.num_frames == want.num_frames and all(
            np.array_equal(getattr(got, f), getattr(want, f)) and getattr(got, f).dtype == getattr(want, f).dtype
            for f in ("boxes_img_ydown", "scores", "frame_rows", "points_img_ydown"))
        ok &= same
        per_call = mt.frames_per_call(*frames.images.shape[1:3])
        print(f"- exact MTCNN, batched crops vs facenet's loop ({name}, {len(frames)} frames, "
              f"{per_call} a call, thresholds "
              f"{thresholds}, {len(want)} faces, rule {mt._area_rule or 'none'}): "
              f"{'same bits' if same else 'DIFFERENT'}" + (
                  f"; ms per frame, wall / CPU: facenet's loop {cost[False][0]:.2f} / {cost[False][1]:.2f}, "
                  f"batched {cost[True][0]:.2f} / {cost[True][1]:.2f}" if repeats else ""))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--fan-frames", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-gpu-checks")
    ap.add_argument("--only-exact-mtcnn", action="store_true", help="check 5 alone")
    ap.add_argument("--only-rgb", action="store_true", help="check 6 and the exact path end to end")
    ap.add_argument("--mtcnn-max-pixels", type=int, default=None,
                    help="check 5's frame pixels per MTCNN call, frames batched on any device "
                         "(default: the landmarker's defaults on --device)")
    ap.add_argument("--repeats", type=int, default=3, help="check 5's timed repeats (0: the result only)")
    args = ap.parse_args()
    print(f"# GPU checks, {datetime.date.today()}, device {args.device}\n")
    ok = True
    frames = clip_frames(TEST_CLIP, args.frames)
    from bench.throughput import MediaSpec, make_video, source_faces

    spec = MediaSpec()
    hd = make_video(source_faces(TEST_CLIP, spec.face_size), args.workdir / "clip1080p-96.mp4", 96, 0, spec)
    if args.only_rgb:
        ok &= check_rgb_on_device(TEST_CLIP, args.device, TEST_CLIP.name)
        ok &= check_rgb_on_device(hd, args.device, "1080p copy")
        ok &= check_exact_engine(hd, args.device, args.workdir)
        return 0 if ok else 1
    hd_frames = clip_frames(hd, 96)
    for clip, name in ((frames, TEST_CLIP.name), (hd_frames, "1080p copy")):
        ok &= check_exact_mtcnn(clip, args.device, name, args.repeats, args.mtcnn_max_pixels)
    if args.only_exact_mtcnn:
        return 0 if ok else 1
    faces, landmarks = mtcnn_faces(frames, args.device)
    ok &= check_aligner(frames, landmarks, args.device, TEST_CLIP.name)
    _, hd_landmarks = mtcnn_faces(hd_frames, args.device)
    ok &= check_aligner(hd_frames, hd_landmarks, args.device, "1080p copy")
    ok &= check_first_stage(hd_frames, args.device)
    ok &= check_rgb_on_device(TEST_CLIP, args.device, TEST_CLIP.name)
    ok &= check_rgb_on_device(hd, args.device, "1080p copy")
    ok &= check_exact_engine(TEST_CLIP, args.device, args.workdir)
    from engine.structures import rows_of

    n = min(args.fan_frames, len(frames))
    import dataclasses

    first = dataclasses.replace(faces.take(np.flatnonzero(faces.frame_rows < n)), num_frames=n)
    check_fan(rows_of(frames, slice(0, n)), first, args.device, args.workdir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
