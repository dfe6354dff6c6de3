"""Many inputs in several processes: ``Engine.run_many(jobs, processes=K)`` and :class:`EnginePool`.

One process runs its inputs' per-frame Python (decode hand-off, tracking, sinks ...) under one
GIL, which caps it well below what a GPU can take. Here K child processes (``spawn``: each its own
interpreter, GIL and CUDA context) each build their own :class:`~engine.pipeline.Engine` and run
the threaded :func:`engine.many.run_many` over the inputs the parent hands them::

    jobs ─(parent feeder thread: one at a time, only when a slot is free)─▶ parent pump thread
         ─(pipe: source, out_base, state_dir, segment; never the callbacks)─▶ child k: threaded run_many
         ◀─(pipe: progress, outcome)─ child k
    outcomes, in completion order ◀─ pump

What stays in the parent: each job's ``progress`` and ``should_stop`` callables (called and polled
by the pump thread, as the threaded run calls them from input threads), the lazy pulling of
``jobs`` (at most ``processes × concurrency`` inputs open), and the outcomes. A child writes the
same files as a threaded run (same ``out_base``, same staged writes renamed into place).

A child that dies (killed, segfault, out of memory) ends the inputs it held with
:class:`~engine.errors.EngineProcessError`; a replacement starts (at most ``processes``
replacements per pool) and the other inputs go on. Errors come back as themselves when they
are of :mod:`engine.errors` (rebuilt from their type name and message: no pickled exception
crosses), else as :class:`~engine.errors.EngineProcessError` with the type, message and code.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from engine import errors
from engine.config import cuda_index, usable_cpus
from engine.errors import EngineProcessError
from engine.many import InputJob, InputOutcome, default_concurrency, feed_jobs, run_many

if TYPE_CHECKING:
    from engine.pipeline import Engine

log = logging.getLogger(__name__)

#: Longest wait of the parent's pump between two polls of the jobs' ``should_stop`` (seconds).
POLL_S = 0.05
#: How long closing a pool waits for its children to cancel their inputs and exit (seconds).
JOIN_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------- errors across processes


def error_payload(e: BaseException | None) -> tuple | None:
    """What a child sends for an input's error: plain text, ``(module, type name, message, code)``
    (no pickled exception: the parent rebuilds it, :func:`error_from_payload`)."""
    if e is None:
        return None
    return (type(e).__module__, type(e).__qualname__, str(e), getattr(e, "code", None))


def error_from_payload(payload: tuple | None) -> BaseException | None:
    """The parent's side of :func:`error_payload`: an :mod:`engine.errors` error whose constructor
    takes the message alone comes back as its own type; any other error as an
    :class:`EngineProcessError` with its type name, message and ``code``."""
    if payload is None:
        return None
    module, name, message, code = payload
    cls = getattr(errors, name, None) if module == errors.__name__ else None
    if isinstance(cls, type) and issubclass(cls, errors.StudioError):
        try:
            return cls(message)
        except TypeError:  # a constructor of other arguments (ShapeError)
            pass
    return EngineProcessError(f"{name}: {message}", code=code)


# ---------------------------------------------------------------------------- the child


def _child_main(conn: Connection, factory: Callable[[], Engine], concurrency: int | None,
                merge_batches: bool | None, log_level: int) -> None:
    """A child process: build the engine, load its models, run what the parent sends.

    Messages in: ``("run", tid, source, out_base, state_dir, segment)`` (segment: None or a
    ``(start, stop)`` frame range, :attr:`~engine.many.InputJob.segment`), ``("cancel", tid)``, ``("stop",)``
    (or the pipe closing). Out: ``("ready", inputs at once)``, ``("fatal", error payload)`` (the
    engine could not be built), ``("progress", tid, Progress)``, ``("done", tid, RunReport | None,
    error payload)``.
    """
    logging.basicConfig(level=log_level, format="%(levelname)s %(processName)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            conn.send(msg)

    tasks: queue.Queue = queue.Queue()
    cancels: dict[int, threading.Event] = {}  # per input: the parent said cancel
    stop = threading.Event()

    def read() -> None:
        try:
            while True:
                msg = conn.recv()
                if msg[0] == "run":
                    cancels[msg[1]] = threading.Event()  # before the input can poll it
                    tasks.put(msg)
                elif msg[0] == "cancel":
                    if (flag := cancels.get(msg[1])) is not None:
                        flag.set()
                else:
                    break
        except (EOFError, OSError):  # the parent went away
            pass
        stop.set()
        tasks.put(None)

    def jobs() -> Iterator[InputJob]:
        while (msg := tasks.get()) is not None:
            _, tid, source, out_base, state_dir, segment = msg
            flag = cancels[tid]

            def should_stop(flag=flag) -> bool:
                return stop.is_set() or flag.is_set()

            def progress(p, tid=tid) -> None:
                with contextlib.suppress(OSError):
                    send(("progress", tid, p))

            yield InputJob(source, out_base, state_dir, progress=progress, should_stop=should_stop, key=str(tid),
                           segment=segment)

    try:
        engine = factory()
    except Exception as e:
        send(("fatal", error_payload(e)))
        return
    if concurrency is None:
        concurrency = default_concurrency(engine.device, usable_cpus())
    if engine.handed_in and "sinks" in engine.handed_in:
        concurrency = 1  # as run_many does: sinks handed in serve one input at a time
    _preload(engine)
    send(("ready", max(1, int(concurrency))))
    threading.Thread(target=read, name="procs-read", daemon=True).start()
    with engine:
        for outcome in run_many(engine, jobs(), concurrency=concurrency, merge_batches=merge_batches):
            tid = int(outcome.job.key)
            cancels.pop(tid, None)
            try:
                send(("done", tid, outcome.report, error_payload(outcome.error)))
            except OSError:  # the parent went away: cancel the rest
                stop.set()
            except Exception as e:  # the report did not pickle: the input's error, not ours
                send(("done", tid, None, error_payload(EngineProcessError(f"cannot send the result back: {e}"))))


def _preload(engine: Engine) -> None:
    """Load the models before the first input (a failure is left for that input to report)."""
    from engine.landmarks import needs_source

    try:
        engine.regressor  # noqa: B018
        if not needs_source(engine.config):
            engine.landmarker_for(None)
    except Exception:
        log.debug("preloading the models failed; the first input will say why", exc_info=True)


# ---------------------------------------------------------------------------- the parent


@dataclass
class _Child:
    """One child process as the parent sees it."""

    number: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    slots: int = 0  # inputs at once, as the child reported when ready
    fatal: str = ""  # why the child could not build its engine
    held: set[int] = field(default_factory=set)  # task ids sent and not yet ended
    dead: bool = False

    def send(self, msg: tuple) -> bool:
        try:
            self.conn.send(msg)
            return True
        except (OSError, ValueError):
            return False


def _exit_reason(exitcode: int | None) -> str:
    """``killed by SIGKILL`` / ``exit code 3`` for a child's exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


@dataclass
class _Open:
    """An input of the current :meth:`EnginePool.run_many` call that has not ended yet."""

    job: InputJob
    child: _Child | None = None
    cancelled: bool = False


class EnginePool:
    """``processes`` child processes, each with its own engine from ``factory``, that run inputs.

    Args:
        factory: builds a child's :class:`~engine.pipeline.Engine`; pickled to the children, so a
            module-level function or a :func:`functools.partial` of one (``partial(Engine, cfg)``).
        processes: child processes (at least 1).
        concurrency: inputs at once in each child (its threaded run_many); None: its default.
        merge_batches: per child, as :meth:`~engine.pipeline.Engine.run_many`'s.

    Children start on :meth:`start` (or ``with``), load their models, and stay for every
    :meth:`run_many` until :meth:`close`. One :meth:`run_many` at a time.
    """

    def __init__(self, factory: Callable[[], Engine], processes: int, *, concurrency: int | None = None,
                 merge_batches: bool | None = None) -> None:
        self.factory = factory
        self.processes = max(1, int(processes))
        self.concurrency = concurrency
        self.merge_batches = merge_batches
        self._ctx = multiprocessing.get_context("spawn")
        self._children: list[_Child] = []
        self._replacements_left = self.processes
        self._slots = max(1, int(concurrency)) if concurrency is not None else 0  # 0: not known yet
        self._started = 0
        self._next_tid = 0
        self._busy = threading.Lock()
        self._last_death = ""

    @property
    def slots(self) -> int:
        """Inputs one child runs at once (its run_many's concurrency; its default when None,
        known once a child is ready, 1 until then)."""
        return self._slots or 1

    @property
    def pids(self) -> list[int]:
        """Process ids of the live children."""
        return [c.process.pid for c in self._children if not c.dead]

    def start(self) -> EnginePool:
        """Start the children (they load their models in the background)."""
        while len(self._children) < self.processes:
            self._spawn()
        return self

    def _spawn(self) -> _Child:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        level = logging.getLogger().getEffectiveLevel()
        proc = self._ctx.Process(target=_child_main, name=f"engine-proc-{self._started}", daemon=True,
                                 args=(child_end, self.factory, self.concurrency, self.merge_batches, level))
        proc.start()
        child_end.close()
        child = _Child(self._started, proc, parent_end)
        self._started += 1
        self._children.append(child)
        return child

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every live child has loaded its models or died (at most ``timeout``
        seconds); True when at least one child is ready and none is still loading."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            loading = [c for c in self._children if not c.dead and not c.ready]
            if not loading:
                return any(c.ready for c in self._children)
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left <= 0:
                return False
            self._receive({}, None, loading, left)

    def __enter__(self) -> EnginePool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Tell the children to cancel what they run and exit; wait for them (then kill)."""
        for c in self._children:
            c.send(("stop",))
        for c in self._children:
            c.process.join(timeout)
            if c.process.is_alive():
                log.warning("engine process %s did not stop; killing it", c.process.pid)
                c.process.kill()
                c.process.join(timeout)
            c.conn.close()
            c.dead = True
        self._children.clear()

    # ------------------------------------------------------------------ running inputs

    def run_many(self, jobs: Iterable[InputJob]) -> Iterator[InputOutcome]:
        """Run ``jobs`` in the children; yield one :class:`InputOutcome` per job as it ends.

        Same contract as :meth:`Engine.run_many <engine.pipeline.Engine.run_many>`: ``jobs`` is
        pulled lazily (never more than ``processes × slots`` open), each input fails alone,
        closing the generator early cancels the inputs still open and waits until they have ended
        in their children, and an error raised by iterating ``jobs`` is raised after the started
        inputs have ended.
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("EnginePool.run_many is already running")
        try:
            self.start()
            out: queue.Queue = queue.Queue()
            stop = threading.Event()
            pump = threading.Thread(target=self._pump, args=(jobs, out, stop), name="procs-pump", daemon=True)
            pump.start()
            try:
                while True:
                    kind, item = out.get()
                    if kind == "outcome":
                        yield item
                    elif item is not None:
                        raise item
                    else:
                        return
            finally:
                stop.set()
                pump.join()
        finally:
            self._busy.release()

    def _pump(self, jobs: Iterable[InputJob], out: queue.Queue, stop: threading.Event) -> None:
        """The parent's loop: feed the children, relay progress, poll ``should_stop``, collect outcomes."""
        pulled: queue.Queue = queue.Queue()  # ("job", InputJob) | ("end", exc | None)
        if not self._slots:  # each child's default inputs at once: known once one is ready
            while not self._slots and self._children and not stop.is_set():
                self.wait_ready(POLL_S)
        slots = threading.Semaphore(self.processes * self.slots)
        opened: dict[int, _Open] = {}
        waiting: collections.deque[int] = collections.deque()
        fed, feed_error = True, None

        def end(tid: int, report, error: BaseException | None) -> None:
            o = opened.pop(tid)
            if o.child is not None:
                o.child.held.discard(tid)
            slots.release()
            out.put(("outcome", InputOutcome(o.job, report, error)))

        feeder = threading.Thread(target=feed_jobs, args=(jobs, slots, stop, pulled), name="procs-feed", daemon=True)
        feeder.start()
        try:
            while fed or opened:
                if stop.is_set():
                    break
                while True:  # newly pulled jobs
                    try:
                        kind, item = pulled.get_nowait()
                    except queue.Empty:
                        break
                    if kind == "job":
                        tid = self._next_tid
                        self._next_tid += 1
                        opened[tid] = _Open(item)
                        waiting.append(tid)
                    else:
                        fed, feed_error = False, item
                self._assign(waiting, opened, end)
                self._poll_stops(opened)
                self._receive(opened, end)
        except BaseException as e:  # a bug here must not hang the consumer
            log.exception("engine process pump failed")
            feed_error = feed_error or e
        finally:
            stop.set()
            slots.release()  # let a feeder waiting for a slot see the stop
            self._cancel_open(opened)
            out.put(("end", feed_error))

    def _cancel_open(self, opened: dict[int, _Open]) -> None:
        """The consumer stopped early: cancel the inputs still open in the children and wait (up to
        :data:`JOIN_TIMEOUT_S`) until each has ended there, as ``Engine.run_many`` waits for its
        threads, so none still writes its outputs or resume state once ``run_many`` returns."""
        sent = {tid: o.child for tid, o in opened.items() if o.child is not None and o.child.send(("cancel", tid))}
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while any(tid in c.held and not c.dead for tid, c in sent.items()) and time.monotonic() < deadline:
            self._receive({}, None)  # "done" (or the child's death) takes each off its child's held set

    def _assign(self, waiting: collections.deque, opened: dict[int, _Open], end) -> None:
        """Send waiting inputs to the live children with a free slot (fewest held first)."""
        while waiting:
            live = [c for c in self._children if not c.dead and len(c.held) < (c.slots or self.slots)]
            if not live:
                if not any(not c.dead for c in self._children):
                    tid = waiting.popleft()
                    end(tid, None, EngineProcessError(
                        f"no engine process left to run this input (the last one: {self._last_death})"))
                    continue
                return
            child = min(live, key=lambda c: (len(c.held), c.number))
            tid = waiting.popleft()
            job = opened[tid].job
            if child.send(("run", tid, job.source, job.out_base, job.state_dir, job.segment)):
                opened[tid].child = child
                child.held.add(tid)
            else:
                waiting.appendleft(tid)
                self._died(child, opened, end)

    def _poll_stops(self, opened: dict[int, _Open]) -> None:
        """Poll each sent input's ``should_stop``; tell its child to cancel it once it says True."""
        for tid, o in opened.items():
            if o.child is None or o.cancelled or o.job.should_stop is None:
                continue
            try:
                stop = bool(o.job.should_stop())
            except Exception:
                log.exception("should_stop of %s raised; not cancelling", o.job.key or o.job.source)
                continue
            if stop:
                o.cancelled = True
                o.child.send(("cancel", tid))

    def _receive(self, opened: dict[int, _Open], end, children: list[_Child] | None = None,
                 timeout: float = POLL_S) -> None:
        """Wait up to ``timeout`` seconds for messages or deaths of ``children`` (default: the
        live ones), and handle them."""
        live = [c for c in (self._children if children is None else children) if not c.dead]
        if not live:
            time.sleep(timeout)
            return
        by_conn = {id(c.conn): c for c in live}
        by_sentinel = {c.process.sentinel: c for c in live}
        ready = wait([c.conn for c in live] + list(by_sentinel), timeout=timeout)
        gone: list[_Child] = []
        for r in ready:
            is_conn = isinstance(r, Connection)
            child = by_conn.get(id(r)) if is_conn else by_sentinel.get(r)
            if child is None or child in gone:
                continue
            if is_conn:
                try:
                    while child.conn.poll():
                        self._handle(child, child.conn.recv(), opened, end)
                except (EOFError, OSError):
                    gone.append(child)
            else:
                gone.append(child)
        for child in gone:
            self._died(child, opened, end)

    def _handle(self, child: _Child, msg: tuple, opened: dict[int, _Open], end) -> None:
        kind = msg[0]
        if kind == "ready":
            child.ready, child.slots = True, msg[1]
            self._slots = self._slots or msg[1]
        elif kind == "fatal":
            child.fatal = str(error_from_payload(msg[1]))
        elif kind == "progress":
            o = opened.get(msg[1])
            if o is not None and o.job.progress is not None:
                try:
                    o.job.progress(msg[2])
                except Exception:
                    log.exception("progress callback of %s raised", o.job.key or o.job.source)
        elif kind == "done":
            _, tid, report, payload = msg
            child.held.discard(tid)
            if tid in opened and end is not None:  # else: an input of an earlier, closed run_many call
                end(tid, report, error_from_payload(payload))

    def _died(self, child: _Child, opened: dict[int, _Open], end) -> None:
        """``child`` is gone: read what it sent before dying, fail what it still held, replace it."""
        if child.dead:
            return
        with contextlib.suppress(EOFError, OSError):
            while child.conn.poll():
                self._handle(child, child.conn.recv(), opened, end)
        child.dead = True
        child.process.join(5)
        if child.fatal:
            reason = f"it could not build its engine: {child.fatal}"
            self._replacements_left = 0  # the next one would fail the same way
        else:
            reason = _exit_reason(child.process.exitcode)
        log.warning("engine process %s ended unexpectedly (%s); %d input(s) lost", child.process.pid, reason,
                    len(child.held))
        for tid in sorted(child.held):
            if tid in opened and end is not None:
                end(tid, None, EngineProcessError(
                    f"the engine process running this input ended unexpectedly ({reason})"))
        child.held.clear()
        child.conn.close()
        self._children.remove(child)
        if self._replacements_left > 0:
            self._replacements_left -= 1
            self._spawn()
        elif not self._children:
            self._last_death = reason


# ---------------------------------------------------------------------------- Engine.run_many(processes=K)


def engine_factory(engine: Engine) -> Callable[[], Engine]:
    """A picklable recipe for ``engine`` in a child process: ``Engine(config, limits=...,
    progress_interval_s=...)``. Raises ValueError when stages were handed to it (a child cannot
    rebuild those: use :class:`EnginePool` with a factory that builds them)."""
    from engine.pipeline import Engine

    if engine.handed_in:
        raise ValueError(
            f"run_many(processes>1) needs an engine built from its config alone; this one was handed "
            f"{', '.join(engine.handed_in)}, which a child process cannot rebuild (use engine.procs.EnginePool "
            f"with a factory that builds them in the child)")
    return functools.partial(Engine, engine.config, limits=engine.limits,
                             progress_interval_s=engine.progress_interval_s)


#: ``--processes auto`` / ``--per-gpu auto``: CPU cores one engine process on a GPU keeps busy, and
#: the most processes per GPU it picks (on a 16-core H200, 4 fast-path processes made 337–470
#: frames/s with PyAV where one made 159–237, and 1,102 with NVDEC; docs/PERFORMANCE.md).
CORES_PER_GPU_PROCESS = 4
MAX_AUTO_PROCESSES = 4
#: GPU memory (GiB) ``auto`` counts per process, so a smaller GPU gets fewer: the measured peak of
#: one fast-path process at 1080p with 2 inputs was 3–4 GiB with PyAV and 5.5–6.6 GiB with NVDEC
#: (frames on the GPU); run D in docs/PERFORMANCE.md. A 24 GB GPU gets 3, a 16 GB one 2.
GIB_PER_GPU_PROCESS = 6.0


def processes_per_gpu(cpus: int, gpu_gib: float | None = None) -> int:
    """Engine (or worker) processes that ``cpus`` CPU cores keep busy on one GPU: one per
    :data:`CORES_PER_GPU_PROCESS`, 1 to :data:`MAX_AUTO_PROCESSES`, and no more than
    ``gpu_gib`` (the GPU's memory, GiB; None: not counted) holds at :data:`GIB_PER_GPU_PROCESS`
    each (``--processes auto``, ``worker --per-gpu auto``).

    >>> processes_per_gpu(16), processes_per_gpu(6), processes_per_gpu(128)
    (4, 1, 4)
    >>> processes_per_gpu(16, 139.8), processes_per_gpu(16, 23.6), processes_per_gpu(16, 15.7), processes_per_gpu(16, 8)
    (4, 3, 2, 1)
    """
    count = min(MAX_AUTO_PROCESSES, cpus // CORES_PER_GPU_PROCESS)
    if gpu_gib is not None:
        count = min(count, int(gpu_gib // GIB_PER_GPU_PROCESS))
    return max(1, count)


def gpu_memory_gib(device: str) -> float | None:
    """Total memory (GiB) of CUDA ``device`` (``"cuda"`` is GPU 0); None on the CPU or
    when torch cannot tell. Initialises CUDA in this process."""
    if not str(device).startswith("cuda"):
        return None
    try:
        import torch

        return torch.cuda.get_device_properties(cuda_index(device)).total_memory / 2**30
    except Exception:  # no driver, a bad index: leave the count to the cores
        return None


def auto_processes(device: str, inputs: int, cpus: int, gpu_gib: float | None = None) -> int:
    """Engine processes for ``extract --processes auto``: on a GPU with 2+ inputs
    :func:`processes_per_gpu` of ``cpus`` and ``gpu_gib``, at most ``inputs``; else 1 (on the CPU
    one process already uses every core through its threads).

    >>> auto_processes("cuda", 40, 16), auto_processes("cuda:1", 3, 32), auto_processes("cuda", 1, 16)
    (4, 3, 1)
    >>> auto_processes("cpu", 40, 64), auto_processes("cuda", 40, 6), auto_processes("cuda", 40, 16, 23.6)
    (1, 1, 3)
    """
    if not str(device).startswith("cuda") or inputs < 2:
        return 1
    return min(inputs, processes_per_gpu(cpus, gpu_gib))


def run_in_processes(engine: Engine, jobs: Iterable[InputJob], *, processes: int,
                     concurrency: int | None = None, merge_batches: bool | None = None) -> Iterator[InputOutcome]:
    """See :meth:`engine.pipeline.Engine.run_many` (``processes > 1``)."""
    factory = engine_factory(engine)  # raises now, not on the first next()

    def outcomes() -> Iterator[InputOutcome]:
        with EnginePool(factory, processes, concurrency=concurrency, merge_batches=merge_batches) as pool:
            yield from pool.run_many(jobs)

    return outcomes()
