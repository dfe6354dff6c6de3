"""engine.avcompat: the one place where PyAV 12–19 differ, on real files with the installed PyAV,
and with PyAV 19's ``av.open`` signature simulated (it rejects ``metadata_errors``)."""

from __future__ import annotations

import re
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from engine import avcompat
from engine.sources import iter_frames, probe
from tests import media
from tests.conftest import REPO

REAL_OPEN = av.open


def _av19_open(file, mode="r", **kwargs):
    """``av.open`` as PyAV 19 has it: no ``metadata_encoding``/``metadata_errors`` arguments."""
    for name in ("metadata_errors", "metadata_encoding"):
        if name in kwargs:
            raise TypeError(f"open() got an unexpected keyword argument '{name}'")
    return REAL_OPEN(file, mode, **kwargs)


@pytest.fixture
def as_av19(monkeypatch):
    calls: list[dict] = []

    def spy(file, mode="r", **kwargs):
        calls.append(dict(kwargs))
        return _av19_open(file, mode, **kwargs)

    monkeypatch.setattr(av, "open", spy)
    return calls


def _non_utf8_title_clip(tmp_path: Path) -> Path:
    """An MP4 whose title tag is not UTF-8 (Latin-1 bytes), as some cameras and editors write."""
    plain = media.make_video(tmp_path / "plain.mp4", 4, size=(64, 48))
    tagged = tmp_path / "tagged.mp4"
    with REAL_OPEN(str(plain)) as src, REAL_OPEN(str(tagged), "w") as dst:
        dst.metadata["title"] = "Zürich-Zürich"
        out = avcompat.add_stream_like(dst, src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    data = tagged.read_bytes()
    assert data.count("Zürich".encode()) == 2
    bad = tmp_path / "latin1-title.mp4"
    bad.write_bytes(data.replace("Zürich".encode(), b"Z\xfc\xfcrich"))  # same length: boxes stay valid
    return bad


def test_a_clip_whose_metadata_is_not_utf8_opens_and_decodes(tmp_path):
    clip = _non_utf8_title_clip(tmp_path)
    info = probe(clip)
    assert (info.width, info.height, info.frame_count) == (64, 48, 4)
    assert sum(len(b) for b in iter_frames(clip, 3)) == 4


def test_inputs_open_with_pyav19s_signature(tmp_path, as_av19):
    """PyAV 19 removed ``metadata_errors``: probing, decoding, seeking and overlays still open inputs."""
    from dashboard.frames import read_frame

    clip = media.make_video(tmp_path / "clip.mp4", 6, size=(64, 48), with_audio=True)
    info = probe(clip)
    assert (info.width, info.height, info.frame_count, info.has_audio) == (64, 48, 6, True)
    batches = list(iter_frames(clip, 4))
    assert [len(b) for b in batches] == [4, 2]
    frame = read_frame(clip, 3, t=float(batches[0].timestamps[3]))
    np.testing.assert_array_equal(frame, batches[0].images[3])
    assert as_av19, "av.open was not called"
    latin1 = _non_utf8_title_clip(tmp_path)  # PyAV 19 reads such tags with surrogateescape; ≤ 18 is told to ignore
    if avcompat.av_version() >= (19, 0):
        assert probe(latin1).frame_count == 4


def test_older_pyav_is_told_to_ignore_undecodable_tags(monkeypatch, tmp_path):
    calls: list[dict] = []

    def spy(file, mode="r", **kwargs):
        calls.append(dict(kwargs))
        return REAL_OPEN(file, mode, **kwargs) if avcompat.av_version() < (19, 0) else _av19_open(file, mode, **kwargs)

    clip = media.make_video(tmp_path / "clip.mp4", 2)
    monkeypatch.setattr(av, "open", spy)
    with avcompat.open_container(clip) as c:
        assert c.streams.video
    assert calls[0] == ({"metadata_errors": "ignore"} if avcompat.av_version() < (19, 0) else {})
    with avcompat.open_container(tmp_path / "out.mp4", "w") as out:  # writing: passed through untouched
        assert "mp4" in out.format.name
    assert calls[-1] == {}


def test_other_type_errors_are_not_swallowed(monkeypatch, tmp_path):
    def broken(file, mode="r", **kwargs):
        raise TypeError("expected str, bytes or os.PathLike object")

    monkeypatch.setattr(av, "open", broken)
    with pytest.raises(TypeError, match="PathLike"):
        avcompat.open_container(tmp_path / "x.mp4")


class _AVRationalLike:
    """What PyAV 19 returns for rational attributes: numerator/denominator, falsy when 0/1."""

    def __init__(self, num: int, den: int) -> None:
        self.numerator, self.denominator = num, den


def test_fraction_accepts_every_pyav_rational(tmp_path):
    assert avcompat.fraction(Fraction(1, 12800)) == Fraction(1, 12800)
    assert avcompat.fraction(_AVRationalLike(30000, 1001)) == Fraction(30000, 1001)
    assert avcompat.fraction(_AVRationalLike(0, 1)) is None  # PyAV 19's "unset"
    assert avcompat.fraction(None) is None and avcompat.fraction(25) == Fraction(25)
    clip = media.make_video(tmp_path / "clip.mp4", 3, fps=25)
    with avcompat.open_container(clip) as c:
        s = c.streams.video[0]
        assert avcompat.fraction(s.average_rate) == 25 and isinstance(avcompat.fraction(s.time_base), Fraction)


def _display_matrix(ccw_degrees: float) -> bytes:
    """A display matrix turning the picture ``ccw_degrees`` counter-clockwise: 9 native int32,
    16.16 fixed point, laid out as FFmpeg stores it (checked against PyAV's own
    ``VideoFrame.rotation`` in :func:`test_frame_rotation_of_real_rotated_clips`)."""
    r = np.deg2rad(ccw_degrees)
    c, s = np.cos(r), np.sin(r)
    one = 1 << 16
    return struct.pack("=9i", round(c * one), round(-s * one), 0, round(s * one), round(c * one), 0, 0, 0, 1 << 30)


@pytest.mark.parametrize("ccw", [0, 90, -90, 180, 45])
def test_display_matrix_angle_matches_ffmpeg(ccw):
    got = avcompat.display_matrix_rotation(_display_matrix(ccw))
    assert -180 <= got <= 180 and (got - ccw + 180) % 360 - 180 == pytest.approx(0, abs=1e-3)
    assert avcompat.display_matrix_rotation(bytes(36)) == 0.0


class _SideData:
    def __init__(self, kind: str, payload: bytes) -> None:
        self.type, self.payload = kind, payload

    def __bytes__(self) -> bytes:
        return self.payload


class _OldFrame:
    """A decoded frame as PyAV 12/13 give it: no ``rotation``, the display matrix as side data."""

    def __init__(self, *side) -> None:
        self.side_data = list(side)


def test_frame_rotation_reads_side_data_where_pyav_has_no_rotation():
    assert avcompat.frame_rotation(_OldFrame(_SideData("DISPLAYMATRIX", _display_matrix(-90)))) == -90
    assert avcompat.frame_rotation(_OldFrame(_SideData("Type.DISPLAYMATRIX", _display_matrix(90)))) == 90
    assert avcompat.frame_rotation(_OldFrame(_SideData("SEI_UNREGISTERED", b"x" * 36))) == 0
    assert avcompat.frame_rotation(_OldFrame()) == 0


@pytest.mark.parametrize("rotation_cw", [90, 180, 270])
def test_frame_rotation_of_real_rotated_clips(tmp_path, rotation_cw):
    clip = media.make_video(tmp_path / "rot.mp4", 2, size=(64, 48), rotation=rotation_cw)
    with avcompat.open_container(clip) as c:
        frame = next(c.decode(video=0))
        [side] = [sd for sd in avcompat.side_data(frame) if str(sd.type).endswith("DISPLAYMATRIX")]
        from_side_data = avcompat.display_matrix_rotation(bytes(side))
        ccw = avcompat.frame_rotation(frame)
    assert (-ccw) % 360 == rotation_cw and (-from_side_data) % 360 == rotation_cw
    if hasattr(frame, "rotation"):  # PyAV >= 14: its own reading agrees with ours
        assert frame.rotation == pytest.approx(from_side_data)
    assert probe(clip).rotation == rotation_cw


def test_only_avcompat_calls_av_open_in_the_product():
    """Every input the product opens goes through :func:`engine.avcompat.open_container`."""
    offenders = []
    for folder in ("engine", "db", "worker", "dashboard", "pages"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "avcompat.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bav\.open\(|add_stream_from_template|metadata_errors|\bav\.AVError\b", line):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []
