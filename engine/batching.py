"""Merging concurrent network calls from several threads into one batch.

:meth:`~engine.pipeline.Engine.run_many` runs several inputs at once, each in its own thread,
sharing one loaded regressor. On a GPU a forward of 4×32 crops costs little more than one of 32,
so :class:`MergingRegressor` collects the ``predict`` calls that arrive together and runs them as
one forward (a collector thread waits at most ``wait_s`` for more work, or until every input
open is waiting), then hands each caller its own rows back.

On the CPU the merge is not used: CPU kernels may round differently for another batch size, and
the exact path promises the same numbers whatever runs beside it (``run_many`` wraps the
regressor only on CUDA; see ``docs/architecture.md``). The landmarkers are not merged here: the
frames of different inputs differ in size (the fast path's crop-based landmarkers batch inside
their own stage).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

#: Longest time the collector waits for more calls after the first one arrived (seconds).
MERGE_WAIT_S = 0.002
#: Most crops in one merged forward (a single larger call still runs, alone).
MERGE_MAX_ROWS = 256


@dataclass(eq=False)
class _Request:
    """One caller's crops and, once the forward ran, its rows of the output or its error."""

    crops: np.ndarray  # or a uint8 torch tensor on the regressor's device (the GPU aligner's crops)
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


def take_batch(pending: deque, max_rows: int) -> list:
    """Pop the requests of the next forward from ``pending``: in arrival order, as many as fit in
    ``max_rows`` crops, at least one (a pure function of the queue).

    >>> q = deque([_Request(np.zeros((3, 1))), _Request(np.zeros((2, 1))), _Request(np.zeros((4, 1)))])
    >>> [len(r.crops) for r in take_batch(q, 5)], len(q)
    ([3, 2], 1)
    """
    out = [pending.popleft()]
    rows = len(out[0].crops)
    while pending and rows + len(pending[0].crops) <= max_rows:
        rows += len(pending[0].crops)
        out.append(pending.popleft())
    return out


def split_rows(out: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """``out``'s rows cut into consecutive pieces of ``sizes`` rows (copies, not views).

    >>> [p.tolist() for p in split_rows(np.arange(5), [2, 3])]
    [[0, 1], [2, 3, 4]]
    """
    cuts = np.cumsum(sizes)[:-1]
    return [np.array(p) for p in np.split(out, cuts)]


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch")


def _concat(parts: list):
    """Rows of numpy arrays or torch tensors joined (tensors stay on their device; numpy parts
    beside tensors are moved there)."""
    if not any(_is_tensor(p) for p in parts):
        return np.concatenate(parts)
    import torch

    device = next(p.device for p in parts if _is_tensor(p))
    return torch.cat([p if _is_tensor(p) else torch.from_numpy(p).to(device) for p in parts])


class MergingRegressor:
    """A :class:`~engine.stages.regress.Regressor` whose concurrent :meth:`predict` calls share
    forwards.

    Each call's crops are checked in the caller's thread (a bad array raises there alone). A
    collector thread takes the waiting calls (up to ``max_rows`` crops), runs one forward of the
    inner regressor and splits its output back. When a merged forward fails, each call of it is
    run again alone, so every caller gets its own result or its own error.

    Args:
        inner: the regressor that runs the forwards (its attributes are this one's).
        max_rows: most crops in one merged forward.
        wait_s: after the first call arrived, wait at most this long for more (none when every
            registered user, see :meth:`user`, is already waiting).
        clock: monotonic seconds (injectable).
    """

    def __init__(self, inner, *, max_rows: int = MERGE_MAX_ROWS, wait_s: float = MERGE_WAIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.max_rows = max(1, int(max_rows))
        self.wait_s = float(wait_s)
        self.clock = clock
        self._pending: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._users = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        #: Crops per forward run so far (for tests and benchmarks); bounded.
        self.forward_sizes: deque[int] = deque(maxlen=10_000)

    # The Regressor protocol: the inner regressor's identity and numerics.
    @property
    def checkpoint_path(self):
        return self.inner.checkpoint_path

    @property
    def checkpoint_sha256(self) -> str:
        return self.inner.checkpoint_sha256

    def numerics(self) -> contextlib.AbstractContextManager:
        return self.inner.numerics()

    def __getattr__(self, name: str):  # device, precision, describe() ... of the inner regressor
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def user(self) -> Iterator[None]:
        """Count the caller's thread as a user while inside (the collector stops waiting for more
        calls once every user is waiting)."""
        with self._cv:
            self._users += 1
        try:
            yield
        finally:
            with self._cv:
                self._users -= 1
                self._cv.notify_all()

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (B, 224, 224, 3) crops → float32 (B, 257), from a merged forward."""
        if not _is_tensor(crops):
            crops = np.asarray(crops)
        uint8 = str(crops.dtype) in ("uint8", "torch.uint8")
        if tuple(crops.shape[1:]) != (224, 224, 3) or not uint8 or not len(crops):
            return self.inner.predict(crops)  # the inner regressor's own checks and messages
        req = _Request(crops)
        with self._cv:
            if self._closed:
                raise RuntimeError("MergingRegressor is closed")
            self._pending.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._collect, name="merge-regressor", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def close(self) -> None:
        """Stop the collector thread after the calls already waiting (the inner regressor stays)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cv:
            self._thread = None

    # ------------------------------------------------------------------ collector thread

    def _collect(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                deadline = self.clock() + self.wait_s
                while (not self._closed and sum(len(r.crops) for r in self._pending) < self.max_rows
                       and len(self._pending) < self._users):
                    left = deadline - self.clock()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = take_batch(self._pending, self.max_rows)
            self._forward(batch)

    def _forward(self, batch: list[_Request]) -> None:
        """One forward for ``batch``; on failure, each request alone (its own error)."""
        try:
            crops = batch[0].crops if len(batch) == 1 else _concat([r.crops for r in batch])
            self.forward_sizes.append(len(crops))
            out = self.inner.predict(crops)
            for r, part in zip(batch, split_rows(out, [len(r.crops) for r in batch]), strict=True):
                r.result = part
        except BaseException as e:  # handed to the caller(s), never lost here
            if len(batch) == 1:
                batch[0].error = e
            else:
                log.debug("merged forward of %d calls failed (%s); running them one by one", len(batch), e)
                for r in batch:
                    self._forward([r])
                return
        for r in batch:
            r.done.set()
