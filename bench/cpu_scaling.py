"""How fast one busy process runs while N run at once: the host's CPU scaling.

A VM's vCPUs can be hyperthreads or shared cores: it reports them idle while the ones in use
already run slower. This starts N processes of the same fixed work (pure Python, then a
single-threaded numpy mix) for N = 1, 2, 4, ... up to the CPU count and prints each process's
speed relative to N = 1. ``python bench/cpu_scaling.py [--work-s 2]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def _python_work(n: int) -> float:
    t = time.perf_counter()
    s = 0
    for i in range(n):
        s += i * i % 7
    return time.perf_counter() - t


def _numpy_work(n: int) -> float:
    import numpy as np

    a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    t = time.perf_counter()
    for _ in range(n):
        a = np.tanh(a @ a.T * 1e-3) + a * 0.5
    return time.perf_counter() - t


def _calibrate(fn, target_s: float) -> int:
    n = 1000
    while fn(n) < 0.2:
        n *= 2
    return max(1, int(n * target_s / fn(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-s", type=float, default=2.0, help="seconds of work of one process alone")
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = sorted({1, *[2 ** k for k in range(1, cpus.bit_length()) if 2 ** k <= cpus], cpus})
    ctx = mp.get_context("spawn")
    print(f"{cpus} CPUs; each process's speed with N busy at once, relative to one alone")
    print("| work | " + " | ".join(f"N={n}" for n in counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for name, fn in (("pure Python", _python_work), ("numpy, 1 thread", _numpy_work)):
        n = _calibrate(fn, args.work_s)
        with ctx.Pool(cpus) as pool:
            alone = min(pool.map(fn, [n] * 1))
            cells = []
            for k in counts:
                times = pool.map(fn, [n] * k, chunksize=1)
                cells.append(f"{alone / (sum(times) / len(times)):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
