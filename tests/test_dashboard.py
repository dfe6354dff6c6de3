"""AppTest runs of every dashboard page against a temporary registry with a job in every state."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.fmt import rows_key
from db import JobStatus, Registry, service
from engine.doctor import Check
from tests.dashboard_fixtures import dashboard_registry, make_clip, populate, served_on

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "streamlit_app.py"

DOCTOR = [
    Check("system", "Python", True, "3.11"),
    Check(
        "weights",
        "reconstruction net",
        False,
        "no reconstruction checkpoint under checkpoints/",
        "Get epoch_20.pth from Deep3DFaceRecon_pytorch's README",
    ),
    Check("system", "GPU", False, "no CUDA device visible", "", required=False),
]


@pytest.fixture(autouse=True, scope="module")
def _served_locally():
    """These pages are the ones `make run` serves on 127.0.0.1 (no sign-in), whatever the cwd."""
    with served_on("127.0.0.1"):
        yield


@pytest.fixture
def empty_studio(tmp_path, monkeypatch):
    """An empty registry under tmp_path; the dashboard (and the weight folders) point there."""
    reg = dashboard_registry(tmp_path, monkeypatch, DOCTOR)
    yield reg, tmp_path
    reg.close()


@pytest.fixture
def studio(empty_studio):
    """The registry of :func:`empty_studio` with one job per state."""
    reg, tmp_path = empty_studio
    return reg, populate(reg, tmp_path), tmp_path


def open_page(page: str, **query) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.run()
    at.switch_page(f"pages/{page}.py")
    at.query_params.update({k: str(v) for k, v in query.items()})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    for kind in ("error", "warning", "info", "success"):
        parts += [e.value for e in getattr(at, kind)]
    return "\n".join(parts)


def test_overview_counts_workers_and_missing_setup(studio):
    at = open_page("overview")
    metrics = {m.label: m.value for m in at.metric}
    for status in JobStatus:
        label = next(k for k in metrics if k.endswith(f"{status.value}]"))
        assert metrics[label] == "1"
    assert "Free disk under data/" in metrics
    body = texts(at)
    assert "worker-test" in body and "talk_running.mp4" in body  # alive worker and its current job
    assert any("reconstruction net" in e.value and "epoch_20.pth" in e.value for e in at.error)
    assert any("setup" in str(link.proto.page) for link in at.get("page_link"))


def test_overview_shows_each_workers_jobs_its_speed_and_the_queue_eta(studio):
    """A worker holds several jobs (one claimed ahead): all are listed, with its frames/s, and the
    queue's ETA is its frames left (30 of the running job + 60 of the waiting one) / frames/s."""
    reg, ids, _ = studio
    ahead = service.claim_next(reg, "worker-test", device="cpu")
    assert ahead is not None and ahead.id == ids["queued"]
    service.report_progress(reg, ahead.id, "worker-test", stage="waiting")
    load = service.throughput(reg)
    [mine] = [wl for wl in load.workers if wl.worker.worker_id == "worker-test"]
    assert [j.id for j in mine.jobs] == [ids["running"], ahead.id] and mine.fps == pytest.approx(12.5)
    assert (load.frames_left, load.eta_s) == (90, pytest.approx(90 / 12.5))
    body = texts(open_page("overview"))
    assert "**talk_running.mp4** (50%)" in body and f"**{ahead.name}** (next in line)" in body
    assert "12.5 frames/s" in body and "90 frames left at 12.5 frames/s · ETA 7 s" in body


def test_overview_names_the_slot_of_several_workers_of_one_gpu(studio):
    """``--per-gpu 2``: two worker processes of cuda:0 (ids ending in ``#0`` / ``#1``) are told apart."""
    reg, _, _ = studio
    for slot in (0, 1):
        service.register_worker(reg, f"gpubox-{100 + slot}-cuda0#{slot}", hostname="gpubox", pid=100 + slot,
                                device="cuda:0", device_name="NVIDIA H200")
    service.worker_heartbeat(reg, "gpubox-101-cuda0#1", status="idle", message="loading models")
    body = texts(open_page("overview"))
    assert "cuda:0 #0 (NVIDIA H200)" in body and "cuda:0 #1 (NVIDIA H200)" in body
    assert "cpu (CPU)" in body  # a worker without a slot: its device alone
    assert "idle (loading models)" in body  # what a worker says before its first claim


def test_overview_without_workers_says_so(studio, monkeypatch):
    reg, _, _ = studio
    service.stop_worker(reg, "worker-test")
    at = open_page("overview")
    assert any("No worker is running" in w.value for w in at.warning)


def test_jobs_table_lists_every_state_and_filters(studio):
    _, ids, _ = studio
    at = open_page("jobs")
    table = at.dataframe[0].value
    assert sorted(table["ID"]) == sorted(ids.values())
    by_id = table.set_index("ID")
    assert by_id.loc[ids["running"], "Status"] == "running"
    assert by_id.loc[ids["running"], "Progress"] == pytest.approx(0.5)
    assert by_id.loc[ids["running"], "Speed"] == "12.5 /s"
    assert by_id.loc[ids["running"], "Time"] == "2 s left"  # 30 frames left at 12.5 frames/s
    assert "no face" in by_id.loc[ids["failed"], "Error"]
    assert by_id.loc[ids["succeeded"], "Progress"] == 1.0

    at.button_group(key="jobs_status").set_value(["failed"]).run()
    assert list(at.dataframe[0].value["ID"]) == [ids["failed"]]
    at.text_input(key="jobs_search").set_value("nothing-like-this").run()
    assert any("No job matches" in i.value for i in at.info)


def _select(at: AppTest, reg: Registry, job_ids: list[int]) -> AppTest:
    shown = list(at.dataframe[0].value["ID"])
    at.session_state[rows_key("jobs_table", shown)] = {
        "selection": {"rows": [shown.index(i) for i in job_ids], "columns": [], "cells": []}
    }
    return at.run()


def test_jobs_actions_cancel_retry_delete(studio):
    reg, ids, _ = studio
    at = open_page("jobs")

    _select(at, reg, [ids["failed"]])
    assert any("no face" in e.value.lower() and "landmark backend" in e.value for e in at.error)  # explained
    assert at.button(key="jobs_cancel").disabled and at.button(key="jobs_open").disabled
    at.button(key="jobs_retry").click().run()
    assert service.get_job(reg, ids["failed"]).status == JobStatus.QUEUED
    assert any("Queued again" in s.value for s in at.success)

    _select(at, reg, [ids["running"], ids["queued"]])
    at.button(key="jobs_cancel").click().run()
    assert service.get_job(reg, ids["running"]).cancel_requested
    assert service.get_job(reg, ids["queued"]).status == JobStatus.CANCELLED

    result_dir = reg.result_dir(ids["succeeded"])
    assert result_dir.is_dir()
    _select(at, reg, [ids["succeeded"]])
    at.button(key="jobs_delete").click().run()
    assert any("Delete 1 job" in w.value for w in at.warning)  # asks first
    assert service.get_job(reg, ids["succeeded"]) is not None
    at.button(key="jobs_delete_yes").click().run()
    assert not any(j.id == ids["succeeded"] for j in service.list_jobs(reg, limit=100))
    assert not result_dir.exists()


def test_jobs_open_results_goes_to_results_page(studio):
    reg, ids, _ = studio
    at = open_page("jobs")
    _select(at, reg, [ids["succeeded"]])
    at.button(key="jobs_open").click().run()
    assert not at.exception
    assert at.title[0].value == "talk_done.mp4"


def test_jobs_paginates_thousands_style(studio):
    reg, _, tmp = studio
    clip = tmp / "clip.mp4"
    for i in range(30):
        service.submit_file(reg, clip, {"landmarks": "mtcnn"}, copy=False, original_name=f"bulk_{i:03d}.mp4")
    at = open_page("jobs")
    at.selectbox(key="jobs_size").set_value(25).run()
    assert len(at.dataframe[0].value) == 25
    assert any("of 35" in c.value and "page 1 of 2" in c.value for c in at.caption)
    at.number_input(key="jobs_page").set_value(2).run()
    assert len(at.dataframe[0].value) == 10
    at.selectbox(key="jobs_sort").set_value("Name (A–Z)").run()
    names = list(at.dataframe[0].value["Name"])  # rows 26-35 of bulk_000..029 + talk_*
    assert names[:2] == ["bulk_025.mp4", "bulk_026.mp4"] and names[5:7] == ["talk_cancelled.mp4", "talk_done.mp4"]


def test_upload_queues_files_and_lands_on_jobs(studio):
    reg, _, tmp = studio
    at = open_page("upload")
    assert at.button(key="up_submit").disabled  # nothing chosen yet
    content = make_clip(tmp / "upload_me.mp4", n=5, size=(64, 48)).read_bytes()
    at.file_uploader(key="up_files").upload("upload_me.mp4", content, "video/mp4").run()
    at.radio(key="up_backend").set_value("mtcnn").run()
    at.button_group(key="up_formats").set_value(["pirender", "npz", "csv"]).run()
    at.number_input(key="up_batch").set_value(8).run()
    at.button(key="up_submit").click().run()
    assert not at.exception
    assert at.title[0].value == "Jobs"  # landed on the jobs table
    job = service.list_jobs(reg, search="upload_me", limit=5)[0]
    assert job.status == JobStatus.QUEUED
    assert job.settings["landmarks"] == "mtcnn" and job.settings["batch_size"] == 8
    assert job.settings["formats"] == ["pirender", "npz", "csv"]
    assert job.input_path.is_relative_to(reg.uploads_dir) and job.input_path.read_bytes() == content


def test_upload_imports_a_server_folder_in_place(studio):
    reg, _, tmp = studio
    folder = tmp / "dataset"
    make_clip(folder / "a" / "one.mp4", n=3, size=(64, 48))
    make_clip(folder / "two.mp4", n=4, size=(64, 48))
    at = open_page("upload")
    at.button_group(key="up_mode").set_value("Import a folder on the server").run()
    at.text_input(key="up_folder").set_value(str(tmp / "missing")).run()
    at.button(key="up_submit").click().run()
    assert any("is not a folder" in e.value for e in at.error)
    at.text_input(key="up_folder").set_value(str(folder)).run()
    at.button(key="up_submit").click().run()
    jobs = [j for j in service.list_jobs(reg, limit=50) if j.video.in_place]
    assert sorted(j.input_path for j in jobs) == sorted([folder / "a" / "one.mp4", folder / "two.mp4"])
    assert not any(p.name in ("one.mp4", "two.mp4") for p in reg.uploads_dir.rglob("*"))  # not copied


def test_upload_warns_about_missing_weights(studio):
    at = open_page("upload")
    at.radio(key="up_backend").set_value("fan").run()
    assert any("FAN's weights are not installed" in w.value for w in at.warning)
    at.button_group(key="up_formats").set_value(["npz", "overlay"]).run()
    assert any("needs the face model" in w.value for w in at.warning)


def test_results_page_charts_quality_downloads_and_viewer(studio):
    _, ids, _ = studio
    at = open_page("results", job=ids["succeeded"])
    assert at.title[0].value == "talk_done.mp4"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Valid frames"] == "90.0%"
    assert metrics["Invalid frames"] == "6 of 60"
    assert metrics["Longest invalid run (0.20 s)"] == "5 frames"
    assert metrics["Reasons"] == "no_face: 6"
    charts = at.get("plotly_chart")
    assert [c.key for c in charts] == [
        "res_chart_pose", "res_chart_trans", "res_chart_crop", "res_chart_exp",
        "res_chart_heat", "res_chart_heat_change", "res_chart_group",  # absolute + change; id/tex/gamma
    ]
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels[0] == "Download bundle (.zip)"
    assert any(lbl.startswith("PIRender .mat") for lbl in labels) and any("NumPy .npz" in lbl for lbl in labels)
    assert len(at.get("image")) == 2  # original frame with landmarks, aligned crop
    assert len(at.get("video")) == 1  # the overlay review video

    at.button(key="res_goto_invalid").click().run()  # longest invalid run starts at frame 10
    assert at.slider(key=f"res_frame_{ids['succeeded']}").value == 10
    assert any("Frame 10" in c.value and "invalid (no_face)" in c.value for c in at.caption)

    at.slider(key=f"res_frame_{ids['succeeded']}").set_value(20).run()
    assert any("Frame 20" in c.value and "· valid ·" in c.value for c in at.caption)
    at.toggle(key=f"res_overlay_{ids['succeeded']}").set_value(True).run()
    assert not at.exception
    assert at.info  # no face model here: says why instead of drawing


def test_results_page_for_unfinished_missing_and_picker(studio):
    _, ids, _ = studio
    at = open_page("results", job=ids["failed"])
    assert any("landmark backend" in e.value for e in at.error)  # the failure, explained
    at = open_page("results", job=ids["running"])
    assert at.get("progress")
    at = open_page("results", job=987654)
    assert any("There is no job 987654" in e.value for e in at.error)
    at = open_page("results")  # no ?job=: the picker lists succeeded jobs
    assert at.selectbox(key="res_job").value == ids["succeeded"]
    assert at.title[0].value == "talk_done.mp4"


def test_setup_page_lists_weights_and_rejects_a_wrong_file(studio):
    _, _, tmp = studio
    at = open_page("setup")
    body = "\n".join(e.label for e in at.expander)
    for name in ("Reconstruction network", "S3FD", "2D-FAN-4", "MTCNN", "Face model BFM"):
        assert name in body
    assert any("reconstruction net" in e.value for e in at.error)  # doctor report
    at.button(key="setup_doctor_again").click().run()  # clears the cached report and runs it again
    assert not at.exception

    at.selectbox(key="setup_kind").set_value("bfm").run()
    at.radio(key="setup_bfm_name").set_value("Exp_Pca.bin").run()
    at.file_uploader(key="setup_upload_bfm").upload("Exp_Pca.bin", b"\0" * 1000).run()
    at.button(key="setup_install").click().run()
    assert any("Exp_Pca.bin: 1,000 bytes, expected 51,086,404" in e.value for e in at.error)
    assert not (tmp / "BFM" / "Exp_Pca.bin").exists()


@pytest.mark.slow
def test_setup_page_installs_a_valid_checkpoint_and_rejects_garbage(studio):
    from tests.factories import make_checkpoint

    _, _, tmp = studio
    at = open_page("setup")
    at.segmented_control(key="setup_how").set_value("Path on this server").run()
    junk = tmp / "epoch_20.pth"
    junk.write_bytes(b"<html>404 not found</html>" * 100)
    at.text_input(key="setup_path").set_value(str(junk)).run()
    at.button(key="setup_install").click().run()
    assert any("was not installed" in e.value for e in at.error), [e.value for e in at.error]
    assert not list((tmp / "checkpoints").rglob("*.pth"))

    good = tmp / "dl" / "epoch_20.pth"
    make_checkpoint(good, "deep3d")
    at.text_input(key="setup_path").set_value(str(good)).run()
    at.button(key="setup_install").click().run()
    assert any("Installed" in s.value for s in at.success), [e.value for e in at.error]
    assert (tmp / "checkpoints" / "epoch_20.pth").read_bytes() == good.read_bytes()


def test_results_page_for_an_image_folder(empty_studio):
    from tests.dashboard_fixtures import add_image_folder

    reg, tmp = empty_studio
    ids = add_image_folder(reg, tmp)
    at = open_page("results", job=ids[1])
    assert at.title[0].value == "faces/b.jpg"
    assert not at.get("plotly_chart")  # one frame: no time series
    assert len(at.get("image")) == 2  # the image with landmarks and its crop
    table = at.dataframe[0].value
    assert list(table["image"]) == ["a.jpg", "b.jpg", "c.jpg"]
    assert table["valid"].all() and set(table.columns) >= {"yaw_deg", "tz"}
    assert any("3 images with results" in c.value for c in at.caption)
    at.session_state[rows_key("res_folder", ids)] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    assert not at.exception
    assert at.title[0].value == "faces/c.jpg"


def test_pages_on_an_empty_installation(empty_studio):
    at = open_page("overview")
    assert {m.value for m in at.metric if "]" in m.label} == {"0"}
    assert any("No worker is running" in w.value for w in at.warning)
    at = open_page("jobs")
    assert any("No jobs yet" in i.value for i in at.info)
    at = open_page("results")
    assert any("No finished job yet" in i.value for i in at.info)


@pytest.mark.slow
def test_results_overlay_with_a_face_model(studio, bfm_index):
    from engine.face3d.synthetic import write_synthetic_model

    _, ids, tmp = studio
    write_synthetic_model(bfm_index, tmp / "BFM")
    at = open_page("results", job=ids["succeeded"])
    at.slider(key=f"res_frame_{ids['succeeded']}").set_value(12).run()
    at.toggle(key=f"res_overlay_{ids['succeeded']}").set_value(True).run()
    assert not at.exception
    assert len(at.get("image")) == 3, [i.value for i in at.info]  # frame, crop, reconstructed face
    # The reconstructed face of this frame can be downloaded as a mesh.
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Mesh of frame 12 (.obj)" in labels and "Mesh of frame 12 (.ply)" in labels, labels


def test_mesh_bytes_is_a_loadable_mesh(studio, bfm_index):
    import io

    import trimesh

    from dashboard.results import load_result
    from dashboard.viewer import mesh_bytes
    from db import Registry, service
    from engine.face3d.model import ParametricFaceModel
    from engine.face3d.synthetic import write_synthetic_model

    _, ids, tmp = studio
    write_synthetic_model(bfm_index, tmp / "BFM")
    reg = Registry()
    npz = next(a.path for a in service.list_artifacts(reg, ids["succeeded"]) if a.format == "npz")
    data = load_result(npz)
    model = ParametricFaceModel.from_dir(tmp / "BFM", "cpu")
    mesh = trimesh.load(io.BytesIO(mesh_bytes(model, data, 3, "obj")), file_type="obj", process=False)
    assert mesh.vertices.shape == (35709, 3) and mesh.faces.shape == (70789, 3)
