"""Weight files are data, never code: every PyTorch weight file the project reads goes through here.

A ``.pth`` file is a pickle, and a pickle can name any Python callable to be run while it
is read (``__reduce__``). :func:`load_weights` therefore only ever calls ``torch.load``
with ``weights_only=True``: PyTorch's restricted unpickler rebuilds tensors, storages,
``torch.Size``/dtypes and plain containers and numbers, and refuses every other global.
On top of that built-in vocabulary it allows :data:`ALLOWED_GLOBALS`, by name, and
nothing else. There is no fallback to a full unpickle, whatever the environment says
(``weights_only=True`` is passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
cannot turn it off). A file that asks for anything else is refused with a message
naming the global (:func:`refusal`).

SadTalker's ``.safetensors`` files hold no pickle at all and are read by
:mod:`safetensors` (see :mod:`engine.regressor`).
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import re
from pathlib import Path

#: Globals allowed beyond the weights-only unpickler's own (tensors, storages, dtypes,
#: ``torch.Size``, dict/list/tuple/set, numbers, strings, bytes, None). Each is needed by a
#: file users really have:
#:
#: * ``collections.OrderedDict``: every ``nn.Module.state_dict()`` (``net_recon`` in
#:   Deep3DFaceRecon's ``epoch_20.pth``, face_alignment's S3FD and 2D-FAN-4 files, a bare
#:   state dict saved with ``torch.save(model.state_dict())``) is an OrderedDict.
#: * ``collections.Counter``: the ``milestones`` of a ``MultiStepLR`` scheduler state, which
#:   ``epoch_20.pth``'s ``sched_00`` holds when it was trained with ``--lr_policy multistep``
#:   (the released file uses ``step``, whose state is plain numbers; Adam's ``opt_00`` is
#:   tensors, numbers and tuples).
#:
#: Both are pure data containers whose unpickling runs no user code. Recent PyTorch
#: releases allow them by default too; listing them keeps that true on any version.
ALLOWED_GLOBALS: tuple[type, ...] = (collections.OrderedDict, collections.Counter)

_GLOBAL = re.compile(r"GLOBAL (\S+)")
_DATA_ONLY = (
    "which could run code on this machine; checkpoints are loaded as data only "
    "(tensors, numbers, strings, lists and dicts), never as Python objects"
)


class UnsafeWeightsError(pickle.UnpicklingError):
    """A weight file asked for a Python object outside the allow-list (nothing of it ran).

    Attributes:
        global_name: the object it asked for, e.g. ``"posix.system"``.
    """

    def __init__(self, path: Path, global_name: str):
        self.path = Path(path)
        self.global_name = global_name
        super().__init__(refusal(path, global_name))


def refusal(path: str | Path, global_name: str) -> str:
    """The one-line message for a file that asks for ``global_name``."""
    return f"{path} refuses to load: it asks for the Python object '{global_name}', {_DATA_ONLY}"


def unsafe_global(error: BaseException | str) -> str | None:
    """The global a weights-only load refused (``"posix.system"``), read from its error; else None.

    Protocol-2 pickles (``torch.save``'s) spell some modules the Python 2 way
    (``commands.call`` for ``subprocess.call``), and PyTorch drops ``builtins.``; the name is
    given in full, the Python 3 way.
    """
    match = _GLOBAL.search(str(error))
    if match is None:
        return None
    module, _, name = match.group(1).rstrip(".,;").rpartition(".")
    module = module or "builtins"  # PyTorch's message drops the "builtins." of exec, eval, ...
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def load_weights(path: str | Path, *, map_location: str = "cpu", mmap: bool = False):
    """``torch.load`` as data only: weights-only unpickler plus :data:`ALLOWED_GLOBALS`.

    Args:
        path: a PyTorch file (zip or legacy pickle format).
        map_location: device for the tensors (default CPU).
        mmap: memory-map the tensors (zip format only).

    Returns:
        Whatever plain structure the file holds (usually a dict of tensors).

    Raises:
        UnsafeWeightsError: the file asks for any other Python object; nothing from it ran.
        pickle.UnpicklingError, RuntimeError, EOFError, OSError, ...: as ``torch.load``
            for damaged or foreign files.
    """
    import torch

    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
        try:
            return torch.load(Path(path), map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            name = unsafe_global(e)
            if name is not None:
                raise UnsafeWeightsError(Path(path), name) from None
            raise
