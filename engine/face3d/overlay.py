"""Review visuals: the reconstructed face drawn back onto the input frames (spec §2.5, §4).

For each frame the face is rendered in its 224 crop (Deep3D's camera), then the crop is put
back where ``align_img`` took it from: the crop is the box ``(left, up, 224, 224)`` of the
frame resized to ``(w, h) = int32((w0, h0)·s)``, so every frame pixel x maps to crop column
``(x + 0.5)·w/w0 − 0.5 − left`` (Pillow's resize maps pixel centres this way) and likewise for
rows; the render is sampled there (bilinear) and composited with its coverage mask. The box is
the one the aligner cut (``crop_box`` of the engine's results) where known, else recomputed
from ``trans_params``.

:class:`OverlaySink` makes the review video one of the engine's output formats.

The visual is side by side: ``[original | overlay]``, the overlay carrying the 68 reprojected
model landmarks (red) and the detector landmarks used for alignment (blue), as Deep3D's
``compute_visuals`` colours them. Frames flagged invalid get a red border.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.checks import check_shape
from engine.conventions import CROP_SIZE, crop_to_img_yup, img_yup_to_ydown
from engine.errors import InputError, OutputError
from engine.face3d.model import ParametricFaceModel
from engine.face3d.render import FaceRenderer

log = logging.getLogger(__name__)

RED = (255, 0, 0)
BLUE = (0, 0, 255)

#: Audio codecs an MP4/MOV can carry as they are; others are re-encoded to AAC.
_MP4_AUDIO = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ResultArrays:
    """The per-frame arrays of an engine ``.npz`` that the visuals need.

    Attributes:
        coeff: float32 (N, 257). trans_params: float32 (N, 5) ``[w0, h0, s, tx, ty_yup]``.
        valid: bool (N,). landmarks_img_ydown: float32 (N, K, 2) detector landmarks, or None.
        crop_box: int32 (N, 4) ``[left, up, w, h]`` of each crop as cut, or None (older files:
            recomputed from ``trans_params``).
    """

    coeff: np.ndarray
    trans_params: np.ndarray
    valid: np.ndarray
    landmarks_img_ydown: np.ndarray | None
    crop_box: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.coeff.shape[0])


def load_result(path: str | Path) -> ResultArrays:
    """Read an engine ``.npz`` (keys ``coeff``, ``transform_params``, ``valid``, ``landmarks``,
    ``crop_box``; the last three optional).

    Raises:
        InputError: not an npz, or ``coeff``/``transform_params`` missing or mis-shaped.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("coeff", "transform_params", "valid", "landmarks", "crop_box")
                      if k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz result ({e})") from None
    for key in ("coeff", "transform_params"):
        if key not in arrays:
            raise InputError(
                f"{path}: no '{key}' array; expected an npz written by 'python -m engine extract'"
            )
    coeff = arrays["coeff"].astype(np.float32)
    check_shape(coeff, ("N", "257"), f"{path.name}:coeff")
    n = coeff.shape[0]
    tp = arrays["transform_params"].astype(np.float32)
    check_shape(tp, (n, "5"), f"{path.name}:transform_params")
    valid = arrays["valid"].astype(bool) if "valid" in arrays else np.ones(n, dtype=bool)
    lms = arrays.get("landmarks")
    if lms is not None and (lms.ndim != 3 or lms.shape[0] != n or lms.shape[2] != 2):
        lms = None
    box = arrays.get("crop_box")
    if box is not None and box.shape != (n, 4):
        box = None
    return ResultArrays(coeff, tp, valid, None if lms is None else lms.astype(np.float32),
                        None if box is None else box.astype(np.int32))


# ---------------------------------------------------------------------------------------
# One frame


@dataclass(frozen=True)
class CropBox:
    """Where ``align_img`` took the crop: the frame resized to (w, h), then box (left, up, 224, 224)."""

    w0: int
    h0: int
    w: int
    h: int
    left: int
    up: int


def crop_box(trans_params: np.ndarray, exact: np.ndarray | None = None) -> CropBox:
    """``align_img``'s resize and crop corner for ``[w0, h0, s, tx, ty_yup]`` (spec §2.5).

    Args:
        trans_params: (5,) of the frame.
        exact: (4,) ``[left, up, w, h]`` as the aligner cut it (the engine's ``crop_box``);
            None: recomputed from ``trans_params`` with the reference's int32 truncations,
            which from float32 ``trans_params`` can differ by one pixel from the float64
            values used at extraction time.

    >>> crop_box(np.array([512, 512, 0.5, 256, 256]))
    CropBox(w0=512, h0=512, w=256, h=256, left=16, up=16)
    """
    w0, h0, s, tx, ty = (float(v) for v in np.asarray(trans_params, dtype=np.float64))
    if exact is not None:
        left, up, w, h = (int(v) for v in np.asarray(exact))
        return CropBox(round(w0), round(h0), w, h, left, up)
    w = int(np.int32(w0 * s))
    h = int(np.int32(h0 * s))
    half = CROP_SIZE / 2
    left = int(np.int32(w / 2 - half + (tx - w0 / 2) * s))
    up = int(np.int32(h / 2 - half + (h0 / 2 - ty) * s))
    return CropBox(round(w0), round(h0), w, h, left, up)


@dataclass(frozen=True)
class CropRenders:
    """Faces rendered in their 224 crops.

    Attributes:
        rgb: float32 (B, 224, 224, 3) shaded colour × mask, clamped to [0, 1]; rows top-down.
        mask: float32 (B, 224, 224) coverage.
        lm68_224_yup: float32 (B, 68, 2) projected landmarks, crop pixels, y up.
    """

    rgb: np.ndarray
    mask: np.ndarray
    lm68_224_yup: np.ndarray


def render_crops(face_model: ParametricFaceModel, renderer: FaceRenderer, coeff: np.ndarray) -> CropRenders:
    """Render (B, 257) coefficients in the 224 crop."""
    with torch.no_grad():
        geo = face_model.compute_for_render(np.asarray(coeff, dtype=np.float32))
        out = renderer(geo.vertex_cam, face_model.tri, geo.color)
        rgb = out.image.clamp(0, 1).permute(0, 2, 3, 1)
    return CropRenders(
        rgb=rgb.float().cpu().numpy(),
        mask=out.mask[:, 0].float().cpu().numpy(),
        lm68_224_yup=geo.lm68_224_yup.float().cpu().numpy(),
    )


def paste_into_frame(
    frame: np.ndarray,
    rgb_224: np.ndarray,
    mask_224: np.ndarray,
    trans_params: np.ndarray,
    exact_box: np.ndarray | None = None,
) -> np.ndarray:
    """Composite a rendered 224 crop back onto its frame, inverting the alignment crop.

    Args:
        frame: uint8 (H, W, 3) RGB, y down (the frame that was aligned).
        rgb_224: float32 (224, 224, 3) premultiplied colour in [0, 1], rows top-down.
        mask_224: float32 (224, 224) coverage in [0, 1].
        trans_params: (5,) ``[w0, h0, s, tx, ty_yup]`` of that frame.
        exact_box: (4,) ``[left, up, w, h]`` of the crop as cut, or None (see :func:`crop_box`).

    Returns:
        uint8 (H, W, 3): the frame with the face drawn over it.
    """
    check_shape(frame, ("H", "W", "3"), "frame")
    height, width = frame.shape[:2]
    box = crop_box(trans_params, exact_box)
    out = frame.copy()
    if box.w < 1 or box.h < 1 or box.w0 < 1 or box.h0 < 1:
        return out
    sx, sy = box.w / box.w0, box.h / box.h0  # resized size / original size

    def span(offset: int, scale: float, limit: int) -> tuple[int, int]:
        lo = int(np.floor((offset - 1 + 0.5) / scale - 0.5))
        hi = int(np.ceil((offset + CROP_SIZE + 0.5) / scale - 0.5))
        return max(lo, 0), min(hi, limit - 1)

    x0, x1 = span(box.left, sx, width)
    y0, y1 = span(box.up, sy, height)
    if x1 < x0 or y1 < y0:
        return out
    xs = (np.arange(x0, x1 + 1) + 0.5) * sx - 0.5 - box.left  # crop columns (pixel-centre units)
    ys = (np.arange(y0, y1 + 1) + 0.5) * sy - 0.5 - box.up
    gx = (xs + 0.5) / CROP_SIZE * 2 - 1  # grid_sample, align_corners=False
    gy = (ys + 0.5) / CROP_SIZE * 2 - 1
    grid = np.stack(np.meshgrid(gx, gy, indexing="xy"), axis=-1)[None].astype(np.float32)
    src = np.concatenate([rgb_224, mask_224[..., None]], axis=-1).transpose(2, 0, 1)[None]
    sampled = (
        F.grid_sample(
            torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32)),
            torch.from_numpy(grid),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    alpha = sampled[..., 3:4]
    region = out[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32) / 255.0
    comp = region * (1 - alpha) + sampled[..., :3]
    out[y0 : y1 + 1, x0 : x1 + 1] = np.clip(np.rint(comp * 255.0), 0, 255).astype(np.uint8)
    return out


def draw_points(
    image: np.ndarray, points_img_ydown: np.ndarray, color: tuple[int, int, int], half: int | None = None
) -> np.ndarray:
    """Paint a (2·half)² square at each finite point (Deep3D's ``draw_landmarks`` style), in place.

    Args:
        image: uint8 (H, W, 3). points_img_ydown: (K, 2) pixels, y down.
        half: square half-size; default scales with the image (2 at 512 px).
    """
    height, width = image.shape[:2]
    if half is None:
        half = max(1, round(min(height, width) / 256))
    pts = np.asarray(points_img_ydown, dtype=np.float64)
    pts = pts[np.all(np.isfinite(pts), axis=1) & np.all(pts >= 0, axis=1)]
    for x, y in np.rint(pts).astype(np.int64):
        image[max(y - half, 0) : max(y + half, 0), max(x - half, 0) : max(x + half, 0)] = color
    return image


def landmarks_to_image(
    lm68_224_yup: np.ndarray, trans_params: np.ndarray, exact_box: np.ndarray | None = None
) -> np.ndarray:
    """(68, 2) crop pixels y-up → (68, 2) float32 original-image pixels y-down."""
    lm_img_yup = crop_to_img_yup(lm68_224_yup, trans_params, exact_box)
    return img_yup_to_ydown(lm_img_yup, float(trans_params[1])).astype(np.float32)


def compose_frame(
    frame: np.ndarray,
    renders: CropRenders,
    i: int,
    trans_params: np.ndarray,
    valid: bool = True,
    detector_landmarks_img_ydown: np.ndarray | None = None,
    exact_box: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 (H, 2W', 3) ``[original | overlay + landmarks]`` for item ``i`` of ``renders`` (W' = W
    rounded up to even, H too, for video encoders); ``exact_box`` as in :func:`paste_into_frame`."""
    over = paste_into_frame(frame, renders.rgb[i], renders.mask[i], trans_params, exact_box)
    if detector_landmarks_img_ydown is not None:
        draw_points(over, detector_landmarks_img_ydown, BLUE)
    draw_points(over, landmarks_to_image(renders.lm68_224_yup[i], trans_params, exact_box), RED)
    if not valid:
        b = max(2, min(over.shape[:2]) // 100)
        over[:b], over[-b:], over[:, :b], over[:, -b:] = RED, RED, RED, RED
    pair = np.concatenate([frame, over], axis=1)
    pad_h, pad_w = pair.shape[0] % 2, (pair.shape[1] // 2) % 2
    if pad_h or pad_w:
        h, w2 = frame.shape[0] + pad_h, frame.shape[1] + pad_w
        padded = np.zeros((h, 2 * w2, 3), dtype=np.uint8)
        padded[: frame.shape[0], : frame.shape[1]] = frame
        padded[: frame.shape[0], w2 : w2 + frame.shape[1]] = over
        pair = padded
    return pair


def overlay_image(
    frame: np.ndarray,
    coeff: np.ndarray,
    trans_params: np.ndarray,
    face_model: ParametricFaceModel | None = None,
    renderer: FaceRenderer | None = None,
    *,
    valid: bool = True,
    detector_landmarks_img_ydown: np.ndarray | None = None,
    exact_box: np.ndarray | None = None,
) -> np.ndarray:
    """The review visual of one frame: uint8 (H, 2W, 3) ``[original | overlay]``.

    Args:
        frame: uint8 (H, W, 3) RGB frame, y down. coeff: (257,). trans_params: (5,).
        face_model, renderer: reuse loaded ones (a viewer should cache them); ``None`` loads
            the model from :func:`engine.weights.bfm_dir` on the CPU (about half a second).
        exact_box: (4,) ``[left, up, w, h]`` of the crop as cut, or None (see :func:`crop_box`).
    """
    face_model = face_model or ParametricFaceModel.from_dir(None, "cpu")
    renderer = renderer or FaceRenderer(face_model.device)
    renders = render_crops(face_model, renderer, np.asarray(coeff, dtype=np.float32)[None])
    return compose_frame(frame, renders, 0, np.asarray(trans_params), valid, detector_landmarks_img_ydown, exact_box)


def overlay_frame(
    source: str | Path,
    result: str | Path | ResultArrays,
    index: int,
    *,
    face_model: ParametricFaceModel | None = None,
    renderer: FaceRenderer | None = None,
    bfm_dir: str | Path | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """The review visual of frame ``index`` of a video (or of an image), decoded on demand.

    Pass a loaded ``face_model`` and ``renderer`` to reuse them across calls (the dashboard's
    frame viewer). Frames before ``index`` are decoded and dropped.

    Raises:
        InputError: ``index`` is outside the result or the video.
    """
    from engine.sources import iter_frames

    res = result if isinstance(result, ResultArrays) else load_result(result)
    if not 0 <= index < len(res):
        raise InputError(f"frame {index} is outside the result's {len(res)} frames")
    batch = next(iter(iter_frames(source, batch_size=1, start=index)), None)
    if batch is None:
        raise InputError(f"{source}: has no frame {index}")
    face_model = face_model or ParametricFaceModel.from_dir(bfm_dir, device)
    renderer = renderer or FaceRenderer(face_model.device)
    lms = None if res.landmarks_img_ydown is None else res.landmarks_img_ydown[index]
    return overlay_image(
        batch.images[0],
        res.coeff[index],
        res.trans_params[index],
        face_model,
        renderer,
        valid=bool(res.valid[index]),
        detector_landmarks_img_ydown=lms,
        exact_box=None if res.crop_box is None else res.crop_box[index],
    )


# ---------------------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class OverlayReport:
    """What :func:`write_overlay_video` wrote.

    Attributes:
        path: the output file. frames: frames written. fps: the input's average rate.
        audio: ``"copied"``, ``"re-encoded"`` or ``"none"``. backend: renderer used.
        unmatched: frames without a result row (shown without overlay).
    """

    path: Path
    frames: int
    fps: float
    audio: str
    backend: str
    unmatched: int


class _AudioPump:
    """Copies (or re-encodes) the input's audio into the output, interleaved by time."""

    def __init__(self, source: Path, output) -> None:
        from engine.avcompat import add_stream_like, open_container

        self.container = open_container(source)
        streams = self.container.streams.audio
        self.stream = streams[0] if streams else None
        self.mode = "none"
        self.packets: Iterator | None = None
        self.pending = None
        if self.stream is None:
            self.container.close()
            return
        fmt = output.format.name
        copyable = not any(m in fmt for m in ("mp4", "mov")) or self.stream.codec_context.name in _MP4_AUDIO
        if copyable:
            self.out_stream = add_stream_like(output, self.stream)
            self.mode = "copied"
        else:
            self.out_stream = output.add_stream("aac", rate=self.stream.rate or 44100)
            self.mode = "re-encoded"
        self.output = output
        self.packets = self.container.demux(self.stream)

    def _time(self, packet) -> float:
        ts = packet.pts if packet.pts is not None else packet.dts
        return float(ts * packet.time_base) if ts is not None else float("-inf")

    def pump(self, until: float) -> None:
        """Write audio up to presentation time ``until`` seconds (inf: everything)."""
        if self.packets is None:
            return
        while True:
            if self.pending is None:
                self.pending = next(self.packets, None)
                if self.pending is None:
                    self._flush()
                    self.packets = None
                    return
            packet = self.pending
            if packet.size and self._time(packet) > until:
                return
            self.pending = None
            if packet.dts is None and packet.size == 0:
                continue  # demuxer's end-of-stream marker
            if self.mode == "copied":
                packet.stream = self.out_stream
                self.output.mux(packet)
            else:
                for frame in packet.decode():
                    frame.pts = None
                    self.output.mux(self.out_stream.encode(frame))

    def _flush(self) -> None:
        if self.mode == "re-encoded":
            self.output.mux(self.out_stream.encode(None))

    def close(self) -> None:
        if self.stream is not None:
            self.container.close()


def _video_encoder(output, rate: Fraction, width: int, height: int):
    import av

    for codec, options in (("libx264", {"crf": "18", "preset": "veryfast"}), ("mpeg4", {"qscale": "3"})):
        if codec in av.codecs_available:
            stream = output.add_stream(codec, rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            return stream
    raise OutputError("no H.264 or MPEG-4 encoder in this PyAV build")


def write_overlay_video(
    source: str | Path,
    result: str | Path | ResultArrays,
    out_path: str | Path,
    *,
    face_model: ParametricFaceModel | None = None,
    renderer: FaceRenderer | None = None,
    bfm_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    staged: str | Path | None = None,
) -> OverlayReport:
    """Write the side-by-side review video of ``source`` with its reconstruction.

    Frames keep their presentation times (same frame count and average rate as the input),
    the audio stream is copied (re-encoded to AAC only when the container cannot hold it),
    and the file is written under a temporary name and renamed at the end. An image input
    gives an image (format from ``out_path``'s suffix).

    Args:
        source: the video or image the result was extracted from.
        result: its engine ``.npz`` (or loaded :class:`ResultArrays`); row i ↔ frame i.
        out_path: ``.mp4`` (H.264) or another FFmpeg container; an image suffix for images.
        progress: called with (frames done, frames expected) after every batch.
        should_stop: polled before every batch; True raises :class:`engine.Cancelled`.
        staged: write the file there instead and leave the rename to the caller (the engine's
            :class:`OverlaySink` renames all files of an input together); removed on failure.

    Raises:
        InputError, DecodeError: unreadable source or result. OutputError: cannot write.
        Cancelled: ``should_stop`` returned True (the partial file is removed).
    """
    import av

    from engine.avcompat import fraction, open_container
    from engine.errors import Cancelled
    from engine.sources import iter_frames, media_kind, probe
    from engine.stages.sink import temp_name

    source, out_path = Path(source), Path(out_path)
    tmp = Path(staged) if staged is not None else temp_name(out_path, "partial", keep_suffix=True)
    res = result if isinstance(result, ResultArrays) else load_result(result)
    face_model = face_model or ParametricFaceModel.from_dir(bfm_dir, device)
    renderer = renderer or FaceRenderer(face_model.device)
    info = probe(source)
    tmp.parent.mkdir(parents=True, exist_ok=True)

    def visual(frames: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
        rows = index[index < len(res)]
        renders = render_crops(face_model, renderer, res.coeff[rows]) if len(rows) else None
        out = []
        for j, (frame, i) in enumerate(zip(frames, index, strict=True)):
            if i >= len(res):
                out.append(np.concatenate([frame, frame], axis=1))
                continue
            lms = None if res.landmarks_img_ydown is None else res.landmarks_img_ydown[i]
            box = None if res.crop_box is None else res.crop_box[i]
            out.append(compose_frame(frame, renders, j, res.trans_params[i], bool(res.valid[i]), lms, box))
        return out

    if media_kind(source) == "image":
        from PIL import Image

        batch = next(iter(iter_frames(source, 1)))
        img = visual(batch.images, batch.index)[0]
        try:
            Image.fromarray(img).save(tmp, format=None if tmp.suffix else "PNG")
            if staged is None:
                tmp.replace(out_path)
        except (OSError, ValueError) as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{out_path}: cannot write the overlay image ({e})") from None
        return OverlayReport(out_path, 1, 0.0, "none", renderer.backend_name, int(len(res) < 1))

    with open_container(source) as probe_c:
        vin = probe_c.streams.video[0]
        time_base = fraction(vin.time_base) or Fraction(1, 90000)
        rate = fraction(vin.average_rate) or fraction(vin.guessed_rate) or Fraction(25)
    total = max(info.frame_count, 1)
    written = unmatched = 0
    audio = None
    try:
        output = open_container(tmp, "w", format=None if tmp.suffix else "mp4")
    except (OSError, av.error.FFmpegError, ValueError) as e:
        raise OutputError(f"{out_path}: cannot create the overlay video ({e})") from None
    try:
        stream = None
        last_pts = None
        for batch in iter_frames(source, batch_size):
            if should_stop is not None and should_stop():
                raise Cancelled(f"overlay of {source} cancelled")
            pics = visual(batch.images, batch.index)
            if stream is None:
                stream = _video_encoder(output, Fraction(rate), pics[0].shape[1], pics[0].shape[0])
                stream.codec_context.time_base = time_base
                audio = _AudioPump(source, output)
            for pic, t in zip(pics, batch.timestamps, strict=True):
                frame = av.VideoFrame.from_ndarray(pic, format="rgb24")
                pts = round(float(t) / time_base)
                if last_pts is not None and pts <= last_pts:
                    pts = last_pts + 1
                frame.pts, frame.time_base, last_pts = pts, time_base, pts
                output.mux(stream.encode(frame))
            unmatched += int(np.sum(batch.index >= len(res)))
            written += len(batch)
            audio.pump(float(batch.timestamps[-1]))
            if progress is not None:
                progress(written, max(total, written))
        if stream is None:
            raise InputError(f"{source}: no frames decoded")
        output.mux(stream.encode(None))
        audio.pump(float("inf"))
        output.close()
        if staged is None:
            tmp.replace(out_path)
    except BaseException:
        with contextlib.suppress(Exception):  # closing a half-written file can fail too
            output.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if audio is not None:
            audio.close()
    if unmatched:
        log.warning("%s: %d frames have no row in the result; shown without overlay", source, unmatched)
    return OverlayReport(
        out_path, written, float(rate), audio.mode if audio else "none", renderer.backend_name, unmatched
    )


class OverlaySink:
    """The ``overlay`` format: the review video (an image for an image input) as a sink.

    It keeps the batches' results and renders the whole input at :meth:`finish` (the input is
    decoded a second time), reporting progress and polling for cancel between batches.

    Args:
        context: from the engine: the format name and the face model loader.
    """

    def __init__(self, context) -> None:
        self.format = context.format
        self._face_model = context.face_model
        self._source: Path | None = None
        self._path: Path | None = None
        self._parts: list = []
        self._staged: Path | None = None

    def start(self, info, out_base: Path) -> dict[str, Path]:
        """Fails before any work when the face model is not set up."""
        from engine.formats import format_spec

        _check_face_model()
        self.abort()
        self._source, self._path = Path(info.path), format_spec(self.format).path(out_base, info.kind)
        return {self.format: self._path}

    def add(self, results) -> None:
        self._parts.append(results)

    def finish(self, hooks) -> dict[str, Path]:
        from engine.stages.sink import staging_path
        from engine.structures import FrameResults

        r = FrameResults.concat(self._parts)
        self._parts = []
        arrays = ResultArrays(r.coeff, r.trans_params, r.valid, r.landmarks_img_ydown, r.crop_box)
        self._staged = staging_path(self._path)
        write_overlay_video(self._source, arrays, self._path, face_model=self._face_model(), progress=hooks.report,
                            should_stop=hooks.should_stop, staged=self._staged)
        return {self.format: self._staged}

    def abort(self) -> None:
        if self._staged is not None:
            self._staged.unlink(missing_ok=True)
        self._staged, self._parts = None, []


def _check_face_model() -> None:
    """The overlay needs the face model: raise :class:`~engine.errors.WeightsMissingError` if it is not set up."""
    from engine.errors import WeightsMissingError
    from engine.face3d import face_model_available
    from engine.weights import bfm_dir

    if not face_model_available(bfm_dir()):
        raise WeightsMissingError(
            f"the overlay format needs the face model {bfm_dir() / 'BFM_model_front.mat'}; "
            f"set it up with 'python -m engine bfm convert --from {bfm_dir()}' (see 'python -m engine doctor')"
        )
