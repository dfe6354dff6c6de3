"""The one place where the worker hands its jobs to the engine: :func:`run_jobs`.

The worker's claim loop fills a queue; the engine pulls :class:`InputJob` s from it lazily
and hands back one :class:`InputOutcome` per job, in completion order (both from
:mod:`engine.many`). A real engine runs them through ``Engine.run_many``; an engine with only
``run`` through :func:`run_in_threads`, a small thread pool on the one engine.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator

from engine.many import InputJob, InputOutcome
from engine.pipeline import Progress

log = logging.getLogger(__name__)


def run_jobs(engine, jobs: Iterable[InputJob], *, concurrency: int) -> Iterator[InputOutcome]:
    """Run ``jobs`` (pulled lazily, possibly blocking until the next one is claimed) on ``engine``,
    up to ``concurrency`` at once; yields each one's outcome as it ends. The iterator ends once
    ``jobs`` is exhausted and every job pulled from it has ended.

    Each job fails alone: its error is in its outcome, never raised here. The engine's
    many-inputs pipeline (:meth:`engine.pipeline.Engine.run_many`: one GPU batch can hold
    crops of several jobs) when it has one; an injected engine with only ``run`` (the tests'
    scripted engines) goes through :func:`run_in_threads`.
    """
    run_many = getattr(engine, "run_many", None)
    if run_many is not None:
        return run_many(jobs, concurrency=concurrency)
    return run_in_threads(engine, jobs, concurrency=concurrency)


def run_in_threads(engine, jobs: Iterable[InputJob], *, concurrency: int) -> Iterator[InputOutcome]:
    """:func:`run_jobs` without ``engine.run_many``: ``engine.run`` in up to ``concurrency`` threads.

    A job is pulled from ``jobs`` only when a thread is free for it, so nothing waits inside
    here that the caller still holds. The first job runs alone until it has reported frames
    (the engine loads its models on its first run; several at once would each load them);
    then up to ``concurrency`` share the engine.
    """
    outcomes: queue.Queue = queue.Queue()
    done = object()
    cond = threading.Condition()
    state = {"running": 0, "warm": False}

    def run_one(job: InputJob) -> None:
        def progress(p: Progress) -> None:
            if p.frames_done > 0 and not state["warm"]:
                with cond:
                    state["warm"] = True
                    cond.notify_all()
            if job.progress is not None:
                job.progress(p)

        report = error = None
        try:
            report = engine.run(job.source, job.out_base, progress=progress, should_stop=job.should_stop,
                                state_dir=job.state_dir)
        except BaseException as e:  # the job's own: handed back in its outcome
            error = e
        with cond:
            state["running"] -= 1
            state["warm"] = state["warm"] or report is not None
            cond.notify_all()
        outcomes.put(InputOutcome(job, report, error))

    def feed() -> None:
        threads: list[threading.Thread] = []
        it = iter(jobs)
        try:
            while True:
                with cond:
                    cond.wait_for(lambda: state["running"] < concurrency
                                  and (state["warm"] or state["running"] == 0))
                try:
                    job = next(it)
                except StopIteration:
                    break
                with cond:
                    state["running"] += 1
                t = threading.Thread(target=run_one, args=(job,), name=f"input-{job.key}", daemon=True)
                t.start()
                threads = [x for x in threads if x.is_alive()] + [t]
        except Exception:  # the job source itself broke: no more jobs, the running ones still end
            log.exception("the job feed failed")
        for t in threads:
            t.join()
        outcomes.put(done)

    threading.Thread(target=feed, name="input-feed", daemon=True).start()
    while (item := outcomes.get()) is not done:
        yield item

