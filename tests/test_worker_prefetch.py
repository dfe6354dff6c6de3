"""Claim-ahead: a worker holds jobs beyond those in flight, each leased like a running job.

Real SQLite files and real worker processes: ``python -m engine worker`` with the real engine
(``--landmarks mtcnn`` on CPU, a test-made checkpoint) for kill -9, and a worker process running
the scripted engine of ``tests/test_worker.py`` (:func:`scripted_worker`) where a job must be held
still: its first batch waits for a gate file the test creates. Waits are generous timeouts; the
cancel promise is read from the registry's own timestamps, and "without waiting for the job in
flight" is shown by that job still being held at its gate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from db import LOCAL, JobStatus, Registry, service
from db.models import Job
from tests import test_worker
from tests.conftest import REPO
from tests.test_worker import FAST, WAIT_S, ScriptedEngine, WorkerProcess, _settings, _spec
from worker.feed import InputJob, run_in_threads
from worker.loop import Worker, WorkerOptions, wait_for

checkpoint, clips, workers = test_worker.checkpoint, test_worker.clips, test_worker.workers  # fixtures

#: The cancel of a job that waits on a worker takes effect within this (the issue's promise).
CANCEL_WITHIN = timedelta(seconds=2)


# ============================================================================ the scripted engine in a process


class GatedEngine(ScriptedEngine):
    """:class:`ScriptedEngine` whose input may name a ``gate`` file: the run waits for it first."""

    def run(self, source, out_base, **kwargs):
        gate = json.loads(source.path.read_text()).get("gate")
        if gate and not wait_for(lambda: Path(gate).exists(), 600, 0.02):
            raise RuntimeError("test gate never opened")
        return super().run(source, out_base, **kwargs)


def scripted_worker(argv: list[str]) -> int:
    """``python -c '...scripted_worker(sys.argv[1:])' DATA_DIR WORKER_ID OPTIONS_JSON``: a real worker
    process (signals, leases, its own SQLite connections) with :class:`GatedEngine`."""
    data, worker_id, options = argv
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [{worker_id}] %(name)s: %(message)s")
    opts = WorkerOptions(**{**FAST.__dict__, **json.loads(options)})
    return Worker(Registry(data_dir=Path(data)), opts, worker_id=worker_id, engine_factory=GatedEngine).work()


class ScriptedProcess(WorkerProcess):
    """:func:`scripted_worker` as a subprocess, its log in a file."""

    def __init__(self, data: Path, name: str, **options) -> None:
        self.log_path = data.parent / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        code = ("import sys; from tests.test_worker_prefetch import scripted_worker; "
                "sys.exit(scripted_worker(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code, str(data), name, json.dumps(options)]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)


def _submit(reg, path: Path):
    return service.submit_file(reg, path, {"landmarks": "mtcnn", "formats": ["npz"], "batch_size": 4})


def _held_by(reg, worker_id: str) -> list:
    return [j for j in service.list_jobs(reg, statuses=["running"]) if j.worker_id == worker_id]


def _alive(proc: WorkerProcess):
    assert proc.proc.poll() is None, proc.text()[-3000:]
    return True


def test_cancel_of_a_claimed_job_that_waits_takes_effect_at_once(tmp_path, workers):
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    gate = tmp_path / "gate"
    first = _submit(reg, _spec(tmp_path, "first.mp4", gate=str(gate)))
    waiting = _submit(reg, _spec(tmp_path, "waiting.mp4"))
    last = _submit(reg, _spec(tmp_path, "last.mp4"))
    extra = _submit(reg, _spec(tmp_path, "extra.mp4"))
    workers.append(w := ScriptedProcess(data, "ahead", concurrency=1, prefetch=2))
    assert wait_for(lambda: _alive(w) and len(_held_by(reg, "ahead")) == 3, WAIT_S, 0.05), w.text()[-3000:]
    held = {j.id: j for j in _held_by(reg, "ahead")}
    assert set(held) == {first.id, waiting.id, last.id}, "claimed more than concurrency + prefetch"
    assert service.get_job(reg, extra.id).status == JobStatus.QUEUED
    assert wait_for(lambda: service.get_job(reg, waiting.id).stage == "waiting", WAIT_S, 0.05)

    service.cancel_job(reg, waiting.id, actor=LOCAL)
    assert wait_for(lambda: _alive(w) and service.get_job(reg, waiting.id).status == JobStatus.CANCELLED,
                    WAIT_S, 0.05), w.text()[-3000:]
    cancelled = service.get_job(reg, waiting.id)
    assert cancelled.finished_at - cancelled.cancel_requested_at <= CANCEL_WITHIN, (
        cancelled.cancel_requested_at, cancelled.finished_at)
    # It did not wait for the job in flight: that one is still held at its gate, no frame done.
    running = service.get_job(reg, first.id)
    assert running.status == JobStatus.RUNNING and running.frames_done == 0
    assert f"job {waiting.id}: cancelled before it started" in w.text()
    assert f"job {waiting.id}: start" not in w.text(), "the cancelled job reached the engine"
    assert not reg.result_dir(waiting.id).exists() and not reg.state_dir(waiting.id).exists()

    gate.touch()
    for job in (first, last, extra):
        assert wait_for(lambda j=job: _alive(w) and service.get_job(reg, j.id).status == JobStatus.SUCCEEDED,
                        WAIT_S, 0.05), w.text()[-3000:]
    assert [service.get_job(reg, j.id).attempts for j in (first, last, extra)] == [1, 1, 1]
    assert service.get_job(reg, waiting.id).status == JobStatus.CANCELLED
    assert w.stop(WAIT_S) == 0
    assert "worker stopped after 4 job(s)" in w.text()


def test_sigterm_gives_claimed_jobs_back_without_an_attempt_penalty(tmp_path, workers):
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    gate = tmp_path / "gate"
    first = _submit(reg, _spec(tmp_path, "first.mp4", gate=str(gate)))
    second = _submit(reg, _spec(tmp_path, "second.mp4"))
    third = _submit(reg, _spec(tmp_path, "third.mp4"))
    with reg.write() as s:  # an earlier attempt of the third, lost with its worker
        row = s.get(Job, third.id)
        row.attempts = 1
        s.add(row)
    before = {j.id: service.get_job(reg, j.id).attempts for j in (first, second, third)}
    workers.append(w := ScriptedProcess(data, "leaving", concurrency=1, prefetch=2))
    assert wait_for(lambda: _alive(w) and len(_held_by(reg, "leaving")) == 3, WAIT_S, 0.05), w.text()[-3000:]
    assert [service.get_job(reg, j.id).attempts for j in (first, second, third)] == [1, 1, 2]

    w.proc.send_signal(signal.SIGTERM)
    # The waiting jobs go back at once, while the one in flight is still held at its gate.
    for job in (second, third):
        assert wait_for(lambda j=job: service.get_job(reg, j.id).status == JobStatus.QUEUED, WAIT_S, 0.05), \
            w.text()[-3000:]
    assert service.get_job(reg, first.id).status == JobStatus.RUNNING and w.proc.poll() is None
    gate.touch()  # the job in flight ends its batch and goes back too
    assert w.proc.wait(WAIT_S) == 0, w.text()[-3000:]
    w.stop()
    after = {j.id: service.get_job(reg, j.id) for j in (first, second, third)}
    assert {i: j.status for i, j in after.items()} == dict.fromkeys(before, JobStatus.QUEUED)
    assert {i: j.attempts for i, j in after.items()} == before, "an attempt was counted for a shutdown"
    assert all(j.error_code == "requeued" and j.worker_id is None for j in after.values())
    assert f"job {second.id}: start" not in w.text() and f"job {third.id}: start" not in w.text()
    [row] = service.list_workers(reg)
    assert row.status == "stopped"


@pytest.mark.slow
def test_kill_9_of_a_worker_holding_claimed_jobs_each_finishes_once_elsewhere(tmp_path, checkpoint, clips, workers):
    """kill -9 of a worker running one job with two more claimed: another worker's janitor requeues all
    three (their heartbeats stop), each finishes exactly once there, with the outputs of an
    uninterrupted run of the same clip."""
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    victims = [service.submit_file(reg, clips[name], _settings(checkpoint)) for name in ("long", "short", "tiny")]
    references = [service.submit_file(reg, clips[name], _settings(checkpoint)) for name in ("long", "short", "tiny")]
    workers.append(first := WorkerProcess(data, "first", "--concurrency", "1", "--prefetch", "2"))
    started = wait_for(lambda: _alive(first) and service.get_job(reg, victims[0].id).frames_done >= 8, 240, 0.05)
    assert started, first.text()[-3000:]
    held = _held_by(reg, "first")
    assert sorted(j.id for j in held) == [v.id for v in victims], "the worker did not claim ahead as configured"
    first.proc.kill()  # SIGKILL: no cleanup, no requeue; the heartbeats of all three just stop
    first.proc.wait(10)
    assert all(service.get_job(reg, v.id).status == JobStatus.RUNNING for v in victims)
    assert service.get_job(reg, victims[0].id).frames_done < 40

    workers.append(second := WorkerProcess(data, "second"))
    for job in [*victims, *references]:
        done = wait_for(lambda j=job: _alive(second) and service.get_job(reg, j.id).status.finished, 480, 0.2)
        assert done, second.text()[-3000:]
    assert second.stop() == 0
    for victim, reference in zip(victims, references, strict=True):
        job, ref = service.get_job(reg, victim.id), service.get_job(reg, reference.id)
        assert job.status == ref.status == JobStatus.SUCCEEDED, (job.error, ref.error)
        assert (job.attempts, ref.attempts) == (2, 1)
        [art], [ref_art] = service.list_artifacts(reg, job.id), service.list_artifacts(reg, ref.id)
        with np.load(art.path) as a, np.load(ref_art.path) as b:
            assert a["coeff"].shape == b["coeff"].shape
            np.testing.assert_array_equal(a["coeff"], b["coeff"])
            np.testing.assert_array_equal(a["transform_params"], b["transform_params"])
        assert len(list(reg.result_dir(job.id).iterdir())) == 1, "half-written or duplicate files left"
    log_first, log_second = first.text(), second.text()
    for v in victims:
        assert log_second.count(f"job {v.id}: start ") == 1, f"job {v.id} did not run exactly once on the second"
    assert log_first.count(": start ") == 1, "the first worker started a job it had only claimed"
    assert "first stopped sending heartbeats" in log_second


# ============================================================================ in process


def test_the_thread_fallback_pulls_lazily_runs_at_most_concurrency_and_fails_alone():
    """``worker.feed.run_in_threads``: a job is pulled only when a thread is free; the first runs alone
    until it has reported frames; each job's error stays in its own outcome."""
    gates = {k: threading.Event() for k in "abcd"}
    pulled: list[str] = []
    running: set[str] = set()
    most = [0]
    lock = threading.Lock()

    class Engine:
        def run(self, source, out_base, *, progress, should_stop, state_dir):
            with lock:
                running.add(source)
                most[0] = max(most[0], len(running))
            from engine.pipeline import Progress

            progress(Progress(1, 2, 1.0))
            assert gates[source].wait(WAIT_S)
            with lock:
                running.discard(source)
            if source == "b":
                raise ValueError("b is broken")
            return f"report of {source}"

    def jobs():
        for k in "abcd":
            pulled.append(k)
            yield InputJob(source=k, out_base=Path(k), key=k)

    outcomes = run_in_threads(Engine(), jobs(), concurrency=2)
    results: dict[str, tuple] = {}
    reader = threading.Thread(target=lambda: results.update(
        (o.job.key, (o.report, o.error)) for o in outcomes), daemon=True)
    reader.start()
    assert wait_for(lambda: running == {"a", "b"}, WAIT_S)
    assert pulled == ["a", "b"], "pulled a job no thread was free for"
    gates["b"].set()
    assert wait_for(lambda: running == {"a", "c"}, WAIT_S)
    for g in gates.values():
        g.set()
    reader.join(WAIT_S)
    assert not reader.is_alive()
    assert most[0] == 2
    assert {k: r for k, (r, _) in results.items()} == {"a": "report of a", "b": None, "c": "report of c",
                                                        "d": "report of d"}
    assert isinstance(results["b"][1], ValueError) and all(e is None for k, (_, e) in results.items() if k != "b")


def test_a_worker_holding_other_jobs_stays_busy_when_one_ends(tmp_path):
    reg = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data")
    service.register_worker(reg, "w", hostname="h", pid=1, device="cpu")
    a = _submit(reg, _spec(tmp_path, "a.mp4"))
    b = _submit(reg, _spec(tmp_path, "b.mp4"))
    service.claim_next(reg, "w", device="cpu")
    service.claim_next(reg, "w", device="cpu")
    service.fail_job(reg, a.id, "w", error="broken")
    [w] = service.list_workers(reg)
    assert (w.status, w.current_job_id) == ("busy", b.id)
    service.requeue_job(reg, b.id, "w", reason="shut down")
    [w] = service.list_workers(reg)
    assert (w.status, w.current_job_id) == ("idle", None)
    reg.close()


def test_workers_of_several_gpus_split_the_cpu_threads(tmp_path, monkeypatch):
    """``--gpus all`` / ``make run``: each worker child gets ``--threads cores // workers`` and the
    numeric libraries' thread variables (unless set), and no child is started twice per device."""
    from worker import launch

    monkeypatch.setattr(launch, "usable_cores", lambda: 32)
    env = {"PATH": os.environ.get("PATH", ""), "MKL_NUM_THREADS": "3"}
    children, notes = launch.worker_children(["cuda:0", "cuda:1", "cuda:0"], tmp_path, env, per_gpu=1)
    assert [c.name for c in children] == ["worker[cuda:0]", "worker[cuda:1]"] and notes == []
    for c in children:
        assert c.cmd[c.cmd.index("--threads") + 1] == "16"
        assert (c.env["OMP_NUM_THREADS"], c.env["MKL_NUM_THREADS"]) == ("16", "3")  # a set variable is kept
        assert c.cmd[c.cmd.index("--decode-threads") + 1] == "1"  # several workers: one FFmpeg thread a video
    again, notes = launch.worker_children(["cuda:1"], tmp_path, env, threads=4, per_gpu=1)
    assert again == [] and "a worker already serves cuda:1" in notes[0]
    for c in children:
        os.close(c.pass_fds[0])
    lone, _ = launch.worker_children(["cuda:0"], tmp_path / "lone", env, per_gpu=1)
    assert "--decode-threads" not in lone[0].cmd  # one worker: each job's setting (FFmpeg's choice)
    os.close(lone[0].pass_fds[0])
    chosen, _ = launch.worker_children(["cuda:0"], tmp_path / "chosen", env, per_gpu=1, decode_threads=0)
    assert chosen[0].cmd[chosen[0].cmd.index("--decode-threads") + 1] == "0"
    os.close(chosen[0].pass_fds[0])


def test_threads_options_set_the_jobs_num_threads_decode_threads_and_torchs(tmp_path, monkeypatch):
    from worker import loop

    limited: list[int] = []
    monkeypatch.setattr(loop, "limit_torch_threads", limited.append)
    ScriptedEngine.built = []
    reg = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data")
    job = _submit(reg, _spec(tmp_path, "a.mp4"))
    options = WorkerOptions(**{**FAST.__dict__, "burst": True, "num_threads": 3})
    assert Worker(reg, options, worker_id="w", engine_factory=ScriptedEngine).work() == 0
    assert service.get_job(reg, job.id).status == JobStatus.SUCCEEDED
    assert limited == [3] and [cfg.num_threads for cfg, _ in ScriptedEngine.built] == [3]
    assert [cfg.decode_threads for cfg, _ in ScriptedEngine.built] == [0]  # the job's own setting
    ScriptedEngine.built = []
    second = _submit(reg, _spec(tmp_path, "b.mp4"))
    options = WorkerOptions(**{**FAST.__dict__, "burst": True, "decode_threads": 1})
    assert Worker(reg, options, worker_id="w", engine_factory=ScriptedEngine).work() == 0
    assert service.get_job(reg, second.id).status == JobStatus.SUCCEEDED
    assert [cfg.decode_threads for cfg, _ in ScriptedEngine.built] == [1]
    with pytest.raises(ValueError, match="decode threads"):
        WorkerOptions(decode_threads=-1)
    reg.close()


def test_the_queues_last_jobs_are_left_to_workers_that_have_none(tmp_path, in_thread, monkeypatch):
    """With another live worker, a worker that holds a job claims more only while more are queued
    than the other could take: of 3 jobs it claims 2 at once and the last only once it holds
    none. Shown by the registry's claim and finish times; the first job is held at its gate until
    the second is claimed, so the speed of the machine does not matter."""
    monkeypatch.setattr(ScriptedEngine, "gate", threading.Semaphore(0))
    monkeypatch.setattr(ScriptedEngine, "at_gate", [])
    reg = Registry(data_dir=tmp_path / "data")
    jobs = [_submit(reg, _spec(tmp_path, f"clip{i}.mp4", gated=i == 0)) for i in range(3)]
    service.register_worker(reg, "other", hostname="h", pid=1, device="cpu")  # live, never claims here
    thread = in_thread(Worker(reg, dataclasses.replace(FAST, burst=True), worker_id="w",
                              engine_factory=ScriptedEngine))
    assert wait_for(lambda: service.get_job(reg, jobs[1].id).status != JobStatus.QUEUED, WAIT_S)
    for _ in range(2):  # the first job's two batches
        ScriptedEngine.gate.release()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    first, second, last = (service.get_job(reg, j.id) for j in jobs)
    assert all(j.status == JobStatus.SUCCEEDED and j.worker_id == "w" for j in (first, second, last))
    assert second.started_at < first.finished_at, "did not claim ahead while 2 were queued for 1 other worker"
    assert last.started_at >= max(first.finished_at, second.finished_at), (
        "claimed the last job ahead although another worker could take it")
    reg.close()


# ============================================================================ models before the first claim


def test_the_models_load_before_the_first_claim(tmp_path, caplog):
    """A worker loads the models of the queue's next job before it claims anything, then runs every
    job of that config on them: no claimed job waits for a model load."""
    reg = Registry(data_dir=tmp_path / "data")
    jobs = [_submit(reg, _spec(tmp_path, f"clip{i}.mp4")) for i in range(3)]
    statuses_at_load = []

    class LoadingEngine(ScriptedEngine):
        def load(self):
            statuses_at_load.append([service.get_job(reg, j.id).status for j in jobs])
            return self

    built = len(ScriptedEngine.built)
    caplog.set_level(logging.INFO, logger="worker")
    worker = Worker(reg, dataclasses.replace(FAST, burst=True), worker_id="w",
                    engine_factory=LoadingEngine)
    assert worker.work() == 0
    assert statuses_at_load == [[JobStatus.QUEUED] * 3]
    assert [service.get_job(reg, j.id).status for j in jobs] == [JobStatus.SUCCEEDED] * 3
    assert len(ScriptedEngine.built) - built == 1, "the jobs did not run on the models loaded ahead"
    assert "before the first claim" in caplog.text
    reg.close()


def test_a_load_ahead_that_fails_leaves_the_error_to_the_job(tmp_path, caplog):
    reg = Registry(data_dir=tmp_path / "data")
    job = _submit(reg, _spec(tmp_path, "clip.mp4"))

    def missing_weights(cfg, **components):
        raise FileNotFoundError("checkpoints/epoch_20.pth is missing")

    caplog.set_level(logging.INFO, logger="worker")
    worker = Worker(reg, dataclasses.replace(FAST, burst=True), worker_id="w",
                    engine_factory=missing_weights)
    assert worker.work() == 0
    assert "could not load the models ahead" in caplog.text
    failed = service.get_job(reg, job.id)
    assert failed.status == JobStatus.FAILED and "epoch_20.pth is missing" in failed.error
    reg.close()
