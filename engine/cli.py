"""Command line: ``python -m engine <command>``.

Commands: ``extract`` and ``doctor`` (here); ``worker``, ``submit``, ``jobs``, ``cancel``,
``retry`` (the job registry, :mod:`worker.cli`); ``bfm``, ``overlay``, ``mesh`` (the face
model, :mod:`engine.face3d.cli`). The registry and face-model commands are imported only
when present, so extraction works without them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from engine.config import DEFAULT_FORMATS, EngineConfig, KeepPerson, LandmarkBackend, OutputFormat, output_format
from engine.errors import StudioError
from engine.formats import FORMATS

log = logging.getLogger("engine")

#: Modules that add subcommands through a ``register(subparsers)`` function.
PLUGINS = ("worker.cli", "engine.face3d.cli")


def _formats(text: str) -> tuple[OutputFormat | str, ...]:
    try:
        return tuple(output_format(f) for f in text.split(",") if f.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The settings shared by ``extract`` and ``submit`` (choices and help from the registries)."""
    from engine.landmarks import BACKENDS

    p.add_argument("--checkpoint", type=Path, help="reconstruction weights (default: the one under checkpoints/)")
    p.add_argument("--landmarks", choices=list(BACKENDS), default=LandmarkBackend.FAN.value,
                   help="landmark backend (default: fan): "
                   + "; ".join(f"{name}: {spec.label}" for name, spec in BACKENDS.items()))
    p.add_argument("--keypoints", type=Path,
                   help="for --landmarks file: a keypoint .txt, or a folder mirroring the input tree")
    p.add_argument("--formats", type=_formats, default=DEFAULT_FORMATS,
                   help="comma list of " + ",".join(FORMATS) + " (default: "
                   + ",".join(f.value for f in DEFAULT_FORMATS) + "): "
                   + "; ".join(f"{name}: {spec.help} ({spec.suffix})" for name, spec in FORMATS.items()))
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per batch (default: 32)")
    p.add_argument("--keep-person", choices=[k.value for k in KeepPerson], default=KeepPerson.REFERENCE.value,
                   help="with several faces in a frame: reference (default, the exact path) keeps the most "
                   "confident; continuity keeps the face that continues the previous frame's box")
    p.add_argument("--smooth-window", type=int, default=0, metavar="N",
                   help="0 (default): no smoothing; odd N >= 3: smooth the coefficients over time with a "
                   "centred N-frame Savitzky-Golay window (no lag; raw ones kept in the npz as coeff_raw)")


def config_from_args(args: argparse.Namespace, **extra) -> EngineConfig:
    """Build an :class:`EngineConfig` from parsed ``add_engine_options`` arguments."""
    return EngineConfig(
        checkpoint=args.checkpoint,
        landmarks=args.landmarks,
        keypoints=args.keypoints,
        formats=args.formats,
        device=args.device,
        batch_size=args.batch_size,
        keep_person=args.keep_person,
        smooth_window=args.smooth_window,
        **extra,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="videos/images/folders → 3DMM coefficient files")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT", help="output folder")
    add_engine_options(p)
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("doctor", help="check the installation: Python, torch, GPU, FFmpeg, weights, backends")
    p.add_argument("--checkpoint", type=Path)
    p.set_defaults(func=cmd_doctor)

    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            log.debug("subcommands of %s unavailable: %s", name, e)
            continue
        module.register(sub)
    return parser


def cmd_extract(args: argparse.Namespace) -> int:
    """Run every input; one line per failure; exit 1 if any failed."""
    from engine.pipeline import Engine
    from engine.sources import discover_inputs

    cfg = config_from_args(args, overwrite=args.overwrite)
    try:
        items = discover_inputs(args.inputs)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not items:
        print("error: no videos or images found in the given inputs", file=sys.stderr)
        return 2

    failures = 0
    done = skipped = 0
    with Engine(cfg) as engine:
        for item in items:
            out_base = args.out / item.rel_stem
            bar = None if args.no_progress else _progress_bar(item.path.name)
            try:
                report = engine.run(item, out_base, progress=bar.update if bar else None)
            except StudioError as e:
                failures += 1
                _close(bar)
                print(f"FAILED {item.path}: {e}", file=sys.stderr)
                if e.code in ("weights", "checkpoint", "weights_missing"):
                    print("stopping: the model cannot be loaded", file=sys.stderr)
                    return 1
                continue
            except Exception as e:  # a bug, but the other inputs still run
                failures += 1
                _close(bar)
                log.debug("unexpected error", exc_info=True)
                print(f"FAILED {item.path}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            _close(bar)
            if report.skipped:
                skipped += 1
                print(f"skipped {item.path} (outputs exist; --overwrite to redo)", file=sys.stderr)
            else:
                done += 1
                print(
                    f"ok {item.path}: {report.num_frames} frames, {report.num_valid} with a face, "
                    f"{report.fps:.1f} frames/s → {', '.join(str(p) for p in report.outputs.values())}",
                    file=sys.stderr,
                )
                flagged = {k: v for k, v in report.quality.get("flags", {}).items() if v}
                if flagged:
                    print("   flags: " + ", ".join(f"{k} {v}" for k, v in flagged.items()), file=sys.stderr)
    print(f"{done} done, {skipped} skipped, {failures} failed", file=sys.stderr)
    return 1 if failures else 0


class _progress_bar:
    """A tqdm bar fed by :class:`engine.pipeline.Progress` events."""

    def __init__(self, name: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=name[:40], unit="frame", dynamic_ncols=True, leave=False)

    def update(self, p) -> None:
        self.bar.total = p.frames_total
        self.bar.n = p.frames_done
        self.bar.set_postfix_str(f"{p.fps:.1f} frames/s" if p.stage == "extract" else p.stage)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    from engine.doctor import format_report, run_checks

    checks = run_checks(checkpoint=args.checkpoint)
    print(format_report(checks))
    return 0 if all(c.ok or not c.required for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (``python -m engine jobs | head``): stop quietly, as Unix tools do.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
