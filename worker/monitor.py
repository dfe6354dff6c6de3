"""The heartbeat thread of a running job.

While the engine works in the worker's main thread, :class:`JobMonitor` runs beside it
with its own database sessions:

- every ``poll_s`` seconds it reads the job's cancel flag and ownership;
- it writes the latest progress at most every ``progress_s`` seconds when it changed,
  and a heartbeat at least every ``heartbeat_s`` seconds regardless.

The engine polls :meth:`JobMonitor.should_stop` before every batch. While the worker
registers the finished job (:meth:`JobMonitor.registering`) the heartbeat goes on, so a
registration that waits out a database lock does not make the job look abandoned.
"""

from __future__ import annotations

import logging
import threading
import time

from db import service
from db.registry import Registry

log = logging.getLogger(__name__)


class JobMonitor:
    """Heartbeat, progress and cancel watcher of one job.

    Args:
        reg: the registry (each call opens its own short session, safe from this thread).
        job_id, worker_id: the job and the worker that owns it.
        stop_event: set by the worker on SIGTERM; makes :meth:`should_stop` true as well.
        heartbeat_s: longest gap between two heartbeats (seconds).
        progress_s: shortest gap between two progress writes (seconds).
        poll_s: how often the cancel flag is read (seconds).
        wake: set (besides :attr:`cancel_requested` / :attr:`lost`) when a cancel or the loss of
            the job is seen, so a loop waiting on it reacts at once (the worker's claim loop).
    """

    def __init__(
        self,
        reg: Registry,
        job_id: int,
        worker_id: str,
        stop_event: threading.Event,
        *,
        heartbeat_s: float = 2.0,
        progress_s: float = 0.5,
        poll_s: float = 0.25,
        wake: threading.Event | None = None,
    ) -> None:
        self.reg = reg
        self.job_id = job_id
        self.worker_id = worker_id
        self.stop_event = stop_event
        self.heartbeat_s = heartbeat_s
        self.progress_s = progress_s
        self.poll_s = poll_s
        self.wake = wake
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._registering = threading.Event()
        self._lock = threading.Lock()
        self._progress: dict = {}
        self._dirty = False
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id}-monitor", daemon=True)

    # -- called from the worker's main thread ----------------------------------------------

    def start(self) -> JobMonitor:
        self._thread.start()
        return self

    def registering(self) -> None:
        """The job is being registered as finished: keep the heartbeat, but once the job is
        no longer running under this worker (it succeeded) stop quietly, without a last write."""
        self._registering.set()

    def stop(self) -> None:
        """Stop the thread (after one last progress write, if any is pending)."""
        self._done.set()
        self._thread.join(timeout=10)

    def update(self, *, frames_done: int | None = None, frames_total: int | None = None,
               fps: float | None = None, stage: str | None = None) -> None:
        """Record new progress; the thread writes it out (at most every ``progress_s``)."""
        with self._lock:
            for key, value in (("frames_done", frames_done), ("frames_total", frames_total),
                               ("fps", fps), ("stage", stage)):
                if value is not None:
                    self._progress[key] = value
            self._dirty = True

    def should_stop(self) -> bool:
        """True when the job must stop before its next batch: cancel, SIGTERM, or lost."""
        return self.cancel_requested.is_set() or self.lost.is_set() or self.stop_event.is_set()

    @property
    def progress(self) -> dict:
        with self._lock:
            return dict(self._progress)

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake.set()

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        last_write = time.monotonic()
        while True:
            finishing = self._done.wait(self.poll_s)
            if finishing and self._registering.is_set():
                return
            now = time.monotonic()
            with self._lock:
                dirty, progress = self._dirty, dict(self._progress)
            try:
                if (dirty and now - last_write >= self.progress_s) or now - last_write >= self.heartbeat_s \
                        or (finishing and dirty):
                    with self._lock:
                        self._dirty = False
                    ctrl = service.report_progress(self.reg, self.job_id, self.worker_id, **progress)
                    last_write = now
                elif not finishing:
                    ctrl = service.read_control(self.reg, self.job_id, self.worker_id)
                else:
                    return
            except Exception as e:  # a missed heartbeat is not fatal; the next one may work
                log.warning("job %d: heartbeat failed: %s: %s", self.job_id, type(e).__name__, e)
                if finishing:
                    return
                continue
            if not ctrl.owned and self._registering.is_set():
                return  # registered meanwhile (or taken away: the registration says which)
            # Each flag is set before its line is logged: a reader of the log can rely on the flag.
            if not ctrl.owned and not self.lost.is_set():
                self.lost.set()
                log.warning("job %d is no longer ours (requeued or deleted elsewhere): stopping", self.job_id)
                self._wake()
            if ctrl.cancel_requested and not self.cancel_requested.is_set():
                self.cancel_requested.set()
                log.info("job %d: cancel requested", self.job_id)
                self._wake()
            if finishing:
                return
