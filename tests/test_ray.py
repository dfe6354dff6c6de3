"""Scale-out: ``worker --gpus all`` (one worker per device, faked on the CPU with ``STUDIO_DEVICES``)
and the Ray executor on a local Ray instance whose "GPUs" are a custom resource, against a real
PostgreSQL server started by the tests (:mod:`tests.pg`, fixtures ``postgres``/``pg_url`` from
conftest), compared with the local worker.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from db import LOCAL, JobStatus, Registry, service
from db.models import Job
from tests.conftest import REPO
from worker.loop import wait_for

slow = pytest.mark.slow
FAKE_GPU = "fake_gpu"


# ============================================================================ fast: the registry hand-over


@pytest.fixture(params=["sqlite", "postgresql"])
def reg(request, tmp_path):
    """The registry on SQLite and on the tests' PostgreSQL server."""
    url = f"sqlite:///{tmp_path / 'studio.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    r = Registry(url=url, data_dir=tmp_path / "data")
    yield r
    r.close()


def _queue(reg: Registry, tmp_path: Path, n: int = 1) -> list[int]:
    ids = []
    for i in range(n):
        p = tmp_path / f"in{i}.mp4"
        p.write_bytes(b"not decoded here %d" % i)
        ids.append(service.submit_file(reg, p, {"landmarks": "mtcnn", "formats": ["npz"]}).id)
    return ids


def test_adopt_job_hands_over_counts_ray_retries_and_fences_the_lost_process(reg, tmp_path):
    [job_id, other_id] = _queue(reg, tmp_path, 2)
    driver = "ray-head-1"
    for wid in (f"{driver}/a-1-gpu0", f"{driver}/b-2-gpu1"):
        service.register_worker(reg, wid, hostname="h", pid=1, device="cuda:0")
    claim = service.claim_next(reg, driver, device="ray")
    assert claim.id == job_id

    first = service.adopt_job(reg, job_id, f"{driver}/a-1-gpu0", dispatcher=driver, device="cuda:0",
                              claimed_at=claim.started_at).job
    assert (first.worker_id, first.device, first.attempts, first.stage) == (f"{driver}/a-1-gpu0", "cuda:0", 1,
                                                                              "starting")
    again = service.adopt_job(reg, job_id, f"{driver}/a-1-gpu0", dispatcher=driver)
    assert again.job.attempts == 1, "re-adopting by the same process is not a retry"
    assert not again.retried and again.retried_from is None and again.note is None
    assert service.report_progress(reg, job_id, f"{driver}/a-1-gpu0", frames_done=4).owned

    # a-1 died; Ray retried the video on b-2: one more attempt, a-1 is fenced out.
    adoption = service.adopt_job(reg, job_id, f"{driver}/b-2-gpu1", dispatcher=driver, device="cuda:1")
    retried = adoption.job
    assert (retried.worker_id, retried.attempts) == (f"{driver}/b-2-gpu1", 2)
    assert retried.error.startswith(f"retried: {driver}/a-1-gpu0 was lost mid-job (attempt 1 of 3)")
    # The retry is data for the caller; the job's error keeps the words for the dashboard.
    assert adoption.retried and adoption.retried_from == f"{driver}/a-1-gpu0"
    assert adoption.note == f"{driver}/a-1-gpu0 was lost mid-job (attempt 1 of 3)"
    assert retried.error_code == "abandoned"
    readopted = service.adopt_job(reg, job_id, f"{driver}/b-2-gpu1", dispatcher=driver, device="cuda:1")
    assert readopted.job.error == retried.error and not readopted.retried, "the words are not parsed back"
    assert not service.report_progress(reg, job_id, f"{driver}/a-1-gpu0", frames_done=5).owned
    with pytest.raises(service.LostJob):
        from db.views import QualitySummary

        service.complete_job(reg, job_id, f"{driver}/a-1-gpu0", artifacts=[],
                             quality=QualitySummary(frames=1, valid_frames=1, reasons={}, longest_invalid_run=0))
    [busy] = [w for w in service.list_workers(reg) if w.worker_id == f"{driver}/b-2-gpu1"]
    assert (busy.status, busy.current_job_id) == ("busy", job_id)

    # Not this driver's job, not running, or a late retry of an older claim: nothing to adopt.
    assert service.adopt_job(reg, job_id, "ray-other-9/x-1-gpu0", dispatcher="ray-other-9") is None
    assert service.adopt_job(reg, other_id, f"{driver}/a-1-gpu0", dispatcher=driver) is None  # still queued
    older = claim.started_at - timedelta(seconds=5)
    assert service.adopt_job(reg, job_id, f"{driver}/z-9-gpu0", dispatcher=driver, claimed_at=older) is None
    assert service.get_job(reg, job_id).worker_id == f"{driver}/b-2-gpu1"

    # The last allowed attempt was lost too: the job fails instead of a 4th attempt.
    assert service.adopt_job(reg, job_id, f"{driver}/c-3-gpu0", dispatcher=driver).job.attempts == 3
    reg.state_dir(job_id).mkdir(parents=True)
    assert service.adopt_job(reg, job_id, f"{driver}/d-4-gpu0", dispatcher=driver) is None
    failed = service.get_job(reg, job_id)
    assert failed.status == JobStatus.FAILED and failed.error_code == "abandoned" and failed.attempts == 3
    assert failed.error.startswith("gave up after 3 attempts; last: ") and not reg.state_dir(job_id).exists()


def test_ray_options_and_pool_size():
    from worker.ray_executor import RayExecutorError, RayOptions, parse_resources, pool_size

    assert parse_resources('{"fake_gpu": 1}') == {"fake_gpu": 1.0} and parse_resources(None) == {}
    for bad in ("fake_gpu=1", "[1]", '{"a": "x"}'):
        with pytest.raises(ValueError, match="--resources"):
            parse_resources(bad)
    with pytest.raises(ValueError, match="positive"):
        RayOptions(resources={"fake_gpu": 0})
    with pytest.raises(ValueError, match="max_in_flight"):
        RayOptions(max_in_flight=0)

    eight_gpus = {"CPU": 64.0, "GPU": 8.0}
    assert pool_size(RayOptions(), eight_gpus) == 8
    assert pool_size(RayOptions(gpus_per_task=2, cpus_per_task=4), eight_gpus) == 4
    assert pool_size(RayOptions(cpus_per_task=16), eight_gpus) == 4  # CPUs run out first
    fake = RayOptions(gpus_per_task=0, resources={FAKE_GPU: 1})
    assert fake.demand() == {"CPU": 1.0, FAKE_GPU: 1.0} and pool_size(fake, {"CPU": 2.0, FAKE_GPU: 2.0}) == 2
    assert pool_size(RayOptions(max_in_flight=5), {"CPU": 1.0}) == 5  # more than fit: they wait for Ray
    with pytest.raises(RayExecutorError, match=r"GPU: needs 1, cluster has 0.*add GPU nodes"):
        pool_size(RayOptions(), {"CPU": 16.0})


def test_cli_rejects_mixed_device_options(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "engine", "worker", *args, "--data-dir", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    refused = [  # (options, what the refusal says)
        (("--executor", "ray", "--gpu", "0"), "the cluster picks the GPUs"),
        (("--executor", "ray", "--resources", "fake_gpu"), "expected a JSON object"),
        (("--gpus", "all", "--device", "cpu"), "--gpus starts its own workers on each device"),
        (("--gpus", "all", "--slot", "1"), "--slot"),
        (("--device", "cpu", "--per-gpu", "2"), "--per-gpu needs --gpus"),
        (("--gpus", "all", "--per-gpu", "0"), "--per-gpu: expected 'auto' or a whole number"),
        (("--executor", "ray", "--per-gpu", "2"), "the cluster picks the GPUs"),
    ]
    for options, message in refused:
        r = cli(*options)
        assert r.returncode == 2 and message in r.stderr, (options, r.stderr)


# ============================================================================ fast: --gpus all


def test_gpus_all_takes_each_device_once(tmp_path, monkeypatch):
    from worker.launch import gpu_devices, split_threads, worker_children

    monkeypatch.setenv("STUDIO_DEVICES", "cuda:0,cuda:1")
    assert gpu_devices("all") == ["cuda:0", "cuda:1"] and gpu_devices("1") == ["cuda:1"]
    with pytest.raises(ValueError, match="cuda:2 requested but the visible devices are cuda:0, cuda:1"):
        gpu_devices("0,2")
    with pytest.raises(ValueError, match="expected 'all' or GPU indices"):
        gpu_devices("first")

    data = tmp_path / "data"
    first, notes = worker_children(["cuda:0", "cuda:1", "cuda:1"], data, {}, ("--burst",), once=True, per_gpu=1)
    try:
        assert notes == [] and [c.name for c in first] == ["worker[cuda:0]", "worker[cuda:1]"]
        assert first[1].cmd[-10:] == ["worker", "--device", "cuda:1", "--data-dir", str(data),
                                      "--threads", str(split_threads(2)), "--decode-threads", "1", "--burst"]
        assert all(c.once and len(c.pass_fds) == 1 for c in first)
        second, notes = worker_children(["cuda:0", "cuda:1"], data, {}, per_gpu=1)
        assert second == [] and notes == [f"a worker already serves {d} for {data}: not starting another"
                                           for d in ("cuda:0", "cuda:1")]
    finally:
        for c in first:
            os.close(c.pass_fds[0])
    again, _ = worker_children(["cuda:0"], data, {}, per_gpu=1)  # the locks died with their holder
    assert len(again) == 1
    os.close(again[0].pass_fds[0])


def test_per_gpu_starts_k_slots_per_device_each_under_its_own_lock(tmp_path, monkeypatch):
    """``--per-gpu 2``: two children per device, each with its own slot lock, ``--slot`` (its id's ``#slot``)
    and a share of the cores over all four; a second launch with the same K starts none, one with K=3 only
    slot 2; one with K=1 finds slot 0 served."""
    from worker import launch

    monkeypatch.setattr(launch, "usable_cores", lambda: 32)
    data = tmp_path / "data"
    first, notes = launch.worker_children(["cuda:0", "cuda:1"], data, {}, ("--burst",), once=True, per_gpu=2)
    try:
        assert notes == [] and [c.name for c in first] == [
            "worker[cuda:0 #0]", "worker[cuda:0 #1]", "worker[cuda:1 #0]", "worker[cuda:1 #1]"]
        assert first[1].cmd[-12:] == ["worker", "--device", "cuda:0", "--data-dir", str(data), "--threads", "8",
                                      "--slot", "1", "--decode-threads", "1", "--burst"]
        assert all(c.env["OMP_NUM_THREADS"] == "8" for c in first)
        assert sorted(p.name for p in (data / "locks").iterdir()) == [
            "worker-cuda0-1.lock", "worker-cuda0.lock", "worker-cuda1-1.lock", "worker-cuda1.lock"]
        again, notes = launch.worker_children(["cuda:0", "cuda:1"], data, {}, per_gpu=2)
        assert again == [] and notes == [f"a worker already serves {d} #{s} for {data}: not starting another"
                                         for d in ("cuda:0", "cuda:1") for s in (0, 1)]
        more, notes = launch.worker_children(["cuda:1"], data, {}, per_gpu=3)
        assert [c.name for c in more] == ["worker[cuda:1 #2]"] and len(notes) == 2
        assert more[0].cmd[more[0].cmd.index("--threads") + 1] == str(launch.split_threads(3, 32))
        os.close(more[0].pass_fds[0])
        single, notes = launch.worker_children(["cuda:0"], data, {}, per_gpu=1)  # a lone worker: the jobs' setting
        assert single == [] and notes == [f"a worker already serves cuda:0 for {data}: not starting another"]
    finally:
        for c in first:
            os.close(c.pass_fds[0])
    with pytest.raises(ValueError, match="--per-gpu"):
        launch.worker_children(["cuda:0"], data, {}, per_gpu=0)


def test_several_workers_per_gpu_without_cuda_mps_are_warned_about(tmp_path, caplog):
    from worker import launch

    pipes = tmp_path / "mps"
    pipes.mkdir()
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipes)}
    caplog.set_level(logging.WARNING, logger="worker.launch")
    for devices, per_gpu, control, warned in ((["cuda:0"], 2, False, True), (["cuda:0"], 2, True, False),
                                               (["cuda:0"], 1, False, False), (["cpu"], 2, False, False)):
        (pipes / "control").unlink(missing_ok=True)
        if control:
            (pipes / "control").touch()  # the daemon's pipe, as a path check sees it
        caplog.clear()
        children, _ = launch.worker_children(devices, tmp_path / "data", env, per_gpu=per_gpu)
        for c in children:
            os.close(c.pass_fds[0])
        assert (f"without CUDA MPS (no control pipe in {pipes})" in caplog.text) == warned, (
            devices, per_gpu, control, caplog.text)


def test_workers_are_pinned_to_disjoint_core_shares(tmp_path, monkeypatch):
    """Two workers on one device get halves of the CPUs, and a started child really runs on its share
    (so FFmpeg's and the engine's CPU counts follow it); ``STUDIO_PIN_CORES=0`` turns pinning off."""
    import subprocess

    from worker import launch

    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(8)))
    children, _ = launch.worker_children(["cuda:0"], tmp_path / "data", {}, per_gpu=2)
    try:
        assert [c.cores for c in children] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    finally:
        for c in children:
            os.close(c.pass_fds[0])
    monkeypatch.setenv("STUDIO_PIN_CORES", "0")
    assert launch.split_cores(2) == [(), ()]
    monkeypatch.undo()

    cpu = min(os.sched_getaffinity(0))
    child = launch.Child("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ),
                         cores=(cpu,))
    child.start()
    try:
        assert os.sched_getaffinity(child.proc.pid) == {cpu}
    finally:
        child.proc.kill()
        child.proc.wait(timeout=30)
    assert isinstance(child.proc, subprocess.Popen)


def test_per_gpu_auto_gives_a_gpu_one_worker_per_four_cores_of_its_share(tmp_path, monkeypatch):
    """``auto`` (the default): 16 cores and one GPU → 4 workers; 16 cores and 2 GPUs → 2 each; CPU devices → 1."""
    from worker import launch

    monkeypatch.setattr(launch, "usable_cores", lambda: 16)
    asked = []
    monkeypatch.setattr(launch, "smallest_gpu_gib", lambda devices: asked.append(devices) or 139.8)  # an H200
    one, _ = launch.worker_children(["cuda:0"], tmp_path / "a", {})
    two, _ = launch.worker_children(["cuda:0", "cuda:1"], tmp_path / "b", {})
    cpu, _ = launch.worker_children(["cpu"], tmp_path / "c", {})
    monkeypatch.setattr(launch, "smallest_gpu_gib", lambda devices: 23.6)  # a 24 GB card: 3 processes fit
    small, _ = launch.worker_children(["cuda:0"], tmp_path / "d", {})
    try:
        assert [c.name for c in one] == [f"worker[cuda:0 #{s}]" for s in range(4)]
        assert [c.name for c in two] == [f"worker[cuda:{d} #{s}]" for d in (0, 1) for s in (0, 1)]
        assert [c.name for c in cpu] == ["worker[cpu]"]
        assert {c.cmd[c.cmd.index("--threads") + 1] for c in one + two} == {"4"}
        assert [c.name for c in small] == [f"worker[cuda:0 #{s}]" for s in range(3)]
        assert asked[:2] == [["cuda:0"], ["cuda:0", "cuda:1"]]
    finally:
        for c in one + two + cpu + small:
            os.close(c.pass_fds[0])


def test_the_gpus_memory_is_asked_of_a_child_interpreter(monkeypatch):
    from worker import launch

    assert launch.smallest_gpu_gib(["cpu"]) is None  # no child for CPU devices
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="23.64\n", stderr="")

    monkeypatch.setattr(launch.subprocess, "run", run)
    assert launch.smallest_gpu_gib(["cuda:0", "cuda:3"]) == pytest.approx(23.64)
    assert calls[0][0] == sys.executable and calls[0][-2:] == ["0", "3"]


def test_per_gpu_default_is_the_constant_or_the_environment(monkeypatch):
    from worker import launch

    assert launch.default_per_gpu({}) == launch.DEFAULT_PER_GPU == "auto"
    assert launch.default_per_gpu({launch.PER_GPU_ENV: "auto"}) == "auto"
    assert launch.default_per_gpu({launch.PER_GPU_ENV: "3"}) == 3
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ValueError, match=r"\$STUDIO_PER_GPU"):
            launch.default_per_gpu({launch.PER_GPU_ENV: bad})
    assert launch.split_threads(2 * 3, 32) == 5 and launch.split_threads(2 * 8, 8) == 1


def test_make_run_launcher_takes_per_gpu_from_its_option_or_the_environment(tmp_path, monkeypatch, capsys):
    """``python -m worker.launch --per-gpu K`` (``make run PER_GPU=K``) builds K workers per device; a bad
    count (option or ``$STUDIO_PER_GPU``) is refused before anything starts."""
    import argparse

    from worker import launch

    args = argparse.Namespace(data_dir=str(tmp_path / "data"), db_url=None, devices="cpu:0,cpu:1", per_gpu=2,
                              no_dashboard=True)
    children, notes = launch.build_children(args)
    try:
        assert notes == [] and [c.name for c in children] == [
            "worker[cpu:0 #0]", "worker[cpu:0 #1]", "worker[cpu:1 #0]", "worker[cpu:1 #1]"]
    finally:
        for c in children:
            os.close(c.pass_fds[0])
    assert launch.main(["--no-dashboard", "--devices", "cpu", "--per-gpu", "0"]) == 2
    monkeypatch.setenv(launch.PER_GPU_ENV, "many")
    assert launch.main(["--no-dashboard", "--devices", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--per-gpu: expected 'auto' or a whole number" in err and "$STUDIO_PER_GPU: expected" in err


def test_gpus_per_gpu_starts_k_worker_processes_per_device_and_a_second_launch_only_free_slots(tmp_path):
    """Real processes: ``--gpus all --per-gpu 2`` on one (CPU) device registers two workers whose ids end in
    ``#0`` / ``#1``; the same launch again starts nothing and says which slots are served; ``--per-gpu 3``
    starts only slot 2."""
    data = tmp_path / "data"
    env = {**os.environ, "STUDIO_DEVICES": "cpu:0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "engine", "worker", "--gpus", "all", "--data-dir", str(data), "--poll", "0.2"]
    first = subprocess.Popen([*base, "--per-gpu", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    reg = Registry(data_dir=data)
    try:
        assert wait_for(lambda: sum(w.alive for w in service.list_workers(reg)) == 2, 120, 0.2)
        ids = sorted(w.worker_id for w in service.list_workers(reg))
        assert [i.rsplit("-", 1)[-1] for i in ids] == ["cpu0#0", "cpu0#1"], ids
        assert {w.device for w in service.list_workers(reg)} == {"cpu:0"}
        assert len({w.pid for w in service.list_workers(reg)}) == 2  # two processes
        second = subprocess.run([*base, "--per-gpu", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 0, second.stderr
        assert second.stdout.splitlines() == [
            f"a worker already serves cpu:0 #0 for {data.resolve()}: not starting another",
            f"a worker already serves cpu:0 #1 for {data.resolve()}: not starting another",
            "nothing to start",
        ]
        third = subprocess.run([*base, "--per-gpu", "3", "--burst"], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=120)
        assert third.returncode == 0, third.stderr
        assert "not starting another" in third.stdout and "worker[cpu:0 #2] finished" in third.stderr
        assert any(w.worker_id.endswith("cpu0#2") and w.status == "stopped" for w in service.list_workers(reg))
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
        reg_workers = service.list_workers(reg)
        reg.close()
    assert first.returncode == 0, out[-3000:]
    assert sorted(w.status for w in reg_workers) == ["stopped"] * 3 and "Traceback" not in out


# ============================================================================ slow: real engine, processes


def _settings(checkpoint: Path, **kw) -> dict:
    return {"landmarks": "mtcnn", "checkpoint": str(checkpoint), "formats": ["npz"], "batch_size": 4,
            "num_threads": 1, **kw}


@pytest.fixture(scope="module")
def clips(tmp_path_factory, test_video) -> dict[str, Path]:
    """Clips cut from the shared video at 256×256: ``tiny`` (2 frames), ``short`` (4), ``noface`` (4), and
    ``long`` (80: the first 40 frames forth and back, long enough to be killed or stopped mid-video)."""

    from tests.media import first_frames, make_solid_video, make_video

    folder = tmp_path_factory.mktemp("clips")
    frames = first_frames(test_video, 40, size=(256, 256))
    return {
        "tiny": make_video(folder / "tiny.mp4", frames[:2]),
        "short": make_video(folder / "short.mp4", frames[:4]),
        "long": make_video(folder / "long.mp4", frames + frames[::-1]),
        "noface": make_solid_video(folder / "wall.mp4", frames=4, size=(128, 128)),
    }


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _run_logged(cmd: list[str], log_path: Path, env: dict, timeout: float) -> tuple[int, str]:
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, log_path.read_text()


def _coeffs(reg: Registry, job_id: int) -> np.ndarray:
    [art] = service.list_artifacts(reg, job_id)
    with np.load(art.path) as z:
        return z["coeff"].copy()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def local_results(tmp_path_factory, recon_checkpoint, clips) -> dict[str, np.ndarray]:
    """Coefficients of every face clip from the local worker (``python -m engine worker --burst --device cpu``)."""
    folder = tmp_path_factory.mktemp("local")
    reg = Registry(data_dir=folder / "data")
    ids = {n: service.submit_file(reg, clips[n], _settings(recon_checkpoint)).id for n in ("tiny", "short", "long")}
    code, text = _run_logged([sys.executable, "-m", "engine", "worker", "--device", "cpu", "--burst",
                              "--data-dir", str(folder / "data")], folder / "local.log", _env(), 300)
    assert code == 0, text[-3000:]
    out = {n: _coeffs(reg, i) for n, i in ids.items()}
    reg.close()
    return out


@slow
def test_gpus_all_runs_one_worker_per_device_and_a_second_start_runs_none(tmp_path, recon_checkpoint, clips):
    """Two devices, two workers; a second start finds both devices served. The jobs are submitted
    only after the second start, so that the first start's workers are certainly still there."""
    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    env = _env(STUDIO_DEVICES="cpu:0,cpu:1")
    base = [sys.executable, "-m", "engine", "worker", "--gpus", "all", "--data-dir", str(data)]
    first = subprocess.Popen([*base, "--poll", "0.2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: len(service.list_workers(reg)) == 2, 300, 0.2)
        second = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr
        assert second.stdout.splitlines() == [
            f"a worker already serves cpu:0 for {data.resolve()}: not starting another",
            f"a worker already serves cpu:1 for {data.resolve()}: not starting another",
            "nothing to start",
        ]
        ids = [service.submit_file(reg, clips["tiny"], _settings(recon_checkpoint)).id for _ in range(6)]
        assert wait_for(lambda: all(service.get_job(reg, i).status.finished for i in ids), 300, 0.2)
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=60)
    assert first.returncode == 0, out[-3000:]
    jobs = [service.get_job(reg, i) for i in ids]
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED] * 6, [j.error for j in jobs]
    assert all(j.attempts == 1 and len(service.list_artifacts(reg, j.id)) == 1 for j in jobs)
    workers = service.list_workers(reg)
    assert sorted(w.device for w in workers) == ["cpu:0", "cpu:1"]
    assert all(w.status == "stopped" for w in workers)
    assert sum(w.jobs_done for w in workers) == 6
    assert {j.device for j in jobs} <= {"cpu:0", "cpu:1"}
    assert out.count("stop requested: exiting") == 2 and "Traceback" not in out, out[-3000:]


# ---------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance: 2 CPUs and 2 ``fake_gpu`` resources standing in for GPUs; yields its address."""
    ray = pytest.importorskip("ray", reason="the Ray executor tests need Ray: pip install -r requirements-ray.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")  # offline: don't try to report usage
        ctx = ray.init(num_cpus=2, resources={FAKE_GPU: 2}, include_dashboard=False, log_to_driver=False,
                       configure_logging=False)
        try:
            yield ctx.address_info["gcs_address"]
        finally:
            ray.shutdown()


def _driver_cmd(address: str, pg: str, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine", "worker", "--executor", "ray", "--address", address,
            "--gpus-per-task", "0", "--resources", f'{{"{FAKE_GPU}": 1}}', "--db-url", pg, "--data-dir", str(data),
            "--poll", "0.2", "--heartbeat", "0.5", *extra]


@slow
def test_ray_batch_on_postgresql_matches_the_local_worker(tmp_path, pg_url, ray_cluster, recon_checkpoint, clips,
                                                         local_results):
    data = tmp_path / "data"
    reg = Registry(url=pg_url, data_dir=data)
    names = ["tiny", "short", "noface", "tiny"]
    ids = [service.submit_file(reg, clips[n], _settings(recon_checkpoint)).id for n in names]
    code, text = _run_logged(_driver_cmd(ray_cluster, pg_url, data, "--burst"), tmp_path / "driver.log", _env(),
                             240)
    assert code == 0, text[-4000:]

    jobs = [service.get_job(reg, i) for i in ids]
    for name, job in zip(names, jobs, strict=True):
        if name == "noface":  # an ordinary failure: recorded once, never retried by Ray
            assert job.status == JobStatus.FAILED and job.error_code == "no_face" and job.attempts == 1, job
            continue
        assert job.status == JobStatus.SUCCEEDED and job.attempts == 1, (job.status, job.error)
        np.testing.assert_array_equal(_coeffs(reg, job.id), local_results[name])
        assert _files(reg.result_dir(job.id)) == [f"{name}.npz"] and _files(reg.state_dir(job.id)) == []

    drivers = [w for w in service.list_workers(reg) if w.device == "ray"]
    gpu_workers = [w for w in service.list_workers(reg) if w.device != "ray"]
    assert len(drivers) == 1 and len(gpu_workers) == 2, service.list_workers(reg)
    driver = drivers[0].worker_id
    assert all(w.worker_id.startswith(f"{driver}/") and w.device == "cpu" for w in gpu_workers)
    assert all(j.worker_id in {w.worker_id for w in gpu_workers} for j in jobs)
    assert sum(w.jobs_done for w in gpu_workers) == 3 and sum(w.jobs_failed for w in gpu_workers) == 1
    assert all(w.status == "stopped" for w in service.list_workers(reg))
    assert "queue empty: exiting (burst mode)" in text and "Traceback" not in text
    reg.close()


@slow
def test_killing_a_ray_worker_mid_video_retries_it_and_finishes_once(tmp_path, pg_url, ray_cluster,
                                                                     recon_checkpoint, clips, local_results):
    data = tmp_path / "data"
    reg = Registry(url=pg_url, data_dir=data)
    job_id = service.submit_file(reg, clips["long"], _settings(recon_checkpoint, batch_size=2)).id
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(_driver_cmd(ray_cluster, pg_url, data, "--burst", "--max-in-flight", "1"),
                                  cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            started = wait_for(lambda: service.get_job(reg, job_id).frames_done >= 8, 180, 0.05)
            assert started, log_path.read_text()[-4000:]
            victim = service.get_job(reg, job_id).worker_id
            [row] = [w for w in service.list_workers(reg) if w.worker_id == victim]
            os.kill(row.pid, signal.SIGKILL)  # the Ray worker process running the video
            killed_at = service.get_job(reg, job_id).frames_done
            assert driver.wait(240) == 0, log_path.read_text()[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(30)
    text = log_path.read_text()

    job = service.get_job(reg, job_id)
    assert job.status == JobStatus.SUCCEEDED, (job.error, text[-4000:])
    assert killed_at < 80 and job.attempts == 2 and job.error is None
    assert job.worker_id != victim and job.worker_id.split("/")[0] == victim.split("/")[0]
    with reg.session() as s:
        report = s.get(Job, job_id).report
    assert report["resumed_from"] >= 8, f"restarted from frame {report['resumed_from']}, not resumed"
    assert [a.format for a in service.list_artifacts(reg, job_id)] == ["npz"]
    assert _files(reg.result_dir(job_id)) == ["long.npz"] and _files(reg.state_dir(job_id)) == []
    np.testing.assert_array_equal(_coeffs(reg, job_id), local_results["long"])
    assert text.count(f"worker.ray: job {job_id}: succeeded") == 1, "the video finished more than once"
    assert "queue empty: exiting (burst mode)" in text
    reg.close()


@slow
def test_ray_jobs_cancel_from_the_registry_and_sigterm_requeues(tmp_path, pg_url, ray_cluster, recon_checkpoint,
                                                                clips):
    data = tmp_path / "data"
    reg = Registry(url=pg_url, data_dir=data)
    first, second = (service.submit_file(reg, clips["long"], _settings(recon_checkpoint, batch_size=2)).id
                     for _ in range(2))
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(_driver_cmd(ray_cluster, pg_url, data, "--max-in-flight", "1"), cwd=REPO,
                                  env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_for(lambda: service.get_job(reg, first).frames_done >= 4, 180, 0.05), log_path.read_text()
            service.cancel_job(reg, first, actor=LOCAL)  # what the dashboard's cancel button does
            assert wait_for(lambda: service.get_job(reg, first).status == JobStatus.CANCELLED, 120, 0.05)
            assert _files(reg.result_dir(first)) == [] and _files(reg.state_dir(first)) == []

            assert wait_for(lambda: service.get_job(reg, second).frames_done >= 4, 60, 0.05), log_path.read_text()
            driver.send_signal(signal.SIGTERM)  # warm shutdown: the batch finishes, the job goes back
            assert driver.wait(60) == 0, log_path.read_text()[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(30)
    back = service.get_job(reg, second)
    assert back.status == JobStatus.QUEUED and back.attempts == 0 and back.worker_id is None, back
    assert (reg.state_dir(second) / "state.json").exists(), "SIGTERM must keep the state to resume"
    assert all(w.status == "stopped" for w in service.list_workers(reg))
    assert "SIGTERM received" in log_path.read_text()
    reg.close()
