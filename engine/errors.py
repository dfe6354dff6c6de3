"""Errors raised by the engine.

Every error carries a one-line, human-readable message: the CLI prints it as the
reason an input failed and the worker stores it on the job. Messages name the file,
what was expected and what was found, never a tensor.
"""

from __future__ import annotations

import errno
from pathlib import Path


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


class EngineProcessError(StudioError):
    """An input run in a child process (``run_many(processes=K)``) ended without a result of its
    own: the process died (killed, crashed), or its error could not be sent back as itself
    (then ``code`` is that error's code and the message names its type)."""

    code = "engine_process"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code

    def __reduce__(self):
        return (type(self), (str(self), self.code))


class InputTooLarge(InputError):
    """The input exceeds a configured limit (bytes, pixels per frame, duration); see :mod:`engine.limits`."""

    code = "too_large"


class InputTooSmall(InputError):
    """The frames are too small to hold a detectable face; see :mod:`engine.limits`."""

    code = "too_small"


class DiskFullError(OutputError):
    """A write failed because the file system is full (``ENOSPC``, ``EDQUOT``, ``EFBIG``).

    A fault of the machine, not of the job: a worker requeues the job and pauses.
    """

    code = "disk_full"


class ReadOnlyError(OutputError):
    """A write failed because the folder is read-only or not writable (``EROFS``, ``EACCES``, ``EPERM``).

    A fault of the machine, not of the job: a worker requeues the job and pauses.
    """

    code = "read_only"


#: Error codes that describe the machine (its disks), not the job: the job is requeued, not failed.
ENVIRONMENT_CODES = frozenset({DiskFullError.code, ReadOnlyError.code})

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def short_path(path) -> str:
    """The last three parts of ``path`` (``results/12/clip.npz``): enough to say where, without
    the server's folders.

    >>> short_path("/srv/studio/data/results/12/clip.npz")
    'results/12/clip.npz'
    """
    return "/".join(Path(path).parts[-3:])


def storage_error(e: OSError, what: str) -> OutputError:
    """The worded :class:`OutputError` for an ``OSError`` raised while writing ``what``.

    ``what`` names the file or folder for the message (e.g. ``"results/12/clip.npz"``).

    >>> import errno
    >>> storage_error(OSError(errno.ENOSPC, "No space left on device"), "out/a.npz").code
    'disk_full'
    >>> str(storage_error(OSError(errno.EROFS, "Read-only file system"), "out"))
    'cannot write out: the folder is read-only (Read-only file system)'
    """
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in _DISK_FULL_ERRNOS:
        return DiskFullError(f"cannot write {what}: the disk is full ({reason})")
    if e.errno in _READ_ONLY_ERRNOS:
        return ReadOnlyError(f"cannot write {what}: the folder is read-only ({reason})")
    return OutputError(f"cannot write {what}: {reason}")
