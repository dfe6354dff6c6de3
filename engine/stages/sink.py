"""Stage 8, the sinks: one :class:`~engine.structures.FrameResults` per batch in, files out.

Every output format is a sink, built from :data:`engine.formats.FORMATS` (``sink`` names its
factory, ``factory(context) -> Sink``), or handed to :class:`~engine.pipeline.Engine` directly.
The life of a sink for one input::

    paths = sink.start(info, out_base)     # where its files will go; writes nothing
    sink.add(results)                      # once per batch, in frame order
    staged = sink.finish(hooks)            # every file complete under a temporary name
    # the engine renames every sink's staged files into place, or calls sink.abort()

The engine hands an input's batches to the sinks only after the input passed its checks (a
face in enough frames), so a failing input never reaches a sink. All the files of an input
are complete before the first is renamed, so a failure while writing (the usual case: a full
disk) leaves none of them; :meth:`Sink.abort` removes what a sink staged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from engine.config import EngineConfig, name_of
from engine.errors import short_path, storage_error
from engine.formats import NAME_MAX, format_spec
from engine.structures import FrameResults, MediaInfo


def _ignore_progress(done: int, total: int) -> None:
    return None


def _never() -> bool:
    return False


@dataclass(frozen=True)
class SinkHooks:
    """What a sink may use while it finishes an input.

    Attributes:
        report: ``report(frames_done, frames_total)``: progress of a slow sink (overlay video).
        should_stop: polled between slices of slow work; True → raise
            :class:`~engine.errors.Cancelled`.
    """

    report: Callable[[int, int], None] = _ignore_progress
    should_stop: Callable[[], bool] = _never


@dataclass(frozen=True)
class SinkContext:
    """What a sink factory gets from the engine.

    Attributes:
        format: the format name the sink is built for (a key of :data:`engine.formats.FORMATS`).
        config: the engine's settings.
        face_model: returns the face model of ``BFM/`` on the engine's device, loaded once
            (only sinks that need it call it).
    """

    format: str
    config: EngineConfig
    face_model: Callable[[], object]


@runtime_checkable
class Sink(Protocol):
    """Writes the results of each input somewhere (see the module docstring for the order)."""

    def start(self, info: MediaInfo, out_base: Path) -> dict[str, Path]:
        """Begin an input; return format → the path each of its files will have.

        Writes nothing. Raise here what is known before any work (a missing face model).
        """
        ...

    def add(self, results: FrameResults) -> None:
        """The results of the input's next batch."""
        ...

    def finish(self, hooks: SinkHooks) -> dict[str, Path]:
        """Write every file complete (fsynced) under a temporary name beside its path.

        Returns:
            format → the temporary file, which the engine renames onto the path ``start``
            announced once every sink has finished.
        """
        ...

    def abort(self) -> None:
        """Forget the input and remove anything staged for it. Idempotent."""
        ...


def create_sinks(formats: Iterable, context_for: Callable[[str], SinkContext]) -> list[Sink]:
    """One sink per format, from :data:`engine.formats.FORMATS` (imports each sink's module)."""
    return [format_spec(f).sink_factory()(context_for(name_of(f))) for f in formats]


# ------------------------------------------------------------------ staging


def temp_name(path: str | Path, tag: str = "part", *, keep_suffix: bool = False) -> Path:
    """A temporary name for ``path`` in the same folder (so the final rename never crosses
    file systems): ``.<name>.<tag>-<pid>``, or ``.<stem>.<tag>-<pid><suffix>`` with
    ``keep_suffix`` (for writers that pick the format from the suffix). The name is
    shortened (a hash of it kept) when the result would exceed :data:`NAME_MAX` bytes.

    >>> temp_name("out/clip.npz").name.startswith(".clip.npz.part-")
    True
    >>> temp_name("out/a.overlay.mp4", "partial", keep_suffix=True).suffix
    '.mp4'
    >>> len(temp_name("out/" + "x" * 250 + ".sadtalker.mat").name.encode()) <= NAME_MAX
    True
    """
    path = Path(path)
    base, suffix = (path.stem, path.suffix) if keep_suffix else (path.name, "")
    tail = f".{tag}-{os.getpid()}{suffix}"
    name = f".{base}{tail}"
    if len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX:
        return path.with_name(name)
    digest = hashlib.sha256(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    keep = base.encode("utf-8", "surrogateescape")[:100].decode("utf-8", "ignore")
    return path.with_name(f".{keep}~{digest}{tail}")


def staging_path(path: Path) -> Path:
    """The temporary name a file is written under before its rename: hidden, same folder and
    same last suffix (encoders that pick the format from the name still work).

    >>> staging_path(Path("out/clip.overlay.mp4")).name  # doctest: +ELLIPSIS
    '.clip.overlay.part-....mp4'
    """
    return temp_name(path, "part", keep_suffix=True)


def stage_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` under :func:`staging_path` of ``path``, fsynced; returns that name.

    Raises:
        OutputError: the write failed (the temporary file is removed); ``DiskFullError``
            or ``ReadOnlyError`` when the disk is full or the folder not writable.
    """
    tmp = staging_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        discard(tmp)
        raise storage_error(e, short_path(path)) from e
    return tmp


def commit(staged: dict[Path, Path]) -> None:
    """Rename every staged file (temporary → final path).

    Raises:
        OutputError (or DiskFullError / ReadOnlyError): a rename failed; the files not yet
            renamed are removed.
    """
    pending = dict(staged)
    try:
        for tmp, path in staged.items():
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise storage_error(e, short_path(path)) from e
            del pending[tmp]
    finally:
        for tmp in pending:
            discard(tmp)


def discard(path: Path | None) -> None:
    """Remove a temporary file if it is there."""
    if path is not None:
        with contextlib.suppress(OSError):
            Path(path).unlink()
