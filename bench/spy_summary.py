"""Read py-spy's collapsed stacks (``--format raw``, as ``bench/throughput.py --spy`` and
``bench/dataset.py --spy`` write them) and say where the time went, per kind of thread.

``python bench/spy_summary.py run.threads.txt [--match "engine worker"] [--top 8]``

Each line of the file is ``frame;frame;…;frame COUNT``, root first. With ``--subprocesses`` the
first frames name the processes (``process PID:"command line"``), with ``--threads`` the next
one the thread (``thread (TID): NAME``). Samples are kept from processes whose command line
contains ``--match`` (all when it is empty). Threads are grouped by name with digits dropped
(``Thread-12 (produce)`` and ``Thread-31 (produce)`` are one kind), and for each kind the
summary gives its share of the samples, then its leaf frames (where it was: running Python, or
waiting on a lock, a queue, a CUDA synchronize) and the functions of this project it spent its
time under, each as a share of that kind's samples. Native frames (py-spy's ``--native``, the
``cpu`` view of ``bench/dataset.py --spy-views``) end in a shared library, e.g.
``decode_slice (libavcodec.so.61)``: the summary then also gives, per kind, the library each
sample's leaf frame was in ("Python" for Python code).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

_PROCESS = re.compile(r'^process \d+:"(?P<cmd>.*)"$')
_THREAD = re.compile(r"^thread \(\w+\)(?::\s*(?P<name>.*))?$")
_OWN = ("engine/", "worker/", "db/", "bench/")  # this project's files, as py-spy prints their paths
_PATH = re.compile(r"\((?P<path>[^()]+?)(?::\d+)?\)$")
_SHARED = re.compile(r"\.so(\.\d+)*$")  # libavcodec.so.61, libc.so.6, x.cpython-312-x86_64-linux-gnu.so


@dataclass
class ThreadKind:
    """Samples of every thread of one kind (same name, digits dropped)."""

    samples: int = 0
    leaves: Counter = field(default_factory=Counter)
    own: Counter = field(default_factory=Counter)  # project functions anywhere in the stack (inclusive)
    libraries: Counter = field(default_factory=Counter)  # the leaf's shared library, or "Python"


def thread_kind(name: str) -> str:
    """``Thread-12 (produce)`` → ``Thread-N (produce)``; names without digits stay as they are.

    >>> thread_kind("Thread-12 (produce)"), thread_kind("engine")
    ('Thread-N (produce)', 'engine')
    """
    return re.sub(r"\d+", "N", name.strip()) or "?"


def frame_name(frame: str) -> str:
    """``fit_batch (engine/align.py:120)`` → ``fit_batch (engine/align.py)``: the function, without its line."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def is_own(frame: str) -> bool:
    """Whether ``frame`` is in a file of this project (not, say, ``sqlalchemy/engine/``).

    >>> is_own("run (engine/many.py:20)"), is_own("do_execute (sqlalchemy/engine/default.py:9)")
    (True, False)
    """
    m = _PATH.search(frame.strip())
    return m is not None and m["path"].startswith(_OWN)


def library(frame: str) -> str:
    """The shared library of a native frame, without version or ABI tag; "Python" for Python code.

    >>> library("decode_slice (libavcodec.so.61)"), library("0x7f12 (libc.so.6)")
    ('libavcodec', 'libc')
    >>> library("DOUBLE_add (numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so)")
    '_multiarray_umath'
    >>> library("fit_batch (engine/align.py:120)")
    'Python'
    """
    m = _PATH.search(frame.strip())
    if m is None or not _SHARED.search(m["path"]):
        return "Python"
    return _SHARED.sub("", m["path"].rsplit("/", 1)[-1]).split(".", 1)[0]


def summarize(lines, match: str = "") -> tuple[int, dict[str, ThreadKind]]:
    """(samples kept, {thread kind: its samples}) from the lines of a raw py-spy file."""
    kinds: dict[str, ThreadKind] = defaultdict(ThreadKind)
    total = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        commands = [m["cmd"] for f in frames if (m := _PROCESS.match(f))]
        if match and not any(match in c for c in commands):
            continue
        names = [m["name"] or "?" for f in frames if (m := _THREAD.match(f))]
        code = [f for f in frames if not _PROCESS.match(f) and not _THREAD.match(f)]
        n = int(count)
        total += n
        kind = kinds[thread_kind(names[-1]) if names else "?"]
        kind.samples += n
        kind.leaves[frame_name(code[-1]) if code else "(no Python frame)"] += n
        kind.libraries[library(code[-1]) if code else "Python"] += n
        for name in {frame_name(f) for f in code if is_own(f)}:
            kind.own[name] += n
    return total, dict(kinds)


def report(total: int, kinds: dict[str, ThreadKind], top: int = 8) -> str:
    if not total:
        return "no samples (wrong --match, or py-spy saw no process)"
    out = [f"{total} samples"]
    for name, kind in sorted(kinds.items(), key=lambda kv: -kv[1].samples):
        out.append(f"\n{name}: {kind.samples} samples, {100 * kind.samples / total:.1f} % of all")
        out += [f"    {100 * n / kind.samples:5.1f} %  at   {leaf}" for leaf, n in kind.leaves.most_common(top)]
        out += [f"    {100 * n / kind.samples:5.1f} %  under {fn}" for fn, n in kind.own.most_common(top)]
        if set(kind.libraries) != {"Python"}:  # native frames were sampled
            out += [f"    {100 * n / kind.samples:5.1f} %  in   {lib}" for lib, n in kind.libraries.most_common(top)]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path, help="a py-spy raw file (collapsed stacks)")
    ap.add_argument("--match", default="",
                    help='keep the processes whose command line contains this (e.g. "engine worker")')
    ap.add_argument("--top", type=int, default=8, help="frames listed per thread kind")
    args = ap.parse_args(argv)
    with open(args.file, encoding="utf-8", errors="replace") as f:
        print(report(*summarize(f, args.match), top=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
