"""Cancel latency of a real worker: from the moment a cancel is recorded to the moment the job is
``cancelled`` (engine stopped after its batch in flight, partial files removed), read from the
registry's own timestamps (``jobs.cancel_requested_at`` → ``jobs.finished_at``).

Starts ``python -m engine worker`` on a fresh registry, then ``--trials`` times submits the clip
with a random-weight checkpoint and MTCNN landmarks, waits until ``--after`` frames are done,
cancels it and waits for the worker to finish the cancel. The tests check the behaviour (the
engine stops after the batch in flight; the timestamps are recorded and ordered); the time it
takes on a given machine is measured here, never asserted. Usage::

    python bench/bench_cancel.py [--device cpu|cuda:0] [--batch-size 2] [--trials 5] [--clip PATH]

Prints a Markdown table for docs/PERFORMANCE.md (target: a cancel done within 2 s).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, TEST_CLIP, random_checkpoint
from db import LOCAL, JobStatus, Registry, service

TARGET_S = 2.0


def _wait(predicate, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    sys.exit(f"timed out after {timeout_s:.0f} s waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--after", type=int, default=4, help="frames done before the cancel")
    ap.add_argument("--threads", type=int, default=1, help="engine CPU threads (num_threads)")
    ap.add_argument("--clip", type=Path, default=TEST_CLIP)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "studio-bench-cancel")
    args = ap.parse_args()

    ckpt = random_checkpoint(args.workdir / "random_epoch_20.pth")
    data = Path(tempfile.mkdtemp(prefix="data-", dir=args.workdir))
    reg = Registry(data_dir=data)
    settings = {"landmarks": "mtcnn", "checkpoint": str(ckpt), "formats": ["npz"],
                "batch_size": args.batch_size, "num_threads": args.threads}
    log_path = data / "worker.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", "--device", args.device, "--data-dir", str(data),
             "--poll", "0.2"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        rows = []
        try:
            for trial in range(args.trials):
                job = service.submit_file(reg, args.clip, settings)
                _wait(lambda j=job: service.get_job(reg, j.id).frames_done >= args.after, 600,
                      f"job {job.id} to reach frame {args.after} (see {log_path})")
                running = service.cancel_job(reg, job.id, actor=LOCAL)
                _wait(lambda j=job: service.get_job(reg, j.id).status == JobStatus.CANCELLED, 600,
                      f"job {job.id} to be cancelled (see {log_path})")
                done = service.get_job(reg, job.id)
                latency = (done.finished_at - done.cancel_requested_at).total_seconds()
                batch_s = args.batch_size / running.fps if running.fps else float("nan")
                rows.append((latency, batch_s))
                print(f"trial {trial + 1}: cancel took {latency:.3f} s (batch of {args.batch_size} ≈ {batch_s:.3f} s)",
                      flush=True)
        finally:
            worker.terminate()
            worker.wait(120)
    latencies = [r[0] for r in rows]
    batches = [r[1] for r in rows]
    print(f"\nhost: {platform.node()} ({platform.processor() or platform.machine()}), device {args.device}, "
          f"batch {args.batch_size}, {args.threads} engine thread(s), load average {os.getloadavg()[0]:.2f}")
    print("| trials | batch | median batch s | median cancel s | max cancel s | within 2 s |")
    print("|---:|---:|---:|---:|---:|---|")
    worst = max(latencies)
    print(f"| {len(rows)} | {args.batch_size} | {statistics.median(batches):.3f} | "
          f"{statistics.median(latencies):.3f} | {worst:.3f} | {'yes' if worst <= TARGET_S else 'no'} |")


if __name__ == "__main__":
    main()
