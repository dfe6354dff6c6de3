"""Compare the two renderers on a CUDA GPU: nvdiffrast (RasterizeCudaContext) vs the built-in torch one.

Builds a synthetic BFM (real index files, made-up values; see engine/face3d/synthetic.py),
renders faces from random coefficients with both backends, and prints per-face mask IoU and
mean colour difference (over pixels both cover, in 1/255 units), then timings. Needs numpy,
scipy, torch with CUDA, and nvdiffrast (``pip install diffrp-nvdiffrast==0.3.3.1``; the CUDA
plugin compiles on first use and needs nvcc and ninja).

    python bench/gpu_render_compare.py --index ../shared/bfm_index [--faces 64] [--out DIR]

Exit status 0 when every face meets IoU >= 0.99 and mean colour difference < 2/255.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.face3d import synthetic
from engine.face3d.model import ParametricFaceModel
from engine.face3d.render import FaceRenderer, renderer_status

IOU_MIN = 0.99
COLOR_MAX = 2.0  # in 1/255


def random_coeff(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 257) float32: shape/texture N(0, 1), pose within about ±30°, light and translation small."""
    c = np.zeros((n, 257), dtype=np.float32)
    c[:, 0:224] = rng.normal(0, 1, (n, 224))
    c[:, 224:227] = rng.normal(0, 0.25, (n, 3))
    c[:, 227:254] = rng.normal(0, 0.15, (n, 27))
    c[:, 254:256] = rng.normal(0, 0.15, (n, 2))
    c[:, 256] = rng.normal(0, 0.5, n)
    return c


def timed(fn, repeat: int) -> float:
    torch.cuda.synchronize()
    fn()  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True, help="folder with Deep3DFaceRecon's BFM index files")
    ap.add_argument("--faces", type=int, default=64, help="random faces to compare (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write compare.png (nvdiffrast | torch | |diff|×8) here")
    ap.add_argument("--full-conversion", action="store_true",
                    help="build the model through the full BFM09 conversion (slower) instead of directly")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__} CUDA {torch.version.cuda} on {torch.cuda.get_device_name()}")
    t = time.perf_counter()
    st = renderer_status("cuda", probe=True)
    print(f"renderer_status(probe=True): {st.describe()} [{time.perf_counter() - t:.1f} s incl. plugin build]")

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if args.full_conversion:
            from engine.face3d.bfm import convert_bfm

            synthetic.write_synthetic_sources(args.index, Path(tmp) / "src", seed=args.seed)
            convert_bfm([Path(tmp) / "src", args.index], tmp)
        else:
            synthetic.write_synthetic_model(args.index, tmp, seed=args.seed)
        model = ParametricFaceModel.from_dir(tmp, "cuda")
        print(f"synthetic BFM built and loaded in {time.perf_counter() - t:.1f} s")

    nv = FaceRenderer("cuda", "nvdiffrast")
    tr = FaceRenderer("cuda", "torch")
    rng = np.random.default_rng(args.seed)
    coeff = random_coeff(args.faces, rng)
    with torch.no_grad():
        geo = model.compute_for_render(coeff)
        a = nv(geo.vertex_cam, model.tri, geo.color)
        b = tr(geo.vertex_cam, model.tri, geo.color)
    ma, mb = a.mask[:, 0] > 0, b.mask[:, 0] > 0
    inter = (ma & mb).flatten(1).sum(1).float()
    union = (ma | mb).flatten(1).sum(1).float()
    iou = (inter / union.clamp(min=1)).cpu().numpy()
    both = (ma & mb)[:, None]
    diff = (a.image.clamp(0, 1) - b.image.clamp(0, 1)).abs() * 255
    mean_diff = ((diff * both).flatten(1).sum(1) / (3 * inter).clamp(min=1)).cpu().numpy()
    p99 = [float(torch.quantile(d[m.expand_as(d)], 0.99)) if m.any() else 0.0 for d, m in zip(diff, both, strict=True)]
    depth_diff = ((a.depth - b.depth).abs() * both).flatten(1).amax(1).cpu().numpy()
    cover = mb.flatten(1).float().mean(1).cpu().numpy()

    print(f"\n{'face':>4} {'cover':>6} {'IoU':>8} {'mean|Δc|':>9} {'p99|Δc|':>8} {'max|Δz|':>8}")
    for i in range(args.faces):
        print(f"{i:4d} {cover[i]:6.3f} {iou[i]:8.5f} {mean_diff[i]:9.4f} {p99[i]:8.3f} {depth_diff[i]:8.5f}")
    ok = bool((iou >= IOU_MIN).all() and (mean_diff < COLOR_MAX).all())
    print(f"\nmask IoU: min {iou.min():.5f}, mean {iou.mean():.5f} (need >= {IOU_MIN})")
    print(f"mean colour difference (1/255): max {mean_diff.max():.4f}, mean {mean_diff.mean():.4f} "
          f"(need < {COLOR_MAX})")
    print(f"pixels covered by exactly one backend: {int(((ma ^ mb)).sum())} of {int(union.sum())}")
    print("RESULT:", "PASS" if ok else "FAIL")

    if args.out:
        from PIL import Image

        args.out.mkdir(parents=True, exist_ok=True)
        k = min(4, args.faces)
        rows = []
        for i in range(k):
            ia = (a.image[i].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
            ib = (b.image[i].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
            dd = np.clip(np.abs(ia.astype(int) - ib.astype(int)) * 8, 0, 255).astype(np.uint8)
            rows.append(np.concatenate([ia, ib, dd], axis=1))
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.out / "compare.png")
        print(f"wrote {args.out / 'compare.png'}")

    print("\ntimings (rasterize + interpolate at 224², shading excluded):")
    print(f"{'batch':>6} {'nvdiffrast img/s':>17} {'torch img/s':>12}")
    for batch in (1, 16, 64, 256):
        c = random_coeff(batch, rng)
        with torch.no_grad():
            g = model.compute_for_render(c)
            row = []
            for r in (nv, tr):
                sec = timed(lambda r=r, g=g: r(g.vertex_cam, model.tri, g.color), repeat=5 if batch < 256 else 3)
                row.append(batch / sec)
        print(f"{batch:6d} {row[0]:17.1f} {row[1]:12.1f}")
    with torch.no_grad():
        g = model.compute_for_render(random_coeff(64, rng))
        sec = timed(lambda: model.compute_for_render(coeff[:64]), repeat=5)
    print(f"face model (shape, texture, normals, SH) batch 64: {64 / sec:.1f} faces/s")
    print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
