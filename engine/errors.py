"""Errors raised by the engine.

Every error carries a one-line, human-readable message: the CLI prints it as the
reason an input failed and the worker stores it on the job. Messages name the file,
what was expected and what was found, never a tensor.
"""

from __future__ import annotations


class StudioError(Exception):
    """Base class of every error the engine raises on purpose."""

    #: Short machine-readable code stored with failed jobs (``"decode"``, ``"no_face"``, ...).
    code = "error"


class InputError(StudioError):
    """An input path is missing, empty, or not a supported image/video."""

    code = "input"


class DecodeError(InputError):
    """FFmpeg could not decode the file (truncated, corrupt, no video stream)."""

    code = "decode"


class NoFaceError(StudioError):
    """Not a single frame of the input contains a detectable face."""

    code = "no_face"


class WeightsError(StudioError):
    """A weight file is missing or is not what it claims to be."""

    code = "weights"


class CheckpointError(WeightsError):
    """The reconstruction checkpoint cannot be loaded (wrong layout, truncated, not a checkpoint)."""

    code = "checkpoint"


class WeightsMissingError(WeightsError):
    """A weight file needed by the chosen backend is not where it should be."""

    code = "weights_missing"


class ShapeError(StudioError, ValueError):
    """An array does not have the documented shape."""

    code = "shape"

    def __init__(self, name: str, expected: tuple, actual: tuple):
        self.expected = tuple(expected)
        self.actual = tuple(actual)
        super().__init__(f"{name}: expected shape {self.expected}, got {self.actual}")


class OutputError(StudioError):
    """An output could not be written (disk full, permissions)."""

    code = "output"


class Cancelled(StudioError):
    """The run was cancelled by its caller (``should_stop`` returned True)."""

    code = "cancelled"
