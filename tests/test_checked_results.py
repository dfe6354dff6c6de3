"""Checked results (every served file matches its registered SHA-256) and worded messages
(the user's file name, "has no video stream", "not a regular file", no absolute paths)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.fmt import explain_error
from db import LOCAL, JobStatus, Registry, service
from db.bundle import ResultFileError, build_bundle, check_artifacts, read_checked
from db.models import Artifact
from engine.errors import InputError
from tests.conftest import REPO
from tests.dashboard_fixtures import served_on
from tests.media import make_audio_only

APP = REPO / "streamlit_app.py"


@pytest.fixture(autouse=True, scope="module")
def _served_locally():
    with served_on("127.0.0.1"):
        yield


def _artifact(reg, job_id: int, fmt: str):
    return next(a for a in service.list_artifacts(reg, job_id) if a.format == fmt)


def flip_two_bytes(path: Path) -> None:
    """Change two bytes in the middle of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid] ^= 0xFF
    data[mid + 1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_changed_result_is_never_served(studio):
    reg, ids, _ = studio
    job = ids["succeeded"]
    npz = _artifact(reg, job, "npz")
    assert read_checked(reg, npz) == npz.path.read_bytes()  # intact: served
    flip_two_bytes(npz.path)
    want = f"results/{job}/talk_done.npz changed on disk since the job finished (SHA-256 mismatch); re-run the job"
    with pytest.raises(ResultFileError) as info:
        read_checked(reg, npz)
    assert str(info.value) == want
    with pytest.raises(ResultFileError, match="SHA-256 mismatch"):
        build_bundle(reg, job)
    assert not reg.result_dir(job).joinpath(f"bundle-{job}.zip").exists()
    checks = {c.artifact.format: c.problem for c in check_artifacts(reg, job)}
    assert checks["npz"] == want and checks["pirender"] is None


def test_a_missing_result_is_named_not_silently_skipped(studio):
    reg, ids, _ = studio
    job = ids["succeeded"]
    mat = _artifact(reg, job, "pirender")
    mat.path.unlink()
    with pytest.raises(ResultFileError, match=rf"results/{job}/talk_done.mat is missing from disk"):
        build_bundle(reg, job)
    with pytest.raises(ResultFileError, match="missing from disk"):
        read_checked(reg, mat)


def test_a_cached_bundle_is_checked_and_rebuilt_when_its_inputs_change(studio):
    reg, ids, _ = studio
    job = ids["succeeded"]
    first = build_bundle(reg, job)
    stamp = first.stat().st_mtime_ns
    assert build_bundle(reg, job).stat().st_mtime_ns == stamp  # unchanged inputs: the cached zip

    # The cached zip itself was altered (same key, other bytes): rebuilt with the registered bytes.
    with zipfile.ZipFile(first) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
        comment = zf.comment
    with zipfile.ZipFile(first, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, b"tampered" if name == "talk_done.csv" else data)
        zf.comment = comment
    rebuilt = build_bundle(reg, job)
    with zipfile.ZipFile(rebuilt) as zf:
        csv = _artifact(reg, job, "csv")
        assert zf.read("talk_done.csv") == csv.path.read_bytes()

    # A result re-registered with other bytes (its registered digest changed): rebuilt with them.
    csv.path.write_text("frame,valid\n0,1\n")
    from sqlmodel import select

    from db.storage import sha256_file

    with reg.write() as s:
        row = s.exec(select(Artifact).where(Artifact.job_id == job, Artifact.format == "csv")).one()
        row.sha256, row.bytes = sha256_file(csv.path), csv.path.stat().st_size
        s.add(row)
    again = build_bundle(reg, job)
    with zipfile.ZipFile(again) as zf:
        assert zf.read("talk_done.csv") == b"frame,valid\n0,1\n"
        manifest = json.loads(zf.read("manifest.json"))
    assert {f["name"]: f["sha256"] for f in manifest["files"]}["talk_done.csv"] == sha256_file(csv.path)


def test_the_manifest_names_the_checkpoint_and_holds_no_server_path(studio):
    reg, ids, tmp = studio
    job = ids["succeeded"]
    ckpt = tmp / "models" / "epoch_20.pth"
    with reg.write() as s:
        from db.models import Job

        row = s.get(Job, job)
        row.settings = {**row.settings, "checkpoint": str(ckpt), "keypoints": str(tmp / "kp")}
        row.report = {"checkpoint_name": "epoch_20.pth", "media_fps": 25.0}
        s.add(row)
    with zipfile.ZipFile(build_bundle(reg, job)) as zf:
        text = zf.read("manifest.json").decode()
    manifest = json.loads(text)
    assert manifest["checkpoint"] == {"name": "epoch_20.pth", "sha256": "0" * 64}
    assert manifest["settings"]["checkpoint"] == "epoch_20.pth" and manifest["settings"]["keypoints"] == "kp"
    assert str(tmp) not in text and '"/' not in text


def _results_page(job_id: int) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    at.switch_page("pages/results.py")
    at.query_params["job"] = str(job_id)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_the_results_page_shows_a_changed_file_and_does_not_offer_it(studio):
    reg, ids, _ = studio
    job = ids["succeeded"]
    at = _results_page(job)
    buttons = {b.proto.label: b for b in at.get("download_button")}
    assert not buttons["Download bundle (.zip)"].proto.disabled and any(k.startswith("CSV") for k in buttons)

    flip_two_bytes(_artifact(reg, job, "csv").path)
    at = _results_page(job)
    buttons = {b.proto.label: b for b in at.get("download_button")}
    assert buttons["Download bundle (.zip)"].proto.disabled
    assert not any(k.startswith("CSV") for k in buttons) and any(k.startswith("PIRender") for k in buttons)
    assert any(f"results/{job}/talk_done.csv changed on disk since the job finished (SHA-256 mismatch); "
               "re-run the job" in e.value for e in at.error), [e.value for e in at.error]
    assert at.get("plotly_chart")  # the npz is intact: charts still drawn


def test_the_results_page_with_a_deleted_npz_says_so(studio):
    reg, ids, _ = studio
    job = ids["succeeded"]
    _artifact(reg, job, "npz").path.unlink()
    at = _results_page(job)
    assert any(f"results/{job}/talk_done.npz is missing from disk" in e.value for e in at.error)
    assert not at.get("plotly_chart") and any("npz result, which is not usable" in w.value for w in at.warning)


# =============================================================================== worded messages


def test_a_fifo_or_folder_is_not_a_regular_file(tmp_path):
    reg = Registry(url=f"sqlite:///{tmp_path / 's.db'}", data_dir=tmp_path / "data")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(InputError) as info:
        service.submit_file(reg, fifo, {"landmarks": "mtcnn"})
    assert str(info.value) == "pipe.mp4: not a regular file: it is a named pipe (FIFO); expected a video or image file"
    with pytest.raises(InputError, match="not a regular file: it is a folder"):
        service.submit_file(reg, tmp_path, {"landmarks": "mtcnn"})
    with pytest.raises(InputError, match=r"missing\.mp4: no such file"):
        service.submit_file(reg, tmp_path / "missing.mp4", {"landmarks": "mtcnn"})
    from dashboard.install import validate

    assert "not a regular file: it is a named pipe (FIFO)" in validate("checkpoint", fifo).message
    reg.close()


def test_an_audio_only_upload_fails_as_no_video_stream_under_the_users_name(tmp_path):
    """A real worker runs the real engine on an uploaded audio-only file: the job's error names
    the file as uploaded (not the hashed copy) and says "no video stream", not "corrupt"."""
    from worker.loop import Worker, WorkerOptions

    reg = Registry(url=f"sqlite:///{tmp_path / 's.db'}", data_dir=tmp_path / "data")
    song = make_audio_only(tmp_path / "interview.mp4")
    with song.open("rb") as f:
        job = service.submit_upload(reg, f, "interview.mp4", {"landmarks": "mtcnn", "formats": ["npz"]})
    assert job.input_path.name != "interview.mp4"  # stored by hash
    Worker(reg, WorkerOptions(device="cpu", burst=True, poll_s=0.05), worker_id="w-audio").work()
    failed = service.get_job(reg, job.id)
    assert failed.status == JobStatus.FAILED
    assert failed.error == "interview.mp4: has no video stream (audio only)", failed.error
    shown = explain_error(failed.error, failed.error_code)
    assert "no picture" in shown and "corrupt" not in shown
    service.delete_job(reg, job.id, actor=LOCAL)
    reg.close()
