"""3DMM Studio engine: Deep3DFaceRecon-compatible 3DMM coefficients from videos and images.

The public API is small::

    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(landmarks="mtcnn", formats=("pirender", "npz")))
    report = engine.run("clip.mp4", "out/clip")      # writes out/clip.mat, out/clip.npz

``import engine`` is cheap: torch and the landmark backends load on first use, so the
dashboard can use the config, probe and discovery helpers without importing torch.
"""

from __future__ import annotations

from engine.config import EngineConfig, LandmarkBackend, Mode, NoFacePolicy, OutputFormat
from engine.errors import (
    Cancelled,
    CheckpointError,
    DecodeError,
    InputError,
    NoFaceError,
    StudioError,
    WeightsError,
    WeightsMissingError,
)

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "CheckpointError",
    "DecodeError",
    "Engine",
    "EngineConfig",
    "InputError",
    "InputJob",
    "InputOutcome",
    "LandmarkBackend",
    "Mode",
    "NoFaceError",
    "NoFacePolicy",
    "OutputFormat",
    "Progress",
    "RunReport",
    "StudioError",
    "WeightsError",
    "WeightsMissingError",
    "__version__",
    "discover_inputs",
    "extract",
    "probe",
]

_LAZY = {
    "Engine": "engine.pipeline",
    "Progress": "engine.pipeline",
    "RunReport": "engine.pipeline",
    "extract": "engine.pipeline",
    "InputJob": "engine.many",
    "InputOutcome": "engine.many",
    "discover_inputs": "engine.sources",
    "probe": "engine.sources",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
