"""The batched FAN (engine.landmarks.fan_gpu) against face_alignment's own per-frame code.

No real S3FD / 2D-FAN-4 weights here: a random-weight 2D-FAN-4 in the real file format (a
state dict saved with ``torch.save``) stands in, so the comparison is of code paths, not of
landmark quality. face_alignment's two numba functions run as plain Python (their first-call
JIT costs 5-30 s per process and changes no number).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("face_alignment", reason="face_alignment not installed")

from face_alignment import utils as fa_utils  # noqa: E402
from face_alignment.detection.sfd import bbox as fa_bbox  # noqa: E402
from face_alignment.detection.sfd import detect as fa_detect  # noqa: E402
from face_alignment.detection.sfd.net_s3fd import s3fd  # noqa: E402
from face_alignment.models import FAN  # noqa: E402

from engine.errors import WeightsError, WeightsMissingError  # noqa: E402
from engine.landmarks import fan as fan_module  # noqa: E402
from engine.landmarks import fan_gpu  # noqa: E402
from engine.landmarks.fan_gpu import BatchedFan  # noqa: E402
from engine.stages.landmark import Landmarker  # noqa: E402
from engine.structures import Detections, FrameBatch  # noqa: E402

log = logging.getLogger(__name__)

NUMBA_FUNCTIONS = ("transform_np", "_get_preds_fromhm")


def _batch(images: np.ndarray) -> FrameBatch:
    n = len(images)
    return FrameBatch(np.ascontiguousarray(images), np.arange(n, dtype=np.int64), np.arange(n) / 25.0)


def _compact_s3fd_state() -> dict:
    """S3FD's layout in a tiny file (one-element storages broadcast; class biases favour background)."""
    with torch.device("meta"):
        layout = s3fd().state_dict()
    out = {}
    for key, t in layout.items():
        if "conf" in key and key.endswith("bias"):
            out[key] = torch.zeros(t.shape)
            out[key][-1] = -30.0
        else:
            out[key] = torch.full((1,) * t.dim(), 0.01).expand(t.shape)
    return out


def _random_fan_state(seed: int = 1) -> dict:
    """2D-FAN-4 with PyTorch's default random init and random BatchNorm statistics (~95 MB)."""
    torch.manual_seed(seed)
    state = FAN(4).state_dict()
    g = torch.Generator().manual_seed(seed)
    for key, t in state.items():
        if key.endswith("running_mean"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif key.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return state


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A $TORCH_HOME whose hub/checkpoints holds both weight files under their real names."""
    home = tmp_path_factory.mktemp("torch")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(_compact_s3fd_state(), folder / fan_module.WEIGHTS[0][0])
    torch.save(_random_fan_state(), folder / fan_module.WEIGHTS[1][0])
    return home


@pytest.fixture(scope="module")
def batched(torch_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        backend = BatchedFan("cpu", precision="fp32")
    yield backend
    backend.close()


@pytest.fixture
def plain_numba(monkeypatch):
    for name in NUMBA_FUNCTIONS:
        monkeypatch.setattr(fa_utils, name, getattr(fa_utils, name).py_func)


@pytest.fixture(scope="module")
def video_frames(test_video):
    from tests.media import first_frames

    return np.stack(first_frames(test_video, 3))


def _boxes_and_iod(frames: np.ndarray) -> tuple[np.ndarray, float]:
    """Real face boxes (MTCNN, bundled weights) and the mean distance between its two eye points (px)."""
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch (MTCNN) not installed")
    from engine.landmarks.mtcnn import MtcnnLandmarker
    from engine.stages.detect import best_face_per_frame

    faces = best_face_per_frame(MtcnnLandmarker("cpu").detector(_batch(frames)))
    assert faces.frame_rows.tolist() == list(range(len(frames))), "MTCNN must find the face in every frame"
    iod = np.linalg.norm(faces.points_img_ydown[:, 1] - faces.points_img_ydown[:, 0], axis=1)
    return faces.boxes_img_ydown, float(iod.mean())


# --- geometry against face_alignment's functions (no network) ----------------------------------


@pytest.mark.parametrize("box", [
    (128.3, 131.7, 392.6, 452.1),   # window larger than 256: downscale
    (60.2, 40.9, 121.4, 100.3),     # small face: upscale
    (-150.5, 131.7, 114.6, 452.1),  # box leaving the frame on the left: zero padding
    (400.25, 380.5, 530.0, 515.75),  # leaving right and bottom
    (10.0, 20.0, 50.0, 60.0),       # whole-number corners
])
def test_crops_are_bit_identical_to_face_alignment(box, plain_numba):
    """The 256² input of 2D-FAN-4 equals face_alignment's ``crop`` (cv2 INTER_LINEAR) byte for byte."""
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    centre, scale = fan_gpu.centre_and_scale(np.array([box]))
    ul, br = fan_gpu.crop_windows(centre, scale)
    windows = fan_gpu.gather_windows(frame[None], np.array([0]), ul, br)
    ours = fan_gpu.resize_windows(windows, br - ul)[0].numpy()
    d = np.array(box)
    ref_centre = np.array([d[2] - (d[2] - d[0]) / 2.0, d[3] - (d[3] - d[1]) / 2.0])
    ref_centre[1] -= (d[3] - d[1]) * 0.12
    ref_scale = (d[2] - d[0] + d[3] - d[1]) / 195
    np.testing.assert_array_equal(centre[0], ref_centre)
    assert scale[0] == ref_scale
    expected = fa_utils.crop(frame, ref_centre, ref_scale).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(ours, expected)


def test_exact_twofold_downscale_matches_cv2():
    """A 512-pixel window is a 2:1 reduction, which OpenCV runs as INTER_AREA: the same bytes."""
    import cv2

    rng = np.random.default_rng(3)
    window = rng.integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    ours = fan_gpu.resize_windows(torch.from_numpy(window), np.array([[512, 512]]))[0].numpy()
    expected = cv2.resize(window[0], (256, 256), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    np.testing.assert_array_equal(ours, expected)


def test_heatmap_decoding_matches_face_alignment(plain_numba):
    """Arg-max, quarter-pixel shift, offsets and the inverse transform, on heat maps with border peaks and ties."""
    rng = np.random.default_rng(5)
    hm = rng.random((3, 68, 64, 64)).astype(np.float32)
    hm[0, 0, 0, 10] = 2.0  # top border: no shift
    hm[0, 1, 63, 63] = 2.0  # corner
    hm[0, 2, 20, 30] = hm[0, 2, 40, 5] = 2.0  # tie: the first in row-major order wins
    hm[0, 3, 20, 30] = 2.0
    hm[0, 3, 20, 29] = hm[0, 3, 20, 31] = 1.5  # equal neighbours: no shift in x
    hm = hm.astype(np.float16).astype(np.float32)  # coarse values: more ties, as fp16 heat maps
    centre = np.array([[256.3, 240.8], [100.0, 80.0], [-20.5, 600.25]])
    scale = np.array([2.7, 0.9, 1.6])
    points, peaks = fan_gpu.decode_heatmaps(torch.from_numpy(hm))
    frame = fan_gpu.heatmap_to_frame(points.numpy(), centre, scale)
    for i in range(3):
        ref_pts, ref_orig, ref_scores = fa_utils.get_preds_fromhm(hm[i:i + 1], centre[i], scale[i])
        np.testing.assert_array_equal(points[i].numpy(), ref_pts[0])
        np.testing.assert_array_equal(frame[i], ref_orig[0])
        np.testing.assert_array_equal(peaks[i].numpy(), ref_scores[0])


def test_s3fd_decoding_and_nms_match_face_alignment():
    """Decoding, NMS 0.3 and the 0.5 filter give face_alignment's boxes, scores and order: logits
    of 3σ saturate the softmax, so many float32 scores tie and only face_alignment's own sort
    over its 0.05 candidates orders them the same."""
    g = torch.Generator().manual_seed(11)
    outputs = []
    for level in range(6):
        side = 256 // 2 ** (level + 2)
        logits = torch.randn((2, 2, side, side), generator=g) * 3
        outputs += [logits, torch.randn((2, 4, side, side), generator=g) * 0.5]
    rows, boxes, scores = fan_gpu.s3fd_candidates(outputs)
    ours = fan_gpu.detections_from_candidates(rows, boxes, scores, 2)
    assert len(ours) > 4  # the random scores leave several faces per frame after NMS

    for frame in range(2):  # face_alignment's per-image path (detect_from_image), as the fan backend runs it
        olist = [(F_softmax(o) if i % 2 == 0 else o)[frame:frame + 1].numpy() for i, o in enumerate(outputs)]
        listed = fa_detect.get_predictions(olist, 1)[0]
        kept = listed[fa_bbox.nms(listed, 0.3)]
        kept = np.array([b for b in kept if b[-1] > 0.5])
        mine = ours.frame_rows == frame
        np.testing.assert_array_equal(ours.boxes_img_ydown[mine], kept[:, :4])
        np.testing.assert_array_equal(ours.scores[mine], kept[:, 4])


def F_softmax(logits):
    return torch.nn.functional.softmax(logits, dim=1)


# --- the backend ---------------------------------------------------------------------------------


@pytest.mark.slow  # 2D-FAN-4 on the CPU: 3 frames batched + 3 frames one by one by face_alignment
def test_landmarks_match_face_alignment(batched, video_frames, plain_numba, torch_home, monkeypatch):
    """fp32 BatchedFan == face_alignment ``get_landmarks_from_image(frame, detected_faces=[box])``.

    Expected difference 0 px: the crops are bit-identical (tests above), the network and its
    weights are the same, and the points are whole pixels (face_alignment truncates). What
    could differ is the fp32 convolution itself (a batch of 3 vs 1 may sum in another order,
    ~1e-7 relative), which moves a point only where a heat map's two best values are that
    close: then by a whole heat-map cell (200·scale/64 frame px) at most. Bound: every point
    within one heat-map cell + 1 px, at most 1 % of points off by anything, confidences within 1e-5.
    """
    boxes, iod = _boxes_and_iod(video_frames)
    boxes = boxes.copy()
    boxes[2] -= [250.0, 0.0, 250.0, 0.0]  # the last face half out of the frame: zero-padded crop
    faces = Detections(boxes, np.full(3, 0.99), np.arange(3), 3)
    ours = batched(_batch(video_frames), faces)

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    reference = fan_module.FanLandmarker("cpu", allow_download=False)
    ref = reference(_batch(video_frames), faces)
    reference.close()

    assert ours.valid.tolist() == ref.valid.tolist() == [True] * 3
    error = np.linalg.norm(ours.points_img_ydown - ref.points_img_ydown, axis=-1)  # (3, 68) px
    cell = 200.0 * fan_gpu.centre_and_scale(boxes)[1] / 64  # one heat-map pixel, frame px
    log.info("batched FAN vs face_alignment: max %.3f px, mean %.4f px (%.3f %% / %.4f %% of IOD %.1f px), "
             "%d of %d points differ", error.max(), error.mean(), 100 * error.max() / iod,
             100 * error.mean() / iod, iod, int((error > 0).sum()), error.size)
    assert (error <= cell[:, None] + 1).all()
    assert (error > 0).mean() <= 0.01
    np.testing.assert_allclose(ours.confidence, ref.confidence, rtol=0, atol=1e-5)
    # The random weights put peaks inside the heat maps too, so the quarter-pixel shift is exercised.
    centre, scale = fan_gpu.centre_and_scale(boxes)
    ul, br = fan_gpu.crop_windows(centre, scale)
    crops = fan_gpu.resize_windows(fan_gpu.gather_windows(video_frames, np.arange(3), ul, br), br - ul) / 255
    with torch.inference_mode():
        points, _ = fan_gpu.decode_heatmaps(batched._fan(crops)[-1])
    assert ((points > 1) & (points < 63)).all(-1).any()


@pytest.mark.slow  # 2D-FAN-4 on the CPU: 2 faces batched (in two forwards) + 2 one by one
def test_batch_equals_frames_one_by_one(torch_home, video_frames, monkeypatch):
    """Marking frames together (several forwards of max_batch faces) == marking each alone; a frame
    without a box gets an invalid no_face row and shifts nothing."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    backend = BatchedFan("cpu", precision="fp32", max_batch=1)
    frames = video_frames[:3]
    boxes = np.array([[130.0, 120.0, 390.0, 455.0], [140.5, 118.25, 385.0, 450.0]])
    faces = Detections(boxes, np.array([0.9, 0.8]), np.array([0, 2]), 3)  # frame 1: no face
    together = backend(_batch(frames), faces)
    assert together.valid.tolist() == [True, False, True]
    assert together.reason == ("", "no_face", "")
    assert np.isnan(together.points_img_ydown[1]).all() and np.isnan(together.confidence[1])
    for row, j in ((0, 0), (2, 1)):
        alone = backend(_batch(frames[row:row + 1]), Detections(boxes[j:j + 1], np.ones(1), np.zeros(1, np.int64), 1))
        np.testing.assert_array_equal(together.points_img_ydown[row], alone.points_img_ydown[0])
        np.testing.assert_allclose(together.confidence[row], alone.confidence[0], rtol=1e-6)
    backend.close()


def test_no_boxes_at_all_is_all_no_face(batched):
    lm = batched(_batch(np.zeros((2, 64, 80, 3), np.uint8)), Detections.empty(2))
    assert isinstance(batched, Landmarker)
    assert (batched.name, batched.num_points) == ("fan", 68)
    assert lm.valid.tolist() == [False, False] and lm.reason == ("no_face", "no_face")
    assert lm.points_img_ydown.shape == (2, 68, 2) and np.isnan(lm.points_img_ydown).all()
    assert np.isnan(lm.confidence).all()


def test_degenerate_boxes_mark_nothing(batched):
    """A NaN, empty or inverted box (a tracker's bad guess) is a no_face row, not a crash."""
    boxes = np.array([[np.nan, 1.0, 20.0, 20.0], [5.0, 5.0, 5.0, 30.0], [30.0, 30.0, 10.0, 10.0]])
    lm = batched(_batch(np.zeros((3, 64, 80, 3), np.uint8)), Detections(boxes, np.ones(3), np.arange(3), 3))
    assert lm.valid.tolist() == [False] * 3 and lm.reason == ("no_face",) * 3


# --- S3FD on downscaled frames ---------------------------------------------------------------


class BrightCellS3FD(torch.nn.Module):
    """A stand-in S3FD: a face at every stride-4 cell whose mean red level is bright (> 128), zero
    box regression (the box is the cell's 16×16 anchor); the other levels find nothing.
    It reads the network input face_alignment builds (BGR minus S3FD's means)."""

    def forward(self, x):
        red = x[:, 2:3].float() + 123.0  # back to 0…255
        outputs = []
        for level in range(6):
            stride = 2 ** (level + 2)
            n, _, h, w = x.shape
            size = (n, 1, -(-h // stride), -(-w // stride))
            face = torch.full(size, -30.0)
            if level == 0:
                bright = torch.nn.functional.avg_pool2d(red, 4, ceil_mode=True) > 128
                face = torch.where(bright, torch.full_like(face, 4.0), face)
            outputs += [torch.cat([torch.zeros(size), face], dim=1), torch.zeros((n, 4, size[2], size[3]))]
        return outputs


def _square_frames() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    frames = np.zeros((2, 720, 1280, 3), np.uint8)
    square = (400, 200, 464, 264)  # x1, y1, x2, y2 (exclusive), full-frame px
    frames[0, square[1]:square[3], square[0]:square[2]] = 255
    return frames, square


def test_detector_scales_boxes_back_to_the_full_frame(batched, monkeypatch):
    """S3FD on a 1280×720 frame downscaled to 640×360: boxes in full-frame pixels, near those
    face_alignment's detector finds with the same network on the full frame."""
    from face_alignment.detection.sfd.sfd_detector import SFDDetector

    frames, (x1, y1, x2, y2) = _square_frames()
    monkeypatch.setattr(batched, "_sfd", BrightCellS3FD())
    assert batched.detect_max_side == 640
    ours = batched.detector(_batch(frames))
    assert set(ours.frame_rows.tolist()) == {0}  # the black frame has no face
    assert (np.diff(ours.scores) <= 0).all()  # best first

    reference = SFDDetector.__new__(SFDDetector)
    reference.device, reference.filter_threshold, reference.face_detector = "cpu", 0.5, BrightCellS3FD()
    theirs = np.array(reference.detect_from_image(frames[0].copy()))[:, :4]

    centres = (ours.boxes_img_ydown[:, :2] + ours.boxes_img_ydown[:, 2:]) / 2
    assert ((centres >= [x1, y1]) & (centres <= [x2, y2])).all()  # full-frame pixels, not 640-wide ones
    sides = ours.boxes_img_ydown[:, 2:] - ours.boxes_img_ydown[:, :2]
    np.testing.assert_allclose(sides, 32.0)  # a 16-px anchor of the half-size frame
    # Both sets cover the square: their extents agree within a cell of the downscaled frame (8 px).
    np.testing.assert_allclose(ours.boxes_img_ydown[:, :2].min(0), theirs[:, :2].min(0), atol=8)
    np.testing.assert_allclose(ours.boxes_img_ydown[:, 2:].max(0), theirs[:, 2:].max(0), atol=8)


def test_detector_at_full_size_equals_face_alignment(batched, monkeypatch):
    """A frame no larger than detect_max_side is not resampled: face_alignment's boxes exactly."""
    from face_alignment.detection.sfd.sfd_detector import SFDDetector

    frames, _ = _square_frames()
    small = np.ascontiguousarray(frames[:, 100:400, 300:700])  # 400×300
    monkeypatch.setattr(batched, "_sfd", BrightCellS3FD())
    ours = batched.detect(_batch(small))
    reference = SFDDetector.__new__(SFDDetector)
    reference.device, reference.filter_threshold, reference.face_detector = "cpu", 0.5, BrightCellS3FD()
    theirs = np.array(reference.detect_from_image(small[0].copy()))
    np.testing.assert_array_equal(ours.boxes_img_ydown, theirs[:, :4])
    np.testing.assert_array_equal(ours.scores, theirs[:, 4])


def test_without_faces_it_marks_the_detectors_best_face(batched, monkeypatch):
    frames, _ = _square_frames()
    monkeypatch.setattr(batched, "_sfd", BrightCellS3FD())
    marked = []
    monkeypatch.setattr(batched, "mark", lambda images, rows, boxes: (
        marked.append((rows.tolist(), boxes.copy())) or (np.zeros((len(rows), 68, 2), np.float32),
                                                         np.ones((len(rows), 68), np.float32))))
    lm = batched(_batch(frames))
    assert lm.valid.tolist() == [True, False]
    best = batched.detect(_batch(frames))
    assert marked[0][0] == [0]
    np.testing.assert_array_equal(marked[0][1][0], best.boxes_img_ydown[np.argmax(best.scores)])


def test_detect_size():
    assert fan_gpu.detect_size(720, 1280, 640) == (360, 640)
    assert fan_gpu.detect_size(1920, 1080, 640) == (640, 360)
    assert fan_gpu.detect_size(300, 400, 640) == (300, 400)


# --- precision and weights -------------------------------------------------------------------


def test_fp16_loads_half_networks_with_fp32_l2_norms(torch_home, monkeypatch):
    """fp16: both networks in half precision except S3FD's L2 normalisations, which stay fp32
    because their sum of squares overflows fp16 (VGG activations of a few hundred)."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    backend = BatchedFan("cpu", precision="fp16")
    assert backend._fan.conv1.weight.dtype == torch.float16
    assert backend._sfd.conv1_1.weight.dtype == torch.float16
    assert backend._sfd.conv3_3_norm.weight.dtype == torch.float32
    x = torch.full((1, 512, 4, 4), 300.0, dtype=torch.float16)
    out = backend._sfd.conv4_3_norm(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and (out > 0).all()
    assert not torch.isfinite(x.pow(2).sum(dim=1)).all()  # what plain fp16 would have done

    # The whole fp16 pipeline, with tiny half-precision stand-ins for the two networks.
    class TinyFan(torch.nn.Module):
        def forward(self, x):
            assert x.dtype == torch.float16 and x.shape[1:] == (3, 256, 256)
            return [torch.nn.functional.avg_pool2d(x[:, :1], 4).repeat(1, 68, 1, 1)]

    class HalfS3FD(BrightCellS3FD):
        def forward(self, x):
            assert x.dtype == torch.float16
            return [o.half() for o in super().forward(x)]

    monkeypatch.setattr(backend, "_fan", TinyFan())
    monkeypatch.setattr(backend, "_sfd", HalfS3FD())
    frames, _ = _square_frames()
    lm = backend(_batch(frames))
    assert lm.valid.tolist() == [True, False]
    assert lm.points_img_ydown.dtype == np.float32 and np.isfinite(lm.points_img_ydown[0]).all()
    backend.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "a real fp16 2D-FAN-4 forward on the CPU takes minutes (PyTorch has no fast half-precision CPU "
    "convolutions: ~6 min for one 256² crop on 2 cores); fp16 is a GPU setting"))
def test_fp16_on_cuda_close_to_fp32(torch_home, video_frames, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    boxes = np.array([[130.0, 120.0, 390.0, 455.0]] * 3)
    faces = Detections(boxes, np.ones(3), np.arange(3), 3)
    half = BatchedFan("cuda", precision="fp16")(_batch(video_frames), faces)
    full = BatchedFan("cuda", precision="fp32")(_batch(video_frames), faces)
    cell = 200.0 * fan_gpu.centre_and_scale(boxes)[1][0] / 64
    error = np.linalg.norm(half.points_img_ydown - full.points_img_ydown, axis=-1)
    assert np.median(error) <= cell + 1


def test_unknown_precision_is_refused(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with pytest.raises(ValueError, match="precision must be one of fp16, fp32"):
        BatchedFan("cpu", precision="bf16")


def test_missing_weights_error_is_the_fan_backends(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsMissingError) as info:
        BatchedFan("cpu", allow_download=False)
    with pytest.raises(WeightsMissingError) as theirs:
        fan_module.FanLandmarker("cpu", allow_download=False)
    assert str(info.value) == str(theirs.value)
    assert "\n" not in str(info.value)


def test_broken_weights_are_a_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = fan_module.weights_dir()
    folder.mkdir(parents=True)
    for name, _ in fan_module.WEIGHTS:
        (folder / name).write_bytes(b"<html>captive portal</html>")
    with pytest.raises(WeightsError, match=r"do not load .*replace the broken file") as info:
        BatchedFan("cpu", allow_download=False)
    assert not isinstance(info.value, WeightsMissingError)
    assert str(folder) in str(info.value)


def test_wrong_layout_is_a_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = fan_module.weights_dir()
    folder.mkdir(parents=True)
    for name, _ in fan_module.WEIGHTS:
        torch.save({"conv1.weight": torch.zeros(1)}, folder / name)
    with pytest.raises(WeightsError, match=r"do not load .*replace the broken file"):
        BatchedFan("cpu", allow_download=False)


class _RunsCode:
    """Unpickling it would run ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_weights_asking_for_code_are_refused(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = fan_module.weights_dir()
    folder.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    for name, _ in fan_module.WEIGHTS:
        torch.save({"x": _RunsCode(f"touch {marker}")}, folder / name)
    system = "posix.system" if os.name == "posix" else "nt.system"
    with pytest.raises(WeightsError, match=rf"asks for the Python object '{system}'"):
        BatchedFan("cpu", allow_download=False)
    assert not marker.exists()
