"""The job registry on a real temporary SQLite file: schema, storage, status machine, queries."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import threading
import zipfile
from datetime import timedelta, timezone
from pathlib import Path

import pytest
from sqlmodel import select

from db import (
    LOCAL,
    SCHEMA_VERSION,
    JobNotFound,
    JobStateError,
    JobStatus,
    Registry,
    SchemaError,
    service,
)
from db.models import Job, Meta, WorkerRow, utcnow
from db.views import ArtifactFile, QualitySummary
from tests.media import make_video

SETTINGS = {"landmarks": "mtcnn", "formats": ["npz"], "batch_size": 4}


@pytest.fixture
def sqlite_reg(tmp_path) -> Registry:
    r = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data")
    yield r
    r.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def reg(request, tmp_path) -> Registry:
    """The registry on a SQLite file, and on a fresh database of the session's throwaway PostgreSQL
    server (tests/pg.py; skipped with the reason where PostgreSQL cannot be started)."""
    url = f"sqlite:///{tmp_path / 'studio.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    r = Registry(url=url, data_dir=tmp_path / "data")
    yield r
    r.close()


def test_postgresql_registry_is_postgresql(pg_url, tmp_path):
    assert Registry(url=pg_url, data_dir=tmp_path).engine.dialect.name == "postgresql"


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / "inputs" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _set_heartbeat(reg: Registry, job_id: int, seconds_ago: float) -> None:
    with reg.write() as s:
        job = s.get(Job, job_id)
        job.heartbeat_at = utcnow() - timedelta(seconds=seconds_ago)
        s.add(job)


# ------------------------------------------------------------------------------------ engine


def test_sqlite_is_wal_with_busy_timeout_and_versioned(sqlite_reg, tmp_path):
    reg = sqlite_reg
    with reg.session() as s:
        conn = s.connection()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    assert reg.schema_version() == SCHEMA_VERSION
    assert Registry(url=reg.url, data_dir=reg.data_dir).schema_version() == SCHEMA_VERSION  # reopen
    for d in (reg.uploads_dir, reg.results_dir, reg.work_dir):
        assert d.is_dir() and reg.data_dir in d.parents


def test_url_and_data_dir_come_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "envdata"))
    monkeypatch.delenv("STUDIO_DB_URL", raising=False)
    r = Registry()
    assert r.data_dir == (tmp_path / "envdata").resolve()
    assert r.url == f"sqlite:///{r.data_dir / 'studio.db'}"
    monkeypatch.setenv("STUDIO_DB_URL", f"sqlite:///{tmp_path / 'other.db'}")
    assert Registry().url.endswith("other.db") and (tmp_path / "other.db").is_file()


def test_write_takes_the_lock_up_front(sqlite_reg, tmp_path):
    """While one write transaction is open, a plain sqlite3 writer cannot start one."""
    reg = sqlite_reg
    other = sqlite3.connect(tmp_path / "studio.db", timeout=0.2, isolation_level=None)
    with reg.write() as s:
        s.exec(select(Meta)).all()  # only a read so far: a deferred BEGIN would hold no lock yet
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()


def test_concurrent_read_then_write_never_reports_locked(reg, tmp_path):
    """8 threads each read a job's counter and write it back 25 times: every increment lands."""
    job = service.submit_file(reg, _file(tmp_path, "a.mp4", b"x"), SETTINGS)
    errors: list[BaseException] = []

    def bump() -> None:
        try:
            for _ in range(25):
                with reg.write() as s:
                    row = s.get(Job, job.id)
                    row.frames_done = row.frames_done + 1
                    s.add(row)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert service.get_job(reg, job.id).frames_done == 200


@pytest.mark.parametrize("version", ["0", str(SCHEMA_VERSION + 1), "banana"])
def test_other_schema_versions_are_refused_clearly(reg, version):
    with reg.write() as s:
        row = s.get(Meta, "schema_version")
        row.value = version
        s.add(row)
    with pytest.raises(SchemaError, match=r"schema version|newer than|migration"):
        Registry(url=reg.url, data_dir=reg.data_dir)


def test_foreign_database_without_version_is_refused(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT)")
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="no schema version"):
        Registry(url=f"sqlite:///{path}", data_dir=tmp_path / "d")


def test_a_registered_migration_upgrades_an_old_database(reg, monkeypatch):
    """An old version with a migration path is upgraded (and the migration ran), not misread."""
    import db.registry as registry_module

    with reg.write() as s:
        row = s.get(Meta, "schema_version")
        row.value = str(SCHEMA_VERSION - 1)
        s.add(row)
    ran = []
    monkeypatch.setitem(registry_module.MIGRATIONS, SCHEMA_VERSION - 1, lambda conn: ran.append(conn))
    again = Registry(url=reg.url, data_dir=reg.data_dir)
    assert ran and again.schema_version() == SCHEMA_VERSION


def test_a_version_1_database_gains_cancel_requested_at_and_keeps_its_jobs(reg, tmp_path):
    """The real v1 → v2 migration on a database as version 1 left it (no ``cancel_requested_at``)."""
    video = make_video(tmp_path / "clip.mp4", 2)
    job = service.submit_file(reg, video, SETTINGS)
    with reg.write() as s:
        s.connection().exec_driver_sql("ALTER TABLE jobs DROP COLUMN cancel_requested_at")
        row = s.get(Meta, "schema_version")
        row.value = "1"
        s.add(row)
    reg.close()
    again = Registry(url=reg.url, data_dir=reg.data_dir)
    try:
        assert again.schema_version() == SCHEMA_VERSION == 2
        old = service.get_job(again, job.id)
        assert old.status == JobStatus.QUEUED and old.cancel_requested_at is None
        cancelled = service.cancel_job(again, job.id, actor=LOCAL)
        assert cancelled.cancel_requested_at is not None and cancelled.cancel_requested_at <= cancelled.finished_at
    finally:
        again.close()


# ------------------------------------------------------------------------------------ storage


def test_same_file_submitted_twice_is_stored_once(reg, tmp_path):
    src = _file(tmp_path, "talk.MP4", os.urandom(3000))
    a = service.submit_file(reg, src, SETTINGS)
    b = service.submit_file(reg, src, SETTINGS, original_name="again.mp4")
    with open(src, "rb") as f:
        c = service.submit_upload(reg, f, "upload.mp4", SETTINGS)
    stored = [p for p in reg.uploads_dir.rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].read_bytes() == src.read_bytes()
    assert stored[0].suffix == ".mp4" and stored[0].name.startswith(a.video.sha256)
    assert a.video_id == b.video_id == c.video_id and len({a.id, b.id, c.id}) == 3
    assert (a.name, b.name, c.name) == ("talk.MP4", "again.mp4", "upload.mp4")
    assert a.input_path == stored[0] and a.video.size == 3000
    assert not list(reg.tmp_dir.iterdir()), "temporary upload files left behind"


def test_upload_streams_and_different_bytes_are_stored_separately(reg):
    a = service.submit_upload(reg, io.BytesIO(b"a" * 5000), "x.mp4", SETTINGS)
    b = service.submit_upload(reg, io.BytesIO(b"b" * 5000), "x.mp4", SETTINGS)
    assert a.video.sha256 != b.video.sha256 and a.video_id != b.video_id
    assert len([p for p in reg.uploads_dir.rglob("*") if p.is_file()]) == 2


def test_probe_fields_of_a_real_video_and_reason_for_a_bad_one(reg, tmp_path):
    good = service.submit_file(reg, make_video(tmp_path / "good.mp4", 6, size=(64, 48)), SETTINGS)
    assert (good.video.width, good.video.height, good.video.frame_count) == (64, 48, 6)
    assert good.video.fps == pytest.approx(25.0) and good.video.probe_error is None
    bad = service.submit_file(reg, _file(tmp_path, "bad.mp4", b"not a video"), SETTINGS)
    assert bad.status == JobStatus.QUEUED and bad.video.width is None and bad.video.probe_error


def test_import_folder_registers_in_place(reg, tmp_path):
    folder = tmp_path / "server"
    (folder / "sub").mkdir(parents=True)
    make_video(folder / "a.mp4", 4)
    make_video(folder / "sub" / "b.mp4", 4, color=(10, 20, 30))
    (folder / "notes.txt").write_text("hello")
    jobs = service.import_folder(reg, folder, SETTINGS, actor=LOCAL)
    assert sorted(j.name for j in jobs) == ["a.mp4", "sub/b.mp4"]
    assert all(j.video.in_place and folder in j.input_path.parents for j in jobs)
    assert not [p for p in reg.uploads_dir.rglob("*") if p.is_file()]


def test_submit_validates_settings_and_path(reg, tmp_path):
    src = _file(tmp_path, "a.mp4", b"x")
    assert service.submit_file(reg, src).settings["landmarks"] == "fan"  # defaults when no settings given
    with pytest.raises(ValueError, match="unknown engine settings"):
        service.submit_file(reg, src, {"batchsize": 4})
    with pytest.raises(ValueError, match="batch_size"):
        service.submit_file(reg, src, {**SETTINGS, "batch_size": 0})
    with pytest.raises(Exception, match="no such file"):
        service.submit_file(reg, tmp_path / "missing.mp4", SETTINGS)
    job = service.submit_file(reg, src, {**SETTINGS, "checkpoint": "rel/epoch_20.pth"})
    assert Path(job.settings["checkpoint"]).is_absolute()


# ------------------------------------------------------------------------------------ status machine


def test_claim_is_oldest_first_and_exclusive_across_threads(reg, tmp_path):
    ids = [service.submit_file(reg, _file(tmp_path, f"{i}.mp4", bytes([i])), SETTINGS).id for i in range(24)]
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(4)}

    def drain(wid: str) -> None:
        while (job := service.claim_next(reg, wid, device="cpu")) is not None:
            claimed[wid].append(job.id)

    threads = [threading.Thread(target=drain, args=(w,)) for w in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = sorted(i for got in claimed.values() for i in got)
    assert everything == ids, "a job was claimed twice or never"
    for got in claimed.values():
        assert got == sorted(got), "claims must go oldest first"
    views = service.list_jobs(reg, limit=100)
    assert all(v.status == JobStatus.RUNNING and v.attempts == 1 for v in views)


def test_a_claim_ahead_leaves_the_last_jobs_to_workers_that_have_none(reg, tmp_path):
    ids = [service.submit_file(reg, _file(tmp_path, f"{i}.mp4", bytes([i])), SETTINGS).id for i in range(4)]
    for wid, device in (("w1", "cpu"), ("w2", "cpu"), ("w3", "cpu"), ("w-gpu", "cuda:0"), ("w-gone", "cpu"),
                        ("w-silent", "cpu"), ("w-paused", "cpu")):
        service.register_worker(reg, wid, hostname="h", pid=1, device=device)
    service.stop_worker(reg, "w-gone")
    service.worker_heartbeat(reg, "w-paused", status="paused", message="disk full")
    with reg.write() as s:  # heard from 31 s ago: not counted as live
        w = s.get(WorkerRow, "w-silent")
        w.heartbeat_at = utcnow() - timedelta(seconds=31)
        s.add(w)

    assert service.claim_next(reg, "w1", device="cpu").id == ids[0]  # holds nothing: always
    # 3 queued, and 3 others could take them: w2, w3 and w-gpu (these jobs ask for no device)
    assert service.claim_next(reg, "w1", device="cpu", ahead=True) is None
    service.stop_worker(reg, "w-gpu")
    assert service.claim_next(reg, "w1", device="cpu", ahead=True).id == ids[1]  # 3 queued > w2, w3
    assert service.claim_next(reg, "w1", device="cpu", ahead=True) is None  # 2 queued, 2 others
    assert service.claim_next(reg, "w2", device="cpu").id == ids[2]
    assert service.claim_next(reg, "w2", device="cpu", ahead=True) is None  # 1 queued, 2 others
    assert service.claim_next(reg, "w3", device="cpu").id == ids[3]
    assert service.claim_next(reg, "w1", device="cpu") is None  # the queue is empty
    # a window of 60 s counts w-silent as live too: 3 others instead of 2
    more = [service.submit_file(reg, _file(tmp_path, f"m{i}.mp4", bytes([50 + i])), SETTINGS).id for i in range(4)]
    assert service.claim_next(reg, "w1", device="cpu", ahead=True, alive_within_s=60).id == more[0]  # 4 > 3
    assert service.claim_next(reg, "w1", device="cpu", ahead=True, alive_within_s=60) is None  # 3 <= 3
    assert service.claim_next(reg, "w1", device="cpu", ahead=True).id == more[1]  # 3 > 2


def test_transition_table_is_enforced(reg, tmp_path):
    job = service.submit_file(reg, _file(tmp_path, "a.mp4", b"a"), SETTINGS)
    with reg.write() as s, pytest.raises(JobStateError, match="queued: it cannot become succeeded"):
        service.transition(s, s.get(Job, job.id), JobStatus.SUCCEEDED)
    with pytest.raises(JobStateError, match="only failed or cancelled"):
        service.retry_job(reg, job.id, actor=LOCAL)
    with pytest.raises(JobNotFound, match="no job with id 999"):
        service.get_job(reg, 999)


def test_cancel_queued_running_and_finished(reg, tmp_path):
    a = service.submit_file(reg, _file(tmp_path, "a.mp4", b"a"), SETTINGS)
    b = service.submit_file(reg, _file(tmp_path, "b.mp4", b"b"), SETTINGS)
    reg.state_dir(a.id).mkdir(parents=True)
    (reg.state_dir(a.id) / "state.json").write_text("{}")
    cancelled = service.cancel_job(reg, a.id, actor=LOCAL)
    assert cancelled.status == JobStatus.CANCELLED and cancelled.finished_at is not None
    assert not reg.state_dir(a.id).exists()

    running = service.claim_next(reg, "w1")
    assert running.id == b.id
    asked = service.cancel_job(reg, b.id, actor=LOCAL)
    assert asked.status == JobStatus.RUNNING and asked.cancel_requested and asked.cancel_requested_at is not None
    again_asked = service.cancel_job(reg, b.id, actor=LOCAL)
    assert again_asked.cancel_requested_at == asked.cancel_requested_at  # the first request counts
    assert service.report_progress(reg, b.id, "w1", frames_done=3).cancel_requested
    reg.result_dir(b.id).mkdir(parents=True)
    (reg.result_dir(b.id) / "partial.npz.tmp").write_bytes(b"x")
    done = service.finish_cancelled(reg, b.id, "w1")
    assert done.status == JobStatus.CANCELLED and not reg.result_dir(b.id).exists()
    assert asked.cancel_requested_at <= done.finished_at  # the recorded cancel latency (bench/bench_cancel.py)
    with pytest.raises(JobStateError, match="already cancelled"):
        service.cancel_job(reg, b.id, actor=LOCAL)

    again = service.retry_job(reg, b.id, actor=LOCAL)
    assert again.status == JobStatus.QUEUED and again.attempts == 0 and not again.cancel_requested
    assert again.cancel_requested_at is None
    assert again.error is None and again.finished_at is None


def test_janitor_requeues_stale_jobs_then_fails_after_max_attempts(reg, tmp_path):
    job = service.submit_file(reg, _file(tmp_path, "a.mp4", b"a"), SETTINGS)
    fresh = service.submit_file(reg, _file(tmp_path, "b.mp4", b"b"), SETTINGS)
    for attempt in (1, 2, 3):
        claimed = service.claim_next(reg, f"dead{attempt}")
        assert claimed.id == job.id and claimed.attempts == attempt
        live = service.claim_next(reg, "alive") if attempt == 1 else None
        assert live is None or live.id == fresh.id
        _set_heartbeat(reg, job.id, 120)
        actions = service.requeue_stale(reg, stale_after_s=60)
        assert [a.job_id for a in actions] == [job.id], "a job with a fresh heartbeat was touched"
        view = service.get_job(reg, job.id)
        if attempt < 3:
            assert view.status == JobStatus.QUEUED and view.worker_id is None
            assert f"dead{attempt} stopped sending heartbeats" in view.error
    assert view.status == JobStatus.FAILED and view.error_code == "abandoned"
    assert view.error.startswith("gave up after 3 attempts") and "dead3" in view.error
    assert service.get_job(reg, fresh.id).status == JobStatus.RUNNING


def test_stale_job_with_cancel_request_becomes_cancelled(reg, tmp_path):
    job = service.submit_file(reg, _file(tmp_path, "a.mp4", b"a"), SETTINGS)
    service.claim_next(reg, "w")
    service.cancel_job(reg, job.id, actor=LOCAL)
    reg.state_dir(job.id).mkdir(parents=True)
    _set_heartbeat(reg, job.id, 999)
    service.requeue_stale(reg, stale_after_s=10)
    assert service.get_job(reg, job.id).status == JobStatus.CANCELLED
    assert not reg.state_dir(job.id).exists()


def test_sigterm_requeue_costs_no_attempt_and_lost_jobs_are_not_written(reg, tmp_path):
    job = service.submit_file(reg, _file(tmp_path, "a.mp4", b"a"), SETTINGS)
    service.claim_next(reg, "w1")
    back = service.requeue_job(reg, job.id, "w1", reason="shutdown")
    assert back.status == JobStatus.QUEUED and back.attempts == 0
    service.claim_next(reg, "w2")
    assert service.report_progress(reg, job.id, "w1", frames_done=5).owned is False
    assert service.fail_job(reg, job.id, "w1", error="x") is None
    with pytest.raises(service.LostJob):
        service.complete_job(reg, job.id, "w1", artifacts=[], quality=QualitySummary(1, 1, {}, 0))
    assert service.get_job(reg, job.id).worker_id == "w2"


# ------------------------------------------------------------------------------------ results


def _finish(reg: Registry, job_id: int, worker: str = "w") -> list[ArtifactFile]:
    from db.storage import sha256_file

    out = reg.result_dir(job_id)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for fmt, suffix, data in (("npz", ".npz", b"npz-bytes"), ("pirender", ".mat", b"mat-bytes" * 10)):
        p = out / f"clip{suffix}"
        p.write_bytes(data)
        files.append(ArtifactFile(fmt, p, len(data), sha256_file(p)))
    service.complete_job(
        reg, job_id, worker, artifacts=files,
        quality=QualitySummary(frames=10, valid_frames=7, reasons={"no_face": 3}, longest_invalid_run=2),
        engine_version="0.1.0", checkpoint_sha256="ab" * 32, report={"media_fps": 25.0},
    )
    return files


def test_success_registers_artifacts_quality_and_bundle(reg, tmp_path):
    job = service.submit_file(reg, _file(tmp_path, "clip.mp4", b"video"), SETTINGS)
    service.claim_next(reg, "w")
    files = _finish(reg, job.id)
    view = service.get_job(reg, job.id)
    assert view.status == JobStatus.SUCCEEDED and view.progress == 1.0 and view.frames_done == 10
    arts = service.list_artifacts(reg, job.id)
    expected = sorted((f.format, f.bytes, f.sha256) for f in files)
    assert [(a.format, a.bytes, a.sha256) for a in arts] == expected
    q = service.get_quality(reg, job.id)
    assert (q.frames, q.valid_frames, q.valid_ratio, q.reasons, q.longest_invalid_run) == (
        10, 7, 0.7, {"no_face": 3}, 2)

    bundle = service.build_bundle(reg, job.id)
    assert bundle == reg.result_dir(job.id) / f"bundle-{job.id}.zip"
    with zipfile.ZipFile(bundle) as zf:
        assert sorted(zf.namelist()) == ["README.txt", "clip.mat", "clip.npz", "manifest.json"]
        manifest = json.loads(zf.read("manifest.json"))
        readme = zf.read("README.txt").decode()
    assert manifest["input"]["sha256"] == view.video.sha256 and manifest["input"]["name"] == "clip.mp4"
    assert manifest["frames"] == 10 and manifest["fps"] == 25.0 and manifest["settings"] == view.settings
    assert manifest["checkpoint_sha256"] == "ab" * 32 and manifest["engine_version"] == "0.1.0"
    assert {f["name"]: (f["bytes"], f["sha256"]) for f in manifest["files"]} == {
        f.path.name: (f.bytes, f.sha256) for f in files}
    for needle in ("80:144", "224:227", "227:254", "254:257", "radians", "y up"):
        assert needle in readme
    mtime = bundle.stat().st_mtime_ns
    assert service.build_bundle(reg, job.id).stat().st_mtime_ns == mtime  # cached


def test_bundle_only_for_succeeded_jobs(reg, tmp_path):
    job = service.submit_file(reg, _file(tmp_path, "clip.mp4", b"video"), SETTINGS)
    with pytest.raises(JobStateError, match="only succeeded jobs"):
        service.build_bundle(reg, job.id)


def test_delete_removes_rows_files_and_orphan_upload(reg, tmp_path):
    src = _file(tmp_path, "clip.mp4", b"video")
    a = service.submit_file(reg, src, SETTINGS)
    b = service.submit_file(reg, src, SETTINGS)
    service.claim_next(reg, "w")
    with pytest.raises(JobStateError, match="running"):
        service.delete_job(reg, a.id, actor=LOCAL)
    _finish(reg, a.id)
    service.delete_job(reg, a.id, actor=LOCAL)
    assert not reg.result_dir(a.id).exists() and a.input_path.exists(), "upload still used by job b"
    with pytest.raises(JobNotFound):
        service.get_job(reg, a.id)
    service.delete_job(reg, b.id, actor=LOCAL)
    assert not a.input_path.exists()
    assert service.count_jobs(reg) == 0


# ------------------------------------------------------------------------------------ queries


def test_list_jobs_paginates_filters_and_sorts(reg, tmp_path):
    for i in range(120):
        service.submit_file(reg, _file(tmp_path, f"clip_{i:03d}.mp4", f"{i}".encode()), SETTINGS)
    for _ in range(5):
        service.claim_next(reg, "w")
    page = service.list_jobs(reg, limit=50, offset=0)
    page2 = service.list_jobs(reg, limit=50, offset=50)
    assert len(page) == 50 and page[0].id == 120 and page2[0].id == 70
    assert not {j.id for j in page} & {j.id for j in page2}
    assert service.count_jobs(reg) == 120
    assert service.count_jobs(reg, statuses=[JobStatus.RUNNING]) == 5
    assert [j.id for j in service.list_jobs(reg, statuses=["running"], descending=False)] == [1, 2, 3, 4, 5]
    by_name = service.list_jobs(reg, search="CLIP_01", order_by="name", descending=False)
    assert [j.name for j in by_name][:3] == ["clip_010.mp4", "clip_011.mp4", "clip_012.mp4"]
    assert service.count_jobs(reg, search="clip_01") == 10
    assert [j.id for j in service.list_jobs(reg, search="77")] == [78, 77]  # clip_077.mp4 is job 78
    assert service.count_jobs(reg, search="50%") == 0  # LIKE wildcards are literal
    counts = service.status_counts(reg)
    assert (counts[JobStatus.QUEUED], counts[JobStatus.RUNNING], counts[JobStatus.FAILED]) == (115, 5, 0)
    with pytest.raises(ValueError, match="order_by"):
        service.list_jobs(reg, order_by="name; drop table jobs")


def test_times_are_aware_utc_and_eta_comes_from_progress(reg, tmp_path):
    job = service.submit_file(reg, _file(tmp_path, "a.mp4", b"a"), SETTINGS)
    assert job.created_at.tzinfo == timezone.utc and abs((utcnow() - job.created_at).total_seconds()) < 60
    service.claim_next(reg, "w")
    service.report_progress(reg, job.id, "w", frames_done=50, frames_total=250, fps=20.0, stage="extract")
    view = service.get_job(reg, job.id)
    assert view.heartbeat_at.tzinfo == timezone.utc and view.started_at <= view.heartbeat_at
    assert view.eta_s == pytest.approx(10.0) and view.progress == pytest.approx(0.2)


def test_workers_are_listed_with_liveness(reg):
    service.register_worker(reg, "host-1-cpu", hostname="host", pid=1, device="cpu", device_name="CPU")
    service.register_worker(reg, "host-2-cuda0", hostname="host", pid=2, device="cuda:0")
    service.stop_worker(reg, "host-2-cuda0")
    workers = {w.worker_id: w for w in service.list_workers(reg)}
    assert workers["host-1-cpu"].alive and workers["host-1-cpu"].status == "idle"
    assert not workers["host-2-cuda0"].alive and workers["host-2-cuda0"].status == "stopped"
    assert workers["host-1-cpu"].heartbeat_at.tzinfo == timezone.utc


def test_claim_respects_the_requested_device(tmp_path, short_clip):
    """A job asking for the CPU is not taken by a GPU worker, and the reverse; 'auto' goes anywhere."""
    from db import Registry, service

    reg = Registry(data_dir=tmp_path / "data")
    cpu_job = service.submit_file(reg, short_clip, {"device": "cpu", "landmarks": "mtcnn"}, copy=False)
    gpu_job = service.submit_file(reg, short_clip, {"device": "cuda:1", "landmarks": "mtcnn"}, copy=False)
    any_job = service.submit_file(reg, short_clip, {"landmarks": "mtcnn"}, copy=False)
    assert service.claim_next(reg, "w-gpu0", device="cuda:0").id == any_job.id  # skips the cpu and cuda:1 jobs
    assert service.claim_next(reg, "w-gpu0", device="cuda:0") is None
    assert service.claim_next(reg, "w-gpu1", device="cuda:1").id == gpu_job.id
    assert service.claim_next(reg, "w-cpu", device="cpu").id == cpu_job.id


def test_peek_next_names_the_job_a_claim_would_take_and_takes_nothing(tmp_path, short_clip):
    from db import JobStatus, Registry, service

    reg = Registry(data_dir=tmp_path / "data")
    assert service.peek_next(reg, device="cpu") is None
    gpu_job = service.submit_file(reg, short_clip, {"device": "cuda:1", "landmarks": "mtcnn"}, copy=False)
    cpu_job = service.submit_file(reg, short_clip, {"device": "cpu", "landmarks": "fan"}, copy=False)
    for _ in range(2):  # looking changes nothing
        seen = service.peek_next(reg, device="cpu")
        assert (seen.id, seen.settings["landmarks"]) == (cpu_job.id, "fan")
    assert service.peek_next(reg, device="cuda:1").id == gpu_job.id
    assert {j.status for j in service.list_jobs(reg)} == {JobStatus.QUEUED}
    service.register_worker(reg, "w-cpu", hostname="h", pid=1, device="cpu")
    service.worker_heartbeat(reg, "w-cpu", status="idle", message="loading models")  # what it says meanwhile
    assert service.claim_next(reg, "w-cpu", device="cpu").id == cpu_job.id
    assert service.peek_next(reg, device="cpu") is None
    [w] = service.list_workers(reg)
    assert (w.status, w.message) == ("busy", None)  # the claim replaces the message
