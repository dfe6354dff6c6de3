"""bench/throughput.py on the CPU at toy sizes: it runs, and prints the table the docs expect.

Timings are printed, never asserted (docs/development.md). The quick test (MTCNN, no
reference) stays in the suite; the one with FAN and the reference-style pipeline runs 2D-FAN-4
on the CPU and is marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.structures import Detections, FrameBatch

pytest.importorskip("av")
throughput = pytest.importorskip("bench.throughput")


def _frames(n: int) -> FrameBatch:
    return FrameBatch(np.zeros((n, 8, 8, 3), np.uint8), np.arange(n, dtype=np.int64), np.zeros(n))


def test_fixed_box_fills_only_frames_without_a_face():
    found = Detections(np.array([[1.0, 1, 5, 5]]), np.array([0.7]), np.array([1]), 3)
    calls = []

    def inner(frames):
        calls.append(len(frames))
        return found

    inner.name = "s3fd"
    box = np.array([10.0, 20, 30, 40, 0.99])
    det = throughput.FixedBox(inner, box)(_frames(3))
    assert calls == [3]  # the wrapped detector ran (its cost is what is measured)
    assert det.frame_rows.tolist() == [0, 1, 2] and det.num_frames == 3
    assert det.boxes_img_ydown[1].tolist() == [1, 1, 5, 5]  # a real detection is kept
    assert det.boxes_img_ydown[0].tolist() == det.boxes_img_ydown[2].tolist() == [10, 20, 30, 40]
    assert throughput.FixedBox(inner, box).name == "s3fd"


def test_generated_set_drifts_and_starts_clips_at_different_frames(tmp_path, test_video):
    from engine.sources import iter_frames, probe

    spec = throughput.MediaSpec(width=96, height=54, fps=25)
    args = throughput.parse_args(["--clips", "2", "--seconds", "0.2", "--clip", str(test_video)])
    clips = throughput.make_set("clips", args, spec, tmp_path)
    assert len(clips) == 2 and all(p.exists() for p in clips)
    info = probe(clips[0])
    assert (info.width, info.height, info.frame_count) == (96, 54, 5)
    first = [next(iter_frames(p, 5)).images for p in clips]
    assert np.abs(first[0][0].astype(int) - first[1][0].astype(int)).mean() > 1  # other start frame
    x0, y0 = spec.face_origin(0.0)
    assert spec.face_origin(1.0) != (x0, y0)  # the face moves
    assert x0 >= 0 and x0 + spec.face_size <= spec.width and y0 >= 0 and y0 + spec.face_size <= spec.height


def test_fast_mode_is_reported_unavailable_or_configured(tmp_path):
    args = throughput.parse_args(["--device", "cpu", "--detect-every", "4"])
    cfg, why = throughput.make_config(args, "fast", "mtcnn", tmp_path / "ckpt.pth")
    if cfg is None:
        assert "fast path not available" in why
    else:
        assert getattr(cfg.mode, "value", cfg.mode) == "fast" and cfg.detect_every == 4  # str(Mode.FAST) is "Mode.FAST"
    exact, why = throughput.make_config(args, "exact", "mtcnn", tmp_path / "ckpt.pth")
    assert exact is not None and why is None


def test_fast_rows_run_the_fast_stages(tmp_path):
    """The fast rows measure the fast path's own landmarker and tracker, not the exact ones with a new config."""
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch (MTCNN) not installed")
    fast = pytest.importorskip("engine.fast")
    args = throughput.parse_args(["--device", "cpu"])
    built = {}
    for mode in ("exact", "fast"):
        cfg, why = throughput.make_config(args, mode, "mtcnn", tmp_path / "ckpt.pth")
        assert cfg is not None, why
        engine = throughput.build_engine(cfg)
        built[mode] = (type(engine.landmarker_for(tmp_path / "x.mp4")), type(engine.tracker))
    expected = type(fast.fast_landmarker(throughput.make_config(args, "fast", "mtcnn", tmp_path / "c.pth")[0], "cpu"))
    assert built["fast"][0] is expected and built["exact"][0] is not expected
    assert built["fast"][1] is not built["exact"][1]  # the keyframe tracker, not detection on every frame


def _check_report(text: str, rows: list[str]) -> None:
    assert "bench/throughput.py" in text and "- command: `python " in text and "- device: CPU" in text
    assert "RANDOM Deep3D checkpoint" in text
    assert "| pipeline | frames | s | frames/s | × reference |" in text
    for row in rows:
        line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
        assert "failed" not in line, line
    assert "| decode |" in text and "| regress |" in text


def test_smoke_cpu_mtcnn_without_reference(tmp_path, test_video):
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch (MTCNN) not installed")
    out = tmp_path / "table.md"
    code = throughput.main(["--device", "cpu", "--set", "clips", "--clips", "2", "--seconds", "0.2",
                            "--width", "256", "--height", "144", "--batch-size", "4", "--stage-frames", "4",
                            "--landmarks", "mtcnn", "--no-reference", "--clip", str(test_video),
                            "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    text = out.read_text()
    _check_report(text, ["exact, mtcnn"])
    exact = next(line for line in text.splitlines() if line.startswith("| exact, mtcnn |"))
    assert exact.split("|")[2].strip() == "10"  # 2 clips × 5 frames, every frame through the engine
    assert "| fast, mtcnn |" in text  # measured, or "fast path not available"


@pytest.mark.slow  # 2D-FAN-4 and S3FD per frame on the CPU, three times over (~1 min on an idle 2-core machine)
def test_smoke_cpu_fan_with_reference(tmp_path, test_video, monkeypatch):
    pytest.importorskip("face_alignment", reason="face_alignment not installed")
    from face_alignment import utils as fa_utils

    for name in ("transform_np", "_get_preds_fromhm"):  # skip numba's first-call compile (as test_landmarks)
        monkeypatch.setattr(fa_utils, name, getattr(fa_utils, name).py_func)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights-here"))
    out = tmp_path / "table.md"
    code = throughput.main(["--device", "cpu", "--set", "clips", "--clips", "2", "--seconds", "0.12",
                            "--width", "128", "--height", "96", "--batch-size", "3", "--stage-frames", "3",
                            "--landmarks", "fan", "--mode", "exact", "--clip", str(test_video),
                            "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    text = out.read_text()
    _check_report(text, ["exact, fan", "reference-style (PIRender scripts)"])
    assert "RANDOM S3FD/2D-FAN-4 weights" in text
    assert "Reference-style stages: landmarks" in text
    ratio = next(line for line in text.splitlines() if line.startswith("| exact, fan |")).split("|")[5]
    assert ratio.strip().endswith("×")


def test_one_input_with_processes_is_split_over_them(tmp_path, test_video, monkeypatch):
    """``--processes 2`` with one generated video: the fast row runs it as frame segments over the
    two engine processes (engine.segments) and counts every frame once."""
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch (MTCNN) not installed")
    import engine.segments

    monkeypatch.setattr(engine.segments, "MIN_SEGMENT_FRAMES", 4)  # read by the parent's plan only
    out = tmp_path / "table.md"
    code = throughput.main(["--device", "cpu", "--set", "long", "--minutes", str(24 / 25 / 60),
                            "--width", "256", "--height", "144", "--batch-size", "4", "--stage-frames", "0",
                            "--landmarks", "mtcnn", "--mode", "fast", "--no-reference", "--processes", "2",
                            "--clip", str(test_video), "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    fast = next(line for line in out.read_text().splitlines() if line.startswith("| fast, mtcnn |"))
    assert fast.split("|")[2].strip() == "24", fast  # 24 frames, each once
    assert "one input split into 3 segment(s) over 2 processes" in fast, fast  # 24 frames in batches of 4: 8 + 8 + 8


def test_the_long_video_made_in_pieces_plays_as_one_encode(tmp_path, test_video):
    """``--set long`` encodes pieces in parallel processes and joins their packets: the frames,
    their timestamps and a seek into the second piece are those of one continuous video."""
    from engine.sources import iter_frames, probe

    spec = throughput.MediaSpec(width=96, height=54, fps=25)
    one = throughput.make_long_video(test_video, tmp_path / "one.mp4", 600, spec, jobs=1)
    joined = throughput.make_long_video(test_video, tmp_path / "joined.mp4", 600, spec, jobs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joined.mp4", "one.mp4"]  # pieces removed
    assert probe(joined).frame_count == 600
    whole = np.concatenate([x.images for x in iter_frames(one, 64)])
    batches = list(iter_frames(joined, 64))
    frames = np.concatenate([x.images for x in batches])
    assert whole.shape == frames.shape == (600, 54, 96, 3)
    assert np.allclose(np.concatenate([x.timestamps for x in batches]), np.arange(600) / 25.0)
    assert np.abs(whole.astype(int) - frames).mean() < 3  # the same pictures, encoded apart
    late = np.concatenate([x.images for x in iter_frames(joined, 64, start=450)])
    assert np.array_equal(late, frames[450:])
