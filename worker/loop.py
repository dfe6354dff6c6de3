"""The worker: serve the job queue with one engine kept across jobs, several jobs at once.

``Worker.work()`` is the whole life of a worker process, as a checklist::

    register → claim loop { stop requested? → drop cancelled waiting jobs → janitor
                            → claim up to concurrency + prefetch held jobs → max jobs? } → teardown
    engine loop (a thread) { take claimed jobs → worker.feed.run_jobs → settle each outcome }

**Claim-ahead**: the worker holds up to ``concurrency`` jobs in flight plus ``prefetch`` claimed
ahead; a worker that holds a job claims another only while more are queued than other live
workers could take (``db.lease.claim_next(ahead=True)``), so the queue's last jobs are spread one
per worker rather than left behind a busy worker's while others idle. A claimed job is
``running`` in the registry from its claim on, with its own
:class:`~worker.monitor.JobMonitor` (heartbeat, progress, cancel flag), so a crashed worker's
claims are requeued by another worker's janitor like any running job. A waiting job whose cancel
is seen is dropped from the queue and marked ``cancelled`` at once (stage ``waiting``: it never
reached the engine); on SIGTERM the waiting jobs go back to the queue with no attempt counted.

One job, once the engine takes it:

1. wipe leftovers of an earlier attempt from ``results/<id>/`` (artifacts are only
   registered after success, so nothing there is needed); keep ``work/<id>/`` so the
   engine resumes from its last completed batch;
2. run it through :func:`worker.feed.run_jobs` (jobs with the same engine config share one
   lazily fed stream and the loaded models); CUDA out-of-memory halves its batch size down to 1;
3. on success hash the outputs and register artifacts + quality + ``succeeded`` in one
   transaction, retried with back-off while the database is locked or unreachable (a
   finished job's results are never thrown away because of a lock); on a user cancel
   remove the partial files and mark it ``cancelled``; on SIGTERM requeue it (no attempt
   counted) and leave; on a full or read-only disk (``disk_full``, ``read_only``) requeue
   it (no attempt counted) and *pause* the worker (status ``paused`` with the reason,
   exponential back-off, a write test before it claims again; the waiting jobs are given
   back) instead of failing the whole queue; on any other error mark it ``failed`` with a
   one-line reason and carry on.

Signals: the first SIGTERM/SIGINT is a warm shutdown (waiting jobs requeued at once, running
ones after their batch, exit 0); a second one gives every held job back and exits at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePath

from db import faults, service, storage
from db.access import user_message
from db.lease import WAITING_STAGE
from db.models import ErrorCode, WorkerStatus, utcnow
from db.registry import Registry
from db.views import ArtifactFile, JobView, QualitySummary
from engine.config import EngineConfig
from engine.errors import ENVIRONMENT_CODES, Cancelled, StudioError, short_path, storage_error
from engine.sources import InputItem
from worker.feed import InputJob, run_jobs
from worker.monitor import JobMonitor

log = logging.getLogger("worker")

#: Settings that decide which models an Engine holds; a change means building a new one.
MODEL_KEYS = ("checkpoint", "landmarks", "device", "mode")  # the fast path loads other models

#: Seconds between two sweeps for temporary files left by killed processes (see ``storage.sweep_temp``).
TEMP_SWEEP_S = 600.0


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker behaves. Times are seconds.

    Attributes:
        device: torch device every job of this worker runs on (``"cpu"``, ``"cuda:0"``).
        concurrency: jobs the engine runs at once (in flight), sharing the loaded models.
        prefetch: jobs claimed ahead, beyond those in flight: they wait on this worker, leased
            (heartbeat, cancel, crash recovery) exactly like a running job.
        num_threads: CPU threads for alignment (the jobs' ``num_threads``) and for torch
            (``torch.set_num_threads``); None keeps each job's setting and torch's default.
        decode_threads: FFmpeg's threads per video for every job (the jobs'
            ``decode_threads``; 0: FFmpeg's choice); None keeps each job's setting.
        poll_s: sleep between two looks at an empty queue.
        heartbeat_s: longest gap between two heartbeats of a running job.
        stale_after_s: a running job whose heartbeat is older than this is requeued by the
            janitor (its worker is presumed dead). Must be well above ``heartbeat_s``.
        burst: exit when the queue is empty instead of waiting.
        max_jobs: exit after this many jobs (None: no limit).
        progress_s: shortest gap between two progress writes.
        cancel_poll_s: how often the cancel flag of the running job is read.
        pause_s: first pause after a full or read-only disk; doubles with each fault in a row.
        max_pause_s: longest pause.
        register_retry: how long the final registration of a finished job is retried while
            the database is locked or unreachable.
    """

    device: str = "cpu"
    concurrency: int = 2
    prefetch: int = 2
    num_threads: int | None = None
    decode_threads: int | None = None
    poll_s: float = 2.0
    heartbeat_s: float = 2.0
    stale_after_s: float = 30.0
    burst: bool = False
    max_jobs: int | None = None
    progress_s: float = 0.5
    cancel_poll_s: float = 0.25
    pause_s: float = 10.0
    max_pause_s: float = 300.0
    register_retry: faults.RetryPolicy = field(default_factory=faults.RetryPolicy)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.prefetch < 0 or (self.num_threads is not None and self.num_threads < 1):
            raise ValueError(
                f"concurrency must be >= 1, prefetch >= 0 and threads >= 1 (got {self.concurrency}, "
                f"{self.prefetch}, {self.num_threads})"
            )
        if self.decode_threads is not None and self.decode_threads < 0:
            raise ValueError(f"decode threads must be >= 0 (0: FFmpeg's choice), got {self.decode_threads}")
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"stale_after_s ({self.stale_after_s}) must exceed twice heartbeat_s ({self.heartbeat_s}), "
                "or live jobs would be taken from their workers"
            )


def default_worker_id(device: str, slot: int | None = None) -> str:
    """``<host>-<pid>-<device>``, or ``<host>-<pid>-<device>#<slot>`` for one of several workers of a device
    (``--per-gpu``): unique per process, readable in logs and the dashboard."""
    return f"{socket.gethostname()}-{os.getpid()}-{device.replace(':', '')}" + (f"#{slot}" if slot is not None else "")


def device_name(device: str) -> str:
    """A human name for the device (the GPU model, or ``"CPU"``)."""
    if device.startswith("cuda"):
        try:
            import torch

            from engine.config import cuda_index

            return torch.cuda.get_device_name(cuda_index(device))
        except Exception:  # a name is nice to have, never worth failing for
            return device
    return "CPU"


def import_torch() -> None:
    """Import torch (when installed) before any job is claimed."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401


def limit_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` (intra-op CPU threads of this process), when torch is installed."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def _model_key(cfg: EngineConfig) -> tuple:
    return tuple(str(getattr(cfg, k)) for k in MODEL_KEYS)


class EngineCache:
    """Keeps one :class:`engine.Engine` across jobs; rebuilds it only when the models change.

    Jobs that differ only in formats, batch size and the like reuse the loaded models
    (``Engine(cfg, **old.components)``).
    """

    def __init__(self, factory: Callable[..., object] | None = None) -> None:
        self._factory = factory
        self._engine = None
        self._cfg: EngineConfig | None = None

    @property
    def real(self) -> bool:
        """Whether the engines are :class:`engine.Engine` (no factory was injected)."""
        return self._factory is None

    def get(self, cfg: EngineConfig):
        if self._engine is not None and self._cfg == cfg:
            return self._engine
        factory = self._factory
        if factory is None:
            from engine import Engine as factory
        if self._engine is not None and _model_key(self._cfg) == _model_key(cfg):
            components = getattr(self._engine, "components", {}) or {}
            if hasattr(self._engine, "close_threads"):
                self._engine.close_threads()
            self._engine = factory(cfg, **components)
        else:
            self.close()
            log.info("loading models: checkpoint=%s landmarks=%s device=%s",
                     cfg.checkpoint or "(default)", cfg.landmarks.value, cfg.device)
            self._engine = factory(cfg)
        self._cfg = cfg
        return self._engine

    def close(self) -> None:
        if self._engine is not None and hasattr(self._engine, "close"):
            self._engine.close()
        self._engine, self._cfg = None, None


def _input_item(job: JobView, state_dir: Path | None = None) -> InputItem:
    """The job's input as the engine's :class:`~engine.sources.InputItem`: named by the name it was
    submitted under (an upload's file name, or the path inside an imported folder), so
    ``--landmarks file`` finds ``<keypoints>/<that name>.txt`` even for uploads stored by hash.

    The same bytes are stored once whatever extension they came with, but the engine decides
    between video and image by the extension. When the job was submitted as the other kind
    (``photo.png`` holding the bytes of a stored ``<sha>.mp4``), the engine gets
    ``state_dir/input.png``, a symlink to the stored copy, so the job ends exactly as
    ``python -m engine extract photo.png`` would.
    """
    from engine.sources import media_kind

    name = PurePath(job.name or Path(job.input_path).name)
    parts = [p for p in name.with_suffix("").parts if p not in ("..", name.anchor)]
    rel_stem = Path(*parts) if parts else Path(name.stem)
    path = Path(job.input_path)
    wanted = storage.safe_suffix(name.name)
    if state_dir is not None and wanted and media_kind(name.name) != media_kind(path):
        link = state_dir / f"input{wanted}"
        if not (link.is_symlink() and os.readlink(link) == str(path)):
            link.unlink(missing_ok=True)
            link.symlink_to(path)
        path = link
    return InputItem(path, None, rel_stem)


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


def _free_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _checkpoint_name(explicit: str | None) -> str | None:
    """File name of the checkpoint a run used (resolved as the engine does), for the manifest."""
    from engine.weights import find_checkpoint

    try:
        return find_checkpoint(explicit).name
    except StudioError:
        return Path(explicit).name if explicit else None
#: Longest output stem (bytes): with the longest suffix (``.sadtalker.mat``) and the writers'
#: temporary names every name stays within the file systems' 255 bytes.
MAX_STEM = 200


def output_stem(name: str) -> str:
    """File-name stem for a job's outputs: the input's stem with unsafe characters replaced,
    shortened to :data:`MAX_STEM` characters (ASCII) with a hash of the full stem kept.

    >>> output_stem("talk 1.mp4"), len(output_stem("x" * 300 + ".mp4"))
    ('talk_1', 200)
    """
    stem = Path(name).stem or "output"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "output"
    if len(safe) > MAX_STEM:
        import hashlib

        safe = f"{safe[:MAX_STEM - 17]}~{hashlib.sha256(stem.encode()).hexdigest()[:16]}"
    return safe


def environment_fault(e: BaseException, data_dir: Path) -> StudioError | None:
    """The worded ``disk_full``/``read_only`` error behind ``e``, when ``e`` (or its cause) is a
    full or read-only disk rather than a fault of the job; else None.

    A permission error counts only for a path under ``data_dir`` (an unreadable input file
    is the job's own problem).
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StudioError) and e.code in ENVIRONMENT_CODES:
            return e
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            return storage_error(e, Path(e.filename).name if e.filename else "the data folder")
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM) and e.filename \
                and data_dir in Path(os.path.abspath(e.filename)).parents:
            return storage_error(e, Path(e.filename).name)
        e = e.__cause__ or e.__context__
    return None


@dataclass(eq=False)
class Held:
    """A job this worker holds (claimed; waiting for the engine or running), with its own monitor.

    ``cfg`` is the job's engine config on this worker (its batch size halves after an
    out-of-memory error); ``item`` the engine's view of its input once it started.
    """

    job: JobView
    monitor: JobMonitor
    cfg: EngineConfig
    item: InputItem | None = None
    started: bool = False
    first_batch_logged: bool = False


class ClaimQueue:
    """Claimed jobs waiting for the engine, oldest claim first (thread-safe).

    The claim loop :meth:`put` s jobs; the engine side :meth:`take` s them, blocking until one
    is there. After :meth:`close` the waiting ones are still taken, then ``take`` gives None.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: deque[Held] = deque()
        self._closed = False

    def put(self, held: Held, *, front: bool = False) -> None:
        with self._cond:
            if front:
                self._items.appendleft(held)
            else:
                self._items.append(held)
            self._cond.notify_all()

    def take(self, cfg: EngineConfig | None = None) -> Held | None:
        """The oldest waiting job; blocks while none waits and the queue is open. None once it is
        closed and empty, or (with ``cfg``) when the oldest waiting job needs another config."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed)
            if not self._items or (cfg is not None and self._items[0].cfg != cfg):
                return None
            return self._items.popleft()

    def remove(self, held: Held) -> bool:
        """Take ``held`` out if it still waits; False when the engine already took it."""
        with self._cond:
            try:
                self._items.remove(held)
            except ValueError:
                return False
            return True

    def drain(self) -> list[Held]:
        """Take out every waiting job."""
        with self._cond:
            items, self._items = list(self._items), deque()
            return items

    def waiting(self) -> list[Held]:
        with self._cond:
            return list(self._items)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Worker:
    """Serves the queue of one registry on one device.

    Three kinds of thread: the claim loop (:meth:`work`, the main thread: claims, janitor,
    cancels of waiting jobs, shutdown), the engine loop (:meth:`serve`: hands the claimed jobs
    to :func:`worker.feed.run_jobs` and settles each outcome) and one
    :class:`~worker.monitor.JobMonitor` per held job (heartbeat, progress, cancel flag).

    Args:
        reg: the registry.
        options: see :class:`WorkerOptions`.
        worker_id: defaults to :func:`default_worker_id`.
        engine_factory: ``factory(cfg, **components) -> engine`` (default
            :class:`engine.Engine`); tests inject fakes here.
    """

    def __init__(
        self,
        reg: Registry,
        options: WorkerOptions | None = None,
        *,
        worker_id: str | None = None,
        engine_factory: Callable[..., object] | None = None,
    ) -> None:
        self.reg = reg
        self.options = options or WorkerOptions()
        self.worker_id = worker_id or default_worker_id(self.options.device)
        self.stop_event = threading.Event()
        self.engines = EngineCache(engine_factory)
        self.jobs_seen = 0
        self.claims = 0
        self._signals = 0
        self._fault: StudioError | None = None  # set by _requeue_for_fault(): a full or read-only disk
        self._claiming = threading.Lock()  # held by the claim loop while it checks _fault and claims
        self._faults_in_a_row = 0
        self._db_failures = 0
        self._janitor_quiet_until = 0.0  # monotonic s: no requeueing right after a database outage
        self._next_sweep = 0.0  # monotonic s: next look for stale temporary files
        self._queue = ClaimQueue()
        self._held: dict[int, Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()  # a job ended, a waiting job was cancelled, or a stop was asked

    # ------------------------------------------------------------------ the claim loop

    def work(self) -> int:
        """Serve the queue until a stop condition; returns the process exit code (0)."""
        if self.options.num_threads:
            limit_torch_threads(self.options.num_threads)
        if self.engines.real:  # import torch now: the import holds the GIL for seconds, which would
            import_torch()     # hold up the heartbeats of the jobs claimed meanwhile
        self.register()
        restore = self._install_signal_handlers()
        self._load_ahead()
        engine = threading.Thread(target=self.serve, args=(self._queue,), name="engine", daemon=True)
        engine.start()
        clean = False
        try:
            self._claim_loop()
            clean = True
        finally:
            if clean:
                self._shutdown(engine)
            else:  # a second signal (SystemExit) or a bug: give every held job back, then leave
                self._release_all(f"worker {self.worker_id} was interrupted")
            self.teardown(close_engine=clean)
            restore()
        return 0

    def _load_ahead(self) -> None:
        """Load the models of the job next in the queue before claiming anything, so no claimed
        job waits while they load (if another worker takes that job meanwhile, only the load was
        early). Nothing queued: the first job loads them. A failure is only logged: the job that
        needs those models reports it."""
        try:
            job = service.peek_next(self.reg, device=self.options.device)
            cfg = None if job is None else self._config(job)
        except StudioError:  # invalid settings: its claim fails the job with the reason
            return
        except Exception as e:
            self._db_trouble(e)
            log.warning("could not look at the queue: %s", faults.describe(e, busy_timeout_s=self.reg.busy_timeout_s))
            return
        if cfg is None:
            return
        self._idle(0.0, message="loading models")
        t0 = time.monotonic()
        try:
            engine = self.engines.get(cfg)
            if hasattr(engine, "load"):
                engine.load()
        except Exception as e:
            log.warning("could not load the models ahead (%s); the first job that needs them will say why", e)
            return
        log.info("models loaded in %.1f s, before the first claim", time.monotonic() - t0)

    def _claim_loop(self) -> None:
        """Claim while fewer than ``concurrency + prefetch`` jobs are held; returns on a stop
        request, an empty queue in burst mode, or ``max_jobs`` claims done."""
        opts = self.options
        next_claim = next_janitor = 0.0  # monotonic s
        while True:
            self._wake.clear()
            if self.stop_event.is_set():
                log.info("stop requested: exiting (warm shutdown)")
                return
            self._drop_stopped_waiting()
            if self._fault is not None:
                fault, self._fault = self._fault, None
                self._release_waiting(f"worker {self.worker_id} paused ({fault.code}); requeued before it started")
                self._pause(fault)
                continue
            capped = opts.max_jobs is not None and self.claims >= opts.max_jobs
            if capped and not self.held_count():
                log.info("did %d job(s): exiting (max jobs)", self.jobs_seen)
                return
            now = time.monotonic()
            if now >= next_janitor:
                self.janitor()
                next_janitor = now + opts.poll_s
            empty = False
            while not capped and now >= next_claim and self.held_count() < opts.concurrency + opts.prefetch:
                try:
                    ahead = self.held_count() > 0
                    with self._claiming:  # see _requeue_for_fault
                        if self._fault is not None:
                            break
                        job = service.claim_next(self.reg, self.worker_id, device=opts.device, ahead=ahead,
                                                 alive_within_s=opts.stale_after_s)
                    self._db_failures = 0
                except Exception as e:  # database locked, full or unreachable: try again later
                    self._db_trouble(e)
                    self._db_failures += 1
                    wait = min(opts.max_pause_s, opts.poll_s * 2 ** min(self._db_failures, 16))
                    log.warning("could not claim a job: %s; trying again in %.0f s",
                                faults.describe(e, busy_timeout_s=self.reg.busy_timeout_s), wait)
                    next_claim = now + wait
                    break
                if job is None:  # queue empty, or (ahead) its last jobs left to others: look again on a wake
                    if not ahead:
                        empty, next_claim = True, now + opts.poll_s
                    break
                self.claims += 1
                capped = opts.max_jobs is not None and self.claims >= opts.max_jobs
                held = self._hold(job)
                if held is not None:
                    self._queue.put(held)
                else:  # invalid settings: failed at once
                    self._count_done()
            if empty and not self.held_count():
                if opts.burst:
                    log.info("queue empty: exiting (burst mode)")
                    return
                self._idle(0.0)
            self._wake.wait(opts.poll_s)

    def held_count(self) -> int:
        """Jobs this worker holds: claimed and waiting for the engine, or running."""
        with self._lock:
            return len(self._held)

    def _hold(self, job: JobView) -> Held | None:
        """Start holding a claimed job: its monitor keeps its heartbeat from now on. None when its
        settings are invalid (the job is failed at once)."""
        monitor = JobMonitor(
            self.reg, job.id, self.worker_id, self.stop_event, heartbeat_s=self.options.heartbeat_s,
            progress_s=self.options.progress_s, poll_s=self.options.cancel_poll_s, wake=self._wake,
        ).start()
        try:
            cfg = self._config(job)
        except StudioError as e:
            monitor.stop()
            self._fail(job, e)
            return None
        monitor.update(stage=WAITING_STAGE)
        held = Held(job, monitor, cfg)
        with self._lock:
            self._held[job.id] = held
        return held

    def _done_with(self, held: Held) -> None:
        with self._lock:
            self._held.pop(held.job.id, None)
        self._count_done()

    def _count_done(self) -> None:
        with self._lock:
            self.jobs_seen += 1
        self._wake.set()

    def _drop_stopped_waiting(self) -> None:
        """Waiting jobs whose cancel was asked for end ``cancelled`` at once (they never reach the
        engine); waiting jobs taken from this worker are let go."""
        for held in self._queue.waiting():
            monitor = held.monitor
            if not (monitor.cancel_requested.is_set() or monitor.lost.is_set()) or not self._queue.remove(held):
                continue
            monitor.stop()
            if monitor.lost.is_set():
                log.warning("job %d: taken from this worker before it started", held.job.id)
            else:
                try:
                    service.finish_cancelled(self.reg, held.job.id, self.worker_id)
                    log.info("job %d: cancelled before it started", held.job.id)
                except Exception as e:  # its heartbeat has stopped: the janitor cancels it
                    self._db_trouble(e)
                    log.warning("job %d: could not record its cancel: %s", held.job.id,
                                faults.describe(e, busy_timeout_s=self.reg.busy_timeout_s))
            self._done_with(held)

    def _release_waiting(self, reason: str) -> None:
        """Give every job still waiting for the engine back to the queue without counting the attempt."""
        for held in self._queue.drain():
            self._give_back(held, reason)

    def _release_all(self, reason: str) -> None:
        """Give back every held job, running ones too (the process is leaving at once)."""
        self._queue.drain()
        with self._lock:
            everything = list(self._held.values())
        for held in everything:
            self._give_back(held, reason)

    def _give_back(self, held: Held, reason: str) -> None:
        held.monitor.stop()
        try:
            back = service.requeue_job(self.reg, held.job.id, self.worker_id, reason=reason, penalty=False)
        except Exception as e:  # left to the janitor of another worker
            self._db_trouble(e)
            back = None
            log.warning("job %d: could not give it back: %s", held.job.id,
                        faults.describe(e, busy_timeout_s=self.reg.busy_timeout_s))
        if back is not None:
            log.info("job %d: given back to the queue (%s)", held.job.id, reason)
        self._done_with(held)

    def _shutdown(self, engine: threading.Thread) -> None:
        """Warm end of :meth:`work`: waiting jobs go back to the queue at once (no attempt counted),
        running ones stop after their batch (see :meth:`_stopped`); then the engine loop ends."""
        if self.stop_event.is_set():
            self._release_waiting(f"worker {self.worker_id} shut down; requeued before it started")
        self._queue.close()
        while engine.is_alive():
            engine.join(0.5)  # in short steps, so a second signal still gets through

    def register(self) -> None:
        service.register_worker(
            self.reg, self.worker_id, hostname=socket.gethostname(), pid=os.getpid(),
            device=self.options.device, device_name=device_name(self.options.device),
        )
        log.info("worker started on %s (registry %r; %d at once, %d claimed ahead)", self.options.device, self.reg,
                 self.options.concurrency, self.options.prefetch)

    def teardown(self, *, close_engine: bool = True) -> None:
        if close_engine:
            self.engines.close()
        try:
            service.stop_worker(self.reg, self.worker_id)
        except Exception as e:  # the process is leaving anyway
            log.warning("could not mark the worker stopped: %s", e)
        log.info("worker stopped after %d job(s)", self.jobs_seen)

    def janitor(self) -> None:
        """Requeue (or fail) jobs whose worker stopped sending heartbeats.

        Skipped for ``stale_after_s`` seconds after this worker saw the database locked or
        unreachable: nobody could write a heartbeat meanwhile, so old heartbeats then say
        nothing about whether a worker is alive.
        """
        if time.monotonic() < self._janitor_quiet_until:
            return
        if time.monotonic() >= self._next_sweep:  # temp files of killed uploads and bundle builds
            self._next_sweep = time.monotonic() + TEMP_SWEEP_S
            for folder in (self.reg.uploads_dir, self.reg.results_dir):
                for p in storage.sweep_temp(folder):
                    log.info("removed %s, left half-written by a killed process", short_path(p))
        try:
            service.requeue_stale(self.reg, stale_after_s=self.options.stale_after_s)
        except Exception as e:  # never let housekeeping kill the worker
            self._db_trouble(e)
            log.warning("janitor failed: %s", faults.describe(e, busy_timeout_s=self.reg.busy_timeout_s))

    def _db_trouble(self, e: BaseException | None = None, _delay: float = 0.0) -> None:
        """Note a failed database call (``faults.retry``'s ``on_retry`` hook too): quiet the janitor."""
        if e is None or faults.is_db_fault(e) or faults.fault_code(e):
            self._janitor_quiet_until = time.monotonic() + self.options.stale_after_s

    def _idle(self, seconds: float, *, status: WorkerStatus = WorkerStatus.IDLE, message: str | None = None) -> None:
        try:
            service.worker_heartbeat(self.reg, self.worker_id, status=status, current_job_id=None, message=message)
        except Exception as e:
            self._db_trouble(e)
            log.warning("worker heartbeat failed: %s", faults.describe(e, busy_timeout_s=self.reg.busy_timeout_s))
        self.stop_event.wait(seconds)

    def _pause(self, fault: StudioError) -> None:
        """Stop claiming jobs while a disk is full or read-only: status ``paused`` with the reason,
        back-off doubling from ``pause_s`` to ``max_pause_s``, then a write test of
        ``results/`` and ``work/``; claims resume once it passes."""
        opts = self.options
        while not self.stop_event.is_set():
            self._faults_in_a_row += 1
            delay = min(opts.max_pause_s, opts.pause_s * 2 ** min(self._faults_in_a_row - 1, 16))
            until = utcnow() + timedelta(seconds=delay)
            message = f"paused: {fault}; trying again at {until:%H:%M:%S} UTC"
            log.warning("%s", message)
            end = time.monotonic() + delay
            while not self.stop_event.is_set() and time.monotonic() < end:
                self._idle(min(opts.heartbeat_s, max(0.0, end - time.monotonic())), status=WorkerStatus.PAUSED,
                           message=message)
            if self.stop_event.is_set():
                return
            problem = next(
                (p for d in (self.reg.results_dir, self.reg.work_dir) if (p := storage.probe_writable(d))), None
            )
            if problem is None:
                log.info("the data folder is writable again: resuming")
                self._idle(0.0)
                return
            fault = problem

    # ------------------------------------------------------------------ the engine side

    def perform(self, job: JobView) -> None:
        """Run one claimed job to a final (or requeued) state in this thread (the Ray actor's
        entry point); never raises for a job's own failure."""
        held = self._hold(job)
        if held is None:
            return
        single = ClaimQueue()
        single.put(held)
        single.close()
        self.serve(single)
        with self._lock:
            self._held.pop(job.id, None)

    def serve(self, jobs: ClaimQueue) -> None:
        """The engine loop: run the jobs of ``jobs`` until it is closed and empty.

        Consecutive jobs with the same engine config go to the engine as one lazily fed stream
        (:func:`worker.feed.run_jobs`); a job that needs another config ends the stream, and the
        next one starts once the jobs in flight are done (:class:`EngineCache` keeps the models
        when only other settings change).
        """
        while (first := jobs.take()) is not None:
            try:
                self._run_stream(jobs, first)
            except Exception:  # a bug here must not leave the claimed jobs to wait for ever
                log.exception("the engine loop failed; continuing")

    def _run_stream(self, jobs: ClaimQueue, first: Held) -> None:
        cfg = first.cfg
        first.monitor.update(stage="loading")  # model loading can take longer than the first batch
        try:
            engine = self.engines.get(cfg)
        except Exception as e:
            self._finish(jobs, first, None, e)
            return

        def inputs():
            held = first
            while held is not None:
                job = self._begin(jobs, held)
                if job is not None:
                    yield job
                held = jobs.take(cfg)

        for outcome in run_jobs(engine, inputs(), concurrency=self.options.concurrency):
            with self._lock:
                held = self._held.get(int(outcome.job.key))
            if held is None:  # cannot happen: every job fed is held until its outcome is settled
                log.error("an outcome for job %s, which this worker does not hold", outcome.job.key)
                continue
            self._finish(jobs, held, outcome.report, outcome.error)

    def _finish(self, jobs: ClaimQueue, held: Held, report, error: BaseException | None) -> None:
        """Settle one outcome; a job to retry (out of memory) goes back to the front of ``jobs``."""
        if self._settle(held, report, error):
            jobs.put(held, front=True)
        elif jobs is self._queue:
            self._done_with(held)

    def _begin(self, jobs: ClaimQueue, held: Held) -> InputJob | None:
        """The engine's view of a job about to start: a fresh result folder (the resumable state of
        an earlier attempt is kept) and its input. None when that failed (the job is settled)."""
        job, monitor = held.job, held.monitor
        result_dir, state_dir = self.reg.result_dir(job.id), self.reg.state_dir(job.id)
        if not held.started:
            held.started = True
            log.info("job %d: start %s (attempt %d/%d)", job.id, job.name, job.attempts, job.max_attempts)
            try:
                for folder in (result_dir, state_dir):
                    try:
                        if folder == result_dir:
                            storage.remove_tree(result_dir)
                        folder.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise storage_error(e, f"{folder.parent.name}/{folder.name}/") from e
                held.item = _input_item(job, state_dir)
            except Exception as e:
                self._finish(jobs, held, None, e)
                return None
        monitor.update(stage="extract")

        def on_progress(p) -> None:
            if not held.first_batch_logged and p.frames_new > 0:  # reports also come while a batch is under way
                held.first_batch_logged = True
                log.info("job %d: first batch done at frame %d/%d", job.id, p.frames_done, p.frames_total)
            monitor.update(frames_done=p.frames_done, frames_total=p.frames_total, fps=p.fps, stage=p.stage)

        return InputJob(source=held.item, out_base=result_dir / output_stem(job.name), state_dir=state_dir,
                        progress=on_progress, should_stop=monitor.should_stop, key=str(job.id))

    def _settle(self, held: Held, report, error: BaseException | None) -> bool:
        """Record how a job's run ended; True when it should run again with half the batch (CUDA
        out of memory), its monitor still going.

        Success: hash the outputs and register them; a user's cancel: remove the partial files,
        ``cancelled``; SIGTERM: requeue (no attempt counted); a full or read-only disk: requeue
        (no attempt counted) and pause the worker; anything else: ``failed`` with one line.
        """
        job, monitor = held.job, held.monitor
        if error is not None and _is_oom(error):
            _free_cuda_cache()
            if held.cfg.batch_size > 1:
                smaller = max(1, held.cfg.batch_size // 2)
                log.warning("job %d: out of memory at batch size %d; retrying with %d",
                            job.id, held.cfg.batch_size, smaller)
                held.cfg = dataclasses.replace(held.cfg, batch_size=smaller)
                return True
            oom = StudioError(f"out of memory on {held.cfg.device} even with batch size 1 "
                              f"(free GPU memory or run on another device): {str(error).splitlines()[0]}")
            oom.__cause__, error = error, oom
        try:
            try:
                if error is not None:
                    raise error
                monitor.update(stage="register")  # the monitor keeps the heartbeat going meanwhile
                monitor.registering()
                self._succeed(job, report)
            finally:
                monitor.stop()
                if held.item is not None and held.item.path.is_symlink():  # see _input_item
                    held.item.path.unlink(missing_ok=True)
        except Cancelled:
            self._stopped(job, monitor)
        except BaseException as e:
            if not isinstance(e, Exception):  # SystemExit/KeyboardInterrupt in a job: give it back
                service.requeue_job(self.reg, job.id, self.worker_id, reason=f"worker {self.worker_id} was interrupted")
                return False
            fault = environment_fault(e, self.reg.data_dir)
            if fault is not None:
                self._requeue_for_fault(job, fault)
            else:
                self._fail(job, e)
        else:
            self._faults_in_a_row = 0
        return False

    def _config(self, job: JobView) -> EngineConfig:
        try:
            cfg = EngineConfig.from_dict(job.settings)
        except (TypeError, ValueError) as e:
            raise StudioError(f"invalid job settings: {e}") from e
        cfg = dataclasses.replace(cfg, device=self.options.device, overwrite=True)
        if self.options.num_threads:
            cfg = dataclasses.replace(cfg, num_threads=self.options.num_threads)
        if self.options.decode_threads is not None:
            cfg = dataclasses.replace(cfg, decode_threads=self.options.decode_threads)
        return cfg

    def _succeed(self, job: JobView, report) -> None:
        artifacts = []
        for fmt, path in sorted(report.outputs.items()):
            path = Path(path)
            fmt = getattr(fmt, "value", fmt)
            artifacts.append(ArtifactFile(str(fmt), path, path.stat().st_size, storage.sha256_file(path)))
        quality = QualitySummary(
            frames=int(report.num_frames), valid_frames=int(report.num_valid),
            reasons=dict(report.reasons), longest_invalid_run=int(report.longest_invalid_run),
        )
        info = report.info
        summary = {
            "seconds": round(float(report.seconds), 3),
            "fps": round(float(report.fps), 3),
            "resumed_from": int(getattr(report, "resumed_from", 0)),
            "media_fps": float(info.fps),
            "media": {"width": info.width, "height": info.height, "fps": info.fps,
                      "frame_count": info.frame_count, "duration": info.duration, "codec": info.codec},
            "config": report.config,
            "checkpoint_name": _checkpoint_name(report.config.get("checkpoint")),
            "quality": dict(getattr(report, "quality", {}) or {}),  # flags, jitter (engine.quality)
        }

        def register():
            return service.complete_job(
                self.reg, job.id, self.worker_id, artifacts=artifacts, quality=quality,
                engine_version=report.engine_version, checkpoint_sha256=report.checkpoint_sha256,
                report=summary,
            )

        try:
            faults.retry(register, self.options.register_retry, what=f"job {job.id}: registering the results",
                         on_retry=self._db_trouble)
        except service.LostJob:
            log.warning("job %d finished but was taken from this worker meanwhile: result dropped", job.id)
            return
        except Exception as e:
            if not faults.is_db_fault(e):
                raise
            # Never delete finished results because the database was unavailable: leave them; the
            # job stays running until a janitor requeues it.
            self._db_trouble(e)
            log.error("job %d: finished, but its results could not be registered (%s); they stay in "
                      "results/%d/ and the job will be requeued once its heartbeat is stale", job.id,
                      faults.describe(e, busy_timeout_s=self.reg.busy_timeout_s), job.id)
            return
        log.info("job %d: succeeded (%d frames, %d valid, %.1f s)", job.id, report.num_frames,
                 report.num_valid, report.seconds)

    def _stopped(self, job: JobView, monitor: JobMonitor) -> None:
        if monitor.lost.is_set():
            log.warning("job %d: stopped, it belongs to another worker now", job.id)
        elif monitor.cancel_requested.is_set():
            service.finish_cancelled(self.reg, job.id, self.worker_id)
            log.info("job %d: cancelled; partial files removed", job.id)
        else:
            service.requeue_job(self.reg, job.id, self.worker_id,
                                reason=f"worker {self.worker_id} shut down; requeued to resume")
            done = monitor.progress.get("frames_done", 0)
            log.info("job %d: requeued at frame %s (shutdown)", job.id, done)

    def _requeue_for_fault(self, job: JobView, fault: StudioError) -> None:
        """A full or read-only disk: give the job back without counting the attempt (its saved
        state in ``work/<id>/`` is kept to resume) and pause before the next claim."""
        # First, and under the claim lock: a claim already under way ends before the fault is set,
        # none starts after it, so this job, requeued below, is not claimed again before the pause.
        with self._claiming:
            self._fault = fault
        left = storage.remove_tree(self.reg.result_dir(job.id))  # nothing in it is registered
        reason = f"{fault} (requeued: the worker paused until the disk is fixed)"
        try:
            back = service.requeue_job(self.reg, job.id, self.worker_id, reason=reason, penalty=False,
                                       code=fault.code)
        except Exception as db_error:
            self._db_trouble(db_error)
            log.error("job %d: could not requeue it after %s: %s", job.id, fault.code,
                      faults.describe(db_error, busy_timeout_s=self.reg.busy_timeout_s))
            back = None
        log.warning("job %d: %s; %s", job.id, fault,
                    "requeued without counting the attempt" if back is not None else "left to the janitor")
        if left:
            log.warning("job %d: %d partial file(s) could not be removed from results/%d/", job.id, len(left), job.id)

    def _fail(self, job: JobView, e: Exception) -> None:
        if isinstance(e, StudioError):
            message, code = str(e), e.code
            log.error("job %d failed: %s", job.id, message)
        else:
            message, code = f"{type(e).__name__}: {e}", ErrorCode.INTERNAL
            log.exception("job %d failed with an unexpected error", job.id)
        message = message.splitlines()[0] if message.strip() else type(e).__name__
        message = user_message(message, job.input_path, job.name, self.reg.data_dir)  # the user's file name
        try:
            failed = service.fail_job(self.reg, job.id, self.worker_id, error=message, code=code)
        except Exception as db_error:
            log.error("job %d: could not record the failure: %s", job.id, db_error)
            return
        if failed is None:  # the job was requeued meanwhile: its files may be another worker's now
            log.warning("job %d no longer belongs to this worker; its files are left alone", job.id)
            return
        storage.remove_tree(self.reg.result_dir(job.id))

    # ------------------------------------------------------------------ signals

    def request_stop(self) -> None:
        """Ask for a warm shutdown: running jobs stop after their batch and are requeued, waiting
        ones are requeued at once."""
        self.stop_event.set()
        self._wake.set()

    def _install_signal_handlers(self) -> Callable[[], None]:
        return install_stop_handlers(self, "finishing the current batch, then exiting")


def install_stop_handlers(owner, first_message: str) -> Callable[[], None]:
    """SIGTERM/SIGINT → ``owner.request_stop()`` (warm shutdown); a second signal exits at once.

    Counts signals in ``owner._signals``. Only installs in the main thread; returns a function
    that restores the previous handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, _frame):
        owner._signals += 1
        if owner._signals == 1:
            log.info("%s received: %s", signal.Signals(signum).name, first_message)
            owner.request_stop()
        else:
            log.warning("%s received again: exiting now", signal.Signals(signum).name)
            raise SystemExit(1)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passes (tests and launch helpers)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
