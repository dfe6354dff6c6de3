"""Temporal quality (issue 14): named per-frame flags, per-video metrics, one person per video,
optional smoothing. Pure functions on synthetic trajectories with known answers, then one
end-to-end run on the shared clip edited into black frames, a pasted second face and a cut."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from engine import layout
from engine import quality as q
from engine.config import EngineConfig, KeepPerson
from engine.stages.detect import best_face_per_frame
from engine.stages.track import DetectEveryFrame, FollowPerson, box_iou, tracker_from_config
from engine.structures import Detections, FrameBatch

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- flags registry


def test_every_flag_has_a_distinct_bit_and_a_description():
    bits = [spec.bit for spec in q.FLAGS.values()]
    assert sorted(bits) == list(range(len(bits)))
    assert all(spec.description and spec.label for spec in q.FLAGS.values())
    assert q.flag_names()[q.FLAGS["abrupt_jump"].bit] == "abrupt_jump"
    flags = np.array([q.bit("no_face") | q.bit("filled"), 0], np.uint32)
    assert q.flags_text(flags[0]) == "no_face|filled" and q.flags_text(flags[1]) == ""
    assert q.flag_counts(flags) == {name: int(name in ("no_face", "filled")) for name in q.FLAGS}


def test_frame_flags_from_what_the_stages_said():
    coeff = np.zeros((4, 257), np.float32)
    coeff[2, layout.ANGLE.start + 1] = np.radians(70)  # yaw 70°
    coeff[3, layout.ANGLE.start + 0] = np.radians(40)  # pitch 40°: not extreme
    flags = q.frame_flags(
        face_found=np.array([False, True, True, True]), faces_found=np.array([0, 2, 1, 1]),
        kept_rank=np.array([-1, 1, 0, 0]), low_confidence=np.array([False, False, True, False]),
        crop_box=np.array([[0, 0, 300, 300], [-1, 0, 300, 300], [0, 0, 300, 300], [76, 76, 300, 300]]),
        coeff=coeff, filled=np.array([True, False, False, False]))
    assert [q.flags_text(f) for f in flags] == [
        "no_face|filled", "several_faces|other_face_kept|crop_outside", "low_confidence|extreme_pose", ""]


# ----------------------------------------------------------------------------- metrics


def _trajectory(n: int = 120, seed: int = 0, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """coeff (n, 257) with yaw a known parabola (degrees), trans x a line; trans_params s = 1."""
    t = np.arange(n, dtype=np.float64)
    coeff = np.zeros((n, 257))
    coeff[:, layout.ANGLE.start + 1] = np.radians(0.01 * t**2)  # yaw: second difference 0.02°
    coeff[:, layout.TRANS.start] = 0.001 * t
    coeff += noise * np.random.default_rng(seed).standard_normal(coeff.shape) * (np.arange(257) >= 224)
    tp = np.tile(np.array([256, 256, 1.0, 128, 128], np.float64), (n, 1))
    return coeff, tp


def test_jitter_is_the_median_absolute_second_difference():
    coeff, tp = _trajectory()
    valid = np.ones(len(coeff), bool)
    j = q.jitter(coeff, tp, valid)
    assert j["yaw_deg"] == pytest.approx(0.02, rel=1e-6)
    assert j["pitch_deg"] == 0 and j["trans"] == pytest.approx(0, abs=1e-12) and j["crop_scale"] == 0
    # An invalid frame drops the three triples around it, not more; none left gives NaN.
    valid[10] = False
    assert len(q.second_differences(coeff[:, :1], valid)) == len(coeff) - 2 - 3
    assert np.isnan(q.jitter(coeff[:2], tp[:2], valid[:2])["yaw_deg"])


def test_video_metrics_counts_runs_and_flags():
    coeff, tp = _trajectory(10)
    valid = np.array([1, 1, 0, 0, 0, 1, 1, 0, 1, 1], bool)
    flags = np.where(valid, 0, q.bit("no_face")).astype(np.uint32)
    m = q.video_metrics(valid, flags, coeff, tp)
    assert m["valid_ratio"] == pytest.approx(0.6) and m["longest_invalid_run"] == 3
    assert m["flags"]["no_face"] == 4 and m["flags"]["abrupt_jump"] == 0
    assert "jitter_raw" not in m


def test_abrupt_jump_fires_at_a_cut_only():
    coeff, tp = _trajectory(100, noise=0.002)
    crop = np.tile(np.array([40, 30, 300, 300]), (100, 1))
    coeff[60:, layout.ANGLE.start + 1] += np.radians(25)  # a cut: 25° of yaw at once
    valid = np.ones(100, bool)
    valid[30:35] = False  # a gap: the face comes back where it was, no jump
    jumps = q.abrupt_jumps(coeff, tp, crop, valid)
    assert np.flatnonzero(jumps).tolist() == [60]
    # The crop alone moving by half a crop width is a jump too.
    crop[80:, 0] += 112
    assert np.flatnonzero(q.abrupt_jumps(coeff, tp, crop, valid)).tolist() == [60, 80]


# ----------------------------------------------------------------------------- smoothing


def _smoothstep_turn(n: int, start: int, length: int, degrees: float) -> np.ndarray:
    """A head turn: 0 → ``degrees`` over ``length`` frames from ``start``, smooth (C¹)."""
    x = np.clip((np.arange(n) - start) / length, 0, 1)
    return degrees * (3 * x**2 - 2 * x**3)


def test_smoothing_lowers_jitter_and_follows_a_turn_without_lag():
    n = 120
    rng = np.random.default_rng(1)
    coeff = np.zeros((n, 257), np.float32)
    turn = _smoothstep_turn(n, 30, 40, 45.0)
    coeff[:, layout.ANGLE.start + 1] = np.radians(turn + rng.normal(0, 0.5, n))
    tp = np.tile(np.array([256, 256, 1.0, 128, 128], np.float32), (n, 1))
    valid = np.ones(n, bool)
    smoothed = q.smooth_coefficients(coeff, valid, np.zeros(n, bool), q.Smoothing(window=7))
    before = q.jitter(coeff, tp, valid)["yaw_deg"]
    after = q.jitter(smoothed, tp, valid)["yaw_deg"]
    assert after < 0.5 * before
    yaw = np.degrees(smoothed[:, layout.ANGLE.start + 1])
    lag = q.lag_frames(turn, yaw)
    log.info("synthetic turn: yaw jitter %.3f → %.3f °/frame², lag %.3f frames", before, after, lag)
    assert abs(lag) < 1.0
    causal = np.convolve(np.degrees(coeff[:, layout.ANGLE.start + 1]), np.ones(7) / 7)[:n]  # a lagging filter
    assert q.lag_frames(turn, causal) > 2.5  # the measure sees lag where there is some
    assert np.abs(yaw - turn).max() < 2.0  # follows the 45° turn, no overshoot or trailing


def test_smoothing_leaves_invalid_frames_and_cuts_alone():
    n = 40
    coeff = np.random.default_rng(2).normal(size=(n, 257)).astype(np.float32)
    valid = np.ones(n, bool)
    valid[10:13] = False
    breaks = np.zeros(n, bool)
    breaks[25] = True
    out = q.smooth_coefficients(coeff, valid, breaks, q.Smoothing(window=5))
    np.testing.assert_array_equal(out[10:13], coeff[10:13])
    assert [(s.start, s.stop) for s in q.segments(valid, breaks)] == [(0, 10), (13, 25), (25, 40)]
    with pytest.raises(ValueError, match="odd"):
        EngineConfig(smooth_window=4)


# ----------------------------------------------------------------------------- tracking


def _two_faces(prev_like_second: bool) -> Detections:
    """One frame, two faces: the most confident at the left, another at the right."""
    boxes = np.array([[0.0, 0, 50, 50], [100, 0, 150, 50]])
    return Detections(boxes, np.array([0.999, 0.99]), np.array([0, 0]), 1)


class _Fixed:
    name = "mtcnn"

    def __init__(self, dets: Detections) -> None:
        self.dets = dets

    def __call__(self, frames):
        return self.dets


def test_continuity_keeps_the_face_that_continues_the_previous_box():
    frames = FrameBatch(np.zeros((1, 8, 8, 3), np.uint8), np.array([0]), np.array([0.0]))
    tracker = FollowPerson()
    from engine.stages.track import LastBox

    kept, state = tracker(frames, _Fixed(_two_faces(True)), LastBox(np.array([98.0, 2, 148, 52])))
    assert kept.boxes_img_ydown[0, 0] == 100 and kept.kept_rank.tolist() == [1] and kept.faces_found.tolist() == [2]
    assert state.box[0] == 100
    ref, _ = DetectEveryFrame()(frames, _Fixed(_two_faces(True)), None)
    assert ref.boxes_img_ydown[0, 0] == 0 and ref.kept_rank.tolist() == [0] and ref.faces_found.tolist() == [2]
    # No previous face: the reference's choice.
    first, _ = tracker(frames, _Fixed(_two_faces(True)), tracker.initial_state())
    assert first.kept_rank.tolist() == [0]
    assert isinstance(tracker_from_config(EngineConfig(keep_person="continuity")), FollowPerson)
    assert EngineConfig().keep_person == KeepPerson.REFERENCE
    assert box_iou(np.array([0.0, 0, 2, 2]), np.array([[1.0, 1, 3, 3]]))[0] == pytest.approx(1 / 7)


# ----------------------------------------------------------------------------- end to end

SIDE = 160  # the clip is downscaled to SIDE × SIDE pixels (speed), placed at the left of WIDTH
WIDTH = 288
A, BLACK, B, C = 20, 5, 26, 20  # untouched, black, second face pasted in its middle, after the cut
PASTE = range(A + BLACK + 5, A + BLACK + 21)  # frames with the pasted second face


def _edited_clip(test_video) -> tuple[list[np.ndarray], dict]:
    """The shared clip edited: [A untouched | BLACK black | B with a second face pasted at the
    right during PASTE | cut: C frames of later video, mirrored, smaller, at the right]."""
    from PIL import Image

    from tests.media import first_frames

    src = first_frames(test_video, 140, size=(SIDE, SIDE))
    canvas = np.full((SIDE, WIDTH, 3), 96, np.uint8)

    def placed(img: np.ndarray, x: int = 0, y: int = 0) -> np.ndarray:
        out = canvas.copy()
        out[y:y + img.shape[0], x:x + img.shape[1]] = img
        return out

    frames = [placed(src[i]) for i in range(A)]
    frames += [np.zeros_like(canvas) for _ in range(BLACK)]
    for k in range(B):
        f = placed(src[A + k])
        if A + BLACK + k in PASTE:  # the face of a later frame, 0.8×, beside the first
            face = src[100 + k][20:150, 30:135]
            small = np.asarray(Image.fromarray(face).resize((84, 104), Image.BICUBIC))
            f[30:134, 180:264] = small
        frames.append(f)
    for k in range(C):  # the cut: another shot (mirrored, 0.75×, at the right)
        img = np.asarray(Image.fromarray(src[110 + k][:, ::-1]).resize((120, 120), Image.BICUBIC))
        frames.append(placed(img, x=160, y=20))
    return frames, {"cut": A + BLACK + B, "black": range(A, A + BLACK), "paste": PASTE}


class _Recording:
    """A detector that records every Detections it returns (to replay the reference's choice)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.seen = inner, inner.name, []

    def __call__(self, frames):
        d = self.inner(frames)
        self.seen.append((frames.index.copy(), d))
        return d


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory, test_video, recon_checkpoint):
    from engine.landmarks.mtcnn import MtcnnLandmarker
    from engine.pipeline import Engine
    from tests.media import make_video

    frames, marks = _edited_clip(test_video)
    tmp = tmp_path_factory.mktemp("quality")
    clip = make_video(tmp / "edited.mp4", frames, fps=25)
    landmarker = MtcnnLandmarker("cpu")
    detector = _Recording(landmarker.detector)
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=16,
                       formats=("npz", "csv"), keep_person="continuity", smooth_window=7, num_threads=2)
    with Engine(cfg, landmarker=landmarker, detector=detector) as engine:
        report = engine.run(clip, tmp / "edited")
    with np.load(report.outputs["npz"], allow_pickle=False) as z:
        npz = {k: z[k] for k in z.files}
    return report, npz, marks, detector.seen


def _named(npz: dict, name: str) -> np.ndarray:
    return (npz["flags"] & (1 << list(npz["flag_names"]).index(name))) != 0


def test_edited_clip_black_frames_are_flagged_no_face(edited_run):
    report, npz, marks, _ = edited_run
    no_face = np.flatnonzero(_named(npz, "no_face"))
    assert set(marks["black"]) <= set(no_face.tolist())
    assert not npz["valid"][list(marks["black"])].any()
    assert report.quality["flags"]["no_face"] == len(no_face)
    # The CSV names them too.
    with open(report.outputs["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert all("no_face" in rows[i]["flags"] for i in marks["black"])


def test_edited_clip_continuity_keeps_the_first_person(edited_run):
    _, npz, marks, seen = edited_run
    paste = np.array(list(marks["paste"]))
    several = _named(npz, "several_faces")
    assert several[paste].mean() >= 0.8, f"several faces in {np.flatnonzero(several).tolist()}"
    # The kept face stays on the left (the original person) in every pasted frame.
    lm = npz["landmarks"][paste]
    assert (lm[..., 0].mean(axis=1) < SIDE).all()
    # What the reference (most confident face) would have kept instead.
    ref_right = 0
    for index, dets in seen:
        best = best_face_per_frame(dets)
        for row, box in zip(best.frame_rows, best.boxes_img_ydown, strict=True):
            if int(index[row]) in marks["paste"] and box[0] > SIDE:
                ref_right += 1
    other = _named(npz, "other_face_kept")
    assert other.sum() == ref_right  # flagged exactly where the choice differs from the reference's
    log.info("pasted stretch: %d frames, several_faces in %d, reference would keep the pasted face in %d",
             len(paste), int(several[paste].sum()), ref_right)


def test_edited_clip_abrupt_jump_fires_at_the_cut_only(edited_run):
    _, npz, marks, _ = edited_run
    jumps = np.flatnonzero(_named(npz, "abrupt_jump")).tolist()
    assert jumps == [marks["cut"]], jumps


def test_edited_clip_smoothing_lowers_jitter_and_keeps_the_raw(edited_run):
    report, npz, _, _ = edited_run
    assert "coeff_raw" in npz and npz["coeff_raw"].shape == npz["coeff"].shape
    invalid = ~npz["valid"]
    np.testing.assert_array_equal(npz["coeff"][invalid], npz["coeff_raw"][invalid])
    before, after = report.quality["jitter_raw"], report.quality["jitter"]
    log.info("edited clip jitter raw → smoothed: %s", {k: (before[k], after[k]) for k in before})
    for key in ("yaw_deg", "pitch_deg", "roll_deg", "trans", "exp10"):
        assert after[key] < before[key], key
    assert report.quality["smoothing"]["window"] == 7


def test_a_rotated_head_turn_is_followed_without_lag(tmp_path, test_video, recon_checkpoint):
    """Frames of one still turned by a known smooth ramp (0 → 30° in-plane): the smoothed
    coefficients follow the raw ones with less than one frame of lag (cross-correlation)."""
    from PIL import Image

    from engine.pipeline import Engine
    from tests.media import first_frames, make_video

    n = 36
    still = Image.fromarray(first_frames(test_video, 1, size=(SIDE, SIDE))[0])
    turn = _smoothstep_turn(n, 6, 24, 30.0)
    frames = [np.asarray(still.rotate(float(a), resample=Image.BICUBIC, fillcolor=(96, 96, 96))) for a in turn]
    clip = make_video(tmp_path / "turn.mp4", frames, fps=25)
    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=12,
                       formats=("npz",), smooth_window=7, num_threads=2)
    with Engine(cfg) as engine:
        report = engine.run(clip, tmp_path / "turn")
    with np.load(report.outputs["npz"], allow_pickle=False) as z:
        raw, smoothed, valid = z["coeff_raw"], z["coeff"], z["valid"]
    assert valid.all()
    # The columns that follow the turn most: the 8 with the largest raw range over the clip.
    span = raw.max(axis=0) - raw.min(axis=0)
    lags = [q.lag_frames(raw[:, k], smoothed[:, k]) for k in np.argsort(span)[-8:]]
    log.info("rotated turn: lags of the 8 most moving coefficients %s frames", np.round(lags, 3).tolist())
    assert max(abs(x) for x in lags) < 1.0
    assert report.quality["flags"]["abrupt_jump"] == 0  # a smooth turn is no jump


# ----------------------------------------------------------------------------- registry and bundle


def test_quality_summary_reaches_the_registry_and_the_bundle_manifest(tmp_path):
    import json
    import zipfile

    from db import Registry, service
    from db.storage import sha256_file
    from db.views import ArtifactFile, QualitySummary

    reg = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data")
    try:
        src = tmp_path / "clip.mp4"
        src.write_bytes(b"video")
        job = service.submit_file(reg, src, {"landmarks": "mtcnn", "formats": ["npz"], "keep_person": "continuity",
                                             "smooth_window": 7})
        service.claim_next(reg, "w")
        out = reg.result_dir(job.id)
        out.mkdir(parents=True, exist_ok=True)
        (out / "clip.npz").write_bytes(b"npz")
        coeff, tp = _trajectory(10)
        valid = np.ones(10, bool)
        flags = np.zeros(10, np.uint32)
        flags[4] = q.bit("abrupt_jump")
        summary = q.video_metrics(valid, flags, coeff, tp, coeff_raw=coeff)
        service.complete_job(
            reg, job.id, "w", artifacts=[ArtifactFile("npz", out / "clip.npz", 3, sha256_file(out / "clip.npz"))],
            quality=QualitySummary(frames=10, valid_frames=10, reasons={}, longest_invalid_run=0),
            report={"media_fps": 25.0, "quality": summary})
        view = service.get_quality(reg, job.id)
        assert view.flags["abrupt_jump"] == 1 and view.flags["no_face"] == 0
        assert view.jitter["yaw_deg"] == pytest.approx(0.02) and "yaw_deg" in view.jitter_raw
        with zipfile.ZipFile(service.build_bundle(reg, job.id)) as zf:
            manifest = json.loads(zf.read("manifest.json"))
        assert manifest["quality"]["flags"]["abrupt_jump"] == {"frames": 1,
                                                               "meaning": q.FLAGS["abrupt_jump"].description}
        assert manifest["settings"]["smooth_window"] == 7 and manifest["settings"]["keep_person"] == "continuity"
    finally:
        reg.close()


# ----------------------------------------------------------------------------- dashboard

from tests.test_dashboard import empty_studio  # noqa: E402, F401  (the dashboard's registry fixture)


def _flagged_result(n: int = 60):
    """A fake result whose npz carries flags and raw + smoothed coefficients."""
    import dataclasses

    from tests.dashboard_fixtures import fake_result

    r = fake_result(n=n)  # frames 10-14 and 40 have no face
    flags = np.zeros(n, np.uint32)
    flags[~r.valid] |= q.bit("no_face")
    flags[20:26] |= q.bit("several_faces")
    flags[[30, 50]] |= q.bit("abrupt_jump")
    raw = r.coeff + np.random.default_rng(3).normal(0, 0.01, r.coeff.shape).astype(np.float32)
    return dataclasses.replace(r, quality={"flags": flags, "coeff_raw": raw})


def test_results_table_lists_flags_and_finds_the_next_flagged_frame(tmp_path):
    from dashboard.results import flag_table, jitter_table, load_result, next_flagged
    from engine.writers import write_outputs

    data = load_result(write_outputs(_flagged_result(), tmp_path / "clip", ("npz",))["npz"])
    table = flag_table(data.df).set_index("flag")
    assert table.loc["no_face", "frames"] == 6 and table.loc["several_faces", "first"] == 20
    assert table.loc["abrupt_jump", "frames"] == 2 and table.loc["filled", "frames"] == 0
    assert next_flagged(data.df, "abrupt_jump", 30) == 50 and next_flagged(data.df, "abrupt_jump", 50) == 30
    jt = jitter_table(data).set_index("quantity")
    coeffs = jt.drop(index="crop_scale")  # the crop is never smoothed
    assert (coeffs["smoothed"] < coeffs["raw"]).all()  # the shown (smoothed) ones are smoother than the raw


def test_charts_shade_each_flag_and_break_lines_where_there_is_no_face(tmp_path):
    from dashboard import charts
    from dashboard.results import load_result
    from engine.writers import write_outputs

    df = load_result(write_outputs(_flagged_result(), tmp_path / "clip", ("npz",))["npz"]).df
    fig = charts.pose_figure(df, frame=3, flags=["several_faces", "abrupt_jump"])
    yaw = next(t for t in fig.data if t.name == "yaw")
    y = np.array(yaw.y, dtype=float)
    assert np.isnan(y[10:15]).all() and np.isnan(y[40]) and np.isfinite(y[:10]).all()  # a gap, not the filler
    legend = [t.name for t in fig.data if t.name not in ("yaw", "pitch", "roll")]
    assert legend == ["no face / invalid frame", "Several faces (6)", "Abrupt jump (2)"]
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(rects) == 2 + 1 + 2  # invalid runs, one several-faces run, two jumps
    crop = charts.crop_figure(df, flags=["abrupt_jump"])
    assert any(t.name == "Abrupt jump (2)" for t in crop.data)


def test_results_page_lists_flags_and_jumps_to_the_next_flagged_frame(empty_studio):  # noqa: F811 (a fixture)
    from db import service
    from db.storage import sha256_file
    from db.views import ArtifactFile, QualitySummary
    from engine.writers import write_outputs
    from tests.dashboard_fixtures import make_clip
    from tests.test_dashboard import open_page

    reg, tmp_path = empty_studio
    clip = make_clip(tmp_path / "clip.mp4")
    job = service.submit_file(reg, clip, {"landmarks": "mtcnn", "formats": ["npz"]}, original_name="flagged.mp4")
    service.claim_next(reg, "w", device="cpu")
    result = _flagged_result()
    paths = write_outputs(result, reg.result_dir(job.id) / "flagged", ("npz",))
    service.complete_job(
        reg, job.id, "w", artifacts=[ArtifactFile(f, p, p.stat().st_size, sha256_file(p)) for f, p in paths.items()],
        quality=QualitySummary(frames=60, valid_frames=54, reasons={"no_face": 6}, longest_invalid_run=5))
    at = open_page("results", job=job.id)
    shown = at.dataframe[0].value  # the flag table (the jitter table follows)
    assert dict(zip(shown["label"], shown["frames"], strict=True)) == {
        "No face": 6, "Several faces": 6, "Abrupt jump": 2}
    at.selectbox(key=f"res_flag_pick_{job.id}").set_value("abrupt_jump").run()
    at.button(key="res_flag_next").click().run()
    assert at.slider(key=f"res_frame_{job.id}").value == 30
    at.button(key="res_flag_next").click().run()
    assert at.slider(key=f"res_frame_{job.id}").value == 50
    assert at.multiselect(key=f"res_flag_shade_{job.id}").value == ["several_faces", "abrupt_jump"]
    assert not at.exception


def test_cli_options_reach_the_config():
    from engine.cli import build_parser, config_from_args

    args = build_parser().parse_args(["extract", "clip.mp4", "-o", "out", "--keep-person", "continuity",
                                      "--smooth-window", "9"])
    cfg = config_from_args(args)
    assert cfg.keep_person == KeepPerson.CONTINUITY and cfg.smooth_window == 9
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    default = config_from_args(build_parser().parse_args(["extract", "clip.mp4", "-o", "out"]))
    assert default.keep_person == KeepPerson.REFERENCE and default.smooth_window == 0
