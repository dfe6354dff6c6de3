"""Subcommands ``bfm``, ``overlay`` and ``mesh`` of ``python -m engine`` (see :mod:`engine.cli`).

    python -m engine bfm convert --from ~/Downloads/BFM [--to BFM/] [--index DIR]
    python -m engine bfm check [--dir BFM/]
    python -m engine overlay clip.mp4 out/clip.npz -o out/clip.overlay.mp4
    python -m engine mesh out/clip.npz --frame 10 -o face.obj

Only argparse and the standard library are imported here; the commands import what they need.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add the face-model commands to ``python -m engine``'s subparsers."""
    p = subparsers.add_parser("bfm", help="set up the face model (BFM_model_front.mat) for visuals")
    bsub = p.add_subparsers(dest="bfm_command", required=True, metavar="ACTION")
    c = bsub.add_parser("convert", help="build BFM_model_front.mat from BFM09 + Exp_Pca.bin + index files")
    c.add_argument(
        "--from",
        dest="src",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder holding 01_MorphableModel.mat and Exp_Pca.bin (and possibly the index files)",
    )
    c.add_argument("--to", dest="dst", type=Path, metavar="DIR", help="output folder (default: BFM/)")
    c.add_argument(
        "--index",
        dest="index",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder with Deep3DFaceRecon's index files (repeatable)",
    )
    c.add_argument("--overwrite", action="store_true", help="rebuild even if a valid model exists")
    c.set_defaults(func=cmd_bfm_convert)
    k = bsub.add_parser("check", help="validate BFM_model_front.mat and list what the BFM folder holds")
    k.add_argument("--dir", type=Path, metavar="DIR", help="BFM folder (default: BFM/)")
    k.set_defaults(func=cmd_bfm_check)

    p = subparsers.add_parser("overlay", help="side-by-side review video: input | reconstructed face")
    p.add_argument("input", type=Path, metavar="INPUT", help="the video (or image) that was extracted")
    p.add_argument("result", type=Path, metavar="RESULT.npz", help="its npz output")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT", help="output .mp4 (or image)")
    _model_options(p)
    p.add_argument("--batch-size", type=int, default=8, help="frames rendered per batch (default: 8)")
    p.set_defaults(func=cmd_overlay)

    p = subparsers.add_parser("mesh", help="export one frame's face as OBJ (vertex colours) or PLY")
    p.add_argument("result", type=Path, metavar="RESULT.npz")
    p.add_argument("--frame", type=int, default=0, help="frame index (default: 0)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT", help="output .obj or .ply")
    p.add_argument("--bfm", type=Path, metavar="DIR", help="BFM folder (default: BFM/)")
    p.set_defaults(func=cmd_mesh)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bfm", type=Path, metavar="DIR", help="BFM folder (default: BFM/)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--renderer",
        choices=["auto", "nvdiffrast", "torch"],
        help="rasterizer backend (default: auto, or STUDIO_RENDERER)",
    )


def _bfm_dir(value: Path | None) -> Path:
    from engine.weights import bfm_dir

    return value if value is not None else bfm_dir()


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 1


def cmd_bfm_convert(args: argparse.Namespace) -> int:
    from engine.errors import StudioError
    from engine.face3d.bfm import convert_bfm

    dst = _bfm_dir(args.dst)
    folders = [args.src, *args.index, dst]
    try:
        out = convert_bfm(
            folders, dst, overwrite=args.overwrite, progress=lambda m: print(m, file=sys.stderr)
        )
    except StudioError as e:
        return _fail(e)
    print(out)
    return 0


def cmd_bfm_check(args: argparse.Namespace) -> int:
    from engine.face3d.bfm import bfm_status

    st = bfm_status(_bfm_dir(args.dir))
    if st.model_ok:
        print(f"ok: {st.folder / 'BFM_model_front.mat'} has the reference keys and shapes")
        return 0
    print(f"not set up: {st.problem}", file=sys.stderr)
    if st.sources_present:
        print(f"present in {st.folder}: {', '.join(st.sources_present)}", file=sys.stderr)
    if st.sources_missing:
        print(f"missing from {st.folder}: {', '.join(st.sources_missing)}", file=sys.stderr)
    return 1


def _device(value: str | None) -> str:
    if value:
        return value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_overlay(args: argparse.Namespace) -> int:
    from engine.errors import StudioError

    try:
        from engine.face3d.model import ParametricFaceModel
        from engine.face3d.overlay import write_overlay_video
        from engine.face3d.render import FaceRenderer

        device = _device(args.device)
        model = ParametricFaceModel.from_dir(_bfm_dir(args.bfm), device)
        renderer = FaceRenderer(device, args.renderer)

        def show(done: int, total: int) -> None:
            print(f"\r{done}/{total} frames", end="", file=sys.stderr, flush=True)

        rep = write_overlay_video(
            args.input,
            args.result,
            args.out,
            face_model=model,
            renderer=renderer,
            batch_size=args.batch_size,
            progress=show,
        )
    except StudioError as e:
        print(file=sys.stderr)
        return _fail(e)
    print(file=sys.stderr)
    print(f"{rep.path}: {rep.frames} frames at {rep.fps:g} fps, audio {rep.audio}, renderer {rep.backend}")
    return 0


def cmd_mesh(args: argparse.Namespace) -> int:
    from engine.errors import InputError, StudioError

    try:
        from engine.face3d.mesh import export_mesh
        from engine.face3d.model import ParametricFaceModel
        from engine.face3d.overlay import load_result

        res = load_result(args.result)
        if not 0 <= args.frame < len(res):
            raise InputError(f"--frame {args.frame} is outside {args.result}'s {len(res)} frames")
        model = ParametricFaceModel.from_dir(_bfm_dir(args.bfm), "cpu")
        out = export_mesh(model, res.coeff[args.frame], args.out)
    except StudioError as e:
        return _fail(e)
    print(out)
    return 0
