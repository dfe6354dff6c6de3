"""The worker: an in-process loop with a scripted engine (fast), then real worker processes
running the real engine (``--landmarks mtcnn --device cpu``, a test-made checkpoint) on
clips cut from the shared test video (slow).

No test here measures how fast anything is: waits are generous timeouts (:data:`WAIT_S`),
"stops after the batch in flight" is checked by gating the scripted engine's batches, and
the cancel latency is read from the registry's own timestamps (``cancel_requested_at`` ≤
``finished_at``); how long it takes on real hardware is ``bench/bench_cancel.py``'s job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from db import LOCAL, JobStatus, Registry, service
from db.models import Job
from engine.errors import Cancelled, NoFaceError
from engine.pipeline import Progress, RunReport
from engine.structures import MediaInfo
from tests.conftest import REPO
from worker.loop import Worker, WorkerOptions, wait_for

#: Quick polls for in-process workers. A heartbeat is only judged stale after a minute: a busy
#: machine can hold a thread for seconds, and a test about staleness asks for its own.
FAST = WorkerOptions(device="cpu", poll_s=0.05, heartbeat_s=0.2, stale_after_s=60.0, progress_s=0.05,
                     cancel_poll_s=0.05)
#: Longest wait for something that takes well under a second on an idle machine (a busy one is slower).
WAIT_S = 60.0


# ============================================================================ scripted engine


class ScriptedEngine:
    """Stands in for :class:`engine.Engine`. The input file is JSON: ``frames`` (count),
    ``fail`` (``"no_face"``, ``"bug"``, ``"oom"``), ``oom_above`` (batch sizes above it run
    out of memory), ``delay`` (seconds per batch), ``gated`` (each batch first takes a permit
    from :attr:`gate`; :attr:`at_gate` records the frames done when it starts waiting).
    Saves/resumes its state like the engine; :attr:`stops` records the frames done at each
    cancel."""

    built: ClassVar[list] = []
    runs: ClassVar[list] = []
    stops: ClassVar[list] = []
    at_gate: ClassVar[list] = []
    gate: ClassVar[threading.Semaphore] = threading.Semaphore(0)

    def __init__(self, cfg, **components):
        self.config = cfg
        self.components = {"models": components.get("models", object())}
        ScriptedEngine.built.append((cfg, bool(components)))

    def run(self, source, out_base, *, progress=None, should_stop=None, state_dir=None):
        source = source.path  # an engine.sources.InputItem, as Engine.run gets it from the worker
        spec = json.loads(source.read_text())
        cfg = self.config
        state = Path(state_dir) / "state.json" if state_dir else None
        done = json.loads(state.read_text())["frames"] if state and state.exists() else 0
        ScriptedEngine.runs.append({"source": spec["name"], "start": done, "batch": cfg.batch_size})
        if spec.get("fail") == "oom" or cfg.batch_size > spec.get("oom_above", 10**9):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        while done < spec["frames"]:
            if should_stop and should_stop():
                ScriptedEngine.stops.append(done)
                raise Cancelled(f"cancelled at frame {done}")
            if spec.get("gated"):
                ScriptedEngine.at_gate.append(done)
                if not ScriptedEngine.gate.acquire(timeout=WAIT_S):
                    raise RuntimeError("test gate never opened")
            time.sleep(spec.get("delay", 0.0))
            done = min(spec["frames"], done + cfg.batch_size)
            if state:
                state.write_text(json.dumps({"frames": done}))
            if progress:
                progress(Progress(done, spec["frames"], 100.0))
        if spec.get("fail") == "no_face":
            raise NoFaceError(f"{source.name}: no face found in any of its {done} frames")
        if spec.get("fail") == "bug":
            raise KeyError("landmarks")
        out = Path(f"{out_base}.npz")
        tmp = out.with_name(out.name + ".tmp")
        np.savez(tmp, coeff=np.zeros((done, 257), np.float32))
        Path(str(tmp) + ".npz").replace(out)
        info = MediaInfo(path=source, kind="video", width=64, height=48, fps=25.0, frame_count=done)
        return RunReport(input=source, outputs={"npz": out}, info=info, num_frames=done,
                         num_valid=done - 1, reasons={"no_face": 1}, longest_invalid_run=1,
                         config=cfg.to_dict())

    def close(self):
        pass


@pytest.fixture
def reg(tmp_path):
    ScriptedEngine.built, ScriptedEngine.runs, ScriptedEngine.stops, ScriptedEngine.at_gate = [], [], [], []
    ScriptedEngine.gate = threading.Semaphore(0)
    r = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data")
    yield r
    r.close()


def _spec(tmp_path: Path, name: str, **spec) -> Path:
    p = tmp_path / "in" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"frames": 8, **spec, "name": name}))
    return p


def _submit(reg, path, **settings):
    settings = {"landmarks": "mtcnn", "formats": ["npz"], "batch_size": 4, **settings}
    return service.submit_file(reg, path, settings)


def _worker(reg, **opts) -> Worker:
    return Worker(reg, WorkerOptions(**{**FAST.__dict__, **opts}), worker_id="w-test",
                  engine_factory=ScriptedEngine)


def test_jobs_succeed_fail_readably_and_the_worker_carries_on(reg, tmp_path):
    good = _submit(reg, _spec(tmp_path, "good.mp4"))
    noface = _submit(reg, _spec(tmp_path, "noface.mp4", fail="no_face"))
    bug = _submit(reg, _spec(tmp_path, "bug.mp4", fail="bug"))
    last = _submit(reg, _spec(tmp_path, "last.mp4", frames=5))
    assert _worker(reg, burst=True).work() == 0

    ok = service.get_job(reg, good.id)
    assert ok.status == JobStatus.SUCCEEDED and ok.frames_done == 8 and ok.attempts == 1
    [art] = service.list_artifacts(reg, good.id)
    assert art.path == reg.result_dir(good.id) / "good.npz" and art.bytes == art.path.stat().st_size
    from db.storage import sha256_file

    assert art.sha256 == sha256_file(art.path)
    assert service.get_quality(reg, good.id).valid_frames == 7
    assert sorted(p.name for p in reg.result_dir(good.id).iterdir()) == ["good.npz"]

    nf = service.get_job(reg, noface.id)
    assert nf.status == JobStatus.FAILED and nf.error_code == "no_face" and "no face found" in nf.error
    b = service.get_job(reg, bug.id)
    assert b.status == JobStatus.FAILED and b.error_code == "internal" and b.error == "KeyError: 'landmarks'"
    assert not reg.result_dir(bug.id).exists()
    assert service.get_job(reg, last.id).status == JobStatus.SUCCEEDED
    [w] = service.list_workers(reg)
    assert (w.status, w.jobs_done, w.jobs_failed) == ("stopped", 2, 2)


def test_out_of_memory_halves_the_batch_down_to_one(reg, tmp_path):
    fits = _submit(reg, _spec(tmp_path, "fits.mp4", oom_above=2), batch_size=16)
    never = _submit(reg, _spec(tmp_path, "never.mp4", fail="oom"), batch_size=4)
    _worker(reg, burst=True).work()
    assert [r["batch"] for r in ScriptedEngine.runs if r["source"] == "fits.mp4"] == [16, 8, 4, 2]
    assert service.get_job(reg, fits.id).status == JobStatus.SUCCEEDED
    failed = service.get_job(reg, never.id)
    assert [r["batch"] for r in ScriptedEngine.runs if r["source"] == "never.mp4"] == [4, 2, 1]
    assert failed.status == JobStatus.FAILED and "out of memory on cpu even with batch size 1" in failed.error


def test_engine_is_kept_across_jobs_until_the_models_change(reg, tmp_path):
    _submit(reg, _spec(tmp_path, "a.mp4"))
    _submit(reg, _spec(tmp_path, "b.mp4"))  # same settings: same engine
    _submit(reg, _spec(tmp_path, "c.mp4"), batch_size=2)  # same models: reused components
    _submit(reg, _spec(tmp_path, "d.mp4"), checkpoint=str(tmp_path / "other.pth"))  # new models
    _worker(reg, burst=True).work()
    built = [(cfg.batch_size, reused) for cfg, reused in ScriptedEngine.built]
    assert built == [(4, False), (2, True), (4, False)]
    assert all(cfg.device == "cpu" for cfg, _ in ScriptedEngine.built)


def test_cancel_stops_the_running_job_and_removes_its_files(reg, tmp_path, in_thread):
    job = _submit(reg, _spec(tmp_path, "long.mp4", frames=400, delay=0.05), batch_size=1)
    thread = in_thread(worker := _worker(reg))
    assert wait_for(lambda: service.get_job(reg, job.id).frames_done >= 3, WAIT_S)
    assert (reg.state_dir(job.id) / "state.json").exists()
    service.cancel_job(reg, job.id, actor=LOCAL)
    assert wait_for(lambda: service.get_job(reg, job.id).status == JobStatus.CANCELLED, WAIT_S)
    done = service.get_job(reg, job.id)
    assert done.cancel_requested_at is not None and done.cancel_requested_at <= done.finished_at
    assert ScriptedEngine.stops and ScriptedEngine.stops[0] < 400
    assert not reg.result_dir(job.id).exists() and not reg.state_dir(job.id).exists()
    worker.request_stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()


def test_a_cancel_the_worker_has_seen_stops_the_engine_after_the_batch_in_flight(reg, tmp_path, in_thread, caplog):
    """The promise behind a quick cancel, independent of machine speed: once the worker's monitor
    has read the cancel flag, the engine finishes the batch it is in and starts no other."""
    caplog.set_level(logging.INFO, logger="worker.monitor")
    job = _submit(reg, _spec(tmp_path, "gated.mp4", frames=100, gated=True), batch_size=2)
    thread = in_thread(worker := _worker(reg))
    for _ in range(3):
        ScriptedEngine.gate.release()
    assert wait_for(lambda: ScriptedEngine.at_gate[-1:] == [6], WAIT_S)  # 3 batches done, 4th about to run
    service.cancel_job(reg, job.id, actor=LOCAL)
    seen = f"job {job.id}: cancel requested"
    assert wait_for(lambda: any(r.getMessage() == seen for r in caplog.records), WAIT_S)
    for _ in range(20):  # let it run as far as it would
        ScriptedEngine.gate.release()
    assert wait_for(lambda: service.get_job(reg, job.id).status == JobStatus.CANCELLED, WAIT_S)
    assert ScriptedEngine.stops == [8], "the engine started another batch after the cancel was seen"
    worker.request_stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()


def test_warm_shutdown_requeues_without_penalty_and_the_next_worker_resumes(reg, tmp_path, in_thread):
    job = _submit(reg, _spec(tmp_path, "long.mp4", frames=40, gated=True), batch_size=2)
    thread = in_thread(first := _worker(reg))
    for _ in range(3):
        ScriptedEngine.gate.release()
    assert wait_for(lambda: ScriptedEngine.at_gate[-1:] == [6], WAIT_S)  # 3 batches done, 4th waiting
    first.request_stop()  # what SIGTERM does
    for _ in range(20):  # enough for both workers: the first stops after the batch in flight
        ScriptedEngine.gate.release()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert ScriptedEngine.stops == [8]
    back = service.get_job(reg, job.id)
    assert back.status == JobStatus.QUEUED and back.attempts == 0 and back.error_code == "requeued"
    assert (reg.state_dir(job.id) / "state.json").exists()
    _worker(reg, burst=True).work()
    done = service.get_job(reg, job.id)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1 and done.error is None
    assert ScriptedEngine.runs[-1]["start"] == 8, "the second worker started over instead of resuming"


def test_a_job_taken_away_is_left_to_its_new_owner(reg, tmp_path, in_thread):
    job = _submit(reg, _spec(tmp_path, "long.mp4", frames=400, delay=0.05), batch_size=1)
    thread = in_thread(worker := _worker(reg))
    assert wait_for(lambda: service.get_job(reg, job.id).frames_done >= 2, WAIT_S)
    with reg.write() as s:  # what the janitor of another worker does when it judged us dead
        row = s.get(Job, job.id)
        row.worker_id = "someone-else"
        s.add(row)
    assert wait_for(lambda: ScriptedEngine.runs and worker.jobs_seen == 1, WAIT_S)
    assert ScriptedEngine.stops and ScriptedEngine.stops[0] < 400, "the engine was not stopped"
    view = service.get_job(reg, job.id)
    assert view.status == JobStatus.RUNNING and view.worker_id == "someone-else"
    worker.request_stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()


def test_cli_submit_jobs_cancel_retry(tmp_path):
    """The registry commands through ``python -m engine`` (no worker, no torch needed)."""
    data = tmp_path / "data"
    video = _spec(tmp_path, "clip.mp4")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "engine", *args, "--data-dir", str(data)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    r = cli("submit", str(video), str(video), "--landmarks", "mtcnn", "--formats", "npz,pirender")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["queued job 1: clip.mp4", "queued job 2: clip.mp4"]
    r = cli("cancel", "2")
    assert r.returncode == 0 and "job 2: cancel requested (cancelled)" in r.stdout
    r = cli("jobs")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "PROGRESS", "FPS", "ATTEMPTS", "ERROR"]
    rows = [ln.split()[:3] for ln in lines[1:]]
    assert rows == [["2", "clip.mp4", "cancelled"], ["1", "clip.mp4", "queued"]]
    assert cli("jobs", "--status", "queued").stdout.count("clip.mp4") == 1
    assert cli("retry", "2").returncode == 0
    r = cli("retry", "2")
    assert r.returncode == 1 and "only failed or cancelled jobs can be retried" in r.stderr
    assert cli("cancel", "99").stderr.strip() == "error: no job with id 99"
    reg = Registry(data_dir=data)
    assert service.get_job(reg, 1).settings["formats"] == ["npz", "pirender"]
    assert len([p for p in reg.uploads_dir.rglob("*") if p.is_file()]) == 1


# ============================================================================ real worker processes

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tests.factories import make_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "epoch_20.pth"
    make_checkpoint(path, "deep3d")
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory, test_video) -> dict[str, Path]:
    """Clips cut from the shared video, scaled to 256×256: ``tiny`` (2 frames), ``short`` (4), ``long`` (40),
    plus the bad inputs of the mixed queue."""

    from tests.media import (
        first_frames,
        make_empty_file,
        make_solid_video,
        make_text_file,
        make_truncated_copy,
        make_video,
    )

    folder = tmp_path_factory.mktemp("clips")
    frames = first_frames(test_video, 40, size=(256, 256))
    out = {
        "tiny": make_video(folder / "tiny.mp4", frames[:2]),
        "short": make_video(folder / "short.mp4", frames[:4]),
        "long": make_video(folder / "long.mp4", frames),
        "empty": make_empty_file(folder / "empty.mp4"),
        "text": make_text_file(folder / "notes.mp4"),
        "noface": make_solid_video(folder / "wall.mp4", frames=4, size=(128, 128)),
    }
    out["truncated"] = make_truncated_copy(out["long"], folder / "cut.mp4", 0.5)
    return out


def _settings(checkpoint: Path, **kw) -> dict:
    return {"landmarks": "mtcnn", "checkpoint": str(checkpoint), "formats": ["npz"], "batch_size": 4,
            "num_threads": 1, **kw}


class WorkerProcess:
    """``python -m engine worker`` as a subprocess, its log in a file."""

    def __init__(self, data: Path, name: str, *extra: str) -> None:
        self.log_path = data.parent / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "engine", "worker", "--device", "cpu", "--data-dir", str(data),
               "--poll", "0.2", "--heartbeat", "0.5", "--stale-after", "4", "--worker-id", name, *extra]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def workers():
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.kill()


def _wait_status(reg, job_id, statuses, timeout, procs=()) -> bool:
    def done():
        for p in procs:
            assert p.proc.poll() is None or p.proc.returncode == 0, p.text()[-3000:]
        return service.get_job(reg, job_id).status in statuses
    return wait_for(done, timeout, 0.2)


def _files(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@slow
def test_kill_9_mid_job_a_second_worker_resumes_and_matches_an_uninterrupted_run(
        tmp_path, checkpoint, clips, workers):
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    victim = service.submit_file(reg, clips["long"], _settings(checkpoint))
    reference = service.submit_file(reg, clips["long"], _settings(checkpoint))  # runs uninterrupted later
    workers.append(first := WorkerProcess(data, "first", "--max-jobs", "1"))
    started = wait_for(lambda: service.get_job(reg, victim.id).frames_done >= 12, 120, 0.05)
    assert started, first.text()[-3000:]
    first.proc.kill()  # SIGKILL: no cleanup, no requeue, heartbeat just stops
    first.proc.wait(10)
    killed_at = service.get_job(reg, victim.id).frames_done
    assert killed_at < 40 and service.get_job(reg, victim.id).status == JobStatus.RUNNING

    workers.append(second := WorkerProcess(data, "second"))
    for job_id in (victim.id, reference.id):
        finished = _wait_status(reg, job_id, (JobStatus.SUCCEEDED, JobStatus.FAILED), 240, [second])
        assert finished, second.text()[-3000:]
    assert second.stop() == 0
    job, ref = service.get_job(reg, victim.id), service.get_job(reg, reference.id)
    assert job.status == ref.status == JobStatus.SUCCEEDED, (job.error, ref.error)
    assert job.attempts == 2 and ref.attempts == 1
    assert "first stopped sending heartbeats" in second.text()
    resumed = [ln for ln in second.text().splitlines() if f"job {victim.id}: first batch done at frame" in ln]
    first_frame = int(resumed[0].split("at frame ")[1].split("/")[0])
    assert first_frame > killed_at, f"restarted from frame 0 (killed at {killed_at}): {resumed}"

    with np.load(service.list_artifacts(reg, job.id)[0].path) as a, \
            np.load(service.list_artifacts(reg, ref.id)[0].path) as b:
        assert a["coeff"].shape == (40, 257)
        np.testing.assert_array_equal(a["coeff"], b["coeff"])
        np.testing.assert_array_equal(a["transform_params"], b["transform_params"])
    arts = service.list_artifacts(reg, job.id)
    assert [a.format for a in arts] == ["npz"]
    assert _files(reg.result_dir(job.id)) == ["long.npz"], "half-written or duplicate files left"
    assert _files(reg.state_dir(job.id)) == [] and _files(reg.tmp_dir) == []


@slow
def test_30_jobs_3_workers_each_job_runs_exactly_once(tmp_path, checkpoint, clips, workers):
    """Three workers polling one queue (the jobs come once all three are up: a worker that
    started faster must not have drained it before the others looked)."""
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    for i in range(3):
        workers.append(WorkerProcess(data, f"w{i}"))
    assert wait_for(lambda: sum(w.alive for w in service.list_workers(reg)) == 3, 300, 0.2), \
        [w.text()[-2000:] for w in workers]
    ids = [service.submit_file(reg, clips["tiny"], _settings(checkpoint)).id for _ in range(30)]
    assert wait_for(lambda: all(service.get_job(reg, i).status.finished for i in ids), 480, 0.2)
    for w in workers:
        assert w.stop() == 0, w.text()[-3000:]
    jobs = [service.get_job(reg, i) for i in ids]
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED] * 30, [j.error for j in jobs if j.error]
    assert all(j.attempts == 1 for j in jobs)
    logs = "\n".join(w.text() for w in workers)
    starts = [int(ln.split("job ")[1].split(":")[0]) for ln in logs.splitlines() if ": start " in ln]
    assert sorted(starts) == ids, "a job was started twice (or never)"
    assert "locked" not in logs.lower() and "Traceback" not in logs
    assert sum(1 for w in workers if ": start " in w.text()) >= 2, "one worker did everything"
    assert all(len(service.list_artifacts(reg, i)) == 1 for i in ids)


@slow
def test_mixed_queue_bad_inputs_fail_readably_and_the_worker_keeps_serving(
        tmp_path, checkpoint, clips, workers):
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    names = ["empty", "short", "truncated", "text", "noface"]
    ids = {n: service.submit_file(reg, clips[n], _settings(checkpoint)).id for n in names}
    workers.append(w := WorkerProcess(data, "mixed"))
    for n in names:
        assert _wait_status(reg, ids[n], (JobStatus.SUCCEEDED, JobStatus.FAILED), 180, [w]), w.text()[-3000:]
    jobs = {n: service.get_job(reg, i) for n, i in ids.items()}
    assert jobs["short"].status == JobStatus.SUCCEEDED
    bad = {n: j for n, j in jobs.items() if n != "short"}
    assert all(j.status == JobStatus.FAILED for j in bad.values())
    errors = {n: j.error for n, j in bad.items()}
    assert len(set(errors.values())) == 4, errors
    assert all(e and "\n" not in e and "Traceback" not in e and len(e) < 300 for e in errors.values())
    assert bad["noface"].error_code == "no_face" and "no face" in bad["noface"].error
    assert "empty" in bad["empty"].error.lower() or "0 bytes" in bad["empty"].error
    assert bad["truncated"].error_code in ("decode", "input")
    assert all(j.error_code not in ("internal", None) for j in bad.values()), errors
    assert w.proc.poll() is None, "the worker exited"
    assert w.stop() == 0  # SIGTERM while idle: clean exit
    assert "worker stopped after 5 job(s)" in w.text()


@slow
def test_cancel_and_sigterm_of_a_real_worker_process(tmp_path, checkpoint, clips, workers):
    """A cancel stops the job and removes its files; the registry records when it was asked for and
    when it was done (their gap, the cancel latency, is measured by bench/bench_cancel.py)."""
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    job = service.submit_file(reg, clips["long"], _settings(checkpoint, batch_size=2))
    workers.append(w := WorkerProcess(data, "canceller"))
    assert wait_for(lambda: service.get_job(reg, job.id).frames_done >= 2, 120, 0.05), w.text()[-3000:]
    assert _files(reg.state_dir(job.id))
    service.cancel_job(reg, job.id, actor=LOCAL)
    assert _wait_status(reg, job.id, (JobStatus.CANCELLED,), WAIT_S, [w]), service.get_job(reg, job.id)
    cancelled = service.get_job(reg, job.id)
    assert cancelled.cancel_requested_at is not None and cancelled.cancel_requested_at <= cancelled.finished_at
    assert f"job {job.id}: cancelled; partial files removed" in w.text()
    assert _files(reg.result_dir(job.id)) == [] and _files(reg.state_dir(job.id)) == []

    second = service.submit_file(reg, clips["long"], _settings(checkpoint, batch_size=2))
    assert wait_for(lambda: service.get_job(reg, second.id).frames_done >= 4, 120, 0.05)
    assert w.stop(timeout=120) == 0, w.text()[-3000:]
    back = service.get_job(reg, second.id)
    assert back.status == JobStatus.QUEUED and back.attempts == 0 and back.worker_id is None
    assert (reg.state_dir(second.id) / "state.json").exists(), "SIGTERM must keep the state to resume"
    assert "SIGTERM received" in w.text()


@slow
def test_launch_runs_one_worker_per_device_and_a_second_launch_starts_none(tmp_path):
    import socket

    data = tmp_path / "data"
    base = [sys.executable, "-m", "worker.launch", "--devices", "cpu", "--data-dir", str(data)]
    first = subprocess.Popen([*base, "--no-dashboard"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        reg = Registry(data_dir=data)
        assert wait_for(lambda: any(w.alive for w in service.list_workers(reg)), 300, 0.2)  # imports torch first
        with socket.socket() as busy:  # stands in for a dashboard that already runs
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            second = subprocess.run([*base, "--port", str(port)], cwd=REPO, capture_output=True, text=True,
                                    timeout=300)
        assert second.returncode == 0, second.stderr
        assert f"a worker already serves cpu for {data.resolve()}" in second.stdout
        assert f"the dashboard already runs at http://127.0.0.1:{port}" in second.stdout
        assert "nothing to start" in second.stdout
        assert len(service.list_workers(reg)) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    [w] = service.list_workers(reg)
    assert w.status == "stopped" and not w.alive


def test_jobs_reach_the_engine_under_their_submitted_name(tmp_path):
    """An upload is stored by hash, but `--landmarks file` must look for `<keypoints>/<original name>.txt`."""
    from types import SimpleNamespace

    from engine.landmarks.file import keypoint_candidates
    from worker.loop import _input_item

    stored = tmp_path / "uploads" / "ab" / ("ab" * 32 + ".mp4")
    upload = _input_item(SimpleNamespace(name="clip.mp4", input_path=str(stored)))
    imported = _input_item(SimpleNamespace(name="train/id7/clip.mp4", input_path="/data/vox/train/id7/clip.mp4"))
    hostile = _input_item(SimpleNamespace(name="../../etc/clip.mp4", input_path=str(stored)))
    assert upload.path == stored and upload.rel_stem == Path("clip")
    assert keypoint_candidates(upload, tmp_path / "kp")[0] == tmp_path / "kp" / "clip.txt"
    assert keypoint_candidates(imported, tmp_path / "kp")[0] == tmp_path / "kp" / "train" / "id7" / "clip.txt"
    assert ".." not in hostile.rel_stem.parts
