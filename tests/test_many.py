"""Many inputs through one engine (``Engine.run_many``), merged regressor calls, the mode setting.

Real components: the random-weight checkpoint (tests/factories.py), MTCNN with its bundled
weights, short clips cut from the shared test video (skipped when ../shared is absent).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading

import numpy as np
import pytest
import scipy.io as sio

from engine import Cancelled, Engine, EngineConfig, InputError, InputJob, Mode
from engine.batching import MergingRegressor
from engine.cli import build_parser, config_from_args, main
from engine.many import default_concurrency
from engine.sources import discover_inputs
from tests.media import first_frames, make_text_file, make_truncated_copy, make_video
from tests.test_dashboard import empty_studio, studio  # noqa: F401  (fixtures: a registry with a job in every state)

#: Frames of each short clip, cut one after the other from the shared clip (different lengths).
CLIP_FRAMES = (6, 9, 5, 8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, test_video):
    """A folder of four short 256×256 clips cut from the shared video."""
    frames = first_frames(test_video, sum(CLIP_FRAMES), size=(256, 256))
    folder = tmp_path_factory.mktemp("many") / "in"
    folder.mkdir()
    bounds = np.cumsum((0, *CLIP_FRAMES))
    paths = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        paths.append(make_video(folder / f"clip{i}.mp4", frames[a:b], size=(256, 256), fps=25))
    return folder, paths


@pytest.fixture(scope="module")
def cfg(recon_checkpoint):
    return EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=4,
                        formats=("pirender", "npz"), num_threads=2)


@pytest.fixture(scope="module")
def one_by_one(clips, cfg, tmp_path_factory):
    """Each clip through ``Engine.run``, one after the other: the reference outputs."""
    out = tmp_path_factory.mktemp("one_by_one")
    with Engine(cfg) as engine:
        return {p.stem: engine.run(p, out / p.stem).outputs for p in clips[1]}


def assert_same_outputs(a: dict, b: dict) -> None:
    """Two runs' npz and pirender .mat files hold exactly the same arrays."""
    za, zb = np.load(a["npz"]), np.load(b["npz"])
    assert sorted(za.files) == sorted(zb.files)
    for key in za.files:
        np.testing.assert_array_equal(za[key], zb[key], err_msg=key)
    ma, mb = sio.loadmat(a["pirender"]), sio.loadmat(b["pirender"])
    for key in ("coeff", "transform_params"):
        np.testing.assert_array_equal(ma[key], mb[key], err_msg=key)


def test_folder_through_run_many_equals_one_by_one(clips, cfg, one_by_one, tmp_path):
    folder, paths = clips
    seen: dict[str, list] = {p.stem: [] for p in paths}
    items = discover_inputs([folder])  # InputItems, as the CLI hands them on
    jobs = [InputJob(i, tmp_path / i.rel_stem, key=i.path.stem, progress=seen[i.path.stem].append) for i in items]
    with Engine(cfg) as engine:
        outcomes = list(engine.run_many(jobs, concurrency=2))
    assert sorted(o.job.key for o in outcomes) == sorted(seen)
    for o in outcomes:
        assert o.error is None, o.error
        assert o.report.num_frames == CLIP_FRAMES[int(o.job.key[-1])]
        assert_same_outputs(o.report.outputs, one_by_one[o.job.key])
        # progress is per input: each callback saw only its own input's frame counts
        assert seen[o.job.key] and seen[o.job.key][-1].frames_done == o.report.num_frames


def test_bad_inputs_fail_alone_with_their_reason(clips, cfg, one_by_one, tmp_path):
    _, paths = clips
    notes = make_text_file(tmp_path / "notes.mp4")
    truncated = make_truncated_copy(paths[1], tmp_path / "truncated.mp4", 0.5)
    jobs = [InputJob(p, tmp_path / "out" / p.stem, key=p.stem) for p in (paths[0], notes, truncated, paths[2])]
    with Engine(cfg) as engine:
        outcomes = {o.job.key: o for o in engine.run_many(jobs, concurrency=2)}
    assert set(outcomes) == {"clip0", "notes", "truncated", "clip2"}
    for key in ("clip0", "clip2"):
        assert outcomes[key].error is None
        assert_same_outputs(outcomes[key].report.outputs, one_by_one[key])
    for key in ("notes", "truncated"):
        assert outcomes[key].report is None and isinstance(outcomes[key].error, InputError), outcomes[key].error
    assert "notes.mp4" in str(outcomes["notes"].error)
    reason = str(outcomes["truncated"].error).lower()
    assert "truncat" in reason or "incomplete" in reason
    assert str(outcomes["notes"].error) != str(outcomes["truncated"].error)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "clip0.mat", "clip0.npz", "clip2.mat", "clip2.npz"]  # nothing half-written for the bad ones


def test_cancelled_input_resumes_from_its_state(clips, cfg, one_by_one, tmp_path):
    _, paths = clips
    calls = itertools.count()
    state = {p.stem: tmp_path / "state" / p.stem for p in paths[:2]}
    first = [InputJob(paths[1], tmp_path / "out" / "clip1", state_dir=state["clip1"], key="clip1",
                      should_stop=lambda: next(calls) >= 2),
             InputJob(paths[0], tmp_path / "out" / "clip0", state_dir=state["clip0"], key="clip0")]
    with Engine(cfg) as engine:
        outcomes = {o.job.key: o for o in engine.run_many(first, concurrency=2)}
        assert isinstance(outcomes["clip1"].error, Cancelled)
        assert outcomes["clip0"].error is None  # the other input is not affected
        assert (state["clip1"] / "state.json").is_file() and not (state["clip0"] / "state.json").exists()
        assert not (tmp_path / "out" / "clip1.npz").exists()
        again = list(engine.run_many([InputJob(paths[1], tmp_path / "out" / "clip1", state_dir=state["clip1"])]))
    (resumed,) = again
    assert resumed.error is None and resumed.report.resumed_from > 0
    assert resumed.report.num_frames == CLIP_FRAMES[1]
    assert not (state["clip1"] / "state.json").exists()
    assert_same_outputs(resumed.report.outputs, one_by_one["clip1"])


def test_jobs_are_pulled_lazily(test_images, cfg, tmp_path):
    """The next job is pulled only when a slot is free: never more than ``concurrency`` open."""
    image = test_images / "000002.jpg"
    images = []
    for i in range(5):
        images.append(tmp_path / "in" / f"img{i}.jpg")
        images[-1].parent.mkdir(exist_ok=True)
        images[-1].write_bytes(image.read_bytes())
    pulled: list[int] = []
    open_when_pulled: list[int] = []

    def jobs():
        for i, path in enumerate(images):
            finished = sum((tmp_path / "out" / f"img{j}.mat").is_file() for j in pulled)
            open_when_pulled.append(len(pulled) - finished)
            pulled.append(i)
            yield InputJob(path, tmp_path / "out" / path.stem, key=str(i))

    icfg = EngineConfig(**{**cfg.to_dict(), "formats": ["pirender"]})
    with Engine(icfg) as engine:
        outcomes = engine.run_many(jobs(), concurrency=2)
        assert pulled == []  # nothing happens before the first outcome is asked for
        done = [o.job.key for o in outcomes]
    assert sorted(done) == [str(i) for i in range(5)] and pulled == list(range(5))
    assert max(open_when_pulled) <= 1  # when a job is pulled, at most one other is still open


def test_the_threads_outlive_the_inputs(clips, cfg, one_by_one, tmp_path):
    """Four clips, two at a time: the face stages run on at most two threads, the same from clip
    to clip (PyTorch keeps cuDNN's plans per thread), and every thread of the run is gone once
    it ends. Outputs as one by one."""
    from engine.landmarks.mtcnn import MtcnnLandmarker

    seen: dict[str, set] = {"landmarks": set()}

    class Recording(MtcnnLandmarker):
        def __call__(self, frames, faces=None):
            seen["landmarks"].add(threading.current_thread())
            return super().__call__(frames, faces)

    before = set(threading.enumerate())
    with Engine(cfg, landmarker=Recording("cpu", batch_frames=False)) as engine:
        outcomes = list(engine.run_many([InputJob(p, tmp_path / p.stem, key=p.stem) for p in clips[1]],
                                        concurrency=2))
    assert sorted(o.job.key for o in outcomes) == sorted(p.stem for p in clips[1])
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    for o in outcomes:
        assert_same_outputs(o.report.outputs, one_by_one[o.job.key])
    assert 1 <= len(seen["landmarks"]) <= 2, seen
    assert all(t.name.startswith("landmarks") for t in seen["landmarks"])
    assert not any(t.is_alive() for t in seen["landmarks"])
    assert set(threading.enumerate()) <= before | {threading.current_thread()}


def test_a_failing_jobs_iterable_raises_after_the_started_inputs(test_images, cfg, tmp_path):
    def jobs():
        yield InputJob(test_images / "000002.jpg", tmp_path / "a")
        raise RuntimeError("the job source broke")

    icfg = EngineConfig(**{**cfg.to_dict(), "formats": ["pirender"]})
    got = []
    with Engine(icfg) as engine, pytest.raises(RuntimeError, match="job source broke"):
        for o in engine.run_many(jobs(), concurrency=2):
            got.append(o)
    assert len(got) == 1 and got[0].error is None


def folder_of_clips(paths, src, non_video: bool = False):
    """``src`` holding copies of the first three clips (and a non-video ``notes.mp4``); returns ``src``."""
    src.mkdir()
    for p in paths[:3]:
        (src / p.name).write_bytes(p.read_bytes())
    if non_video:
        make_text_file(src / "notes.mp4")
    return src


def test_cli_extracts_a_folder_with_an_overall_line(clips, cfg, one_by_one, tmp_path, capsys):
    _, paths = clips
    src = folder_of_clips(paths, tmp_path / "in", non_video=True)
    code = main(["extract", str(src), "-o", str(tmp_path / "out"), "--landmarks", "mtcnn", "--checkpoint",
                 str(cfg.checkpoint), "--device", "cpu", "--batch-size", "4", "--no-progress", "--concurrency", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert sum(line.startswith("ok ") for line in err.splitlines()) == 3
    assert any(line.startswith("FAILED") and "notes.mp4" in line for line in err.splitlines())
    assert "4/4 inputs ended" in err and "frames/s overall" in err
    assert "3 done, 0 skipped, 1 failed" in err
    for p in paths[:3]:
        assert_same_outputs({"npz": tmp_path / "out" / f"{p.stem}.npz", "pirender": tmp_path / "out" / f"{p.stem}.mat"},
                            one_by_one[p.stem])


# ---------------------------------------------------------------------------- merged regressor calls


class _Recording:
    """A regressor stand-in: row sums as coefficients; blocks while ``gate`` is clear; raises on
    crops whose first pixel is 255."""

    checkpoint_path = "fake.pth"
    checkpoint_sha256 = "0" * 64

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def numerics(self):
        import contextlib

        return contextlib.nullcontext()

    def predict(self, crops):
        self.entered.set()
        assert self.gate.wait(60)
        self.sizes.append(len(crops))
        if (crops[:, 0, 0, 0] == 255).any():
            raise ValueError("bad crop")
        return np.repeat(crops.reshape(len(crops), -1).sum(1, dtype=np.float32)[:, None], 257, axis=1)


def _crops(n: int, value: int) -> np.ndarray:
    return np.full((n, 224, 224, 3), value, dtype=np.uint8)


def _call_in_thread(merger, crops, results, key):
    def call():
        try:
            results[key] = merger.predict(crops)
        except Exception as e:
            results[key] = e

    t = threading.Thread(target=call)
    t.start()
    return t


def test_merging_regressor_merges_waiting_calls_and_routes_errors():
    inner = _Recording()
    merger = MergingRegressor(inner, wait_s=0.0)
    results: dict = {}
    first = _call_in_thread(merger, _crops(2, 1), results, "first")
    assert inner.entered.wait(60)  # the collector is inside the first forward, blocked on the gate
    waiting = [_call_in_thread(merger, _crops(n, v), results, (n, v)) for n, v in ((3, 2), (1, 255), (4, 3))]
    while len(merger._pending) < 3:  # all three queued behind the blocked forward
        threading.Event().wait(0.001)
    inner.gate.set()
    for t in (first, *waiting):
        t.join(60)
    merger.close()
    assert inner.sizes[:2] == [2, 8]  # the three waiting calls went in one forward (which failed) ...
    assert sorted(inner.sizes[2:]) == [1, 3, 4]  # ... then each alone, so each gets its own outcome
    assert isinstance(results[(1, 255)], ValueError)
    for (n, v), want in {(3, 2): 2, (4, 3): 3}.items():
        assert results[(n, v)].shape == (n, 257) and np.all(results[(n, v)] == want * 224 * 224 * 3)
    assert results["first"].shape == (2, 257)


def test_merging_regressor_equals_separate_calls_on_a_real_network(recon_checkpoint):
    """With the real ResNet on the CPU: merged forwards give each caller its own rows. CPU kernels
    may round differently for another batch size, which is why run_many merges only on CUDA; here
    the rows must agree to float32 rounding."""
    from engine.regressor import Regressor

    net = Regressor(recon_checkpoint, device="cpu")
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8) for n in (2, 3)]
    alone = [net.predict(p) for p in parts]
    merger = MergingRegressor(net, wait_s=60.0)  # the collector waits for both users
    results: dict = {}
    barrier = threading.Barrier(2)

    def use(i):
        with merger.user():
            barrier.wait(60)
            results[i] = merger.predict(parts[i])

    threads = [threading.Thread(target=use, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    merger.close()
    assert list(merger.forward_sizes) == [5]
    assert merger.checkpoint_path == net.checkpoint_path
    for i in range(2):
        np.testing.assert_allclose(results[i], alone[i], rtol=0, atol=1e-5)


def test_default_concurrency():
    assert default_concurrency("cuda", 2) == 2
    assert default_concurrency("cpu", 2) == 1 and default_concurrency("cpu", None) == 1
    assert default_concurrency("cpu", 8) == 2 and default_concurrency("cpu", 64) == 4


# ---------------------------------------------------------------------------- the mode setting


def test_mode_round_trip_and_defaults():
    cfg = EngineConfig(mode="fast", detect_every=3)
    assert cfg.mode is Mode.FAST and cfg.detect_every == 3
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["mode"] == "fast" and d["detect_every"] == 3
    assert EngineConfig.from_dict(d) == cfg
    old = {k: v for k, v in EngineConfig().to_dict().items() if k not in ("mode", "detect_every")}
    assert EngineConfig.from_dict(old).mode is Mode.EXACT and EngineConfig.from_dict(old).detect_every == 8
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="detect_every"):
            EngineConfig(detect_every=bad)
    with pytest.raises(ValueError):
        EngineConfig(mode="turbo")


def test_cli_mode_options():
    args = build_parser().parse_args(["extract", "a.mp4", "-o", "out", "--mode", "fast", "--detect-every", "4"])
    cfg = config_from_args(args)
    assert cfg.mode is Mode.FAST and cfg.detect_every == 4
    assert config_from_args(build_parser().parse_args(["extract", "a.mp4", "-o", "out"])).mode is Mode.EXACT
    submit = build_parser().parse_args(["submit", "a.mp4", "--mode", "fast"])
    assert config_from_args(submit).mode is Mode.FAST
    for bad in (["--mode", "turbo"], ["--detect-every", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["extract", "a.mp4", "-o", "out", *bad])


def test_fast_mode_builds_the_keyframe_tracker_unless_one_is_handed_in(recon_checkpoint):
    from engine.stages.keyframe import KeyframeTracker
    from engine.stages.track import DetectEveryFrame

    fast = EngineConfig(checkpoint=recon_checkpoint, device="cpu", mode=Mode.FAST, detect_every=3)
    assert isinstance(Engine(fast).tracker, KeyframeTracker) and Engine(fast).tracker.detect_every == 3
    mine = DetectEveryFrame()
    assert Engine(fast, tracker=mine).tracker is mine  # a stage handed in wins
    assert isinstance(Engine(EngineConfig(device="cpu")).tracker, DetectEveryFrame)


def test_fingerprint_of_the_exact_path_is_unchanged_and_fast_settings_enter_it(short_clip, recon_checkpoint):
    """Resume states saved before the mode existed stay valid: the exact path's key is the old one."""
    from engine import __version__
    from engine.pipeline import _file_identity

    base = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu")
    st = short_clip.stat()
    old_key = {"input": str(short_clip.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
               "checkpoint": _file_identity(recon_checkpoint), "landmarks": "mtcnn", "keypoints": None,
               "no_face": "reference", "keep_person": "reference", "engine": __version__}
    old = hashlib.sha256(json.dumps(old_key, sort_keys=True).encode()).hexdigest()

    def fp(**changes):
        return Engine(EngineConfig(**{**base.to_dict(), **changes}))._fingerprint(short_clip)

    assert fp() == old == fp(detect_every=3)  # detect_every means nothing to the exact path
    assert len({old, fp(mode="fast"), fp(mode="fast", detect_every=3)}) == 3


def test_registry_carries_the_mode_and_old_rows_still_load(tmp_path):
    """Jobs store the mode; a row written before it existed (no mode/detect_every keys) loads as
    the exact path and counts as the same settings as a new default job."""
    from sqlmodel import select

    from db import LOCAL, JobStatus, Registry, service
    from db.models import Job

    clip = make_video(tmp_path / "clip.mp4", 4)
    reg = Registry(url=f"sqlite:///{tmp_path / 'studio.db'}", data_dir=tmp_path / "data")
    try:
        fast = service.submit_file(reg, clip, {"landmarks": "mtcnn", "mode": "fast", "detect_every": 4})
        assert service.get_job(reg, fast.id).settings["mode"] == "fast"
        assert EngineConfig.from_dict(service.get_job(reg, fast.id).settings).detect_every == 4

        old = service.submit_file(reg, clip, {"landmarks": "mtcnn"})
        with reg.write() as s:  # as an older version wrote it: without the new keys
            row = s.exec(select(Job).where(Job.id == old.id)).one()
            row.settings = {k: v for k, v in row.settings.items() if k not in ("mode", "detect_every")}
        old_view = service.get_job(reg, old.id)
        assert "mode" not in old_view.settings
        assert EngineConfig.from_dict(old_view.settings).mode is Mode.EXACT

        new = service.submit_file(reg, clip, {"landmarks": "mtcnn"}, original_name="again.mp4")
        assert [j.id for j in service.duplicates_of(reg, new.id)] == [old.id]  # not the fast one
        service.cancel_job(reg, old.id, actor=LOCAL)
        service.retry_job(reg, old.id, actor=LOCAL, settings={**old_view.settings, "mode": "exact"})
        again = service.get_job(reg, old.id)  # the same settings spelled out: not a change
        assert again.status == JobStatus.QUEUED and "mode" not in again.settings
    finally:
        reg.close()


def test_dashboard_upload_and_retry_offer_the_mode(studio):  # noqa: F811
    from db import LOCAL, JobStatus, service
    from tests.dashboard_fixtures import make_clip
    from tests.test_dashboard import _select, open_page

    reg, ids, tmp = studio
    at = open_page("upload")
    content = make_clip(tmp / "fast_one.mp4", n=5, size=(64, 48)).read_bytes()
    at.file_uploader(key="up_files").upload("fast_one.mp4", content, "video/mp4").run()
    assert at.radio(key="up_engine_mode").value == "exact"  # the default
    assert "up_decoder" not in [r.key for r in at.radio]  # the exact path always decodes with FFmpeg
    at.radio(key="up_engine_mode").set_value("fast").run()
    assert any("small measured differences" in c.value for c in at.caption)
    assert at.radio(key="up_decoder").value == "pyav"
    at.radio(key="up_decoder").set_value("nvdec").run()
    at.button(key="up_submit").click().run()
    assert not at.exception
    job = service.list_jobs(reg, search="fast_one", limit=5)[0]
    assert job.settings["mode"] == "fast" and job.settings["detect_every"] == 8
    assert job.settings["decoder"] == "nvdec"

    at = open_page("jobs")
    _select(at, reg, [ids["failed"]])
    at.radio(key=f"jobs_retry_mode_{ids['failed']}").set_value("fast").run()
    assert at.radio(key=f"jobs_retry_decoder_{ids['failed']}").value == "pyav"
    at.radio(key=f"jobs_retry_decoder_{ids['failed']}").set_value("nvdec").run()
    at.button(key=f"jobs_retry_with_{ids['failed']}").click().run()
    assert not at.exception
    job = service.get_job(reg, ids["failed"])
    assert job.status == JobStatus.QUEUED and job.settings["mode"] == "fast" and job.settings["decoder"] == "nvdec"

    # Failed again (say its worker had no NVDEC): retried on the exact path, it decodes with FFmpeg.
    service.cancel_job(reg, ids["failed"], actor=LOCAL)
    at = open_page("jobs")
    _select(at, reg, [ids["failed"]])
    assert at.radio(key=f"jobs_retry_decoder_{ids['failed']}").value == "nvdec"  # the job's own
    at.radio(key=f"jobs_retry_mode_{ids['failed']}").set_value("exact").run()
    assert f"jobs_retry_decoder_{ids['failed']}" not in [r.key for r in at.radio]
    at.button(key=f"jobs_retry_with_{ids['failed']}").click().run()
    assert not at.exception
    job = service.get_job(reg, ids["failed"])
    assert job.status == JobStatus.QUEUED and job.settings.get("mode", "exact") == "exact"
    assert job.settings.get("decoder", "pyav") == "pyav"
