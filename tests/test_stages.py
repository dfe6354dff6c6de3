"""The stages as parts: registries, injection, the test-only sink and backend, tracker state on resume."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pytest

from engine import Cancelled, Engine, EngineConfig, LandmarkBackend, OutputFormat
from engine.formats import FORMATS, FormatSpec, output_paths, readme_file_list
from engine.landmarks import BACKENDS, BackendSpec, available_backends
from engine.stages import DetectEveryFrame, Sink, best_face_per_frame
from engine.structures import Detections
from tests.example_backend import CentreLandmarker, template_in_box
from tests.example_sink import SummarySink
from tests.face3d_helpers import synthetic_bfm  # noqa: F401  (fixture)

SUMMARY = FormatSpec(".summary.json", "Summary .json", "frame counts", "frames, valid frames and batches",
                     "tests.example_sink:SummarySink", mime="application/json")
CENTRE = BackendSpec("tests.example_backend", "Centre box (test)", "the template in the middle of the frame")


# --- registries ------------------------------------------------------------------------------


def test_format_registry_is_the_one_source():
    assert list(FORMATS) == [f.value for f in OutputFormat]
    assert all(FORMATS[f.value].needs_face_model == f.needs_face_model for f in OutputFormat)
    assert output_paths("out/clip", ["overlay", "npz"], "image") == {
        "overlay": FORMATS["overlay"].path("out/clip", "image"), "npz": FORMATS["npz"].path("out/clip")}
    assert output_paths("out/clip", ["overlay"])["overlay"].name == "clip.overlay.mp4"
    for spec in FORMATS.values():
        assert spec.suffix in readme_file_list()
        assert isinstance(spec.sink_factory(), type)  # every built-in sink imports
    with pytest.raises(ValueError, match="known formats: pirender"):
        EngineConfig(formats="npz,gif")


def test_backend_registry_matches_the_enum():
    assert list(BACKENDS) == [b.value for b in LandmarkBackend]
    with pytest.raises(ValueError, match="known backends: fan, mtcnn, file"):
        EngineConfig(landmarks="dlib")


# --- one module + one registry line ----------------------------------------------------------


def test_a_new_sink_is_one_module_and_one_registry_line(monkeypatch, tmp_path, short_clip, recon_checkpoint):
    monkeypatch.setitem(FORMATS, "summary", SUMMARY)  # the one line
    assert SUMMARY.sink_factory() is SummarySink

    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=4,
                       formats="npz,summary")
    assert cfg.formats == (OutputFormat.NPZ, "summary") and EngineConfig.from_dict(cfg.to_dict()) == cfg
    with Engine(cfg) as engine:
        report = engine.run(short_clip, tmp_path / "clip")
    assert set(report.outputs) == {"npz", "summary"}
    summary = json.loads((tmp_path / "clip.summary.json").read_text())
    assert summary == {"frames": 12, "valid": report.num_valid, "batches": 3, "input": "short.mp4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.npz", "clip.summary.json"]

    # Everything that lists formats lists it now.
    assert "summary: frame counts (.summary.json)" in " ".join(_extract_help().split())
    assert "*.summary.json" in readme_file_list()


def _extract_help() -> str:
    from engine.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["extract"].format_help()


def test_a_new_landmark_backend_is_one_module_and_one_registry_line(monkeypatch, tmp_path, test_images,
                                                                     recon_checkpoint):
    monkeypatch.setitem(BACKENDS, "centre", CENTRE)  # the one line

    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="centre", device="cpu", formats=("npz",))
    assert cfg.landmarks == "centre" and EngineConfig.from_dict(cfg.to_dict()) == cfg
    image = test_images / "000031.jpg"
    with Engine(cfg) as engine:
        report = engine.run(image, tmp_path / "img")
    assert report.num_frames == 1 and report.num_valid == 1
    z = np.load(report.outputs["npz"])
    h, w = int(z["height"]), int(z["width"])
    np.testing.assert_array_equal(z["landmarks"][0], template_in_box(np.array([0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h])))
    assert z["crop_box"].shape == (1, 4) and z["crop_box"].dtype == np.int32

    assert "centre" in {s.name for s in available_backends()}
    from engine.cli import build_parser

    args = build_parser().parse_args(["extract", str(image), "-o", "out", "--landmarks", "centre"])
    assert args.landmarks == "centre" and "Centre box" in _extract_help()


# --- injection and one-way hand-offs ---------------------------------------------------------


class RecordingSink:
    """Injected directly (no registry): keeps what it is handed."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.batches = []

    def start(self, info, out_base):
        self.calls.append("start")
        return {}

    def add(self, results):
        self.calls.append("add")
        self.batches.append(results)

    def finish(self, hooks):
        self.calls.append("finish")
        return {}

    def abort(self):
        self.calls.append("abort")


def test_injected_stages_and_sinks_see_one_frame_results_per_batch(tmp_path, short_clip, recon_checkpoint):
    sink = RecordingSink()
    assert isinstance(sink, Sink)
    tracker_calls: list[int] = []

    class Tracker(DetectEveryFrame):
        def __call__(self, frames, detector, state):
            tracker_calls.append(len(frames))
            return super().__call__(frames, detector, state)

    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=5, num_threads=1)
    with Engine(cfg, landmarker=CentreLandmarker(), tracker=Tracker(), sinks=[sink]) as engine:
        report = engine.run(short_clip, tmp_path / "clip")
    assert report.outputs == {} and report.num_valid == 12
    assert sink.calls == ["start", "add", "add", "add", "finish"]
    assert [len(b) for b in sink.batches] == [5, 5, 2]
    assert np.concatenate([b.index for b in sink.batches]).tolist() == list(range(12))
    assert sum(tracker_calls) == 12  # the slices of each batch (CPU), every frame once
    b = sink.batches[0]
    assert b.coeff.shape == (5, 257) and b.crop_box.shape == (5, 4) and b.landmarks_img_ydown.shape == (5, 5, 2)
    assert list(tmp_path.iterdir()) == []


def test_best_face_per_frame_keeps_the_first_of_the_most_confident():
    d = Detections(np.arange(20, dtype=float).reshape(5, 4), np.array([0.9, 0.9, np.nan, 0.2, 0.5]),
                   np.array([0, 0, 1, 3, 3]), 4)
    best = best_face_per_frame(d)
    assert best.frame_rows.tolist() == [0, 3] and best.boxes_img_ydown[:, 0].tolist() == [0.0, 16.0]
    assert best.face_of_frame().tolist() == [0, -1, -1, 1]


# --- tracker state through the resume state ---------------------------------------------------


@dataclass(frozen=True)
class FramesSeen:
    frames: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"frames": np.int64(self.frames)}


class CountingTracker(DetectEveryFrame):
    """A stateful tracker: its state counts the frames it has seen."""

    def __init__(self) -> None:
        self.seen_states: list[int] = []

    def initial_state(self, saved: Mapping[str, np.ndarray] | None = None) -> FramesSeen:
        return FramesSeen(int(saved["frames"]) if saved else 0)

    def __call__(self, frames, detector, state):
        self.seen_states.append(state.frames)
        faces, _ = super().__call__(frames, detector, state)
        return faces, FramesSeen(state.frames + len(frames))


def test_tracker_state_is_saved_and_restored_with_the_resume_state(tmp_path, short_clip, recon_checkpoint):
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=4, formats=("npz",))
    state = tmp_path / "state"
    tracker = CountingTracker()
    with Engine(cfg, tracker=tracker, landmarker=CentreLandmarker()) as engine:
        calls = iter(range(100))
        with pytest.raises(Cancelled):
            engine.run(short_clip, tmp_path / "clip", state_dir=state, should_stop=lambda: next(calls) >= 2)
        assert tracker.seen_states == [0, 4]
        resumed = engine.run(short_clip, tmp_path / "clip", state_dir=state)
    assert resumed.resumed_from == 8 and tracker.seen_states == [0, 4, 8]


# --- nothing half-written ---------------------------------------------------------------------


def test_a_cancel_while_the_overlay_renders_leaves_no_file(tmp_path, short_clip, recon_checkpoint,
                                                           synthetic_bfm, monkeypatch):  # noqa: F811
    """The npz is complete before the overlay starts, but files land only together: none here."""
    monkeypatch.setenv("STUDIO_BFM_DIR", str(synthetic_bfm))
    stages: list[str] = []
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", formats=("npz", "overlay"))
    with Engine(cfg) as engine, pytest.raises(Cancelled, match="overlay"):
        engine.run(short_clip, tmp_path / "out" / "clip", progress=lambda p: stages.append(p.stage),
                   should_stop=lambda: "write" in stages)
    assert "write" in stages
    assert list((tmp_path / "out").iterdir()) == []
