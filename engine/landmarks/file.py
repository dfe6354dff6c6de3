"""Precomputed landmarks read from text files (replay backend).

Two formats, both plain whitespace-separated numbers, pixel x, y of the original frame
with **y down**, float32 after loading:

* PIRender keypoints of a video (spec §5.1): ``np.savetxt`` of the flattened (N, K, 2)
  array, one value per line, order frame → point → (x, y). K is 68 (or 5); it is chosen
  so that N matches the video's frame count. A frame whose values average exactly -1
  (PIRender's "no face" row) is invalid with reason ``"no_face"``.
* Deep3DFaceRecon detections of an image: ``detections/<stem>.txt``, five lines ``x y``
  in Deep3D's 5-point order (a 68-point file works too).

Where the file is looked for (first existing wins; :func:`keypoint_candidates`):

* ``keypoints`` is a ``.txt`` file: that file (single input);
* ``keypoints`` is a folder mirroring the input tree: ``<keypoints>/<rel_stem>.txt``, and
  for a file given directly also PIRender's layout ``<keypoints>/<parent dir>/<stem>.txt``;
* no ``keypoints``: beside the input, ``<dir>/<stem>.txt`` (also SadTalker's
  ``<stem>_landmarks.txt``) for a video, ``<dir>/detections/<stem>.txt`` (then
  ``<dir>/<stem>.txt``) for an image.

The backend is built per input, because the file belongs to one input.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine.errors import InputError
from engine.landmarks.base import NO_FACE, BackendStatus
from engine.structures import Detections, FrameBatch, Landmarks

log = logging.getLogger(__name__)

NAME = "file"
#: Points per face a file may hold, in order of preference when both fit.
POINT_COUNTS = (68, 5)


def status() -> BackendStatus:
    return BackendStatus(
        NAME, True,
        "reads PIRender keypoint .txt files (videos) and Deep3D detections/<stem>.txt (images)",
    )


def _as_item(source):
    from engine.sources import InputItem

    if isinstance(source, InputItem):
        return source
    path = Path(source)
    return InputItem(path, None, Path(path.stem))


def keypoint_candidates(source, keypoints: str | Path | None = None) -> list[Path]:
    """Landmark files that may belong to ``source``, in the order they are tried.

    Args:
        source: an :class:`~engine.sources.InputItem` or a media path.
        keypoints: ``EngineConfig.keypoints``: a ``.txt`` file, a folder, or None.

    >>> [p.as_posix() for p in keypoint_candidates("data/train/clip.mp4", "kp")]
    ['kp/clip.txt', 'kp/train/clip.txt']
    >>> [p.as_posix() for p in keypoint_candidates("imgs/face.jpg")]
    ['imgs/detections/face.txt', 'imgs/face.txt']
    """
    from engine.sources import media_kind

    item = _as_item(source)
    path = item.path
    image = media_kind(path) == "image"
    if keypoints is not None:
        keypoints = Path(keypoints)
        if keypoints.suffix.lower() == ".txt" and not keypoints.is_dir():
            return [keypoints]
        found = [keypoints / item.rel_stem.parent / (item.rel_stem.name + ".txt")]
        if item.root is None:
            found.append(keypoints / path.parent.name / (path.stem + ".txt"))
        if image:
            found.append(keypoints / "detections" / (path.stem + ".txt"))
    elif image:
        found = [path.parent / "detections" / (path.stem + ".txt"), path.parent / (path.stem + ".txt")]
    else:
        found = [path.parent / (path.stem + ".txt"), path.parent / (path.stem + "_landmarks.txt")]
    return list(dict.fromkeys(found))


def load_keypoints(path: str | Path, frame_count: int | None = None) -> np.ndarray:
    """Read a keypoint file into float32 (N, K, 2) pixel x, y, y down.

    Args:
        path: a PIRender keypoint file or a Deep3D detection file.
        frame_count: the input's frame count (1 for an image); picks K when both 68 and
            5 points divide the number of values. None: prefer 68.

    Raises:
        InputError: unreadable, empty, or not a whole number of 68/5-point frames.
    """
    path = Path(path)
    try:
        values = np.loadtxt(path, ndmin=1).astype(np.float32).ravel()  # float64 parse, as PIRender
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a landmark file ({reason})") from None
    if values.size == 0:
        raise InputError(f"{path}: landmark file is empty")
    fits = [k for k in POINT_COUNTS if values.size % (2 * k) == 0]
    if not fits:
        raise InputError(
            f"{path}: {values.size} values are not a whole number of frames of 68 or 5 (x, y) points"
        )
    k = fits[0]
    if frame_count and len(fits) > 1:
        matching = [c for c in fits if values.size // (2 * c) == frame_count]
        k = matching[0] if matching else fits[0]
    return values.reshape(-1, k, 2)


class FileLandmarker:
    """Serves landmarks from one file for one input, by frame index.

    Args:
        points_img_ydown: float32 (N, K, 2) pixel x, y, y down; -1 rows mean "no face".
        source_file: the file they came from (for messages).
        media: the input they belong to (for messages).
    """

    name = NAME
    #: Needs no boxes: landmarks are looked up by frame number.
    detector = None
    #: Reads only the frames' numbers, so their pixels may be anywhere.
    device_frames = True

    def __init__(self, points_img_ydown: np.ndarray, source_file: Path, media: Path | None = None):
        points = np.asarray(points_img_ydown, dtype=np.float32)
        if points.ndim != 3 or points.shape[2] != 2 or points.shape[1] not in POINT_COUNTS:
            raise InputError(f"{source_file}: expected (N, 68 or 5, 2) landmarks, got {points.shape}")
        self.source_file = Path(source_file)
        self.media = media
        self.num_points = int(points.shape[1])
        self.num_frames = int(points.shape[0])
        # PIRender's test, per frame: np.mean(lm) == -1 on the float32 (K, 2) array.
        flat = points.reshape(self.num_frames, -1)
        self._valid = ~(flat.mean(axis=1) == -1) & np.isfinite(flat).all(axis=1)
        self._points = points.copy()
        self._points[~self._valid] = np.nan

    @classmethod
    def for_input(cls, source, keypoints: str | Path | None = None) -> FileLandmarker:
        """Find, load and check the landmark file of one input.

        Args:
            source: an :class:`~engine.sources.InputItem` or a media path.
            keypoints: ``EngineConfig.keypoints`` (see the module docstring).

        Raises:
            InputError: no file found (the message lists the paths tried), unreadable
                file, or its frame count is far from the video's.
        """
        from engine.sources import FRAME_COUNT_SLACK, declared_frame_count, media_kind, probe

        item = _as_item(source)
        if keypoints is not None and not Path(keypoints).exists():
            raise InputError(f"{keypoints}: keypoints file or folder not found")
        candidates = keypoint_candidates(item, keypoints)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            tried = ", ".join(str(p) for p in candidates)
            raise InputError(f"{item.path}: no landmark file found (looked for {tried})")
        if media_kind(item.path) == "image":
            frame_count, declared = 1, 1
        else:
            frame_count, declared = probe(item.path).frame_count, declared_frame_count(item.path)
        points = load_keypoints(found, frame_count)
        if declared and abs(points.shape[0] - declared) > (FRAME_COUNT_SLACK if declared > 1 else 0):
            raise InputError(
                f"{found}: holds landmarks for {points.shape[0]} frames but {item.path} has {declared} "
                "(a keypoint file of another input?)"
            )
        log.info("%s: landmarks from %s (%d frames × %d points)", item.path, found, *points.shape[:2])
        return cls(points, found, item.path)

    def __call__(self, frames: FrameBatch, faces: Detections | None = None) -> Landmarks:
        """The file's landmarks of these frames, by frame number (``faces`` is ignored)."""
        index = np.asarray(frames.index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.num_frames):
            raise InputError(
                f"{self.source_file}: holds landmarks for {self.num_frames} frames, "
                f"but {self.media or 'the input'} has frame {int(index.max())}"
            )
        valid = self._valid[index]
        return Landmarks(
            points_img_ydown=self._points[index],
            valid=valid,
            reason=tuple("" if v else NO_FACE for v in valid),
        )

    def check_frame_count(self, decoded_frames: int) -> None:
        """Raise :class:`InputError` unless the file had exactly ``decoded_frames`` frames.

        Call it after the whole input was decoded (PIRender asserts the same).
        """
        if decoded_frames != self.num_frames:
            raise InputError(
                f"{self.source_file}: holds landmarks for {self.num_frames} frames, "
                f"but {self.media or 'the input'} decoded to {decoded_frames}"
            )

    def close(self) -> None:
        pass


def create(config, device: str, source=None) -> FileLandmarker:
    """The backend factory of :data:`engine.landmarks.BACKENDS`: the file of ``source``."""
    if source is None:
        raise ValueError("the 'file' landmark backend reads one file per input: pass source=")
    return FileLandmarker.for_input(source, config.keypoints)
