"""Stage 6, the aligner: frames + an :class:`~engine.structures.AlignPlan` → 224×224 crops.

The default, :class:`Deep3DAligner`, is Deep3DFaceRecon's ``align_img`` (:mod:`engine.align`),
bit for bit. A frame whose planned landmarks admit no fit is aligned with the template and
gets the aligner's own reason ``"bad_landmarks"`` in :attr:`AlignedBatch.reason`; the
landmarker's verdict is left as it was (:class:`~engine.structures.FrameResults` joins them).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from engine.align import align_batch
from engine.structures import AlignedBatch, AlignPlan, FrameBatch


@runtime_checkable
class Aligner(Protocol):
    """Cuts the network's input crops."""

    def __call__(self, frames: FrameBatch, plan: AlignPlan) -> AlignedBatch:
        """One crop per frame, frame-aligned with ``frames`` (never raises for a bad frame)."""
        ...


class Deep3DAligner:
    """Deep3D's POS fit and Pillow crop, frames in parallel on a thread pool.

    Args:
        num_threads: threads aligning the frames of a batch (speed only; results do not
            depend on it); 1 aligns in the calling thread.
    """

    def __init__(self, num_threads: int = 1) -> None:
        self.num_threads = num_threads
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, frames: FrameBatch, plan: AlignPlan) -> AlignedBatch:
        if self.num_threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="align")
        return align_batch(frames.images, plan.lm_img_ydown, plan.use_template, executor=self._pool,
                           bad_landmarks="template")

    def close(self) -> None:
        """Stop the thread pool (a later call starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
