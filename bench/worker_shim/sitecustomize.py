"""Put on ``PYTHONPATH`` by ``bench/dataset.py`` for the worker processes it starts. Each patch
below is off unless its environment variable is set; with none set nothing changes.

* ``$STUDIO_BENCH_FIXED_BOX`` (``x1,y1,x2,y2,score`` in full-frame pixels; set by the bench when
  S3FD has random weights, which find no face): once ``engine.pipeline`` is imported, the
  detector the engine pairs with the ``fan`` backend is wrapped in ``bench.throughput.FixedBox``.
  The wrapped detector still runs on every frame it is asked about, so its cost is measured.
* ``$STUDIO_BENCH_FACENET_LEVELS=1``: the fast path's keyframe detector runs MTCNN's first stage
  level by level as facenet-pytorch does (``bench.gpu_checks.facenet_first_stage``) instead of
  all levels at once (``engine.landmarks.mtcnn_gpu.pnet_candidates``): the same candidates, the
  earlier code's waits for the GPU, for an A/B in one call (``STEPS=dataset-ab``).
* ``$STUDIO_BENCH_THREAD_PER_INPUT=1``: ``run_many`` makes a landmark thread for each input and
  ends it after, as it did before its threads outlived the inputs (each new thread builds
  cuDNN's plans again), for the same kind of A/B.
* ``$STUDIO_BENCH_NO_LOAD_AHEAD=1``: a worker loads its models after its first claim, as it did
  before :meth:`worker.loop.Worker._load_ahead` (the claimed jobs wait meanwhile).
* ``$STUDIO_BENCH_CLAIM_TO_THE_END=1``: a worker claims ahead down to the queue's last job, as it
  did before ``db.lease.claim_next(ahead=True)`` left the last jobs to workers that hold none.
* ``$STUDIO_BENCH_MTCNN_STREAM=1``: on CUDA, the exact path's MTCNN (``MtcnnLandmarker.detect``)
  runs on a CUDA stream of its own instead of the default stream every thread of a worker
  shares, so its waits for the GPU no longer include the regressor's and the crops' queued work.
  Its stream first waits for the caller's (inputs made there are ready), and each call ends
  with its results copied to the host (its own work done). A candidate, not yet the engine's.
* ``$STUDIO_BENCH_MTCNN_MAX_PIXELS=N``: ``MtcnnLandmarker`` puts up to ``N`` frame pixels through
  one detector call instead of its default (``engine.landmarks.mtcnn.default_max_pixels``: a whole
  32-frame batch of 1080p on a GPU of 40 GiB or more, else 16 M, 7 such frames a call). On CUDA
  the detections can move by ~1e-4 px with the frames per call (cuDNN's kernels differ by batch
  size); each call is still facenet-pytorch's ``detect_face`` bit for bit.
* ``$STUDIO_BENCH_RGB_ON_HOST=1``: the exact path's frames become RGB on the host (FFmpeg's
  conversion), as before the engine made them RGB on the GPU from their YUV planes
  (``engine.fast.default_source``, :mod:`engine.yuv`: the same bytes).
* ``$STUDIO_BENCH_FAST_RGB_ON_GPU=1``: the fast path's PyAV frames become RGB on the GPU from
  their YUV planes as the exact path's do (``MediaSource(rgb_device=...)``; the same bytes)
  instead of FFmpeg's RGB being uploaded. A candidate, not yet the engine's.
* ``$STUDIO_BENCH_THREAD_CPU=DIR``: a thread of the process reads the CPU time of each of its
  threads from ``/proc/self/task`` once a second and writes ``DIR/<pid>.json``: seconds per
  thread, under the thread's Python name, or ``native:<name>`` for threads Python did not start
  (FFmpeg's decoders, torch's and CUDA's), and the process's total (threads that ended between
  two samples count only there). ``bench/dataset.py --thread-cpu`` sums them by role.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder

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
THREAD_CPU_PERIOD_S = 1.0


class _PatchAfterImport(MetaPathFinder):
    """Finds module ``name`` as usual, and calls each of ``patches`` on the module after it has run."""

    def __init__(self, name: str, patch) -> None:
        self.name, self.patches = name, [patch]

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            for patch in self.patches:
                patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _fixed_box(module) -> None:
    from bench.dataset import install_fixed_box

    install_fixed_box(module.Engine, os.environ[BOX_ENV])


def _facenet_levels(module) -> None:
    from bench.gpu_checks import facenet_first_stage

    module.pnet_candidates = facenet_first_stage


def _thread_per_input(module) -> None:
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    @contextlib.contextmanager
    def landmark_thread(self):
        lent = ThreadPoolExecutor(1, thread_name_prefix="landmarks")
        try:
            yield lent
        finally:
            lent.shutdown(wait=True)

    module._Models.landmark_thread = landmark_thread


def _no_load_ahead(module) -> None:
    module.Worker._load_ahead = lambda self: None


def _claim_to_the_end(module) -> None:
    claim_next = module.claim_next

    def claim_regardless(*args, ahead=False, **kwargs):
        return claim_next(*args, **kwargs)

    module.claim_next = claim_regardless


def _mtcnn_stream(module) -> None:
    detect = module.MtcnnLandmarker.detect

    def on_own_stream(self, frames):
        import torch

        if self.device.type != "cuda":
            return detect(self, frames)
        stream = self.__dict__.get("_bench_stream")
        if stream is None:
            stream = self._bench_stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            return detect(self, frames)

    module.MtcnnLandmarker.detect = on_own_stream


def _mtcnn_max_pixels(module) -> None:
    init, pixels = module.MtcnnLandmarker.__init__, int(os.environ[MAX_PIXELS_ENV])

    def with_max_pixels(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.max_pixels = pixels

    module.MtcnnLandmarker.__init__ = with_max_pixels


def _rgb_device_on(mode: str, rgb_device_of):
    """A patch of ``engine.fast``: the ``mode`` path's PyAV source (a ``MediaSource``, which has an
    ``rgb_device``) makes its frames RGB on ``rgb_device_of(source)`` (None: FFmpeg on the host)."""

    def patch(module) -> None:
        default_source = module.default_source

        def with_rgb_device(config, *args, **kwargs):
            source = default_source(config, *args, **kwargs)
            if module.Mode(config.mode) == module.Mode(mode) and hasattr(source, "rgb_device"):
                source.rgb_device = rgb_device_of(source)
            return source

        module.default_source = with_rgb_device

    return patch


def _task_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) and kernel name of each thread of this process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                text = f.read()
        except OSError:  # ended meanwhile
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        found[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime, stime: fields 14, 15
    return found


def _sample_thread_cpu(folder: str) -> None:
    """Every THREAD_CPU_PERIOD_S: this process's threads' CPU seconds into ``folder/<pid>.json``."""
    import json
    import threading
    import time

    live: dict[int, tuple[str, str, float]] = {}  # tid -> (role, kernel name, seconds at the last sample)
    ended: list[tuple[str, float]] = []  # (role, seconds) of threads whose id the kernel gave again
    path = os.path.join(folder, f"{os.getpid()}.json")
    os.makedirs(folder, exist_ok=True)
    while True:
        python = {t.native_id: t.name for t in threading.enumerate()}
        for tid, (kernel_name, seconds) in _task_cpu().items():
            before = live.get(tid)
            if before is not None and (seconds < before[2] or kernel_name != before[1]):  # another thread now
                ended.append((before[0], before[2]))
                before = None
            role = python.get(tid) or (before[0] if before else f"native:{kernel_name}")
            live[tid] = (role, kernel_name, seconds)
        times = os.times()
        record = {"pid": os.getpid(), "argv": sys.argv, "total_s": times.user + times.system,
                  "threads": [[role, seconds] for role, _, seconds in live.values()] + [list(e) for e in ended]}
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
        time.sleep(THREAD_CPU_PERIOD_S)


def _start_thread_cpu_sampler(folder: str) -> None:
    import threading

    threading.Thread(target=_sample_thread_cpu, args=(folder,), name="bench-thread-cpu", daemon=True).start()


def _after_import(name: str, patch) -> None:
    """Call ``patch(module)`` once module ``name`` has been imported (one finder per module, so
    several switches can patch the same module)."""
    for finder in sys.meta_path:
        if isinstance(finder, _PatchAfterImport) and finder.name == name:
            finder.patches.append(patch)
            return
    sys.meta_path.insert(0, _PatchAfterImport(name, patch))


#: The on/off switches (on: "1"): variable, the module to patch once it is imported, the patch.
ON_OFF = (
    (LEVELS_ENV, "engine.landmarks.mtcnn_gpu", _facenet_levels),
    (THREADS_ENV, "engine.many", _thread_per_input),
    (LOAD_ENV, "worker.loop", _no_load_ahead),
    (TAIL_ENV, "db.service", _claim_to_the_end),
    (STREAM_ENV, "engine.landmarks.mtcnn", _mtcnn_stream),
    (RGB_ENV, "engine.fast", _rgb_device_on("exact", lambda source: None)),
    (FAST_RGB_ENV, "engine.fast", _rgb_device_on("fast", lambda source: source.device)),  # "auto" as there
)

if os.environ.get(BOX_ENV):
    _after_import("engine.pipeline", _fixed_box)
if os.environ.get(MAX_PIXELS_ENV):
    _after_import("engine.landmarks.mtcnn", _mtcnn_max_pixels)
for variable, module_name, patch in ON_OFF:
    if os.environ.get(variable) == "1":
        _after_import(module_name, patch)
if os.environ.get(THREAD_CPU_ENV):
    _start_thread_cpu_sampler(os.environ[THREAD_CPU_ENV])
