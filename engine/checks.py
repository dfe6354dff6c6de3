"""Shape checks used at the engine's public boundaries.

``check_shape(x, ("N", "68", "2"), "landmarks")`` accepts any size for a named
dimension (a letter) and the exact size for a digit string or an int; ``"*"`` means
"any number of leading dimensions". :func:`regular_file_problem` says in words why a path is
not an ordinary file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from engine.errors import ShapeError


def check_shape(x, spec: Sequence[str | int], name: str) -> None:
    """Raise :class:`ShapeError` unless ``x.shape`` matches ``spec``.

    Args:
        x: any object with a ``shape`` attribute (numpy array, torch tensor).
        spec: one entry per dimension: an int or digit string for a fixed size, a
            name for any size, or a leading ``"*"`` for any number of leading dims.
        name: the argument's name, used in the message.
    """
    shape = tuple(int(d) for d in x.shape)
    spec = tuple(spec)
    if spec and spec[0] == "*":
        spec = spec[1:]
        if len(shape) < len(spec):
            raise ShapeError(name, ("*", *spec), shape)
        shape_tail = shape[len(shape) - len(spec):]
    else:
        if len(shape) != len(spec):
            raise ShapeError(name, spec, shape)
        shape_tail = shape
    for want, got in zip(spec, shape_tail, strict=True):
        fixed = isinstance(want, int) or (isinstance(want, str) and want.isdigit())
        if fixed and int(want) != got:
            raise ShapeError(name, spec, shape)


def regular_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an ordinary file, in words; None when it is one.

    ``"no such file"`` only when nothing is there; a folder, named pipe (FIFO), device or
    socket is ``"not a regular file: it is a named pipe (FIFO)"``, so the message never
    sends the user looking for a file that exists. Symbolic links are followed.

    >>> regular_file_problem("/")
    'not a regular file: it is a folder'
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a link to a missing file" if os.path.islink(path) else "no such file"
    except PermissionError:
        return "permission denied"
    except OSError as e:
        return (e.strerror or type(e).__name__).lower()
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file: it is {_KINDS.get(stat.S_IFMT(mode), 'a special file')}"


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
