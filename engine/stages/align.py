"""Stage 6, the aligner: frames + an :class:`~engine.structures.AlignPlan` → 224×224 crops.

The default, :class:`Deep3DAligner`, is Deep3DFaceRecon's ``align_img`` (:mod:`engine.align`),
bit for bit. :class:`TorchAligner` makes the same fit and the same crops, bit for bit, but
resizes only each crop's window with :mod:`engine.resample` on a torch device (GPU crops
without Pillow; it may keep the crops on the device for the regressor). A frame whose
planned landmarks admit no fit is aligned with the template and gets the aligner's own
reason ``"bad_landmarks"`` in :attr:`AlignedBatch.reason`; the landmarker's verdict is left
as it was (:class:`~engine.structures.FrameResults` joins them).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from engine.align import align_batch, fit_batch
from engine.checks import check_shape
from engine.structures import AlignedBatch, AlignPlan, FrameBatch

if TYPE_CHECKING:
    import torch


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


class TorchAligner:
    """Deep3D's POS fit (:func:`engine.align.fit_batch`) with Pillow-exact crops from :mod:`engine.resample`.

    Same ``trans_params``, ``crop_box``, template fallback, ``bad_landmarks`` handling and
    crop pixels as :class:`Deep3DAligner` (bit for bit, with the installed Pillow's pass
    order), but only each crop's source window is copied to ``device`` and resized there.

    Args:
        device: torch device of the crops (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        keep_on_device: give :attr:`AlignedBatch.crops` as a uint8 (B, 224, 224, 3) torch
            tensor on ``device`` (for :meth:`engine.regressor.Regressor.predict` without a host
            round trip) instead of a numpy array.
        max_bytes: device memory budget of one chunk of frames (bytes); None:
            :data:`engine.resample.DEFAULT_MAX_BYTES`.
        pass_order: :data:`engine.resample.HORIZONTAL_FIRST` or :data:`engine.resample.PILLOW13`;
            None follows the installed Pillow (what :class:`Deep3DAligner` gives here).
    """

    #: Frames may come as a torch tensor (on this aligner's device or not).
    device_frames = True

    def __init__(self, device: str | torch.device = "cpu", *, keep_on_device: bool = False,
                 max_bytes: int | None = None, pass_order: str | None = None) -> None:
        import torch  # torch only when this aligner is used: importing engine.stages stays light

        self.device = torch.device(device)
        self.keep_on_device = keep_on_device
        self.max_bytes = max_bytes
        self.pass_order = pass_order
        from engine.resample import TapsCache

        self._taps = TapsCache()  # a video's crops resize its frames to a few sizes, batch after batch

    def __call__(self, frames: FrameBatch, plan: AlignPlan) -> AlignedBatch:
        from engine.resample import DEFAULT_MAX_BYTES, resized_crops

        images = frames.images
        check_shape(images, ("B", "H", "W", "3"), "images")
        check_shape(plan.lm_img_ydown, (images.shape[0], "K", "2"), "lm_img_ydown")
        height, width = images.shape[1:3]
        fits = fit_batch(width, height, plan.lm_img_ydown, plan.use_template, bad_landmarks="template")
        crops = resized_crops(images, fits.crop_box, device=self.device, max_bytes=self.max_bytes or DEFAULT_MAX_BYTES,
                              pass_order=self.pass_order, taps_cache=self._taps)
        return fits.with_crops(crops if self.keep_on_device else crops.cpu().numpy())

    def close(self) -> None:
        """Nothing to release (kept for symmetry with :class:`Deep3DAligner`)."""
