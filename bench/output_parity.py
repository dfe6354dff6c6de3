"""Are two checkouts' written outputs bit-identical? Extract the shared media with each, compare.

Usage (from the repo root)::

    # 1. outputs of a pristine checkout (e.g. ``git archive bb75801 | tar -x -C /tmp/base``)
    python -m bench.output_parity write --repo /tmp/base --out /tmp/parity/before
    # 2. outputs of this working tree
    python -m bench.output_parity write --repo . --out /tmp/parity/after
    # 3. file by file: bytes, and for .mat/.npz every array exactly
    python -m bench.output_parity compare /tmp/parity/before /tmp/parity/after

``write`` runs ``python -m engine extract`` of ``--repo`` in a subprocess, on the CPU, with a
random-weight ``epoch_20.pth`` (tests/factories.py) and the synthetic face model
(engine/face3d/synthetic.py) made once under ``--assets`` and shared by both runs, so only the
engine's code differs. Three runs:

* ``mtcnn/``: the shared clip and images, ``--landmarks mtcnn``, every format incl. the overlay;
* ``file-images/``: the images with Deep3D's ``detections/<stem>.txt`` (``--landmarks file``);
* ``file-video/``: the clip with the keypoint ``.txt`` written by the ``mtcnn`` run.

``compare`` exits 1 when a file differs or is missing on one side. A ``.mat`` file whose
bytes differ only in its header (scipy writes the creation time there) counts as identical;
otherwise arrays of ``.mat``/``.npz`` files are compared by name, dtype, shape and value (NaN
equal to NaN); keys present on only one side are listed (the ``after`` side may add arrays,
see ``--allow-new-keys``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import REPO, SHARED

log = logging.getLogger("bench.output_parity")

CLIP = SHARED / "testdata" / "video" / "WDA_KatieHill_000.mp4"
IMAGES = SHARED / "testdata" / "images"
BFM_INDEX = SHARED / "bfm_index"
FORMATS = "pirender,sadtalker,deep3d,npz,csv,landmarks"
#: A MAT-file v5 header: 116 bytes of text ("... Created on: <time>"), subsystem offset, version.
MAT_HEADER = 128


def make_assets(assets: Path) -> tuple[Path, Path]:
    """(checkpoint, face-model folder) under ``assets``, written on first use."""
    from engine.face3d.bfm import MODEL_NAME
    from engine.face3d.synthetic import write_synthetic_model
    from tests.factories import make_checkpoint

    ckpt = assets / "epoch_20.pth"
    if not ckpt.is_file():
        make_checkpoint(ckpt, "deep3d")
    bfm = assets / "bfm"
    if not (bfm / MODEL_NAME).is_file():
        bfm.mkdir(parents=True, exist_ok=True)
        write_synthetic_model(BFM_INDEX, bfm, seed=0)
    return ckpt, bfm


def _extract(repo: Path, inputs: list[Path], out: Path, args: list[str], env: dict) -> None:
    cmd = [sys.executable, "-m", "engine", "extract", *map(str, inputs), "-o", str(out),
           "--device", "cpu", "--no-progress", "--overwrite", *args]
    log.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"extract failed ({proc.returncode}) in {repo}")


def cmd_write(args: argparse.Namespace) -> int:
    repo, out = args.repo.resolve(), args.out.resolve()
    ckpt, bfm = make_assets(args.assets.resolve())
    env = {**os.environ, "STUDIO_BFM_DIR": str(bfm), "PYTHONPATH": str(repo)}
    common = ["--checkpoint", str(ckpt)]
    images = sorted(p for p in IMAGES.iterdir() if p.is_file())
    _extract(repo, [CLIP, *images], out / "mtcnn", [*common, "--landmarks", "mtcnn",
                                                     "--formats", FORMATS + ",overlay"], env)
    _extract(repo, images, out / "file-images", [*common, "--landmarks", "file", "--formats", FORMATS], env)
    keypoints = out / "mtcnn" / f"{CLIP.stem}.txt"
    _extract(repo, [CLIP], out / "file-video", [*common, "--landmarks", "file", "--keypoints", str(keypoints),
                                                 "--formats", FORMATS], env)
    return 0


def _arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    from scipy.io import loadmat

    return {k: v for k, v in loadmat(path).items() if not k.startswith("__")}


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def compare_file(a: Path, b: Path, allow_new_keys: bool) -> tuple[bool, str]:
    """(identical, one-line description) for one pair of files."""
    bytes_a, bytes_b = a.read_bytes(), b.read_bytes()
    if bytes_a == bytes_b:
        return True, "bytes identical"
    if a.suffix not in (".npz", ".mat"):
        return False, f"bytes differ ({len(bytes_a)} vs {len(bytes_b)} bytes)"
    if a.suffix == ".mat" and bytes_a[MAT_HEADER:] == bytes_b[MAT_HEADER:]:
        return True, "bytes identical after the 128-byte header (its text holds the creation time)"
    xa, xb = _arrays(a), _arrays(b)
    differ = [k for k in sorted(set(xa) & set(xb)) if not _same_array(xa[k], xb[k])]
    only_a, only_b = sorted(set(xa) - set(xb)), sorted(set(xb) - set(xa))
    ok = not differ and not only_a and (allow_new_keys or not only_b)
    parts = [f"{len(set(xa) & set(xb)) - len(differ)} arrays identical"]
    if differ:
        parts.append(f"differ: {differ}")
    if only_a:
        parts.append(f"missing after: {only_a}")
    if only_b:
        parts.append(f"new after: {only_b}")
    return ok, "arrays: " + ", ".join(parts)


def cmd_compare(args: argparse.Namespace) -> int:
    before, after = args.before.resolve(), args.after.resolve()
    names_a = {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
    names_b = {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
    failures = 0
    for rel in sorted(names_a | names_b):
        if rel not in names_a or rel not in names_b:
            failures += 1
            print(f"MISSING {rel} (only {'before' if rel in names_a else 'after'})")
            continue
        ok, what = compare_file(before / rel, after / rel, args.allow_new_keys)
        failures += not ok
        print(f"{'same' if ok else 'DIFF'}    {rel}: {what}")
    total = len(names_a | names_b)
    print(f"{total - failures}/{total} files identical")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.output_parity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("write", help="extract the shared media with the engine of --repo")
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose engine runs (default: this one)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--assets", type=Path, default=Path("/tmp/output-parity-assets"),
                   help="where the random checkpoint and synthetic face model are kept")
    p.set_defaults(func=cmd_write)
    p = sub.add_parser("compare", help="compare two output trees")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--allow-new-keys", action="store_true",
                   help="arrays present only in 'after' .npz/.mat files are not a difference")
    p.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
