"""Content-addressed uploads and atomic file writes.

An upload is stored as ``uploads/<sha256[:2]>/<sha256><ext>``: the same bytes are stored
once, whatever name or extension they are submitted under (the first submission's
extension is kept; see :func:`find_stored`). Every file is first written under a
temporary name *beside its target* (same folder, so the same file system even when
``results/`` or ``uploads/`` is a symlink to another mount) and then renamed into place,
so a reader (or a crash) never sees half a file. A full or read-only disk raises
:class:`~engine.errors.DiskFullError` / :class:`~engine.errors.ReadOnlyError` and leaves
no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import BinaryIO

from engine.errors import InputTooLarge, OutputError, short_path, storage_error
from engine.formats import NAME_MAX  # longest file name (bytes) the common file systems accept

CHUNK = 1 << 20  # bytes read at a time while hashing/copying

#: Prefix of every temporary file this module writes (``.tmp-<uuid>…``).
TEMP_PREFIX = ".tmp-"

_SAFE_EXT = re.compile(r"^\.[a-z0-9]{1,10}$")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def safe_suffix(name: str) -> str:
    """The lower-case extension of ``name`` if it is plain (``.mp4``), else ``""``."""
    ext = Path(name).suffix.lower()
    return ext if _SAFE_EXT.match(ext) else ""


def upload_path(uploads_dir: Path, sha256: str, original_name: str) -> Path:
    """Where an upload with this hash is stored when it is new (see :func:`find_stored`)."""
    return uploads_dir / sha256[:2] / f"{sha256}{safe_suffix(original_name)}"


def find_stored(uploads_dir: Path, sha256: str) -> Path | None:
    """The stored copy of these bytes, under whatever extension it was first stored, or None."""
    folder = uploads_dir / sha256[:2]
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob(f"{sha256}*") if p.is_file() and p.name[len(sha256):][:1] in ("", "."))
    return found[0] if found else None


def temp_path(directory: Path, name: str = "") -> Path:
    """A fresh, unused path in ``directory`` for a file about to be renamed into place.

    ``name`` (kept at the end, so a suffix still tells the file type) is shortened so the
    whole name stays within :data:`NAME_MAX` bytes.

    >>> temp_path(Path("/nonexistent-dir"), "x" * 300 + ".mp4").name.endswith(".mp4")
    True
    """
    tag = f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    if name:
        room = NAME_MAX - len(tag) - len(".part") - 1
        raw = name.encode("utf-8", "surrogateescape")
        if len(raw) > room:
            name = raw[-room:].decode("utf-8", "ignore")
        return directory / f"{tag}.part-{name}"
    return directory / f"{tag}.part"


def is_temp_name(name: str) -> bool:
    """True for the names :func:`temp_path` makes (``.tmp-…``)."""
    return name.startswith(TEMP_PREFIX)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_replace(tmp: Path, dest: Path) -> None:
    """Flush ``tmp`` to disk and rename it onto ``dest`` (atomic on one file system).

    When ``tmp`` lies on another file system (``EXDEV``: a folder was symlinked elsewhere),
    the file is copied to a temporary name beside ``dest`` first, so the final rename is
    still atomic. ``tmp`` is gone afterwards either way.

    Raises:
        OutputError: ``DiskFullError`` / ``ReadOnlyError`` for a full or read-only target.
    """
    try:
        _fsync(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, dest)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
        beside = temp_path(dest.parent, dest.name)
        try:
            shutil.copyfile(tmp, beside)
            _fsync(beside)
            os.replace(beside, dest)
        except BaseException:
            beside.unlink(missing_ok=True)
            raise
        tmp.unlink(missing_ok=True)
    except OSError as e:
        raise storage_error(e, short_path(dest)) from e


def stream_to_temp(
    fileobj: BinaryIO, directory: Path, *, name: str = "upload", max_bytes: int = 0
) -> tuple[Path, str, int]:
    """Copy a binary stream into a temporary file in ``directory`` while hashing it.

    Args:
        name: the upload's name; its suffix ends the temporary name (so the file can be
            probed as what it claims to be) and it is used in messages.
        max_bytes: stop and refuse the upload past this size (0: no limit).

    Returns:
        (temporary path, hex SHA-256, size in bytes).

    Raises:
        InputTooLarge: more than ``max_bytes``. DiskFullError / ReadOnlyError / OutputError:
            the copy could not be written. Nothing is left behind in any case.
    """
    tmp = temp_path(directory, f"upload{safe_suffix(name)}")
    h = hashlib.sha256()
    size = 0
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            while chunk := fileobj.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
                if max_bytes and size > max_bytes:
                    raise InputTooLarge(
                        f"{Path(name).name}: over the limit of {max_bytes / 2**30:.1f} GiB per file (STUDIO_MAX_BYTES)"
                    )
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error(e, f"{directory.name}/") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest(), size


def store_temp(tmp: Path, dest: Path) -> bool:
    """Move a finished temporary file to its content-addressed ``dest``.

    Returns:
        True when the file was stored, False when ``dest`` already held these bytes
        (the temporary file is then deleted).
    """
    if dest.exists():
        tmp.unlink(missing_ok=True)
        return False
    try:
        fsync_replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def store_copy(src: Path, uploads_dir: Path, original_name: str, *, max_bytes: int = 0) -> tuple[Path, str, int]:
    """Store a copy of ``src`` by content hash: once per content, whatever its extension.

    Returns:
        (stored path: the existing copy when these bytes are already stored, hex SHA-256,
        size in bytes).
    """
    with open(src, "rb") as f:  # one read: copy and hash together
        tmp, sha, size = stream_to_temp(f, uploads_dir, name=original_name, max_bytes=max_bytes)
    existing = find_stored(uploads_dir, sha)
    if existing is not None:
        tmp.unlink(missing_ok=True)
        return existing, sha, size
    dest = upload_path(uploads_dir, sha, original_name)
    store_temp(tmp, dest)
    return dest, sha, size


def removal_problem(path: Path) -> str | None:
    """Why ``path`` (a file or a folder tree) cannot be deleted, or None when it can.

    Checks write permission on the folders involved (``os.access`` also reports a
    read-only mount, for root too), without deleting anything.
    """
    if not path.exists() and not path.is_symlink():
        return None
    folders = [path.parent]
    if path.is_dir() and not path.is_symlink():
        folders += [Path(d) for d, _, _ in os.walk(path)]
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            where = "/".join(folder.parts[-2:])
            try:
                read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
            except OSError:
                read_only = False
            return f"{where} is {'on a read-only file system' if read_only else 'not writable'}"
    return None


def remove_tree(path: Path) -> list[Path]:
    """Delete a file or folder tree if it exists; returns what could not be deleted.

    Files that vanish meanwhile are not failures.
    """
    failed: list[Path] = []
    if path.is_symlink() or path.is_file():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            failed.append(path)
        return failed
    if not path.exists():
        return failed

    def onexc(_func, name, exc) -> None:
        if not isinstance(exc, FileNotFoundError):
            failed.append(Path(name))

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onexc)
    else:  # pragma: no cover - Python 3.10/3.11
        shutil.rmtree(path, onerror=lambda f, name, info: onexc(f, name, info[1]))
    return failed


def sweep_temp(directory: Path, *, older_than_s: float = 3600.0, depth: int = 2) -> list[Path]:
    """Delete temporary files (:func:`temp_path` names) left under ``directory`` by a process
    that was killed while writing; only files untouched for ``older_than_s`` seconds, so a
    write in progress is never disturbed. Looks in ``directory`` and ``depth - 1`` levels of
    sub-folders. Returns what it deleted."""
    import time

    cutoff = time.time() - older_than_s
    removed = []
    candidates = [p for level in range(depth) for p in directory.glob("*/" * level + f"{TEMP_PREFIX}*")]
    for p in candidates:
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink() and p.stat().st_mtime < cutoff:
                p.unlink()
                removed.append(p)
    return removed


def probe_writable(directory: Path) -> OutputError | None:
    """Write, flush and delete a small file in ``directory``: None when that worked, else
    the worded error (``DiskFullError``, ``ReadOnlyError``, ``OutputError``)."""
    probe = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}.probe"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return storage_error(e, f"{directory.name}/")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None
