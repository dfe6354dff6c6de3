"""Issue 15's rough edges: retry with other settings, duplicate notice, run time and speed in the
jobs table, remembered settings with a ready default backend, the uploaded name, closed pipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dashboard.install import WeightStatus, default_backend
from db import LOCAL, JobStatus, PermissionDenied, service
from db.access import Actor
from tests.test_dashboard import _select, empty_studio, open_page, studio, texts  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def test_retry_with_other_settings_checks_actor_and_validates(studio):  # noqa: F811
    reg, ids, _ = studio
    failed = ids["failed"]
    viewer = Actor("vera", "viewer")
    with pytest.raises(PermissionDenied):
        service.retry_job(reg, failed, actor=viewer, settings={"landmarks": "fan"})
    with pytest.raises(ValueError):
        service.retry_job(reg, failed, actor=LOCAL, settings={"landmarks": "nope"})
    assert service.get_job(reg, failed).status == JobStatus.FAILED  # nothing changed
    state = reg.state_dir(failed)
    state.mkdir(parents=True, exist_ok=True)
    (state / "partial.npz").write_bytes(b"x")
    job = service.retry_job(reg, failed, actor=LOCAL, settings={**service.get_job(reg, failed).settings,
                                                                 "landmarks": "fan"})
    assert job.status == JobStatus.QUEUED and job.settings["landmarks"] == "fan"
    assert not state.exists()  # frames made with the old backend are not resumed


def test_jobs_page_retries_with_another_backend_and_shows_uploaded_name(studio):  # noqa: F811
    reg, ids, tmp = studio
    # a failure worded by the engine about the stored upload (uploads/<sha>.mp4)
    job = service.submit_file(reg, tmp / "clip.mp4", {"landmarks": "mtcnn", "batch_size": 3},
                              original_name="My interview.mp4")
    service.claim_job(reg, job.id, "worker-test-2", device="cpu")
    service.fail_job(reg, job.id, "worker-test-2", error=f"{job.input_path}: no face found in any of 60 frames",
                     code="no_face")
    ids = {**ids, "failed": job.id}
    at = open_page("jobs")
    assert "My interview.mp4: no face" in at.dataframe[0].value.set_index("ID").loc[job.id, "Error"]
    _select(at, reg, [ids["failed"]])
    assert "My interview.mp4 (stored as uploads/" in at.table[0].value.to_string()
    assert any("My interview.mp4: no face" in e.value for e in at.error)  # the error names the uploaded file
    assert not any(job.video.sha256 in e.value for e in at.error)
    at.radio(key=f"jobs_retry_backend_{ids['failed']}").set_value("fan").run()
    at.button(key=f"jobs_retry_with_{ids['failed']}").click().run()
    assert not at.exception
    job = service.get_job(reg, ids["failed"])
    assert job.status == JobStatus.QUEUED and job.settings["landmarks"] == "fan"
    assert "landmarks=fan" in texts(at)


def test_duplicates_are_found_and_named(studio):  # noqa: F811
    reg, ids, tmp = studio
    clip = tmp / "clip.mp4"
    settings = service.get_job(reg, ids["succeeded"]).settings
    again = service.submit_file(reg, clip, settings, original_name="again.mp4")
    same = {j.id for j in service.duplicates_of(reg, again.id)}
    assert ids["succeeded"] in same and ids["queued"] in same and ids["running"] in same
    assert ids["failed"] not in same and ids["cancelled"] not in same
    other = service.submit_file(reg, clip, {**settings, "batch_size": 7}, original_name="other.mp4")
    assert service.duplicates_of(reg, other.id) == []
    at = open_page("jobs")
    _select(at, reg, [again.id])
    assert any("same video content and settings" in w.value for w in at.warning)


def test_finished_jobs_show_run_time_and_average_speed(studio):  # noqa: F811
    _, ids, _ = studio
    at = open_page("jobs")
    by_id = at.dataframe[0].value.set_index("ID")
    assert by_id.loc[ids["succeeded"], "Speed"].endswith(" /s")
    assert by_id.loc[ids["succeeded"], "Time"] != ""
    assert list(at.dataframe[0].value.columns[:4]) == ["ID", "Name", "Status", "Error"]  # error visible first


def _status(key: str, present: bool) -> WeightStatus:
    return WeightStatus(key, key, present, Path("."), "", "")


def test_default_backend_is_the_first_ready_one():
    order = ["fan", "mtcnn", "file"]
    assert default_backend([_status("sfd", True), _status("fan", True), _status("mtcnn", True)], order) == "fan"
    assert default_backend([_status("sfd", True), _status("fan", False), _status("mtcnn", True)], order) == "mtcnn"
    assert default_backend([_status("mtcnn", False)], order) == "fan"


def test_upload_settings_default_to_a_ready_backend_and_are_remembered(empty_studio, monkeypatch):  # noqa: F811
    import dashboard.install as install

    monkeypatch.setattr(install, "weight_statuses",
                        lambda: [_status("sfd", False), _status("fan", False), _status("mtcnn", True)])
    import pages.upload as upload_page  # noqa: F401  (the page imports weight_statuses by name)

    monkeypatch.setattr("dashboard.install.weight_statuses", install.weight_statuses)
    at = open_page("upload")
    assert at.radio(key="up_backend").value == "mtcnn"
    at.number_input(key="up_batch").set_value(16).run()
    assert at.query_params["batch"] == ["16"] or at.query_params["batch"] == "16"
    # a new browser session opened on the same address starts from it
    fresh = open_page("upload", backend="fan", batch=8, formats="npz,csv")
    assert fresh.radio(key="up_backend").value == "fan"
    assert fresh.number_input(key="up_batch").value == 8
    assert fresh.button_group(key="up_formats").value == ["npz", "csv"]


def test_jobs_listing_survives_a_closed_pipe(tmp_path):
    env = {"STUDIO_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    from db import Registry

    reg = Registry(data_dir=str(tmp_path / "data"))
    from tests.dashboard_fixtures import make_clip

    clip = make_clip(tmp_path / "c.mp4", n=3, size=(64, 48))
    for i in range(400):  # ~200 bytes a row: far more than a pipe buffer holds
        service.submit_file(reg, clip, {"landmarks": "mtcnn"}, copy=False,
                            original_name=f"{'long_name_' * 18}{i:03d}.mp4")
    reg.close()
    cmd = f"{sys.executable} -m engine jobs --limit 400 | head -2"
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- worker: loading, cancel


@pytest.fixture
def wreg(tmp_path):
    from db import Registry
    from tests.test_worker import ScriptedEngine

    ScriptedEngine.built, ScriptedEngine.runs, ScriptedEngine.stops, ScriptedEngine.at_gate = [], [], [], []
    r = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data")
    yield r
    r.close()


def _run_worker(in_thread, reg, factory, **opts):
    from tests.test_worker import FAST
    from worker.loop import Worker, WorkerOptions

    worker = Worker(reg, WorkerOptions(**{**FAST.__dict__, **opts}), worker_id="w-review", engine_factory=factory)
    return worker, in_thread(worker)


def test_model_loading_is_shown_as_a_stage(wreg, tmp_path, in_thread):
    """While the engine (its models) is being built for a claimed job, the job says "loading", not 0 frames
    and nothing. The first job's models are loaded before the worker claims anything; the second job
    needs other models (another landmark backend), built once it is claimed."""
    import threading

    from tests.test_worker import WAIT_S, ScriptedEngine, _spec, _submit
    from worker.loop import wait_for

    loaded = threading.Event()
    builds = []

    def slow_to_load(cfg, **components):
        builds.append(cfg.landmarks)
        if len(builds) > 1:
            assert loaded.wait(WAIT_S), "the test never let the models load"
        return ScriptedEngine(cfg, **components)

    first = _submit(wreg, _spec(tmp_path, "first.mp4", frames=4))
    job = _submit(wreg, _spec(tmp_path, "clip.mp4", frames=4), landmarks="fan")
    worker, thread = _run_worker(in_thread, wreg, slow_to_load, concurrency=1, prefetch=0)
    assert wait_for(lambda: service.get_job(wreg, job.id).stage == "loading", WAIT_S)
    assert service.get_job(wreg, job.id).status == JobStatus.RUNNING
    assert service.get_job(wreg, first.id).status == JobStatus.SUCCEEDED
    loaded.set()
    assert wait_for(lambda: service.get_job(wreg, job.id).status == JobStatus.SUCCEEDED, WAIT_S)
    assert [b.value for b in builds] == ["mtcnn", "fan"]
    worker.request_stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()


def test_cancel_of_a_running_cpu_job_is_done_within_2_s_by_the_recorded_times(wreg, tmp_path, in_thread):
    """A slow stand-in stage (0.2 s a batch, endless) and the worker's default cancel polling: the
    registry's own timestamps (cancel asked → job finished) are at most 2 s apart."""
    from tests.test_worker import WAIT_S, ScriptedEngine, _spec, _submit
    from worker.loop import WorkerOptions, wait_for

    job = _submit(wreg, _spec(tmp_path, "slow.mp4", frames=100_000, delay=0.2), batch_size=1)
    worker, thread = _run_worker(in_thread, wreg, ScriptedEngine, cancel_poll_s=WorkerOptions().cancel_poll_s,
                                 progress_s=WorkerOptions().progress_s)
    assert wait_for(lambda: service.get_job(wreg, job.id).frames_done >= 2, WAIT_S)
    service.cancel_job(wreg, job.id, actor=LOCAL)
    assert wait_for(lambda: service.get_job(wreg, job.id).status == JobStatus.CANCELLED, WAIT_S)
    done = service.get_job(wreg, job.id)
    assert done.cancel_requested_at is not None and done.finished_at is not None
    assert 0 <= (done.finished_at - done.cancel_requested_at).total_seconds() <= 2.0
    assert ScriptedEngine.stops and ScriptedEngine.stops[0] < 100_000
    worker.request_stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()
