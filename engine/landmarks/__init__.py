"""Landmark backends behind one interface (:class:`~engine.landmarks.base.Landmarker`).

``create_landmarker(config, device, source)`` builds the backend named by
``config.landmarks``:

* ``fan``: face_alignment S3FD + 2D-FAN-4, 68 points (PIRender's recipe);
* ``mtcnn``: facenet-pytorch MTCNN, 5 points, weights bundled (works offline);
* ``file``: precomputed PIRender / Deep3D text files; needs ``source``, one per input.

Build ``fan`` and ``mtcnn`` once and reuse them for every input; build ``file`` per input
(:func:`needs_source`). Importing this package imports neither torch nor the backends'
libraries: each factory imports its module on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import EngineConfig, LandmarkBackend
from engine.landmarks.base import NO_FACE, BackendStatus, Landmarker, landmarks_from_list, no_face_landmarks

if TYPE_CHECKING:
    from engine.sources import InputItem

#: Signature of a backend factory: (config, device, source) → Landmarker.
LandmarkerFactory = Callable[[EngineConfig, str, "InputItem | Path | None"], Landmarker]


def _fan(config: EngineConfig, device: str, source: InputItem | Path | None) -> Landmarker:
    from engine.landmarks.fan import FanLandmarker

    return FanLandmarker(device=device)


def _mtcnn(config: EngineConfig, device: str, source: InputItem | Path | None) -> Landmarker:
    from engine.landmarks.mtcnn import MtcnnLandmarker

    return MtcnnLandmarker(device=device)


def _file(config: EngineConfig, device: str, source: InputItem | Path | None) -> Landmarker:
    from engine.landmarks.file import FileLandmarker

    if source is None:
        raise ValueError("the 'file' landmark backend reads one file per input: pass source=")
    return FileLandmarker.for_input(source, config.keypoints)


#: Backend name → factory. Read-only by convention.
BACKENDS: dict[str, LandmarkerFactory] = {
    LandmarkBackend.FAN.value: _fan,
    LandmarkBackend.MTCNN.value: _mtcnn,
    LandmarkBackend.FILE.value: _file,
}

#: Backends whose object belongs to one input (built with ``source``).
PER_INPUT = frozenset({LandmarkBackend.FILE.value})

_STATUS_MODULES = {
    LandmarkBackend.FAN.value: "engine.landmarks.fan",
    LandmarkBackend.MTCNN.value: "engine.landmarks.mtcnn",
    LandmarkBackend.FILE.value: "engine.landmarks.file",
}


def needs_source(backend: str | LandmarkBackend | EngineConfig) -> bool:
    """True when the backend must be built per input (``source`` given).

    >>> needs_source("file"), needs_source("fan")
    (True, False)
    """
    if isinstance(backend, EngineConfig):
        backend = backend.landmarks
    return LandmarkBackend(backend).value in PER_INPUT


def create_landmarker(
    config: EngineConfig, device: str, source: InputItem | Path | None = None
) -> Landmarker:
    """Build the landmark backend named by ``config.landmarks``.

    Args:
        config: the run's settings (``landmarks``; ``keypoints`` for ``file``).
        device: torch device string, e.g. ``"cpu"`` or ``"cuda:0"`` (resolved, not None).
        source: the input, required by ``file`` (see :func:`needs_source`), ignored by
            the others.

    Raises:
        WeightsMissingError: ``fan`` weights absent and not downloadable.
        InputError: ``file``: no landmark file for ``source``, or a bad one.
    """
    return BACKENDS[LandmarkBackend(config.landmarks).value](config, device, source)


def available_backends() -> list[BackendStatus]:
    """One :class:`BackendStatus` per backend (imports the backends' libraries), for ``doctor``."""
    return [importlib.import_module(_STATUS_MODULES[name]).status() for name in BACKENDS]


__all__ = [
    "BACKENDS",
    "NO_FACE",
    "PER_INPUT",
    "BackendStatus",
    "Landmarker",
    "LandmarkerFactory",
    "available_backends",
    "create_landmarker",
    "landmarks_from_list",
    "needs_source",
    "no_face_landmarks",
]
