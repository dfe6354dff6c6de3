"""Which vCPUs share a physical core, as the kernel reports it and as a timing probe finds it.

Two workers pinned to CPU sets that are each other's hyperthreads run each other slower; a VM may
or may not say so in ``/sys``. This prints the kernel's view (package, core and NUMA node of each
CPU, the GPUs' NUMA nodes), and with ``--probe`` times a pure-Python loop on CPU 0 while the
same loop runs on CPU j, for each j: a sibling of CPU 0 shows as a speed well below 1.

``python bench/cpu_topology.py [--probe] [--split N]``; ``--split N`` prints only N CPU lists
(``taskset -c`` syntax, one per line) made of whole cores, by NUMA node where it can.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _node_of(cpu: int) -> int:
    found = sorted(SYS_CPU.glob(f"cpu{cpu}/node*"))
    return int(found[0].name[4:]) if found else 0


def cpu_table(cpus: list[int]) -> list[dict]:
    """Per CPU: its package, core id, NUMA node and the CPUs the kernel calls its siblings."""
    rows = []
    for c in cpus:
        top = SYS_CPU / f"cpu{c}" / "topology"
        rows.append({"cpu": c, "package": _read(top / "physical_package_id", "?"),
                     "core": _read(top / "core_id", str(c)), "node": _node_of(c),
                     "siblings": _read(top / "thread_siblings_list", str(c))})
    return rows


def whole_core_split(rows: list[dict], parts: int) -> list[list[int]]:
    """``parts`` CPU lists, each of whole cores (all siblings together), filled node by node; rows as
    :func:`cpu_table` makes them."""
    cores: dict[tuple, list[int]] = {}
    for r in sorted(rows, key=lambda r: (r["node"], r["cpu"])):
        cores.setdefault((r["node"], r["package"], r["core"]), []).append(r["cpu"])
    groups = list(cores.values())
    share = max(1, len(groups) // parts)
    return [[c for g in groups[i * share:(i + 1) * share] for c in g] for i in range(parts)]


def gpu_nodes() -> list[str]:
    """``<pci address>: node N`` for each NVIDIA display device (vendor 0x10de)."""
    out = []
    for dev in sorted(Path("/sys/bus/pci/devices").glob("*")):
        if _read(dev / "vendor") == "0x10de" and _read(dev / "class").startswith("0x03"):
            out.append(f"{dev.name}: node {_read(dev / 'numa_node', '?')}")
    return out


def _spin(cpu: int, n: int, start: float) -> float:
    os.sched_setaffinity(0, {cpu})
    while time.time() < start:
        pass
    t = time.perf_counter()
    s = 0
    for i in range(n):
        s += i * i % 7
    return time.perf_counter() - t


def probe(cpus: list[int], work_s: float) -> list[tuple[int, float]]:
    """CPU 0's speed with CPU j busy too, relative to CPU 0 alone, for each other j."""
    first = cpus[0]
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:  # every loop in a child, each pinned there (this process stays unpinned)
        n = 200_000
        while pool.apply(_spin, (first, n, 0)) < 0.05:
            n *= 2
        n = int(n * work_s / pool.apply(_spin, (first, n, 0)))
        alone = min(pool.apply(_spin, (first, n, 0)) for _ in range(3))
        speeds = []
        for j in cpus[1:]:
            start = time.time() + 0.05
            a = pool.apply_async(_spin, (first, n, start))
            pool.apply_async(_spin, (j, n, start)).get()
            speeds.append((j, alone / a.get()))
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", action="store_true", help="time CPU 0 beside each other CPU")
    ap.add_argument("--work-s", type=float, default=0.3, help="seconds of one probe alone")
    ap.add_argument("--split", type=int, metavar="N", help="print N whole-core CPU lists and exit")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    rows = cpu_table(cpus)
    if args.split:
        for part in whole_core_split(rows, args.split):
            print(",".join(map(str, part)))
        return
    cores = {(r["package"], r["core"]) for r in rows}
    print(f"{len(cpus)} CPUs, {len(cores)} cores, packages {sorted({r['package'] for r in rows})}, "
          f"NUMA nodes {sorted({r['node'] for r in rows})}; GPUs: {'; '.join(gpu_nodes()) or 'none'}")
    print("siblings as reported: " + " ".join(sorted({r["siblings"] for r in rows}, key=lambda s: int(
        s.replace("-", ",").split(",")[0]))))
    print("NUMA nodes: " + "; ".join(f"{n}: {_read(Path(f'/sys/devices/system/node/node{n}/cpulist'))}"
                                     for n in sorted({r["node"] for r in rows})))
    if args.probe:
        speeds = probe(cpus, args.work_s)
        print("CPU 0's speed beside CPU j (1 = unaffected): "
              + " ".join(f"{j}:{s:.2f}" for j, s in speeds))
        slow = [j for j, s in speeds if s < 0.8]
        print(f"slowed below 0.8 by: {slow or 'none'}")


if __name__ == "__main__":
    main()
