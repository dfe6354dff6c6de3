"""Frames kept on the device (NVDEC with ``on_device=True``): the fast path's stages take a torch
tensor of frames and give what they give for the same frames as a numpy array.

Device frames are CUDA tensors in production; here they are CPU tensors, which take the same
code path (:func:`engine.frames.on_device` is true for any tensor). Real frames of the shared
clip (skipped with a reason when ../shared is absent), real MTCNN weights, random
reconstruction weights.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engine import Engine, EngineConfig
from engine.config import Decoder
from engine.frames import on_device, shrink_area, to_numpy, to_torch, zeros_like_frames
from engine.landmarks import fan_gpu, mtcnn_gpu
from engine.resample import resized_crops
from engine.stages.align import TorchAligner
from engine.stages.keyframe import thumbnails
from engine.stages.source import MediaSource, _uploaded
from engine.structures import FrameBatch
from tests.media import first_frames, make_video

FRAMES = 48


@pytest.fixture(scope="module")
def frames(test_video) -> np.ndarray:
    return np.stack(first_frames(test_video, 8))


def test_helpers_keep_each_kind_where_it_is():
    host = np.zeros((2, 4, 5, 3), np.uint8)
    dev = torch.zeros((2, 4, 5, 3), dtype=torch.uint8)
    assert not on_device(host) and on_device(dev)
    assert isinstance(zeros_like_frames(host, (1, 2, 3)), np.ndarray)
    z = zeros_like_frames(dev, (1, 2, 3))
    assert isinstance(z, torch.Tensor) and z.dtype == torch.uint8 and z.device == dev.device
    t = to_torch(host, "cpu")
    assert isinstance(t, torch.Tensor) and to_torch(t, "cpu") is t
    assert isinstance(to_numpy(dev), np.ndarray) and to_numpy(host) is host


def test_shrinking_by_an_integer_factor_matches_opencv(frames):
    big = np.repeat(np.repeat(frames[:2], 3, axis=1), 3, axis=2)  # 1536², shrunk 3× as 1080p → 360p
    big[:, ::7] = 255 - big[:, ::7]  # make the 3×3 blocks uneven
    want = shrink_area(big, (512, 512))
    got = to_numpy(shrink_area(torch.from_numpy(big), (512, 512)))
    assert want.shape == got.shape == (2, 512, 512, 3)
    diff = np.abs(want.astype(int) - got.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert np.array_equal(want[0], cv2.resize(big[0], (512, 512), interpolation=cv2.INTER_AREA))


def test_each_stage_function_gives_the_same_on_host_and_device_frames(frames):
    dev = torch.from_numpy(frames)
    assert np.array_equal(thumbnails(frames), thumbnails(dev))
    rows = np.array([0, 3, 3, 7])
    regions = np.array([[100, 80, 300, 330], [0, 0, 512, 512], [400, 450, 512, 512], [200, 150, 260, 230]])
    win_host = mtcnn_gpu.gather_windows(frames, rows, regions)
    win_dev = mtcnn_gpu.gather_windows(dev, rows, regions)
    assert isinstance(win_dev, torch.Tensor) and np.array_equal(win_host, win_dev.numpy())
    assert torch.equal(mtcnn_gpu.area_crops(frames, rows, regions, 48, "cpu"),
                       mtcnn_gpu.area_crops(dev, rows, regions, 48, "cpu"))
    ul, br = np.array([[-20, 40], [100, 100], [300, 400]]), np.array([[200, 300], [356, 356], [600, 640]])
    assert torch.equal(fan_gpu.gather_windows(frames, rows[:3], ul, br), fan_gpu.gather_windows(dev, rows[:3], ul, br))
    boxes = np.array([[10, 20, 300, 300], [-40, -10, 500, 500], [0, 0, 224, 224], [100, 90, 150, 150],
                      [5, 7, 700, 690], [60, 60, 200, 200], [0, 0, 1000, 1000], [33, 44, 260, 255]])
    assert torch.equal(resized_crops(frames, boxes, device="cpu"), resized_crops(dev, boxes, device="cpu"))


class DeviceFrames(MediaSource):
    """``MediaSource`` copying each batch to a device in the decode thread, as it does on a GPU for
    the fast path (and a stand-in for NVDEC with ``on_device=True``); the device is the CPU here."""

    def _upload_device(self):
        return "cpu"


def test_pyav_frames_go_to_the_gpu_on_the_fast_path_only():
    from engine.fast import default_source

    assert default_source(EngineConfig(mode="fast", device="cuda:1"), "cuda:1").device == "cuda:1"
    assert default_source(EngineConfig(mode="fast"), "cuda").device == "auto"
    assert default_source(EngineConfig(mode="exact", device="cuda"), "cuda").device is None
    on_cpu = default_source(EngineConfig(mode="fast", device="cpu"), "cpu")
    assert on_cpu.device == "cpu" and on_cpu._upload_device() is None
    if not torch.cuda.is_available():
        assert MediaSource(device="auto")._upload_device() is None


def test_the_exact_path_makes_frames_rgb_on_the_gpu_only_for_stages_that_take_them():
    """On a GPU the exact path's video frames become RGB there (engine.yuv) when its landmark
    backend takes device frames (``mtcnn``, ``file``) and so does every face stage handed in;
    ``fan`` (face_alignment reads host arrays), the CPU, and an engine given a stage that does not
    say it takes them keep FFmpeg's RGB on the host. An engine built on another's loaded stages
    (``Engine(cfg, **engine.components)``, as a worker does between jobs) keeps it. No device
    set: the GPU when torch sees one."""
    from engine.fast import default_source

    def rgb(device, landmarks="mtcnn", **kwargs):
        return default_source(EngineConfig(mode="exact", device=device, landmarks=landmarks),
                              device or "cuda", **kwargs).rgb_device

    assert rgb("cuda:1") == "cuda:1" and rgb("cuda:0", "file") == "cuda:0"
    assert rgb(None) == "auto" and rgb("cpu") is None and rgb("cuda:0", "fan") is None
    assert rgb("cuda:0", device_frames=False) is None
    assert default_source(EngineConfig(mode="fast", device="cuda:0", landmarks="mtcnn"), "cuda:0").rgb_device is None
    from engine.landmarks.mtcnn import MtcnnLandmarker
    from engine.stages.align import Deep3DAligner

    cfg = EngineConfig(device="cuda:1", landmarks="mtcnn")
    assert Engine(cfg).source.rgb_device == "cuda:1"
    mtcnn = MtcnnLandmarker("cpu")
    components = {"landmarker": mtcnn, "detector": mtcnn.detector, "regressor": None}
    assert Engine(cfg, **components, aligner=TorchAligner("cpu")).source.rgb_device == "cuda:1"
    assert Engine(cfg, aligner=Deep3DAligner(1)).source.rgb_device is None
    assert Engine(cfg, landmarker=object()).source.rgb_device is None
    if not torch.cuda.is_available():
        assert MediaSource(rgb_device="auto")._rgb_device() is None


def test_uploading_keeps_the_frames_and_closes_the_decoder_when_stopped_early(frames):
    closed = []

    def decoded():
        try:
            for k in range(0, len(frames), 4):
                yield FrameBatch(frames[k:k + 4], np.arange(k, k + 4), np.arange(k, k + 4) / 25.0)
        finally:
            closed.append(True)

    uploaded = _uploaded(decoded(), "cpu")
    first = next(uploaded)
    assert isinstance(first.images, torch.Tensor) and np.array_equal(first.images.numpy(), frames[:4])
    assert np.array_equal(first.index, np.arange(4))
    uploaded.close()
    assert closed == [True]


def test_the_fast_path_on_device_frames_writes_what_it_writes_on_host_frames(test_video, tmp_path, recon_checkpoint):
    clip = make_video(tmp_path / "clip.mp4", first_frames(test_video, FRAMES), size=(512, 512), fps=25)
    batches = DeviceFrames().frames(clip, 16)
    assert on_device(next(batches).images)  # the stand-in really hands on tensors
    batches.close()
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", mode="fast", batch_size=16,
                       formats=("npz",), num_threads=2)
    arrays = {}
    for name, source in (("host", MediaSource()), ("device", DeviceFrames())):
        landmarker = mtcnn_gpu.RefineMtcnn("cpu", batched_crops=True)  # the CUDA keyframe code, on the CPU
        with Engine(cfg, source=source, landmarker=landmarker, aligner=TorchAligner("cpu")) as engine:
            report = engine.run(clip, tmp_path / name / "clip")
        with np.load(report.outputs["npz"], allow_pickle=False) as z:
            arrays[name] = {k: z[k] for k in z.files}
    host, dev = arrays["host"], arrays["device"]
    assert host["valid"].sum() > FRAMES // 2
    for key in ("landmarks", "transform_params", "crop_box", "coeff", "valid"):
        assert np.array_equal(host[key], dev[key], equal_nan=True), key


def test_nvdec_is_for_the_fast_path_and_says_what_it_needs():
    with pytest.raises(ValueError, match="needs mode fast"):
        EngineConfig(decoder="nvdec")
    assert EngineConfig().decoder == Decoder.PYAV
    assert EngineConfig.from_dict(EngineConfig(mode="fast", decoder="nvdec").to_dict()).decoder == Decoder.NVDEC
    from engine.stages.nvdec import NvdecUnavailable

    with pytest.raises(NvdecUnavailable, match="pip install pynvvideocodec"):
        Engine(EngineConfig(mode="fast", decoder="nvdec", device="cpu"))


def test_the_exact_path_on_frames_made_rgb_on_a_device_writes_what_it_writes_on_ffmpegs(
        test_video, tmp_path, recon_checkpoint):
    """``MediaSource(rgb_device=...)`` (YUV planes to the device, FFmpeg's arithmetic there,
    engine.yuv) through the exact path with its CUDA stages (batched MTCNN crops, the torch
    aligner) run on the CPU: every array of the npz equals the run on FFmpeg's host RGB."""
    from engine.landmarks.mtcnn import MtcnnLandmarker

    clip = make_video(tmp_path / "clip.mp4", first_frames(test_video, FRAMES), size=(512, 512), fps=25)
    batches = MediaSource(rgb_device="cpu").frames(clip, 16)
    assert on_device(next(batches).images)  # RGB made "on the device": a tensor
    batches.close()
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=16,
                       formats=("npz",), num_threads=2)
    arrays = {}
    for name, source in (("host", MediaSource()), ("device", MediaSource(rgb_device="cpu"))):
        landmarker = MtcnnLandmarker("cpu", batch_frames=True, batched_crops=True)
        with Engine(cfg, source=source, landmarker=landmarker, aligner=TorchAligner("cpu")) as engine:
            report = engine.run(clip, tmp_path / name / "clip")
        with np.load(report.outputs["npz"], allow_pickle=False) as z:
            arrays[name] = {k: z[k] for k in z.files}
    host, dev = arrays["host"], arrays["device"]
    assert host["valid"].sum() > FRAMES // 2 and host.keys() == dev.keys()
    for key in host:
        assert np.array_equal(host[key], dev[key], equal_nan=host[key].dtype.kind == "f"), key
