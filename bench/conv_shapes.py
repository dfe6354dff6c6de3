"""What a convolution network's first call at a new batch size costs on the host, against a call
at a size already seen: cuDNN builds (and PyTorch caches) an execution plan per input shape, so a
stage called with ever new batch sizes (MTCNN's R-Net and O-Net on however many boxes a batch
has, P-Net on however many keyframes) pays that again and again.

``python bench/conv_shapes.py --device cuda [--sizes 1 2 3 5 7 ...]``

For each network (MTCNN's P-Net on 384×216, the first pyramid level of a 640×360 keyframe;
R-Net; O-Net; ResNet-50 on 224² crops, the
Deep3D regressor's backbone, random weights) and each batch size: the wall time of the first
forward at that size, of a second one, and of a third in a new thread, each followed by a
synchronize (ms). PyTorch keeps cuDNN's plans per thread: where the new thread's call costs
what a first call does, a stage that runs in a new thread per input builds them all again.
Prints a markdown table; run it on the GPU it is about.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger(__name__)


def timed(fn, sync) -> float:
    """Milliseconds of ``fn()`` followed by ``sync()``."""
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


def networks(device: str):
    """(name, module, input shape without the batch axis) of each network measured."""
    import torch
    import torchvision
    from facenet_pytorch.models.mtcnn import MTCNN

    mtcnn = MTCNN(device=device)
    resnet = torchvision.models.resnet50(weights=None).to(device).eval()
    with torch.no_grad():
        return [("P-Net 384×216", mtcnn.pnet, (3, 216, 384)), ("R-Net 24²", mtcnn.rnet, (3, 24, 24)),
                ("O-Net 48²", mtcnn.onet, (3, 48, 48)), ("ResNet-50 224²", resnet, (3, 224, 224))]


def measure(device: str, sizes: list[int]) -> list[tuple[str, float, float, float]]:
    """(network, median ms of a first call at a new size, of a repeat, of a repeat in a new thread)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for name, net, shape in networks(device):
        with torch.inference_mode():
            net(torch.zeros((1, *shape), device=device))  # the network's own first-call costs
            sync()
            first, again, fresh = [], [], []
            for n in sizes:
                x = torch.zeros((n, *shape), device=device)
                first.append(timed(functools.partial(net, x), sync))
                again.append(timed(functools.partial(net, x), sync))
                fresh.append(in_new_thread(functools.partial(timed, functools.partial(net, x), sync)))
        rows.append((name, statistics.median(first), statistics.median(again), statistics.median(fresh)))
    return rows


def in_new_thread(fn):
    """``fn()`` run in a thread of its own (inference mode on there too), its result."""
    import torch

    out = []

    def run():
        with torch.inference_mode():
            out.append(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 6, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = measure(args.device, args.sizes)
    out = [f"device {args.device}, batch sizes {' '.join(map(str, args.sizes))}", "",
           "| network | first call at a new batch size (ms, median) | same size again | same size, new thread |",
           "|---|---:|---:|---:|"]
    out += [f"| {name} | {a:.2f} | {b:.2f} | {c:.2f} |" for name, a, b, c in rows]
    log.info("%s", "\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
