"""engine.yuv: FFmpeg's YUV 4:2:0 → RGB arithmetic as a torch function, checked byte for byte
against the installed PyAV (``engine.avcompat.to_rgb24``, the engine's host conversion) on random
planes and on real decoded frames, and the decode path that hands the planes to a device
(``iter_frames(rgb_device=...)``; the CPU stands in for the GPU: integer arithmetic gives the
same bytes on every device).
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from engine import yuv  # noqa: E402
from engine.avcompat import to_rgb24  # noqa: E402
from engine.frames import to_numpy  # noqa: E402
from engine.sources import _Batch, iter_frames  # noqa: E402
from tests import media  # noqa: E402

COLORSPACE = {"bt601": 2, "bt709": 1}
COLOR_RANGE = {False: 1, True: 2}


def _random_planes(rng, h, w):
    c = ((h + 1) // 2, (w + 1) // 2)
    return (rng.integers(0, 256, (h, w), dtype=np.uint8), rng.integers(0, 256, c, dtype=np.uint8),
            rng.integers(0, 256, c, dtype=np.uint8))


def test_every_matrix_and_range_agrees_with_this_machines_ffmpeg():
    agreed = yuv.agrees_with_ffmpeg()
    if platform.machine() in ("x86_64", "AMD64"):  # libswscale's SSSE3 routine, which engine.yuv follows
        assert agreed == {("bt601", False), ("bt601", True), ("bt709", False), ("bt709", True)}
    assert yuv.agrees_with_ffmpeg() is agreed  # asked once per process


@pytest.mark.parametrize("h,w", [(2, 2), (36, 64), (48, 251), (100, 1920)])
def test_random_planes_give_ffmpegs_bytes(h, w):
    """Each agreed matrix and range, sizes from 2×2 to a 1080p row width, odd widths included."""
    rng = np.random.default_rng(h * 10_000 + w)
    y, u, v = _random_planes(rng, h, w)
    assert yuv.agrees_with_ffmpeg(), "no matrix agrees on this machine"
    for matrix, full in sorted(yuv.agrees_with_ffmpeg()):
        frame = yuv.frame_of(y, u, v, colorspace=COLORSPACE[matrix], color_range=COLOR_RANGE[full])
        assert yuv.frame_matrix(frame) == (matrix, full)
        got = yuv.to_rgb(*(torch.from_numpy(p) for p in yuv.planes(frame)), yuv.coefficients(matrix, full))
        assert got.dtype == torch.uint8 and got.shape == (h, w, 3)
        assert np.array_equal(got.numpy(), to_rgb24(frame)), (matrix, full)


def test_a_batch_of_planes_converts_at_once():
    rng = np.random.default_rng(3)
    frames = [yuv.frame_of(*_random_planes(rng, 24, 40)) for _ in range(3)]
    stacked = [torch.from_numpy(np.stack([np.ascontiguousarray(yuv.planes(f)[k]) for f in frames])) for k in range(3)]
    got = yuv.to_rgb(*stacked, yuv.coefficients("bt601", False)).numpy()
    assert np.array_equal(got, np.stack([to_rgb24(f) for f in frames]))


def test_frames_it_cannot_vouch_for_are_left_to_ffmpeg():
    rng = np.random.default_rng(4)
    y, u, v = _random_planes(rng, 24, 40)
    assert yuv.frame_matrix(yuv.frame_of(y, u, v, colorspace=9)) is None  # BT.2020
    assert yuv.frame_matrix(yuv.frame_of(y, u, v, colorspace=4)) is None  # FCC
    odd = av.VideoFrame(40, 23, "yuv420p")  # odd height: libswscale's general path
    assert yuv.frame_matrix(odd) is None
    full_chroma = av.VideoFrame(40, 24, "yuv444p")
    assert yuv.frame_matrix(full_chroma) is None


def _decoded(path, **kw):
    batches = list(iter_frames(path, 16, convert_threads=0, **kw))
    images = [to_numpy(b.images) for b in batches]
    return (np.concatenate(images), np.concatenate([b.index for b in batches]),
            np.concatenate([b.timestamps for b in batches]), [type(b.images) for b in batches])


@pytest.mark.parametrize("start", [0, 150])
def test_the_shared_clips_frames_made_on_a_device_are_ffmpegs(test_video, start):
    """All 200 frames of the shared clip (MPEG-4, 512²): planes to the device, RGB there, the same
    bytes, indices and timestamps as FFmpeg's conversion on the host, from frame 0 and a resume."""
    host = _decoded(test_video, start=start)
    device = _decoded(test_video, start=start, rgb_device="cpu")
    assert set(device[3]) == {torch.Tensor} and set(host[3]) == {np.ndarray}
    for a, b in zip(host[:3], device[:3], strict=True):
        assert np.array_equal(a, b)
    assert len(device[0]) == 200 - start


def test_h264_frames_with_a_conversion_pool_made_on_a_device_are_ffmpegs(tmp_path):
    if not media.has_encoder("libx264"):
        pytest.skip("PyAV build has no libx264 encoder")
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (72, 128, 3), dtype=np.uint8) for _ in range(21)]
    path = media.make_video(tmp_path / "noise.mp4", frames, codec="libx264")
    host = _decoded(path)
    device = list(iter_frames(path, 8, convert_threads=3, rgb_device="cpu"))
    assert [len(b) for b in device] == [8, 8, 5]
    assert np.array_equal(np.concatenate([b.images.numpy() for b in device]), host[0])


def test_a_rotated_video_is_converted_by_ffmpeg_and_still_reaches_the_device(tmp_path):
    path = media.make_video(tmp_path / "rot.mp4", 5, size=(64, 32), rotation=90)
    host, device = _decoded(path), _decoded(path, rgb_device="cpu")
    assert device[0].shape == (5, 64, 32, 3) and set(device[3]) == {torch.Tensor}
    assert np.array_equal(host[0], device[0])


def test_a_batch_mixing_matrices_and_formats_gives_each_frame_ffmpegs_bytes():
    """Planes go to the device for the frames of the batch's first matrix; a frame of another
    matrix, an unsupported colour space or another pixel format is converted by FFmpeg on the host."""
    rng = np.random.default_rng(6)
    frames = [yuv.frame_of(*_random_planes(rng, 24, 40), colorspace=cs) for cs in (2, 1, 2, 9)]
    y444 = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    frames.append(yuv.frame_of(y444, y444[::-1].copy(), y444[:, ::-1].copy(), fmt="yuv444p"))
    batch = _Batch(8, (40, 24), 0, None, "cpu")
    for k, frame in enumerate(frames):
        batch.add(frame, k, k / 25)
    done, failed = batch.finish()
    assert failed is None and isinstance(done.images, torch.Tensor) and len(done) == 5
    assert batch.matrix == ("bt601", False) and sorted(batch.on_host) == [1, 3, 4]
    assert np.array_equal(done.images.numpy(), np.stack([to_rgb24(f) for f in frames]))
