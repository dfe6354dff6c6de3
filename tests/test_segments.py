"""One video split into frame segments over engine processes (:mod:`engine.segments`).

Real components on the CPU: the first 48 frames of the shared clip, MTCNN landmarks (facenet-pytorch's
weights), a random Deep3D checkpoint, fast mode (keyframes every 4 frames, batches of 8), real
child processes (spawn). Waits are generous timeouts; nothing here asserts a duration.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re

import numpy as np
import pytest

from engine import Cancelled, Engine
from engine.cli import main
from engine.config import EngineConfig
from engine.errors import StudioError
from engine.procs import EnginePool
from engine.segments import plan_segments, run_split, split_reason, split_segments
from engine.sources import probe
from tests.media import first_frames, make_image, make_truncated_copy, make_video
from tests.test_many import assert_same_outputs

FRAMES = 48
SEGMENTS_OF_48 = [(0, 16), (16, 32), (32, None)]  # 2 processes → up to 4 parts; multiples of the batch (8)


# ---------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(("frames", "parts", "align", "min_frames", "expected"), [
    (100, 3, 8, 16, [(0, 40), (40, 80), (80, 100)]),
    (90, 3, 8, 16, [(0, 32), (32, 64), (64, 90)]),
    (48, 4, 8, 8, [(0, 16), (16, 32), (32, 48)]),
    (1000, 4, 32, 300, [(0, 320), (320, 640), (640, 1000)]),  # min length wins over the part count
    (20, 4, 8, 16, [(0, 20)]),  # too short for two
    (1, 4, 8, 16, [(0, 1)]),
    (0, 4, 8, 16, [(0, 0)]),
    (100, 1, 8, 16, [(0, 100)]),
])
def test_plan_segments_table(frames, parts, align, min_frames, expected):
    assert plan_segments(frames, parts, align, min_frames) == expected


def test_plan_segments_cover_aligned_without_gap_or_overlap():
    for frames, parts, align, min_frames in itertools.product(range(0, 400, 7), (1, 2, 3, 8), (1, 8, 32), (1, 16, 64)):
        plan = plan_segments(frames, parts, align, min_frames)
        assert plan[0][0] == 0 and plan[-1][1] == max(frames, 0)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))  # no gap, no overlap
        assert all(a % align == 0 for a, _ in plan)
        assert len(plan) <= max(parts, 1)
        if len(plan) > 1:
            assert all(b - a >= min_frames for a, b in plan)


def test_what_is_split(tmp_path, recon_checkpoint):
    video = make_video(tmp_path / "v.mp4", 40)
    info = probe(video)
    fast = EngineConfig(checkpoint=recon_checkpoint, mode="fast", landmarks="mtcnn", batch_size=8)
    assert split_reason(fast, info, 2) == ""
    assert split_segments(fast, info, 2, min_frames=8) == [(0, 16), (16, 32), (32, None)]
    assert split_segments(fast, info, 2, min_frames=32) == [(0, None)]  # too short for two
    assert split_segments(fast, info, 1, min_frames=8) == [(0, None)]
    exact = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", batch_size=8)
    assert "exact" in split_reason(exact, info, 2) and split_segments(exact, info, 2, min_frames=8) == [(0, None)]
    assert split_reason(fast, probe(make_image(tmp_path / "i.png")), 2) == "not a video"


# ---------------------------------------------------------------------------- on the shared clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory, test_video):
    """The first 48 frames of the shared clip (512², 25 fps), index at the front (a truncated copy opens)."""
    return make_video(tmp_path_factory.mktemp("split") / "clip48.mp4", first_frames(test_video, FRAMES), fps=25,
                      faststart=True)


@pytest.fixture(scope="module")
def cli_args(recon_checkpoint):
    return ["--landmarks", "mtcnn", "--checkpoint", str(recon_checkpoint), "--device", "cpu", "--mode", "fast",
            "--batch-size", "8", "--detect-every", "4", "--formats", "pirender,npz", "--no-progress"]


@pytest.fixture(scope="module")
def cfg(recon_checkpoint):
    return EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", mode="fast", batch_size=8,
                        detect_every=4, formats=("pirender", "npz"))


@pytest.fixture(scope="module")
def unsplit(clip, cli_args, tmp_path_factory):
    """The whole clip in one process, through the CLI (``--processes 1``): its output files."""
    out = tmp_path_factory.mktemp("unsplit")
    assert main(["extract", str(clip), "-o", str(out), *cli_args, "--processes", "1"]) == 0
    return {"npz": out / "clip48.npz", "pirender": out / "clip48.mat"}


@pytest.fixture(scope="module")
def pool(cfg):
    with EnginePool(functools.partial(Engine, cfg), 2) as p:
        assert p.wait_ready(timeout=600)
        yield p


class _Recording:
    """``pool`` that records the segments sent to it."""

    def __init__(self, pool: EnginePool) -> None:
        self.pool, self.processes, self.sent = pool, pool.processes, []

    def run_many(self, jobs):
        jobs = list(jobs)
        self.sent += [j.segment for j in jobs]
        return self.pool.run_many(jobs)


def test_split_equals_unsplit(clip, cfg, unsplit, pool, tmp_path):
    seen = []
    recording = _Recording(pool)
    with Engine(cfg) as engine:
        report = run_split(engine, clip, tmp_path / "clip48", processes=2, pool=recording, min_frames=8,
                           progress=seen.append)
    assert recording.sent == SEGMENTS_OF_48
    assert report.num_frames == FRAMES and report.num_valid == FRAMES and report.resumed_from == 0
    assert set(report.outputs) == {"pirender", "npz"}
    assert_same_outputs(report.outputs, unsplit)  # bit for bit: the lead-in gives each segment the whole run's state
    extract = [p for p in seen if p.stage == "extract"]
    assert extract and max(p.frames_done for p in extract) == FRAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip48.mat", "clip48.npz"]  # no temporary left


def test_without_the_lead_in_the_boundary_frames_differ(clip, cfg, unsplit, tmp_path, monkeypatch):
    """What the lead-in is for: segments run with a fresh tracker (in this process) differ right
    after the boundaries, so the test above can tell the lead-in from none."""
    from engine.pipeline import FrameResults
    from engine.segments import segment_dir

    monkeypatch.setattr(Engine, "_lead_in", lambda *args: None)
    parts = []
    with Engine(cfg) as engine:
        for seg in SEGMENTS_OF_48:
            engine.run_segment(clip, seg, segment_dir(tmp_path, seg))
            for f in sorted(segment_dir(tmp_path, seg).glob("chunk-*.npz")):
                with np.load(f, allow_pickle=False) as z:
                    parts.append(FrameResults.from_arrays(z))
    whole = FrameResults.concat(parts)
    with np.load(unsplit["npz"]) as ref:
        differ = np.flatnonzero(np.any(whole.coeff != ref["coeff"], axis=1))
    assert differ.size and set(differ) <= set(range(16, 24)) | set(range(32, 40)), differ


def test_cancelled_split_resumes_without_redoing_finished_segments(clip, cfg, unsplit, pool, tmp_path):
    state = tmp_path / "state"
    segments_dir = state / "segments"

    def one_finished() -> bool:  # cancel once a segment's state says complete
        return any('"complete": true' in p.read_text() for p in segments_dir.glob("*/state.json"))

    with Engine(cfg) as engine:
        with pytest.raises(Cancelled, match=r"clip48\.mp4: cancelled"):
            run_split(engine, clip, tmp_path / "out" / "clip48", processes=2, pool=pool, min_frames=8,
                      should_stop=one_finished, state_dir=state)
        assert not (tmp_path / "out" / "clip48.npz").exists()
        finished = [p.parent.name for p in segments_dir.glob("*/state.json") if '"complete": true' in p.read_text()]
        assert finished
        mtimes = {p: p.stat().st_mtime_ns for name in finished for p in (segments_dir / name).glob("chunk-*.npz")}

        recording = _Recording(pool)
        original = recording.run_many

        def run_many(jobs):  # the finished segments' files are untouched when the rest is sent
            assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
            return original(jobs)

        recording.run_many = run_many
        report = run_split(engine, clip, tmp_path / "out" / "clip48", processes=2, pool=recording, min_frames=8,
                           state_dir=state)
    done = {(int(n[:10]), None if n.endswith("end") else int(n[11:])) for n in finished}
    assert set(recording.sent) == set(SEGMENTS_OF_48) - done  # the finished segments were not run again
    assert report.resumed_from >= 16 * len(done)
    assert_same_outputs(report.outputs, unsplit)
    assert not segments_dir.exists()  # the state is dropped once the outputs are written


def test_a_failing_segment_fails_the_input_and_writes_nothing(clip, cfg, pool, tmp_path):
    broken = make_truncated_copy(clip, tmp_path / "broken.mp4", 0.6)  # opens, frames stop before 48
    out = tmp_path / "out"
    with Engine(cfg) as engine, pytest.raises(StudioError) as caught:
        run_split(engine, broken, out / "broken", processes=2, pool=pool, min_frames=8, state_dir=tmp_path / "state")
    message = str(caught.value)
    assert re.match(r"broken\.mp4, frames \d+-(\d+|end): .*(truncated|decod)", message), message
    assert caught.value.code == "decode"
    assert not out.exists() or not any(out.iterdir())  # nothing written, nothing half-written


def test_cli_one_video_with_processes_runs_split(clip, cli_args, unsplit, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr("engine.segments.MIN_SEGMENT_FRAMES", 8)
    with caplog.at_level(logging.INFO, logger="engine.segments"):
        code = main(["extract", str(clip), "-o", str(tmp_path), *cli_args, "--processes", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "clip48.mp4: split into 3 segments of frames 0-16, 16-32, 32-end over 2 processes" in caplog.text
    assert "ok " in err and f"{FRAMES} frames" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip48.mat", "clip48.npz"]
    assert_same_outputs({"npz": tmp_path / "clip48.npz", "pirender": tmp_path / "clip48.mat"}, unsplit)
