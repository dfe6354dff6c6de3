"""Serve the job queue on a Ray cluster: ``python -m engine worker --executor ray --address ...``.

Ray does the placement and the retries; the registry (PostgreSQL on a cluster) stays the
one record of every job, so the dashboard shows cluster jobs like local ones.

- **GPU workers**: the driver starts a pool of :class:`GpuWorker` actors, each asking Ray
  for ``gpus_per_task`` GPUs (or custom resources). An actor is a long-lived Ray worker
  process that keeps one engine loaded from video to video, exactly like a local worker
  (it *is* a :class:`worker.loop.Worker`, registered in the ``workers`` table with its
  host, pid and GPU). Each video is one actor task: ``run(job_id)``.
- **Claims**: the driver claims queued jobs with the same :func:`db.service.claim_next`
  as local workers (so both can share one queue), one per idle actor, and sends the job
  id to that actor. The actor adopts the job (:func:`db.service.adopt_job`: its
  ``worker_id`` becomes ``<driver id>/<host>-<pid>-<gpu>``) and runs
  :meth:`worker.loop.Worker.perform`: heartbeat and progress from the actor, resume from
  ``work/<id>/``, outputs and artifacts under ``results/<id>/``, cancel, failures.
- **Lost workers**: when an actor's process or node dies mid-video, Ray restarts the actor
  (``max_restarts``) and retries the task (``max_task_retries``); the new process adopts
  the job from the lost one (one more attempt counted), resumes from the saved state and
  finishes the job once. Ordinary job failures are not Ray errors and are never retried.
  Only when Ray gives up does the driver requeue (or fail) the job itself.
- **Stop**: the first SIGTERM/SIGINT stops claiming and asks busy actors to stop after
  their batch (their jobs go back to the queue, no attempt counted); a second one exits
  at once (the jobs are then recovered by any janitor after ``stale_after_s``).

``import ray`` happens only inside :func:`connect` and the actor, so nothing else in the
project needs Ray installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from db import service
from db.models import ErrorCode, JobStatus, WorkerStatus
from db.registry import Registry
from worker.loop import Worker, WorkerOptions, device_name, install_stop_handlers

log = logging.getLogger("worker.ray")

#: Packages shipped to the cluster's workers with the job (``runtime_env["py_modules"]``).
SHIPPED_PACKAGES = ("engine", "db", "worker")


class RayExecutorError(RuntimeError):
    """The Ray executor cannot start (no Ray, no cluster, no GPU, a registry the cluster cannot reach)."""


@dataclass(frozen=True)
class RayOptions:
    """How the Ray driver runs. Times are seconds.

    Attributes:
        address: ``"auto"`` (the cluster this machine belongs to, or the one ``ray job
            submit`` runs in), ``"ray://host:10001"`` (Ray Client), ``"host:6379"`` (a GCS
            address), ``"local"`` (start a private one-machine Ray for this run), or None
            (Ray is already initialised in this process: tests).
        gpus_per_task: GPUs each GPU worker asks for (0: none, e.g. with ``resources``).
        cpus_per_task: CPUs each GPU worker asks for (decoding and alignment threads).
        resources: extra custom resources per GPU worker, e.g. ``{"fake_gpu": 1}``.
        max_in_flight: number of GPU workers (= videos in flight); None: as many as the
            cluster's resources fit at start. More than fit wait for an autoscaler.
        max_retries: how often Ray restarts a lost GPU worker and retries its video.
        ship_code: send the ``engine``/``db``/``worker`` packages with the job, so the
            cluster's nodes need only the dependencies installed.
        worker: poll/heartbeat/janitor/burst/max-jobs settings (``device`` is ignored:
            each GPU worker runs on the GPU Ray gives it).
    """

    address: str | None = "auto"
    gpus_per_task: float = 1.0
    cpus_per_task: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)
    max_in_flight: int | None = None
    max_retries: int = 3
    ship_code: bool = True
    worker: WorkerOptions = field(default_factory=WorkerOptions)

    def __post_init__(self) -> None:
        if self.gpus_per_task < 0 or self.cpus_per_task < 0:
            raise ValueError(
                f"gpus/cpus per task must be >= 0, got {self.gpus_per_task} and {self.cpus_per_task}"
            )
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        bad = {k: v for k, v in self.resources.items() if not isinstance(v, int | float) or v <= 0}
        if bad:
            raise ValueError(f"resources must map names to positive amounts, got {bad}")

    def demand(self) -> dict[str, float]:
        """Resources one GPU worker asks Ray for (only the non-zero ones)."""
        out = {"GPU": float(self.gpus_per_task), "CPU": float(self.cpus_per_task)}
        out.update({k: float(v) for k, v in self.resources.items()})
        return {k: v for k, v in out.items() if v > 0}


def parse_resources(text: str | None) -> dict[str, float]:
    """``'{"fake_gpu": 1}'`` → ``{"fake_gpu": 1.0}``; ValueError with the reason otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--resources: expected a JSON object like '{{\"fake_gpu\": 1}}', got {text!r} ({e})") from e
    if not isinstance(value, dict) or not all(isinstance(v, int | float) for v in value.values()):
        raise ValueError(f"--resources: expected a JSON object of numbers, got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


# ============================================================================ the GPU worker (actor)


class _ActorWorker(Worker):
    """A :class:`Worker` whose registry row shows the physical GPU and the Ray node."""

    def __init__(self, reg: Registry, options: WorkerOptions, *, worker_id: str, label: str, name: str) -> None:
        super().__init__(reg, options, worker_id=worker_id)
        self.label, self.name = label, name

    def register(self) -> None:
        service.register_worker(
            self.reg, self.worker_id, hostname=socket.gethostname(), pid=os.getpid(), device=self.label,
            device_name=self.name,
        )
        log.info("GPU worker started on %s (%s), registry %r", self.label, self.name, self.reg)


class GpuWorker:
    """One Ray actor = one Ray worker process holding its GPU(s); runs one video per :meth:`run` call.

    Made a Ray actor class by :func:`actor_class`. On a restart after its process was lost,
    Ray calls ``__init__`` again (a new pid, so a new worker id) and then retries the
    pending :meth:`run`, which adopts the job from the lost process.

    Args:
        db_url: the registry's database URL (every node must reach it).
        data_dir: the shared data folder, mounted at this path on every node.
        dispatcher: the driver's id; this worker's id is ``f"{dispatcher}/<host>-<pid>-<gpu>"``.
        options: heartbeat/progress/cancel settings.
    """

    def __init__(self, db_url: str, data_dir: str, dispatcher: str, options: WorkerOptions) -> None:
        import ray

        gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        if gpu_ids:
            # Ray limits CUDA_VISIBLE_DEVICES to the GPUs it gave us, so ours is cuda:0 here
            # (unless told not to touch the variable).
            keep_all = os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")
            engine_device = f"cuda:{gpu_ids[0]}" if keep_all else "cuda:0"
            label = "cuda:" + ",".join(gpu_ids)
        else:
            engine_device, label = "cpu", "cpu"
        host, pid = socket.gethostname(), os.getpid()
        worker_id = f"{dispatcher}/{host}-{pid}-{label.replace(':', '').replace(',', '-')}"
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s %(levelname)s [{worker_id}] %(name)s: %(message)s", force=True
        )
        self.dispatcher = dispatcher
        self.reg = Registry(url=db_url, data_dir=data_dir)
        self.worker = _ActorWorker(
            self.reg, dataclasses.replace(options, device=engine_device), worker_id=worker_id, label=label,
            name=f"{device_name(engine_device)} via Ray",
        )
        self.worker.register()

    def info(self) -> dict:
        """Who this worker is: ``worker_id``, ``hostname``, ``pid``, ``device``."""
        return {"worker_id": self.worker.worker_id, "hostname": socket.gethostname(), "pid": os.getpid(),
                "device": self.worker.label}

    def run(self, job_id: int, claimed_at: datetime | None = None) -> dict:
        """Adopt and run one claimed job (``claimed_at``: the claim's ``started_at``) to a final
        (or requeued) state.

        Returns ``{"job_id", "worker_id", "adopted", "status", "attempts"}``; job failures
        are recorded on the job, never raised (so Ray never retries them).
        """
        wid = self.worker.worker_id
        adoption = service.adopt_job(self.reg, job_id, wid, dispatcher=self.dispatcher, device=self.worker.label,
                                     claimed_at=claimed_at)
        if adoption is None:
            log.warning("job %d no longer runs for this driver (requeued, cancelled or given up): skipped", job_id)
            view = service.get_job(self.reg, job_id)
            return {"job_id": job_id, "worker_id": wid, "adopted": False, "status": view.status.value,
                    "attempts": view.attempts}
        job = adoption.job
        if adoption.retried:
            log.warning("job %d: retried by Ray, attempt %d of %d (%s)", job_id, job.attempts, job.max_attempts,
                        adoption.note)
        self.worker.perform(job)
        self.worker.jobs_seen += 1
        view = service.get_job(self.reg, job_id)
        return {"job_id": job_id, "worker_id": wid, "adopted": True, "status": view.status.value,
                "attempts": view.attempts}

    def request_stop(self) -> None:
        """Warm stop: the running job stops after its batch and goes back to the queue."""
        self.worker.request_stop()

    def close(self) -> None:
        """Unload the engine and mark this worker stopped in the registry."""
        self.worker.teardown()
        self.reg.close()


def actor_class(options: RayOptions):
    """:class:`GpuWorker` as a Ray actor class with the resources and retry policy of ``options``.

    ``max_concurrency=2`` lets :meth:`GpuWorker.request_stop` run while :meth:`GpuWorker.run`
    works (the driver never sends two videos to one actor at once).
    """
    import ray

    custom = {k: v for k, v in options.resources.items() if k not in ("GPU", "CPU")}
    return ray.remote(GpuWorker).options(
        num_gpus=options.gpus_per_task, num_cpus=options.cpus_per_task, resources=custom or None,
        max_restarts=options.max_retries, max_task_retries=options.max_retries, max_concurrency=2,
    )


# ============================================================================ the driver


def connect(options: RayOptions):
    """Import Ray and connect to (or start) the cluster; returns the ``ray`` module.

    Raises:
        RayExecutorError: Ray is not installed, or no cluster answers at the address.
    """
    try:
        import ray
    except ImportError as e:
        raise RayExecutorError(
            "the Ray executor needs Ray: pip install -r requirements-ray.txt"
        ) from e
    if options.address is None:
        if not ray.is_initialized():
            raise RayExecutorError("address=None means Ray is already initialised here, but it is not")
        return ray
    runtime_env = None
    if options.ship_code:
        # Package folders (not module objects: Ray Client cannot pickle those).
        runtime_env = {"py_modules": [str(Path(sys.modules[name].__file__).parent)
                                      for name in _import_all(SHIPPED_PACKAGES)]}
    kwargs = {"runtime_env": runtime_env, "log_to_driver": True}
    try:
        if options.address == "local":
            ray.init(include_dashboard=False, **kwargs)
        else:
            ray.init(address=options.address, **kwargs)
    except Exception as e:  # ConnectionError, RuntimeEnvSetupError, auth errors...: all mean "cannot start"
        hint = ("start one with `ray start --head` on the head node, use --address ray://<head>:10001, "
                "or --address local for this machine alone")
        raise RayExecutorError(f"no Ray cluster at {options.address!r}: {str(e).splitlines()[0]}; {hint}") from e
    return ray


def _import_all(names) -> list[str]:
    import importlib

    for name in names:
        importlib.import_module(name)
    return list(names)


def pool_size(options: RayOptions, cluster: dict[str, float]) -> int:
    """How many GPU workers to start: ``max_in_flight``, else as many as ``cluster`` resources fit.

    Raises:
        RayExecutorError: not even one fits (no GPU in the cluster, say).
    """
    if options.max_in_flight is not None:
        return options.max_in_flight
    demand = options.demand()
    if not demand:
        raise RayExecutorError("each GPU worker asks for nothing: give --gpus-per-task, --cpus-per-task or "
                               "--resources, or set --max-in-flight")
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in demand.items())
    if fits < 1:
        short = ", ".join(f"{k}: needs {v:g}, cluster has {cluster.get(k, 0.0):g}" for k, v in demand.items()
                          if cluster.get(k, 0.0) < v)
        raise RayExecutorError(
            f"the Ray cluster cannot hold one GPU worker ({short}): add GPU nodes, lower --gpus-per-task, "
            "or set --max-in-flight to wait for an autoscaler"
        )
    return fits


@dataclass
class _Slot:
    """A GPU worker actor as the driver sees it."""

    handle: object
    state: str = "starting"  #: starting | idle | busy
    ref: object = None  #: the pending ``info()`` (starting) or ``run()`` (busy) call
    job_id: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def worker_id(self) -> str | None:
        return self.info.get("worker_id")


class RayDriver:
    """Claims jobs from the registry and runs them on a pool of :class:`GpuWorker` actors.

    Args:
        reg: the registry (the actors open their own, from ``reg.url`` and ``reg.data_dir``).
        options: see :class:`RayOptions`.
        driver_id: this driver's worker id (default ``ray-<host>-<pid>``); it prefixes the
            ids of its GPU workers.
    """

    def __init__(self, reg: Registry, options: RayOptions | None = None, *, driver_id: str | None = None) -> None:
        self.reg = reg
        self.options = options or RayOptions()
        self.driver_id = driver_id or f"ray-{socket.gethostname()}-{os.getpid()}"
        self.stop_event = threading.Event()
        self.slots: list[_Slot] = []
        self.dispatched = 0
        self._signals = 0
        self._stop_sent = False
        self._last_beat = 0.0
        self._queue_empty = False
        self._start_failures: list[str] = []

    # ------------------------------------------------------------------ life

    def run(self) -> int:
        """Serve the queue until a stop condition; returns the process exit code."""
        opts = self.options.worker
        ray = connect(self.options)
        restore = self._install_signal_handlers()
        started_ray = self.options.address is not None
        try:
            service.register_worker(
                self.reg, self.driver_id, hostname=socket.gethostname(), pid=os.getpid(), device="ray",
                device_name=f"Ray driver ({self.options.address or 'in-process'})",
            )
            self._check_reachable(ray)
            size = pool_size(self.options, ray.cluster_resources())
            cls = actor_class(self.options)
            for _ in range(size):
                self._spawn(cls)
            log.info("Ray driver %s: %d GPU worker(s), each asking %s; registry %r", self.driver_id, size,
                     self.options.demand(), self.reg)
            return self._loop(ray, cls, opts)
        finally:
            self._teardown(ray, hard=self._signals > 1)
            if started_ray:
                ray.shutdown()
            restore()

    def _check_reachable(self, ray) -> None:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        remote = str(self.options.address or "").startswith("ray://")
        if self.reg.is_sqlite and (len(nodes) > 1 or remote):
            raise RayExecutorError(
                f"the registry is SQLite ({self.reg.url}) but the Ray cluster has {len(nodes)} node(s)"
                f"{' behind Ray Client' if remote else ''}: set STUDIO_DB_URL (or --db-url) to a PostgreSQL "
                "database every node can reach"
            )

    def _spawn(self, cls) -> None:
        handle = cls.remote(self.reg.url, str(self.reg.data_dir), self.driver_id, self.options.worker)
        self.slots.append(_Slot(handle=handle, ref=handle.info.remote()))

    def _loop(self, ray, cls, opts: WorkerOptions) -> int:
        waited_since = time.monotonic()
        while True:
            stopping = self.stop_event.is_set()
            busy = [s for s in self.slots if s.state == "busy"]
            if stopping and not self._stop_sent:
                self._stop_sent = True
                log.info("stop requested: no new jobs; %d running job(s) stop after their batch", len(busy))
                for s in busy:
                    s.handle.request_stop.remote()
            if stopping and not busy:
                log.info("stop requested: exiting (warm shutdown)")
                return 0
            if not self.slots:
                log.error("no GPU worker could start: %s", "; ".join(self._start_failures[-3:]) or "unknown reason")
                return 1
            self._housekeeping(opts)
            limit_reached = opts.max_jobs is not None and self.dispatched >= opts.max_jobs
            if not stopping and not limit_reached:
                self._dispatch()
            if not any(s.state == "busy" for s in self.slots):
                if limit_reached:
                    log.info("dispatched %d job(s): exiting (max jobs)", self.dispatched)
                    return 0
                if opts.burst and self._queue_empty:
                    log.info("queue empty: exiting (burst mode)")
                    return 0
            pending = [s.ref for s in self.slots if s.state in ("starting", "busy")]
            if not pending:
                self.stop_event.wait(opts.poll_s)
                continue
            ready, _ = ray.wait(pending, num_returns=1, timeout=opts.poll_s)
            if ready:
                ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
                waited_since = time.monotonic()
            elif all(s.state == "starting" for s in self.slots) and time.monotonic() - waited_since > 60:
                log.warning("still waiting for Ray to place %d GPU worker(s) asking %s each", len(self.slots),
                            self.options.demand())
                waited_since = time.monotonic()
            done = set(ready)
            for slot in [s for s in self.slots if s.ref is not None and s.ref in done]:
                self._collect(ray, cls, slot)

    def _housekeeping(self, opts: WorkerOptions) -> None:
        """Janitor (requeue jobs with stale heartbeats) and heartbeats of the driver and idle workers."""
        try:
            service.requeue_stale(self.reg, stale_after_s=opts.stale_after_s)
        except Exception as e:  # never let housekeeping kill the driver
            log.warning("janitor failed: %s: %s", type(e).__name__, e)
        now = time.monotonic()
        if now - self._last_beat < opts.heartbeat_s:
            return
        self._last_beat = now
        busy = any(s.state == "busy" for s in self.slots)
        ids = [(self.driver_id, WorkerStatus.BUSY if busy else WorkerStatus.IDLE)]
        ids += [(s.worker_id, WorkerStatus.IDLE) for s in self.slots if s.state == "idle" and s.worker_id]
        for wid, status in ids:
            try:
                service.worker_heartbeat(self.reg, wid, status=status, current_job_id=None)
            except Exception as e:
                log.warning("heartbeat of %s failed: %s", wid, e)

    def _dispatch(self) -> None:
        self._queue_empty = False
        for slot in [s for s in self.slots if s.state == "idle"]:
            if self.options.worker.max_jobs is not None and self.dispatched >= self.options.worker.max_jobs:
                return
            try:
                job = service.claim_next(self.reg, self.driver_id, device="ray")
            except Exception as e:  # database unreachable for a moment: try again later
                log.warning("could not claim a job: %s: %s", type(e).__name__, e)
                return
            if job is None:
                self._queue_empty = True
                return
            slot.state, slot.job_id = "busy", job.id
            slot.ref = slot.handle.run.remote(job.id, job.started_at)
            self.dispatched += 1
            log.info("job %d (%s) → %s", job.id, job.name, slot.worker_id)

    def _collect(self, ray, cls, slot: _Slot) -> None:
        """Take the result of a finished ``info()`` or ``run()`` call of ``slot``."""
        from ray.exceptions import RayActorError, RayError, RayTaskError

        ref, job_id, starting = slot.ref, slot.job_id, slot.state == "starting"
        slot.ref, slot.job_id = None, None
        try:
            result = ray.get(ref)
        except RayTaskError as e:  # an exception inside the actor method (not a lost process)
            if starting:
                self._drop(ray, slot, f"GPU worker failed to start: {_first_line(e)}")
                return
            cause = getattr(e, "cause", None)
            message = f"{type(cause).__name__}: {_first_line(cause)}" if cause else _first_line(e)
            self._give_up(job_id, message, fail=True)
            slot.state = "idle"
            return
        except (RayActorError, RayError) as e:  # the actor is gone for good (Ray's restarts are used up)
            reason = f"Ray lost the GPU worker {slot.worker_id or '(starting)'}: {_first_line(e)}"
            if job_id is not None:
                self._give_up(job_id, reason)
            self._drop(ray, slot, reason)
            if not self.stop_event.is_set() and not starting:
                self._spawn(cls)
            return
        if starting:
            slot.info, slot.state = dict(result), "idle"
            log.info("GPU worker ready: %s on %s (%s)", slot.worker_id, result["hostname"], result["device"])
            return
        slot.info["worker_id"] = result["worker_id"]  # a restarted actor has a new id
        slot.state = "idle"
        log.info("job %d: %s (attempt %d) on %s", job_id, result["status"], result["attempts"],
                 result["worker_id"])

    def _drop(self, ray, slot: _Slot, reason: str) -> None:
        log.error("%s", reason)
        self._start_failures.append(reason)
        self.slots.remove(slot)
        with contextlib.suppress(Exception):  # already dead
            ray.kill(slot.handle, no_restart=True)

    def _give_up(self, job_id: int, reason: str, *, fail: bool = False) -> None:
        """Requeue (or fail) a job whose Ray call ended without a verdict, if it still runs for us."""
        try:
            job = service.get_job(self.reg, job_id)
        except service.JobNotFound:
            return
        owner = job.worker_id or ""
        if job.status != JobStatus.RUNNING or not self._ours(owner):
            return
        if fail or job.attempts >= job.max_attempts:
            message = reason if fail else service.give_up_message(job.attempts, reason)
            code = ErrorCode.INTERNAL if fail else ErrorCode.ABANDONED
            service.fail_job(self.reg, job_id, owner, error=message, code=code)
            log.error("job %d failed: %s", job_id, message)
        else:
            service.requeue_job(self.reg, job_id, owner, reason=reason, penalty=True)
            log.warning("job %d requeued: %s", job_id, reason)

    def _ours(self, worker_id: str | None) -> bool:
        """True for this driver's id and its GPU workers' ids (``<driver id>/...``)."""
        return bool(worker_id) and (worker_id == self.driver_id or worker_id.startswith(f"{self.driver_id}/"))

    def _teardown(self, ray, *, hard: bool) -> None:
        live = [s for s in self.slots if s.state in ("idle", "busy")]
        if not hard and live:
            try:
                ray.get([s.handle.close.remote() for s in live], timeout=60)
            except Exception as e:  # the process is leaving anyway
                log.warning("could not close every GPU worker: %s", _first_line(e))
        for s in self.slots:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(s.handle, no_restart=True)
        self.slots.clear()
        try:  # every GPU worker of this driver is gone now, including any lost or still starting
            for w in service.list_workers(self.reg):
                if w.stopped_at is None and self._ours(w.worker_id):
                    service.stop_worker(self.reg, w.worker_id)
        except Exception as e:
            log.warning("could not mark the driver and its GPU workers stopped: %s", e)
        log.info("Ray driver stopped after %d job(s)", self.dispatched)

    # ------------------------------------------------------------------ signals

    def request_stop(self) -> None:
        """Warm shutdown: claim nothing more; running jobs stop after their batch and are requeued."""
        self.stop_event.set()

    def _install_signal_handlers(self) -> Callable[[], None]:
        return install_stop_handlers(self, "stopping after the running batches")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# ============================================================================ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``worker`` subcommand's Ray options."""
    g = p.add_argument_group("Ray executor (--executor ray)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process serves one device (default); ray: a driver that runs every "
                   "video as a task on a Ray cluster")
    g.add_argument("--address", default="auto",
                   help="Ray cluster: auto (default), ray://HEAD:10001, HOST:6379, or local (a private "
                   "one-machine Ray)")
    g.add_argument("--gpus-per-task", type=float, default=1.0, metavar="N",
                   help="GPUs each Ray GPU worker asks for (default: 1)")
    g.add_argument("--cpus-per-task", type=float, default=1.0, metavar="N",
                   help="CPUs each Ray GPU worker asks for (default: 1)")
    g.add_argument("--resources", metavar="JSON",
                   help='extra custom Ray resources per GPU worker, e.g. \'{"fake_gpu": 1}\'')
    g.add_argument("--max-in-flight", type=int, metavar="N",
                   help="videos in flight = Ray GPU workers (default: as many as the cluster fits)")
    g.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="times Ray restarts a lost GPU worker and retries its video (default: 3)")
    g.add_argument("--no-ship-code", action="store_true",
                   help="don't send engine/db/worker with the job (the nodes have them installed)")


def cmd_ray(args: argparse.Namespace) -> int:
    """``python -m engine worker --executor ray ...``"""
    if args.gpu is not None or args.device or getattr(args, "gpus", None) or getattr(args, "per_gpu", None):
        print("error: with --executor ray the cluster picks the GPUs: use --gpus-per-task / --resources, "
              "not --gpu, --device, --gpus or --per-gpu", file=sys.stderr)
        return 2
    try:
        options = RayOptions(
            address=args.address,
            gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
            resources=parse_resources(args.resources), max_in_flight=args.max_in_flight,
            max_retries=args.max_retries, ship_code=not args.no_ship_code,
            worker=WorkerOptions(poll_s=args.poll, heartbeat_s=args.heartbeat, stale_after_s=args.stale_after,
                                 burst=args.burst, max_jobs=args.max_jobs),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    driver_id = args.worker_id or f"ray-{socket.gethostname()}-{os.getpid()}"
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format=f"%(asctime)s %(levelname)s [{driver_id}] %(name)s: %(message)s", force=True,
    )
    from db import Registry

    reg = Registry(url=args.db_url, data_dir=Path(args.data_dir) if args.data_dir else None)
    try:
        return RayDriver(reg, options, driver_id=driver_id).run()
    except RayExecutorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
