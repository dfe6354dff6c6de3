"""Many inputs through one engine: :meth:`Engine.run_many <engine.pipeline.Engine.run_many>`.

Several inputs run at once, each in its own thread and its own :class:`~engine.pipeline.Engine`
built on the calling engine's loaded stages (``Engine(cfg, **shared)``): one regressor, one
landmark backend (``file`` is built per input), one aligner (its thread pool shared), the
tracker and temporal policy (stateless objects: their state travels per input). What is per
input: its sinks, its resume state, its progress reporter, its errors.

The threads outlive the inputs: ``concurrency`` input threads, and as many landmark threads,
each lent to one input at a time. PyTorch keeps cuDNN's execution plans per thread (one per
layer and input shape, milliseconds to build), so a thread made for each input would build them
all again for every clip; reused threads build each one once.

::

    jobs ─(feeder thread: one item at a time, only when a slot is free)─▶ input threads (≤ concurrency)
         ─▶ outcomes, in completion order

On CUDA the shared regressor is wrapped in :class:`~engine.batching.MergingRegressor`, so the
crops of the inputs running at once go through one forward. Memory is bounded: at most
``concurrency`` inputs are pulled from ``jobs`` and open at any time, each holding O(batch).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import usable_cpus
from engine.progress import Progress
from engine.sources import InputItem

if TYPE_CHECKING:
    from engine.pipeline import Engine, RunReport

log = logging.getLogger(__name__)

#: Inputs at once on a GPU by default: enough to keep it busy while others decode and align.
CUDA_CONCURRENCY = 2
#: CPU cores per input at once on the CPU by default (each input's stages use several threads).
CPU_CORES_PER_INPUT = 4


@dataclass(frozen=True)
class InputJob:
    """One input of :meth:`~engine.pipeline.Engine.run_many`.

    Attributes:
        source: a video or image, or an :class:`~engine.sources.InputItem`.
        out_base: output path without suffix (as :meth:`~engine.pipeline.Engine.run`).
        state_dir: this input's resume state folder (None: no resume).
        progress: this input's progress callback (:class:`~engine.progress.Progress`).
        should_stop: polled like :meth:`~engine.pipeline.Engine.run`'s; True cancels this input.
        key: the caller's id for it (a job id); not used by the engine.
        segment: ``(start, stop)``: run only frames ``[start, stop)`` of the video (``stop``
            None: to its end) with :meth:`~engine.pipeline.Engine.run_segment`, results kept in
            ``state_dir`` (needed then) and nothing written: the split path, :mod:`engine.segments`.
    """

    source: Path | InputItem
    out_base: Path
    state_dir: Path | None = None
    progress: Callable[[Progress], None] | None = None
    should_stop: Callable[[], bool] | None = None
    key: str = ""
    segment: tuple[int, int | None] | None = None


@dataclass(frozen=True)
class InputOutcome:
    """What became of one :class:`InputJob`: its report, or its own error."""

    job: InputJob
    report: RunReport | None  #: None when it failed
    error: BaseException | None  #: the input's error (StudioError, Cancelled ...), None when it succeeded

    @property
    def ok(self) -> bool:
        return self.error is None


def default_concurrency(device: str, cpu_count: int | None) -> int:
    """Inputs at once when the caller does not say: :data:`CUDA_CONCURRENCY` on a GPU; on the CPU
    one per :data:`CPU_CORES_PER_INPUT` cores (at least 1, at most 4).

    >>> default_concurrency("cuda:0", 16), default_concurrency("cpu", 2), default_concurrency("cpu", 16)
    (2, 1, 4)
    """
    if str(device).startswith("cuda"):
        return CUDA_CONCURRENCY
    return max(1, min(4, (cpu_count or 1) // CPU_CORES_PER_INPUT))


class _SharedStage:
    """A stage shared by the per-input engines: its first call runs alone (a stage may set itself
    up lazily, e.g. a thread pool), later calls run concurrently; ``close`` is left to its owner."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._ready = False

    def __call__(self, *args, **kwargs):
        if not self._ready:
            with self._lock:
                if not self._ready:
                    out = self.inner(*args, **kwargs)
                    self._ready = True
                    return out
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        """The owner (the engine ``run_many`` was called on) closes the inner stage."""


class _Models:
    """The calling engine's models, loaded once, on the first input's thread (a failure to load
    is that input's error; the next input tries again, as sequential runs would).

    Loading also enters the regressor's float setting (:meth:`Regressor.numerics`, process-wide)
    until :meth:`close`, so the per-input engines entering and leaving their own never flip it
    while another input's forward runs.
    """

    def __init__(self, engine: Engine, merge: bool) -> None:
        self.engine = engine
        self.merge = merge
        self._lock = threading.Lock()
        self._face_lock = threading.Lock()
        self._shared: dict | None = None
        self._numerics: contextlib.ExitStack = contextlib.ExitStack()
        self.merger = None
        self._lm_lock = threading.Lock()
        self._idle_lm: list[ThreadPoolExecutor] = []  # landmark threads between two inputs

    def shared(self, source: Path | InputItem) -> dict:
        """``Engine(cfg, **shared)`` keyword arguments: the loaded, shared stages."""
        with self._lock:
            if self._shared is None:
                from engine.landmarks import needs_source

                e = self.engine
                regressor = e.regressor
                if not needs_source(e.config):
                    e.landmarker_for(source)
                self._numerics.enter_context(regressor.numerics())
                if self.merge:
                    from engine.batching import MergingRegressor

                    self.merger = regressor = MergingRegressor(regressor)
                self._shared = {
                    **e.components,
                    "regressor": regressor,
                    "source": e.source,
                    "tracker": e.tracker,
                    "aligner": _SharedStage(e.aligner),
                    "temporal_policy": e.temporal_policy,
                    "limits": e.limits,
                    "progress_interval_s": e.progress_interval_s,
                }
            return self._shared

    @contextlib.contextmanager
    def landmark_thread(self) -> Iterator[ThreadPoolExecutor]:
        """A one-thread executor for an input's face stages, kept for the next input after it."""
        with self._lm_lock:
            lent = self._idle_lm.pop() if self._idle_lm else ThreadPoolExecutor(1, thread_name_prefix="landmarks")
        try:
            yield lent
        finally:
            with self._lm_lock:
                self._idle_lm.append(lent)

    def face_model(self):
        """The calling engine's face model (BFM), loaded once for every input."""
        with self._face_lock:
            return self.engine.face_model()

    def close(self) -> None:
        if self.merger is not None:
            self.merger.close()
        self._numerics.close()
        with self._lm_lock:
            idle, self._idle_lm = self._idle_lm, []
        for lm in idle:
            lm.shutdown(wait=True)


def feed_jobs(jobs: Iterable[InputJob], slots: threading.Semaphore, stop: threading.Event,
              out: queue.Queue) -> None:
    """Pull ``jobs`` one item at a time, only when one of ``slots`` is free, putting
    ``("job", InputJob)`` on ``out``; then ``("end", None)``, or ``("end", error)`` when iterating
    ``jobs`` raised (the caller raises it after the started inputs end). Stops early once ``stop``
    is set (the caller releases a slot to wake it). Runs in the caller's feeder thread."""
    try:
        it = iter(jobs)
        while True:
            slots.acquire()
            if stop.is_set():
                break
            try:
                job = next(it)
            except StopIteration:
                break
            out.put(("job", job))
    except BaseException as e:  # the jobs iterable's own error
        out.put(("end", e))
        return
    out.put(("end", None))


def run_many(engine: Engine, jobs: Iterable[InputJob], *, concurrency: int | None = None,
             merge_batches: bool | None = None) -> Iterator[InputOutcome]:
    """See :meth:`engine.pipeline.Engine.run_many`."""
    if concurrency is None:
        concurrency = default_concurrency(engine.device, usable_cpus())
    concurrency = max(1, int(concurrency))
    if engine._sinks is not None and concurrency > 1:  # sinks handed in serve one input at a time
        log.info("run_many: sinks were handed to the engine; running one input at a time")
        concurrency = 1
    if merge_batches is None:
        merge_batches = engine.device.startswith("cuda")
    models = _Models(engine, merge_batches and concurrency > 1)
    events: queue.Queue = queue.Queue()  # ("job", InputJob) | ("end", exc | None) | ("done", InputOutcome)
    slots = threading.Semaphore(concurrency)
    stop_all = threading.Event()

    def one(job: InputJob) -> None:
        try:
            outcome = _run_one(models, job, stop_all)
        except BaseException as e:  # never lose an input's outcome
            outcome = InputOutcome(job, None, e)
        slots.release()
        events.put(("done", outcome))

    feeder = threading.Thread(target=feed_jobs, args=(jobs, slots, stop_all, events), name="run-many-feed",
                              daemon=True)
    inputs = ThreadPoolExecutor(concurrency, thread_name_prefix="input")  # ≤ concurrency jobs at once (slots)
    running, fed, feed_error = 0, True, None
    try:
        feeder.start()
        while fed or running:
            kind, item = events.get()
            if kind == "job":
                running += 1
                inputs.submit(one, item)
            elif kind == "done":
                running -= 1
                yield item
            else:
                fed, feed_error = False, item
    finally:
        stop_all.set()  # the consumer stopped early (or an error): cancel the inputs still open
        slots.release()  # let a feeder waiting for a slot see the stop
        inputs.shutdown(wait=True)
        models.close()
    if feed_error is not None:
        raise feed_error


def _run_one(models: _Models, job: InputJob, stop_all: threading.Event) -> InputOutcome:
    """Run ``job`` in a per-input engine on the shared models; its error is its outcome."""
    from engine.pipeline import Engine

    own_stop = job.should_stop

    def should_stop() -> bool:
        return stop_all.is_set() or bool(own_stop and own_stop())

    child = None
    with contextlib.ExitStack() as stack:  # the landmark thread goes back after close_threads
        try:
            models.engine.check_input(job.source)  # a bad input fails as itself, before any model loads
            shared = models.shared(job.source)
            lm_thread = stack.enter_context(models.landmark_thread())
            child = Engine(models.engine.config, **shared, landmark_thread=lm_thread)
            child.face_model = models.face_model  # one BFM for every input (overlay, lm68 extras)
            user = models.merger.user() if models.merger is not None else contextlib.nullcontext()
            with user:
                if job.segment is not None:
                    if job.state_dir is None:
                        raise ValueError("a segment job needs a state_dir (its results are kept there)")
                    report = child.run_segment(job.source, job.segment, job.state_dir, progress=job.progress,
                                               should_stop=should_stop)
                else:
                    report = child.run(job.source, job.out_base, progress=job.progress, should_stop=should_stop,
                                       state_dir=job.state_dir)
            return InputOutcome(job, report, None)
        except Exception as e:  # each input fails alone, with its own error
            log.debug("input %s failed", job.source, exc_info=True)
            return InputOutcome(job, None, e)
        finally:
            if child is not None:
                child.close_threads()  # its own threads; the shared stages and the lent thread stay
