"""Landmark backends (engine.landmarks): one contract for every backend, plus each backend's own rules."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import EngineConfig, LandmarkBackend
from engine.errors import InputError, WeightsError, WeightsMissingError
from engine.landmarks import (
    BACKENDS,
    Landmarker,
    available_backends,
    create_landmarker,
    needs_source,
)
from engine.landmarks.file import FileLandmarker, keypoint_candidates, load_keypoints
from engine.sources import discover_inputs, iter_frames
from engine.structures import FrameBatch, Landmarks
from tests import media

IMAGE_NAMES = ("000002.jpg", "000006.jpg", "000031.jpg", "015259.jpg", "vd006.png")
LM68_TO_5 = ((36, 39), (42, 45), (30,), (48,), (54,))  # spec §2.2, 0-based, final order


def _batch(images: np.ndarray, start: int = 0) -> FrameBatch:
    n = len(images)
    return FrameBatch(images, np.arange(start, start + n, dtype=np.int64), np.arange(n) / 25.0)


def _image_batch(path: Path) -> FrameBatch:
    return next(iter_frames(path, 1))


def _deep3d_detection(path: Path) -> np.ndarray:
    return np.loadtxt(path.parent / "detections" / (path.stem + ".txt")).astype(np.float32)


def _to_5(points: np.ndarray) -> np.ndarray:
    if points.shape[0] == 5:
        return points
    return np.stack([points[list(ix)].mean(axis=0) for ix in LM68_TO_5])


def _check_contract(lm: Landmarks, n: int, k: int) -> None:
    assert isinstance(lm, Landmarks)
    assert lm.points_img_ydown.shape == (n, k, 2) and lm.points_img_ydown.dtype == np.float32
    assert lm.valid.shape == (n,) and lm.valid.dtype == bool
    assert isinstance(lm.reason, tuple) and len(lm.reason) == n
    for row, valid, reason in zip(lm.points_img_ydown, lm.valid, lm.reason, strict=True):
        assert (reason == "") == bool(valid)
        assert np.isfinite(row).all() if valid else np.isnan(row).all()


# --- registry -------------------------------------------------------------------------------


def test_registry_matches_config_enum_and_import_is_lazy():
    assert set(BACKENDS) == {b.value for b in LandmarkBackend}
    assert needs_source(EngineConfig(landmarks="file")) and not needs_source("mtcnn")
    with pytest.raises(ValueError, match="source"):
        create_landmarker(EngineConfig(landmarks="file"), "cpu")
    code = (
        "import sys, engine.landmarks, engine.sources; "
        "print(sorted(m for m in ('torch', 'av', 'face_alignment', 'facenet_pytorch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_available_backends_reports_each_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    status = {s.name: s for s in available_backends()}
    assert set(status) == set(BACKENDS)
    assert status["file"].available
    assert status["mtcnn"].available, status["mtcnn"].message
    assert not status["fan"].available
    assert "s3fd-619a316812.pth" in status["fan"].message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in status["fan"].message


# --- the contract, for every backend that can run here ----------------------------------------


@pytest.fixture(scope="module")
def mtcnn():
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch not installed")
    return create_landmarker(EngineConfig(landmarks="mtcnn"), "cpu")


@pytest.fixture(scope="module")
def fan():
    from engine.landmarks import fan as fan_module

    missing = fan_module.missing_weights()
    if missing:
        pytest.skip(f"face_alignment weights not in {fan_module.weights_dir()}: {', '.join(missing)}")
    return create_landmarker(EngineConfig(landmarks="fan"), "cpu")


def _backend(request, name: str, image: Path) -> Landmarker:
    if name == "file":
        return create_landmarker(EngineConfig(landmarks="file"), "cpu", image)
    return request.getfixturevalue(name)


FAN = pytest.param("fan", marks=pytest.mark.slow)  # S3FD + FAN on CPU plus numba's first-call JIT


@pytest.mark.parametrize("name", ["mtcnn", "file", FAN])
def test_contract_real_faces_near_deep3d_detections(request, test_images, name):
    names = IMAGE_NAMES if name == "file" else IMAGE_NAMES[2:]  # the smaller images for networks
    for image_name in names:
        path = test_images / image_name
        backend = _backend(request, name, path)
        assert isinstance(backend, Landmarker) and backend.name == name
        batch = _image_batch(path)
        lm = backend(batch)
        _check_contract(lm, 1, backend.num_points)
        assert lm.valid.tolist() == [True], image_name
        h, w = batch.images.shape[1:3]
        pts = lm.points_img_ydown[0]
        assert (pts >= 0).all() and (pts[:, 0] < w).all() and (pts[:, 1] < h).all()
        det = _deep3d_detection(path)
        err = np.linalg.norm(_to_5(pts) - det, axis=1)
        # MTCNN-family points: within 10 px. FAN's 5 points are built from eye corners (spec §2.2),
        # a different definition: allow 20% of the inter-ocular distance.
        tolerance = 10.0 if name != "fan" else 0.2 * float(np.linalg.norm(det[1] - det[0]))
        assert err.max() < tolerance, f"{image_name}: {err.round(1)} px from Deep3D's detections"


@pytest.mark.parametrize("name", ["mtcnn", FAN])
def test_contract_faceless_frames(request, name):
    backend = request.getfixturevalue(name)
    lm = backend(_batch(np.full((2, 120, 160, 3), (90, 140, 200), dtype=np.uint8)))
    _check_contract(lm, 2, backend.num_points)
    assert lm.valid.tolist() == [False, False] and lm.reason == ("no_face", "no_face")
    empty = backend(_batch(np.zeros((0, 120, 160, 3), dtype=np.uint8)))
    _check_contract(empty, 0, backend.num_points)


@pytest.mark.parametrize("batch_frames", [False, True])
def test_mtcnn_mixed_batch_keeps_frame_order(mtcnn, test_images, batch_frames):
    face = _image_batch(test_images / "vd006.png").images[0]
    blank = np.full_like(face, 128)
    backend = copy.copy(mtcnn)  # same networks
    backend.batch_frames = batch_frames
    lm = backend(_batch(np.stack([blank, face, blank])))
    _check_contract(lm, 3, 5)
    assert lm.valid.tolist() == [False, True, False]
    assert lm.reason == ("no_face", "", "no_face")
    alone = mtcnn(_batch(face[None])).points_img_ydown[0]
    np.testing.assert_allclose(lm.points_img_ydown[1], alone, atol=0.01)


def test_mtcnn_order_matches_deep3d(mtcnn, test_images):
    pts = mtcnn(_image_batch(test_images / "000006.jpg")).points_img_ydown[0]
    left_eye, right_eye, nose, mouth_l, mouth_r = pts
    assert left_eye[0] < right_eye[0] and mouth_l[0] < mouth_r[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1])  # y down


# --- file backend ---------------------------------------------------------------------------


def _pirender_txt(path: Path, points: np.ndarray) -> Path:
    np.savetxt(path, points.reshape(-1))  # PIRender: one value per line, %.18e
    return path


def _random_points(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, k, 2)) * [64, 48]).astype(np.float32)


@pytest.mark.parametrize("k", [68, 5])
def test_file_pirender_txt_round_trip(tmp_path, k):
    video = media.make_video(tmp_path / "clip.mp4", 6)
    points = _random_points(6, k)
    points[[0, 3]] = -1.0  # PIRender's "no face" rows
    _pirender_txt(tmp_path / "clip.txt", points)

    backend = create_landmarker(EngineConfig(landmarks="file"), "cpu", video)
    assert (backend.name, backend.num_points, backend.num_frames) == ("file", k, 6)
    lm = backend(next(iter_frames(video, 6)))
    _check_contract(lm, 6, k)
    assert lm.valid.tolist() == [False, True, True, False, True, True]
    assert lm.reason[0] == "no_face"
    np.testing.assert_array_equal(lm.points_img_ydown[lm.valid], points[[1, 2, 4, 5]])
    later = backend(_batch(np.zeros((2, 4, 4, 3), np.uint8), start=4))  # served by frame index
    np.testing.assert_array_equal(later.points_img_ydown, points[4:6])
    backend.check_frame_count(6)
    with pytest.raises(InputError, match="decoded to 5"):
        backend.check_frame_count(5)
    with pytest.raises(InputError, match="has frame 7"):
        backend(_batch(np.zeros((2, 4, 4, 3), np.uint8), start=6))


def test_file_detections_of_shared_images(test_images):
    for image_name in IMAGE_NAMES:
        backend = FileLandmarker.for_input(test_images / image_name)
        assert (backend.num_points, backend.num_frames) == (5, 1)
        lm = backend(_batch(np.zeros((1, 2, 2, 3), np.uint8)))
        np.testing.assert_array_equal(lm.points_img_ydown[0], _deep3d_detection(test_images / image_name))


def test_file_point_count_chosen_by_frame_count(tmp_path):
    path = _pirender_txt(tmp_path / "k.txt", np.arange(680, dtype=np.float32))  # 5×68×2 = 68×5×2
    assert load_keypoints(path, frame_count=5).shape == (5, 68, 2)
    assert load_keypoints(path, frame_count=68).shape == (68, 5, 2)
    assert load_keypoints(path).shape == (5, 68, 2)
    bad = _pirender_txt(tmp_path / "bad.txt", np.arange(7, dtype=np.float32))
    with pytest.raises(InputError, match="7 values are not a whole number"):
        load_keypoints(bad)
    junk = media.make_text_file(tmp_path / "junk.txt", "hello\n")
    with pytest.raises(InputError, match="not a landmark file"):
        load_keypoints(junk)


def test_file_frame_count_mismatch_is_an_input_error(tmp_path):
    video = media.make_video(tmp_path / "clip.mp4", 6)
    _pirender_txt(tmp_path / "clip.txt", _random_points(10, 68))
    with pytest.raises(InputError, match=r"landmarks for 10 frames but .*clip\.mp4 has 6"):
        create_landmarker(EngineConfig(landmarks="file"), "cpu", video)


def test_file_missing_lists_paths_tried(tmp_path):
    video = media.make_video(tmp_path / "clip.mp4", 2)
    with pytest.raises(InputError) as info:
        create_landmarker(EngineConfig(landmarks="file"), "cpu", video)
    message = str(info.value)
    assert "no landmark file found" in message
    assert str(tmp_path / "clip.txt") in message and str(tmp_path / "clip_landmarks.txt") in message
    with pytest.raises(InputError, match="keypoints file or folder not found"):
        create_landmarker(EngineConfig(landmarks="file", keypoints=tmp_path / "nope"), "cpu", video)


def test_file_keypoints_folder_mirrors_input_tree(tmp_path):
    (tmp_path / "in" / "train").mkdir(parents=True)
    media.make_video(tmp_path / "in" / "train" / "a.mp4", 3)
    (tmp_path / "kp" / "train").mkdir(parents=True)
    points = _random_points(3, 68)
    _pirender_txt(tmp_path / "kp" / "train" / "a.txt", points)
    (item,) = discover_inputs([tmp_path / "in"])
    config = EngineConfig(landmarks="file", keypoints=tmp_path / "kp")
    backend = create_landmarker(config, "cpu", item)
    assert backend.source_file == tmp_path / "kp" / "train" / "a.txt"
    # A single file given directly also finds PIRender's <keypoints>/<parent>/<stem>.txt ...
    direct = create_landmarker(config, "cpu", tmp_path / "in" / "train" / "a.mp4")
    assert direct.source_file == tmp_path / "kp" / "train" / "a.txt"
    # ... and a keypoints .txt file is used as is.
    single = create_landmarker(EngineConfig(landmarks="file", keypoints=tmp_path / "kp" / "train" / "a.txt"),
                               "cpu", item)
    np.testing.assert_array_equal(single(_batch(np.zeros((3, 2, 2, 3), np.uint8))).points_img_ydown, points)
    assert keypoint_candidates(item, tmp_path / "kp") == [tmp_path / "kp" / "train" / "a.txt"]


# --- fan ------------------------------------------------------------------------------------


def test_fan_missing_weights_error_names_files_folder_and_urls(tmp_path, monkeypatch):
    from engine.landmarks import fan as fan_module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsMissingError) as info:
        fan_module.FanLandmarker("cpu", allow_download=False)
    message = str(info.value)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert str(folder) in message
    for name, url in fan_module.WEIGHTS:
        assert name in message and url in message
    assert "\n" not in message


def test_fan_broken_weights_are_a_weights_error(tmp_path, monkeypatch):
    pytest.importorskip("face_alignment", reason="face_alignment not installed")
    from engine.landmarks import fan as fan_module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = fan_module.weights_dir()
    folder.mkdir(parents=True)
    for name, _ in fan_module.WEIGHTS:
        (folder / name).write_bytes(b"<html>captive portal</html>")
    with pytest.raises(WeightsError, match=r"do not load .*replace the broken file") as info:
        fan_module.FanLandmarker("cpu", allow_download=False)
    assert not isinstance(info.value, WeightsMissingError)
    assert str(folder) in str(info.value)


def test_fan_weight_names_match_face_alignment_source():
    pytest.importorskip("face_alignment", reason="face_alignment not installed")
    from face_alignment import api
    from face_alignment.detection.sfd import sfd_detector

    from engine.landmarks.fan import WEIGHTS

    assert [url for _, url in WEIGHTS] == [sfd_detector.models_urls["s3fd"], api.models_urls["2DFAN-4"]]
    assert all(url.endswith("/" + name) for name, url in WEIGHTS)


def _zero_state_dict(module_factory, torch):
    """A state dict of the module's layout holding zeros (running variances 1), in tiny files.

    Weight tensors are broadcast views of a one-element storage, so ``torch.save`` writes
    kilobytes instead of ~90 MB. S3FD's class-score biases favour "background" strongly
    (the last channel is "face"), so the detector finds nothing, quickly.
    """
    with torch.device("meta"):
        layout = module_factory().state_dict()
    out = {}
    for key, t in layout.items():
        if "conf" in key and key.endswith("bias"):
            out[key] = torch.zeros(t.shape, dtype=t.dtype)
            out[key][-1] = -30.0
            continue
        fill = 1.0 if key.endswith("running_var") else 0.0
        out[key] = torch.full((1,) * t.dim(), fill, dtype=t.dtype).expand(t.shape)
    return out


@pytest.mark.slow  # 2D-FAN-4 forwards on the CPU: ~2 s on an idle 2-core machine, 10+ s when shared
def test_fan_wiring_with_stand_in_weights(tmp_path, monkeypatch):
    """Real face_alignment code path with stand-in weights of the same layout (no real weights here).

    S3FD finds no face with them; a stubbed detection box then drives 2D-FAN-4 once per frame.
    face_alignment's two numba functions run as plain Python here: their first-call JIT
    compile costs 5-30 s per process, which this test does not need to pay.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("face_alignment", reason="face_alignment not installed")
    from face_alignment import utils as fa_utils
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    for name in ("transform_np", "_get_preds_fromhm"):
        monkeypatch.setattr(fa_utils, name, getattr(fa_utils, name).py_func)

    from engine.landmarks import fan as fan_module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = fan_module.weights_dir()
    folder.mkdir(parents=True)
    torch.save(_zero_state_dict(s3fd, torch), folder / fan_module.WEIGHTS[0][0])
    torch.save(_zero_state_dict(lambda: FAN(4), torch), folder / fan_module.WEIGHTS[1][0])
    assert fan_module.missing_weights() == []

    backend = create_landmarker(EngineConfig(landmarks="fan"), "cpu")
    assert (backend.name, backend.num_points) == ("fan", 68)
    images = np.full((2, 96, 128, 3), 100, dtype=np.uint8)
    lm = backend(_batch(images))
    _check_contract(lm, 2, 68)
    assert lm.valid.tolist() == [False, False]
    assert lm.confidence is not None and np.isnan(lm.confidence).all()  # no face: no confidence

    # Two faces, best first (as S3FD sorts them): the landmarks must come from the first box.
    boxes = [np.array([10.0, 20.0, 50.0, 60.0, 0.99]), np.array([75.0, 20.0, 115.0, 60.0, 0.90])]
    monkeypatch.setattr(backend._fa.face_detector, "detect_from_image", lambda image: boxes)
    lm = backend(_batch(images[:1]))  # one frame: 2D-FAN-4 runs once per box on the CPU
    _check_contract(lm, 1, 68)
    assert lm.valid.tolist() == [True]
    assert lm.points_img_ydown[:, :, 0].max() < 50  # left box, not the right one
    # FAN's own confidence: the mean heat-map peak of its 68 points (0 with these zero weights).
    assert lm.confidence.dtype == np.float32 and lm.confidence.shape == (1,) and 0.0 <= lm.confidence[0] <= 1.0
    backend.close()


def test_deep3d_detections_are_y_down(test_images):
    """Sanity check of the shared data the contract compares with: eyes above the mouth, y down."""
    path = test_images / "000002.jpg"
    det = _deep3d_detection(path)
    h = Image.open(path).size[1]
    assert det[:2, 1].max() < det[3:, 1].min() < h
