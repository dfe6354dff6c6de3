"""Review artifacts (engine/face3d/overlay.py, mesh.py): paste-back geometry, overlay video, meshes, lm68."""

from __future__ import annotations

import av
import numpy as np
import pytest
import trimesh

from engine.align import align_image, template_fallback_img_yup
from engine.conventions import crop_to_img_yup, img_yup_to_ydown
from engine.errors import InputError
from engine.face3d.mesh import export_mesh
from engine.face3d.model import ParametricFaceModel, lm68_extras, reproject_landmarks
from engine.face3d.overlay import (
    crop_box,
    load_result,
    overlay_frame,
    paste_into_frame,
    render_crops,
    write_overlay_video,
)
from engine.face3d.render import FaceRenderer
from engine.sources import iter_frames
from tests.face3d_helpers import cut_clip, face_model, random_coeff, synthetic_bfm  # noqa: F401

N_FRAMES = 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory, test_video):
    """The first frames of the shared clip with its AAC audio (stream copy)."""
    return cut_clip(test_video, tmp_path_factory.mktemp("overlay") / "clip.mp4", N_FRAMES)


@pytest.fixture(scope="module")
def clip_result(clip, tmp_path_factory):
    """An engine-style npz for ``clip``: template-aligned frames, small random coefficients."""
    frames = next(iter(iter_frames(clip, 64))).images
    h, w = frames.shape[1:3]
    lm_yup = template_fallback_img_yup(w, h) * 1.1 - np.array([w * 0.05, h * 0.06])
    aligned = align_image(frames[0], lm_img_yup=lm_yup)
    n = len(frames)
    coeff = random_coeff(n, seed=1, pose=0.1)
    coeff[:, 224:] = 0
    path = tmp_path_factory.mktemp("result") / "clip.npz"
    np.savez(
        path,
        coeff=coeff,
        transform_params=np.repeat(aligned.trans_params[None].astype(np.float32), n, 0),
        valid=np.arange(n) != 2,
        landmarks=np.full((n, 5, 2), 100.0, np.float32),
    )
    return path


def test_crop_box_recovers_align_img_box(test_images):
    from PIL import Image

    img_path = sorted(p for p in test_images.iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
    det = test_images / "detections" / f"{img_path.stem}.txt"
    frame = np.asarray(Image.open(img_path).convert("RGB"))
    aligned = align_image(frame, np.loadtxt(det, dtype=np.float32).reshape(-1, 2))
    box = crop_box(aligned.trans_params)
    assert (box.left, box.up, box.w, box.h) == aligned.crop_box
    box32 = crop_box(aligned.trans_params.astype(np.float32))
    assert abs(box32.left - box.left) <= 1 and abs(box32.up - box.up) <= 1


def test_pasting_the_crop_back_restores_the_frame(test_video):
    frame = next(iter(iter_frames(test_video, 1))).images[0]
    h, w = frame.shape[:2]
    lm_yup = template_fallback_img_yup(w, h) * 0.83 + np.array([w * 0.1, h * 0.05])
    aligned = align_image(frame, lm_img_yup=lm_yup)
    assert crop_box(aligned.trans_params.astype(np.float32)) == crop_box(aligned.trans_params)
    rgb = aligned.crop.astype(np.float32) / 255
    mask = np.ones((224, 224), np.float32)
    # Paste over a black frame: exactly the crop's footprint is filled, with the frame's content.
    black = np.zeros_like(frame)
    back = paste_into_frame(black, rgb, mask, aligned.trans_params.astype(np.float32))
    filled = back.max(axis=2) > 0
    ys, xs = np.nonzero(filled)
    box = crop_box(aligned.trans_params)
    sx, sy = box.w / w, box.h / h
    assert abs(xs.min() - box.left / sx) <= 2 and abs(xs.max() - (box.left + 224) / sx) <= 2
    assert abs(ys.min() - box.up / sy) <= 2 and abs(ys.max() - (box.up + 224) / sy) <= 2
    inner = np.zeros_like(filled)
    inner[ys.min() + 3 : ys.max() - 3, xs.min() + 3 : xs.max() - 3] = True
    diff = np.abs(back.astype(int) - frame.astype(int))[inner]
    assert diff.mean() < 5  # resampled twice (bicubic down, bilinear up); 1 px off gives ~50% more


def test_reprojected_landmarks_frames(face_model, clip_result, synthetic_bfm):  # noqa: F811
    res = load_result(clip_result)
    lm_img = reproject_landmarks(face_model, res.coeff, res.trans_params)
    lm_crop = reproject_landmarks(face_model, res.coeff, res.trans_params, space="crop")
    assert lm_img.shape == lm_crop.shape == (N_FRAMES, 68, 2) and lm_img.dtype == np.float32
    lm_224_yup = face_model.landmarks_224_yup(res.coeff).numpy()
    np.testing.assert_allclose(lm_crop, np.stack([lm_224_yup[..., 0], 223 - lm_224_yup[..., 1]], -1), atol=1e-4)
    want = img_yup_to_ydown(crop_to_img_yup(lm_224_yup[0], res.trans_params[0]), 512)
    np.testing.assert_allclose(lm_img[0], want, atol=1e-3)
    # The cheap 68-vertex path equals the full model's projection.
    full = face_model.compute_for_render(res.coeff[:2]).lm68_224_yup.numpy()
    np.testing.assert_allclose(lm_224_yup[:2], full, atol=1e-3)
    bad = res.trans_params.copy()
    bad[1, 2] = 0  # unusable alignment → NaN row in image space
    assert np.isnan(reproject_landmarks(face_model, res.coeff, bad)[1]).all()

    extras = lm68_extras(res.coeff, res.trans_params, ParametricFaceModel.from_dir(synthetic_bfm, "cpu"))
    assert set(extras) == {"lm68", "lm68_224_ydown"}
    np.testing.assert_allclose(extras["lm68"], lm_img, atol=1e-4)


def test_overlay_video_keeps_frames_fps_and_audio(clip, clip_result, face_model, tmp_path):  # noqa: F811
    out = tmp_path / "clip.overlay.mp4"
    seen = []
    rep = write_overlay_video(clip, clip_result, out, face_model=face_model, renderer=FaceRenderer("cpu"),
                              batch_size=4, progress=lambda d, t: seen.append(d))
    assert rep.frames == N_FRAMES and rep.audio == "copied" and rep.backend == "torch" and rep.unmatched == 0
    assert seen[-1] == N_FRAMES
    with av.open(str(clip)) as a, av.open(str(out)) as b:
        va, vb = a.streams.video[0], b.streams.video[0]
        assert vb.average_rate == va.average_rate
        assert (vb.width, vb.height) == (2 * va.width, va.height)
        assert len(b.streams.audio) == 1 and b.streams.audio[0].codec_context.name == "aac"
        frames_in = [f.to_ndarray(format="rgb24") for f in a.decode(va)]
        frames_out = [f.to_ndarray(format="rgb24") for f in b.decode(vb)]
    assert len(frames_out) == len(frames_in) == N_FRAMES
    w = va.width
    left, right = frames_out[0][:, :w].astype(int), frames_out[0][:, w:].astype(int)
    assert np.abs(left - frames_in[0]).mean() < 4  # the original, through one more encode
    changed = np.abs(right - frames_in[0]).max(axis=2) > 40
    assert 0.05 < changed.mean() < 0.6  # the face is drawn over part of the frame
    ys, xs = np.nonzero(changed)
    assert abs(xs.mean() - w / 2) < 80 and abs(ys.mean() - va.height / 2) < 100  # where the template put it
    # Frame 2 is flagged invalid: red border on the overlay side.
    border = frames_out[2][va.height // 2, w + 1]
    assert border[0] > 180 and border[1] < 80 and border[2] < 80
    assert not list(tmp_path.glob(".*partial*"))


def test_overlay_frame_on_demand(clip, clip_result, face_model):  # noqa: F811
    renderer = FaceRenderer("cpu")
    img = overlay_frame(clip, clip_result, 3, face_model=face_model, renderer=renderer)
    assert img.shape == (512, 1024, 3) and img.dtype == np.uint8
    with pytest.raises(InputError, match="outside the result"):
        overlay_frame(clip, clip_result, N_FRAMES, face_model=face_model, renderer=renderer)
    renders = render_crops(face_model, renderer, load_result(clip_result).coeff[:1])
    assert renders.rgb.shape == (1, 224, 224, 3) and 0.1 < renders.mask.mean() < 0.8


def test_mesh_export_obj_and_ply(face_model, clip_result, tmp_path):  # noqa: F811
    coeff = load_result(clip_result).coeff[1]
    world = face_model.world_vertices(coeff[None])[0].numpy()
    for suffix in (".obj", ".ply"):
        path = export_mesh(face_model, coeff, tmp_path / f"face{suffix}")
        mesh = trimesh.load(path, process=False)
        assert mesh.vertices.shape == (35709, 3) and mesh.faces.shape == (70789, 3)
        np.testing.assert_allclose(mesh.vertices, world, atol=1e-6)
        np.testing.assert_array_equal(mesh.faces, face_model.tri.numpy())
        colours = np.asarray(mesh.visual.vertex_colors)[:, :3]
        assert colours.shape == (35709, 3) and 50 < colours.mean() < 250
    with pytest.raises(InputError, match="mesh format"):
        export_mesh(face_model, coeff, tmp_path / "face.stl")


def test_cli_mesh_and_overlay(clip, clip_result, synthetic_bfm, tmp_path, capsys):  # noqa: F811
    from engine.cli import main

    obj = tmp_path / "f.obj"
    assert main(["mesh", str(clip_result), "--frame", "2", "-o", str(obj), "--bfm", str(synthetic_bfm)]) == 0
    assert trimesh.load(obj, process=False).vertices.shape == (35709, 3)
    assert main(["mesh", str(clip_result), "--frame", "99", "-o", str(obj), "--bfm", str(synthetic_bfm)]) == 1
    assert "outside" in capsys.readouterr().err
    out = tmp_path / "o.mp4"
    args = ["overlay", str(clip), str(clip_result), "-o", str(out), "--bfm", str(synthetic_bfm),
            "--device", "cpu", "--renderer", "torch"]
    assert main(args) == 0
    assert f"{N_FRAMES} frames at 25 fps, audio copied" in capsys.readouterr().out


def test_overlay_of_an_image_input(test_images, face_model, tmp_path):  # noqa: F811
    from PIL import Image

    img_path = sorted(p for p in test_images.iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
    frame = np.asarray(Image.open(img_path).convert("RGB"))
    det = np.loadtxt(test_images / "detections" / f"{img_path.stem}.txt", dtype=np.float32).reshape(-1, 2)
    tp = align_image(frame, det).trans_params.astype(np.float32)
    npz = tmp_path / "img.npz"
    np.savez(npz, coeff=np.zeros((1, 257), np.float32), transform_params=tp[None], valid=np.ones(1, bool))
    rep = write_overlay_video(img_path, npz, tmp_path / "img.overlay.png", face_model=face_model)
    out = np.asarray(Image.open(rep.path))
    assert rep.frames == 1 and out.shape[1] >= 2 * frame.shape[1] and out.shape[0] >= frame.shape[0]
