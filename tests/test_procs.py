"""Many inputs in several processes (``Engine.run_many(processes=K)``, :class:`engine.procs.EnginePool`).

Real child processes (spawn) with the random-weight checkpoint and MTCNN, on the short clips of
tests/test_many.py. The child processes of one pool are reused across the tests of this module
(each start imports torch). Waits are generous timeouts; nothing here asserts a duration.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest

from engine import Cancelled, Engine, InputError, InputJob
from engine.cli import build_parser, main
from engine.errors import EngineProcessError, ShapeError
from engine.procs import EnginePool, engine_factory, error_from_payload, error_payload
from engine.sources import discover_inputs
from engine.stages.track import DetectEveryFrame
from tests.test_many import (  # noqa: F401  (fixtures)
    CLIP_FRAMES,
    assert_same_outputs,
    cfg,
    clips,
    folder_of_clips,
    one_by_one,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def pool(cfg):  # noqa: F811
    """Two child processes, one input at a time each, for the whole module."""
    with EnginePool(engine_factory(Engine(cfg)), 2, concurrency=1) as p:
        assert p.wait_ready(300)
        yield p


def test_folder_in_processes_equals_one_by_one_and_a_bad_input_fails_alone(clips, one_by_one, pool, tmp_path):  # noqa: F811
    _, paths = clips
    src = folder_of_clips(paths, tmp_path / "in", non_video=True)
    items = discover_inputs([src])
    seen: dict[str, list] = {i.path.stem: [] for i in items}
    jobs = [InputJob(i, tmp_path / "out" / i.rel_stem, key=i.path.stem, progress=seen[i.path.stem].append)
            for i in items]
    outcomes = {o.job.key: o for o in pool.run_many(jobs)}
    assert set(outcomes) == {"clip0", "clip1", "clip2", "notes"}
    for key in ("clip0", "clip1", "clip2"):
        o = outcomes[key]
        assert o.error is None, o.error
        assert o.job is next(j for j in jobs if j.key == key)  # the caller's own job, callbacks and all
        assert o.report.num_frames == CLIP_FRAMES[int(key[-1])]
        assert_same_outputs(o.report.outputs, one_by_one[key])  # bit-identical to Engine.run one by one
        assert seen[key] and seen[key][-1].frames_done == o.report.num_frames  # progress came back, per input
    bad = outcomes["notes"]
    assert bad.report is None and isinstance(bad.error, InputError) and "notes.mp4" in str(bad.error)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "clip0.mat", "clip0.npz", "clip1.mat", "clip1.npz", "clip2.mat", "clip2.npz"]


def test_should_stop_cancels_only_its_input(clips, one_by_one, pool, tmp_path):  # noqa: F811
    _, paths = clips
    asked = []

    def stop() -> bool:
        asked.append(True)
        return True

    jobs = [InputJob(paths[1], tmp_path / "out" / "clip1", state_dir=tmp_path / "state", key="clip1", should_stop=stop),
            InputJob(paths[0], tmp_path / "out" / "clip0", key="clip0")]
    outcomes = {o.job.key: o for o in pool.run_many(jobs)}
    assert asked  # polled in this process
    assert isinstance(outcomes["clip1"].error, Cancelled) and outcomes["clip1"].report is None
    assert not (tmp_path / "out" / "clip1.npz").exists()
    assert outcomes["clip0"].error is None
    assert_same_outputs(outcomes["clip0"].report.outputs, one_by_one["clip0"])


def test_closing_early_returns_once_the_open_inputs_have_ended_in_their_children(clips, pool, test_video,  # noqa: F811
                                                                                    tmp_path):
    """The consumer stops after the first outcome while the 200-frame video still runs in the other
    child: once the generator is closed, that input has ended there (cancelled, its resume state
    kept, no outputs), so nothing of it still writes, and the children live on for the next call.

    On a busy machine the clip can end before the video's first batch: the test then waits (the
    pump thread keeps relaying progress meanwhile) for the video's first report before closing,
    so the close always lands mid-video, whichever child was faster."""
    _, paths = clips
    pids = pool.pids
    started = threading.Event()
    jobs = [InputJob(test_video, tmp_path / "out" / "long", state_dir=tmp_path / "state", key="long",
                     progress=lambda _p: started.set()),
            InputJob(paths[0], tmp_path / "out" / "clip0", key="clip0")]
    outcomes = pool.run_many(jobs)
    with contextlib.closing(outcomes):  # a failed assertion must not leave the module's pool busy
        first = next(outcomes)
        assert first.job.key == "clip0" and first.error is None, first.error
        assert started.wait(300), "the video never reported progress"
    assert not any(c.held for c in pool._children), "closed while an input still ran in a child"
    assert not (tmp_path / "out" / "long.npz").exists()
    state = {p: p.stat().st_mtime_ns for p in (tmp_path / "state").rglob("*") if p.is_file()}
    assert pool.pids == pids  # cancelled, not killed
    outcomes = {o.job.key: o for o in pool.run_many([InputJob(paths[1], tmp_path / "out" / "clip1", key="clip1")])}
    assert outcomes["clip1"].error is None, outcomes["clip1"].error
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "state").rglob("*") if p.is_file()} == state


def test_a_killed_process_fails_its_input_and_the_others_go_on(clips, one_by_one, pool, test_video, tmp_path):  # noqa: F811
    """The first job (a 200-frame video) goes to the first child; SIGKILL it on that input's first
    progress report: that input ends with an error, the others end well (on the other child or
    the replacement), and the run ends."""
    _, paths = clips
    victim = pool.pids[0]
    killed = []

    def kill_once(_p) -> None:
        if not killed:
            killed.append(victim)
            os.kill(victim, signal.SIGKILL)

    jobs = [InputJob(test_video, tmp_path / "out" / "long", key="long", progress=kill_once),
            *(InputJob(p, tmp_path / "out" / p.stem, key=p.stem) for p in paths[:2])]
    outcomes = {o.job.key: o for o in pool.run_many(jobs)}
    assert killed and set(outcomes) == {"long", "clip0", "clip1"}
    err = outcomes["long"].error
    assert isinstance(err, EngineProcessError) and "SIGKILL" in str(err) and outcomes["long"].report is None
    for key in ("clip0", "clip1"):
        assert outcomes[key].error is None, outcomes[key].error
        assert_same_outputs(outcomes[key].report.outputs, one_by_one[key])
    assert victim not in pool.pids and len(pool.pids) == 2  # replaced


def test_cli_extract_with_processes(clips, cfg, one_by_one, tmp_path, capsys):  # noqa: F811
    _, paths = clips
    src = folder_of_clips(paths, tmp_path / "in")
    code = main(["extract", str(src), "-o", str(tmp_path / "out"), "--landmarks", "mtcnn", "--checkpoint",
                 str(cfg.checkpoint), "--device", "cpu", "--batch-size", "4",
                 "--formats", "pirender,npz", "--no-progress", "--processes", "2", "--concurrency", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sum(line.startswith("ok ") for line in err.splitlines()) == 3
    assert "3/3 inputs ended" in err and "3 done, 0 skipped, 0 failed" in err
    for p in paths[:3]:
        assert_same_outputs({"npz": tmp_path / "out" / f"{p.stem}.npz", "pirender": tmp_path / "out" / f"{p.stem}.mat"},
                            one_by_one[p.stem])


def test_processes_refuse_an_engine_with_stages_handed_in(cfg):  # noqa: F811
    engine = Engine(cfg, tracker=DetectEveryFrame())
    with pytest.raises(ValueError, match="tracker"):
        engine.run_many([], processes=2)
    assert engine.handed_in == ("tracker",) and Engine(cfg).handed_in == ()
    assert build_parser().parse_args(["extract", "a.mp4", "-o", "o", "--processes", "3"]).processes == 3
    assert build_parser().parse_args(["extract", "a.mp4", "-o", "o"]).processes == "auto"
    assert build_parser().parse_args(["extract", "a.mp4", "-o", "o", "--processes", "AUTO"]).processes == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "a.mp4", "-o", "o", "--processes", "0"])


def test_errors_cross_the_process_boundary_as_themselves_or_worded():
    back = error_from_payload(error_payload(InputError("clip.mp4: not a video")))
    assert type(back) is InputError and str(back) == "clip.mp4: not a video"
    shape = error_from_payload(error_payload(ShapeError("coeff", (257,), (3,))))  # a constructor of 3 args
    assert isinstance(shape, EngineProcessError) and shape.code == "shape"
    assert str(shape) == "ShapeError: coeff: expected shape (257,), got (3,)"
    assert error_from_payload(error_payload(None)) is None
