"""bench/cpu_topology.py: whole-core CPU sets for pinning, and the sibling probe, on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cpu_topology
from tests.conftest import REPO


def test_split_keeps_hyperthread_siblings_together_and_fills_a_node_first():
    # 2 nodes × 2 cores × 2 threads; siblings numbered c and c + 4, as many hosts do
    rows = [{"cpu": c, "package": str(c % 4 // 2), "core": str(c % 2), "node": c % 4 // 2} for c in range(8)]
    assert cpu_topology.whole_core_split(rows, 2) == [[0, 4, 1, 5], [2, 6, 3, 7]]
    assert cpu_topology.whole_core_split(rows, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_the_script_reports_this_machine_and_splits_its_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: nothing to split or to probe beside")
    run = [sys.executable, "bench/cpu_topology.py"]
    split = subprocess.run([*run, "--split", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert split.returncode == 0, split.stderr
    parts = [[int(c) for c in line.split(",")] for line in split.stdout.split()]
    assert len(parts) == 2 and not set(parts[0]) & set(parts[1]) and set(parts[0] + parts[1]) <= set(cpus)
    probe = subprocess.run([*run, "--probe", "--work-s", "0.05"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert f"{len(cpus)} CPUs" in probe.stdout
    speeds = probe.stdout.split("beside CPU j (1 = unaffected): ")[1].splitlines()[0].split()
    assert [int(s.split(":")[0]) for s in speeds] == cpus[1:]
