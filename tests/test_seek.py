"""A late start of ``iter_frames`` seeks to the keyframe before it, and gives exactly the frames,
indices and timestamps of decoding from frame 0 (engine.sources ``_seek_to_frame``), or falls
back to decoding from frame 0 when the numbering cannot be proven."""

from __future__ import annotations

import dataclasses
import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import engine.sources as sources
from engine.sources import TruncatedVideoError, iter_frames
from tests import media

FRAMES = 60
BATCH = 5
SEEKED = "seeked to the keyframe"
FELL_BACK = "decoding from frame 0"


def _moving_gradient(i: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """(H, W, 3) uint8 gradient that shifts with ``i``: every frame differs, no scene cuts."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 4 + i * 3) % 256, (y * 5 + i * 2) % 256, ((x + y) * 2 + i) % 256], -1).astype(np.uint8)


def _write_h264(path: Path, options: dict[str, str], frames: int = FRAMES, fps: int = 25) -> Path:
    """An H.264 file (libx264 with ``options``) of ``frames`` moving-gradient frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_moving_gradient(i), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _packets(path: Path) -> list[tuple[int, int | None, bool]]:
    """(pts, dts, keyframe) of the video packets in decode order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(p.pts, p.dts, p.is_keyframe) for p in container.demux(stream) if p.size]


def _keyframe_indices(path: Path) -> list[int]:
    """Frame indices (output order) of the keyframe packets."""
    packets = _packets(path)
    order = sorted(pts for pts, _, _ in packets)
    return sorted(order.index(pts) for pts, _, key in packets if key)


CLOSED = {"g": "12", "bf": "2", "x264-params": "scenecut=0"}
OPEN = {"g": "12", "bf": "2", "x264-params": "scenecut=0:open-gop=1"}


@pytest.fixture(scope="module")
def h264_files(tmp_path_factory) -> dict[str, Path]:
    """H.264 with B-frames and 12-frame GOPs: closed GOPs in MP4 and Matroska, open GOPs in MP4."""
    if not media.has_encoder("libx264"):
        pytest.skip("this PyAV build has no libx264 encoder")
    folder = tmp_path_factory.mktemp("seek")
    files = {
        "closed.mp4": _write_h264(folder / "closed.mp4", CLOSED),
        "closed.mkv": _write_h264(folder / "closed.mkv", CLOSED),
    }
    try:
        files["open.mp4"] = _write_h264(folder / "open.mp4", OPEN)
    except av.error.FFmpegError as e:  # a libx264 without open-GOP support
        pytest.skip(f"libx264 rejects open-gop=1 ({e})")
    return files


def _decode(path: Path, start: int, batch: int = BATCH, threads: int = 0) -> dict:
    batches = list(iter_frames(path, batch, start, convert_threads=threads))
    if not batches:
        return {"sizes": [], "images": None, "index": np.zeros(0, np.int64), "times": np.zeros(0)}
    return {"sizes": [len(b) for b in batches], "images": np.concatenate([b.images for b in batches]),
            "index": np.concatenate([b.index for b in batches]),
            "times": np.concatenate([b.timestamps for b in batches])}


def _expected_sizes(n: int, start: int, batch: int = BATCH) -> list[int]:
    left = max(0, n - start)
    return [batch] * (left // batch) + ([left % batch] if left % batch else [])


def _assert_slice(got: dict, ref: dict, start: int) -> None:
    """``got`` (decoded from ``start``) is ``ref`` (decoded from 0) from frame ``start`` on."""
    n = len(ref["index"])
    assert got["sizes"] == _expected_sizes(n, start)
    assert np.array_equal(got["index"], ref["index"][start:])
    assert np.array_equal(got["times"], ref["times"][start:])  # bit-equal float64 seconds
    if start < n:
        assert got["images"].dtype == np.uint8
        assert np.array_equal(got["images"], ref["images"][start:])


@pytest.fixture
def decoded_count(monkeypatch) -> list[int]:
    """Counts the frames the decode loop pulls from FFmpeg (lead-in after a seek included)."""
    counter = [0]
    real = sources._decoded_frames

    def counting(packets):
        for frame in real(packets):
            counter[0] += 1
            yield frame

    monkeypatch.setattr(sources, "_decoded_frames", counting)
    return counter


def _leading_frames(path: Path) -> list[int]:
    """Frame indices of open-GOP leading frames: decoded after a keyframe, shown before it."""
    packets = _packets(path)
    order = sorted(pts for pts, _, _ in packets)
    found = []
    for i, (key_pts, _, key) in enumerate(packets):
        if key and i > 0:
            found += [order.index(p) for p, _, _ in packets[i + 1:i + 4] if p < key_pts]
    return found


def _starts(path: Path, n: int) -> dict[str, int]:
    keys = [k for k in _keyframe_indices(path) if k > 0]
    assert keys, f"{path.name}: no keyframe after frame 0; the test needs GOPs shorter than the clip"
    key = keys[len(keys) // 2]
    starts = {"1": 1, "keyframe": key, "after keyframe": key + 5, "before keyframe": key - 1,
              "last": n - 1, "end": n, "past end": n + 7}
    starts.update({f"leading frame {i}": i for i in _leading_frames(path)})
    return starts


@pytest.mark.parametrize("name", ["closed.mp4", "closed.mkv", "open.mp4"])
def test_late_start_equals_the_slice_of_decoding_from_zero_h264(h264_files, name, decoded_count, caplog):
    path = h264_files[name]
    ref = _decode(path, 0)
    n = len(ref["index"])
    assert n == FRAMES and np.array_equal(ref["index"], np.arange(n))
    assert any(d is not None and d != p for p, d, _ in _packets(path)), "no B-frames: the test would be weak"
    for label, start in _starts(path, n).items():
        caplog.clear()
        decoded_count[0] = 0
        with caplog.at_level(logging.DEBUG, logger="engine.sources"):
            got = _decode(path, start)
        _assert_slice(got, ref, start)
        messages = " | ".join(r.getMessage() for r in caplog.records)
        if start < n:
            assert SEEKED in messages, f"{label} (frame {start}) did not seek: {messages}"
            landed = max(k for k in _keyframe_indices(path) if k <= start)
            # from the keyframe on (plus open-GOP leading frames), never from frame 0
            assert decoded_count[0] <= n - landed + 2 < n or start <= 2, (label, decoded_count[0])
        else:
            assert FELL_BACK in messages and got["sizes"] == []


def test_late_start_open_gop_has_leading_frames(h264_files):
    """The open-GOP file really has frames shown before a keyframe but decoded after it (the
    case where dropping frames by pts, not by count, matters)."""
    assert _leading_frames(h264_files["open.mp4"])
    assert not _leading_frames(h264_files["closed.mp4"])


def test_late_start_shared_clip_every_start(test_video, decoded_count, caplog):
    """The MPEG-4 Part 2 clip (200 frames, a keyframe every 12): every start seeks and equals the slice."""
    ref = _decode(test_video, 0, batch=64)
    n = len(ref["index"])
    assert n == 200
    for start in [1, 12, 13, 23, 100, 150, 199, 200, 500]:
        caplog.clear()
        decoded_count[0] = 0
        with caplog.at_level(logging.DEBUG, logger="engine.sources"):
            got = _decode(test_video, start, batch=BATCH, threads=2)
        _assert_slice(got, ref, start)
        if start < n:
            assert SEEKED in caplog.text
            assert decoded_count[0] == n - (start // 12) * 12


def test_late_start_keeps_rotation_and_vfr_timestamps(tmp_path, caplog):
    frames = [media.quadrant_frame((64, 32), i) for i in range(30)]
    paths = [media.make_video(tmp_path / "rot.mp4", frames, rotation=90),
             media.make_video(tmp_path / "vfr.mkv", frames, vfr=True)]
    for path in paths:
        ref = _decode(path, 0)
        for start in (7, 13, 29):
            with caplog.at_level(logging.DEBUG, logger="engine.sources"):
                _assert_slice(_decode(path, start), ref, start)
    assert caplog.text.count(SEEKED) == 6
    assert ref["images"].shape[1:] == (32, 64, 3)
    np.testing.assert_allclose(ref["times"], media.vfr_timestamps(30), atol=1e-3)


class _DuplicatePts:
    """A container whose demuxer gives packet ``at`` the pts of the packet before it."""

    def __init__(self, container, at: int) -> None:
        self._container, self._at = container, at

    def __getattr__(self, name):
        return getattr(self._container, name)

    def demux(self, stream):
        previous = None
        for i, packet in enumerate(self._container.demux(stream)):
            if i == self._at:
                packet.pts = previous
            previous = packet.pts
            yield packet


def test_an_unusable_pts_map_falls_back_and_gives_the_same_frames(h264_files, monkeypatch, caplog):
    path = h264_files["closed.mp4"]
    ref = _decode(path, 0)
    real_plan = sources._plan_seek
    monkeypatch.setattr(sources, "_plan_seek", lambda c, s, start: real_plan(_DuplicatePts(c, 5), s, start))
    with caplog.at_level(logging.DEBUG, logger="engine.sources"):
        got = _decode(path, 30)
    _assert_slice(got, ref, 30)
    assert "two packets share pts" in caplog.text and SEEKED not in caplog.text


def test_frames_the_map_misses_are_caught_after_the_seek(h264_files, monkeypatch, caplog):
    """A plan that lacks a frame between the keyframe and the target (as if the decoder gave a frame
    no packet announced) is caught before anything is yielded, and decoding restarts from 0."""
    path = h264_files["closed.mp4"]
    ref = _decode(path, 0)
    real_plan = sources._plan_seek

    def lacking(container, stream, start):
        plan = real_plan(container, stream, start)
        land = plan.pts.index(plan.landing[0])
        assert plan.pts.index(plan.target) - land >= 2
        return dataclasses.replace(plan, pts=plan.pts[:land + 1] + plan.pts[land + 2:])

    monkeypatch.setattr(sources, "_plan_seek", lacking)
    start = _starts(path, FRAMES)["after keyframe"]
    with caplog.at_level(logging.DEBUG, logger="engine.sources"):
        got = _decode(path, start)
    _assert_slice(got, ref, start)
    assert "came where pts" in caplog.text and SEEKED not in caplog.text


def test_containers_without_trusted_timestamps_decode_from_zero(tmp_path, caplog):
    path = media.make_video(tmp_path / "clip.avi", 30)
    ref = _decode(path, 0)
    with caplog.at_level(logging.DEBUG, logger="engine.sources"):
        _assert_slice(_decode(path, 17), ref, 17)
    assert "container format 'avi'" in caplog.text and SEEKED not in caplog.text


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_truncated_file_after_a_seek_raises_as_from_zero(tmp_path, suffix, caplog):
    """Starting after a seek, a truncated file gives the frames decoding from 0 gives, then the
    same TruncatedVideoError (same message, same counts)."""
    good = media.make_video(tmp_path / f"good{suffix}", 50, faststart=suffix == ".mp4")
    cut = media.make_truncated_copy(good, tmp_path / f"cut{suffix}", 0.5)
    outcomes = {}
    for start in (0, 13):
        frames = []
        with caplog.at_level(logging.DEBUG, logger="engine.sources"), pytest.raises(TruncatedVideoError) as info:
            for batch in iter_frames(cut, 4, start, convert_threads=0):
                frames.append(batch)
        outcomes[start] = (np.concatenate([b.images for b in frames]), np.concatenate([b.index for b in frames]),
                           str(info.value), info.value.decoded_frames, info.value.expected_frames)
    full, late = outcomes[0], outcomes[13]
    assert len(full[1]) > 13
    assert np.array_equal(late[0], full[0][13:]) and np.array_equal(late[1], full[1][13:])
    assert late[2:] == full[2:]
    assert SEEKED in caplog.text
