"""Progress of a run: what is reported, and a timer that reports it whatever stage is running.

:class:`ProgressReporter` holds the latest counters (set by the engine as stages finish) and
calls the caller's callback with a :class:`Progress` after every batch and, from its own
thread, every ``interval_s`` seconds in between, so a slow batch, a slow stage or a slow sink
still reports. One lock serialises the calls: the callback never runs twice at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

#: Longest gap between two progress reports while an input is being processed (seconds).
PROGRESS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Progress:
    """Reported after every batch and at least every ``PROGRESS_INTERVAL_S`` meanwhile.

    Attributes:
        frames_done: frames finished so far (including frames restored from a resumed state).
        frames_total: expected frame count (the container's figure; may be an estimate).
        fps: frames per second processed in this run (not counting restored frames).
        stage: ``"loading"`` while the worker loads the models (reported by the worker before
            the engine runs), ``"extract"`` while running, ``"write"`` while writing outputs,
            ``"overlay"`` while rendering the review video.
        frames_new: frames this run has finished itself (``frames_done`` less the frames
            restored from a resumed state): 0 until its first batch is done.
    """

    frames_done: int
    frames_total: int
    fps: float
    stage: str = "extract"
    frames_new: int = 0


class ProgressReporter:
    """Calls ``callback`` with the latest :class:`Progress`: on :meth:`report`, and from a timer
    thread every ``interval_s`` seconds while started (``with reporter: ...``).

    Args:
        callback: receives each report; None makes every method a no-op. An exception it
            raises in the timer thread is logged and the timer goes on.
        interval_s: seconds between two timer reports.
        clock: monotonic seconds, for the frame rate (injectable for tests).
    """

    def __init__(
        self,
        callback: Callable[[Progress], None] | None,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.callback = callback
        self.interval_s = interval_s
        self.clock = clock
        self._state = Progress(0, 0, 0.0)
        self._counted_from = (0, clock())  # (frames done when this run started, its start time)
        self._lock = threading.Lock()  # serialises the callback and guards the state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, frames_done: int, frames_total: int) -> None:
        """Start counting the frame rate from ``frames_done`` (frames restored don't count)."""
        with self._lock:
            self._state = Progress(frames_done, max(frames_total, frames_done), 0.0)
            self._counted_from = (frames_done, self.clock())

    def update(self, *, frames_done: int | None = None, frames_total: int | None = None,
               stage: str | None = None) -> None:
        """Change the counters; the next report carries them."""
        with self._lock:
            s = self._state
            done = s.frames_done if frames_done is None else frames_done
            total = s.frames_total if frames_total is None else frames_total
            stage = s.stage if stage is None else stage
            new = max(done - self._counted_from[0], 0) if stage == "extract" else s.frames_new
            self._state = replace(s, frames_done=done, frames_total=max(total, done), stage=stage, frames_new=new)

    def report(self) -> None:
        """Call the callback now with the current counters (and the frame rate so far)."""
        if self.callback is None:
            return
        with self._lock:
            self.callback(self._snapshot())

    @property
    def current(self) -> Progress:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> Progress:
        """The state with ``fps``: frames of this run per second while extracting, else 0."""
        s = self._state
        if s.stage != "extract":
            return replace(s, fps=0.0)
        return replace(s, fps=s.frames_new / max(self.clock() - self._counted_from[1], 1e-9))

    def __enter__(self) -> ProgressReporter:
        if self.callback is not None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.report()
            except Exception as e:  # the caller's callback failing must not end the run's reports
                log.warning("progress callback failed: %s: %s", type(e).__name__, e)
