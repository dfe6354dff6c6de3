"""Registry commands of ``python -m engine``: ``worker``, ``submit``, ``jobs``, ``cancel``, ``retry``.

They call :mod:`db.service`, exactly as the dashboard does. Each command function returns
the process exit code. ``python -m worker.cli ...`` runs them without the engine's CLI.
A database that is locked, full, read-only or unreachable gives one worded line on stderr
(exit code 1), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("worker")


def _add_registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path,
                   help="uploads/results/database folder (default: $STUDIO_DATA_DIR or ./data)")
    p.add_argument("--db-url",
                   help="SQLAlchemy database URL (default: $STUDIO_DB_URL or sqlite in the data dir)")


def _registry(args: argparse.Namespace):
    from db import Registry

    return Registry(url=args.db_url, data_dir=args.data_dir)


def _registry_errors() -> tuple[type[BaseException], ...]:
    """What a registry command turns into one line: database errors, a bad schema, OS errors."""
    from sqlalchemy.exc import SQLAlchemyError

    from db import SchemaError

    return (SQLAlchemyError, SchemaError, OSError)


def _worded(e: BaseException, reg=None) -> str:
    """One line for a database or file-system error (see :func:`db.faults.describe`)."""
    from db import SchemaError, faults

    if isinstance(e, SchemaError):
        return str(e)
    if isinstance(e, OSError):  # reading an input, or making the data folder
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    log.debug("registry error", exc_info=e)
    return faults.describe(e, busy_timeout_s=getattr(reg, "busy_timeout_s", None))


def register(subparsers) -> None:
    """Add the registry subcommands to an ``argparse`` subparsers object."""
    from engine.cli import add_engine_options

    p = subparsers.add_parser("worker", help="serve the job queue on one device, every GPU, or a Ray cluster")
    p.add_argument("--gpu", type=int, metavar="N", help="run on cuda:N")
    p.add_argument("--gpus", metavar="all|N,M",
                   help="worker processes on every visible GPU (all) or on the listed GPUs, --per-gpu K each, "
                   "never a slot served twice")
    p.add_argument("--per-gpu", metavar="K",
                   help="with --gpus: worker processes per GPU, each with its own interpreter and CUDA context "
                   "(default: $STUDIO_PER_GPU, else auto: one per 4 CPU cores of each GPU's share, at most 4)")
    p.add_argument("--slot", type=int, metavar="S",
                   help="this worker's slot on its device, shown in its id as #S (set by --gpus and make run "
                   "when they start several workers per device)")
    p.add_argument("--device", help="cpu or cuda:N (default: cuda:0 when a GPU is visible, else cpu)")
    p.add_argument("--poll", type=float, default=2.0, metavar="SECONDS",
                   help="idle poll interval (default: 2)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--max-jobs", type=int, metavar="N", help="exit after N jobs")
    p.add_argument("--concurrency", type=int, default=2, metavar="N",
                   help="jobs the engine runs at once, sharing the loaded models (default: 2)")
    p.add_argument("--prefetch", type=int, default=2, metavar="N",
                   help="jobs claimed ahead beyond those running, so the next input is ready (default: 2)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for alignment and torch (default: each job's num_threads; "
                   "--gpus splits the cores between the workers)")
    p.add_argument("--decode-threads", type=int, metavar="N",
                   help="FFmpeg's threads for decoding each video, 0: FFmpeg's choice, one per CPU (default: "
                   "each job's setting; 1 when --gpus starts several workers, where it costs the fewest cycles)")
    p.add_argument("--heartbeat", type=float, default=2.0, metavar="S",
                   help="heartbeat interval of a running job, seconds (default: 2)")
    p.add_argument("--stale-after", type=float, default=30.0, metavar="S",
                   help="requeue running jobs whose heartbeat is older than S seconds (default: 30)")
    p.add_argument("--worker-id", help="name of this worker (default: <host>-<pid>-<device>[#<slot>])")
    p.add_argument("--pause", type=float, default=10.0, metavar="S",
                   help="first pause after a full or read-only disk, seconds; doubles while it lasts (default: 10)")
    p.add_argument("--max-pause", type=float, default=300.0, metavar="S",
                   help="longest such pause, seconds (default: 300)")
    _add_registry_options(p)
    from worker.ray_executor import add_arguments as add_ray_arguments

    add_ray_arguments(p)
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("submit", help="queue videos (or folders of videos) as jobs")
    p.add_argument("inputs", nargs="+", type=Path, metavar="VIDEO")
    add_engine_options(p)
    p.add_argument("--in-place", action="store_true",
                   help="register the files where they lie instead of copying them into the data dir")
    _add_registry_options(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", help="list jobs as a table")
    p.add_argument("--status", action="append", metavar="STATUS",
                   help="only these statuses (repeat or comma-separate): "
                   "queued,running,succeeded,failed,cancelled")
    p.add_argument("--search", help="name substring or job id")
    p.add_argument("--limit", type=int, default=50, help="rows to show (default: 50)")
    _add_registry_options(p)
    p.set_defaults(func=cmd_jobs)

    for name, func, text in (("cancel", cmd_cancel, "cancel a queued or running job"),
                             ("retry", cmd_retry, "queue a failed or cancelled job again")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("job_ids", nargs="+", type=int, metavar="ID")
        _add_registry_options(p)
        p.set_defaults(func=func)


# ------------------------------------------------------------------------------------------


def _pick_device(args: argparse.Namespace) -> str:
    """``--gpu N`` → ``cuda:N``; ``--device``; else ``cuda:0`` when a GPU is visible, else ``cpu``.

    Raises:
        SystemExit: both options given, or the named GPU does not exist here.
    """
    if args.gpu is not None and args.device:
        raise SystemExit("error: give --gpu or --device, not both")
    device = f"cuda:{args.gpu}" if args.gpu is not None else args.device
    if device == "cuda":
        device = "cuda:0"
    if device is not None and not device.startswith("cuda"):
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        return "cuda:0" if count else "cpu"
    index = int(device.split(":", 1)[1])
    if index >= count:
        raise SystemExit(f"error: {device} requested but this machine has {count} usable GPU(s)")
    return device


def cmd_worker(args: argparse.Namespace) -> int:
    if getattr(args, "executor", "local") == "ray":
        from worker.ray_executor import cmd_ray

        return cmd_ray(args)
    if getattr(args, "gpus", None):
        from worker.launch import cmd_gpus

        return cmd_gpus(args)
    if getattr(args, "per_gpu", None) is not None:
        print("error: --per-gpu needs --gpus (or make run / python -m worker.launch)", file=sys.stderr)
        return 2
    from worker.loop import Worker, WorkerOptions, default_worker_id

    try:
        device = _pick_device(args)
    except ValueError:
        print(f"error: bad device {args.device!r}: expected cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    if args.slot is not None and args.slot < 0:
        print(f"error: --slot must be 0 or more, got {args.slot}", file=sys.stderr)
        return 2
    worker_id = args.worker_id or default_worker_id(device, args.slot)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format=f"%(asctime)s %(levelname)s [{worker_id}] %(name)s: %(message)s",
        force=True,
    )
    try:
        options = WorkerOptions(
            device=device, poll_s=args.poll, heartbeat_s=args.heartbeat, stale_after_s=args.stale_after,
            burst=args.burst, max_jobs=args.max_jobs, pause_s=args.pause, max_pause_s=args.max_pause,
            concurrency=args.concurrency, prefetch=args.prefetch, num_threads=args.threads,
            decode_threads=args.decode_threads,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        from engine.limits import InputLimits

        InputLimits.from_env()  # a bad STUDIO_MAX_* variable: say so now, not on every job
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reg = None
    try:
        reg = _registry(args)
        return Worker(reg, options, worker_id=worker_id).work()
    except _registry_errors() as e:  # the registry cannot be opened or written: say so in one line
        print(f"error: the worker cannot run: {_worded(e, reg)}", file=sys.stderr)
        return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from db import LOCAL, service
    from engine.cli import config_from_args
    from engine.errors import StudioError

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        reg = _registry(args)
    except _registry_errors() as e:
        print(f"error: cannot open the job database: {_worded(e)}", file=sys.stderr)
        return 1
    failures = 0
    for path in args.inputs:
        refused: list[str] = []
        try:
            jobs = (service.import_folder(reg, path, cfg, actor=LOCAL, refused=refused) if path.is_dir()
                    else [service.submit_file(reg, path, cfg, copy=not args.in_place)])
        except (StudioError, ValueError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failures += 1
            continue
        except _registry_errors() as e:
            print(f"error: {path}: not queued: {_worded(e, reg)}", file=sys.stderr)
            failures += 1
            continue
        for reason in refused:
            print(f"error: {reason}", file=sys.stderr)
        failures += len(refused)
        for job in jobs:
            print(f"queued job {job.id}: {job.name}")
    return 1 if failures else 0


def _fmt_row(cols, widths) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()


def format_table(jobs) -> str:
    """The ``jobs`` table: id, name, status, progress %, fps, attempts, error."""
    header = ("ID", "NAME", "STATUS", "PROGRESS", "FPS", "ATTEMPTS", "ERROR")
    rows = []
    for j in jobs:
        name = j.name if len(j.name) <= 40 else "…" + j.name[-39:]
        progress = f"{100 * j.progress:.0f}%"
        if j.frames_total:
            progress += f" ({j.frames_done}/{j.frames_total})"
        status = j.status.value
        if j.cancel_requested and status == "running":
            status += " (cancelling)"
        fps = f"{j.fps:.1f}" if j.fps else "-"
        attempts = f"{j.attempts}/{j.max_attempts}"
        rows.append((j.id, name, status, progress, fps, attempts, (j.error or "")[:80]))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)] + [0]
    return "\n".join(_fmt_row(r, widths) for r in [header, *rows])


def cmd_jobs(args: argparse.Namespace) -> int:
    from db import JobStatus, WorkerStatus, service

    statuses = None
    if args.status:
        try:
            statuses = [JobStatus(s.strip()) for item in args.status for s in item.split(",") if s.strip()]
        except ValueError as e:
            print(f"error: {e}; known: {', '.join(s.value for s in JobStatus)}", file=sys.stderr)
            return 2
    reg = None
    try:
        reg = _registry(args)
        jobs = service.list_jobs(reg, statuses=statuses, search=args.search, limit=args.limit)
        total = service.count_jobs(reg, statuses=statuses, search=args.search)
        paused = [w for w in service.list_workers(reg) if w.alive and w.status == WorkerStatus.PAUSED]
    except _registry_errors() as e:
        print(f"error: cannot read the job database: {_worded(e, reg)}", file=sys.stderr)
        return 1
    print(format_table(jobs))
    if total > len(jobs):
        print(f"({len(jobs)} of {total} jobs shown; use --limit)")
    for w in paused:
        print(f"worker {w.worker_id} is {w.message or 'paused'}")
    return 0


def _each_job(args: argparse.Namespace, action, verb: str) -> int:
    from db import LOCAL, JobNotFound, JobStateError

    reg = None
    try:
        reg = _registry(args)
    except _registry_errors() as e:
        print(f"error: cannot open the job database: {_worded(e)}", file=sys.stderr)
        return 1
    failures = 0
    for job_id in args.job_ids:
        try:
            job = action(reg, job_id, actor=LOCAL)  # the shell user owns the registry's files anyway
        except (JobNotFound, JobStateError) as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        except _registry_errors() as e:
            print(f"error: job {job_id}: {_worded(e, reg)}", file=sys.stderr)
            failures += 1
            continue
        print(f"job {job.id}: {verb} ({job.status.value})")
    return 1 if failures else 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from db import service

    return _each_job(args, service.cancel_job, "cancel requested")


def cmd_retry(args: argparse.Namespace) -> int:
    from db import service

    return _each_job(args, service.retry_job, "queued again")


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.cli COMMAND ...`` (the same commands as ``python -m engine``)."""
    parser = argparse.ArgumentParser(prog="python -m worker.cli", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
