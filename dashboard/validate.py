"""Weight-file validators that need torch, run in a child process by :mod:`dashboard.install`.

``python -m dashboard.validate KIND PATH`` prints one JSON line ``{"ok": bool, "message": str}``
and exits 0 (also for a bad file: only a crash of the validator itself exits non-zero).
Every file is read as data only (:mod:`engine.safe_load`): a pickle that asks for a Python
object is reported as refused, and nothing in it runs.

Kinds:

* ``checkpoint`` — the reconstruction net (``engine.regressor.inspect_checkpoint``).
* ``sfd`` — face_alignment's S3FD detector weights: a state dict that loads strictly into
  face_alignment's own ``s3fd`` network.
* ``fan`` — face_alignment's 2D-FAN-4 weights: a state dict that loads strictly into
  face_alignment's own ``FAN(4)`` network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.checks import regular_file_problem


def _checkpoint(path: Path) -> tuple[bool, str]:
    from engine.regressor import inspect_checkpoint

    info = inspect_checkpoint(path)
    return info.ok, info.message


def _fits(path: Path, make_net, title: str, what: str) -> tuple[bool, str]:
    """Whether ``path`` is a state dict that loads strictly into ``make_net()`` (a face_alignment net)."""
    from engine.safe_load import UnsafeWeightsError, load_weights

    try:
        sd = load_weights(path)
    except UnsafeWeightsError as e:
        return False, str(e)
    except Exception as e:
        return False, f"not a PyTorch weight file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if not isinstance(sd, dict):
        return False, f"expected a state dict of the {title}, found a {type(sd).__name__}"
    try:
        make_net().load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:200]
        return False, f"these are not {what} weights (they do not fit face_alignment's {what} net: {first})"
    return True, f"{title} weights, {len(sd)} tensors"


def _sfd(path: Path) -> tuple[bool, str]:
    from face_alignment.detection.sfd.net_s3fd import s3fd

    return _fits(path, s3fd, "S3FD detector", "S3FD")


def _fan(path: Path) -> tuple[bool, str]:
    from face_alignment.models import FAN

    return _fits(path, lambda: FAN(4), "2D-FAN-4 landmark network", "2D-FAN-4")


VALIDATORS = {"checkpoint": _checkpoint, "sfd": _sfd, "fan": _fan}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in VALIDATORS:
        print(f"usage: python -m dashboard.validate {{{','.join(VALIDATORS)}}} PATH", file=sys.stderr)
        return 2
    path = Path(argv[1])
    problem = regular_file_problem(path)
    if problem:
        ok, message = False, f"{path}: {problem}"
    else:
        ok, message = VALIDATORS[argv[0]](path)
    print(json.dumps({"ok": bool(ok), "message": str(message)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
