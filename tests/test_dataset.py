"""The dataset view: pure metrics/filters/export (dashboard.dataset), demo jobs, the wrap helper,
and the Dataset page through Streamlit's AppTest on a real temporary registry."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import streamlit as st

from dashboard import charts
from dashboard import data as dashboard_data
from dashboard.dataset import METRICS, FilterError, aligned_x, dataset_frame, export_csv, filter_mask, job_metrics
from dashboard.demo import demo_trajectory, is_demo, make_demo_jobs
from dashboard.results import load_result, result_frame
from db import service
from engine.conventions import wrap_deg
from tests.dashboard_fixtures import dashboard_registry, served_on
from tests.test_dashboard import open_page, texts


def test_wrap_deg_maps_every_angle_into_minus180_180():
    a = np.array([346.9, 180.0, -180.0, -190.0, 725.0, 0.0, np.nan])
    w = wrap_deg(a)
    assert np.allclose(w[:6], [-13.1, -180.0, -180.0, 170.0, 5.0, 0.0])
    assert np.isnan(w[6])
    finite = np.linspace(-2000, 2000, 4001)
    out = wrap_deg(finite)
    assert out.min() >= -180 and out.max() < 180
    assert np.allclose(np.mod(out - finite, 360.0) % 360.0 * (np.abs(np.mod(out - finite, 360.0)) < 359.999), 0)


def test_result_frame_shows_wrapped_pose():
    res = demo_trajectory(seed=0, n=20)  # seed 0 stores yaw offset by a full turn
    assert res.coeff[:, 225].min() > 5.0  # radians: beyond 2π − 70°
    df = result_frame({"coeff": res.coeff, "transform_params": res.trans_params, "valid": res.valid})
    assert df["yaw_deg"].abs().max() <= 70.0


def _table():
    rows = []
    for seed in range(8):
        res = demo_trajectory(seed, 60)
        df = result_frame({"coeff": res.coeff, "transform_params": res.trans_params, "valid": res.valid,
                           "reason": np.array(res.reason), "timestamps": res.timestamps})
        rows.append({"job": seed + 1, "name": f"demo-{seed}.mp4", "input": "uploads/x", "result": "results/x",
                     "demo": True, **job_metrics(df)})
    return dataset_frame(rows)


def test_job_metrics_and_filters():
    table = _table()
    assert list(table.columns[-len(METRICS):]) == list(METRICS)
    assert ((table["valid_pct"] >= 0) & (table["valid_pct"] <= 100)).all()
    assert (table.loc[table["valid_pct"] < 100, "reasons"].str.contains("no_face")).all()
    low = table[filter_mask(table, "valid < 95 %")]
    assert len(low) and (low["valid_pct"] < 95).all()
    wide = table[filter_mask(table, "|yaw| > 45°")]
    big = np.maximum(table["yaw_min"].abs(), table["yaw_max"].abs()) > 45
    assert wide["job"].tolist() == table.loc[big, "job"].tolist()
    both = table[filter_mask(table, "valid >= 95, |yaw| <= 45")]
    assert set(both["job"]).isdisjoint(low["job"]) and set(both["job"]).isdisjoint(wide["job"])
    assert filter_mask(table, "longest run > 0").sum() == (table["longest_invalid_run"] > 0).sum()
    with pytest.raises(FilterError, match="unknown metric"):
        filter_mask(table, "colour > 3")
    with pytest.raises(FilterError, match="cannot read"):
        filter_mask(table, "valid is low")


def test_export_csv_has_relative_paths_and_metrics():
    table = _table()
    back = pd.read_csv(io.BytesIO(export_csv(table)))
    assert list(back.columns) == list(table.columns)
    assert not back["input"].str.startswith("/").any()
    assert len(back) == len(table)


def test_comparison_alignment_and_figure():
    dfs = {}
    for seed, n in ((1, 50), (2, 80), (3, 20)):
        res = demo_trajectory(seed, n)
        dfs[f"v{seed}"] = result_frame({"coeff": res.coeff, "transform_params": res.trans_params,
                                        "timestamps": res.timestamps + 3.0})
    x = aligned_x(dfs["v2"], "normalised")
    assert x[0] == 0.0 and x[-1] == 1.0
    assert aligned_x(dfs["v2"], "time")[0] == 0.0
    fig = charts.comparison_figure(dfs, {"yaw (°)": "yaw_deg", "exp[0]": "exp_00"},
                                   lambda d: aligned_x(d, "normalised"), "position")
    assert len(fig.data) == 6 and {t.name for t in fig.data} == set(dfs)


def test_change_heatmap_is_centred_on_the_median():
    res = demo_trajectory(5, 40)
    df = result_frame({"coeff": res.coeff, "transform_params": res.trans_params})
    fig = charts.expression_change_heatmap(df)
    z = np.asarray(fig.data[0].z)
    assert np.allclose(np.median(z, axis=1), 0, atol=1e-9)
    bars = charts.coefficient_summary_figure(res.coeff[:, 144:224], res.valid, "tex")
    assert len(bars.data[0].x) == 80


@pytest.fixture(autouse=True, scope="module")
def _served_locally():
    with served_on("127.0.0.1"):
        yield


@pytest.fixture
def demo_studio(tmp_path, monkeypatch):
    reg = dashboard_registry(tmp_path, monkeypatch)
    queued = service.submit_file(reg, _clip(tmp_path), {"landmarks": "mtcnn"}, original_name="someone_else.mp4")
    ids = make_demo_jobs(reg, 21, frames=40)
    yield reg, ids, queued
    reg.close()


def _clip(tmp_path):
    from tests.dashboard_fixtures import make_clip

    return make_clip(tmp_path / "other.mp4", n=5, size=(64, 48))


def test_demo_jobs_are_real_succeeded_jobs_and_leave_other_jobs_alone(demo_studio):
    reg, ids, queued = demo_studio
    assert len(ids) == 21
    assert service.get_job(reg, queued.id).status.value == "queued"  # the demo claims only its own jobs
    job = service.get_job(reg, ids[3])
    assert job.status.value == "succeeded" and is_demo(job.engine_version) and job.name == "demo-03.mp4"
    q = service.get_quality(reg, ids[3])
    assert q is not None and q.valid_frames < q.frames  # seed 3 has a stretch without a face
    npz = service.artifacts_of(reg, ids, "npz")
    assert set(npz) == set(ids)
    assert load_result(npz[ids[0]].path).num_frames == 40


def test_dataset_page_lists_filters_and_compares(demo_studio):
    _reg, _ids, _ = demo_studio
    at = open_page("dataset")
    frame = at.dataframe[0].value
    assert len(frame) == 21
    assert "21 of 21 finished jobs" in texts(at)
    assert ":orange-badge[demo]" in texts(at)
    assert not frame["input"].astype(str).str.startswith("/").any()
    assert len(at.multiselect(key="ds_compare").value) == 3  # three videos compared by default
    assert len(at.get("plotly_chart")) == 2  # histograms + comparison
    at.segmented_control(key="ds_align").set_value("normalised").run()
    assert not at.exception
    at.text_input(key="ds_filter").input("valid < 95 %").run()
    assert not at.exception
    filtered = at.dataframe[0].value
    assert 0 < len(filtered) < 21 and (filtered["valid_pct"] < 95).all()
    assert f"{len(filtered)} of 21 finished jobs" in texts(at)
    at.text_input(key="ds_filter").input("nonsense").run()
    assert "Filter not applied" in texts(at)
    assert len(at.dataframe[0].value) == 21


def test_dataset_page_without_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    st.cache_data.clear()
    at = open_page("dataset")
    assert "python -m dashboard.demo" in texts(at)


def test_each_result_file_is_summarised_once(demo_studio, monkeypatch):
    """The dataset table's cost stays bounded: a job's .npz is read once per file state, however
    often the table is rebuilt (new search, expired table cache)."""
    reads = []
    real = dashboard_data.load_result

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(dashboard_data, "load_result", counting)
    first = dashboard_data.dataset_table(None)
    assert len(first) == 21 and len(reads) == 21
    dashboard_data.dataset_table.clear()  # as when its time-to-live has run out
    again = dashboard_data.dataset_table(None)
    assert len(again) == 21 and len(reads) == 21
    assert len(dashboard_data.dataset_table("demo-01")) == 1 and len(reads) == 21
