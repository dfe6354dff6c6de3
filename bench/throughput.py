"""Throughput of the exact and fast paths against the reference-style pipeline, in one process.

Usage (see docs/PERFORMANCE.md)::

    python bench/throughput.py --set clips --device cuda            # 40 clips of 10 s, 1080p
    python bench/throughput.py --set long --device cuda             # one 10-minute 1080p video
    python bench/throughput.py --video a.mp4 --video b.mp4 --device cuda
    python bench/throughput.py --set clips --clips 2 --seconds 1 --height 144 --device cpu  # smoke

For every ``--mode`` (exact, fast) and ``--landmarks`` backend: frames/s of each stage on a
sample of the inputs' frames (decode, detect on every frame, the mode's tracker (which may
detect only on keyframes), landmarks, align, regress), then end to end over every input
(``Engine.run_many`` when the engine has it, else ``Engine.run`` per input), peak host RSS and
GPU memory and GPU busy % of that phase. Then the reference-style pipeline (PIRender's two
scripts, spec §5) on the same files, and the ratios. Prints Markdown to paste into
docs/PERFORMANCE.md. Never asserts anything about time.

Weights: the files found are used; missing ones are replaced by random weights of the same
architectures (a random Deep3D checkpoint; random S3FD and 2D-FAN-4 files in a temporary
TORCH_HOME), which the output says. Speed does not depend on the values, except that random
S3FD finds no face: its classifier bias is set so (forward cost unchanged), and one fixed box
around the face is handed on instead (``FixedBox``), in every pipeline alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TEST_CLIP, checkpoint_or_random

log = logging.getLogger("bench.throughput")

STAGES = ("decode", "detect (every frame)", "detect + track (as the mode runs it)", "landmarks", "align", "regress")


# ------------------------------------------------------------------------------------ test media


@dataclasses.dataclass(frozen=True)
class MediaSpec:
    """Generated 1080p-style media: the shared clip upscaled onto a ``width``×``height`` canvas.

    The face square is ``face_frac`` of the canvas height; it drifts on a slow ellipse
    (``drift_frac`` of the height, period ``drift_period_s``) so trackers have to follow it.
    """

    width: int = 1920
    height: int = 1080
    fps: int = 25
    face_frac: float = 0.8
    drift_frac: float = 0.06
    drift_period_s: float = 7.0

    @property
    def face_size(self) -> int:
        return round(self.height * self.face_frac / 2) * 2

    def face_origin(self, t: float) -> tuple[int, int]:
        """Top-left (x, y) pixel of the face square at time ``t`` seconds in a clip."""
        a = self.drift_frac * self.height
        phase = 2 * math.pi * t / self.drift_period_s
        x = (self.width - self.face_size) / 2 + a * math.sin(phase)
        y = (self.height - self.face_size) / 2 + 0.5 * a * math.sin(2 * phase)
        return round(x), round(y)

    def face_box(self) -> np.ndarray:
        """float64 (5,) ``x1, y1, x2, y2, score`` of the face at its mean place (the source clip's
        face sits in the middle ~half of its square)."""
        x, y = self.face_origin(0.0)
        s = self.face_size
        return np.array([x + 0.25 * s, y + 0.18 * s, x + 0.75 * s, y + 0.78 * s, 0.99])


def source_faces(src: Path, size: int) -> list[np.ndarray]:
    from PIL import Image

    from engine.sources import iter_frames

    frames = [im for b in iter_frames(src, 64) for im in b.images]
    return [np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BILINEAR)) for f in frames]


def _open_stream(out, spec: MediaSpec):
    """An H.264 stream (libx264, CRF 20, veryfast) when PyAV has it, else MPEG-4 Part 2."""
    import av

    try:
        stream = out.add_stream("libx264", rate=spec.fps)
        stream.options = {"crf": "20", "preset": "veryfast"}
    except (av.error.FFmpegError, ValueError):
        stream = out.add_stream("mpeg4", rate=spec.fps)
        stream.bit_rate = 8_000_000
    stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
    return stream


def make_video(faces: list[np.ndarray], dst: Path, frames: int, start: int, spec: MediaSpec, first: int = 0) -> Path:
    """Write ``frames`` frames: the source faces from frame ``start`` on (ping-pong, so motion stays
    continuous), each pasted onto a grey canvas at its drifting place. ``first``: the index of the
    first frame in a longer video this file is a piece of (motion continues from there). Cached
    by file name."""
    import av

    from engine.avcompat import open_container

    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.stem + ".part" + dst.suffix)
    n, s = len(faces), spec.face_size
    with open_container(tmp, "w") as out:
        stream = _open_stream(out, spec)
        for i in range(first, first + frames):
            j = (start + i) % (2 * n - 2)
            j = j if j < n else 2 * n - 2 - j
            canvas = np.full((spec.height, spec.width, 3), 96, np.uint8)
            x, y = spec.face_origin(i / spec.fps)
            canvas[y:y + s, x:x + s] = faces[j]
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(dst)
    return dst


def _make_in_child(src: Path, spec: MediaSpec, dst: Path, frames: int, start: int, first: int) -> Path:
    """:func:`make_video` in a child process (it reads the source faces itself)."""
    return make_video(source_faces(src, spec.face_size), dst, frames, start, spec, first=first)


def _make_parallel(src: Path, spec: MediaSpec, jobs: int, videos: list[tuple[Path, int, int, int]]) -> None:
    """:func:`make_video` for each ``(dst, frames, start, first)``, ``jobs`` processes at once."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(videos)), mp_context=ctx) as pool:
        for future in [pool.submit(_make_in_child, src, spec, *video) for video in videos]:
            future.result()


def concat_videos(parts: list[Path], dst: Path) -> Path:
    """Join H.264 files made by :func:`make_video` with the same settings into one stream, packets
    copied (no re-encode). Each part starts on a keyframe, and its timestamps are moved by the
    frames before it: decode order and timestamps then run on exactly as in one encode."""
    from engine.avcompat import add_stream_like, open_container

    tmp = dst.with_name(dst.stem + ".part" + dst.suffix)
    offset_s = 0.0
    with open_container(tmp, "w") as out:
        ostream = None
        for part in parts:
            with open_container(part) as inp:
                istream = inp.streams.video[0]
                if ostream is None:
                    ostream = add_stream_like(out, istream)
                shift = round(offset_s / istream.time_base)
                for packet in inp.demux(istream):
                    if packet.dts is None:  # the demuxer's empty flush packet
                        continue
                    packet.pts += shift
                    packet.dts += shift
                    packet.stream = ostream
                    out.mux(packet)
                offset_s += istream.frames / float(istream.average_rate)
    tmp.replace(dst)
    return dst


def make_long_video(src: Path, dst: Path, frames: int, spec: MediaSpec, jobs: int) -> Path:
    """One long video made as ``jobs`` pieces in parallel (x264 alone uses few cores well), then
    joined; a 10-minute 1080p video takes ~5 minutes in one encoder on 16 cores."""
    if dst.exists():
        return dst
    jobs = min(jobs, frames // 250)  # pieces of at least 10 s at 25 fps
    if jobs <= 1:
        return make_video(source_faces(src, spec.face_size), dst, frames, 0, spec)
    bounds = np.linspace(0, frames, jobs + 1).astype(int)
    parts = [dst.with_name(f"{dst.stem}.piece{k:02d}{dst.suffix}") for k in range(jobs)]
    _make_parallel(src, spec, jobs, [(part, int(b - a), 0, int(a))
                                     for part, a, b in zip(parts, bounds[:-1], bounds[1:], strict=True)])
    concat_videos(parts, dst)
    for part in parts:
        part.unlink()
    return dst


def make_set(kind: str, args, spec: MediaSpec, workdir: Path) -> list[Path]:
    """The generated inputs: ``long`` = one video of ``--minutes``; ``clips`` = ``--clips`` videos of
    ``--seconds``, each starting at a different frame of the source clip."""
    tag = f"{spec.width}x{spec.height}_{spec.fps}"
    if kind == "long":
        n = max(1, round(args.minutes * 60 * spec.fps))
        return [make_long_video(args.clip, workdir / f"long_{tag}_{n}.mp4", n, spec, args.gen_jobs)]
    faces = source_faces(args.clip, spec.face_size)
    n = max(1, round(args.seconds * spec.fps))
    folder = workdir / f"clips_{tag}_{n}"
    clips = [(folder / f"clip_{k:03d}.mp4", n, (37 * k) % len(faces), 0) for k in range(args.clips)]
    todo = [clip for clip in clips if not clip[0].exists()]
    if args.gen_jobs > 1 and len(todo) > 1:
        _make_parallel(args.clip, spec, args.gen_jobs, todo)
    return [make_video(faces, dst, frames, start, spec) for dst, frames, start, _ in clips]


# ------------------------------------------------------------------------------------ weights


def _suppress_faces(sd: dict) -> dict:
    """S3FD state dict whose classifiers say "background" everywhere (the forward cost is unchanged)."""
    for key, t in sd.items():
        if "conf" in key:  # zero weights (same FLOPs), bias: background +30, face -30 (the last channel)
            t.zero_()
            if key.endswith("bias"):
                t[-1] = -30.0
                t[0] = 30.0
    return sd


def prepare_fan_weights(workdir: Path) -> str:
    """Make face_alignment find S3FD and 2D-FAN-4 files: the real ones when present, else random
    weights of both architectures in a TORCH_HOME under ``workdir``. Returns what was used."""
    from engine.landmarks import fan

    if not fan.missing_weights():
        return f"real S3FD/2D-FAN-4 files in {fan.weights_dir()}"
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    os.environ["TORCH_HOME"] = str(workdir / "torch")
    folder = fan.weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if not (folder / fan.WEIGHTS[0][0]).exists():
        torch.save(_suppress_faces(s3fd().state_dict()), folder / fan.WEIGHTS[0][0])
    if not (folder / fan.WEIGHTS[1][0]).exists():
        torch.save(FAN(4).state_dict(), folder / fan.WEIGHTS[1][0])
    return f"RANDOM S3FD/2D-FAN-4 weights (real architectures) in {folder}; S3FD finds no face, a fixed box is used"


@dataclasses.dataclass
class FixedBox:
    """A detector wrapper: runs ``inner`` (its cost is measured), then reports one fixed face box in
    each frame where ``inner`` found none (random S3FD weights find none). Detector protocol."""

    inner: Callable
    box: np.ndarray  # x1, y1, x2, y2, score

    @property
    def name(self) -> str:
        return str(getattr(self.inner, "name", "detector"))

    def __call__(self, frames):
        from engine.structures import Detections

        found = self.inner(frames)
        n = len(frames)
        missing = np.setdiff1d(np.arange(n), found.frame_rows)
        if not len(missing):
            return found
        boxes = np.concatenate([found.boxes_img_ydown, np.repeat(self.box[None, :4], len(missing), 0)])
        scores = np.concatenate([found.scores, np.full(len(missing), self.box[4])])
        rows = np.concatenate([found.frame_rows, missing]).astype(np.int64)
        order = np.argsort(rows, kind="stable")
        return Detections(boxes_img_ydown=boxes[order], scores=scores[order], frame_rows=rows[order], num_frames=n)


# ------------------------------------------------------------------------------------ measuring


class Monitor:
    """Peak RSS of this process (psutil, else /proc) and of its largest child process (the engine
    processes of ``--processes``), GPU busy % and the device's used memory (pynvml, else
    nvidia-smi), sampled in a thread while a phase runs; peak GPU memory of this process from torch;
    the host's busy CPU cores over the phase (all processes, from ``/proc/stat``; n/a elsewhere)."""

    def __init__(self, device: str, interval_s: float = 0.1) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_rss = 0
        self.peak_child_rss = 0
        self.peak_device_used = 0
        self.busy: list[float] = []
        self.cpu_cores_busy: float | None = None
        self._stop = threading.Event()
        self._gpu_index = _gpu_index(device)
        self._nvml = _nvml_handle(self._gpu_index) if self._gpu_index is not None else None
        self._smi = self._nvml is None and self._gpu_index is not None and shutil.which("nvidia-smi") is not None

    def __enter__(self) -> Monitor:
        if self._gpu_index is not None:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._cpu_start = cpu_jiffies()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._gpu_index is not None:
            import torch

            torch.cuda.synchronize()
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, _rss())
        end = cpu_jiffies()
        if self._cpu_start and end and end[1] > self._cpu_start[1]:
            busy, total = end[0] - self._cpu_start[0], end[1] - self._cpu_start[1]
            self.cpu_cores_busy = busy / total * (os.cpu_count() or 1)

    @property
    def cpu_busy(self) -> str:
        """Busy host cores over the phase, e.g. ``"11.2 of 16"``."""
        return "n/a" if self.cpu_cores_busy is None else f"{self.cpu_cores_busy:.1f} of {os.cpu_count()}"

    def _run(self) -> None:
        last_gpu = 0.0
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, _rss())
            self.peak_child_rss = max([self.peak_child_rss, *_children_rss()])
            if self._nvml is not None:
                with contextlib.suppress(Exception):
                    import pynvml

                    self.peak_device_used = max(self.peak_device_used, pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used)
            now = time.monotonic()
            if now - last_gpu >= (0.5 if self._smi else self.interval_s) and self._gpu_index is not None:
                last_gpu = now
                value = _gpu_busy(self._nvml, self._gpu_index, self._smi)
                if value is not None:
                    self.busy.append(value)
            self._stop.wait(self.interval_s)

    @property
    def gpu_busy(self) -> str:
        return f"{np.mean(self.busy):.0f} %" if self.busy else "n/a"

    @property
    def gpu_peak(self) -> str:
        if self._gpu_index is None:
            return "n/a"
        import torch

        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all host CPUs since boot, from ``/proc/stat`` (None elsewhere).
    Busy is everything but idle and iowait. The first 8 columns only: the guest columns after
    them are already counted in user and nice."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def _gpu_index(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()


def _nvml_handle(index: int):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


def _gpu_busy(handle, index: int, smi: bool) -> float | None:
    try:
        if handle is not None:
            import pynvml

            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        if smi:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", str(index)], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
    except Exception:
        return None
    return None


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _children_rss() -> list[int]:
    """RSS (bytes) of each child process of this one (from /proc; empty elsewhere)."""
    me, out = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[1] == me:  # ppid
                out.append(int(fields[21]) * os.sysconf("SC_PAGE_SIZE"))  # rss in pages
        except (OSError, IndexError, ValueError):
            continue
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(device: str, out: list) -> Iterator[None]:
    sync(device)
    t = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - t)


# ------------------------------------------------------------------------------------ engine paths


@dataclasses.dataclass
class Row:
    """One pipeline's figures: stage frames/s, end to end, peaks."""

    name: str
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    fps: float = float("nan")
    frames: int = 0
    seconds: float = 0.0
    peak_rss: str = ""
    gpu_peak: str = ""
    gpu_busy: str = ""
    cpu_busy: str = ""
    note: str = ""


def make_config(args, mode: str, landmarks: str, ckpt: Path):
    """EngineConfig for a mode; None (and a reason) when this branch has no such mode."""
    from engine import EngineConfig

    base = dict(checkpoint=ckpt, landmarks=landmarks, device=args.device, batch_size=args.batch_size,
                formats=("npz",), overwrite=True)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    if "mode" not in fields:
        return (EngineConfig(**base), None) if mode == "exact" else (None, "fast path not available on this branch")
    extra = {"mode": mode}
    if mode == "fast" and "detect_every" in fields and args.detect_every:
        extra["detect_every"] = args.detect_every
    if args.decoder != "pyav":
        if "decoder" not in fields:
            return None, f"decoder {args.decoder} not available on this branch"
        extra["decoder"] = args.decoder
    try:
        return EngineConfig(**base, **extra), None
    except (TypeError, ValueError) as e:
        return None, f"not available ({e})"


def build_engine(cfg, fixed_box: np.ndarray | None = None):
    """An Engine for ``cfg`` (its mode's stages and its decoder, as ``extract`` builds them), with
    the detector wrapped in :class:`FixedBox` when S3FD has random weights. Also what each child
    process of ``--processes`` builds (its own decoder and stages)."""
    from engine import Engine

    landmarker = Engine(cfg).landmarker_for(None)  # fan and mtcnn need no input to be built
    detector = getattr(landmarker, "detector", None)
    if fixed_box is not None and detector is not None:
        detector = FixedBox(detector, fixed_box)
    return Engine(cfg, landmarker=landmarker, detector=detector)


def stage_rates(engine, inputs: list[Path], args) -> dict[str, float]:
    """Frames/s of each stage of ``engine`` alone, on the first ``--stage-frames`` frames of the
    inputs in batches of ``--batch-size`` (each stage over every sample batch, after a warm-up
    call). These hold the sample in RAM; the end-to-end figure does not."""
    device = args.device
    batches, t_decode = [], []
    with timed(device, t_decode):
        for path in inputs:
            frames = engine.source.frames(path, args.batch_size)
            for b in frames:
                batches.append(b)
                if sum(len(x) for x in batches) >= args.stage_frames:
                    break
            frames.close()
            if sum(len(x) for x in batches) >= args.stage_frames:
                break
    n = sum(len(b) for b in batches)

    def rate(fn, items: list) -> tuple[float, list]:
        fn(items[0])  # warm-up
        t: list[float] = []
        with timed(device, t):
            out = [fn(x) for x in items]
        return n / t[0], out

    rates = {"decode": n / t_decode[0]}
    landmarker = engine.landmarker_for(inputs[0])
    detector = engine.detector_for(landmarker)
    if detector is not None:
        rates["detect (every frame)"], _ = rate(detector, batches)
    state = [engine.tracker.initial_state()]

    def track(b):
        faces, state[0] = engine.tracker(b, detector, state[0])
        return faces

    rates["detect + track (as the mode runs it)"], faces = rate(track, batches)
    rates["landmarks"], lms = rate(lambda pair: landmarker(*pair), list(zip(batches, faces, strict=True)))
    plans, pstate = [], engine.temporal_policy.initial_state(None)
    for lm in lms:
        plan, pstate = engine.temporal_policy(lm, pstate)
        plans.append(plan)
    rates["align"], aligned = rate(lambda pair: engine.aligner(*pair), list(zip(batches, plans, strict=True)))
    regressor = engine.regressor
    with regressor.numerics():
        rates["regress"], _ = rate(lambda a: regressor.predict(a.crops), aligned)
    return rates


def end_to_end(engine, inputs: list[Path], out_dir: Path, concurrency: int | None = None,
               pool=None) -> tuple[int, float, str]:
    """Every input through ``engine``: (frames, seconds, how). ``run_many`` (``concurrency`` inputs
    at once; None: its default) when the engine has it; through ``pool``
    (:class:`engine.procs.EnginePool`, started and warm) when given: one input is then split into
    frame segments over the pool's processes (:func:`engine.segments.run_split`; fast mode)."""
    t = time.perf_counter()
    frames = 0
    if pool is not None and len(inputs) == 1:
        from engine.segments import run_split, split_segments

        p = inputs[0]
        parts = len(split_segments(engine.config, engine.check_input(p), pool.processes))
        frames = run_split(engine, p, out_dir / p.stem, processes=pool.processes, pool=pool).num_frames
        how = f"one input split into {parts} segment(s) over {pool.processes} processes (engine.segments)"
    elif pool is not None or hasattr(engine, "run_many"):
        from engine.many import InputJob

        jobs = (InputJob(source=p, out_base=out_dir / p.stem, key=str(i)) for i, p in enumerate(inputs))
        outcomes = pool.run_many(jobs) if pool is not None else engine.run_many(jobs, concurrency=concurrency)
        for outcome in outcomes:
            if outcome.error is not None:
                raise RuntimeError(f"{outcome.job.source}: {outcome.error}") from outcome.error
            frames += outcome.report.num_frames
        how = "Engine.run_many" + (f", {concurrency} inputs at once" if concurrency else "")
        if pool is not None:
            how += f" per process, {pool.processes} processes"
    else:
        for p in inputs:
            frames += engine.run(p, out_dir / p.stem).num_frames
        how = "Engine.run per input"
    return frames, time.perf_counter() - t, how


#: py-spy's flags for each view of :func:`py_spy`.
SPY_VIEWS = {
    "gil": ["--gil", "--threads", "--nonblocking"],
    "threads": ["--threads", "--idle", "--nonblocking"],
    "cpu": ["--threads", "--native"],  # py-spy pauses a process for its native stacks
}


@contextlib.contextmanager
def py_spy(folder: Path | None, name: str, *, pid: int | None = None,
           views: tuple[str, ...] = ("gil",)) -> Iterator[None]:
    """Sample process ``pid`` (default: this one) and its children with ``py-spy`` (when installed
    and ``folder`` is given) while the block runs, 100 samples/s per process, one file of collapsed
    stacks per view: ``name.gil.txt``, the thread holding each process's GIL, under its process and
    thread name (fewer samples than seconds × 100 × processes means the GIL was free that share of
    the time); ``name.threads.txt``, every thread, waiting ones included, each stack under its
    process and thread name (what a thread waits on shows as its leaf: a lock, a queue, a CUDA
    synchronize); ``name.cpu.txt``, the threads running on a CPU, with native frames (where
    decoding, colour conversion, copies and CUDA's spinning waits spend the cores). py-spy does
    not always name a thread right. The first two are sampled without pausing the processes
    (``--nonblocking``), so the rate is barely changed; native stacks need each sample to pause
    the process, which slows it. ``bench/spy_summary.py`` reads the files."""
    places = [Path(sys.executable).parent, *(Path(p) / "bin" for p in sys.path if p)]  # venv, pip --target
    exe = next((str(c / "py-spy") for c in places if (c / "py-spy").is_file()), shutil.which("py-spy"))
    exe = exe if folder else None
    if exe is None:
        if folder:
            log.warning("--spy: py-spy is not installed; no profile")
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    procs = []
    for view in views:
        flags = SPY_VIEWS[view]
        cmd = [exe, "record", "--pid", str(pid or os.getpid()), "--rate", "100", *flags, "--subprocesses",
               "--format", "raw", "--output", str(folder / f"{name}.{view}.txt")]
        # py-spy reports (errors too) on stdout
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    t = time.perf_counter()
    try:
        yield
    finally:
        for view, proc in zip(views, procs, strict=True):
            proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
            try:
                said, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                said = b"(no answer to SIGINT within 60 s: killed)"
            print(f"    py-spy {name} ({view}): {time.perf_counter() - t:.1f} s sampled, "
                  f"exit status {proc.returncode}; {said.decode(errors='replace')[-400:].strip()}",
                  file=sys.stderr, flush=True)


def measure_mode(mode: str, landmarks: str, args, inputs, warm: Path, ckpt: Path, fixed_box) -> Row:
    name = f"{mode}, {landmarks}"
    cfg, why = make_config(args, mode, landmarks, ckpt)
    if cfg is None:
        return Row(name, note=why)
    row = Row(name)
    try:
        box = fixed_box if landmarks == "fan" else None
        engine = build_engine(cfg, box)
        with engine, contextlib.ExitStack() as stack:
            engine.run(warm, args.workdir / "out" / "warm")  # loads the models, first CUDA kernels
            if args.stage_frames > 0:
                row.stages = stage_rates(engine, inputs, args)
            pool = start_pool(stack, args, cfg, box, warm) if args.processes > 1 else None
            with Monitor(args.device) as mon, py_spy(args.spy, f"{mode}_{landmarks}"):
                row.frames, row.seconds, how = end_to_end(engine, inputs, args.workdir / "out" / f"{mode}_{landmarks}",
                                                               args.concurrency, pool)
            row.note = how
    except Exception as e:  # one pipeline failing must not lose the other rows
        log.exception("%s failed", name)
        return dataclasses.replace(row, frames=0, note=f"failed: {type(e).__name__}: {str(e)[:200]}")
    row.fps = row.frames / row.seconds
    row.peak_rss, row.gpu_peak, row.gpu_busy = f"{mon.peak_rss / 2**30:.2f} GiB", mon.gpu_peak, mon.gpu_busy
    row.cpu_busy = mon.cpu_busy
    if pool is not None:  # the engine processes' figures; the parent only feeds them
        row.peak_rss = f"{mon.peak_child_rss / 2**30:.2f} GiB per engine process (parent {row.peak_rss})"
        if mon.peak_device_used:
            row.gpu_peak = f"{mon.peak_device_used / 2**30:.2f} GiB (whole device)"
    return row


def start_pool(stack: contextlib.ExitStack, args, cfg, fixed_box: np.ndarray | None, warm: Path):
    """``--processes K``: K child processes with their own engines (:class:`engine.procs.EnginePool`),
    started, models loaded and warmed (one warm input each) before the timed run; closed by ``stack``."""
    from engine.many import InputJob
    from engine.procs import EnginePool

    factory = functools.partial(build_engine, cfg, fixed_box)
    pool = stack.enter_context(EnginePool(factory, args.processes, concurrency=args.concurrency))
    pool.wait_ready()
    warm_jobs = [InputJob(warm, args.workdir / "out" / f"warm{i}") for i in range(args.processes)]
    for outcome in pool.run_many(warm_jobs):  # the first job of each child goes to another child
        if outcome.error is not None:
            raise RuntimeError(f"warm-up in a child process: {outcome.error}") from outcome.error
    return pool


# ------------------------------------------------------------------------------------ reference style


def _read_all_frames(path: Path, limit: int) -> list:
    """PIRender's ``read_video``: every frame into RAM as a PIL RGB image (cv2 when installed, as
    the reference; else PyAV), stopping after ``limit`` frames (a 10-minute 1080p video whole
    would take ~90 GB)."""
    from PIL import Image

    try:
        import cv2
    except ImportError:
        from engine.sources import iter_frames

        frames = []
        for batch in iter_frames(path, 64):
            frames += [Image.fromarray(im) for im in batch.images[: limit - len(frames)]]
            if len(frames) >= limit:
                break
        return frames
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while len(frames) < limit:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    finally:
        capture.release()
    return frames


def reference_style(inputs: list[Path], args, ckpt: Path, fixed_box: np.ndarray | None, max_frames: int) -> Row:
    """PIRender's two scripts on each input, in this process (spec §5.1, §5.2), without the
    nvdiffrast rendering the reference also does per batch (so this row is, if anything, fast):

    1. landmarks: a new ``FaceAlignment`` (SFD + 2D-FAN-4) per video, every frame decoded into
       RAM, ``get_landmarks_from_image`` on each full frame (with random S3FD weights: the SFD
       forward on the full frame, then 2D-FAN-4 on the fixed box);
    2. coefficients: every frame decoded again into RAM, Pillow ``align_img`` per frame, float32
       crops concatenated, the fp32 net in chunks of 100 (PyTorch's default TF32 settings).

    Inputs longer than ``max_frames`` are cut to their first ``max_frames`` frames (the whole
    video is held in RAM, as the reference does).
    """
    import face_alignment
    import torch

    from engine.align import AlignmentError, align_image, crops_to_tensor_input, lm68_to_lm5, template_fallback_img_yup
    from engine.regressor import ReconNet, load_checkpoint

    device = args.device
    net = ReconNet()
    net.load_state_dict(load_checkpoint(ckpt))
    net = net.to(device).eval()
    types = face_alignment.LandmarksType
    two_d = getattr(types, "TWO_D", None) or types._2D
    kwargs = {"device": device, "flip_input": False, "face_detector": "sfd"}
    import inspect

    if "compile" in inspect.signature(face_alignment.FaceAlignment.__init__).parameters:
        kwargs["compile"] = False
    from engine.landmarks import fan

    kwargs["face_detector_kwargs"] = {"path_to_detector": str(fan.weights_dir() / fan.WEIGHTS[0][0])}
    t_lm, t_coeff, frames_total, cut = 0.0, 0.0, 0, False
    with Monitor(device) as mon:
        for path in inputs:
            t = time.perf_counter()
            fa = face_alignment.FaceAlignment(two_d, **kwargs)  # a new one per video, as the reference
            frames = _read_all_frames(path, max_frames + 1)
            cut = cut or len(frames) > max_frames
            frames = frames[:max_frames]
            lms = []
            for frame in frames:
                image = np.array(frame)
                if fixed_box is None:
                    found = fa.get_landmarks_from_image(image)
                else:
                    fa.face_detector.detect_from_image(image.copy())
                    found = fa.get_landmarks_from_image(image, detected_faces=[fixed_box])
                lms.append(np.asarray(found[0], np.float32)[:, :2] if found else np.full((68, 2), -1, np.float32))
            del frames
            sync(device)
            t_lm += time.perf_counter() - t

            t = time.perf_counter()
            frames = _read_all_frames(path, max_frames)
            crops = []
            for frame, lm in zip(frames, lms, strict=True):
                try:  # random FAN weights can give points no fit accepts: the template then
                    if np.mean(lm) == -1:
                        raise AlignmentError("no face")
                    face = align_image(frame, lm68_to_lm5(lm))
                except AlignmentError:
                    face = align_image(frame, lm_img_yup=template_fallback_img_yup(*frame.size))
                crops.append(torch.from_numpy(crops_to_tensor_input(face.crop[None])))
            imgs = torch.cat(crops)
            with torch.no_grad():
                for k in range(len(imgs) // 100 + 1):  # the reference's chunking, empty last chunk included
                    chunk = imgs[k * 100:(k + 1) * 100]
                    if len(chunk):
                        net(chunk.to(device)).cpu()
            sync(device)
            t_coeff += time.perf_counter() - t
            frames_total += len(lms)
            del frames, crops, imgs
    row = Row("reference-style (PIRender scripts)", frames=frames_total, seconds=t_lm + t_coeff)
    row.fps = frames_total / row.seconds
    row.stages = {"landmarks": frames_total / t_lm, "align": float("nan"), "regress": float("nan")}
    row.stages["decode + align + regress (pass 2)"] = frames_total / t_coeff
    row.peak_rss, row.gpu_peak, row.gpu_busy = f"{mon.peak_rss / 2**30:.2f} GiB", mon.gpu_peak, mon.gpu_busy
    row.cpu_busy = mon.cpu_busy
    row.note = f"first {max_frames} frames of each input" if cut else "whole inputs"
    return row


# ------------------------------------------------------------------------------------ report


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(_gpu_index(device))} ({device})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def versions() -> str:
    import av
    import torch

    return (f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"PyAV {av.__version__}")


def _f(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def report(rows: list[Row], reference: Row | None, header: list[str]) -> str:
    lines = [*header, ""]
    measured = [r for r in rows if r.frames]
    lines += ["| pipeline | frames | s | frames/s | × reference | peak RSS | peak GPU mem | GPU busy | CPU cores busy "
              "| how |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in ([reference] if reference else []) + rows:
        if not r.frames:
            lines.append(f"| {r.name} | – | – | – | – | – | – | – | – | {r.note} |")
            continue
        ratio = f"{r.fps / reference.fps:.2f}×" if reference and reference.frames and r is not reference else "1×"
        lines.append(f"| {r.name} | {r.frames} | {r.seconds:.1f} | **{r.fps:.1f}** | {ratio} | {r.peak_rss} | "
                     f"{r.gpu_peak} | {r.gpu_busy} | {r.cpu_busy} | {r.note} |")
    if measured:
        names = list(dict.fromkeys(k for r in measured for k in r.stages))
        if names:
            lines += ["", "Stage frames/s (each stage alone on the same sample of frames; the end-to-end rows "
                          "overlap them):", "",
                      "| stage | " + " | ".join(r.name for r in measured) + " |",
                      "|---|" + "---:|" * len(measured)]
            for name in names:
                lines.append(f"| {name} | " + " | ".join(_f(r.stages.get(name, float("nan"))) for r in measured) + " |")
    if reference and reference.frames:
        lines += ["", f"Reference-style stages: landmarks {_f(reference.stages['landmarks'])} frames/s, "
                      f"pass 2 (decode + Pillow align + fp32 net) "
                      f"{_f(reference.stages['decode + align + regress (pass 2)'])} frames/s."]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--video", type=Path, action="append", help="an input video (repeatable)")
    what.add_argument("--set", choices=("long", "clips"), default=None, help="a generated 1080p set")
    ap.add_argument("--minutes", type=float, default=10.0, help="--set long: length of the video")
    ap.add_argument("--clips", type=int, default=40, help="--set clips: number of clips")
    ap.add_argument("--seconds", type=float, default=10.0, help="--set clips: length of each clip")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--gen-jobs", type=int, default=os.cpu_count() or 1,
                    help="processes that encode the generated set (pieces of the long video) at once")
    ap.add_argument("--clip", type=Path, default=TEST_CLIP, help="the face video the sets are made from")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", dest="modes", nargs="*", choices=("exact", "fast"), default=["exact", "fast"],
                    help="engine paths to measure (none: only the reference-style pipeline)")
    ap.add_argument("--landmarks", nargs="+", default=["fan", "mtcnn"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--detect-every", type=int, default=0, help="fast path keyframe interval (0: its default)")
    ap.add_argument("--concurrency", type=int, help="inputs at once in run_many (default: the engine's)")
    ap.add_argument("--processes", type=int, default=1,
                    help="run_many in K child processes (engine.procs), --concurrency inputs at once each; "
                         "peak RSS is then the parent's only")
    ap.add_argument("--spy", type=Path, help="folder for py-spy GIL profiles of the end-to-end runs")
    ap.add_argument("--decoder", choices=tuple(DECODERS), default="pyav")
    ap.add_argument("--stage-frames", type=int, default=512, help="frames per stage timing (0: skip stages)")
    ap.add_argument("--no-reference", dest="reference", action="store_false")
    ap.add_argument("--reference-max-frames", type=int, default=1500,
                    help="the reference holds whole videos in RAM: cut longer inputs to this many frames")
    ap.add_argument("--reference-inputs", type=int, default=0,
                    help="run the reference-style pipeline on the first N inputs only (0: all)")
    ap.add_argument("--checkpoint", type=Path, help="epoch_20.pth (default: random weights)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-bench")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args(argv)
    if not args.video and not args.set:
        args.set = "clips"
    return args


#: ``--decoder``: how the output describes it (each engine builds its source from its config).
DECODERS = {"pyav": "PyAV (threaded decode, RGB conversion in a thread pool; on a GPU the fast path's batches "
                    "are copied there in the decode thread)",
            "nvdec": "NVDEC (PyNvVideoCodec), frames kept on the GPU (fast path only)"}


def main(argv=None) -> int:
    from engine.cudasync import ENV, cuda_sync_mode

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device (use --device cpu)")
    spec = MediaSpec(args.width, args.height, args.fps)
    inputs = make_set(args.set, args, spec, args.workdir) if args.set else [p.resolve() for p in args.video]
    faces = source_faces(args.clip, spec.face_size)
    warm = make_video(faces, args.workdir / f"warm_{spec.width}x{spec.height}.mp4", 2 * args.batch_size + 3, 5, spec)

    ckpt, note = checkpoint_or_random(args.checkpoint, args.workdir)
    notes = [note]
    need_fan = "fan" in args.landmarks or args.reference
    fixed_box = None
    if need_fan:
        used = prepare_fan_weights(args.workdir)
        notes.append(used)
        if used.startswith("RANDOM"):
            fixed_box = spec.face_box() if args.set else _centre_box(inputs[0])
    if "mtcnn" in args.landmarks:
        notes.append("MTCNN: the weights facenet-pytorch ships (real)")
    decoder = DECODERS[args.decoder]

    from engine.sources import probe

    infos = [probe(p) for p in inputs]
    total = sum(i.frame_count for i in infos)
    command = " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    header = [
        f"**bench/throughput.py** — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `python {command}`",
        f"- device: {device_name(args.device)}; host {platform.node()}, {os.cpu_count()} CPUs; {versions()}; "
        f"GPU waits: {cuda_sync_mode()} ({ENV})",
        f"- inputs: {len(inputs)} × {infos[0].width}×{infos[0].height} {infos[0].codec}, {total} frames "
        f"({'generated set ' + args.set if args.set else 'given videos'}); decoder {decoder}; batch {args.batch_size}",
        f"- weights: {'; '.join(notes)}. Speed does not depend on the weights' values.",
    ]
    print("\n".join(header), flush=True)

    rows = []
    for landmarks in args.landmarks:
        for mode in args.modes:
            print(f"... {mode}, {landmarks}", file=sys.stderr, flush=True)
            rows.append(measure_mode(mode, landmarks, args, inputs, warm, ckpt, fixed_box))
            r = rows[-1]  # a line per row as it ends, so a run cut short keeps what it measured
            print(f"    {r.name}: {r.frames} frames, {r.fps:.1f} frames/s, RSS {r.peak_rss}, GPU {r.gpu_peak}, "
                  f"busy {r.gpu_busy}, CPU {r.cpu_busy}, "
                  f"stages {({k: round(v, 1) for k, v in r.stages.items()})} {r.note}",
                  file=sys.stderr, flush=True)
    reference = None
    if args.reference:
        print("... reference-style", file=sys.stderr, flush=True)
        ref_inputs = inputs[: args.reference_inputs] if args.reference_inputs > 0 else inputs
        reference = reference_style(ref_inputs, args, ckpt, fixed_box, args.reference_max_frames)
        if len(ref_inputs) < len(inputs):
            reference.note += f"; first {len(ref_inputs)} of {len(inputs)} inputs"
    text = report(rows, reference, header)
    print("\n" + text[len("\n".join(header)):].lstrip("\n"))
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


def _centre_box(path: Path) -> np.ndarray:
    """A face box for a given video when S3FD has random weights: a centred square of 60 % of the height."""
    from engine.sources import probe

    info = probe(path)
    s = 0.6 * info.height
    x, y = (info.width - s) / 2, (info.height - s) / 2
    return np.array([x, y, x + s, y + s, 0.99])


if __name__ == "__main__":
    sys.exit(main())
