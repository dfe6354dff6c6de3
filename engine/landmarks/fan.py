"""68-point landmarks with face_alignment (S3FD detector + 2D-FAN-4): PIRender's recipe (spec §5.1).

Per frame: ``FaceAlignment(TWO_D, flip_input=False, face_detector="sfd")
.get_landmarks_from_image(rgb_frame)[0]`` — the RGB full frame, the highest-scoring face
(S3FD: NMS 0.3, score > 0.5), (68, 2) float32 pixel x, y, y down. Split in two stages with
the same numbers: S3FD's boxes (:meth:`FanLandmarker.detect`, the engine's detector), then
2D-FAN-4 on the box the tracker chose (``get_landmarks_from_image(frame, detected_faces=[box])``). The device is passed
explicitly (face_alignment defaults to ``cuda``) and ``compile=False`` where the
constructor has it (compiling costs over a minute on CPU for no speed-up).

Weights. face_alignment downloads them on first use into ``torch.hub.get_dir()/checkpoints``
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``):
``s3fd-619a316812.pth`` (S3FD) and ``2DFAN4-11f355bf06.pth.tar`` (2D-FAN-4), both with
face_alignment's ``load_file_from_url``; a file of that name already there is used as is.
Both are read with ``weights_only=True`` (S3FD is handed to face_alignment as
``path_to_detector`` for that): a file asking for Python objects is refused with a
:class:`~engine.errors.WeightsError` naming the object. Offline, a missing file makes
construction fail with :class:`~engine.errors.WeightsMissingError` naming the files, the
folder and the URLs, before face_alignment can try (and hang on) the network.
"""

from __future__ import annotations

import inspect
import logging
import pickle
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from engine.errors import WeightsError, WeightsMissingError
from engine.landmarks.base import BackendStatus, BoundDetector, faces_to_mark, landmarks_from_list
from engine.safe_load import UnsafeWeightsError, refusal, unsafe_global
from engine.structures import Detections, FrameBatch, Landmarks

log = logging.getLogger(__name__)

NAME = "fan"

#: (file name, download URL) of each weight file, as in face_alignment 1.5.0
#: (``detection/sfd/sfd_detector.py:models_urls['s3fd']``, ``api.py:models_urls['2DFAN-4']``).
WEIGHTS = (
    ("s3fd-619a316812.pth", "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"),
    ("2DFAN4-11f355bf06.pth.tar", "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar"),
)


def weights_dir() -> Path:
    """Where face_alignment looks for its weights: ``torch.hub.get_dir()/checkpoints``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def missing_weights(folder: Path | None = None) -> list[str]:
    """Names of the weight files not in ``folder`` (default :func:`weights_dir`)."""
    folder = weights_dir() if folder is None else folder
    return [name for name, _ in WEIGHTS if not (folder / name).is_file()]


def _missing_message(folder: Path, missing: list[str], why: str) -> str:
    urls = " and ".join(url for name, url in WEIGHTS if name in missing)
    return (
        f"face_alignment weights missing: {', '.join(missing)} not in {folder} ({why}); "
        f"download {urls} on a machine with internet and copy the files, names unchanged, into {folder} "
        "($TORCH_HOME/hub/checkpoints; TORCH_HOME defaults to ~/.cache/torch), "
        "or use the 'mtcnn' landmark backend, which works offline"
    )


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the URL's host opens within ``timeout`` seconds.

    DNS lookups ignore socket timeouts, so the probe runs in a thread that is abandoned
    after ``timeout``.
    """
    host = urlparse(url).hostname or ""
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    probe = threading.Thread(target=connect, name="fan-weights-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(result and result[0])


def check_weights(allow_download: bool | None = None) -> None:
    """Fail fast when weights are missing and cannot be downloaded.

    Args:
        allow_download: True lets face_alignment download missing files, False forbids
            it, None decides by whether the download host answers within 3 s.

    Raises:
        WeightsMissingError: a file is missing and downloading is not possible.
    """
    folder = weights_dir()
    missing = missing_weights(folder)
    if not missing:
        return
    if allow_download is None:
        allow_download = _reachable(WEIGHTS[0][1])
        why = "no network to download them" if not allow_download else ""
    else:
        why = "downloads disabled"
    if not allow_download:
        raise WeightsMissingError(_missing_message(folder, missing, why))
    log.info("downloading face_alignment weights %s into %s", ", ".join(missing), folder)


def _sfd_file() -> Path:
    """The S3FD weight file, downloaded first when missing (only reached when downloads are allowed).

    Passed to face_alignment as ``path_to_detector`` so that it reads the file with
    ``weights_only=True``; without it, face_alignment loads S3FD through torch.hub's
    state-dict downloader, which unpickles in full.
    """
    name, url = WEIGHTS[0]
    path = weights_dir() / name
    if not path.is_file():
        from face_alignment.utils import load_file_from_url

        load_file_from_url(url)  # downloads into weights_dir(); loading stays weights-only
    return path


def load_failure(error: BaseException) -> WeightsError:
    """The :class:`WeightsError` for weight files that are there but do not load.

    A file that asks for a Python object is refused by name; any other failure (damaged or
    foreign file, wrong layout) names the folder and the files and says to replace them.
    """
    unsafe = error.global_name if isinstance(error, UnsafeWeightsError) else unsafe_global(error)
    if unsafe is not None:
        return WeightsError(refusal(f"face_alignment weights in {weights_dir()}", unsafe))
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    names = " / ".join(name for name, _ in WEIGHTS)
    return WeightsError(
        f"face_alignment weights in {weights_dir()} ({names}) do not load ({first}); "
        "replace the broken file (delete it to have it downloaded again)"
    )


def status() -> BackendStatus:
    """Whether face_alignment imports and its weights are in the torch hub cache."""
    try:
        from importlib.metadata import version

        import face_alignment  # noqa: F401
    except Exception as e:  # any import failure is a doctor finding, not a crash
        return BackendStatus(
            NAME, False,
            f"face_alignment does not import ({type(e).__name__}: {e}); install it with "
            "`pip install --no-deps face-alignment` then "
            "`pip install numba scikit-image scipy tqdm packaging`",
        )
    folder = weights_dir()
    missing = missing_weights(folder)
    if missing:
        message = _missing_message(folder, missing, "downloaded on first use if online")
        return BackendStatus(NAME, False, message)
    message = f"face_alignment {version('face-alignment')}, S3FD + 2D-FAN-4 in {folder}"
    return BackendStatus(NAME, True, message)


class FanLandmarker:
    """PIRender's landmark recipe: S3FD + 2D-FAN-4, 68 points, one frame at a time.

    Build it once and reuse it for every video (the networks load in the constructor).

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        allow_download: see :func:`check_weights`.

    Raises:
        WeightsMissingError: weights absent and not downloadable.
        WeightsError: a weight file is there but does not load.
    """

    name = NAME
    num_points = 68

    def __init__(self, device: str = "cpu", allow_download: bool | None = None):
        check_weights(allow_download)
        import face_alignment

        types = face_alignment.LandmarksType
        two_d = getattr(types, "TWO_D", None) or types._2D  # _2D before face_alignment 1.4
        kwargs = {"device": device, "flip_input": False, "face_detector": "sfd"}
        if "compile" in inspect.signature(face_alignment.FaceAlignment.__init__).parameters:
            kwargs["compile"] = False
        try:
            kwargs["face_detector_kwargs"] = {"path_to_detector": str(_sfd_file())}
            self._fa = face_alignment.FaceAlignment(two_d, **kwargs)
        except OSError as e:  # URLError (failed download) is an OSError
            raise WeightsMissingError(_missing_message(weights_dir(), missing_weights(), str(e))) from None
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise load_failure(e) from None
        self.device = device

    @property
    def detector(self) -> BoundDetector:
        """face_alignment's S3FD (shares this backend's networks)."""
        return BoundDetector("s3fd", self.detect)

    def detect(self, frames: FrameBatch) -> Detections:
        """Every face S3FD keeps in each frame (NMS 0.3, score > 0.5), best first."""
        per_frame = [self._fa.face_detector.detect_from_image(image.copy()) for image in frames.images]
        rows = [(i, np.asarray(box, dtype=np.float64)) for i, boxes in enumerate(per_frame) for box in boxes]
        if not rows:
            return Detections.empty(len(frames))
        return Detections(
            boxes_img_ydown=np.stack([box[:4] for _, box in rows]),
            scores=np.array([box[4] for _, box in rows]),
            frame_rows=np.array([i for i, _ in rows], dtype=np.int64),
            num_frames=len(frames),
        )

    def __call__(self, frames: FrameBatch, faces: Detections | None = None) -> Landmarks:
        faces = faces_to_mark(self, frames, faces)
        where = faces.face_of_frame()
        per_frame = [
            (None, np.nan) if j < 0 else self._one(image, faces.boxes_img_ydown[j], faces.scores[j])
            for image, j in zip(frames.images, where, strict=True)
        ]
        return landmarks_from_list([p for p, _ in per_frame], self.num_points, [c for _, c in per_frame])

    def _one(self, image_rgb: np.ndarray, box_img_ydown: np.ndarray, score: float) -> tuple[np.ndarray | None, float]:
        """(68, 2) float32 y-down points of the face in ``box`` of one uint8 (H, W, 3) RGB frame,
        and their confidence: the mean over the 68 points of each heat map's peak (0…1).

        face_alignment crops around the box and runs 2D-FAN-4 once (``get_landmarks_from_image``
        with ``detected_faces``: the same crop and numbers as when it detects the box itself;
        asking for the scores changes no point).
        """
        found, peaks, _ = self._fa.get_landmarks_from_image(
            image_rgb, detected_faces=[np.append(box_img_ydown, score)], return_landmark_score=True)
        if not found:
            return None, np.nan
        confidence = float(np.mean(peaks[0])) if peaks else np.nan
        return np.asarray(found[0], dtype=np.float32)[:, :2], confidence

    def close(self) -> None:
        self._fa = None


def create(config, device: str, source=None) -> FanLandmarker:
    """The backend factory of :data:`engine.landmarks.BACKENDS`."""
    return FanLandmarker(device=device)
