"""Put on ``PYTHONPATH`` by ``bench/dataset.py`` for the worker processes it starts, only when S3FD
has random weights (which find no face): once ``engine.pipeline`` is imported, the detector the
engine pairs with the ``fan`` backend is wrapped in ``bench.throughput.FixedBox`` (the box from
``$STUDIO_BENCH_FIXED_BOX``, ``x1,y1,x2,y2,score`` in full-frame pixels). The wrapped detector
still runs on every frame it is asked about, so its cost is measured. Nothing else changes.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder

BOX_ENV = "STUDIO_BENCH_FIXED_BOX"


class _PatchPipeline(MetaPathFinder):
    """Finds ``engine.pipeline`` as usual, and patches its ``Engine`` after the module has run."""

    def find_spec(self, name, path, target=None):
        if name != "engine.pipeline":
            return None
        sys.meta_path.remove(self)
        spec = PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            from bench.dataset import install_fixed_box

            install_fixed_box(module.Engine, os.environ[BOX_ENV])

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(BOX_ENV):
    sys.meta_path.insert(0, _PatchPipeline())
