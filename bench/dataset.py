"""Dataset throughput through the registry: N generated 1080p clips, burst workers on one GPU, then on every GPU.

Usage (see docs/PERFORMANCE.md)::

    python bench/dataset.py --device cuda --clips 200 --frames 250 --mode fast exact --landmarks mtcnn
    python bench/dataset.py --device cpu --clips 3 --frames 10 --width 320 --height 180   # smoke

Makes ``--clips`` distinct clips of ``--frames`` frames from the shared test clip (each with its own
start frame and its own drift of the face, ``bench.throughput.make_video``), then for every
``--landmarks`` backend and ``--mode``:

1. submits them to a fresh registry (a temporary data folder with its SQLite file) with
   ``python -m engine submit``, and runs ``python -m engine worker --gpus 0 --per-gpu K --burst``
   (on the CPU: ``--gpus all`` with ``$STUDIO_DEVICES`` set to ``--device``) until the queue is empty;
2. the same on a second fresh registry with ``python -m engine worker --gpus all --per-gpu K --burst``
   (K workers per GPU, skipped with a reason when fewer than two devices are visible).

Both runs use the same launcher (``worker.launch``), so they differ only in the devices; ``K`` is
``--per-gpu`` (default: the launcher's, ``$STUDIO_PER_GPU`` else ``worker.launch.DEFAULT_PER_GPU``).

Prints a Markdown table: clips, frames, seconds from the first claim to the last finished job
(the registry's ``started_at`` / ``finished_at``) and the workers' process wall time, clips/s,
frames/s (also over the window in which every worker was busy: :func:`all_busy_rate`), GPU
busy % per GPU over the registry window (pynvml, else ``nvidia-smi``, every 0.5 s),
peak RSS of every worker process (psutil, sampled) and the all-GPU / one-GPU ratio. Never
asserts anything about time.

Weights: the checkpoint given, else a random Deep3D checkpoint; MTCNN's are the ones
facenet-pytorch ships. For ``fan`` without the S3FD/2D-FAN-4 files, random ones in a temporary
TORCH_HOME (``bench.throughput.prepare_fan_weights``); random S3FD finds no face, so the workers'
``bench/worker_shim`` (always on their ``PYTHONPATH``, inert unless asked) wraps the detector of both
paths in ``bench.throughput.FixedBox`` (the detector still runs, and a fixed box around the face
is handed on where it found none). The output says which weights ran.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import logging
import math
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, TEST_CLIP, checkpoint_or_random
from bench.throughput import SPY_VIEWS, cpu_jiffies, py_spy

log = logging.getLogger("bench.dataset")

#: Worker-side shim: its patches are switched on by the ``*_ENV`` variables below (see its docstring).
SHIM_DIR = Path(__file__).resolve().parent / "worker_shim"
BOX_ENV = "STUDIO_BENCH_FIXED_BOX"
LEVELS_ENV = "STUDIO_BENCH_FACENET_LEVELS"
THREADS_ENV = "STUDIO_BENCH_THREAD_PER_INPUT"
LOAD_ENV = "STUDIO_BENCH_NO_LOAD_AHEAD"
TAIL_ENV = "STUDIO_BENCH_CLAIM_TO_THE_END"
STREAM_ENV = "STUDIO_BENCH_MTCNN_STREAM"
THREAD_CPU_ENV = "STUDIO_BENCH_THREAD_CPU"
MAX_PIXELS_ENV = "STUDIO_BENCH_MTCNN_MAX_PIXELS"
RGB_ENV = "STUDIO_BENCH_RGB_ON_HOST"
FAST_RGB_ENV = "STUDIO_BENCH_FAST_RGB_ON_GPU"
#: What each of the shim's on/off switches puts back, as the bench's output says it.
SHIM_SWITCHES = {
    LEVELS_ENV: "the fast path's keyframe detector runs MTCNN's first stage level by level",
    THREADS_ENV: "a new landmark thread for each input, as before they were reused",
    LOAD_ENV: "workers load their models after their first claim, as before",
    TAIL_ENV: "workers claim ahead down to the queue's last job, as before",
    STREAM_ENV: "the exact path's MTCNN runs on a CUDA stream of its own (a candidate)",
    RGB_ENV: "the exact path's frames become RGB on the host (FFmpeg's conversion), as before",
    FAST_RGB_ENV: "the fast path's PyAV frames become RGB on the GPU from their YUV planes (a candidate)",
}
SAMPLE_S = 0.5
#: Bumped when the generated clips change, so cached files of an older recipe are not reused.
SET_VERSION = 1


# ------------------------------------------------------------------------------------ clips


def clip_spec(base, k: int):
    """The :class:`bench.throughput.MediaSpec` of clip ``k``: its own drift (period 5–9 s, amplitude
    3–9 % of the height), so no two clips move alike; size and mean face place as ``base``."""
    return dataclasses.replace(base, drift_period_s=5.0 + (k * 0.61) % 4.0, drift_frac=0.03 + 0.06 * ((k * 0.37) % 1.0))


def clip_start(k: int, source_frames: int) -> int:
    """Start frame of clip ``k`` in the ping-pong of the source clip (``2 n - 2`` frames a period)."""
    return (37 * k) % max(1, 2 * source_frames - 2)


def _make_chunk(src: str, base, frames: int, items: list[tuple[int, str]]) -> list[str]:
    """Write the clips ``items`` (index, path) in one process (the source faces are decoded once)."""
    from bench.throughput import make_video, source_faces

    faces = source_faces(Path(src), base.face_size)
    return [str(make_video(faces, Path(dst), frames, clip_start(k, len(faces)), clip_spec(base, k)))
            for k, dst in items]


def make_clips(src: Path, base, clips: int, frames: int, folder: Path, jobs: int) -> list[Path]:
    """``clips`` clips of ``frames`` frames under ``folder`` (cached by name), written by ``jobs`` processes."""
    paths = [folder / f"clip_{k:04d}.mp4" for k in range(clips)]
    todo = [(k, str(p)) for k, p in enumerate(paths) if not p.exists()]
    if todo:
        jobs = max(1, min(jobs, len(todo)))
        chunks = [todo[i::jobs] for i in range(jobs)]
        if jobs == 1:
            _make_chunk(str(src), base, frames, todo)
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                for f in [pool.submit(_make_chunk, str(src), base, frames, c) for c in chunks]:
                    f.result()
    return paths


# ------------------------------------------------------------------------------------ fixed box


def parse_box(text: str) -> np.ndarray:
    """``"x1,y1,x2,y2,score"`` → float64 (5,).

    >>> parse_box("1,2,3,4,0.9").tolist()
    [1.0, 2.0, 3.0, 4.0, 0.9]
    """
    box = np.array([float(v) for v in text.split(",")], np.float64)
    if box.shape != (5,):
        raise ValueError(f"${BOX_ENV}: expected x1,y1,x2,y2,score, got {text!r}")
    return box


def install_fixed_box(engine_cls, box_text: str) -> None:
    """Make ``engine_cls.detector_for`` wrap the ``fan`` backend's detector in
    :class:`bench.throughput.FixedBox` (called by ``bench/worker_shim`` in the worker processes)."""
    from bench.throughput import FixedBox
    from engine.config import LandmarkBackend

    box = parse_box(box_text)
    original = engine_cls.detector_for

    def detector_for(self, landmarker):
        found = original(self, landmarker)
        if found is None or isinstance(found, FixedBox) or self.config.landmarks != LandmarkBackend.FAN:
            return found
        return FixedBox(found, box)

    engine_cls.detector_for = detector_for
    log.info("bench shim: the fan detector is wrapped in FixedBox %s", box.tolist())


# ------------------------------------------------------------------------------------ sampling


def gpu_names() -> list[str]:
    """``["0: NVIDIA H200", ...]`` from nvidia-smi (empty without it); never initialises CUDA here."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.replace(", ", ": ", 1) for line in out.stdout.splitlines() if line.strip()]


class GpuSampler:
    """GPU busy % of every GPU every :data:`SAMPLE_S` seconds in a thread: pynvml, else nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[int, float]]] = []  # (unix time, {gpu index: busy %})
        self._stop = threading.Event()
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:
            self._nvml = None
        self.available = self._nvml is not None or shutil.which("nvidia-smi") is not None
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def _read(self) -> dict[int, float]:
        if self._nvml is not None:
            n = self._nvml.nvmlDeviceGetCount()
            return {i: float(self._nvml.nvmlDeviceGetUtilizationRates(self._nvml.nvmlDeviceGetHandleByIndex(i)).gpu)
                    for i in range(n)}
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5)
        values = {}
        for line in out.stdout.splitlines():
            index, _, busy = line.partition(",")
            if index.strip().isdigit() and busy.strip().replace(".", "", 1).isdigit():
                values[int(index)] = float(busy)
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                values = self._read()
            except Exception:  # a hiccup of the driver: this sample is missing
                values = {}
            if values:
                self.samples.append((time.time(), values))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def busy(self, start: float, end: float) -> dict[int, float]:
        """Mean busy % of each GPU over the samples taken in ``[start, end]`` (unix seconds)."""
        window = [v for t, v in self.samples if start <= t <= end] or [v for _, v in self.samples]
        gpus = sorted({i for v in window for i in v})
        return {i: float(np.mean([v[i] for v in window if i in v])) for i in gpus}


def _value(cmdline: list[str], flag: str) -> str | None:
    """The word after ``flag`` in ``cmdline`` (None: absent or last)."""
    if flag in cmdline and cmdline.index(flag) + 1 < len(cmdline):
        return cmdline[cmdline.index(flag) + 1]
    return None


def worker_label(cmdline: list[str]) -> str | None:
    """The device (and ``#slot`` of one of several workers per device) of a ``python -m engine worker``
    process serving one device, else None (the ``--gpus`` launcher, helper interpreters).

    >>> worker_label(["python", "-m", "engine", "worker", "--device", "cuda:1", "--slot", "2", "--burst"])
    'cuda:1 #2'
    >>> worker_label(["python", "-m", "engine", "worker", "--gpu", "0"])
    'cuda:0'
    >>> worker_label(["python", "-m", "engine", "worker", "--gpus", "all", "--per-gpu", "2"]) is None
    True
    """
    if "worker" not in cmdline or "--gpus" in cmdline:
        return None
    device = _value(cmdline, "--device")
    if device is None and _value(cmdline, "--gpu") is not None:
        device = f"cuda:{_value(cmdline, '--gpu')}"
    slot = _value(cmdline, "--slot")
    return None if device is None else device + (f" #{slot}" if slot is not None else "")


def _process_tree(pid: int) -> list[tuple[int, list[str], int, float]]:
    """(pid, command line, RSS bytes, CPU seconds used so far, all threads) of ``pid`` and all its
    descendants: psutil, else /proc (Linux)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        out = []
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        for p in procs:
            try:
                cpu = p.cpu_times()
                out.append((p.pid, p.cmdline(), p.memory_info().rss, cpu.user + cpu.system))
            except psutil.Error:
                continue
        return out
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():  # the parent pid is the 2nd field after the ")" that ends the name
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier and c not in tree]
        tree.update(kids)
        frontier = kids
    out = []
    for p in sorted(tree):
        try:
            cmdline = (Path("/proc") / str(p) / "cmdline").read_bytes().decode(errors="replace").split("\0")
            rss_pages = int((Path("/proc") / str(p) / "statm").read_text().split()[1])
            fields = (Path("/proc") / str(p) / "stat").read_text().rsplit(")", 1)[1].split()
            cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
            out.append((p, [c for c in cmdline if c], rss_pages * os.sysconf("SC_PAGE_SIZE"), cpu_s))
        except (OSError, IndexError, ValueError):
            continue
    return out


class ProcessSampler:
    """Every :data:`SAMPLE_S` s: the peak RSS and CPU time of every worker process under ``pid``
    (itself included), and the host's CPU ticks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[int, tuple[str, int]] = {}  # pid → (device, peak bytes)
        self.cpu: dict[int, list[tuple[float, float]]] = {}  # pid → [(unix time, CPU s so far): first, last]
        self.host: list[tuple[float, int, int]] = []  # (unix time, busy ticks, total ticks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)

    def _sample(self) -> None:
        now = time.time()
        for pid, cmdline, rss, cpu_s in _process_tree(self.pid):
            label = worker_label(cmdline)
            if label is not None:
                self.peaks[pid] = (label, max(rss, self.peaks.get(pid, (label, 0))[1]))
                seen = self.cpu.setdefault(pid, [(now, cpu_s)])
                seen[1:] = [(now, cpu_s)]
        ticks = cpu_jiffies()
        if ticks is not None:
            self.host.append((now, *ticks))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        if not self.peaks:
            return "n/a"
        rows = sorted(self.peaks.values())
        return ", ".join(f"{dev} {rss / 2**30:.2f} GiB" for dev, rss in rows)

    def cpu_text(self, start: float, end: float) -> str:
        """CPU cores busy: the host's over ``[start, end]`` (unix s) of its ``os.cpu_count()``, and the
        range over the workers (each over its own lifetime), e.g. ``host 12.3 of 32; workers 2.9–3.8``."""
        parts = []
        window = [h for h in self.host if start <= h[0] <= end]
        if len(window) >= 2 and window[-1][2] > window[0][2]:
            share = (window[-1][1] - window[0][1]) / (window[-1][2] - window[0][2])
            parts.append(f"host {share * (os.cpu_count() or 1):.1f} of {os.cpu_count()}")
        rates = [(c1 - c0) / (t1 - t0) for (t0, c0), (t1, c1) in
                 (v for v in self.cpu.values() if len(v) == 2) if t1 - t0 >= 1.0]
        if rates:
            parts.append(f"workers {min(rates):.1f}–{max(rates):.1f}")
        return "; ".join(parts) or "n/a"


# ------------------------------------------------------------------------------------ runs


@dataclasses.dataclass
class Run:
    """One registry served by one set of workers."""

    name: str
    workers: str
    clips: int = 0
    ok: int = 0
    frames: int = 0
    registry_s: float = float("nan")
    process_s: float = float("nan")
    gpu_busy: str = "n/a"
    peak_rss: str = "n/a"
    cpu_busy: str = "n/a"
    note: str = ""
    failures: list[str] = dataclasses.field(default_factory=list)
    busy_fps: float = float("nan")
    busy_s: float = float("nan")
    timeline: str = ""
    thread_cpu: str = ""

    @property
    def clips_per_s(self) -> float:
        return self.ok / self.registry_s if self.registry_s > 0 else float("nan")

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.registry_s if self.registry_s > 0 else float("nan")


def worker_spans(jobs) -> dict[str, list[tuple[float, float, int]]]:
    """Per worker id, its jobs' (start, end, frames): epoch seconds (the registry's times are UTC;
    SQLite gives them back naive) and ``frames_total`` (0 when unknown). Jobs without a worker,
    a start or an end are left out."""
    def epoch(t: datetime.datetime) -> float:
        return (t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)).timestamp()

    spans: dict[str, list[tuple[float, float, int]]] = {}
    for j in jobs:
        if j.worker_id and j.started_at and j.finished_at:
            spans.setdefault(j.worker_id, []).append((epoch(j.started_at), epoch(j.finished_at), j.frames_total or 0))
    return spans


def all_busy_rate(jobs) -> tuple[float, float]:
    """(frames/s, seconds) while every worker was busy: from the moment the last worker started
    its first job to the moment the first worker finished its last one.

    Without the workers' start-up (CUDA context, models, each worker at its own pace) and the
    tail (the last clips run on fewer workers), which weigh more the shorter a run is. Each job
    counts the share of its frames that falls in the window (frames assumed even over its
    ``started_at`` → ``finished_at``). NaN when a window cannot be formed (one job, or no overlap).

    ``jobs``: objects with ``worker_id``, ``started_at``, ``finished_at`` (datetimes) and
    ``frames_total``; jobs lacking any of them are ignored.
    """
    spans = worker_spans([j for j in jobs if j.frames_total])
    if not spans:
        return float("nan"), float("nan")
    t_a = max(min(a for a, _, _ in v) for v in spans.values())
    t_b = min(max(b for _, b, _ in v) for v in spans.values())
    if t_b <= t_a:
        return float("nan"), float("nan")
    frames = 0.0
    for a, b, n in (x for v in spans.values() for x in v):
        overlap = min(b, t_b) - max(a, t_a)
        if overlap > 0:
            frames += n * overlap / (b - a) if b > a else n
    return frames / (t_b - t_a), t_b - t_a


def worker_timeline(jobs, t0: float) -> str:
    """Where a run's seconds went, from the launcher's start ``t0`` (epoch seconds): per worker, its
    first job's start, its last job's end, its jobs and frames; then the spread of the workers' first
    starts (start-up) and last ends (tail). ``jobs`` as for :func:`all_busy_rate`."""
    spans = {w: [(a - t0, b - t0, n) for a, b, n in v] for w, v in worker_spans(jobs).items()}
    if not spans:
        return ""
    rows = []
    for wid, v in sorted(spans.items(), key=lambda kv: min(a for a, _, _ in kv[1])):
        rows.append(f"{wid}: +{min(a for a, _, _ in v):.1f} → +{max(b for _, b, _ in v):.1f} s, "
                    f"{len(v)} jobs, {sum(n for _, _, n in v)} frames")
    firsts = [min(a for a, _, _ in v) for v in spans.values()]
    lasts = [max(b for _, b, _ in v) for v in spans.values()]
    rows.append(f"first starts +{min(firsts):.1f} … +{max(firsts):.1f} s, "
                f"last ends +{min(lasts):.1f} … +{max(lasts):.1f} s after the launcher started")
    return "\n".join(rows)


def child_env(args, workdir: Path, fixed_box: np.ndarray | None) -> dict[str, str]:
    """The environment of the submit and worker processes: the worker shim and the repo on
    PYTHONPATH, this process's TORCH_HOME (random FAN weights), the shim's FixedBox box when given."""
    env = dict(os.environ)
    paths = [str(SHIM_DIR), str(REPO), env.get("PYTHONPATH", "")]
    env.pop(BOX_ENV, None)
    if fixed_box is not None:
        env[BOX_ENV] = ",".join(f"{v:.3f}" for v in fixed_box)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("STUDIO_DATA_DIR", None)
    env.pop("STUDIO_DB_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def submit(clips: list[Path], data: Path, mode: str, landmarks: str, ckpt: Path, args, env: dict) -> None:
    """``python -m engine submit`` of every clip into the registry of ``data``."""
    cmd = [sys.executable, "-m", "engine", "submit", *map(str, clips), "--data-dir", str(data),
           "--mode", mode, "--landmarks", landmarks, "--checkpoint", str(ckpt)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.formats:
        cmd += ["--formats", args.formats]
    if args.detect_every:
        cmd += ["--detect-every", str(args.detect_every)]
    if mode == "fast" and args.decoder != "pyav":  # the exact path always decodes with PyAV
        cmd += ["--decoder", args.decoder]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    queued = len(re.findall(r"^queued job \d+", out.stdout, re.M))
    if out.returncode != 0 or queued != len(clips):
        raise RuntimeError(f"submit queued {queued} of {len(clips)} clips (exit {out.returncode}): "
                           f"{out.stderr.strip()[-500:]}")


def worker_command(args, data: Path, all_devices: bool) -> tuple[list[str], dict[str, str]]:
    """The launcher command of one run and the environment it adds: ``--gpus all`` or ``--gpus 0`` (on the
    CPU ``--gpus all`` with ``$STUDIO_DEVICES`` = ``--device``), ``--per-gpu K`` either way."""
    from worker.launch import DEVICES_ENV

    cmd = [sys.executable, "-m", "engine", "worker", "--burst", "--data-dir", str(data), "--poll", "0.5"]
    extra_env: dict[str, str] = {}
    if all_devices:
        cmd += ["--gpus", "all"]
    elif args.device.startswith("cuda"):
        cmd += ["--gpus", "0"]
    else:
        cmd += ["--gpus", "all"]
        extra_env[DEVICES_ENV] = args.device
    cmd += ["--per-gpu", str(args.per_gpu)]
    for flag in ("concurrency", "prefetch", "threads", "decode_threads"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    return cmd, extra_env


def read_jobs(data: Path):
    from db import Registry, service

    reg = Registry(data_dir=data)
    try:
        return service.list_jobs(reg, limit=1_000_000, descending=False)
    finally:
        reg.close()


def wait_first_claim(data: Path, proc: subprocess.Popen, timeout: float, poll: float = 0.5) -> None:
    """Return once a job of the registry in ``data`` has started, the workers have exited, or
    ``timeout`` seconds have passed."""
    from db import Registry, service

    deadline = time.monotonic() + timeout
    reg = Registry(data_dir=data)
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(j.started_at for j in service.list_jobs(reg, limit=1_000_000, descending=False)):
                return
            time.sleep(poll)
    finally:
        reg.close()


def serve(run: Run, clips: list[Path], mode: str, landmarks: str, ckpt: Path, args, env: dict,
          data: Path, all_devices: bool) -> Run:
    """Submit ``clips`` to the fresh registry in ``data``, run the burst workers, read back the jobs."""
    from db import JobStatus

    submit(clips, data, mode, landmarks, ckpt, args, env)
    cmd, extra_env = worker_command(args, data, all_devices)
    if args.thread_cpu:
        extra_env[THREAD_CPU_ENV] = str(data / "thread-cpu")
    log_path = data / "workers.log"
    shown = " ".join(f"{k}={v}" for k, v in extra_env.items())
    print(f"... {run.name}, {run.workers}: {shown + ' ' if shown else ''}{shlex.join(cmd[1:])} (log {log_path})",
          file=sys.stderr, flush=True)
    with open(log_path, "w") as out, GpuSampler() as gpus:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**env, **extra_env}, stdout=out, stderr=subprocess.STDOUT)
        with ProcessSampler(proc.pid) as procs:
            if args.spy:  # the steady state only: start-up (imports, models) would fill the GIL view
                wait_first_claim(data, proc, args.timeout)
            with py_spy(args.spy, data.name, pid=proc.pid, views=tuple(args.spy_views)):
                try:
                    code = proc.wait(max(1.0, args.timeout - (time.time() - t0)))
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    code = proc.wait(120)
                    run.note = f"stopped after {args.timeout:.0f} s; "
        t1 = time.time()
    run.process_s = t1 - t0
    run.peak_rss = procs.text()
    jobs = read_jobs(data)
    done = [j for j in jobs if j.status == JobStatus.SUCCEEDED]
    run.clips, run.ok = len(jobs), len(done)
    run.frames = sum(j.frames_total or j.frames_done for j in done)
    run.failures = [f"job {j.id} ({j.name}): {j.status.value}: {j.error or ''}" for j in jobs if j not in done]
    starts = [j.started_at for j in jobs if j.started_at]
    ends = [j.finished_at for j in jobs if j.finished_at]
    if starts and ends:
        first, last = min(starts).timestamp(), max(ends).timestamp()
        run.registry_s = last - first
        run.busy_fps, run.busy_s = all_busy_rate(done)
        run.timeline = worker_timeline(done, t0)
        run.cpu_busy = procs.cpu_text(first, last)
        busy = gpus.busy(first, last) if gpus.samples else {}
        if busy:
            run.gpu_busy = ", ".join(f"GPU {i} {b:.0f} %" for i, b in busy.items())
    if args.thread_cpu:
        run.thread_cpu = thread_cpu_table(data / "thread-cpu", run.frames)
    if code != 0:
        run.note += f"workers exited with code {code} (see {log_path}); "
    if run.failures:
        run.note += f"{len(run.failures)} not succeeded, first: {run.failures[0][:200]}"
    return run


def thread_role(name: str) -> str:
    """A thread's name without what numbers one of a kind (``rgb_3`` → ``rgb``, ``job-12-monitor`` →
    ``job-monitor``, ``input-7f3a`` → ``input``).

    >>> [thread_role(n) for n in ("rgb_3", "job-12-monitor", "input-7f3a", "native:av:h264:df2", "MainThread")]
    ['rgb', 'job-monitor', 'input', 'native:av:h264:df', 'MainThread']
    """
    if name.startswith("input-"):
        return "input"
    return re.sub(r"[_-]?\d+$", "", re.sub(r"-\d+-", "-", name))


def thread_cpu_table(folder: Path, frames: int) -> str:
    """The workers' CPU time by thread role (the shim's ``$STUDIO_BENCH_THREAD_CPU`` files; the
    launcher and ``submit`` left out), as Markdown rows: core-seconds, share and core-ms per frame."""
    import json

    roles: dict[str, float] = {}
    total, workers = 0.0, 0
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if "--device" not in record["argv"]:
            continue
        workers += 1
        total += record["total_s"]
        for name, seconds in record["threads"]:
            role = thread_role(name)
            roles[role] = roles.get(role, 0.0) + seconds
    if not workers:
        return ""
    roles["(threads that ended between two samples)"] = max(0.0, total - sum(roles.values()))
    per_frame = 1e3 / frames if frames else float("nan")
    lines = [f"CPU time of the {workers} workers by thread (total {total:.0f} core-s, "
             f"{_f(total * per_frame)} core-ms per frame):", "",
             "| thread | core-s | share | core-ms per frame |", "|---|---:|---:|---:|"]
    for role, seconds in sorted(roles.items(), key=lambda kv: -kv[1]):
        if seconds >= 0.005 * total:
            lines.append(f"| {role} | {seconds:.1f} | {100 * seconds / total:.1f} % | {_f(seconds * per_frame, 2)} |")
    small = sum(v for v in roles.values() if v < 0.005 * total)
    lines.append(f"| (each < 0.5 %) | {small:.1f} | {100 * small / total:.1f} % | {_f(small * per_frame, 2)} |")
    return "\n".join(lines)


def all_devices_reason(args) -> str | None:
    """Why the all-device run is skipped (None: it runs): it needs two or more devices, GPUs for
    ``--device cuda``, or ``$STUDIO_DEVICES`` listing several (the tests' CPU devices)."""
    from worker.launch import DEVICES_ENV, visible_devices

    if args.single_only:
        return "skipped (--single-only)"
    override = os.environ.get(DEVICES_ENV, "").strip()
    if not args.device.startswith("cuda") and not override:
        return f"skipped: no GPUs with --device {args.device}"
    devices = visible_devices()
    if len(devices) < 2:
        return f"skipped: only {len(devices)} device visible ({', '.join(devices)})"
    return None


# ------------------------------------------------------------------------------------ report


def _f(x: float, digits: int = 1) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def report(pairs: list[tuple[Run, Run | None, str | None]], header: list[str]) -> str:
    lines = [*header, "",
             "| path | workers | clips ok | frames | s (first claim → last done) | s (process) | clips/s | "
             "frames/s | frames/s, all workers busy (s) | GPU busy | CPU cores busy | peak RSS per worker | × one GPU "
             "| note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|"]
    for one, every, why in pairs:
        for run in (one, every):
            if run is None:
                continue
            ratio = "1×" if run is one else (f"{run.frames_per_s / one.frames_per_s:.2f}×"
                                             if one and one.frames_per_s > 0 and run.frames_per_s > 0 else "–")
            if run is not one and one and one.busy_fps > 0 and run.busy_fps > 0:
                ratio += f" (all busy: {run.busy_fps / one.busy_fps:.2f}×)"
            cells = [run.name, run.workers, f"{run.ok}/{run.clips}", str(run.frames), _f(run.registry_s),
                     _f(run.process_s), _f(run.clips_per_s, 2), f"**{_f(run.frames_per_s)}**",
                     f"{_f(run.busy_fps)} ({_f(run.busy_s)})", run.gpu_busy, run.cpu_busy,
                     run.peak_rss, ratio, run.note.strip().rstrip(";")]
            lines.append("| " + " | ".join(cells) + " |")
        if one is None:
            lines.append(f"| {every.name} | 1 GPU |" + " – |" * 12 + " skipped (--all-only) |")
        if every is None:
            lines.append(f"| {one.name} | all GPUs |" + " – |" * 12 + f" {why} |")
    for one, every, _ in pairs:
        lines += [x for r in (one, every) if r and r.thread_cpu
                  for x in ("", f"*{r.name}, {r.workers}.* {r.thread_cpu}")]
    failures = [f for one, every, _ in pairs for r in (one, every) if r for f in r.failures]
    if failures:
        lines += ["", f"{len(failures)} job(s) did not succeed:", *[f"- {f}" for f in failures[:20]]]
    return "\n".join(lines)


def versions() -> str:
    import av
    import torch

    return (f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"PyAV {av.__version__}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=200, help="number of clips (default: 200)")
    ap.add_argument("--frames", type=int, default=250, help="frames per clip (default: 250)")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--clip", type=Path, default=TEST_CLIP, help="the face video the clips are made from")
    ap.add_argument("--device", default="cuda", help="cuda (workers --gpus 0, then --gpus all) or cpu")
    ap.add_argument("--per-gpu", metavar="K",
                    help="worker processes per device in both runs (default: the launcher's, $STUDIO_PER_GPU "
                    "else worker.launch.DEFAULT_PER_GPU)")
    ap.add_argument("--mode", dest="modes", nargs="+", choices=("exact", "fast"), default=["exact", "fast"])
    ap.add_argument("--landmarks", nargs="+", choices=("mtcnn", "fan"), default=["mtcnn"])
    ap.add_argument("--batch-size", type=int, help="jobs' batch size (default: submit's)")
    ap.add_argument("--formats", help="jobs' output formats, comma list (default: submit's)")
    ap.add_argument("--detect-every", type=int, help="fast path keyframe interval (default: submit's)")
    ap.add_argument("--decoder", choices=("pyav", "nvdec"), default="pyav",
                    help="the fast path's jobs' decoder (the exact path's is always pyav)")
    ap.add_argument("--concurrency", type=int, help="worker --concurrency (default: the worker's)")
    ap.add_argument("--prefetch", type=int, help="worker --prefetch (default: the worker's)")
    ap.add_argument("--decode-threads", type=int, metavar="N",
                    help="worker --decode-threads: FFmpeg's threads per video, 0: FFmpeg's choice (default: the "
                         "launcher's, 1 with several workers)")
    ap.add_argument("--threads", type=int,
                    help="worker --threads (default: the launcher splits the cores over devices × --per-gpu)")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--single-only", action="store_true", help="skip the all-GPU run")
    only.add_argument("--all-only", action="store_true",
                      help="skip the one-GPU run (the other half of a --single-only call, when both do not fit one)")
    ap.add_argument("--spy", type=Path, metavar="DIR",
                    help="py-spy profiles of each run's workers from their first job on, here (<run>.gil.txt, "
                         "<run>.threads.txt; read them with bench/spy_summary.py); needs py-spy")
    ap.add_argument("--spy-views", nargs="+", choices=sorted(SPY_VIEWS), default=["gil", "threads"],
                    help="which profiles --spy records (bench.throughput.py_spy): gil, threads, and cpu "
                         "(running threads with native frames; pauses the workers at each sample)")
    ap.add_argument("--thread-cpu", action="store_true",
                    help="the workers' CPU time by thread (decoding, RGB conversion, landmarks, ...), from "
                         "/proc once a second (bench/worker_shim), in a table after the runs'")
    ap.add_argument("--gen-jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes writing the clips (default: min(8, CPUs))")
    ap.add_argument("--timeout", type=float, default=3600.0, help="longest run of one set of workers, seconds")
    ap.add_argument("--checkpoint", type=Path, help="epoch_20.pth (default: random weights)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-bench-dataset",
                    help="generated clips (cached) and the registries of each run")
    ap.add_argument("--gen-only", action="store_true",
                    help="only write (or find) the clips, then exit (to split a GPU call in two)")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args(argv)
    from worker.launch import default_per_gpu, parse_per_gpu

    try:
        args.per_gpu = parse_per_gpu(args.per_gpu) if args.per_gpu is not None else default_per_gpu()
    except ValueError as e:
        ap.error(str(e))
    if args.per_gpu == "auto":  # one K for both runs (the all-GPU run's), so the ratio compares like with like
        from worker.launch import resolve_per_gpu, smallest_gpu_gib, visible_devices

        devices = visible_devices() if args.device.startswith("cuda") else [args.device]
        args.per_gpu = resolve_per_gpu("auto", devices, gpu_gib=smallest_gpu_gib(devices))  # as the launcher
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.all_only and (why := all_devices_reason(args)):
        print(f"--all-only, but there is no all-GPU run: {why}", file=sys.stderr)
        return 2
    from bench.throughput import MediaSpec, prepare_fan_weights
    from engine.cudasync import ENV, cuda_sync_mode

    args.workdir.mkdir(parents=True, exist_ok=True)
    base = MediaSpec(args.width, args.height, args.fps)
    folder = args.workdir / f"set{SET_VERSION}_{args.width}x{args.height}_{args.fps}_{args.frames}"
    print(f"... writing {args.clips} clips of {args.frames} frames to {folder}", file=sys.stderr, flush=True)
    t_gen = time.perf_counter()
    clips = make_clips(args.clip, base, args.clips, args.frames, folder, args.gen_jobs)
    print(f"... {len(clips)} clips ready in {time.perf_counter() - t_gen:.0f} s", file=sys.stderr, flush=True)
    if args.gen_only:
        return 0

    ckpt, note = checkpoint_or_random(args.checkpoint, args.workdir)
    notes = [note]
    fixed_box = None
    if "fan" in args.landmarks:
        used = prepare_fan_weights(args.workdir)  # sets TORCH_HOME for the children when random
        notes.append(used.replace("a fixed box is used", "the workers' detector is wrapped in FixedBox "
                                  "(bench/worker_shim)"))
        if used.startswith("RANDOM"):
            fixed_box = base.face_box()
    if "mtcnn" in args.landmarks:
        notes.append("MTCNN: the weights facenet-pytorch ships (real)")
    notes += [f"{said} ({name}=1)" for name, said in SHIM_SWITCHES.items() if os.environ.get(name) == "1"]
    if os.environ.get(MAX_PIXELS_ENV):
        notes.append(f"MTCNN puts up to {os.environ[MAX_PIXELS_ENV]} pixels through one detector call "
                     f"({MAX_PIXELS_ENV})")
    env = child_env(args, args.workdir, fixed_box)

    command = shlex.join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    names = gpu_names() if args.device.startswith("cuda") else []
    decode_threads = "the launcher's default (1 with several workers)" if args.decode_threads is None \
        else args.decode_threads
    header = [
        f"**bench/dataset.py** — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{command}`",
        f"- devices: {'; '.join(names) if names else args.device}; host {platform.node()}, "
        f"{os.cpu_count()} CPUs; {versions()}; GPU waits in the workers: {cuda_sync_mode()} ({ENV})",
        f"- inputs: {args.clips} distinct clips × {args.frames} frames, {args.width}×{args.height} at {args.fps} fps "
        f"(from {args.clip.name}: other start frame and drift each), submitted with `python -m engine submit` "
        f"to a fresh SQLite registry per run",
        f"- weights: {'; '.join(notes)}. Speed does not depend on the weights' values.",
        "- seconds: from the first job claimed to the last job finished (registry timestamps); "
        "frames/s and clips/s over that window; GPU busy: mean over it; CPU cores busy: the host's over it, "
        "and the range over the workers, each over its life",
        f"- workers: {args.per_gpu} worker process(es) per device (`--per-gpu {args.per_gpu}`) in both runs; "
        f"CPU threads per worker: {args.threads or 'the launcher splits the cores over all of them'}; "
        f"FFmpeg's threads per video: {decode_threads}",
    ]
    print("\n".join(header), flush=True)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs_dir = Path(tempfile.mkdtemp(prefix=f"runs-{stamp}-", dir=args.workdir))
    why_not_all = all_devices_reason(args)
    pairs = []
    for landmarks in args.landmarks:
        for mode in args.modes:
            name = f"{mode}, {landmarks}"
            k = args.per_gpu
            one_label = (f"1 GPU × {k} (--gpus 0 --per-gpu {k})" if args.device.startswith("cuda")
                         else f"1 device × {k} ({args.device}, --per-gpu {k})")
            one = None if args.all_only else serve(Run(name, one_label), clips, mode, landmarks, ckpt, args, env,
                                                   runs_dir / f"{mode}-{landmarks}-one", all_devices=False)
            every = None
            if why_not_all is None:
                all_label = (f"all GPUs × {k} (--gpus all --per-gpu {k})" if args.device.startswith("cuda")
                             else f"every device × {k} (--gpus all --per-gpu {k})")
                every = serve(Run(name, all_label), clips, mode, landmarks, ckpt, args, env,
                              runs_dir / f"{mode}-{landmarks}-all", all_devices=True)
            pairs.append((one, every, why_not_all))
            if args.out:  # what is measured so far survives a run cut short
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(report(pairs, header) + "\n", encoding="utf-8")
            for run in (one, every):
                if run is not None:
                    print(f"... {run.name}, {run.workers}: {run.ok}/{run.clips} ok, {run.frames} frames, "
                          f"{_f(run.frames_per_s)} frames/s; timeline:\n{run.timeline}", file=sys.stderr, flush=True)
    text = report(pairs, header)
    print("\n" + text[len("\n".join(header)):].lstrip("\n"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    ok = all(r.ok == r.clips == len(clips) for p in pairs for r in p[:2] if r is not None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
