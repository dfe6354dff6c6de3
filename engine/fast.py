"""The fast path: which stages :class:`~engine.pipeline.Engine` is composed of when
``config.mode`` is :attr:`~engine.config.Mode.FAST` (see ``docs/compatibility.md`` for what it
changes, measured).

The fast path is the same engine with other stages swapped in, each built by the engine's own
factory when ``config.mode`` is fast: the tracker by
:func:`~engine.stages.track.tracker_from_config`, the landmarker by :func:`fast_landmarker`, the
regressor in :func:`regressor_precision`, the aligner by :func:`default_aligner` (models lazily,
on the first input). A stage handed to ``Engine(...)`` always wins over the one chosen here.

=============  ==========================================  ==========================================
stage          exact path                                  fast path
=============  ==========================================  ==========================================
tracker        detector on every full frame                :class:`~engine.stages.keyframe.KeyframeTracker`:
                                                           detector on keyframes only, boxes tracked
detector       S3FD / MTCNN on the full frame              the same, on frames shrunk to 640 px
landmarker     face_alignment per frame / MTCNN's points   ``fan_gpu.BatchedFan`` (fp16 on CUDA) /
                                                           ``mtcnn_gpu.RefineMtcnn`` on tracked boxes
aligner        Pillow on CPU; on CUDA the Pillow-exact     the same (crops are bit-identical either way)
               :class:`~engine.stages.align.TorchAligner`
regressor      fp32 (TF32 off)                             fp16 autocast, channels-last, on CUDA
=============  ==========================================  ==========================================

On the CPU the fast path keeps fp32 everywhere (CPU fp16 convolutions are far slower); it still
saves the detector's work on every non-keyframe.
"""

from __future__ import annotations

from engine.config import Decoder, EngineConfig, Mode, cuda_index, name_of
from engine.landmarks import backend_spec

#: Longest side (pixels) of the frames the fast path's detectors look at.
DETECT_MAX_SIDE = 640


def on_gpu(device: str) -> bool:
    return str(device).startswith("cuda")


def fast_landmarker(config: EngineConfig, device: str):
    """The fast path's landmark backend, or None when ``config.landmarks`` has no fast variant
    (``file`` replays saved points: the exact backend is used).

    ``fan`` → :class:`~engine.landmarks.fan_gpu.BatchedFan` (fp16 on CUDA, fp32 on the CPU);
    ``mtcnn`` → :class:`~engine.landmarks.mtcnn_gpu.RefineMtcnn`. Both detect on frames shrunk
    to :data:`DETECT_MAX_SIDE`.
    """
    name = name_of(config.landmarks)
    if name == "fan":
        from engine.landmarks.fan_gpu import BatchedFan

        return BatchedFan(device, precision="fp16" if on_gpu(device) else "fp32", detect_max_side=DETECT_MAX_SIDE)
    if name == "mtcnn":
        from engine.landmarks.mtcnn_gpu import RefineMtcnn

        return RefineMtcnn(device, detect_max_side=DETECT_MAX_SIDE)
    return None


def regressor_precision(config: EngineConfig, device: str) -> str:
    """``"fp16"`` for the fast path on CUDA, else ``"fp32"`` (the reference's numbers)."""
    return "fp16" if config.mode == Mode.FAST and on_gpu(device) else "fp32"


def default_source(config: EngineConfig, device: str, *, device_frames: bool = True):
    """The source ``config.decoder`` names: PyAV (:class:`~engine.stages.source.MediaSource`),
    or NVDEC with the frames kept on ``device`` (:class:`~engine.stages.nvdec.NvdecSource`).

    PyAV's frames on the fast path are copied to the GPU in the decode thread (``config.device``,
    or the GPU when torch sees one): its stages then work on device frames as with NVDEC, and the
    host holds only the batches being decoded.

    On the exact path on a GPU, when the landmark backend takes device frames
    (:attr:`~engine.landmarks.BackendSpec.device_frames`: ``mtcnn``, ``file``) and so do the face
    stages handed to the engine (``device_frames``: :func:`engine.frames.takes_device_frames` of
    each), a video's frames become RGB on that GPU from their YUV planes
    (:mod:`engine.yuv`: FFmpeg's arithmetic, the same bytes; FFmpeg converts the frames it cannot
    vouch for). This takes FFmpeg's RGB conversion off the host, the exact path's largest CPU cost
    after MTCNN: 805.5 against 736.5 frames/s on two H200s (docs/PERFORMANCE.md). Otherwise the
    frames stay host arrays, as the reference's.

    Raises:
        NvdecUnavailable: ``nvdec`` without PyNvVideoCodec or without a CUDA ``device``.
    """
    if config.decoder == Decoder.NVDEC:
        from engine.stages.nvdec import INSTALL_HINT, NvdecSource, NvdecUnavailable

        if not on_gpu(device):
            raise NvdecUnavailable(f"{INSTALL_HINT} (the run's device is {device}, not a CUDA GPU)")
        return NvdecSource(gpu_id=cuda_index(device), on_device=True)
    from engine.stages.source import MediaSource

    if config.mode == Mode.FAST:
        return MediaSource(device=config.device or "auto", decode_threads=config.decode_threads)
    rgb_device = None
    if device_frames and backend_spec(config.landmarks).device_frames:
        if not config.device:
            rgb_device = "auto"  # the GPU when torch sees one (as the engine picks), else FFmpeg on the host
        elif on_gpu(config.device):
            rgb_device = config.device
    return MediaSource(decode_threads=config.decode_threads, rgb_device=rgb_device)


def default_aligner(config: EngineConfig, device: str):
    """The aligner both paths use by default: on CUDA the Pillow-exact
    :class:`~engine.stages.align.TorchAligner` (crops stay on the GPU for the regressor), on the
    CPU Pillow itself (:class:`~engine.stages.align.Deep3DAligner`), whose crops are the same bits."""
    from engine.stages.align import Deep3DAligner, TorchAligner

    if on_gpu(device):
        return TorchAligner(device, keep_on_device=True)
    return Deep3DAligner(config.num_threads)
