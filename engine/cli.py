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

from engine.config import (
    DEFAULT_FORMATS,
    MODE_HELP,
    Decoder,
    EngineConfig,
    KeepPerson,
    LandmarkBackend,
    Mode,
    OutputFormat,
    output_format,
)
from engine.cudasync import cuda_sync_mode
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


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _processes(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _at_least_one(text)


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
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.EXACT.value, help=MODE_HELP)
    p.add_argument("--detect-every", type=_at_least_one, default=8, metavar="N",
                   help="fast mode: run the face detector every N frames and track the face in between "
                   "(default: 8)")
    p.add_argument("--decoder", choices=[d.value for d in Decoder], default=Decoder.PYAV.value,
                   help="pyav (default): FFmpeg on the CPU; nvdec: the GPU's video decoder, frames kept on the GPU "
                   "(fast mode on CUDA; needs `pip install pynvvideocodec`)")


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
        mode=getattr(args, "mode", Mode.EXACT.value),
        detect_every=getattr(args, "detect_every", 8),
        decoder=getattr(args, "decoder", Decoder.PYAV.value),
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
    p.add_argument("--concurrency", type=_at_least_one, metavar="N",
                   help="inputs processed at once (default: 2 on a GPU; on the CPU one per 4 cores); "
                        "per process with --processes")
    p.add_argument("--processes", type=_processes, default="auto", metavar="K|auto",
                   help="run the inputs in K processes, each with its own models and GIL (default auto: "
                        "on a GPU with several inputs one per 4 CPU cores, at most 4; else 1); one long video "
                        "in fast mode is split into frame segments over the K processes")
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
    """Run every input (several at once, :meth:`Engine.run_many`); one line per input; exit 1 if any failed."""
    from engine.many import InputJob
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

    overall = _Overall(len(items))
    show = None
    if not args.no_progress:
        show = _progress_bar(items[0].path.name) if len(items) == 1 else _overall_bar(overall)

    def job(item) -> InputJob:
        key = str(item.path)
        return InputJob(item, args.out / item.rel_stem, progress=overall.callback(key, show), key=key)

    failures = done = skipped = 0
    with Engine(cfg) as engine:
        processes = getattr(args, "processes", 1)
        if processes == "auto":
            from engine.config import usable_cpus
            from engine.procs import auto_processes, gpu_memory_gib

            processes = auto_processes(engine.device, len(items), usable_cpus(), gpu_memory_gib(engine.device))
            log.info("extract: %d engine process(es) for %d input(s) on %s", processes, len(items), engine.device)
        if len(items) == 1 and processes > 1:  # one input: its frames split over the processes (fast mode)
            from engine.segments import split_outcomes

            outcomes = split_outcomes(engine, job(items[0]), processes)
        else:
            outcomes = engine.run_many((job(item) for item in items),
                                       concurrency=getattr(args, "concurrency", None), processes=processes)
        try:
            for outcome in outcomes:
                path = outcome.job.key
                overall.finish(path, outcome.report.num_frames if outcome.report else 0)
                if show is not None:
                    show.update(overall.current())
                e = outcome.error
                if isinstance(e, StudioError):
                    failures += 1
                    print(_clear(show) + f"FAILED {path}: {e}", file=sys.stderr)
                    if e.code in ("weights", "checkpoint", "weights_missing"):
                        print("stopping: the model cannot be loaded", file=sys.stderr)
                        return 1
                    continue
                if e is not None:  # a bug, but the other inputs still run
                    failures += 1
                    log.debug("unexpected error", exc_info=e)
                    print(_clear(show) + f"FAILED {path}: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                report = outcome.report
                if report.skipped:
                    skipped += 1
                    print(_clear(show) + f"skipped {path} (outputs exist; --overwrite to redo)", file=sys.stderr)
                else:
                    done += 1
                    print(
                        _clear(show) + f"ok {path}: {report.num_frames} frames, {report.num_valid} with a face, "
                        f"{report.fps:.1f} frames/s → {', '.join(str(p) for p in report.outputs.values())}",
                        file=sys.stderr,
                    )
                    flagged = {k: v for k, v in report.quality.get("flags", {}).items() if v}
                    if flagged:
                        print("   flags: " + ", ".join(f"{k} {v}" for k, v in flagged.items()), file=sys.stderr)
        finally:
            outcomes.close()
            _close(show)
    if len(items) > 1:
        print(overall.summary(), file=sys.stderr)
    print(f"{done} done, {skipped} skipped, {failures} failed", file=sys.stderr)
    return 1 if failures else 0


class _Overall:
    """Progress of a whole ``extract`` run over several inputs: inputs ended / total, frames/s
    over every input, and an ETA (frames left of the open inputs plus, for those not started,
    the mean frame count of the inputs seen so far). Fed from the inputs' threads (locked).

    Args:
        total: number of inputs.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, total: int, clock=None) -> None:
        import threading
        import time

        self.total = total
        self.clock = clock or time.perf_counter
        self.t0 = self.clock()
        self._lock = threading.Lock()
        self._open: dict[str, tuple[int, int, int]] = {}  # key → (frames done, frames total, frames new)
        self._ended = 0
        self._frames_ended = 0  # frames of the ended inputs (their counts as reported)
        self._new_ended = 0  # frames the ended inputs processed in this run

    def callback(self, key: str, show):
        """A per-input progress callback that feeds this counter (and refreshes ``show``)."""

        def on_progress(p) -> None:
            with self._lock:
                self._open[key] = (p.frames_done, p.frames_total, p.frames_new)
            if show is not None:
                show.update(p if isinstance(show, _progress_bar) else self.current())

        return on_progress

    def finish(self, key: str, frames: int) -> None:
        with self._lock:
            done, _, new = self._open.pop(key, (frames, frames, frames))
            self._ended += 1
            self._frames_ended += max(frames, done)
            self._new_ended += new

    def current(self) -> dict:
        """``{"ended", "total", "fps", "eta_s"}`` now (``eta_s`` None until a rate is known)."""
        with self._lock:
            new = self._new_ended + sum(n for _, _, n in self._open.values())
            seen = self._ended + len(self._open)
            frames_seen = self._frames_ended + sum(t for _, t, _ in self._open.values())
            left = sum(max(t - d, 0) for d, t, _ in self._open.values())
            ended = self._ended
        fps = new / max(self.clock() - self.t0, 1e-9)
        if seen:
            left += (self.total - seen) * frames_seen / seen
        eta = left / fps if fps > 0 else None
        return {"ended": ended, "total": self.total, "fps": fps, "eta_s": eta}

    def summary(self) -> str:
        """The final line: inputs ended, frames processed and the overall rate."""
        c = self.current()
        with self._lock:
            new = self._new_ended
        return (f"{c['ended']}/{c['total']} inputs ended, {new} frames in {self.clock() - self.t0:.1f} s "
                f"({c['fps']:.1f} frames/s overall)")


class _overall_bar:
    """A tqdm bar over the inputs of a folder: inputs ended / total, frames/s, ETA."""

    def __init__(self, overall: _Overall) -> None:
        import threading

        from tqdm import tqdm

        self.bar = tqdm(desc="inputs", total=overall.total, unit="input", dynamic_ncols=True, leave=False,
                        bar_format="{desc}: {n}/{total} |{bar}| {postfix}")
        self._lock = threading.Lock()

    def update(self, c: dict) -> None:
        eta = "?" if c["eta_s"] is None else _duration(c["eta_s"])
        with self._lock:
            self.bar.n = c["ended"]
            self.bar.set_postfix_str(f"{c['fps']:.1f} frames/s, ETA {eta}")
            self.bar.refresh()

    def clear(self) -> None:
        with self._lock:
            self.bar.clear()

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    """``3725`` → ``"1:02:05"``; ``65`` → ``"1:05"``.

    >>> _duration(3725), _duration(65.4)
    ('1:02:05', '1:05')
    """
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _clear(bar) -> str:
    """Clear a bar before a line is printed under it (returns "" to prefix the line)."""
    if bar is not None and hasattr(bar, "clear"):
        bar.clear()
    return ""


class _progress_bar:
    """A tqdm bar fed by :class:`engine.pipeline.Progress` events (one input)."""

    def __init__(self, name: str) -> None:
        import threading

        from tqdm import tqdm

        self.bar = tqdm(desc=name[:40], unit="frame", dynamic_ncols=True, leave=False)
        self._lock = threading.Lock()

    def update(self, p) -> None:
        if not hasattr(p, "frames_total"):  # the overall counters: one input has no use for them
            return
        with self._lock:
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
    try:
        cuda_sync_mode()  # a wrong STUDIO_CUDA_SYNC stops here, not in every job's Engine
    except ValueError as e:
        parser.error(str(e))
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
