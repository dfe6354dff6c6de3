"""The pipeline end to end: every format, bad inputs, resume, skip, atomic writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from engine import Cancelled, Engine, EngineConfig, NoFaceError, OutputFormat
from engine.errors import OutputError, StudioError
from engine.pipeline import longest_run
from engine.progress import Progress, ProgressReporter
from engine.stages.temporal import NoFacePolicyStage
from engine.structures import AlignPlan, Landmarks
from engine.writers import SUFFIXES, csv_header
from tests.conftest import REPO
from tests.face3d_helpers import synthetic_bfm  # noqa: F401  (fixture)
from tests.media import (
    make_audio_only,
    make_empty_file,
    make_solid_video,
    make_text_file,
    make_truncated_copy,
)

COEFF_FORMATS = [f.value for f in OutputFormat if not f.needs_face_model]
ALL_FORMATS = ",".join(COEFF_FORMATS)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


def mat_keys(path: Path) -> dict[str, tuple]:
    return {k: v.shape for k, v in sio.loadmat(path).items() if not k.startswith("__")}


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, test_video, recon_checkpoint):
    """The shared 200-frame clip through the CLI, MTCNN landmarks, every format."""
    out = tmp_path_factory.mktemp("video_out")
    proc = run_cli("extract", str(test_video), "-o", str(out), "--landmarks", "mtcnn",
                   "--checkpoint", str(recon_checkpoint), "--device", "cpu", "--formats", ALL_FORMATS,
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_video_all_formats(video_run):
    out, proc = video_run
    stem = "WDA_KatieHill_000"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(stem + SUFFIXES[f] for f in COEFF_FORMATS)

    assert mat_keys(out / f"{stem}.mat") == {"coeff": (200, 257), "transform_params": (200, 5)}
    assert mat_keys(out / f"{stem}.sadtalker.mat") == {"coeff_3dmm": (200, 73), "full_3dmm": (1, 257)}
    assert mat_keys(out / f"{stem}.deep3d.mat") == {
        "id": (200, 80), "exp": (200, 64), "tex": (200, 80), "angle": (200, 3), "gamma": (200, 27), "trans": (200, 3)
    }
    pir = sio.loadmat(out / f"{stem}.mat")
    assert pir["coeff"].dtype == np.float32 and pir["transform_params"].dtype == np.float32

    z = np.load(out / f"{stem}.npz")
    assert z["coeff"].shape == (200, 257)
    assert z["valid"].dtype == bool and z["valid"].mean() >= 0.95
    assert np.all(np.diff(z["timestamps"]) > 0)
    assert np.allclose(z["timestamps"][:3], [0, 0.04, 0.08], atol=1e-3)
    np.testing.assert_array_equal(z["coeff"], pir["coeff"])
    np.testing.assert_array_equal(z["exp"], pir["coeff"][:, 80:144])
    tp = z["transform_params"]
    assert np.all(tp[:, :2] == 512) and np.all(tp[:, 2] > 0)

    sad = sio.loadmat(out / f"{stem}.sadtalker.mat")
    np.testing.assert_array_equal(sad["coeff_3dmm"][:, :64], pir["coeff"][:, 80:144])
    np.testing.assert_array_equal(sad["coeff_3dmm"][:, 64:67], pir["coeff"][:, 224:227])
    np.testing.assert_array_equal(sad["coeff_3dmm"][:, 67:70], pir["coeff"][:, 254:257])
    np.testing.assert_array_equal(sad["coeff_3dmm"][:, 70:73], tp[:, 2:])
    np.testing.assert_array_equal(sad["full_3dmm"][0], pir["coeff"][0])

    with open(out / f"{stem}.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == csv_header() and len(rows) == 201
    col = {name: i for i, name in enumerate(rows[0])}
    assert float(rows[5][col["yaw_deg"]]) == pytest.approx(np.degrees(pir["coeff"][4, 225]), rel=1e-5, abs=1e-5)
    assert float(rows[5][col["crop_s"]]) == pytest.approx(tp[4, 2], rel=1e-6)

    values = np.loadtxt(out / f"{stem}.txt")
    assert values.shape == (200 * 5 * 2,)
    assert "1 done, 0 skipped, 0 failed" in proc.stderr


@pytest.mark.slow
def test_keypoint_file_reproduces_coefficients(video_run, test_video, recon_checkpoint, tmp_path):
    """The landmarks we write, fed back with --landmarks file, give the same numbers."""
    out, _ = video_run
    stem = "WDA_KatieHill_000"
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="file", keypoints=out / f"{stem}.txt",
                       device="cpu", formats=("npz",))
    with Engine(cfg) as engine:
        report = engine.run(test_video, tmp_path / stem)
    a, b = np.load(out / f"{stem}.npz"), np.load(report.outputs["npz"])
    np.testing.assert_array_equal(a["transform_params"], b["transform_params"])
    np.testing.assert_array_equal(a["coeff"], b["coeff"])


def test_bad_inputs_each_fail_with_a_reason(tmp_path, short_clip, recon_checkpoint):
    bad = tmp_path / "in"
    bad.mkdir()
    make_empty_file(bad / "empty.mp4")
    make_text_file(bad / "notes.mp4")
    make_truncated_copy(short_clip, bad / "truncated.mp4", 0.5)
    make_audio_only(bad / "audio.mp4")
    make_solid_video(bad / "blank.mp4", frames=4, size=(128, 96))
    good = bad / "good.mp4"
    good.write_bytes(short_clip.read_bytes())
    out = tmp_path / "out"

    proc = run_cli("extract", str(bad), "-o", str(out), "--landmarks", "mtcnn", "--checkpoint",
                   str(recon_checkpoint), "--device", "cpu", "--no-progress")
    assert proc.returncode == 1
    failed = {line.split(":")[0].split("/")[-1]: line for line in proc.stderr.splitlines()
              if line.startswith("FAILED")}
    assert set(failed) == {"empty.mp4", "notes.mp4", "truncated.mp4", "audio.mp4", "blank.mp4"}
    assert "empty" in failed["empty.mp4"].lower()
    assert "audio" in failed["audio.mp4"].lower()
    assert "face" in failed["blank.mp4"].lower()
    assert "truncat" in failed["truncated.mp4"].lower() or "incomplete" in failed["truncated.mp4"].lower()
    assert len({line.split(": ", 1)[1] for line in failed.values()}) == 5, "reasons must be distinct"
    assert sorted(p.name for p in out.iterdir()) == ["good.mat", "good.npz"]
    assert "1 done, 0 skipped, 5 failed" in proc.stderr


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, short_clip, recon_checkpoint):
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=4, formats=("npz",))
    state = tmp_path / "state"
    with Engine(cfg) as engine:
        calls = iter(range(100))
        with pytest.raises(Cancelled):
            engine.run(short_clip, tmp_path / "a" / "clip", state_dir=state, should_stop=lambda: next(calls) >= 2)
        assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
        assert (state / "state.json").is_file()
        resumed = engine.run(short_clip, tmp_path / "a" / "clip", state_dir=state)
        assert resumed.resumed_from == 8 and resumed.num_frames == 12
        assert not (state / "state.json").exists()
        straight = engine.run(short_clip, tmp_path / "b" / "clip")
    a, b = np.load(resumed.outputs["npz"]), np.load(straight.outputs["npz"])
    for key in ("coeff", "transform_params", "landmarks", "valid", "timestamps"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, test_images, recon_checkpoint):
    image = test_images / "000002.jpg"
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", formats=("pirender",))
    with Engine(cfg) as engine:
        first = engine.run(image, tmp_path / "img")
        mtime = first.outputs["pirender"].stat().st_mtime_ns
        again = engine.run(image, tmp_path / "img")
    assert again.skipped and again.outputs["pirender"].stat().st_mtime_ns == mtime
    with Engine(EngineConfig(**{**cfg.to_dict(), "overwrite": True})) as engine:
        redo = engine.run(image, tmp_path / "img")
    assert not redo.skipped and redo.outputs["pirender"].stat().st_mtime_ns != mtime
    m = sio.loadmat(redo.outputs["pirender"])
    assert m["coeff"].shape == (1, 257) and m["transform_params"].shape == (1, 5)


def test_full_disk_leaves_nothing_behind(tmp_path, test_images, recon_checkpoint, monkeypatch):
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", formats=("pirender", "npz"))
    with Engine(cfg) as engine, pytest.raises(OutputError, match="No space left"):
        engine.run(test_images / "000006.jpg", tmp_path / "out" / "img")
    assert list((tmp_path / "out").iterdir()) == []


def test_no_face_image_raises(tmp_path, recon_checkpoint):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (160, 120), (40, 90, 160)).save(blank)
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu")
    with Engine(cfg) as engine, pytest.raises(NoFaceError, match="no face"):
        engine.run(blank, tmp_path / "blank")
    assert not (tmp_path / "blank.mat").exists()


@pytest.mark.parametrize("policy, landmarks, expect_fallback", [
    ("reference", "mtcnn", [True, False, False, False]),  # detector: carry the previous frame's points
    ("reference", "file", [True, False, True, False]),  # keypoint file: -1 rows get the template
    ("template", "mtcnn", [True, False, True, False]),
])
def test_no_face_policy(policy, landmarks, expect_fallback):
    nan = np.full((5, 2), np.nan, np.float32)
    a = np.arange(10, dtype=np.float32).reshape(5, 2)
    b = a + 100
    lms = Landmarks(np.stack([nan, a, nan, b]), np.array([False, True, False, True]),
                    ("no_face", "", "no_face", ""))
    stage = NoFacePolicyStage.from_config(EngineConfig(no_face=policy, landmarks=landmarks))
    plan, state = stage(lms, stage.initial_state())
    pts, fallback, last = plan.lm_img_ydown, plan.use_template, state.last_lm
    assert fallback.tolist() == expect_fallback
    if not expect_fallback[2]:
        np.testing.assert_array_equal(pts[2], a)  # previous frame's landmarks reused
    np.testing.assert_array_equal(last, b)
    # A pure function of (landmarks, state): the input is untouched, and the state survives the resume file.
    assert np.isnan(lms.points_img_ydown[2]).all() and lms.valid.tolist() == [False, True, False, True]
    restored = stage.initial_state(state.to_arrays())
    np.testing.assert_array_equal(restored.last_lm, b)
    again, _ = stage(lms, restored)
    carries = policy == "reference" and landmarks == "mtcnn"
    assert bool(again.use_template[0]) is not carries  # frame 0 now has a previous face to carry


def test_longest_run():
    assert longest_run(np.array([], dtype=bool)) == 0
    assert longest_run(np.array([False, True, True, True, False, True])) == 3


def test_config_round_trip():
    cfg = EngineConfig(checkpoint="x.pth", landmarks="mtcnn", formats="pirender,csv", batch_size=8)
    assert cfg.formats == (OutputFormat.PIRENDER, OutputFormat.CSV)
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown engine settings"):
        EngineConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError):
        EngineConfig(formats="pirender,gif")


def test_degenerate_landmarks_become_an_invalid_frame(short_clip):
    from engine.pipeline import join_results
    from engine.sources import iter_frames
    from engine.stages.align import Deep3DAligner

    batch = next(iter_frames(short_clip, 3))
    lm = np.tile(np.array([[[200, 200], [300, 200], [250, 260], [210, 320], [290, 320]]], np.float32), (3, 1, 1))
    lm[1] = 250.0  # all five points on one spot: no fit possible
    plan = AlignPlan(lm, np.zeros(3, bool))
    lms = Landmarks(lm, np.ones(3, bool), ("", "", ""))
    aligned = Deep3DAligner()(batch, plan)
    results = join_results(batch, lms, plan, aligned, np.zeros((3, 257), np.float32))
    assert results.valid.tolist() == [True, False, True] and results.reason[1] == "bad_landmarks"
    assert aligned.crops.shape == (3, 224, 224, 3) and np.isfinite(aligned.trans_params).all()
    # Validity flows one way: the aligner says why in its own output and touches nobody's arrays.
    assert aligned.reason == ("", "bad_landmarks", "") and aligned.used_template.tolist() == [False, True, False]
    assert not plan.use_template.any() and lms.valid.all() and lms.reason == ("", "", "")
    assert (results.landmarks_img_ydown[1] == -1).all() and (results.landmarks_img_ydown[0] == lm[0]).all()


def test_overlay_format_needs_the_face_model(tmp_path, short_clip, recon_checkpoint, monkeypatch):
    from engine import WeightsMissingError

    monkeypatch.setenv("STUDIO_BFM_DIR", str(tmp_path / "noBFM"))
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", formats=("npz", "overlay"))
    with Engine(cfg) as engine, pytest.raises(WeightsMissingError, match="bfm convert"):
        engine.run(short_clip, tmp_path / "out" / "clip")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_overlay_format_and_lm68_with_a_face_model(
    tmp_path, short_clip, recon_checkpoint, synthetic_bfm, monkeypatch  # noqa: F811
):
    import av

    monkeypatch.setenv("STUDIO_BFM_DIR", str(synthetic_bfm))
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu",
                       formats=("npz", "deep3d", "overlay"))
    with Engine(cfg) as engine:
        report = engine.run(short_clip, tmp_path / "clip")
    assert report.outputs["overlay"].name == "clip.overlay.mp4"
    with av.open(str(report.outputs["overlay"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 12
    z = np.load(report.outputs["npz"])
    assert z["lm68"].shape == (12, 68, 2) and np.isfinite(z["lm68"]).all()
    assert mat_keys(report.outputs["deep3d"])["lm68"] == (12, 68, 2)


class _Blocking:
    """Wraps a stage: its first call blocks until ``release`` is set (60 s at most, as a failure guard)."""

    def __init__(self, real, blocked: threading.Event, release: threading.Event) -> None:
        self.real, self.blocked, self.release = real, blocked, release

    def wait_once(self) -> None:
        if not self.blocked.is_set():
            self.blocked.set()
            assert self.release.wait(60), "no three progress reports while the stage was blocked"


class _BlockingRegressor(_Blocking):
    def __getattr__(self, name):
        return getattr(self.real, name)

    def predict(self, crops):
        self.wait_once()
        return self.real.predict(crops)


class _BlockingLandmarker(_Blocking):
    name, num_points = "blocking", 5

    @property
    def detector(self):
        return self.real.detector

    def __call__(self, frames, faces=None):
        self.wait_once()
        return self.real(frames, faces)

    def close(self) -> None:
        self.real.close()


@pytest.mark.parametrize("stage", ["landmarker", "regressor"])
def test_progress_is_reported_while_any_stage_blocks(tmp_path, short_clip, recon_checkpoint, stage):
    """The timer reports whatever stage is running: a stand-in stage blocks until the progress
    callback has been called three times while it waits; the reports never overlap."""
    from engine.landmarks import create_landmarker
    from engine.regressor import Regressor

    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=4, formats=("npz",))
    blocked, release = threading.Event(), threading.Event()
    if stage == "landmarker":
        stages = {"landmarker": _BlockingLandmarker(create_landmarker(cfg, "cpu"), blocked, release)}
    else:
        stages = {"regressor": _BlockingRegressor(Regressor(recon_checkpoint, device="cpu"), blocked, release)}
    while_blocked, overlapping = [], []
    in_callback = threading.Lock()

    def on_progress(p) -> None:
        if not in_callback.acquire(blocking=False):
            overlapping.append(p)
            return
        try:
            if blocked.is_set() and not release.is_set():
                while_blocked.append(p)
                if len(while_blocked) >= 3:
                    release.set()
        finally:
            in_callback.release()

    with Engine(cfg, progress_interval_s=0.01, **stages) as engine:
        report = engine.run(short_clip, tmp_path / "clip", progress=on_progress)
    assert report.num_frames == 12 and len(while_blocked) >= 3 and not overlapping
    assert all(p.stage == "extract" and p.frames_total == 12 for p in while_blocked)


def test_cancel_is_seen_between_slices_of_a_slow_stage(tmp_path, short_clip, recon_checkpoint):
    """One 12-frame batch on the CPU is regressed in slices of 4: a cancel after the first slice stops there."""
    from engine.regressor import Regressor

    real = Regressor(recon_checkpoint, device="cpu")
    calls: list[int] = []

    class Counting:
        checkpoint_path, checkpoint_sha256 = real.checkpoint_path, ""

        def numerics(self):
            return real.numerics()

        def predict(self, crops):
            calls.append(len(crops))
            return real.predict(crops)

    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=12, num_threads=1,
                       formats=("npz",))
    with Engine(cfg, regressor=Counting()) as engine, pytest.raises(Cancelled):
        engine.run(short_clip, tmp_path / "clip", should_stop=lambda: bool(calls))
    assert calls == [4]
    assert not (tmp_path / "clip.npz").exists()


def test_progress_reporter_frame_rate_from_an_injected_clock():
    now = [100.0]
    seen: list[Progress] = []
    reporter = ProgressReporter(seen.append, clock=lambda: now[0])
    reporter.begin(8, 20)  # 8 frames restored from a resume state: not counted in the rate
    now[0] = 102.0
    reporter.update(frames_done=12)
    reporter.report()
    reporter.update(stage="write")
    reporter.report()
    assert seen == [Progress(12, 20, 2.0, "extract", frames_new=4), Progress(12, 20, 0.0, "write", frames_new=4)]


def test_load_builds_the_models_a_run_would_and_reports_a_bad_checkpoint(tmp_path, recon_checkpoint):
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", formats=("npz",))
    with Engine(cfg) as engine:
        assert engine.components == {"regressor": None, "landmarker": None, "detector": None}
        assert engine.load() is engine
        models = engine.components
        assert models["regressor"] is not None and models["landmarker"] is not None
        assert engine.components["regressor"] is engine.regressor  # kept: a run uses these
    bad = tmp_path / "epoch_20.pth"
    bad.write_bytes(b"not a checkpoint")
    with Engine(replace(cfg, checkpoint=bad)) as engine, pytest.raises(StudioError, match=r"epoch_20\.pth"):
        engine.load()
