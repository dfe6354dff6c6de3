"""One long video through several engine processes: the split path.

One process runs an input's per-frame Python under one GIL (about 360 frames/s on a GPU); the
pool of :mod:`engine.procs` helps only when there are several inputs. Here one video is cut into
frame segments, the segments run in the pool's processes (:meth:`Engine.run_segment
<engine.pipeline.Engine.run_segment>`: decode → faces → align → regress, each batch's results
saved as resume chunks in the segment's own folder), and this process merges their per-frame
results and judges, finishes and writes the input once, as a whole run does::

    video ─probe─▶ plan_segments: [0, s1) [s1, s2) … [sn, end)   (boundaries: multiples of batch_size)
         ─(EnginePool: one job per segment; progress summed; should_stop reaches every segment)─▶
    child k: lead-in batch [s - batch, s) through the face stages only (tracker, policy state)
             → frames [s, stop): resume chunks in state_dir/segments/<start>-<stop>/, marked complete
         ◀─ outcome per segment (report or error) ─
    parent: every segment's chunks in order → one accumulator → judge, quality, extras, sinks (once)

The parent holds per-frame results only (≈2 KB a frame, read with ``allow_pickle=False``), never
frames. A segment whose chunks are complete is not run again (resume per segment); a failing
segment fails the whole input with its error, naming the input and the frame range, before any
sink wrote a file. Used for fast mode only (see :func:`split_reason`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.config import EngineConfig, Mode
from engine.errors import Cancelled, EngineProcessError, StudioError
from engine.many import InputJob, InputOutcome
from engine.progress import Progress, ProgressReporter
from engine.sources import InputItem
from engine.structures import MediaInfo

if TYPE_CHECKING:
    from engine.pipeline import Engine, RunReport
    from engine.procs import EnginePool

log = logging.getLogger(__name__)

#: Shortest segment worth a process (frames; 10 s at 25 fps): shorter inputs run unsplit.
MIN_SEGMENT_FRAMES = 256
#: Segments per engine process, so a process that finishes early takes another.
SEGMENTS_PER_PROCESS = 2
#: Folder (under the input's ``state_dir``) that holds one folder per segment.
SEGMENTS_DIR = "segments"

Segment = tuple[int, int | None]  #: frames ``[start, stop)``; stop None: to the end of the video


def plan_segments(frame_count: int, parts: int, align: int, min_frames: int) -> list[tuple[int, int]]:
    """Half-open frame ranges ``[start, stop)`` that cover ``0 … frame_count`` without gaps or
    overlap: at most ``parts`` of them, every boundary a multiple of ``align``, none shorter
    than ``min_frames`` (a short tail joins the range before it; a short input is one range).

    >>> plan_segments(100, 3, 8, 16)
    [(0, 40), (40, 80), (80, 100)]
    >>> plan_segments(1000, 4, 32, 64)
    [(0, 256), (256, 512), (512, 768), (768, 1000)]
    >>> plan_segments(20, 4, 8, 16), plan_segments(0, 4, 8, 16), plan_segments(100, 1, 8, 16)
    ([(0, 20)], [(0, 0)], [(0, 100)])
    >>> plan_segments(90, 3, 8, 16)
    [(0, 32), (32, 64), (64, 90)]
    """
    align, min_frames = max(1, int(align)), max(1, int(min_frames))
    if frame_count <= 0 or parts <= 1:
        return [(0, max(0, frame_count))]
    length = max(-(-frame_count // parts), min_frames)
    length = -(-length // align) * align
    starts = list(range(0, frame_count, length))
    if len(starts) > 1 and frame_count - starts[-1] < min_frames:
        starts.pop()
    return [(a, b) for a, b in zip(starts, [*starts[1:], frame_count], strict=True)]


def split_reason(config: EngineConfig, info: MediaInfo, processes: int) -> str:
    """Why this input runs unsplit, or "" when it may be split (the plan may still give one
    segment: a video shorter than two :data:`MIN_SEGMENT_FRAMES`).

    Only fast mode is split: the exact path promises outputs bit-identical to the reference,
    and what it carries from frame to frame (the last landmarks for a frame without a face, the
    person followed with ``keep_person continuity``) can reach back across any boundary. Landmarks
    from a file (``--landmarks file``) are checked against the whole input's frame count.
    """
    from engine.landmarks import needs_source

    if processes < 2:
        return "one process"
    if info.kind != "video":
        return "not a video"
    if config.mode != Mode.FAST:
        return "exact mode runs unsplit (bit-identical to the reference)"
    if needs_source(config):
        return "landmarks from a file"
    return ""


def split_segments(config: EngineConfig, info: MediaInfo, processes: int,
                   min_frames: int | None = None) -> list[Segment]:
    """The segments one input runs in with ``processes`` engine processes: one (``(0, None)``)
    when it runs unsplit (:func:`split_reason`, or too short); else
    ``SEGMENTS_PER_PROCESS × processes`` at most, aligned to ``config.batch_size`` (so every
    batch holds the frames it holds in a whole run), the last open-ended (the container's
    frame count may be an estimate). ``min_frames``: shortest segment (None: :data:`MIN_SEGMENT_FRAMES`)."""
    if split_reason(config, info, processes):
        return [(0, None)]
    min_frames = MIN_SEGMENT_FRAMES if min_frames is None else min_frames
    ranges = plan_segments(info.frame_count, SEGMENTS_PER_PROCESS * processes, config.batch_size,
                           max(min_frames, config.batch_size))
    return [(a, None if i == len(ranges) - 1 else b) for i, (a, b) in enumerate(ranges)]


def segment_dir(base: Path, segment: Segment) -> Path:
    """The folder of ``segment``'s resume state under ``base``: ``0000000256-0000000512``
    (``…-end`` for the last).

    >>> segment_dir(Path("s"), (256, None)).name
    '0000000256-end'
    """
    start, stop = segment
    return Path(base) / f"{start:010d}-{'end' if stop is None else f'{stop:010d}'}"


class _Progress:
    """One :class:`~engine.progress.Progress` for the whole input from its segments' reports:
    frames done summed (the frames restored from complete segments included)."""

    def __init__(self, reporter: ProgressReporter, total: int, done: dict[int, int]) -> None:
        self.reporter, self.total = reporter, total
        self._done = dict(done)  #: frames done per segment, those restored from saved states included
        self._lock = threading.Lock()

    def set(self, key: int, frames: int) -> None:
        with self._lock:
            self._done[key] = frames
            done = sum(self._done.values())
        self.reporter.update(frames_done=done, frames_total=max(self.total, done))
        self.reporter.report()

    def callback(self, key: int) -> Callable[[Progress], None]:
        return lambda p: self.set(key, p.frames_done)


def run_split(engine: Engine, source: str | Path | InputItem, out_base: str | Path, *, processes: int,
              progress: Callable[[Progress], None] | None = None, should_stop: Callable[[], bool] | None = None,
              state_dir: str | Path | None = None, pool: EnginePool | None = None,
              min_frames: int | None = None) -> RunReport:
    """Extract one input as :meth:`Engine.run <engine.pipeline.Engine.run>` does, its frames
    split over ``processes`` engine processes (``pool``'s when given, else a pool of
    :func:`~engine.procs.engine_factory` ``(engine)`` started and closed here). An input that
    is not split (:func:`split_segments` gives one segment) runs in ``engine.run`` here, unchanged.

    Args:
        state_dir: the input's resume folder; segments keep theirs in ``state_dir/segments/``
            (kept when cancelled or failed, removed after the outputs are written). None: a
            temporary folder, removed at the end (no resume).
        min_frames: shortest segment (frames; None: :data:`MIN_SEGMENT_FRAMES`).

    Returns / Raises: as ``engine.run``; a segment's error names the input and its frames.
    """
    from engine.pipeline import _abort, _ResumeState, segment_fingerprint

    t_start = time.perf_counter()
    item = source if isinstance(source, InputItem) else None
    path = item.path if item else Path(source)
    out_base = Path(out_base)
    stop = should_stop or (lambda: False)
    info = engine.check_input(path)
    processes = pool.processes if pool is not None else processes
    segments = split_segments(engine.config, info, processes, min_frames)
    if len(segments) < 2:
        why = split_reason(engine.config, info, processes) or f"{info.frame_count} frames: too short to split"
        log.info("%s: one process (%s)", path.name, why)
        return engine.run(item or path, out_base, progress=progress, should_stop=should_stop, state_dir=state_dir)
    log.info("%s: split into %d segments of frames %s over %d processes", path.name, len(segments),
             ", ".join(f"{a}-{'end' if b is None else b}" for a, b in segments), processes)

    sinks, paths, skipped = engine._start_sinks(path, info, out_base)
    if skipped is not None:
        return skipped
    try:
        with contextlib.ExitStack() as stack:
            if state_dir is None:
                base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="engine-segments-")))
            else:
                base = Path(state_dir) / SEGMENTS_DIR
            fingerprint = engine._fingerprint(path)
            states = [_ResumeState(segment_dir(base, s), segment_fingerprint(fingerprint, *s)) for s in segments]
            _drop_other_segments(base, {st.dir for st in states})
            with ProgressReporter(progress, engine.progress_interval_s) as reporter:
                saved = [st.saved_frames() for st in states]
                restored = sum(frames for frames, _ in saved)
                reporter.begin(restored, info.frame_count)
                counter = _Progress(reporter, info.frame_count, {i: frames for i, (frames, _) in enumerate(saved)})
                jobs = [InputJob(item or path, out_base, st.dir, progress=counter.callback(i), should_stop=stop,
                                 key=str(i), segment=segments[i])
                        for i, (st, (_, complete)) in enumerate(zip(states, saved, strict=True)) if not complete]
                t_loop = time.perf_counter()
                reports = _run_segments(engine, pool, processes, jobs, path, stop)
                fps = sum(r.num_frames - r.resumed_from for r in reports) / max(time.perf_counter() - t_loop, 1e-9)
                acc = _merge(states, path)
                report = engine._conclude(path, info, acc, sinks, paths, reporter, stop, None)
            for st in states:
                _remove_state(st)
            with contextlib.suppress(OSError):
                base.rmdir()
    except BaseException:
        _abort(sinks)
        raise
    sha = next((r.checkpoint_sha256 for r in reports if r.checkpoint_sha256), "")
    return dataclasses.replace(report, fps=fps, resumed_from=restored, checkpoint_sha256=sha,
                               seconds=time.perf_counter() - t_start)


def _run_segments(engine: Engine, pool: EnginePool | None, processes: int, jobs: list[InputJob], path: Path,
                  stop: Callable[[], bool]) -> list[RunReport]:
    """Run the segment ``jobs`` in ``pool`` (or a pool started here); their reports, or the
    first error (the input's name and the segment's frames added), the others cancelled."""
    from engine.procs import EnginePool, engine_factory

    if not jobs:
        return []
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(EnginePool(engine_factory(engine), processes))
        reports: list[RunReport] = []
        outcomes = pool.run_many(jobs)
        try:
            for outcome in outcomes:
                if outcome.error is not None:
                    raise _segment_error(outcome.error, path, outcome.job.segment, stop())
                reports.append(outcome.report)
        finally:
            outcomes.close()  # cancels the segments still running (their state is kept)
    return reports


def _segment_error(e: BaseException, path: Path, segment: Segment | None, stopping: bool) -> BaseException:
    """The input's error for segment ``segment``'s error ``e``: the same type where it can be
    rebuilt from a message, the message prefixed with the input's name and the frames."""
    if isinstance(e, Cancelled) or stopping:
        return Cancelled(f"{path.name}: cancelled (the finished segments are kept for a resume)")
    start, stop = segment or (0, None)
    prefix = f"{path.name}, frames {start}-{'end' if stop is None else stop}: "
    if isinstance(e, EngineProcessError):
        return EngineProcessError(prefix + str(e), code=e.code)
    if isinstance(e, StudioError):
        with contextlib.suppress(TypeError):
            return type(e)(prefix + str(e))
    return EngineProcessError(f"{prefix}{type(e).__name__}: {e}", code=getattr(e, "code", None))


def _merge(states: list, path: Path):
    """Every segment's chunks, in order, in one accumulator; checks that each segment is
    complete and that the frames run 0, 1, 2 … without a gap or an overlap."""
    from engine.pipeline import _Accumulator

    acc = _Accumulator()
    for st in states:
        frames = st.complete_frames()
        if frames is None:
            raise EngineProcessError(f"{path.name}: segment {st.dir.name} ended without its results")
        before = acc.frames
        st.load(acc, resuming=False)
        if acc.frames - before != frames:
            raise EngineProcessError(f"{path.name}: segment {st.dir.name} holds {acc.frames - before} frames, "
                                     f"its state says {frames}")
    if acc.chunks:
        index = np.concatenate([c.index for c in acc.chunks])
        if not np.array_equal(index, np.arange(len(index))):
            raise EngineProcessError(f"{path.name}: the segments' frames do not join up (gap or overlap)")
    return acc


def _remove_state(state) -> None:
    """Delete a segment's resume files and its folder (only the files the engine writes)."""
    state.clear()
    with contextlib.suppress(OSError):
        state.dir.rmdir()


def _drop_other_segments(base: Path, keep: set[Path]) -> None:
    """Remove the segment folders of another plan (another batch size or process count)."""
    from engine.pipeline import _ResumeState

    if not base.is_dir():
        return
    for d in base.iterdir():
        if d.is_dir() and d not in keep and d.name[:10].isdigit():
            _remove_state(_ResumeState(d, ""))


def split_outcomes(engine: Engine, job: InputJob, processes: int) -> Iterator[InputOutcome]:
    """``job`` through :func:`run_split` as :meth:`Engine.run_many <engine.pipeline.Engine.run_many>`
    would yield it: one :class:`~engine.many.InputOutcome`, the input's error in it (for
    ``extract`` with one input and ``--processes K``)."""
    try:
        outcome = InputOutcome(job, run_split(engine, job.source, job.out_base, processes=processes,
                                              progress=job.progress, should_stop=job.should_stop,
                                              state_dir=job.state_dir), None)
    except Exception as e:  # the input's error is its outcome
        log.debug("input %s failed", job.source, exc_info=True)
        outcome = InputOutcome(job, None, e)
    yield outcome


__all__ = ["MIN_SEGMENT_FRAMES", "SEGMENTS_PER_PROCESS", "Segment", "plan_segments", "run_split", "segment_dir",
           "split_outcomes", "split_reason", "split_segments"]
