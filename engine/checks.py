"""Shape checks used at the engine's public boundaries.

``check_shape(x, ("N", "68", "2"), "landmarks")`` accepts any size for a named
dimension (a letter) and the exact size for a digit string or an int; ``"*"`` means
"any number of leading dimensions".
"""

from __future__ import annotations

from collections.abc import Sequence

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
