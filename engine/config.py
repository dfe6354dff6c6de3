"""Settings of an extraction run: one frozen, JSON-serialisable dataclass.

Derive variants with ``dataclasses.replace(cfg, batch_size=32)``. The worker stores
``cfg.to_dict()`` with each job and each output's manifest.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from engine.formats import format_spec


def cuda_index(device: str) -> int:
    """The GPU index of a torch device string: ``"cuda:2"`` → 2, ``"cuda"`` → 0 (torch's default GPU).

    >>> cuda_index("cuda:2"), cuda_index("cuda")
    (2, 0)
    """
    device = str(device)
    return int(device.split(":", 1)[1]) if ":" in device else 0


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the system has one (a worker pinned
    to a share of the cores by ``--gpus``/``--per-gpu`` sees its share), else the CPU count.
    FFmpeg's own thread count follows the same mask."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LandmarkBackend(str, Enum):
    """The built-in landmark backends (:data:`engine.landmarks.BACKENDS` may hold more; a config
    accepts any name there)."""

    FAN = "fan"  #: face_alignment SFD + 2D-FAN-4, 68 points (PIRender's recipe)
    MTCNN = "mtcnn"  #: facenet-pytorch MTCNN, 5 points (Deep3DFaceRecon's test recipe)
    FILE = "file"  #: precomputed: PIRender keypoint .txt, or Deep3D detections/<stem>.txt


class OutputFormat(str, Enum):
    """The built-in output formats. What each one is (suffix, label, help, sink) is in
    :data:`engine.formats.FORMATS`, which may hold more (a config accepts any name there)."""

    PIRENDER = "pirender"
    SADTALKER = "sadtalker"
    DEEP3D = "deep3d"
    NPZ = "npz"
    CSV = "csv"
    LANDMARKS = "landmarks"
    OVERLAY = "overlay"  #: review video (needs the face model in BFM/); not a coefficient file

    @property
    def needs_face_model(self) -> bool:
        return format_spec(self.value).needs_face_model


class NoFacePolicy(str, Enum):
    """What coefficients a frame without a detected face gets. It is flagged invalid either way.

    ``REFERENCE`` reproduces PIRender: with a detector, reuse the previous frame's landmarks
    and, before the first detection, align with the 5-point template placed in the frame centre
    (spec §5.1, §5.2); with a keypoint file, every -1 row gets the template, as PIRender's
    reconstruction script does. ``TEMPLATE`` always uses the template fallback.
    """

    REFERENCE = "reference"
    TEMPLATE = "template"


class KeepPerson(str, Enum):
    """Which face is kept when the detector finds several in a frame (flagged ``several_faces``
    either way).

    ``REFERENCE`` keeps the most confident face, as the reference does (the exact path).
    ``CONTINUITY`` keeps the face whose box continues the previous frame's, so one person is
    followed through the video (frames where that differs are flagged ``other_face_kept``).
    """

    REFERENCE = "reference"
    CONTINUITY = "continuity"


class Mode(str, Enum):
    """Which pipeline runs.

    ``EXACT`` (default) is today's path, bit-identical to the reference on the CPU. ``FAST`` is
    the same :class:`~engine.pipeline.Engine` composed of GPU stages (keyframe tracking, batched
    landmarks, fp16; :mod:`engine.fast`): small measured differences, see
    ``docs/compatibility.md``.
    """

    EXACT = "exact"
    FAST = "fast"


class Decoder(str, Enum):
    """What decodes videos.

    ``PYAV`` (default): FFmpeg on the CPU through PyAV, frames on the host; what the exact path
    needs (its pixels are FFmpeg's). ``NVDEC``: the GPU's video decoder through PyNvVideoCodec
    (an optional install), frames kept on the GPU: fast path on CUDA only, since NVDEC's
    YUV→RGB conversion rounds differently from FFmpeg's (``engine.stages.nvdec``).
    """

    PYAV = "pyav"
    NVDEC = "nvdec"


#: One line on the modes, for the CLI and the dashboard.
MODE_HELP = ("exact (default): bit-identical to the reference; fast: GPU tracking and fp16, small measured "
             "differences, see docs/compatibility.md")

DEFAULT_FORMATS = (OutputFormat.PIRENDER, OutputFormat.NPZ)


def output_format(name) -> OutputFormat | str:
    """A built-in format as its enum member, another registered one as its name.

    Raises:
        ValueError: not in :data:`engine.formats.FORMATS`.
    """
    name = name_of(name).strip()
    format_spec(name)
    return OutputFormat(name) if name in {f.value for f in OutputFormat} else name


def landmark_backend(name) -> LandmarkBackend | str:
    """A built-in backend as its enum member, another registered one as its name.

    Raises:
        ValueError: not in :data:`engine.landmarks.BACKENDS`.
    """
    name = name_of(name).strip()
    if name in {b.value for b in LandmarkBackend}:
        return LandmarkBackend(name)
    from engine.landmarks import backend_spec  # imports this module: not at the top

    backend_spec(name)
    return name


def name_of(value: Enum | str) -> str:
    """The plain name of an enum member or a name: ``name_of(LandmarkBackend.FAN) == "fan"``."""
    return str(getattr(value, "value", value))


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one extraction.

    Attributes:
        checkpoint: reconstruction weights (``epoch_20.pth`` or SadTalker safetensors);
            ``None`` means "the single checkpoint found under ``checkpoints/``".
        landmarks: landmark backend: a :class:`LandmarkBackend`, or the name of another backend
            registered in :data:`engine.landmarks.BACKENDS` (kept as a plain ``str``).
        keypoints: for ``landmarks="file"``: a PIRender keypoint ``.txt`` for a single
            video, or a folder mirroring the input tree; ``None`` means next to the input.
        formats: output formats to write: :class:`OutputFormat` members, or names of other
            formats registered in :data:`engine.formats.FORMATS` (kept as plain ``str``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None`` picks ``cuda`` when available.
        batch_size: frames per network batch and per decoding chunk (speed and memory
            only; results do not depend on it).
        no_face: policy for frames without a face (see :class:`NoFacePolicy`).
        min_valid_ratio: an input whose fraction of frames with a face is below this fails
            with :class:`~engine.errors.NoFaceError`; 0 means "at least one frame".
        overwrite: rewrite outputs that already exist (otherwise they are skipped).
        num_threads: CPU threads for alignment (speed only); default: the CPU count, at most 8.
        decode_threads: FFmpeg's threads for decoding one video (speed only; the frames are the
            same bits): 0 (default) lets FFmpeg choose, one per CPU of the process (at most 16
            for H.264); 1 decodes on the reading thread. Where many videos decode at once (a
            worker among several on one machine), 1 costs the fewest CPU cycles per frame.
        keep_person: which face to keep when there are several (see :class:`KeepPerson`);
            changes results (part of the resume fingerprint).
        smooth_window: 0 (default, the exact path): no smoothing. An odd number >= 3: the
            coefficients are smoothed over time with a centred Savitzky–Golay window of that
            many frames (degree 2, no lag) within runs of valid frames, cut at abrupt jumps;
            every format gets the smoothed ones, the npz keeps the raw ones as ``coeff_raw``.
            Applied when the input is finished (not part of the resume fingerprint).
        mode: :class:`Mode`: ``exact`` (default) or ``fast`` (changes results; part of the
            resume fingerprint).
        detect_every: fast path only: run the face detector on every ``detect_every``-th frame
            (keyframes) and track the face in between; >= 1 (part of the fast path's resume
            fingerprint; ignored by the exact path).
        decoder: :class:`Decoder`: ``pyav`` (default) or ``nvdec`` (fast mode only; part of the
            fast path's resume fingerprint).
    """

    checkpoint: Path | None = None
    landmarks: LandmarkBackend | str = LandmarkBackend.FAN
    keypoints: Path | None = None
    formats: tuple[OutputFormat | str, ...] = DEFAULT_FORMATS
    device: str | None = None
    batch_size: int = 32
    no_face: NoFacePolicy = NoFacePolicy.REFERENCE
    min_valid_ratio: float = 0.0
    overwrite: bool = False
    num_threads: int = field(default_factory=lambda: min(8, usable_cpus()))
    decode_threads: int = 0
    keep_person: KeepPerson = KeepPerson.REFERENCE
    smooth_window: int = 0
    mode: Mode = Mode.EXACT
    detect_every: int = 8
    decoder: Decoder = Decoder.PYAV

    def __post_init__(self) -> None:
        # Accept plain strings (from JSON or the CLI) and normalise them to enums/paths.
        object.__setattr__(self, "landmarks", landmark_backend(self.landmarks))
        object.__setattr__(self, "no_face", NoFacePolicy(self.no_face))
        object.__setattr__(self, "keep_person", KeepPerson(self.keep_person))
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "decoder", Decoder(self.decoder))
        if self.decoder == Decoder.NVDEC and self.mode != Mode.FAST:
            raise ValueError("decoder nvdec needs mode fast: NVDEC's colour conversion differs from FFmpeg's, "
                             "so the exact path decodes with pyav")
        if isinstance(self.detect_every, bool) or int(self.detect_every) != self.detect_every or self.detect_every < 1:
            raise ValueError(f"detect_every must be an integer >= 1, got {self.detect_every!r}")
        object.__setattr__(self, "detect_every", int(self.detect_every))
        if self.smooth_window and (self.smooth_window < 3 or self.smooth_window % 2 == 0):
            raise ValueError(f"smooth_window must be 0 (off) or an odd number >= 3, got {self.smooth_window}")
        fmts = self.formats
        if isinstance(fmts, str):
            fmts = [f for f in fmts.split(",") if f.strip()]
        object.__setattr__(self, "formats", tuple(output_format(f) for f in fmts))
        for name in ("checkpoint", "keypoints"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        threads = self.decode_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"decode_threads must be an integer >= 0 (0: FFmpeg's choice), got {threads!r}")
        if not self.formats:
            raise ValueError("formats must name at least one output format")
        if not 0.0 <= self.min_valid_ratio <= 1.0:
            raise ValueError(f"min_valid_ratio must be in [0, 1], got {self.min_valid_ratio}")

    def to_dict(self) -> dict:
        """JSON-serialisable dict; ``EngineConfig(**d)`` rebuilds the same config."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Enum):
                v = v.value
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = [x.value if isinstance(x, Enum) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> EngineConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected with a clear message."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown engine settings: {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)
