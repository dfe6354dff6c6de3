"""Content-addressed uploads and atomic file writes.

An upload is stored as ``uploads/<sha256[:2]>/<sha256><ext>``: the same bytes uploaded
twice land on the same path and are stored once. Every file is first written under a
temporary name in the same file system and then renamed into place, so a reader (or a
crash) never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20  # bytes read at a time while hashing/copying

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
    """Where an upload with this hash is stored."""
    return uploads_dir / sha256[:2] / f"{sha256}{safe_suffix(original_name)}"


def temp_path(directory: Path, name: str = "") -> Path:
    """A fresh, unused path in ``directory`` for a file about to be renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f".tmp-{uuid.uuid4().hex}{('-' + name) if name else ''}.part"


def fsync_replace(tmp: Path, dest: Path) -> None:
    """Flush ``tmp`` to disk and rename it onto ``dest`` (atomic on one file system)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)


def stream_to_temp(fileobj: BinaryIO, tmp_dir: Path) -> tuple[Path, str, int]:
    """Copy a binary stream into a temporary file while hashing it.

    Returns:
        (temporary path, hex SHA-256, size in bytes).
    """
    tmp = temp_path(tmp_dir, "upload")
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            while chunk := fileobj.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
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
    fsync_replace(tmp, dest)
    return True


def store_copy(src: Path, uploads_dir: Path, tmp_dir: Path, original_name: str) -> tuple[Path, str, int]:
    """Store a copy of ``src`` by content hash (once per content).

    Returns:
        (stored path, hex SHA-256, size in bytes).
    """
    with open(src, "rb") as f:
        tmp, sha, size = stream_to_temp(f, tmp_dir)  # one read: copy and hash together
    dest = upload_path(uploads_dir, sha, original_name)
    store_temp(tmp, dest)
    return dest, sha, size


def remove_tree(path: Path) -> None:
    """Delete a directory tree if it exists (ignoring files that vanish meanwhile)."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
