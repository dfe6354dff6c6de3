"""Fault injection: every fault ends in a worded, final and truthful state, nothing half-written.

What is injected, and how:

* **a database lock held past the busy timeout**: a second SQLite connection holding
  ``BEGIN EXCLUSIVE`` (busy timeout shortened to fractions of a second);
* **a full folder**: a size-limited ``tmpfs`` mounted over it when ``mount -t tmpfs`` works
  (root); otherwise (or with ``STUDIO_TEST_NO_MOUNT=1``), for the in-process tests,
  ``ENOSPC`` injected by wrapping ``open`` for paths in that folder (the tests with real
  worker processes then skip);
* **a read-only folder**: a ``tmpfs`` remounted read-only (root), or mode 0555 (not root);
* **results/ on another file system**: a symlink to a folder under ``/dev/shm``;
* **≥ 30 malformed inputs**, generated here, through ``submit`` and a real worker process;
* **≥ 20 ``kill -9``** of real ``python -m engine worker`` processes at random moments
  (the seed is printed; ``STUDIO_FAULT_SEED`` replays a run), with restarts.

Afterwards every job must be final and truthful, every registered file must match its
SHA-256, no partial file may be left anywhere, and the worker must still be alive. The
figures of a run are written to ``test-output/faults-report.json`` (or
``$STUDIO_TEST_OUTPUT``), from which ``docs/RELIABILITY.md`` quotes them.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import av
import numpy as np
import pytest

from db import LOCAL, JobStatus, Registry, service
from db.storage import sha256_file
from engine.errors import DiskFullError, InputError, InputTooLarge, InputTooSmall, OutputError
from engine.limits import InputLimits
from tests.conftest import REPO
from tests.test_dashboard import empty_studio  # noqa: F401 (fixture: the registry the dashboard pages use)
from tests.test_worker import FAST, WAIT_S, ScriptedEngine, WorkerProcess
from worker.loop import Worker, WorkerOptions, wait_for

slow = pytest.mark.slow

#: Names of partial files: writers' ``.<name>.part-<pid>``, storage's ``.tmp-<uuid>.part…``,
#: the overlay's ``.partial``, resume chunks ``chunk-*.tmp.npz``, ``state.json.tmp``, write probes.
PARTIAL = re.compile(r"\.part\b|\.partial|\.tmp\b|^\.tmp-|\.probe$")

OUTPUT = Path(os.environ.get("STUDIO_TEST_OUTPUT", REPO / "test-output"))


# ============================================================================ helpers


@pytest.fixture(scope="session")
def fault_report():
    """Figures of this run (merged into ``test-output/faults-report.json`` at the end)."""
    report: dict = {}
    yield report
    if report:
        path = OUTPUT / "faults-report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**old, **report}, indent=2, sort_keys=True) + "\n")


def partial_files(*roots: Path) -> list[str]:
    """Every file under ``roots`` whose name marks it as half-written."""
    found = []
    for root in roots:
        if root.exists():
            found += [str(p) for p in root.rglob("*") if PARTIAL.search(p.name)]
    return found


def hash_failures(reg: Registry) -> list[str]:
    """Registered artifacts whose file is missing or differs from its size/SHA-256."""
    bad = []
    for job in service.list_jobs(reg, limit=10_000):
        for a in service.list_artifacts(reg, job.id):
            if not a.path.is_file() or a.path.stat().st_size != a.bytes or sha256_file(a.path) != a.sha256:
                bad.append(f"job {job.id}: {a.path.name}")
    return bad


def bundle_failures(reg: Registry) -> tuple[int, list[str]]:
    """Build the bundle of every succeeded job and check each file in it against its registered
    SHA-256; returns (bundles built, files that differ)."""
    import hashlib

    built, bad = 0, []
    for job in service.list_jobs(reg, statuses=["succeeded"], limit=10_000):
        path = service.build_bundle(reg, job.id)
        built += 1
        with zipfile.ZipFile(path) as zf:
            for a in service.list_artifacts(reg, job.id):
                if hashlib.sha256(zf.read(a.path.name)).hexdigest() != a.sha256:
                    bad.append(f"job {job.id}: {a.path.name}")
    return built, bad


def cli(data: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m engine ARGS --data-dir DATA``."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args, "--data-dir", str(data)], cwd=REPO, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def one_worded_line(text: str) -> bool:
    """True for one short line without a traceback."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in text and len(lines[0]) < 400


class LockHolder:
    """Another connection holding the SQLite write lock (``BEGIN EXCLUSIVE``) until :meth:`release`."""

    def __init__(self, db_path: Path) -> None:
        self.con = sqlite3.connect(db_path, isolation_level=None, timeout=30, check_same_thread=False)
        self.con.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.con is not None:
            self.con.execute("COMMIT")
            self.con.close()
            self.con = None


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None or os.environ.get("STUDIO_TEST_NO_MOUNT"):
        return False
    probe = Path(f"/tmp/studio-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok
    finally:
        with_suppress_rmdir(probe)


def with_suppress_rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


CAN_MOUNT = _can_mount()


class Mounts:
    """Size-limited and read-only tmpfs mounts (root only), unmounted at teardown."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True)
        self.points.append(path)
        return path

    @staticmethod
    def read_only(path: Path, ro: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(path)], check=True,
                       capture_output=True)

    def cleanup(self) -> None:
        for p in reversed(self.points):
            if subprocess.run(["umount", str(p)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(p)], capture_output=True)


@pytest.fixture
def mounts():
    m = Mounts()
    yield m
    m.cleanup()


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` up to the last byte; returns the filler file."""
    filler = folder / "filler.bin"
    for name, block in (("filler.bin", 65536), ("filler2.bin", 512)):  # then the last partial block
        with contextlib.suppress(OSError), open(folder / name, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * block)
    return filler


def unfill(folder: Path) -> None:
    for name in ("filler.bin", "filler2.bin"):
        (folder / name).unlink(missing_ok=True)


class FullFolder:
    """Makes a folder full: a tmpfs filled to the brim (root), else ENOSPC injected into ``open``."""

    def __init__(self, folder: Path, mounts: Mounts, monkeypatch) -> None:
        self.folder, self.mounts, self.monkeypatch = folder, mounts, monkeypatch
        self.how = "tmpfs" if CAN_MOUNT else "injected ENOSPC"
        self._full = False
        if CAN_MOUNT:
            if folder.exists():
                shutil.rmtree(folder)
            mounts.tmpfs(folder, "1m")
        else:
            real_open = builtins.open

            def guarded_open(file, mode="r", *args, **kwargs):
                if self._full and any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)):
                    p = Path(os.path.abspath(file))
                    if p == self.folder or self.folder in p.parents:
                        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(file))
                return real_open(file, mode, *args, **kwargs)

            monkeypatch.setattr(builtins, "open", guarded_open)
            monkeypatch.setattr(io, "open", guarded_open)

    def make_full(self) -> None:
        if CAN_MOUNT:
            fill(self.folder)
        self._full = True

    def free(self) -> None:
        if CAN_MOUNT:
            unfill(self.folder)
        self._full = False


class ReadOnlyFolder:
    """Makes a folder read-only: a tmpfs remounted ro (root), or mode 0555 (not root)."""

    def __init__(self, folder: Path, mounts: Mounts) -> None:
        self.folder, self.mounts = folder, mounts
        if os.geteuid() == 0:
            if not CAN_MOUNT:
                pytest.skip("root without `mount -t tmpfs`: cannot make a folder read-only for root")
            keep = [p.name for p in folder.iterdir()] if folder.exists() else []
            backup = folder.with_name(folder.name + ".keep")
            if folder.exists():
                folder.rename(backup)
            mounts.tmpfs(folder, "8m")
            for name in keep:
                shutil.move(str(backup / name), str(folder / name))
            with_suppress_rmdir(backup)
            self.how = "tmpfs remounted read-only"
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.how = "mode 0555"

    def set(self, ro: bool) -> None:
        if os.geteuid() == 0:
            Mounts.read_only(self.folder, ro)
        else:
            for d in [self.folder, *[p for p in self.folder.rglob("*") if p.is_dir()]]:
                d.chmod(0o555 if ro else 0o755)


# ============================================================================ in-process, scripted engine


def _spec(folder: Path, name: str, **spec) -> Path:
    p = folder / "in" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"frames": 8, **spec, "name": name}))
    return p


def _submit(reg, path, **settings):
    return service.submit_file(reg, path, {"landmarks": "mtcnn", "formats": ["npz"], "batch_size": 4, **settings})


def _options(**kw) -> WorkerOptions:
    base = {**FAST.__dict__, "pause_s": 0.1, "max_pause_s": 0.4}
    return WorkerOptions(**{**base, **kw})


@pytest.fixture
def reg(tmp_path):
    ScriptedEngine.built, ScriptedEngine.runs = [], []
    r = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data", busy_timeout_s=0.3)
    yield r
    r.close()


class LockingEngine(ScriptedEngine):
    """Finishes its job, then has another connection take the database's write lock, so the
    worker's final registration meets a lock held past the busy timeout."""

    def __init__(self, cfg, *, db_path: Path, holders: list, **components):
        super().__init__(cfg, **components)
        self.db_path, self.holders = db_path, holders

    def run(self, source, out_base, **kwargs):
        report = super().run(source, out_base, **kwargs)
        if not self.holders:
            self.holders.append(LockHolder(self.db_path))
        return report


def test_a_lock_past_the_timeout_delays_the_registration_and_loses_nothing(reg, tmp_path, monkeypatch, in_thread):
    holders: list[LockHolder] = []
    tries: list[str] = []
    real = service.complete_job

    def counted(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except Exception as e:
            tries.append(str(e).splitlines()[0])
            raise

    monkeypatch.setattr(service, "complete_job", counted)
    job = _submit(reg, _spec(tmp_path, "clip.mp4"))
    worker = Worker(reg, _options(), worker_id="w-lock",
                    engine_factory=lambda cfg, **c: LockingEngine(cfg, db_path=tmp_path / "studio.db",
                                                                  holders=holders, **c))
    thread = in_thread(worker)
    try:
        assert wait_for(lambda: len(tries) >= 2, WAIT_S), "the registration was not retried"
        view = service.get_job(reg, job.id)  # reading works while the lock is held
        assert view.status == JobStatus.RUNNING and (reg.result_dir(job.id) / "clip.npz").is_file()
    finally:
        holders[0].release()
    assert wait_for(lambda: service.get_job(reg, job.id).status == JobStatus.SUCCEEDED, WAIT_S)
    worker.request_stop()
    thread.join(WAIT_S)
    done = service.get_job(reg, job.id)
    assert done.attempts == 1 and done.error is None
    assert all("database is locked" in t for t in tries), tries
    assert hash_failures(reg) == [] and partial_files(reg.data_dir) == []


def test_a_lock_longer_than_the_retries_keeps_the_results_and_the_job_ends_truthfully(reg, tmp_path, in_thread):
    from db.faults import RetryPolicy

    holders: list[LockHolder] = []
    job = _submit(reg, _spec(tmp_path, "clip.mp4"))
    worker = Worker(reg, _options(register_retry=RetryPolicy(0.05, 0.1, 0.5), stale_after_s=1.0), worker_id="w-lock",
                    engine_factory=lambda cfg, **c: LockingEngine(cfg, db_path=tmp_path / "studio.db",
                                                                  holders=holders, **c))
    thread = in_thread(worker)
    try:
        assert wait_for(lambda: worker.jobs_seen == 1, WAIT_S), "the registration never gave up"
        view = service.get_job(reg, job.id)
        assert view.status == JobStatus.RUNNING, "a finished job was failed because of a lock"
        assert (reg.result_dir(job.id) / "clip.npz").is_file(), "finished results were deleted because of a lock"
    finally:
        holders[0].release()
    # Once the lock is gone the job is requeued (its heartbeat is stale) and runs again.
    assert wait_for(lambda: service.get_job(reg, job.id).status == JobStatus.SUCCEEDED, 60)
    worker.request_stop()
    thread.join(WAIT_S)
    assert service.get_job(reg, job.id).attempts == 2
    assert hash_failures(reg) == [] and partial_files(reg.data_dir) == []


def test_read_commands_never_wait_for_the_lock_and_writers_say_why_in_one_line(tmp_path):
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    job = _submit(reg, _spec(tmp_path, "clip.mp4"))
    holder = LockHolder(data / "studio.db")
    env = {"STUDIO_DB_BUSY_TIMEOUT_S": "0.5"}
    try:
        Registry(data_dir=data, busy_timeout_s=0.5)  # opening reads only
        listed = cli(data, "jobs", env=env)
        assert listed.returncode == 0, listed.stderr
        assert f"{job.id}  clip.mp4" in listed.stdout.replace("   ", "  ")
        sub = cli(data, "submit", str(_spec(tmp_path, "other.mp4")), "--landmarks", "mtcnn", env=env)
        assert sub.returncode == 1 and one_worded_line(sub.stderr), sub.stderr
        assert "the job database is busy" in sub.stderr and "try again" in sub.stderr
        cancel = cli(data, "cancel", str(job.id), env=env)
        assert cancel.returncode == 1 and one_worded_line(cancel.stderr), cancel.stderr
        start = cli(data, "worker", "--device", "cpu", "--burst", env=env)
        assert start.returncode == 1 and "error: the worker cannot run: the job database is busy" in start.stderr
        assert "Traceback" not in start.stderr
    finally:
        holder.release()
    assert [j.name for j in service.list_jobs(reg)] == ["clip.mp4"]


def test_a_version_1_registry_is_migrated_and_keeps_its_rows(tmp_path):
    """Schema v2 adds ``workers.message``: a registry written before it opens, migrated once."""
    from db import SCHEMA_VERSION

    reg = Registry(data_dir=tmp_path / "data")
    job = _submit(reg, _spec(tmp_path, "clip.mp4"))
    service.register_worker(reg, "w-old", hostname="h", pid=1, device="cpu")
    reg.close()
    con = sqlite3.connect(tmp_path / "data" / "studio.db")
    con.execute("ALTER TABLE workers DROP COLUMN message")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    again = Registry(data_dir=tmp_path / "data")
    assert again.schema_version() == SCHEMA_VERSION == 2
    assert service.get_job(again, job.id).name == "clip.mp4"
    assert [(w.worker_id, w.message) for w in service.list_workers(again)] == [("w-old", None)]


def test_a_full_disk_pauses_the_worker_requeues_without_penalty_and_leaves_no_partial_file(
        reg, tmp_path, mounts, monkeypatch, fault_report, in_thread):
    full = FullFolder(reg.results_dir, mounts, monkeypatch)
    fault_report["full_folder_mechanism"] = full.how
    first = _submit(reg, _spec(tmp_path, "a.mp4"))
    second = _submit(reg, _spec(tmp_path, "b.mp4"))
    full.make_full()
    worker = Worker(reg, _options(), worker_id="w-full", engine_factory=ScriptedEngine)
    thread = in_thread(worker)
    try:
        def paused_with_both_queued() -> bool:  # the worker pauses, then requeues: wait for both
            return [w.status for w in service.list_workers(reg)] == ["paused"] and all(
                service.get_job(reg, j.id).status == JobStatus.QUEUED for j in (first, second))

        assert wait_for(paused_with_both_queued, WAIT_S), (
            service.list_workers(reg), [service.get_job(reg, j.id) for j in (first, second)])
        [w] = service.list_workers(reg)
        assert w.alive and w.message.startswith("paused: ") and "disk is full" in w.message
        queued = service.get_job(reg, first.id)
        assert queued.status == JobStatus.QUEUED and queued.attempts == 0 and queued.error_code == "disk_full"
        assert "disk is full" in queued.error and "\n" not in queued.error
        assert service.get_job(reg, second.id).status == JobStatus.QUEUED, "the worker drained the queue"
        assert partial_files(reg.data_dir) == []
    finally:
        full.free()
    for j in (first, second):
        assert wait_for(lambda j=j: service.get_job(reg, j.id).status == JobStatus.SUCCEEDED, WAIT_S)
    worker.request_stop()
    thread.join(WAIT_S)
    assert [service.get_job(reg, j.id).attempts for j in (first, second)] == [1, 1]
    assert service.list_workers(reg)[0].message is None
    assert hash_failures(reg) == [] and partial_files(reg.data_dir) == []


def test_resume_state_on_a_full_disk_leaves_no_chunk_behind(tmp_path, mounts, monkeypatch):
    from engine.pipeline import _Accumulator, _ResumeState
    from engine.structures import FrameResults

    folder = tmp_path / "work"
    full = FullFolder(folder, mounts, monkeypatch)
    acc = _Accumulator()
    state = _ResumeState(folder / "7", "fingerprint")
    rows = 20_000 if CAN_MOUNT else 4  # large enough not to fit in the tmpfs
    acc.add(FrameResults(
        index=np.arange(rows), timestamps=np.zeros(rows), coeff=np.zeros((rows, 257), np.float32),
        trans_params=np.zeros((rows, 5), np.float32), crop_box=np.zeros((rows, 4), np.int32),
        landmarks_img_ydown=np.zeros((rows, 5, 2), np.float32), valid=np.ones(rows, bool),
        reason=np.array([""] * rows),
    ))
    full.make_full()
    with pytest.raises(DiskFullError, match=r"cannot write the resume state work/7/: the disk is full"):
        state.save(acc, {})
    full.free()
    assert partial_files(folder) == [] and not list((folder / "7").glob("chunk-*"))


def test_a_read_only_results_folder_pauses_instead_of_draining_the_queue(reg, tmp_path, mounts, fault_report,
                                                                        in_thread):
    ro = ReadOnlyFolder(reg.results_dir, mounts)
    fault_report["read_only_mechanism"] = ro.how
    done = _submit(reg, _spec(tmp_path, "done.mp4"))
    Worker(reg, _options(burst=True), worker_id="w-ro", engine_factory=ScriptedEngine).work()
    assert service.get_job(reg, done.id).status == JobStatus.SUCCEEDED
    ids = [_submit(reg, _spec(tmp_path, f"q{i}.mp4")).id for i in range(3)]
    ro.set(True)
    try:
        with pytest.raises(service.FilesNotRemoved, match="was not deleted: its files cannot be removed"):
            service.delete_job(reg, done.id, actor=LOCAL)
        assert service.get_job(reg, done.id).status == JobStatus.SUCCEEDED, "the row went, the files stayed"
        worker = Worker(reg, _options(), worker_id="w-ro2", engine_factory=ScriptedEngine)
        thread = in_thread(worker)

        def paused_with_all_queued() -> bool:  # the worker pauses, then requeues: wait for both
            return any(w.status == "paused" for w in service.list_workers(reg)) and all(
                service.get_job(reg, i).status == JobStatus.QUEUED for i in ids)

        assert wait_for(paused_with_all_queued, WAIT_S), (
            service.list_workers(reg), [service.get_job(reg, i) for i in ids])
        jobs = [service.get_job(reg, i) for i in ids]
        assert all(j.status == JobStatus.QUEUED and j.attempts == 0 for j in jobs), jobs
        assert any(j.error_code == "read_only" and "read-only" in j.error for j in jobs)
    finally:
        ro.set(False)
    assert wait_for(lambda: all(service.get_job(reg, i).status == JobStatus.SUCCEEDED for i in ids), WAIT_S)
    worker.request_stop()
    thread.join(WAIT_S)
    service.delete_job(reg, done.id, actor=LOCAL)
    assert not reg.result_dir(done.id).exists()
    assert hash_failures(reg) == [] and partial_files(reg.data_dir) == []


def test_a_job_requeued_for_a_read_only_disk_is_not_claimed_again_by_a_claim_under_way(
    reg, tmp_path, mounts, monkeypatch, in_thread
):
    """The claim loop keeps claiming while a job runs (claim-ahead). A claim that had passed
    the fault check when the job failed must not take the requeued job back, or the job's
    ``read_only`` reason would be overwritten by the pause's "requeued before it started".

    The claim after the job's waits until the job has failed for the read-only folder. The worker
    requeues it only once that claim has ended (the claim lock), so the claim's wait for the
    requeue runs out (2 s) and it finds nothing. Without the lock the job would be requeued
    meanwhile and claimed back: a busy machine can only hide that, never fail a correct worker."""
    from worker import loop

    ro = ReadOnlyFolder(reg.results_dir, mounts)
    job = _submit(reg, _spec(tmp_path, "clip.mp4"))
    real_claim, real_requeue, real_fault = service.claim_next, service.requeue_job, loop.environment_fault
    failing, requeued_for_fault, claimed = threading.Event(), threading.Event(), []

    def fault(*args, **kw):
        found = real_fault(*args, **kw)
        if found is not None:
            failing.set()
        return found

    def requeue(*args, **kw):
        back = real_requeue(*args, **kw)
        if kw.get("code") == "read_only":
            requeued_for_fault.set()
        return back

    def claim(*args, **kw):
        if claimed and not requeued_for_fault.is_set():  # the claim after the job's, past the fault check
            failing.wait(WAIT_S)
            requeued_for_fault.wait(2)
        got = real_claim(*args, **kw)
        if got is not None:
            claimed.append(got.id)
        return got

    monkeypatch.setattr(loop, "environment_fault", fault)
    monkeypatch.setattr(service, "claim_next", claim)
    monkeypatch.setattr(service, "requeue_job", requeue)
    ro.set(True)
    try:
        worker = Worker(reg, _options(concurrency=1, prefetch=1), worker_id="w-race", engine_factory=ScriptedEngine)
        thread = in_thread(worker)
        assert wait_for(lambda: any(w.status == "paused" for w in service.list_workers(reg)), WAIT_S)
        assert wait_for(requeued_for_fault.is_set, WAIT_S)
        assert failing.is_set()
        back = service.get_job(reg, job.id)
        assert claimed == [job.id], "the requeued job was claimed again before the pause"
        assert (back.status, back.attempts, back.error_code) == (JobStatus.QUEUED, 0, "read_only"), back
        assert "read-only" in back.error
    finally:
        ro.set(False)
    worker.request_stop()
    thread.join(WAIT_S)

@pytest.fixture
def other_fs(tmp_path):
    """A folder on another file system than ``tmp_path`` (under /dev/shm), removed afterwards."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no /dev/shm on another file system than the test folder")
    folder = shm / f"studio-results-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_results_on_another_file_system_are_written_and_bundled(tmp_path, other_fs):
    data = tmp_path / "data"
    data.mkdir()
    (data / "results").symlink_to(other_fs)
    reg = Registry(data_dir=data)
    job = _submit(reg, _spec(tmp_path, "clip.mp4"))
    Worker(reg, _options(burst=True), worker_id="w-xdev", engine_factory=ScriptedEngine).work()
    assert service.get_job(reg, job.id).status == JobStatus.SUCCEEDED
    bundle = service.build_bundle(reg, job.id)
    assert bundle.parent.resolve().is_relative_to(other_fs)
    assert bundle_failures(reg) == (1, [])
    assert partial_files(data, other_fs) == []


def test_temporary_files_of_killed_processes_are_swept_and_fresh_ones_kept(reg):
    from db import storage

    old_upload = storage.temp_path(reg.uploads_dir, "upload.mp4")
    old_bundle = storage.temp_path(reg.result_dir(3), "bundle-3.zip")
    fresh = storage.temp_path(reg.uploads_dir, "upload.mp4")
    for p in (old_upload, old_bundle, fresh):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    for p in (old_upload, old_bundle):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    worker = Worker(reg, _options(), worker_id="w-sweep", engine_factory=ScriptedEngine)
    worker.janitor()
    assert not old_upload.exists() and not old_bundle.exists() and fresh.exists()


def test_long_names_are_shortened_safely(reg, tmp_path):
    from engine.writers import output_paths, write_outputs
    from tests.dashboard_fixtures import fake_result

    name = "x" * 236 + ".mp4"  # 240 characters
    job = _submit(reg, _spec(tmp_path, name))
    Worker(reg, _options(burst=True), worker_id="w-long", engine_factory=ScriptedEngine).work()
    done = service.get_job(reg, job.id)
    assert done.status == JobStatus.SUCCEEDED and done.name == name
    assert all(len(a.path.name.encode()) <= 255 for a in service.list_artifacts(reg, job.id))
    # The engine's own writers: 236 + ".sadtalker.mat" fits, its temporary names are shortened.
    written = write_outputs(fake_result(n=3), tmp_path / "out" / ("y" * 236), ["pirender", "sadtalker", "npz", "csv"])
    assert all(p.is_file() for p in written.values()) and partial_files(tmp_path / "out") == []
    with pytest.raises(OutputError, match="over the 255-byte limit of file names"):
        output_paths(tmp_path / ("z" * 250), ["sadtalker"])


def test_same_bytes_are_stored_once_whatever_the_extension_and_judged_as_submitted(reg, tmp_path):
    from engine.errors import DecodeError
    from engine.pipeline import Engine
    from tests.media import make_video

    (tmp_path / "src").mkdir()
    clip = make_video(tmp_path / "src" / "clip.mp4", 4, size=(64, 48))
    as_png, as_txt = tmp_path / "src" / "clip.png", tmp_path / "src" / "clip.txt"
    shutil.copy(clip, as_png)
    shutil.copy(clip, as_txt)
    png_job = service.submit_file(reg, as_png, {"landmarks": "mtcnn"})  # first: stored as <sha>.png
    mp4_job = service.submit_file(reg, clip, {"landmarks": "mtcnn"})
    with pytest.raises(InputError, match=r"clip.txt: unsupported file type '.txt'"):
        service.submit_file(reg, as_txt, {"landmarks": "mtcnn"})
    with open(clip, "rb") as f:
        up = service.submit_upload(reg, f, "upload.mp4", {"landmarks": "mtcnn"})
    with open(clip, "rb") as f, pytest.raises(InputError, match="unsupported file type"):
        service.submit_upload(reg, f, "upload.txt", {"landmarks": "mtcnn"})
    stored = [p for p in reg.uploads_dir.rglob("*") if p.is_file()]
    assert len(stored) == 1, stored
    assert png_job.video_id == mp4_job.video_id == up.video_id
    # The .png job ends as `extract clip.png` does, not through the video copy.
    with pytest.raises(DecodeError) as extracted:
        Engine().run(as_png, tmp_path / "out" / "clip")
    Worker(reg, _options(max_jobs=1), worker_id="w-kind").work()  # the real engine: fails at the probe
    failed = service.get_job(reg, png_job.id)
    assert failed.status == JobStatus.FAILED and failed.error_code == "decode"
    assert failed.error.split(": ", 1)[1] == str(extracted.value).split(": ", 1)[1]
    assert service.get_job(reg, mp4_job.id).status == JobStatus.QUEUED
    assert not list(reg.state_dir(png_job.id).glob("input*")), "the job's view of the stored copy was left"


def test_limits_are_checked_at_submit_and_again_in_the_engine(reg, tmp_path, monkeypatch):
    from engine.pipeline import Engine
    from tests.media import make_video

    tiny = make_video(tmp_path / "tiny.mp4", 4, size=(16, 16))
    with pytest.raises(InputTooSmall, match=r"tiny.mp4: frames of 16×16 pixels are too small"):
        service.submit_file(reg, tiny, {"landmarks": "mtcnn"})
    big = _huge_png(tmp_path / "big.png")
    with pytest.raises(InputTooLarge, match=r"big.png: the image has 400 MP, over the limit of 35 MP"):
        service.submit_file(reg, big, {"landmarks": "mtcnn"})
    monkeypatch.setenv("STUDIO_MAX_BYTES", "1000")
    with pytest.raises(InputTooLarge, match="over the limit"):
        service.submit_upload(reg, io.BytesIO(os.urandom(5000)), "big.mp4", {"landmarks": "mtcnn"})
    assert [p for p in reg.data_dir.rglob("*") if p.is_file() and "uploads" in p.parts] == []
    with pytest.raises(InputTooSmall):  # the engine checks too, before loading any model
        Engine(limits=InputLimits()).run(tiny, tmp_path / "out" / "tiny")
    with pytest.raises(InputTooLarge, match="decompression-bomb limit of Pillow"):
        Engine(limits=InputLimits(max_pixels=0)).run(big, tmp_path / "out" / "big")
    with pytest.raises(InputTooLarge, match="min long, over the limit"):
        InputLimits(max_duration_s=0.05).check_file(make_video(tmp_path / "ok.mp4", 4, size=(64, 64)))
    with pytest.raises(ValueError, match="STUDIO_MAX_PIXELS='lots': expected a number"):
        InputLimits.from_env({"STUDIO_MAX_PIXELS": "lots"})


# ============================================================================ malformed inputs, a real worker


def _huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose header declares ``width`` × ``height`` (no pixel data to speak of)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _big_video(path: Path, size: int = 8000, frames: int = 3) -> Path:
    """``frames`` flat grey frames of ``size``² pixels (written plane by plane: cheap)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        f = av.VideoFrame(size, size, "yuv420p")
        for plane, value in zip(f.planes, (60, 128, 128), strict=True):
            plane.update(np.full(plane.buffer_size, value, np.uint8).tobytes())
        for i in range(frames):
            f.pts = i
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory, test_video) -> Path:
    """4 frames of the shared face video at 128×128."""
    from tests.media import first_frames, make_video

    frames = first_frames(test_video, 4, size=(128, 128))
    return make_video(tmp_path_factory.mktemp("face") / "face.mp4", frames)


def _real_settings(checkpoint: Path, **kw) -> dict:
    return {"landmarks": "mtcnn", "checkpoint": str(checkpoint), "formats": ["npz"], "batch_size": 2,
            "num_threads": 1, **kw}


#: How each malformed input must end: "refused" at submit (with this error class), or the set
#: of acceptable (status, error code) outcomes of its job.
def _malformed_inputs(folder: Path, face: Path) -> dict[str, tuple[Path, object]]:
    from PIL import Image

    from tests.media import (
        make_audio_only,
        make_empty_file,
        make_image,
        make_solid_video,
        make_text_file,
        make_truncated_copy,
        make_video,
    )

    folder.mkdir(parents=True, exist_ok=True)
    face_bytes = face.read_bytes()
    decode = {("failed", "decode"), ("failed", "input")}
    no_face = {("failed", "no_face")}
    ok = {("succeeded", None)}
    inputs: dict[str, tuple[Path, object]] = {}

    def add(name: str, path: Path, expect) -> None:
        inputs[name] = (path, expect)

    add("0-byte", make_empty_file(folder / "empty.mp4"), {("failed", "input")})
    add("text named .mp4", make_text_file(folder / "notes.mp4"), decode)
    long_clip = make_video(folder / "src-long.mp4", 12, size=(96, 96))
    add("truncated half", make_truncated_copy(long_clip, folder / "half.mp4", 0.5), decode)
    add("header only", make_truncated_copy(long_clip, folder / "head.mp4", 0.02), decode)
    fast = make_video(folder / "src-fast.mp4", 12, size=(96, 96), faststart=True)
    add("truncated faststart", make_truncated_copy(fast, folder / "cut.mp4", 0.6), decode)
    add("audio only", make_audio_only(folder / "audio.mp4"), decode)
    os.mkfifo(folder / "pipe.mp4")
    add("FIFO", folder / "pipe.mp4", InputError)
    add("solid colour", make_solid_video(folder / "wall.mp4", frames=4, size=(96, 96)), no_face)
    add("16-px video", make_video(folder / "tiny16.mp4", 4, size=(16, 16)), InputTooSmall)
    add("20000² PNG header", _huge_png(folder / "huge.png"), InputTooLarge)
    add("3-frame 8000² video", _big_video(folder / "big8000.mp4"), InputTooLarge)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    add("corrupt JPEG", folder / "corrupt.jpg", decode)
    png = make_image(folder / "src.png", (96, 96))
    add("truncated PNG", make_truncated_copy(png, folder / "cut.png", 0.5), decode)
    add("text named .jpg", make_text_file(folder / "notes.jpg"), decode)
    (folder / "random.mkv").write_bytes(os.urandom(4096))
    add("random bytes .mkv", folder / "random.mkv", decode)
    (folder / "zeros.avi").write_bytes(b"\0" * 4096)
    add("zeros .avi", folder / "zeros.avi", decode)
    (folder / "ftyp.mp4").write_bytes(struct.pack(">I", 20) + b"ftypisom" + b"\0\0\2\0" + b"isom")
    add("ftyp box only", folder / "ftyp.mp4", decode)
    add("one frame", make_solid_video(folder / "one.mp4", frames=1, size=(96, 96)), no_face)
    add("1×1 PNG", make_image(folder / "dot.png", (1, 1)), InputTooSmall)
    add("16×16 PNG", make_image(folder / "small.png", (16, 16)), InputTooSmall)
    Image.fromarray(np.full((96, 96), 90, np.uint8), "L").save(folder / "gray.png")
    add("grayscale PNG", folder / "gray.png", no_face)
    Image.fromarray(np.zeros((96, 96, 4), np.uint8), "RGBA").save(folder / "clear.png")
    add("transparent RGBA PNG", folder / "clear.png", no_face)
    Image.fromarray(np.full((96, 96), 30000, np.uint16)).save(folder / "deep.png")
    add("16-bit PNG", folder / "deep.png", no_face | decode)
    Image.new("CMYK", (96, 96), (10, 20, 30, 0)).save(folder / "cmyk.jpg")
    add("CMYK JPEG", folder / "cmyk.jpg", no_face)
    Image.new("P", (96, 96), 3).save(folder / "gif.png", format="GIF")
    add("GIF named .png", folder / "gif.png", no_face)
    (folder / "face-bytes.png").write_bytes(face_bytes)
    add("video bytes named .png", folder / "face-bytes.png", decode)
    (folder / "face-bytes.txt").write_bytes(face_bytes)
    add("video bytes named .txt", folder / "face-bytes.txt", InputError)
    (folder / "png-bytes.mp4").write_bytes(png.read_bytes())
    add("PNG bytes named .mp4", folder / "png-bytes.mp4", no_face | decode)
    (folder / "noext").write_bytes(face_bytes)
    add("no extension", folder / "noext", InputError)
    long_name = folder / ("l" * 236 + ".mp4")
    long_name.write_bytes(face_bytes)
    add("240-character name", long_name, ok)
    unicode = folder / "видео 🎥 clip.mp4"
    unicode.write_bytes(face_bytes)
    add("unicode name", unicode, ok)
    upper = folder / "UPPER.MP4"
    upper.write_bytes(face_bytes)
    add("upper-case .MP4", upper, ok)
    flipped = bytearray(face_bytes)
    rng = np.random.default_rng(7)
    for i in rng.integers(len(flipped) // 3, len(flipped), 40):
        flipped[i] ^= 0xFF
    (folder / "bitflip.mp4").write_bytes(bytes(flipped))
    add("bit flips in the stream", folder / "bitflip.mp4", ok | no_face | decode)
    add("34×34 video", make_solid_video(folder / "small34.mp4", frames=2, size=(34, 34)), no_face)
    add("3 s over a 2 s limit", make_solid_video(folder / "long.mp4", frames=75, size=(64, 64)), InputTooLarge)
    (folder / "dir.mp4").mkdir()
    add("folder named .mp4", folder / "dir.mp4", InputError)
    (folder / "big.mp4").write_bytes(os.urandom(6 * 2**20))
    add("6 MB over a 5 MB limit", folder / "big.mp4", InputTooLarge)
    data = bytearray(fast.read_bytes())  # index first, then the frames: zero the frames
    start = data.index(b"mdat") + 4
    data[start:] = bytes(len(data) - start)
    (folder / "zeroed.mp4").write_bytes(bytes(data))
    add("frame data zeroed", folder / "zeroed.mp4", decode | no_face)
    return inputs


#: The limits of the malformed-input run (set for the submitting test and the worker process).
SUITE_LIMITS = {"STUDIO_MAX_DURATION_S": "2", "STUDIO_MAX_BYTES": str(5 * 2**20)}


@slow
def test_malformed_inputs_end_in_worded_states_and_the_worker_keeps_serving(
        tmp_path, recon_checkpoint, face_clip, monkeypatch, fault_report):
    for k, v in SUITE_LIMITS.items():
        monkeypatch.setenv(k, v)
    inputs = _malformed_inputs(tmp_path / "bad", face_clip)
    assert len(inputs) >= 30
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    settings = _real_settings(recon_checkpoint)
    refused: dict[str, str] = {}
    jobs: dict[str, int] = {}
    engine_checked: dict[str, int] = {}
    for label, (path, expect) in inputs.items():
        try:
            jobs[label] = service.submit_file(reg, path, settings).id
        except InputError as e:
            refused[label] = e
            assert isinstance(expect, type) and isinstance(e, expect), f"{label}: refused: {e}"
            assert one_worded_line(str(e)), f"{label}: {e}"
            if isinstance(e, (InputTooLarge, InputTooSmall)):  # the engine must refuse it too
                with monkeypatch.context() as m:
                    for var in ("STUDIO_MAX_PIXELS", "STUDIO_MIN_SIDE", "STUDIO_MAX_DURATION_S",
                                "STUDIO_MAX_BYTES"):
                        m.setenv(var, "0")
                    try:
                        engine_checked[label] = service.submit_file(reg, path, settings).id
                    except InputTooLarge as again:  # over Pillow's own limit: refused whatever ours are
                        assert "decompression-bomb limit of Pillow" in str(again), again
        else:
            assert not isinstance(expect, type), f"{label}: accepted at submit, expected {expect.__name__}"
    stored = [p for p in reg.uploads_dir.rglob("*") if p.is_file()]
    assert not partial_files(reg.uploads_dir), "a refused upload left a partial copy"

    worker = WorkerProcess(data, "malformed")
    try:
        every = {**jobs, **{f"{k} (engine)": v for k, v in engine_checked.items()}}
        finished = wait_for(lambda: all(service.get_job(reg, i).status.finished for i in every.values()), 240, 0.3)
        assert finished, worker.text()[-3000:]
        assert worker.proc.poll() is None, "the worker exited"
        outcomes = {k: service.get_job(reg, i) for k, i in every.items()}
        for label, job in outcomes.items():
            assert job.error_code != "internal", f"{label}: {job.error}"
            if job.error:
                assert one_worded_line(job.error) and "Traceback" not in job.error, f"{label}: {job.error}"
        for label, job in outcomes.items():
            if label.endswith(" (engine)"):
                expect = inputs[label[: -len(" (engine)")]][1]
                assert (job.status.value, job.error_code) == ("failed", expect.code), f"{label}: {job.error}"
            else:
                got = (job.status.value, job.error_code)
                assert got in inputs[label][1], f"{label}: {got} {job.error}"
        assert hash_failures(reg) == []
        built, corrupted = bundle_failures(reg)
        assert corrupted == []
        assert partial_files(data) == []
        assert worker.stop() == 0, worker.text()[-3000:]
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    table = {label: f"refused at submit: {type(e).__name__}" for label, e in refused.items()}
    table.update({label: f"{j.status.value}" + (f" ({j.error_code})" if j.error_code else "")
                  for label, j in outcomes.items()})
    fault_report["malformed"] = {
        "outcomes": table,
        "inputs_tried": len(inputs),
        "refused_at_submit": len(refused),
        "jobs": len(outcomes),
        "of_which_engine_limit_checks": len(engine_checked),
        "succeeded": sum(j.status == JobStatus.SUCCEEDED for j in outcomes.values()),
        "failed_worded": sum(j.status == JobStatus.FAILED for j in outcomes.values()),
        "internal_errors": 0,
        "stored_uploads": len(stored),
        "bundles_built": built,
        "corrupted_files_served": 0,
        "partial_files_found": 0,
    }


# ============================================================================ disk faults, a real worker


@slow
@pytest.mark.skipif(not CAN_MOUNT, reason="needs `mount -t tmpfs` (root) for a full and a read-only folder")
def test_real_worker_pauses_on_full_and_read_only_disks_on_another_file_system(
        tmp_path, recon_checkpoint, face_clip, mounts, fault_report):
    data = tmp_path / "data"
    data.mkdir()
    results = mounts.tmpfs(tmp_path / "results-mount", "8m")  # another file system than data/
    (data / "results").symlink_to(results)
    work = mounts.tmpfs(data / "work", "1m")
    reg = Registry(data_dir=data)
    settings = _real_settings(recon_checkpoint)
    fault_report["disk_faults_mechanism"] = "tmpfs mounts (size-limited, remounted read-only), results/ symlinked"

    def submit(n: int) -> list[int]:
        return [service.submit_file(reg, face_clip, settings).id for _ in range(n)]

    def paused_with(text: str) -> bool:
        return any(w.status == "paused" and text in (w.message or "") for w in service.list_workers(reg))

    worker = WorkerProcess(data, "disks", "--pause", "0.5", "--max-pause", "2")
    try:
        # 1. Read-only results: the job is requeued, the queue stays, the worker pauses visibly.
        Mounts.read_only(results, True)
        ro_ids = submit(3)

        def all_requeued() -> bool:  # the worker pauses, then requeues: wait for both
            return paused_with("read-only") and all(service.get_job(reg, i).status == JobStatus.QUEUED for i in ro_ids)

        assert wait_for(all_requeued, 300, 0.2), worker.text()[-3000:]
        jobs = [service.get_job(reg, i) for i in ro_ids]
        assert all(j.attempts == 0 for j in jobs), jobs
        listed = cli(data, "jobs")
        assert "worker disks is paused: " in listed.stdout and "read-only" in listed.stdout, listed.stdout
        Mounts.read_only(results, False)
        assert wait_for(lambda: all(service.get_job(reg, i).status == JobStatus.SUCCEEDED for i in ro_ids), 300)
        # 2. Full work/ (the resume chunks): requeued, paused, resumed once space is freed.
        fill(work)
        [full_id] = submit(1)
        assert wait_for(lambda: paused_with("disk is full") and service.get_job(reg, full_id).error_code == "disk_full",
                        300, 0.2), worker.text()[-3000:]
        assert partial_files(work) == [], "a resume chunk was left half-written"
        unfill(work)
        assert wait_for(lambda: service.get_job(reg, full_id).status == JobStatus.SUCCEEDED, 300)
        # 3. Full results/.
        fill(results)
        [res_id] = submit(1)
        assert wait_for(lambda: service.get_job(reg, res_id).error_code == "disk_full", 300, 0.2)
        unfill(results)
        assert wait_for(lambda: service.get_job(reg, res_id).status == JobStatus.SUCCEEDED, 300)
        # 4. Deleting a job whose files sit on a read-only folder says so and keeps the job.
        Mounts.read_only(results, True)
        with pytest.raises(service.FilesNotRemoved):
            service.delete_job(reg, res_id, actor=LOCAL)
        Mounts.read_only(results, False)
        assert service.get_job(reg, res_id).status == JobStatus.SUCCEEDED
        every = [*ro_ids, full_id, res_id]
        assert all(service.get_job(reg, i).attempts == 1 for i in every), "a disk fault cost an attempt"
        assert hash_failures(reg) == []
        assert bundle_failures(reg) == (len(every), [])  # bundles on another file system
        assert partial_files(data, results) == []
        assert worker.proc.poll() is None and worker.stop() == 0, worker.text()[-3000:]
        assert "Traceback" not in worker.text()
    finally:
        if worker.proc.poll() is None:
            worker.kill()
        with_suppress_rmdir(results)


@slow
@pytest.mark.skipif(not CAN_MOUNT, reason="needs `mount -t tmpfs` (root) for a full database disk")
def test_a_full_database_disk_gives_one_worded_line(tmp_path, mounts):
    db_dir = mounts.tmpfs(tmp_path / "dbdisk", "1m")
    data = tmp_path / "data"
    url = f"sqlite:///{db_dir / 'studio.db'}"
    reader = Registry(url=url, data_dir=data)  # a dashboard stays open: its -wal/-shm files exist
    service.list_jobs(reader)
    clip = _spec(tmp_path, "clip.mp4")
    fill(db_dir)
    try:
        sub = cli(data, "submit", str(clip), "--landmarks", "mtcnn", "--db-url", url)
        assert sub.returncode == 1 and one_worded_line(sub.stderr), sub.stderr
        assert "disk" in sub.stderr
        start = cli(data, "worker", "--device", "cpu", "--burst", "--db-url", url)
        assert start.returncode == 1 and "error: the worker cannot run: " in start.stderr, start.stderr
        assert "Traceback" not in start.stderr
        assert cli(data, "jobs", "--db-url", url).returncode == 0  # reading still works
    finally:
        unfill(db_dir)
        reader.close()


# ============================================================================ kill -9, real workers


KILLS = int(os.environ.get("STUDIO_FAULT_KILLS", "20"))


def _has_files(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except OSError:
        return False


@slow
@pytest.mark.timeout(1800)  # 20 kills, each replaced by a worker that imports torch: no deadline of its own
def test_random_kill_9_of_real_workers_loses_nothing(tmp_path, recon_checkpoint, face_clip, fault_report, capsys):
    seed = int(os.environ.get("STUDIO_FAULT_SEED") or secrets.randbits(32))
    with capsys.disabled():
        print(f"\n[fault suite] kill -9 seed: {seed} (replay with STUDIO_FAULT_SEED={seed})")
    rng = random.Random(seed)
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    settings = _real_settings(recon_checkpoint)
    ids = [service.submit_file(reg, face_clip, settings).id for _ in range(16)]
    spawned = 0
    killed: list[dict] = []
    procs: list[WorkerProcess] = []

    def spawn() -> WorkerProcess:
        nonlocal spawned
        spawned += 1
        w = WorkerProcess(data, f"k{spawned}")
        procs.append(w)
        return w

    def running_on(name: str):
        return [j for j in service.list_jobs(reg, statuses=["running"], limit=100) if j.worker_id == name]

    slots = [spawn(), spawn()]
    try:
        while len(killed) < KILLS:
            i = len(killed) % 2
            victim = slots[i]
            name = victim.log_path.stem
            mode = rng.random()
            if mode < 0.35:  # inside a job: wait until it runs one, then a random moment later
                wait_for(lambda name=name: running_on(name), 60, 0.05)
                time.sleep(rng.uniform(0.0, 1.2))
            elif mode < 0.5:  # the outputs are on disk, the job is not registered yet
                wait_for(lambda name=name: any(_has_files(reg.result_dir(j.id)) for j in running_on(name)), 60, 0.005)
            else:  # any moment: start-up, model loading, claiming, a job, idle
                time.sleep(rng.uniform(0.1, 8.0))
            jobs_then = running_on(name)
            written = [j.id for j in jobs_then if _has_files(reg.result_dir(j.id))]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            victim.log.close()
            killed.append({"worker": name, "jobs": [j.id for j in jobs_then], "written": written})
            slots[i] = spawn()
            open_jobs = service.count_jobs(reg, statuses=["queued", "running"])
            if open_jobs < 4:  # keep work in the queue for the kills to hit
                ids += [service.submit_file(reg, face_clip, settings).id for _ in range(4)]
        done = wait_for(lambda: all(service.get_job(reg, i).status.finished for i in ids), 300, 0.5)
        assert done, [(i, service.get_job(reg, i).status) for i in ids] + [slots[0].text()[-2000:]]
        assert all(w.proc.poll() is None for w in slots), "a worker died on its own"
        jobs = [service.get_job(reg, i) for i in ids]
        ok = [j for j in jobs if j.status == JobStatus.SUCCEEDED]
        failed = [j for j in jobs if j.status != JobStatus.SUCCEEDED]
        kills_of = {i: sum(i in k["jobs"] for k in killed) for i in ids}
        for j in failed:  # the only truthful failure here: killed on every attempt
            assert j.error_code == "abandoned" and "gave up after" in j.error, (j.id, j.error)
            assert kills_of[j.id] >= 1, (j.id, j.error, seed)
        assert hash_failures(reg) == [], seed
        arrays = []
        for j in ok:
            [art] = service.list_artifacts(reg, j.id)
            assert sorted(p.name for p in reg.result_dir(j.id).iterdir()) == [art.path.name], j.id
            with np.load(art.path) as z:
                arrays.append(z["coeff"])
        assert all(a.shape == (4, 257) and np.array_equal(a, arrays[0]) for a in arrays), \
            f"a resumed result differs from an uninterrupted one (seed {seed})"
        built, corrupted = bundle_failures(reg)
        assert corrupted == []
        assert partial_files(data) == [], seed
        assert all(not any(reg.state_dir(j.id).glob("*")) for j in ok), "resume state left after success"
        assert len([p for p in reg.uploads_dir.rglob("*") if p.is_file()]) == 1
        for w in slots:
            assert w.stop() == 0, w.text()[-3000:]
    finally:
        for w in procs:
            if w.proc.poll() is None:
                w.kill()
    fault_report["kills"] = {
        "seed": seed,
        "kills": len(killed),
        "kills_inside_a_job": sum(bool(k["jobs"]) for k in killed),
        "kills_after_outputs_written_before_registration": sum(bool(k["written"]) for k in killed),
        "worker_processes_started": spawned,
        "jobs": len(ids),
        "succeeded": len(ok),
        "failed_abandoned": len(failed),
        "jobs_lost": 0,
        "registered_files_failing_hash": 0,
        "resumed_results_identical": True,
        "bundles_built": built,
        "corrupted_files_served": 0,
        "partial_files_found": 0,
    }


# ============================================================================ what users see


def test_the_overview_page_shows_why_a_worker_is_paused(empty_studio):  # noqa: F811
    from tests.dashboard_fixtures import populate
    from tests.test_dashboard import open_page

    reg, tmp_path = empty_studio
    populate(reg, tmp_path)
    message = ("paused: cannot write results/3/clip.npz: the disk is full (No space left on device); "
               "trying again at 12:00:00 UTC")
    service.worker_heartbeat(reg, "worker-test", status="paused", message=message)
    at = open_page("overview")
    [warning] = [w.value for w in at.warning if "worker-test" in w.value]
    assert "is paused: cannot write results/3/clip.npz: the disk is full" in warning
    assert "without counting an attempt" in warning
    listed = cli(reg.data_dir, "jobs")
    assert f"worker worker-test is {message}" in listed.stdout

