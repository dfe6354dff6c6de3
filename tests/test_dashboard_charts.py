"""The dashboard's pure parts: npz → table (units, frames), Plotly builders, frame reader, installer checks."""

from __future__ import annotations

import numpy as np
import pytest

from dashboard import charts
from dashboard.fmt import explain_error, fmt_duration
from dashboard.install import install, validate_bfm_file
from dashboard.results import invalid_runs, load_result, quality_summary, result_frame
from db import LOCAL
from engine.face3d.bfm import EXP_NAME as EXP_PCA
from tests.dashboard_fixtures import fake_result, make_clip, write_fake_outputs


@pytest.fixture
def result(tmp_path):
    return load_result(write_fake_outputs(tmp_path / "clip", formats=("npz",))["npz"])


def test_result_frame_units_and_frames(result):
    r = fake_result()
    df = result.df
    assert len(df) == 60 and result.fps == 25.0 and (result.width, result.height) == (320, 240)
    # Angles: radians (x=pitch, y=yaw, z=roll) → degrees.
    np.testing.assert_allclose(df["pitch_deg"], np.degrees(r.coeff[:, 224]), rtol=1e-6)
    np.testing.assert_allclose(df["yaw_deg"], np.degrees(r.coeff[:, 225]), rtol=1e-6)
    np.testing.assert_allclose(df["roll_deg"], np.degrees(r.coeff[:, 226]), rtol=1e-6)
    np.testing.assert_allclose(df["tz"], r.coeff[:, 256], rtol=1e-6)
    # Crop centre: stored y-up, shown y-down (H - 1 - y).
    np.testing.assert_allclose(df["crop_cy_ydown"], 240 - 1 - r.trans_params[:, 4])
    np.testing.assert_allclose(df["crop_cx"], r.trans_params[:, 3])
    np.testing.assert_allclose(df["t"], np.arange(60) / 25.0)
    assert list(df.loc[~df["valid"], "frame"]) == [10, 11, 12, 13, 14, 40]
    assert set(df.loc[~df["valid"], "reason"]) == {"no_face"}
    np.testing.assert_allclose(df["exp_07"], r.coeff[:, 87], rtol=1e-6)
    assert result.coeff.shape == (60, 257)


def test_result_frame_labels_invalid_frames_without_reason():
    r = fake_result(n=4, invalid=((1, 1),))
    arrays = {
        "coeff": r.coeff,
        "transform_params": r.trans_params,
        "valid": r.valid,
        "reason": np.array(["", "", "", ""]),
    }
    assert list(result_frame(arrays)["reason"]) == ["", "invalid", "", ""]


def test_quality_summary_and_runs(result):
    q = quality_summary(result.df)
    assert (q.num_frames, q.num_valid) == (60, 54)
    assert q.valid_ratio == pytest.approx(0.9)
    assert q.reasons == {"no_face": 6}
    assert (q.longest_invalid_run, q.longest_invalid_start) == (5, 10)
    assert invalid_runs(np.ones(3, bool)) == []
    assert invalid_runs(np.zeros(3, bool)) == [(0, 2)]


def test_merge_runs_caps_the_number_of_shapes():
    runs = [(i * 3, i * 3) for i in range(1000)]
    merged = charts.merge_runs(runs, max_runs=50)
    assert len(merged) <= 50
    assert merged[0][0] == 0 and merged[-1][1] == 2997  # still covers everything
    assert charts.merge_runs(runs[:10], max_runs=50) == runs[:10]


def test_pose_figure_is_labelled_and_shaded(result):
    fig = charts.pose_figure(result.df, frame=12)
    assert fig.layout.xaxis.title.text == "time (s)"
    assert "degrees" in fig.layout.yaxis.title.text
    lines = [t for t in fig.data if t.name in ("yaw", "pitch", "roll")]
    assert len(lines) == 3 and all("markers" in t.mode for t in lines)  # selectable points
    assert list(lines[0].customdata[:3]) == [0, 1, 2]  # frame index on hover
    assert "frame %{customdata}" in lines[0].hovertemplate
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(rects) == 2  # frames 10-14 and 40
    assert rects[0].x0 == pytest.approx(10 / 25 - 0.02) and rects[0].x1 == pytest.approx(14 / 25 + 0.02)
    marker = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(marker) == 1 and marker[0].x0 == pytest.approx(12 / 25)
    assert any(t.name == "no face / invalid frame" for t in fig.data)  # legend explains the shading


def test_other_figures(result):
    df = result.df
    trans = charts.translation_figure(df)
    assert "dm" in trans.layout.yaxis.title.text
    crop = charts.crop_figure(df, frame=3)
    titles = [a.text for a in crop.layout.annotations]
    assert any("y down" in t for t in titles) and any("scale" in t for t in titles)
    exp = charts.expression_figure(df, [0, 5])
    assert [t.name for t in exp.data if t.name.startswith("exp")] == ["exp[0]", "exp[5]"]
    heat = charts.expression_heatmap(df)
    assert heat.data[0].z.shape == (64, 60)


def test_heatmap_thins_long_videos(tmp_path):
    long = load_result(write_fake_outputs(tmp_path / "long", formats=("npz",), n=4000, invalid=())["npz"])
    heat = charts.expression_heatmap(long.df)
    assert heat.data[0].z.shape[1] <= charts.HEATMAP_MAX_COLUMNS
    assert "one frame in 3 shown" in heat.layout.title.text
    assert type(charts.pose_figure(long.df).data[0]).__name__ == "Scattergl"


def test_selected_frame_reads_customdata_or_time(result):
    assert charts.selected_frame({"selection": {"points": [{"customdata": 17, "x": 0.1}]}}, result.df) == 17
    assert charts.selected_frame({"selection": {"points": [{"customdata": [23]}]}}, result.df) == 23
    assert charts.selected_frame({"selection": {"points": [{"x": 0.81}]}}, result.df) == 20
    assert charts.selected_frame({"selection": {"points": []}}, result.df) is None
    assert charts.selected_frame(None, result.df) is None


def test_read_frame_seeks_to_the_same_pixels_the_engine_decodes(tmp_path):
    from dashboard.frames import read_frame
    from engine.sources import iter_frames

    clip = make_clip(tmp_path / "clip.mp4", n=40, size=(96, 64))
    frames = np.concatenate([b.images for b in iter_frames(clip, batch_size=16)])
    times = np.concatenate([b.timestamps for b in iter_frames(clip, batch_size=16)])
    for i in (0, 13, 39):
        np.testing.assert_array_equal(read_frame(clip, i, float(times[i])), frames[i])
        np.testing.assert_array_equal(read_frame(clip, i), frames[i])


def test_frame_views_crop_and_fallback(result):
    from dashboard.viewer import frame_views

    frame = np.full((240, 320, 3), 128, np.uint8)
    views = frame_views(frame, result, 5)
    assert views.original.size == (320, 240) and views.crop.size == (224, 224)
    assert np.asarray(views.original)[100, 130].tolist() != [128, 128, 128]  # a landmark was drawn
    invalid = frame_views(frame, result, 12)  # no landmarks: the template fallback, said in words
    assert invalid.crop is not None and "template" in invalid.crop_note


def test_bfm_and_empty_files_are_rejected_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_BFM_DIR", str(tmp_path / "BFM"))
    bad = tmp_path / EXP_PCA
    bad.write_bytes(b"\0" * 10)
    check = validate_bfm_file(bad, EXP_PCA)
    assert not check.ok and "51,086,404" in check.message
    mat = tmp_path / "BFM_model_front.mat"
    import scipy.io

    scipy.io.savemat(mat, {"meanshape": np.zeros((1, 9)), "tri": np.zeros((2, 3))})
    check = validate_bfm_file(mat, "BFM_model_front.mat")
    assert not check.ok and "idBase" in check.message and check.message.startswith("BFM_model_front.mat")
    result = install("bfm", bad, actor=LOCAL)
    assert not result.ok and result.path is None and not (tmp_path / "BFM" / EXP_PCA).exists()
    empty = tmp_path / "epoch_20.pth"
    empty.write_bytes(b"")
    assert "empty" in install("checkpoint", empty, actor=LOCAL).message


def test_formatters():
    assert fmt_duration(None) == "–"
    text = explain_error("clip.mp4: no face found", "no_face")
    assert text.startswith("clip.mp4: no face found") and "landmark backend" in text
    assert "unexpected" in explain_error("KeyError: 'x'", "error")
    assert explain_error(None, None) == ""


def test_face_alignment_weight_checks_accept_the_right_net_and_reject_others(tmp_path):
    """The setup page's S3FD/FAN checks load the file strictly into face_alignment's own networks."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd

    from dashboard.validate import _fan, _sfd

    weights = tmp_path / "s3fd-619a316812.pth"
    torch.save(s3fd().state_dict(), weights)
    text = tmp_path / "2DFAN4-11f355bf06.pth.tar"
    text.write_text("<html>not found</html>")
    assert _sfd(weights) == (True, "S3FD detector weights, 65 tensors")
    ok, why = _fan(weights)
    assert not ok and "not 2D-FAN-4 weights" in why
    ok, why = _sfd(text)
    assert not ok and why.startswith("not a PyTorch weight file")


def test_no_landmarks_drawn_on_a_frame_without_a_face(result):
    """Filler landmarks of an invalid frame (here: real-looking points, as a no-face policy
    may carry them over) are never drawn; the note says why."""
    import dataclasses

    from dashboard.viewer import frame_views

    lm = result.landmarks_img_ydown.copy()
    lm[12] = lm[5]  # frame 12 is invalid but holds usable-looking points
    filled = dataclasses.replace(result, landmarks_img_ydown=lm)
    frame = np.full((240, 320, 3), 128, np.uint8)
    views = frame_views(frame, filled, 12)
    assert (np.asarray(views.original) == 128).all()
    assert "No face in this frame" in views.crop_note
    assert (np.asarray(frame_views(frame, filled, 5).original) != 128).any()


def test_charts_let_a_single_click_select_a_point(result):
    """Streamlit makes a chart with dragmode select/lasso ignore single clicks (clickmode "event");
    every selectable chart therefore keeps another drag mode."""
    for fig in (charts.pose_figure(result.df), charts.translation_figure(result.df),
                charts.crop_figure(result.df), charts.expression_figure(result.df, [0, 1])):
        assert fig.layout.dragmode not in ("select", "lasso")


def test_pose_is_wrapped_in_the_results_table(tmp_path):
    res = fake_result(n=10, invalid=())
    res.coeff[:, 225] += 2 * np.pi  # yaw one full turn off, as an unconstrained network may give
    res.coeff[:, 224] = np.radians(200.0)
    df = result_frame({"coeff": res.coeff, "transform_params": res.trans_params})
    assert df["yaw_deg"].between(-180, 180).all() and abs(df["yaw_deg"].iloc[0]) < 1
    assert np.allclose(df["pitch_deg"], -160.0)
