"""The frame viewer's three pictures for one frame: original + landmarks, aligned crop, face overlay.

No Streamlit here. The crop is recomputed with :func:`engine.align.align_image` from the stored
landmarks (numpy + Pillow, no torch); the overlay needs the face model and loads
:mod:`engine.face3d` (torch) only when asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dashboard.frames import LM68_COLOUR, draw_points, has_points
from dashboard.results import ResultData
from engine.conventions import crop_yup_to_ydown

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameViews:
    """What the viewer shows for one frame.

    Attributes:
        original: the decoded frame with its detector landmarks (cyan) and, when the face model
            was set up for the run, the model's 68 re-projected landmarks (magenta); no points on
            a frame flagged invalid (no face), whose landmarks are only filler.
        crop: the aligned 224×224 crop the network saw, with the landmarks mapped into it;
            None when it could not be rebuilt (``crop_note`` says why).
        crop_note: one line about the crop ("" when nothing to say).
    """

    original: Image.Image
    crop: Image.Image | None
    crop_note: str


def frame_views(frame_rgb: np.ndarray, data: ResultData, index: int) -> FrameViews:
    """Build the original-with-landmarks and aligned-crop pictures of frame ``index``.

    Args:
        frame_rgb: uint8 (H, W, 3) RGB, y down: the decoded frame.
        data: the job's results.
        index: 0-based frame index into ``data``.
    """
    from engine.align import AlignmentError, align_image, template_fallback_img_yup

    lm_img_ydown = data.landmarks_img_ydown[index] if data.landmarks_img_ydown.size else None
    usable = has_points(lm_img_ydown)
    face_found = bool(data.df["valid"].iloc[index])  # no face: the landmarks are filler, never drawn
    original = draw_points(frame_rgb, lm_img_ydown if usable and face_found else None)
    if data.lm68_img_ydown is not None and face_found:
        original = draw_points(original, data.lm68_img_ydown[index], LM68_COLOUR)

    height, width = frame_rgb.shape[:2]
    note = ""
    try:
        if usable:
            face = align_image(frame_rgb, np.asarray(lm_img_ydown, dtype=np.float32))
        else:
            face = align_image(frame_rgb, lm_img_yup=template_fallback_img_yup(width, height))
            note = "No landmarks for this frame: the crop uses the centred template, as the engine did."
    except AlignmentError as e:
        return FrameViews(original, None, f"The crop cannot be rebuilt: {e}")
    stored = data.transform_params[index].astype(np.float64)
    if not np.allclose(face.trans_params, stored, rtol=1e-4, atol=1e-2):
        note = (note + " " if note else "") + (
            "The recomputed crop differs from the stored transform_params "
            "(the video may have changed since extraction)."
        )
    crop = Image.fromarray(face.crop)
    if usable and face_found:
        crop = draw_points(crop, crop_yup_to_ydown(face.lm_224_yup))
    if not face_found:
        note = (note + " " if note else "") + "No face in this frame: no landmarks are drawn."
    return FrameViews(original, crop, note)


def overlay_image(
    frame_rgb: np.ndarray, data: ResultData, index: int, face_model=None, renderer=None
) -> tuple[Image.Image | None, str]:
    """The reconstructed face drawn over frame ``index``, or ``(None, why not)``.

    Uses :func:`engine.face3d.overlay_image` (torch, on the CPU): the rendered face pasted back
    into the frame with the detector landmarks (blue), the face model's 68 landmarks (red) and a
    red border on frames flagged invalid. Pass a loaded ``face_model`` and ``renderer`` to reuse
    them. Any failure becomes the message.
    """
    try:
        from engine.face3d import face_model_available
    except ImportError:
        return None, "The face-model renderer is not installed in this version."
    if not face_model_available():
        return None, "The face model (BFM) is not set up, so the reconstructed face cannot be drawn."
    lm_img_ydown = data.landmarks_img_ydown[index] if data.landmarks_img_ydown.size else None
    try:
        from engine.face3d import overlay_image as render

        pair = render(
            frame_rgb,
            data.coeff[index],
            data.transform_params[index],
            face_model,
            renderer,
            valid=bool(data.df["valid"].iloc[index]),
            detector_landmarks_img_ydown=lm_img_ydown if has_points(lm_img_ydown) else None,
            exact_box=None if data.crop_box is None else data.crop_box[index],
        )
    except Exception as e:
        log.exception("overlay of frame %d failed", index)
        return None, f"The reconstructed face could not be drawn: {e}"
    height, width = frame_rgb.shape[:2]
    half = pair.shape[1] // 2  # [original | overlay], each padded to an even width
    return Image.fromarray(np.ascontiguousarray(pair[:height, half : half + width])), ""


def mesh_bytes(face_model, data: ResultData, index: int, fmt: str) -> bytes:
    """Frame ``index``'s reconstructed face as an ``"obj"`` (vertex colours) or ``"ply"`` file,
    in Deep3D's world coordinates (see :mod:`engine.face3d.mesh`)."""
    from engine.face3d.mesh import frame_mesh

    out = frame_mesh(face_model, data.coeff[index]).export(file_type=fmt)
    return out.encode() if isinstance(out, str) else out
