"""Stage 7, the regressor: aligned crops → 257 coefficients per frame.

The default is :class:`engine.regressor.Regressor` (Deep3DFaceRecon's ResNet-50), loaded from
``config.checkpoint`` on first use. Anything with the same four members can stand in.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Regressor(Protocol):
    """The reconstruction network.

    Attributes:
        checkpoint_path: the weights file (part of the resume fingerprint).
        checkpoint_sha256: its hex SHA-256 (recorded in every report).
    """

    checkpoint_path: Path
    checkpoint_sha256: str

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (B, 224, 224, 3) RGB crops → float32 (B, 257) coefficients.

        Crops are numpy, or a torch uint8 tensor when the aligner keeps them on its device
        (``TorchAligner(keep_on_device=True)``; only pair that with a regressor that takes tensors).
        """
        ...

    def numerics(self) -> contextlib.AbstractContextManager:
        """The float precision this regressor needs, held around a whole run."""
        ...


def load_regressor(checkpoint: Path | None, device: str, precision: str = "fp32") -> Regressor:
    """The default regressor: ``checkpoint`` (None: the one under ``checkpoints/``) on ``device``,
    in ``precision`` (see :class:`engine.regressor.Regressor`; only ``fp32`` is the reference's).

    Raises:
        WeightsMissingError / CheckpointError: no usable checkpoint.
    """
    from engine.regressor import Regressor as ResNetRegressor
    from engine.weights import find_checkpoint

    return ResNetRegressor(find_checkpoint(checkpoint), device=device, precision=precision)
