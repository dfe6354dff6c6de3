"""bench/dataset.py on the CPU at toy sizes: real clips, real SQLite registries, real
``python -m engine submit`` and burst ``python -m engine worker`` processes.

Timings are printed, never asserted (docs/development.md): the tests check that the table has its
rows and that every job of every registry the bench made finished ``succeeded``.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
dataset = pytest.importorskip("bench.dataset")

W, H, FRAMES, CLIPS = 256, 144, 6, 2


def _run(tmp_path: Path, test_video: Path, *extra: str) -> tuple[int, str]:
    out = tmp_path / "dataset.md"
    code = dataset.main(["--device", "cpu", "--clips", str(CLIPS), "--frames", str(FRAMES), "--width", str(W),
                         "--height", str(H), "--clip", str(test_video), "--gen-jobs", "1",
                         "--workdir", str(tmp_path / "work"), "--out", str(out), *extra])
    return code, out.read_text(encoding="utf-8")


def _registries(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "work").glob("runs-*/*") if p.is_dir())


def _assert_every_job_succeeded(data: Path) -> None:
    from db import JobStatus

    jobs = dataset.read_jobs(data)
    assert len(jobs) == CLIPS, data
    for job in jobs:
        assert job.status == JobStatus.SUCCEEDED, (data, job.error)
        assert job.frames_done == FRAMES
        assert job.started_at is not None and job.finished_at is not None and job.started_at <= job.finished_at
    assert len({job.video_id for job in jobs}) == CLIPS  # distinct clips, not one file stored twice


def _row(text: str, path: str, workers: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {path} | {workers}")]
    assert len(rows) == 1, text
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_one_worker_per_mode_every_job_succeeds(tmp_path, test_video, monkeypatch):
    monkeypatch.delenv("STUDIO_DEVICES", raising=False)
    code, text = _run(tmp_path, test_video, "--mode", "exact", "fast", "--landmarks", "mtcnn")
    assert code == 0, text
    assert "- command: `python " in text and "- devices: cpu" in text and "RANDOM Deep3D checkpoint" in text
    assert "- workers: 1 worker process(es) per device (`--per-gpu 1`)" in text
    for mode in ("exact", "fast"):
        cells = _row(text, f"{mode}, mtcnn", "1 device × 1 (cpu, --per-gpu 1)")
        assert cells[2] == f"{CLIPS}/{CLIPS}" and cells[3] == str(CLIPS * FRAMES)
        assert float(cells[7].strip("*")) > 0 and cells[9] == "n/a" and cells[11].startswith("cpu ")
        assert re.fullmatch(r"host \d+\.\d of \d+; workers \d+\.\d–\d+\.\d", cells[10]), cells[10]
        busy_fps, busy_s = cells[8].rstrip(")").split(" (")  # one worker: busy from its first to its last job
        assert float(busy_fps) > 0 and float(busy_s) > 0
        skipped = _row(text, f"{mode}, mtcnn", "all GPUs")
        assert "skipped: no GPUs" in skipped[-1]
    registries = _registries(tmp_path)
    assert [p.name for p in registries] == ["exact-mtcnn-one", "fast-mtcnn-one"]  # a fresh registry per run
    for data in registries:
        _assert_every_job_succeeded(data)


def test_every_device_run_uses_gpus_all_on_a_fresh_registry(tmp_path, test_video, monkeypatch):
    """Both runs go through the launcher with ``--per-gpu 2``: two worker processes on the one device, then
    two on each of the two (CPU) devices; peak RSS is listed per worker process, by device and slot."""
    monkeypatch.setenv("STUDIO_DEVICES", "cpu:0,cpu:1")  # worker.launch: these devices instead of the GPUs
    code, text = _run(tmp_path, test_video, "--mode", "fast", "--landmarks", "mtcnn", "--threads", "1",
                      "--per-gpu", "2")
    assert code == 0, text
    assert "- workers: 2 worker process(es) per device (`--per-gpu 2`)" in text
    one = _row(text, "fast, mtcnn", "1 device × 2 (cpu, --per-gpu 2)")
    assert one[2] == f"{CLIPS}/{CLIPS}" and one[11].startswith("cpu #")  # peak RSS of the launcher's children
    cells = _row(text, "fast, mtcnn", "every device × 2 (--gpus all --per-gpu 2)")
    assert cells[2] == f"{CLIPS}/{CLIPS}" and re.match(r"\d+\.\d\d×", cells[12])
    assert "cpu:0 #" in cells[11] or "cpu:1 #" in cells[11]
    registries = _registries(tmp_path)
    assert [p.name for p in registries] == ["fast-mtcnn-all", "fast-mtcnn-one"]
    for data in registries:
        _assert_every_job_succeeded(data)


def test_all_only_runs_the_every_device_half_alone(tmp_path, test_video, monkeypatch):
    """``--all-only``: the other half of a ``--single-only`` call, for a set whose two runs do not fit
    one call; refused at once where there is no all-device run."""
    monkeypatch.delenv("STUDIO_DEVICES", raising=False)
    assert dataset.main(["--device", "cpu", "--all-only", "--workdir", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()  # refused before any clip was written
    monkeypatch.setenv("STUDIO_DEVICES", "cpu:0,cpu:1")
    code, text = _run(tmp_path, test_video, "--mode", "fast", "--landmarks", "mtcnn", "--threads", "1",
                      "--per-gpu", "1", "--all-only")
    assert code == 0, text
    assert "skipped (--all-only)" in _row(text, "fast, mtcnn", "1 GPU")[-1]
    cells = _row(text, "fast, mtcnn", "every device × 1 (--gpus all --per-gpu 1)")
    assert cells[2] == f"{CLIPS}/{CLIPS}" and cells[12] == "–"  # no one-device run to divide by
    [data] = _registries(tmp_path)
    assert data.name == "fast-mtcnn-all"
    _assert_every_job_succeeded(data)


def test_random_s3fd_finds_the_fixed_box_in_the_workers(tmp_path, test_video, monkeypatch):
    """Random S3FD weights find no face: without the worker-side FixedBox every fast-path job would
    fail with "no face found"."""
    monkeypatch.delenv("STUDIO_DEVICES", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-empty"))  # no real FAN files: random ones are made
    code, text = _run(tmp_path, test_video, "--mode", "fast", "--landmarks", "fan")
    assert code == 0, text
    assert "RANDOM S3FD/2D-FAN-4" in text and "FixedBox" in text
    for data in _registries(tmp_path):
        _assert_every_job_succeeded(data)


def test_install_fixed_box_wraps_only_the_fan_detector():
    from bench.throughput import FixedBox
    from engine.config import EngineConfig

    @dataclasses.dataclass
    class FakeEngine:
        config: EngineConfig

        def detector_for(self, landmarker):
            return landmarker

    dataset.install_fixed_box(FakeEngine, "1,2,3,4,0.9")
    fan = FakeEngine(EngineConfig(landmarks="fan")).detector_for("s3fd")
    assert isinstance(fan, FixedBox) and fan.inner == "s3fd" and np.allclose(fan.box, [1, 2, 3, 4, 0.9])
    assert FakeEngine(EngineConfig(landmarks="fan")).detector_for(None) is None
    assert FakeEngine(EngineConfig(landmarks="mtcnn")).detector_for("mtcnn") == "mtcnn"
    assert FakeEngine(EngineConfig(landmarks="fan")).detector_for(fan) is fan  # never wrapped twice


def test_clips_differ_in_start_frame_and_drift():
    from bench.throughput import MediaSpec

    base = MediaSpec(W, H, 25)
    specs = [dataset.clip_spec(base, k) for k in range(200)]
    assert len({(s.drift_period_s, s.drift_frac) for s in specs}) == 200
    for s in specs:  # the face never leaves the canvas
        for t in np.linspace(0, 20, 81):
            x, y = s.face_origin(float(t))
            assert x >= 0 and y >= 0 and x + s.face_size <= W and y + s.face_size <= H
    assert len({dataset.clip_start(k, 100) for k in range(198)}) == 198
    assert dataset.worker_label(["python", "-m", "engine", "worker", "--device", "cpu:1"]) == "cpu:1"
    assert dataset.worker_label(["python", "-m", "engine", "worker", "--device", "cpu:1", "--slot", "3"]) == "cpu:1 #3"
    assert dataset.worker_label(["python", "-m", "engine", "worker", "--gpus", "0", "--per-gpu", "2"]) is None
    assert dataset.parse_box("1,2,3,4,0.5").tolist() == [1, 2, 3, 4, 0.5]
    with pytest.raises(ValueError):
        dataset.parse_box("1,2,3")


def test_the_all_busy_window_leaves_out_start_up_and_tail():
    """Worker a starts at t=0, worker b only at t=4 (its models were slower to load); a runs out
    of work at t=10, b at t=12. Every worker is busy from 4 to 10: the rate counts the frames
    done in that window only."""
    t0 = datetime(2026, 1, 1)

    def job(worker, start, end, frames):
        return dataclasses.make_dataclass("J", ["worker_id", "started_at", "finished_at", "frames_total"])(
            worker, t0 + timedelta(seconds=start), t0 + timedelta(seconds=end), frames)

    jobs = [job("a", 0, 5, 500), job("a", 5, 10, 500), job("b", 4, 8, 400), job("b", 8, 12, 400),
            job("c", 0, 1, None)]  # a job without frames is left out
    rate, seconds = dataset.all_busy_rate(jobs)
    assert seconds == 6.0
    assert rate == pytest.approx((100 * 1 + 500 + 400 + 400 * 2 / 4) / 6)  # a: 1 s of job 1 + job 2; b: 4 + 2 s
    assert np.isnan(dataset.all_busy_rate([job("a", 0, 5, 10), job("b", 6, 8, 10)])[0])  # never both busy
    assert np.isnan(dataset.all_busy_rate([])[0])


def test_the_timeline_shows_each_workers_start_and_end_from_the_launch():
    """Naive registry times are UTC: worker b's first job starts 4 s after the launch at t0."""
    t0 = datetime(2026, 1, 1)
    J = dataclasses.make_dataclass("J", ["worker_id", "started_at", "finished_at", "frames_total"])
    jobs = [J("a", t0 + timedelta(seconds=2), t0 + timedelta(seconds=5), 100),
            J("b", t0 + timedelta(seconds=4), t0 + timedelta(seconds=9), 50),
            J("a", t0 + timedelta(seconds=5), t0 + timedelta(seconds=7), 100)]
    launch = t0.replace(tzinfo=timezone.utc).timestamp()
    lines = dataset.worker_timeline(jobs, launch).splitlines()
    assert lines == ["a: +2.0 → +7.0 s, 2 jobs, 200 frames", "b: +4.0 → +9.0 s, 1 jobs, 50 frames",
                     "first starts +2.0 … +4.0 s, last ends +7.0 … +9.0 s after the launcher started"]
    assert dataset.worker_timeline([], launch) == ""


def test_the_profile_waits_for_the_first_claimed_job_or_the_workers_exit(tmp_path, test_video):
    """``--spy`` starts sampling at the first job claimed (a real registry, a real child process)."""
    import subprocess
    import sys
    import threading
    import time

    from db import Registry, service

    data = tmp_path / "data"
    reg = Registry(data_dir=data)
    try:
        service.submit_file(reg, test_video, {"landmarks": "mtcnn"}, copy=False)
        idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            waiting = threading.Thread(target=dataset.wait_first_claim, args=(data, idle, 600.0, 0.05))
            waiting.start()
            time.sleep(0.5)
            assert waiting.is_alive()  # queued, not claimed: still waiting
            assert service.claim_next(reg, "worker-test", device="cpu") is not None
            waiting.join(300)
            assert not waiting.is_alive()
        finally:
            idle.kill()
            idle.wait()
    finally:
        reg.close()
    other = tmp_path / "other"
    Registry(data_dir=other).close()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dataset.wait_first_claim(other, gone, 60.0, 0.05)  # returns at once: the workers have exited


@pytest.mark.parametrize("switch", ["1", ""])
def test_the_worker_shim_patches_only_when_asked(tmp_path, switch, monkeypatch):
    """A child process started with the bench's environment: facenet's per-level loop stands in
    for ``pnet_candidates`` with ``STUDIO_BENCH_FACENET_LEVELS=1``, a landmark thread per input
    with ``STUDIO_BENCH_THREAD_PER_INPUT=1``, no models loaded before the first claim with
    ``STUDIO_BENCH_NO_LOAD_AHEAD=1``, claims ahead down to the last job with
    ``STUDIO_BENCH_CLAIM_TO_THE_END=1``, the exact MTCNN's own stream with
    ``STUDIO_BENCH_MTCNN_STREAM=1`` (on a CPU it still detects), 64 M pixels a detector call with
    ``STUDIO_BENCH_MTCNN_MAX_PIXELS=64000000``, the exact path's RGB made on the host (its source's
    ``rgb_device`` None) with ``STUDIO_BENCH_RGB_ON_HOST=1``, the fast path's made on the GPU with
    ``STUDIO_BENCH_FAST_RGB_ON_GPU=1``; nothing changes without."""
    import subprocess
    import sys

    monkeypatch.setenv(dataset.LEVELS_ENV, switch)
    monkeypatch.setenv(dataset.THREADS_ENV, switch)
    monkeypatch.setenv(dataset.LOAD_ENV, switch)
    monkeypatch.setenv(dataset.TAIL_ENV, switch)
    monkeypatch.setenv(dataset.STREAM_ENV, switch)
    monkeypatch.setenv(dataset.MAX_PIXELS_ENV, "64000000" if switch else "")
    monkeypatch.setenv(dataset.RGB_ENV, switch)
    monkeypatch.setenv(dataset.FAST_RGB_ENV, switch)
    env = dataset.child_env(None, tmp_path, None)
    assert env["PYTHONPATH"].split(":")[0] == str(dataset.SHIM_DIR)
    code = ("from engine.landmarks import mtcnn_gpu; from bench.gpu_checks import facenet_first_stage; "
            "from engine.many import _Models; from engine import Engine, EngineConfig; from worker.loop import Worker\n"
            "models = _Models(Engine(EngineConfig(device='cpu')), merge=False)\n"
            "with models.landmark_thread() as a: pass\n"
            "with models.landmark_thread() as b: pass\n"
            "models.close()\n"
            "from pathlib import Path; from db import Registry, service\n"  # one job queued, one other worker
            "reg = Registry(data_dir='data'); Path('clip.mp4').write_bytes(b'x')\n"
            "service.register_worker(reg, 'other', hostname='h', pid=1, device='cpu')\n"
            "service.submit_file(reg, Path('clip.mp4'), {'landmarks': 'mtcnn'})\n"
            "left = service.claim_next(reg, 'w', device='cpu', ahead=True) is None\n"
            "import numpy as np; from engine.landmarks.mtcnn import MtcnnLandmarker\n"
            "from engine.structures import FrameBatch\n"
            "mt = MtcnnLandmarker(device='cpu'); tiny = np.zeros((1, 16, 16, 3), np.uint8)\n"
            "found = mt.detect(FrameBatch(images=tiny, index=np.zeros(1, np.int64), timestamps=np.zeros(1)))\n"
            "print(mtcnn_gpu.pnet_candidates is facenet_first_stage, a is b, Worker._load_ahead.__name__, left,\n"
            "      MtcnnLandmarker.detect.__name__, found.num_frames, len(found), mt.max_pixels)\n"
            "from engine.fast import default_source\n"
            "print(default_source(EngineConfig(device='cuda:1', landmarks='mtcnn'), 'cuda:1').rgb_device,\n"
            "      default_source(EngineConfig(device='cpu', landmarks='mtcnn'), 'cpu').rgb_device,\n"
            "      default_source(EngineConfig(mode='fast', device='cuda:1'), 'cuda:1').rgb_device)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["True", "False", "<lambda>", "False", "on_own_stream", "1", "0", "64000000",
                                   "None", "None", "cuda:1"] if switch == "1" else
                                  ["False", "True", "_load_ahead", "True", "detect", "1", "0", "16000000",
                                   "cuda:1", "None", "None"])


def test_the_shim_records_each_threads_cpu_time_when_asked(tmp_path, monkeypatch):
    """``STUDIO_BENCH_THREAD_CPU``: a worker-like child process (``--device`` in its arguments) with a
    named thread that burns CPU; ``thread_cpu_table`` finds that thread's role with most of the time.
    Without the variable the child starts no sampling thread."""
    import subprocess
    import sys

    code = ("import json, os, threading, time\n"
            f"record = os.path.join(os.environ[{dataset.THREAD_CPU_ENV!r}], f'{{os.getpid()}}.json')\n"
            "def sampled(least):\n"  # the sampler's last record shows the burner with `least` seconds
            "    try:\n"
            "        with open(record) as f: rows = json.load(f)['threads']\n"
            "    except (OSError, ValueError): return False\n"
            "    return any(role == 'burner_3' and s >= least for role, s in rows)\n"
            "def burn():\n"
            "    t = time.process_time()\n"
            "    while time.process_time() - t < 0.6: sum(range(1000))\n"
            "    deadline = time.monotonic() + 120\n"  # alive until the sampler has seen its time
            "    while not sampled(0.5) and time.monotonic() < deadline: time.sleep(0.05)\n"
            "th = threading.Thread(target=burn, name='burner_3'); th.start(); th.join()\n")
    folder = tmp_path / "thread-cpu"
    monkeypatch.setenv(dataset.THREAD_CPU_ENV, str(folder))
    env = dataset.child_env(None, tmp_path, None)
    out = subprocess.run([sys.executable, "-c", code, "--device", "cpu"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    table = dataset.thread_cpu_table(folder, frames=10)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "burner" in rows and "1 workers" in table, table
    burner_s = float(rows["burner"].split("|")[2])
    assert burner_s >= 0.4, table
    names = "import threading; print(sorted(t.name for t in threading.enumerate()))"
    sampled = subprocess.run([sys.executable, "-c", names], env=env, capture_output=True, text=True, timeout=300)
    assert "bench-thread-cpu" in sampled.stdout, sampled.stderr
    monkeypatch.delenv(dataset.THREAD_CPU_ENV)
    env = dataset.child_env(None, tmp_path, None)
    quiet = subprocess.run([sys.executable, "-c", names], env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "bench-thread-cpu" not in quiet.stdout, quiet.stderr
    assert dataset.thread_cpu_table(tmp_path / "none", frames=10) == ""
