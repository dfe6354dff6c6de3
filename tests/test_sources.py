"""Discovery, probing and streaming decode (engine.sources) on real and generated media."""

from __future__ import annotations

import threading
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import EngineConfig
from engine.errors import DecodeError, InputError
from engine.sources import (
    InputItem,
    TruncatedVideoError,
    discover_inputs,
    iter_frames,
    prefetch,
    probe,
)
from tests import media


def _decode_all(path, batch_size=8, start=0):
    batches = list(iter_frames(path, batch_size, start=start))
    index = np.concatenate([b.index for b in batches])
    return batches, index, np.concatenate([b.timestamps for b in batches])


# --- discovery ----------------------------------------------------------------------------


def test_discover_folder_recursive_sorted_mixed_case_hidden_skipped(tmp_path):
    root = tmp_path / "in"
    for rel in [
        "b/clip.MP4", "a.jpg", "c/d/e.Mov", "z.PNG", "y.webm", "x.JPEG", "w.mkv", "v.avi",
        ".hidden.mp4", ".cache/inner.mp4", "notes.txt", "b/readme.md",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")

    items = discover_inputs([root])

    assert [i.rel_stem.as_posix() for i in items] == ["a", "b/clip", "c/d/e", "v", "w", "x", "y", "z"]
    assert all(i.root == root for i in items)
    assert items[1].path == root / "b" / "clip.MP4"
    assert items[1].kind == "video" and items[0].kind == "image"
    assert items[2].output_path(tmp_path / "out", ".mat") == tmp_path / "out" / "c" / "d" / "e.mat"


def test_discover_file_and_duplicates(tmp_path):
    f = media.make_empty_file(tmp_path / "my.clip.mp4")
    items = discover_inputs([f, str(f), tmp_path])
    assert items == [InputItem(f, None, Path("my.clip"))]


def test_discover_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        discover_inputs([tmp_path / "missing.mp4"])
    with pytest.raises(InputError, match=r"unsupported file type '\.gif'"):
        discover_inputs([media.make_empty_file(tmp_path / "anim.gif")])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = media.make_empty_file(tmp_path / "a" / "clip.mp4")
    b = media.make_empty_file(tmp_path / "b" / "clip.mov")
    with pytest.raises(InputError, match="would write the same outputs"):
        discover_inputs([a, b])


def test_discover_same_rel_stem_from_two_folders_collides(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        media.make_empty_file(tmp_path / d / "clip.mp4")
    with pytest.raises(InputError, match=r"clip\.\*"):
        discover_inputs([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "empty").mkdir()
    assert discover_inputs([tmp_path / "empty"]) == []


# --- the shared real clip -------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_decoded(test_video):
    batches, index, times = _decode_all(test_video, batch_size=64)
    return {"sizes": [len(b) for b in batches], "index": index, "times": times,
            "frame150": batches[150 // 64].images[150 % 64].copy(), "first": batches[0]}


def test_probe_shared_clip(test_video):
    info = probe(test_video)
    assert (info.kind, info.width, info.height) == ("video", 512, 512)
    assert info.fps == pytest.approx(25.0)
    assert info.frame_count == 200
    assert info.duration == pytest.approx(8.0, abs=0.05)
    assert (info.rotation, info.codec, info.has_audio) == (0, "mpeg4", True)


def test_iter_frames_shared_clip(clip_decoded):
    assert clip_decoded["sizes"] == [64, 64, 64, 8]
    assert np.array_equal(clip_decoded["index"], np.arange(200))
    assert clip_decoded["index"].dtype == np.int64
    times = clip_decoded["times"]
    assert times.dtype == np.float64
    assert np.all(np.diff(times) > 0)
    np.testing.assert_allclose(times, np.arange(200) / 25.0, atol=1e-6)
    first = clip_decoded["first"]
    assert first.images.shape == (64, 512, 512, 3) and first.images.dtype == np.uint8
    assert 20 < first.images.mean() < 235  # a real picture, not a blank buffer


def test_iter_frames_start_resumes(test_video, clip_decoded):
    batches, index, times = _decode_all(test_video, batch_size=32, start=150)
    assert [len(b) for b in batches] == [32, 18]
    assert np.array_equal(index, np.arange(150, 200))
    np.testing.assert_allclose(times, clip_decoded["times"][150:])
    assert np.array_equal(batches[0].images[0], clip_decoded["frame150"])
    assert list(iter_frames(test_video, 8, start=500)) == []


def test_frames_match_opencv_like_pirender(test_video):
    """PIRender decodes with cv2 (BGR → RGB): the pixels must be identical."""
    cv2 = pytest.importorskip("cv2")
    capture = cv2.VideoCapture(str(test_video))
    try:
        reference = []
        for _ in range(5):
            ok, bgr = capture.read()
            assert ok
            reference.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    ours = next(iter_frames(test_video, 5)).images
    assert np.array_equal(ours, np.stack(reference))


def test_iter_frames_memory_is_per_batch(test_video):
    whole_video = 200 * 512 * 512 * 3
    tracemalloc.start()
    try:
        n = sum(len(b) for b in iter_frames(test_video, batch_size=4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 200
    assert peak < 12 * 512 * 512 * 3 < whole_video / 10


def test_prefetch_matches_direct_decode(test_video, clip_decoded):
    index = np.concatenate([b.index for b in prefetch(iter_frames(test_video, 50), depth=2)])
    assert np.array_equal(index, clip_decoded["index"])


# --- generated media ------------------------------------------------------------------------


def test_generated_video_roundtrip_with_audio(tmp_path):
    path = media.make_video(tmp_path / "q.mp4", 12, size=(64, 32), with_audio=True)
    info = probe(path)
    assert (info.width, info.height, info.frame_count, info.has_audio) == (64, 32, 12, True)
    batches, _, times = _decode_all(path, batch_size=5)
    assert [len(b) for b in batches] == [5, 5, 2]
    np.testing.assert_allclose(times, np.arange(12) / 25.0, atol=1e-6)
    # Quadrant colours survive encoding (TL red, BR white) in the stored orientation.
    img = batches[0].images[0].astype(int)
    assert np.abs(img[4, 4] - media.QUADRANT_COLOURS[0]).max() < 20
    assert np.abs(img[-5, -5] - media.QUADRANT_COLOURS[3]).max() < 20


@pytest.mark.parametrize("suffix,codec", [(".mp4", "mpeg4"), (".mkv", "mpeg4"), (".mp4", "libx264")])
def test_vfr_timestamps_are_real(tmp_path, suffix, codec):
    if not media.has_encoder(codec):
        pytest.skip(f"PyAV build has no {codec} encoder")
    path = media.make_video(tmp_path / f"vfr{suffix}", 11, codec=codec, vfr=True)
    _, index, times = _decode_all(path, batch_size=4)
    assert np.array_equal(index, np.arange(11))
    np.testing.assert_allclose(times, media.vfr_timestamps(11), atol=1e-3)
    assert not np.allclose(np.diff(times), np.diff(times)[0])  # really variable


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_applied(tmp_path, rotation):
    src = media.quadrant_frame((64, 32))
    path = media.make_video(tmp_path / f"rot{rotation}.mp4", [src] * 3, rotation=rotation)
    info = probe(path)
    assert info.rotation == rotation
    expect = np.rot90(src, k=-rotation // 90)  # clockwise
    assert (info.height, info.width) == expect.shape[:2]
    batches, _, _ = _decode_all(path)
    got = batches[0].images[0]
    assert got.shape == expect.shape
    assert np.abs(got.astype(int) - expect.astype(int)).mean() < 8
    try:  # an independent reader: OpenCV applies the display matrix too
        import cv2
    except ImportError:
        return
    capture = cv2.VideoCapture(str(path))
    ok, bgr = capture.read()
    capture.release()
    assert ok and np.array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), got)


def test_image_input_like_deep3d_test_py(tmp_path, test_images):
    path = test_images / "000002.jpg"
    info = probe(path)
    assert (info.kind, info.width, info.height) == ("image", 423, 594)
    assert (info.frame_count, info.codec, info.fps) == (1, "jpeg", 0.0)
    (batch,) = list(iter_frames(path, 8))
    expect = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(batch.images[0], expect)
    assert batch.index.tolist() == [0] and batch.timestamps.tolist() == [0.0]
    assert list(iter_frames(path, 8, start=1)) == []


def test_image_exif_orientation_not_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to view"; Deep3D ignores it, so do we
    Image.fromarray(media.quadrant_frame((64, 32))).save(path, exif=exif)
    (batch,) = list(iter_frames(path, 1))
    assert batch.images.shape == (1, 32, 64, 3)
    assert (probe(path).width, probe(path).height) == (64, 32)


def _bad_inputs(tmp_path, good):
    t = tmp_path
    return {
        "empty": (media.make_empty_file(t / "clip.mp4"), InputError, "clip.mp4: file is empty (0 bytes)"),
        "text": (
            media.make_text_file(t / "x.mp4"),
            DecodeError,
            "x.mp4: not a video FFmpeg can read (invalid data found when processing input)",
        ),
        "no_moov": (media.make_truncated_copy(good, t / "cut.mp4", 0.6), DecodeError, "no 'moov'"),
        "audio": (media.make_audio_only(t / "a.mp4"), DecodeError, "a.mp4: has no video stream (audio only)"),
        "image": (media.make_text_file(t / "f.jpg"), DecodeError, "f.jpg: not an image Pillow can read"),
        "missing": (t / "gone.mp4", InputError, "gone.mp4: no such file"),
        "suffix": (media.make_text_file(t / "a.txt"), InputError, "unsupported file type '.txt'"),
    }


@pytest.mark.parametrize("case", ["empty", "text", "no_moov", "audio", "image", "missing", "suffix"])
def test_bad_inputs_raise_readable_errors(tmp_path, case):
    good = media.make_video(tmp_path / "good.mp4", 20)
    path, error, message = _bad_inputs(tmp_path, good)[case]
    for call in (lambda: probe(path), lambda: list(iter_frames(path, 4))):
        with pytest.raises(error) as info:
            call()
        text = str(info.value)
        assert message in text
        assert "\n" not in text
        assert str(path) in text
    if error is InputError:
        assert not isinstance(info.value, DecodeError)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_truncated_mid_stream_yields_frames_then_raises(tmp_path, suffix):
    good = media.make_video(tmp_path / f"good{suffix}", 50, faststart=suffix == ".mp4")
    cut = media.make_truncated_copy(good, tmp_path / f"cut{suffix}", 0.5)
    assert probe(cut).frame_count == 50  # the index survived
    got = []
    with pytest.raises(TruncatedVideoError, match=r"decoding stopped at frame \d+") as info:
        for batch in iter_frames(cut, 8):
            got.extend(batch.index.tolist())
    assert 5 < len(got) < 45
    assert got == list(range(len(got)))
    assert info.value.decoded_frames == len(got)
    assert isinstance(info.value, DecodeError)
    assert next(iter_frames(good, 64)).index.tolist() == list(range(50))  # the intact file passes


def test_iter_frames_argument_checks(tmp_path):
    path = media.make_video(tmp_path / "q.mp4", 2)
    with pytest.raises(ValueError, match="batch_size"):
        iter_frames(path, 0)
    with pytest.raises(ValueError, match="start"):
        iter_frames(path, 1, start=-1)


def test_make_720p_from_clip(tmp_path, test_video):
    out = media.make_720p_from_clip(test_video, tmp_path / "hd.mp4", 6)
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (1280, 720, 6)


# --- colour conversion off the decode thread ------------------------------------------------


def _decode_with(path, threads, batch_size=7, start=0, **kw):
    batches = list(iter_frames(path, batch_size, start=start, convert_threads=threads, **kw))
    return ([len(b) for b in batches], np.concatenate([b.images for b in batches]),
            np.concatenate([b.index for b in batches]), np.concatenate([b.timestamps for b in batches]))


@pytest.mark.parametrize("start", [0, 150])
def test_convert_threads_keep_pixels_order_and_timestamps(test_video, clip_decoded, start):
    """RGB conversion in a pool of threads gives the frames of the decode thread, in order, with the
    same indices and timestamps, from frame 0 and from a resume start frame."""
    inline = _decode_with(test_video, 0, start=start)
    pooled = _decode_with(test_video, 3, start=start)
    assert pooled[0] == inline[0] == [7] * ((200 - start) // 7) + ([(200 - start) % 7] if (200 - start) % 7 else [])
    assert np.array_equal(pooled[1], inline[1])
    assert np.array_equal(pooled[2], np.arange(start, 200)) and np.array_equal(pooled[2], inline[2])
    np.testing.assert_array_equal(pooled[3], clip_decoded["times"][start:])
    assert np.array_equal(pooled[1][150 - start], clip_decoded["frame150"])


def test_convert_threads_vfr_rotation_and_distinct_frames(tmp_path):
    """Distinct frames (a counter drawn in each) keep their order through the pool; VFR timestamps
    and the display rotation are those of the decode thread."""
    frames = []
    for i in range(23):
        f = media.quadrant_frame((64, 32))
        f[:8, : 2 * (i + 1)] = 0  # a bar whose length is the frame number
        frames.append(f)
    path = media.make_video(tmp_path / "vfr_rot.mkv", frames, vfr=True)
    rotated = media.make_video(tmp_path / "rot.mp4", frames[:5], rotation=90)
    inline, pooled = _decode_with(path, 1, batch_size=4), _decode_with(path, 4, batch_size=4)
    assert pooled[0] == inline[0] == [4, 4, 4, 4, 4, 3]
    assert np.array_equal(pooled[1], inline[1])
    np.testing.assert_allclose(pooled[3], media.vfr_timestamps(23), atol=1e-3)
    assert np.array_equal(pooled[3], inline[3])
    bars = (pooled[1][:, :8, :, :].max(axis=-1) < 40).sum(axis=(1, 2)) / 8
    assert np.all(np.diff(bars) > 0)  # increasing bar length: frame order kept
    rot_inline, rot_pooled = _decode_with(rotated, 0), _decode_with(rotated, 2)
    assert rot_pooled[1].shape == (5, 64, 32, 3) and np.array_equal(rot_pooled[1], rot_inline[1])


def test_convert_threads_truncated_file_yields_the_same_frames_then_raises(tmp_path):
    """With FFmpeg's conversion on the decode thread, in a pool, or the RGB made on a device
    (engine.yuv; the CPU here): the same frames, then the same error."""
    good = media.make_video(tmp_path / "good.mkv", 50)
    cut = media.make_truncated_copy(good, tmp_path / "cut.mkv", 0.5)
    got, pixels = {}, {}
    for threads, rgb_device in ((0, None), (3, None), (0, "cpu"), (3, "cpu")):
        key = (threads, rgb_device)
        got[key], pixels[key] = [], []
        with pytest.raises(TruncatedVideoError) as info:
            for batch in iter_frames(cut, 8, convert_threads=threads, rgb_device=rgb_device):
                got[key].extend(batch.index.tolist())
                pixels[key].append(np.asarray(batch.images))
        assert info.value.decoded_frames == len(got[key])
    assert len({tuple(v) for v in got.values()}) == 1 and got[(0, None)] == list(range(len(got[(0, None)])))
    for key in pixels:
        assert np.array_equal(np.concatenate(pixels[key]), np.concatenate(pixels[(0, None)])), key


def test_convert_threads_stop_when_the_consumer_stops(test_video):
    """Closing the iterator after one batch ends the conversion threads (nothing keeps decoding)."""
    frames = iter_frames(test_video, 8, convert_threads=3)
    assert len(next(frames)) == 8
    assert any(t.name.startswith("rgb") for t in threading.enumerate())
    frames.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("rgb")]
    with pytest.raises(ValueError, match="convert_threads"):
        iter_frames(test_video, 8, convert_threads=-1)


def test_media_source_passes_convert_threads(test_video, clip_decoded):
    from engine.stages.source import MediaSource

    source = MediaSource(convert_threads=2)
    index = np.concatenate([b.index for b in source.frames(test_video, 64, start=10)])
    assert np.array_equal(index, clip_decoded["index"][10:])


# --- FFmpeg's decoding threads ---------------------------------------------------------------


def _frames_with(path, decode_threads, start=0):
    """(images, index, timestamps) decoded with ``decode_threads`` FFmpeg threads."""
    return _decode_with(path, 0, 16, start, decode_threads=decode_threads)[1:]


@pytest.mark.parametrize("start", [0, 150])
def test_decode_threads_give_the_same_frames(test_video, clip_decoded, start):
    """One decoding thread, FFmpeg's choice, or four: the shared clip's frames are the same bits, in
    the same order, with the same indices and timestamps, from frame 0 and from a resume start."""
    auto = _frames_with(test_video, 0, start)
    for threads in (1, 4):
        got = _frames_with(test_video, threads, start)
        assert np.array_equal(got[0], auto[0]) and np.array_equal(got[1], auto[1])
        assert np.array_equal(got[2], auto[2])
    assert np.array_equal(auto[1], np.arange(start, 200))
    assert np.array_equal(auto[0][150 - start], clip_decoded["frame150"])


def test_decode_threads_same_frames_of_an_h264_clip_with_b_frames(tmp_path):
    """The same on H.264 (frame threading reorders work across B-frames): distinct frames, one
    thread against FFmpeg's choice."""
    if not media.has_encoder("libx264"):
        pytest.skip("PyAV build has no libx264 encoder")
    frames = []
    for i in range(40):
        f = media.quadrant_frame((96, 64))
        f[:8, : 2 * (i + 1)] = 0
        frames.append(np.roll(f, i, axis=0))
    path = media.make_video(tmp_path / "h264.mp4", frames, codec="libx264")
    one, auto = _frames_with(path, 1), _frames_with(path, 0)
    assert len(one[0]) == 40
    for a, b in zip(one, auto, strict=True):
        assert np.array_equal(a, b)


def test_decode_threads_reach_ffmpeg_and_are_checked(test_video, monkeypatch):
    """``MediaSource(decode_threads=N)`` (what ``EngineConfig.decode_threads`` builds) sets the
    stream's ``thread_count`` to N; a negative count is refused at the call."""
    from engine import sources
    from engine.fast import default_source
    from engine.stages.source import MediaSource

    seen = []
    opened = sources._open_video_stream

    def spy(container, path, threads=0):
        stream = opened(container, path, threads)
        seen.append(stream.thread_count)
        return stream

    monkeypatch.setattr(sources, "_open_video_stream", spy)
    assert len(list(MediaSource(decode_threads=1).frames(test_video, 64))) == 4
    source = default_source(EngineConfig(device="cpu", decode_threads=3), "cpu")
    assert len(list(source.frames(test_video, 64))) == 4
    assert seen == [1, 3]
    with pytest.raises(ValueError, match="decode_threads"):
        iter_frames(test_video, 8, decode_threads=-1)
    with pytest.raises(ValueError, match="decode_threads"):
        EngineConfig(decode_threads=-1)
    cfg = EngineConfig(decode_threads=2)
    assert EngineConfig.from_dict(cfg.to_dict()).decode_threads == 2


# --- NVDEC (optional) -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix,codec", [(".mp4", "mpeg4"), (".mkv", "mpeg4"), (".mp4", "libx264")])
def test_nvdec_presentation_times_match_decoded_timestamps(tmp_path, suffix, codec):
    """The NVDEC source takes its timestamps from the demuxer's packets: the same times as decoding."""
    from engine.stages.nvdec import presentation_times

    if not media.has_encoder(codec):
        pytest.skip(f"PyAV build has no {codec} encoder")
    path = media.make_video(tmp_path / f"vfr{suffix}", 11, codec=codec, vfr=True)
    _, _, times = _decode_all(path, batch_size=4)
    np.testing.assert_allclose(presentation_times(path), times, atol=1e-9)


def test_nvdec_presentation_times_shared_clip(test_video, clip_decoded):
    from engine.stages.nvdec import presentation_times

    np.testing.assert_allclose(presentation_times(test_video), clip_decoded["times"], atol=1e-9)


def test_nvdec_absent_says_how_to_install(monkeypatch):
    import sys

    from engine.stages import nvdec

    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)  # import fails as when not installed
    with pytest.raises(nvdec.NvdecUnavailable) as info:
        nvdec.NvdecSource()
    text = str(info.value)
    assert "pip install pynvvideocodec" in text and "NVIDIA" in text and "\n" not in text


def _nvdec_or_skip():
    from engine.stages import nvdec

    try:
        return nvdec.NvdecSource(fallback=False)
    except nvdec.NvdecUnavailable as e:
        pytest.skip(f"no NVDEC here (needs PyNvVideoCodec and an NVIDIA GPU): {e}")


@pytest.mark.parametrize("start", [0, 37])
def test_nvdec_frames_match_pyav(tmp_path, test_video, start):
    """On a GPU machine with PyNvVideoCodec: same frame count, indices and timestamps as PyAV, and
    pixels within a few levels (NVDEC's colour conversion rounds differently)."""
    source = _nvdec_or_skip()
    path = media.make_720p_from_clip(test_video, tmp_path / "hd.mp4", 60)  # H.264 when available
    ours = list(source.frames(path, 16, start=start))
    ref = list(iter_frames(path, 16, start=start))
    assert [len(b) for b in ours] == [len(b) for b in ref]
    for a, b in zip(ours, ref, strict=True):
        assert a.images.shape == b.images.shape and a.images.dtype == np.uint8
        assert np.array_equal(a.index, b.index)
        np.testing.assert_allclose(a.timestamps, b.timestamps, atol=1e-6)
        assert np.abs(a.images.astype(int) - b.images.astype(int)).mean() < 3


class _FakeNvc:
    """A stand-in for the PyNvVideoCodec module: its ``SimpleDecoder`` lends PyAV's RGB frames as
    DLPack objects, ``keep`` of them at most (fewer: a truncated stream), and records what it
    was asked for. Lets the CPU run NvdecSource's own logic (batches, seeking, the end of the
    stream, frames kept on the device or copied to the host)."""

    class OutputColorType:
        RGB = "rgb"

    def __init__(self, keep: int | None = None) -> None:
        self.keep, self.decoders = keep, []
        nvc = self

        class SimpleDecoder:
            def __init__(self, path, gpu_id, use_device_memory, output_color_type):
                assert use_device_memory and output_color_type == "rgb"
                frames = [im for b in iter_frames(path, 64) for im in b.images]
                self.frames, self.pos, self.asked = frames[: nvc.keep], 0, []
                nvc.decoders.append(self)

            def seek_to_index(self, index):
                self.pos = index

            def get_batch_frames(self, n):
                self.asked.append((self.pos, n))
                out = self.frames[self.pos:self.pos + n]
                self.pos += len(out)
                return [_DlpackFrame(im) for im in out]

        self.SimpleDecoder = SimpleDecoder


class _DlpackFrame:
    def __init__(self, image: np.ndarray) -> None:
        import torch

        self._t = torch.from_numpy(image.copy())

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__()

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def _fake_nvdec(monkeypatch, keep: int | None = None):
    import contextlib
    import sys

    import torch

    from engine.stages import nvdec

    fake = _FakeNvc(keep)
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nvdec.NvdecSource, "_device_context", lambda self: contextlib.nullcontext())
    return fake, nvdec


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("start", [0, 37])
def test_nvdec_source_batches_and_ends_like_pyav_without_asking_past_the_end(
        tmp_path, monkeypatch, on_device, start):
    import torch

    fake, nvdec = _fake_nvdec(monkeypatch)
    path = media.make_video(tmp_path / "v.mp4", 70, size=(64, 48))
    ours = list(nvdec.NvdecSource(on_device=on_device, fallback=False).frames(path, 16, start=start))
    ref = list(iter_frames(path, 16, start=start))
    assert [len(b) for b in ours] == [len(b) for b in ref]
    for a, b in zip(ours, ref, strict=True):
        assert isinstance(a.images, torch.Tensor if on_device else np.ndarray)
        assert np.array_equal(np.asarray(a.images), b.images) and np.array_equal(a.index, b.index)
        np.testing.assert_allclose(a.timestamps, b.timestamps, atol=1e-6)
    (decoder,) = fake.decoders
    assert sum(n for _, n in decoder.asked) == 70 - start  # never a frame past the stream's last
    assert all(pos + n <= 70 for pos, n in decoder.asked)


def test_nvdec_source_reports_a_stream_that_ends_early(tmp_path, monkeypatch):
    _, nvdec = _fake_nvdec(monkeypatch, keep=40)  # the decoder gives up after 40 of 70 frames
    path = media.make_video(tmp_path / "v.mp4", 70, size=(64, 48))
    with pytest.raises(TruncatedVideoError, match="stopped at frame 40 of 70"):
        list(nvdec.NvdecSource(on_device=True, fallback=False).frames(path, 16))


# --- prefetch -------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_bytes", "ready"), [(None, 3), (250, 2), (50, 1)])
def test_prefetch_keeps_at_most_depth_items_and_max_bytes_of_frames_ready(max_bytes, ready):
    produced = []

    def batches():
        for i in range(20):
            produced.append(i)
            yield types.SimpleNamespace(images=np.zeros(100, np.uint8), i=i)

    gen = prefetch(batches(), depth=3, max_bytes=max_bytes)
    assert next(gen).i == 0
    most = 1 + ready + 1  # the one taken, the ready ones, one waiting in the producer
    deadline = time.monotonic() + 120
    while len(produced) < most and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(produced) == most
    assert [b.i for b in gen] == list(range(1, 20))


def test_prefetch_reraises_after_items_and_stops_early():
    def source(n, fail_at=None, log=None):
        try:
            for i in range(n):
                if i == fail_at:
                    raise DecodeError(f"broken at {i}")
                yield i
        finally:
            if log is not None:
                log.append("closed")

    got = []
    with pytest.raises(DecodeError, match="broken at 3"):
        for x in prefetch(source(10, fail_at=3)):
            got.append(x)
    assert got == [0, 1, 2]

    log: list[str] = []
    before = threading.active_count()
    gen = prefetch(source(1000, log=log), depth=2)
    assert next(gen) == 0
    gen.close()
    assert log == ["closed"]
    assert threading.active_count() == before
