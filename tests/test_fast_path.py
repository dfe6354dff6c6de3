"""The fast path (``mode="fast"``) end to end on the CPU: which stages it is made of, and that its
crops stay within the bounds ``docs/compatibility.md`` documents around the exact path's, which
stays the default.

Real MTCNN weights (bundled with facenet-pytorch) on the first 64 frames of the shared clip
(skipped with a reason when ../shared is absent); random reconstruction weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import Engine, EngineConfig, Mode
from engine.align import lm68_to_lm5
from engine.fast import default_aligner, regressor_precision
from engine.stages.align import Deep3DAligner, TorchAligner
from engine.stages.keyframe import KeyframeTracker
from tests.media import first_frames, make_video

#: The documented bounds (docs/compatibility.md, "Fast path: measured differences").
MAX_MEAN_LANDMARK_IOD_PCT = 4.0  # mean over frames of the 5 points' mean error, % inter-ocular distance
MAX_LANDMARK_IOD_PCT = 10.0  # any frame
MAX_CROP_SHIFT_PX = 22  # |Δleft|, |Δup| of crop_box: 10 % of the 224 crop
MAX_SCALE_REL = 0.08  # |Δw| / w of the resized frame (the crop's scale)

FRAMES = 64


@pytest.fixture(scope="module")
def clip(tmp_path_factory, test_video):
    frames = first_frames(test_video, FRAMES)
    return make_video(tmp_path_factory.mktemp("fast") / "clip64.mp4", frames, size=(512, 512), fps=25)


@pytest.fixture(scope="module")
def both(clip, recon_checkpoint, tmp_path_factory):
    """npz arrays of the exact path (the default config: no mode given) and the fast path on the
    same clip."""
    out = tmp_path_factory.mktemp("fast-out")
    arrays = {}
    for mode in ("exact", "fast"):
        cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", batch_size=32,
                           formats=("npz",), num_threads=2, **({"mode": mode} if mode == "fast" else {}))
        with Engine(cfg) as engine:
            report = engine.run(clip, out / mode / "clip")
        with np.load(report.outputs["npz"], allow_pickle=False) as z:
            arrays[mode] = {k: z[k] for k in z.files}
    return arrays["exact"], arrays["fast"]


def test_fast_mode_is_composed_of_the_fast_stages(recon_checkpoint):
    from engine.landmarks.mtcnn_gpu import RefineMtcnn

    cfg = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu", mode="fast", detect_every=5)
    with Engine(cfg) as engine:
        assert isinstance(engine.tracker, KeyframeTracker) and engine.tracker.detect_every == 5
        assert isinstance(engine.landmarker_for(recon_checkpoint), RefineMtcnn)
        assert engine.regressor.precision == "fp32"  # fp16 only on CUDA
        assert isinstance(engine.aligner, Deep3DAligner)  # Pillow on the CPU
    assert regressor_precision(cfg, "cuda:0") == "fp16"
    assert regressor_precision(EngineConfig(mode="exact"), "cuda:0") == "fp32"
    # Both paths cut their crops on the GPU with the Pillow-exact aligner, kept on the device.
    gpu = default_aligner(EngineConfig(), "cuda:0")
    assert isinstance(gpu, TorchAligner) and gpu.keep_on_device
    default = EngineConfig(checkpoint=recon_checkpoint, landmarks="mtcnn", device="cpu")
    assert default.mode == Mode.EXACT  # the exact path stays the default (docs/compatibility.md says why)
    with Engine(default) as exact:
        assert not isinstance(exact.tracker, KeyframeTracker)


def test_fast_crops_stay_within_the_documented_bounds_of_the_exact_crops(both):
    exact, fast = both
    assert exact["valid"].all() and np.array_equal(exact["valid"], fast["valid"])
    lm_e = lm68_to_lm5(exact["landmarks"]).astype(np.float64)
    lm_f = lm68_to_lm5(fast["landmarks"]).astype(np.float64)
    iod = np.linalg.norm(lm_e[:, 0] - lm_e[:, 1], axis=-1)
    err = np.linalg.norm(lm_e - lm_f, axis=-1).mean(axis=-1) / iod * 100
    assert err.mean() <= MAX_MEAN_LANDMARK_IOD_PCT, err.mean()
    assert err.max() <= MAX_LANDMARK_IOD_PCT, err.max()
    box_e, box_f = exact["crop_box"].astype(np.int64), fast["crop_box"].astype(np.int64)
    assert np.abs(box_e[:, :2] - box_f[:, :2]).max() <= MAX_CROP_SHIFT_PX
    assert (np.abs(box_e[:, 2] - box_f[:, 2]) / box_e[:, 2]).max() <= MAX_SCALE_REL
    # Not the same numbers: the fast path did track (the test would pass trivially otherwise).
    assert err.max() > 0 and not np.array_equal(exact["coeff"], fast["coeff"])
