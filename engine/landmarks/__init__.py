"""Landmark backends behind one interface (:class:`~engine.stages.landmark.Landmarker`).

:data:`BACKENDS` names each backend's module; ``create_landmarker(config, device, source)``
builds the one named by ``config.landmarks``:

* ``fan``: face_alignment S3FD + 2D-FAN-4, 68 points (PIRender's recipe);
* ``mtcnn``: facenet-pytorch MTCNN, 5 points, weights bundled (works offline);
* ``file``: precomputed PIRender / Deep3D text files; needs ``source``, one per input.

A backend module has a ``create(config, device, source)`` factory and a ``status()`` for
``doctor``; adding a backend is one such module and one line in :data:`BACKENDS` (see
``docs/architecture.md``). Build ``fan`` and ``mtcnn`` once and reuse them for every input;
build ``file`` per input (:func:`needs_source`). Importing this package imports neither torch
nor the backends' libraries: a backend's module is imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import EngineConfig, name_of
from engine.landmarks.base import NO_FACE, BackendStatus, Landmarker, landmarks_from_list, no_face_landmarks

if TYPE_CHECKING:
    from engine.sources import InputItem

#: Signature of a backend factory: (config, device, source) → Landmarker.
LandmarkerFactory = Callable[[EngineConfig, str, "InputItem | Path | None"], Landmarker]


@dataclass(frozen=True)
class BackendSpec:
    """One landmark backend.

    Attributes:
        module: the module holding ``create(config, device, source) -> Landmarker`` and
            ``status() -> BackendStatus``; imported on first use.
        label: short name for people (dashboard).
        help: one line on what it is and what it needs (dashboard, CLI help).
        per_input: the backend belongs to one input and is built with ``source``.
        device_frames: the backend (its exact-path landmarker and detector) takes frames whose
            ``images`` are a torch tensor on its device (:mod:`engine.frames`), so the exact path
            on a GPU may make them RGB there (:func:`engine.fast.default_source`).
    """

    module: str
    label: str
    help: str
    per_input: bool = False
    device_frames: bool = False

    def factory(self) -> LandmarkerFactory:
        return importlib.import_module(self.module).create

    def status(self) -> BackendStatus:
        return importlib.import_module(self.module).status()


#: Backend name → what it is. Read-only by convention; the order is the order shown to users.
BACKENDS: dict[str, BackendSpec] = {
    "fan": BackendSpec(
        "engine.landmarks.fan", "FAN (68 points)",
        "face_alignment's S3FD detector + 2D-FAN-4, 68 landmarks: PIRender's recipe, best on talking-head "
        "videos; needs its two weight files (Models / setup)."),
    "mtcnn": BackendSpec(
        "engine.landmarks.mtcnn", "MTCNN (5 points)",
        "facenet-pytorch's MTCNN, 5 landmarks: Deep3DFaceRecon's test recipe; fast, weights included.",
        device_frames=True),
    "file": BackendSpec(
        "engine.landmarks.file", "Precomputed file",
        "Landmarks computed elsewhere: a PIRender keypoint .txt next to each video (or in the folder given below).",
        per_input=True, device_frames=True),
}


def backend_spec(name) -> BackendSpec:
    """The registered backend ``name`` (a :class:`~engine.config.LandmarkBackend` or a str).

    Raises:
        ValueError: not registered (the message lists the backends).
    """
    try:
        return BACKENDS[name_of(name)]
    except KeyError:
        raise ValueError(f"unknown landmark backend {name_of(name)!r}; known backends: {', '.join(BACKENDS)}") from None


def needs_source(backend: str | EngineConfig) -> bool:
    """True when the backend must be built per input (``source`` given).

    >>> needs_source("file"), needs_source("fan")
    (True, False)
    """
    if isinstance(backend, EngineConfig):
        backend = backend.landmarks
    return backend_spec(backend).per_input


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
    return backend_spec(config.landmarks).factory()(config, device, source)


def available_backends() -> list[BackendStatus]:
    """One :class:`BackendStatus` per backend (imports the backends' libraries), for ``doctor``."""
    return [spec.status() for spec in BACKENDS.values()]


__all__ = [
    "BACKENDS",
    "NO_FACE",
    "BackendSpec",
    "BackendStatus",
    "Landmarker",
    "LandmarkerFactory",
    "available_backends",
    "backend_spec",
    "create_landmarker",
    "landmarks_from_list",
    "needs_source",
    "no_face_landmarks",
]
