"""The extraction pipeline: :class:`Engine` composes the stages, one batch of frames at a time.

::

    source ─frames─▶ detector ─Detections─▶ tracker ─faces─▶ landmarker ─Landmarks─▶
    temporal policy ─AlignPlan─▶ aligner ─AlignedBatch─▶ regressor ─coeff─▶ FrameResults ─▶ sinks

Every stage is a small protocol in :mod:`engine.stages` and can be handed to :class:`Engine`;
the defaults are built from :class:`~engine.config.EngineConfig` (see
``docs/architecture.md``). Memory is O(batch): frames are decoded, aligned and regressed one
batch at a time and only the small per-frame results (≈2 KB a frame) are kept.

Threads: decoding runs ahead in its own thread; detector, tracker and landmarker run in the
landmark thread on batch k+1 while batch k is aligned and regressed in the caller's thread;
a timer thread reports progress (:mod:`engine.progress`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine import __version__
from engine import quality as q
from engine.config import Decoder, EngineConfig, Mode, name_of
from engine.cudasync import apply_cuda_sync
from engine.errors import Cancelled, DecodeError, InputError, NoFaceError, storage_error
from engine.fast import default_source
from engine.frames import takes_device_frames
from engine.hostmem import return_large_blocks
from engine.limits import InputLimits
from engine.progress import PROGRESS_INTERVAL_S, Progress, ProgressReporter
from engine.sources import InputItem
from engine.stages.align import Aligner
from engine.stages.detect import Detector
from engine.stages.landmark import Landmarker
from engine.stages.regress import Regressor, load_regressor
from engine.stages.sink import Sink, SinkContext, SinkHooks, commit, create_sinks
from engine.stages.source import Source
from engine.stages.temporal import NoFacePolicyStage, PolicyState, TemporalPolicy
from engine.stages.track import Tracker, TrackerState, mark_faces, tracker_from_config
from engine.structures import (
    AlignedBatch,
    AlignPlan,
    FaceChoice,
    FrameBatch,
    FrameResults,
    Landmarks,
    MediaInfo,
    concat_rows,
    rows_of,
)

if TYPE_CHECKING:
    from engine.many import InputJob, InputOutcome

log = logging.getLogger(__name__)

STATE_VERSION = 3  # 3: quality arrays saved with every chunk

#: On the CPU, the slow stages (detector → tracker → landmarker, aligner, regressor) run a batch
#: in slices of at least this many frames, and a cancel request is honoured between slices.
CPU_SLICE_FRAMES = 4

#: Prefix of the tracker's arrays in the resume state.
_TRACK_PREFIX = "track_"

__all__ = ["PROGRESS_INTERVAL_S", "Engine", "Progress", "RunReport", "extract", "longest_run"]


@dataclass(frozen=True)
class RunReport:
    """What :meth:`Engine.run` did for one input."""

    input: Path
    outputs: dict[str, Path]
    info: MediaInfo
    num_frames: int = 0
    num_valid: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    longest_invalid_run: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    skipped: bool = False
    resumed_from: int = 0
    checkpoint_sha256: str = ""
    engine_version: str = __version__
    config: dict = field(default_factory=dict)
    #: The per-video quality summary (:func:`engine.quality.video_metrics`): flag counts, jitter ...
    quality: dict = field(default_factory=dict)

    @property
    def valid_ratio(self) -> float:
        return self.num_valid / self.num_frames if self.num_frames else 0.0


longest_run = q.longest_run


def join_results(frames: FrameBatch, landmarks: Landmarks, plan: AlignPlan, aligned: AlignedBatch,
                 coeff: np.ndarray, choice: FaceChoice | None = None) -> FrameResults:
    """One batch's :class:`FrameResults` from what each stage said about it (a pure function).

    A frame is valid when the landmarker found a face and the aligner could use the points;
    ``reason`` is the aligner's when it has one, else the landmarker's. ``landmarks_img_ydown``
    holds the points each frame was aligned with, -1 where the template was used. ``quality``
    holds the per-frame flags a batch shows on its own (:func:`engine.quality.frame_flags`; the
    tracker's ``choice`` says how many faces there were and which was kept).
    """
    rejected = np.array([bool(r) for r in aligned.reason], dtype=bool).reshape(len(frames))
    reason = [a or lm for a, lm in zip(aligned.reason, landmarks.reason, strict=True)]
    if choice is None:
        choice = FaceChoice.of(None, len(frames))
    face = landmarks.valid.astype(bool)
    flags = q.frame_flags(
        face_found=face, faces_found=choice.faces_found, kept_rank=choice.kept_rank,
        low_confidence=q.low_confidence(choice.score, choice.detector, landmarks.confidence) & face,
        crop_box=aligned.crop_box, coeff=coeff, filled=~face & ~plan.use_template,
    )
    quality = {"flags": flags, "faces_found": choice.faces_found.astype(np.int16),
               "kept_rank": choice.kept_rank.astype(np.int16), "score": choice.score.astype(np.float32),
               "landmark_confidence": (np.full(len(frames), np.nan, np.float32) if landmarks.confidence is None
                                       else landmarks.confidence.astype(np.float32))}
    return FrameResults(
        index=frames.index.astype(np.int64),
        timestamps=frames.timestamps.astype(np.float64),
        coeff=coeff.astype(np.float32),
        trans_params=aligned.trans_params.astype(np.float32),
        crop_box=aligned.crop_box.astype(np.int32),
        landmarks_img_ydown=np.where(aligned.used_template[:, None, None], np.float32(-1),
                                     plan.lm_img_ydown).astype(np.float32),
        valid=landmarks.valid.astype(bool) & ~rejected,
        reason=np.asarray(reason, dtype=object).astype(str).reshape(-1),
        quality=quality,
    )


def frame_slices(n: int, step: int) -> list[slice]:
    """``[0, n)`` in slices of ``step``; a trailing single frame joins the slice before it (some
    CPU kernels take another code path for one frame, with other rounding).

    >>> [(s.start, s.stop) for s in frame_slices(9, 4)]
    [(0, 4), (4, 9)]
    """
    bounds = [*range(0, n, max(step, 1)), n] if n else [0, 0]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _in_slices(n: int, step: int, should_stop: Callable[[], bool], where: str,
               work: Callable[[slice], object]) -> list:
    """``work`` on each of :func:`frame_slices`, polling ``should_stop`` between two slices."""
    out = []
    for k, rows in enumerate(frame_slices(n, step)):
        if k and should_stop():
            raise Cancelled(f"cancelled at {where}")
        out.append(work(rows))
    return out


class _Accumulator:
    """Per-frame results of one input, kept as a list of per-batch :class:`FrameResults`."""

    def __init__(self) -> None:
        self.chunks: list[FrameResults] = []
        self.frames = 0

    def add(self, chunk: FrameResults) -> None:
        self.chunks.append(chunk)
        self.frames += len(chunk)


class _ResumeState:
    """Partial results of one input saved after every batch, so a restarted run resumes.

    Layout: ``state_dir/state.json`` (fingerprint, frames done, chunk count) and one
    ``chunk-NNNNNN.npz`` per batch: its :class:`~engine.structures.FrameResults` and the
    state the temporal policy and the tracker had after it. ``state.json`` is replaced
    atomically after the chunk it counts is on disk, so a crash at any point leaves a
    consistent state.
    """

    def __init__(self, state_dir: Path, fingerprint: str) -> None:
        self.dir = Path(state_dir)
        self.fingerprint = fingerprint

    def load(self, acc: _Accumulator, resuming: bool = True) -> dict[str, np.ndarray]:
        """Fill ``acc`` from disk; return the stages' state saved with the last batch
        (the temporal policy's and the tracker's, see :meth:`save`). ``resuming`` False: read to
        merge (the split path), not logged as a resume."""
        meta_path = self.dir / "state.json"
        if not meta_path.is_file():
            return {}
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            log.warning("ignoring unreadable resume state in %s", self.dir)
            return {}
        if meta.get("version") != STATE_VERSION or meta.get("fingerprint") != self.fingerprint:
            log.info("resume state in %s is for other settings or input; starting from frame 0", self.dir)
            self.clear()
            return {}
        carry: dict[str, np.ndarray] = {}
        for i in range(int(meta["chunks"])):
            with np.load(self.dir / f"chunk-{i:06d}.npz", allow_pickle=False) as z:
                chunk = FrameResults.from_arrays(z)
                carry = {k: z[k] for k in z.files if not FrameResults.is_saved_array(k)}
            acc.add(chunk)
        if resuming:
            log.info("resuming %s at frame %d", self.dir, acc.frames)
        return carry

    def save(self, acc: _Accumulator, carry: dict[str, np.ndarray]) -> None:
        """Save the last batch of ``acc`` with ``carry``: the stages' state after it."""
        i = len(acc.chunks) - 1
        arrays = {**acc.chunks[-1].to_arrays(), **carry}
        chunk_path = self.dir / f"chunk-{i:06d}.npz"
        tmp = chunk_path.with_suffix(".tmp.npz")
        meta = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "chunks": i + 1, "frames": acc.frames}
        tmp_meta = self.dir / "state.json.tmp"
        try:  # a full or read-only disk leaves no partial file, and says so in words
            self.dir.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **arrays)
            os.replace(tmp, chunk_path)
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_meta, self.dir / "state.json")
        except OSError as e:
            for p in (tmp, tmp_meta):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise storage_error(e, f"the resume state {self.dir.parent.name}/{self.dir.name}/") from e

    def mark_complete(self, acc: _Accumulator) -> None:
        """Record that every batch of this state's frames is saved (``state.json`` says
        ``complete``): a segment of a split run (:mod:`engine.segments`) that is not run again."""
        meta = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "chunks": len(acc.chunks),
                "frames": acc.frames, "complete": True}
        tmp_meta = self.dir / "state.json.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_meta, self.dir / "state.json")
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp_meta.unlink()
            raise storage_error(e, f"the resume state {self.dir.parent.name}/{self.dir.name}/") from e

    def saved_frames(self) -> tuple[int, bool]:
        """(frames saved, whether :meth:`mark_complete` recorded them all) for this fingerprint,
        read from ``state.json`` alone; (0, False) when there is no such state."""
        try:
            meta = json.loads((self.dir / "state.json").read_text())
            if meta.get("version") != STATE_VERSION or meta.get("fingerprint") != self.fingerprint:
                return 0, False
            return int(meta["frames"]), meta.get("complete") is True
        except (OSError, ValueError, KeyError, TypeError):
            return 0, False

    def complete_frames(self) -> int | None:
        """Frames of a state :meth:`mark_complete` recorded for this fingerprint, else None."""
        frames, complete = self.saved_frames()
        return frames if complete else None

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(("state.json", "chunk-")):
                    with contextlib.suppress(OSError):
                        p.unlink()


@dataclass(frozen=True)
class _FaceStep:
    """What the face stages made of one batch: landmarks, the tracker's choice, and its state after it."""

    landmarks: Landmarks
    track_state: TrackerState
    choice: FaceChoice | None = None


class _FaceStages:
    """Detector → tracker → landmarker (→ re-detection where a verifying tracker lost the face:
    :func:`~engine.stages.track.mark_faces`) for one input, batch after batch in the landmark thread.

    The tracker's state goes from one batch to the next here (one thread, in order); each
    :class:`_FaceStep` carries the state after its batch, for the resume state.
    """

    def __init__(self, detector: Detector | None, tracker: Tracker, landmarker: Landmarker,
                 state: TrackerState, slice_frames: int, should_stop: Callable[[], bool]) -> None:
        self.detector, self.tracker, self.landmarker = detector, tracker, landmarker
        self.state = state
        self.slice_frames = slice_frames
        self.should_stop = should_stop

    def __call__(self, batch: FrameBatch) -> _FaceStep:
        detector = "" if self.detector is None else str(getattr(self.detector, "name", ""))

        def one_slice(rows: slice) -> tuple[Landmarks, FaceChoice]:
            frames = rows_of(batch, rows)
            faces, landmarks, self.state = mark_faces(self.tracker, frames, self.detector, self.landmarker, self.state)
            return landmarks, FaceChoice.of(faces, len(frames), detector)

        where = f"frame {int(batch.index[0])}" if len(batch) else "the end"
        parts = _in_slices(len(batch), self.slice_frames, self.should_stop, where, one_slice)
        landmarks = concat_rows([lm for lm, _ in parts])
        choice = concat_rows([c for _, c in parts]) if parts else None
        return _FaceStep(landmarks, self.state, choice)


class _InputRun:
    """Steps 4 and 5 of :meth:`Engine.run` for one input: the per-batch work in the caller's
    thread, the temporal policy's state, the accumulated results and the resume state."""

    def __init__(self, engine: Engine, info: MediaInfo, acc: _Accumulator, resume: _ResumeState | None,
                 policy_state: PolicyState, reporter: ProgressReporter, should_stop: Callable[[], bool]) -> None:
        self.info, self.acc, self.resume = info, acc, resume
        self.policy, self.policy_state = engine.temporal_policy, policy_state
        self.reporter, self.should_stop = reporter, should_stop
        self.aligner, self.regressor = engine.aligner, engine.regressor
        self.slice_frames = engine.slice_frames
        self.frames_new = 0
        #: Frames expected in this run (the input's count; a segment's length for a segment).
        self.frames_total = info.frame_count

    def finish(self, batch: FrameBatch, step: _FaceStep) -> None:
        """Temporal policy → align → regress one batch, keep its results, save the resume state."""
        plan, self.policy_state = self.policy(step.landmarks, self.policy_state)
        where = f"frame {int(batch.index[0])}" if len(batch) else "the end"
        aligned = concat_rows(_in_slices(len(batch), self.slice_frames, self.should_stop, where,
                                         lambda rows: self.aligner(rows_of(batch, rows), rows_of(plan, rows))))
        coeff = np.concatenate(_in_slices(len(batch), self.slice_frames, self.should_stop, where,
                                          lambda rows: self.regressor.predict(aligned.crops[rows])))
        self.acc.add(join_results(batch, step.landmarks, plan, aligned, coeff, step.choice))
        if self.resume is not None:
            track = {_TRACK_PREFIX + k: v for k, v in step.track_state.to_arrays().items()}
            self.resume.save(self.acc, {**self.policy_state.to_arrays(), **track})
        self.frames_new += len(batch)
        self.reporter.update(frames_done=self.acc.frames, frames_total=max(self.frames_total, self.acc.frames))
        self.reporter.report()


class Engine:
    """Extract Deep3DFaceRecon coefficients from videos and images.

    Every stage can be handed in; the ones left out are built from ``config`` (models on the
    first :meth:`run`, then reused for every later input); ``config.mode == "fast"`` picks the
    fast path's (:mod:`engine.fast`). Call :meth:`close` (or use ``with Engine(cfg) as engine``) to free them.

    Args:
        config: the settings (see :class:`~engine.config.EngineConfig`).
        source: reads inputs (:class:`~engine.stages.source.Source`); default
            :class:`~engine.stages.source.MediaSource`.
        detector: finds faces (:class:`~engine.stages.detect.Detector`); default: the one the
            landmark backend pairs with (``landmarker.detector``).
        tracker: picks each frame's face (:class:`~engine.stages.track.Tracker`); default
            :func:`~engine.stages.track.tracker_from_config`.
        landmarker: an already-built landmark backend to reuse (not for ``"file"``); default:
            ``config.landmarks`` from :data:`engine.landmarks.BACKENDS`.
        aligner: cuts the crops (:class:`~engine.stages.align.Aligner`); default
            :func:`engine.fast.default_aligner`: Pillow on the CPU, its bit-identical GPU
            version (:class:`~engine.stages.align.TorchAligner`) on CUDA.
        regressor: an already-loaded :class:`~engine.stages.regress.Regressor` to reuse;
            default: ``config.checkpoint``.
        sinks: where results go (:class:`~engine.stages.sink.Sink`), used for every input;
            default: one per ``config.formats``, from :data:`engine.formats.FORMATS`.
        temporal_policy: what frames without a face are aligned with
            (:class:`~engine.stages.temporal.TemporalPolicy`); default
            :class:`~engine.stages.temporal.NoFacePolicyStage` for ``config.no_face``.
        progress_interval_s: longest gap between two progress reports (seconds).
        limits: what an input may be (default: :meth:`~engine.limits.InputLimits.from_env`).
        landmark_thread: a one-thread executor to run the face stages on, the caller's (left
            open by :meth:`close`); default: the engine's own, made on first use. A thread that
            lives on keeps what PyTorch caches per thread (cuDNN's plans) for the next input.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        source: Source | None = None,
        detector: Detector | None = None,
        tracker: Tracker | None = None,
        landmarker: Landmarker | None = None,
        aligner: Aligner | None = None,
        regressor: Regressor | None = None,
        sinks: Iterable[Sink] | None = None,
        temporal_policy: TemporalPolicy | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        limits: InputLimits | None = None,
        landmark_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        return_large_blocks()  # freed frames go back to the OS (engine.hostmem)
        apply_cuda_sync()  # how threads wait for the GPU, before any CUDA context (engine.cudasync)
        self.limits = limits or InputLimits.from_env()  # bytes, pixels, duration (engine.limits)
        # NVDEC decodes on config.device, or on cuda:0 when unset (it needs a GPU either way). The
        # exact path's frames become RGB on a GPU only if every face stage handed in takes them there.
        device_frames = all(takes_device_frames(s) for s in (detector, landmarker, aligner) if s is not None)
        self.source: Source = source or default_source(self.config, self.config.device or "cuda",
                                                       device_frames=device_frames)
        self._detector = detector
        self.tracker: Tracker = tracker or tracker_from_config(self.config)
        self._landmarker = landmarker
        self._aligner = aligner
        self._regressor = regressor
        self._sinks = None if sinks is None else list(sinks)
        #: Names of the stages handed in (not built from ``config``): a child process cannot rebuild them.
        self.handed_in: tuple[str, ...] = tuple(name for name, stage in (
            ("source", source), ("detector", detector), ("tracker", tracker), ("landmarker", landmarker),
            ("aligner", aligner), ("regressor", regressor), ("sinks", sinks), ("temporal_policy", temporal_policy),
        ) if stage is not None)
        self.temporal_policy: TemporalPolicy = temporal_policy or NoFacePolicyStage.from_config(self.config)
        self.progress_interval_s = progress_interval_s
        #: The face stages' thread (one worker); a caller's (``landmark_thread``) is kept open at close.
        self._lm_thread: ThreadPoolExecutor | None = landmark_thread
        self._own_lm_thread = landmark_thread is None
        self._face_model = None  # (key, ParametricFaceModel), loaded on first use

    # ------------------------------------------------------------------ components

    @property
    def device(self) -> str:
        """The torch device string runs use (``config.device`` or cuda when available)."""
        if self.config.device:
            return self.config.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def slice_frames(self) -> int:
        """Frames per slice of a slow stage: the whole batch on a GPU, else
        ``max(CPU_SLICE_FRAMES, num_threads)`` (see :data:`CPU_SLICE_FRAMES`), and at least
        ``detect_every`` on the fast path (its tracker makes each slice's last frame a keyframe)."""
        if self.device.startswith("cuda"):
            return self.config.batch_size
        fast = self.config.detect_every if self.config.mode == Mode.FAST else 1
        return max(CPU_SLICE_FRAMES, self.config.num_threads, fast)

    @property
    def aligner(self) -> Aligner:
        """The aligner handed in, else :func:`engine.fast.default_aligner` (built on first use)."""
        if self._aligner is None:
            from engine.fast import default_aligner

            self._aligner = default_aligner(self.config, self.device)
        return self._aligner

    @property
    def regressor(self) -> Regressor:
        """The reconstruction network, loaded on first use (fp16 for the fast path on CUDA)."""
        if self._regressor is None:
            from engine.fast import regressor_precision

            self._regressor = load_regressor(self.config.checkpoint, self.device,
                                             regressor_precision(self.config, self.device))
        return self._regressor

    def landmarker_for(self, source: Path | InputItem | None) -> Landmarker:
        """The landmark backend for ``source`` (built per input for ``"file"``, else shared; ``source``
        unused then)."""
        from engine.landmarks import create_landmarker, needs_source

        if self._landmarker is None and needs_source(self.config):
            return create_landmarker(self.config, self.device, source)
        if self._landmarker is None and self.config.mode == Mode.FAST:
            from engine.fast import fast_landmarker

            self._landmarker = fast_landmarker(self.config, self.device)
        if self._landmarker is None:
            self._landmarker = create_landmarker(self.config, self.device, source)
        return self._landmarker

    def detector_for(self, landmarker: Landmarker) -> Detector | None:
        """The detector handed in, else the one ``landmarker`` pairs with (None: it needs none)."""
        return self._detector if self._detector is not None else getattr(landmarker, "detector", None)

    def load(self) -> Engine:
        """Load the models now rather than on the first :meth:`run`: the regressor, the landmark
        backend (unless it is built per input, as ``file``) and the aligner. A worker calls it
        before it claims a job, so no claimed job waits while models load. Returns ``self``;
        raises what the first run would (a missing or wrong weight file)."""
        from engine.landmarks import needs_source

        _ = self.regressor, self.aligner
        if not needs_source(self.config):
            self.landmarker_for(None)
        return self

    @property
    def components(self) -> dict:
        """Loaded models, to share with another :class:`Engine` (``Engine(cfg, **engine.components)``);
        the light stages (tracker, aligner) are built per engine."""
        return {"regressor": self._regressor, "landmarker": self._landmarker, "detector": self._detector}

    def close_threads(self) -> None:
        """Stop this engine's threads but keep its models (to hand them on with :attr:`components`)."""
        if self._lm_thread is not None and self._own_lm_thread:
            self._lm_thread.shutdown(wait=True)
        self._lm_thread = None
        if self._aligner is not None and hasattr(self._aligner, "close"):
            self._aligner.close()

    def close(self) -> None:
        """Release models and threads."""
        self.close_threads()
        if self._landmarker is not None and hasattr(self._landmarker, "close"):
            self._landmarker.close()
        self._landmarker = None
        self._detector = None
        self._regressor = None
        self._face_model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ run

    def run(
        self,
        source: str | Path | InputItem,
        out_base: str | Path,
        *,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        state_dir: str | Path | None = None,
    ) -> RunReport:
        """Extract one video or image and write the configured formats.

        Args:
            source: a video or image file, or an :class:`~engine.sources.InputItem` from
                :func:`~engine.sources.discover_inputs` (lets ``--landmarks file`` find
                keypoints in a folder that mirrors the input tree).
            out_base: output path without suffix; files are ``f"{out_base}{suffix}"``.
            progress: called with a :class:`Progress` after every batch, and at least every
                ``progress_interval_s`` whatever stage is running (from a timer thread; the
                calls never overlap).
            should_stop: polled before every batch and between the slices of a slow stage;
                returning True raises :class:`~engine.errors.Cancelled` (partial state is kept
                in ``state_dir``).
            state_dir: folder for resumable partial results (see :class:`_ResumeState`).

        Returns:
            a :class:`RunReport`; ``skipped`` is True when every output already existed.

        Raises:
            InputError / DecodeError: unreadable input. NoFaceError: no usable face.
            CheckpointError / WeightsMissingError: model files. OutputError: cannot write.
            Cancelled: ``should_stop`` returned True.
        """
        t_start = time.perf_counter()
        item = source if isinstance(source, InputItem) else None
        source = item.path if item else Path(source)
        out_base = Path(out_base)
        stop = should_stop or _never

        # 1. Check inputs before any model work; each sink says where its files go.
        info = self.check_input(source)
        sinks, paths, skipped = self._start_sinks(source, info, out_base)
        if skipped is not None:
            return skipped
        try:
            with ProgressReporter(progress, self.progress_interval_s) as reporter:
                report = self._run(item or source, info, sinks, paths, reporter, stop, state_dir)
        except BaseException:
            _abort(sinks)
            raise
        return dataclasses.replace(report, seconds=time.perf_counter() - t_start)

    def _start_sinks(self, path: Path, info: MediaInfo, out_base: Path,
                     ) -> tuple[list[Sink], dict[str, Path], RunReport | None]:
        """The second half of step 1 of :meth:`run` (also the split path's): this input's sinks,
        started (each says where its files go), and their paths. Without ``overwrite``, when
        every file is already there, the sinks are aborted and the third item is the skipped
        :class:`RunReport` (else None). A sink that fails to start aborts them all."""
        cfg = self.config
        sinks = self._sinks if self._sinks is not None else create_sinks(cfg.formats, self._sink_context)
        paths: dict[str, Path] = {}
        try:
            for sink in sinks:
                paths.update(sink.start(info, out_base))
        except BaseException:
            _abort(sinks)
            raise
        if not cfg.overwrite and paths and all(p.is_file() for p in paths.values()):
            log.info("%s: outputs exist, skipping (use overwrite to redo)", path)
            _abort(sinks)
            return sinks, paths, RunReport(input=path, outputs=paths, info=info, skipped=True, config=cfg.to_dict())
        return sinks, paths, None

    def run_many(self, jobs: Iterable[InputJob], *, concurrency: int | None = None,
                 merge_batches: bool | None = None, processes: int = 1) -> Iterator[InputOutcome]:
        """Run several inputs at once on this engine's models; yield each one's outcome as it ends.

        Each input runs in one of ``concurrency`` threads and its own :class:`Engine` sharing this
        one's loaded stages (:mod:`engine.many`; the threads, landmark threads included, serve input
        after input): its own sinks, resume state (``state_dir``), progress and error: an input
        that fails (``StudioError``, ``Cancelled`` ...) gives an :class:`~engine.many.InputOutcome`
        with its error and the others go on. Results per input
        are the same as :meth:`run`'s (on the CPU bit for bit; on CUDA the merged regressor
        batches may change float rounding, as another ``batch_size`` would).

        Args:
            jobs: :class:`~engine.many.InputJob` items, consumed lazily: the next item is pulled
                (in a helper thread, never two at once) only when fewer than ``concurrency``
                inputs are open, so a worker can feed jobs as it claims them.
            concurrency: inputs at once; default :func:`engine.many.default_concurrency` (2 on
                CUDA; on the CPU one per 4 cores, at least 1). 1 with sinks handed to the engine.
            merge_batches: merge the inputs' regressor calls into one forward
                (:class:`~engine.batching.MergingRegressor`); default: on CUDA only.
            processes: with K > 1, K child processes (:mod:`engine.procs`), each with its own
                ``Engine(config)`` (its own GIL, CUDA context and models) running ``concurrency``
                inputs at once; the callbacks stay in this process. Only for an engine built
                from its config alone: with stages handed in, ValueError (use
                :class:`engine.procs.EnginePool` with a factory). A child that dies ends its
                inputs with :class:`~engine.errors.EngineProcessError`; the others go on.

        Yields:
            one :class:`~engine.many.InputOutcome` per job, in completion order. Closing the
            generator early cancels the inputs still open (their resume state is kept).

        Raises:
            whatever iterating ``jobs`` raises, after the inputs already started have ended.
        """
        if processes > 1:
            from engine.procs import run_in_processes

            return run_in_processes(self, jobs, processes=processes, concurrency=concurrency,
                                    merge_batches=merge_batches)
        from engine.many import run_many

        return run_many(self, jobs, concurrency=concurrency, merge_batches=merge_batches)

    def check_input(self, source: str | Path | InputItem) -> MediaInfo:
        """Step 1 of :meth:`run`, which needs no model: the input exists, is within
        :attr:`limits` and probes as a video or an image.

        Raises:
            InputError / DecodeError: with the input's name and why.
        """
        path = source.path if isinstance(source, InputItem) else Path(source)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        self.limits.check_file(path)
        info = self.source.probe(path)
        self.limits.check_media(path.name, info)
        return info

    def _run(self, source: Path | InputItem, info: MediaInfo, sinks: list[Sink], paths: dict[str, Path],
             reporter: ProgressReporter, stop: Callable[[], bool], state_dir) -> RunReport:
        """Steps 2-7 of :meth:`run`."""
        path = source.path if isinstance(source, InputItem) else source
        reporter.begin(0, info.frame_count)

        # 2-3. Load (or reuse) the models; restore partial results of an interrupted run.
        resume = _ResumeState(Path(state_dir), self._fingerprint(path)) if state_dir else None
        acc, faces, run, landmarker = self._open_input(source, info, resume, reporter, stop)
        resumed_from = acc.frames
        reporter.begin(acc.frames, info.frame_count)

        # 4. Stream batches: faces (landmark thread) → temporal policy → align → regress.
        t_loop = time.perf_counter()
        self._stream(path, run, faces)
        fps = run.frames_new / max(time.perf_counter() - t_loop, 1e-9)

        # 5-7. Judge, whole-input quality, write; then drop the partial state.
        report = self._conclude(path, info, acc, sinks, paths, reporter, stop, landmarker)
        if resume is not None:
            resume.clear()
        return dataclasses.replace(report, fps=fps, resumed_from=resumed_from,
                                   checkpoint_sha256=getattr(self.regressor, "checkpoint_sha256", ""))

    def _open_input(self, source: Path | InputItem, info: MediaInfo, resume: _ResumeState | None,
                    reporter: ProgressReporter, stop: Callable[[], bool],
                    ) -> tuple[_Accumulator, _FaceStages, _InputRun, Landmarker]:
        """Steps 2 and 3 of :meth:`run`: load (or reuse) the models, restore the results saved in
        ``resume`` and the stages' state with them (fresh states when there are none)."""
        self.regressor  # noqa: B018  (loaded before the first batch, as before)
        landmarker = self.landmarker_for(source)
        acc = _Accumulator()
        carry = resume.load(acc) if resume else {}
        track = {k[len(_TRACK_PREFIX):]: v for k, v in carry.items() if k.startswith(_TRACK_PREFIX)}
        faces = _FaceStages(self.detector_for(landmarker), self.tracker, landmarker,
                            self.tracker.initial_state(track or None), self.slice_frames, stop)
        run = _InputRun(self, info, acc, resume, self.temporal_policy.initial_state(carry or None), reporter, stop)
        return acc, faces, run, landmarker

    def _conclude(self, path: Path, info: MediaInfo, acc: _Accumulator, sinks: list[Sink], paths: dict[str, Path],
                  reporter: ProgressReporter, stop: Callable[[], bool], landmarker: Landmarker | None) -> RunReport:
        """Steps 5-7 of :meth:`run` on the per-frame results of a whole input (``acc``): judge
        them, add the whole-input quality and extras, write every sink. Shared by :meth:`run`
        and the split path (:func:`engine.segments.run_split`, ``landmarker`` None there);
        the caller fills in ``fps``, ``resumed_from`` and ``checkpoint_sha256``."""
        cfg = self.config
        # 5. Judge the result.
        if acc.frames == 0:
            raise DecodeError(f"{path.name}: no frames could be decoded")
        if hasattr(landmarker, "check_frame_count"):  # precomputed landmarks must cover every frame
            landmarker.check_frame_count(acc.frames)
        valid = np.concatenate([c.valid for c in acc.chunks])
        reasons = Counter(str(r) for c in acc.chunks for r in c.reason if r)
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise NoFaceError(f"{path.name}: no face found in any of its {acc.frames} frames")
        if num_valid / acc.frames < cfg.min_valid_ratio:
            raise NoFaceError(
                f"{path.name}: a face was found in only {num_valid}/{acc.frames} frames "
                f"(< min_valid_ratio {cfg.min_valid_ratio:.0%})"
            )

        # 6. Whole-input flags (abrupt jumps), optional smoothing, the quality summary; then the
        #    optional extras from the face model (never needed for coefficients).
        batches, quality = self._finish_quality(acc.chunks)
        batches = self._add_face_model_extras(batches)

        # 7. Every batch to every sink, their files complete, then all renamed.
        reporter.update(frames_done=acc.frames, frames_total=acc.frames, stage="write")
        reporter.report()
        written = self._write(sinks, batches, paths, reporter, stop, acc.frames)
        return RunReport(
            input=path,
            outputs=written,
            info=info,
            num_frames=acc.frames,
            num_valid=num_valid,
            reasons=dict(reasons),
            longest_invalid_run=longest_run(~valid),
            config=cfg.to_dict(),
            quality=quality,
        )

    def run_segment(
        self,
        source: str | Path | InputItem,
        segment: tuple[int, int | None],
        state_dir: str | Path,
        *,
        progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RunReport:
        """Steps 1-4 of :meth:`run` for frames ``[start, stop)`` of one video (``stop`` None: to
        its end), for the split path (:mod:`engine.segments`): each batch's results are saved as
        resume chunks in ``state_dir`` (resumed there when interrupted), nothing is judged or
        written, and ``state.json`` is marked complete at the end; a complete state is not run
        again (the report says ``skipped``).

        A segment that starts after frame 0 first runs the face stages and the temporal policy
        (not the aligner or the regressor) over the batch before ``start`` (the lead-in), so the
        tracker and the policy enter ``start`` with the state a whole run would have there
        (docs/architecture.md, "One video in several processes").

        Returns:
            a :class:`RunReport` without outputs: ``num_frames`` and ``num_valid`` of the segment.

        Raises:
            as :meth:`run` (not NoFaceError: the parent judges the whole input).
        """
        t_start = time.perf_counter()
        item = source if isinstance(source, InputItem) else None
        path = item.path if item else Path(source)
        start, stop = int(segment[0]), (None if segment[1] is None else int(segment[1]))
        halt = should_stop or _never
        info = self.check_input(path)
        resume = _ResumeState(Path(state_dir), segment_fingerprint(self._fingerprint(path), start, stop))
        total = max(0, (info.frame_count if stop is None else stop) - start)
        done = resume.complete_frames()
        if done is not None:
            return RunReport(input=path, outputs={}, info=info, num_frames=done, skipped=True, resumed_from=done,
                             config=self.config.to_dict())
        with ProgressReporter(progress, self.progress_interval_s) as reporter:
            reporter.begin(0, total)
            acc, faces, run, _ = self._open_input(item or path, info, resume, reporter, halt)
            run.frames_total = total
            resumed_from = acc.frames
            reporter.begin(acc.frames, total)
            if acc.frames == 0 and start > 0:
                self._lead_in(path, start, faces, run)
            t_loop = time.perf_counter()
            self._stream(path, run, faces, start=start, stop=stop)
            fps = run.frames_new / max(time.perf_counter() - t_loop, 1e-9)
            resume.mark_complete(acc)
        valid = sum(int(c.valid.sum()) for c in acc.chunks)
        return RunReport(input=path, outputs={}, info=info, num_frames=acc.frames, num_valid=valid, fps=fps,
                         seconds=time.perf_counter() - t_start, resumed_from=resumed_from,
                         checkpoint_sha256=getattr(self.regressor, "checkpoint_sha256", ""),
                         config=self.config.to_dict())

    def _lead_in(self, path: Path, start: int, faces: _FaceStages, run: _InputRun) -> None:
        """The face stages and the temporal policy over the batch before frame ``start`` (its
        results dropped): the tracker's and the policy's state as a whole run has them at ``start``."""
        first = max(0, start - self.config.batch_size)
        batches = _until(self.source.frames(path, self.config.batch_size, start=first), start)
        with _closing(batches):
            for batch in batches:
                if run.should_stop():
                    raise Cancelled(f"{path.name}: cancelled before frame {start}")
                step = faces(batch)
                _, run.policy_state = run.policy(step.landmarks, run.policy_state)

    # ------------------------------------------------------------------ helpers

    def _stream(self, path: Path, run: _InputRun, faces: _FaceStages, start: int = 0, stop: int | None = None) -> None:
        """Step 4 of :meth:`run`: the face stages of batch k+1 run in the landmark thread while
        batch k is finished here; decoding runs ahead in its own thread. Frames ``[start +
        frames restored, stop)`` (``stop`` None: to the end)."""
        lm_thread = self._landmark_thread()
        inflight: deque[tuple[FrameBatch, Future[_FaceStep]]] = deque()  # the batch being finished, the next

        def finish_oldest() -> None:
            batch, step = inflight.popleft()
            run.finish(batch, step.result())

        batches = self.source.frames(path, self.config.batch_size, start=start + run.acc.frames)
        if stop is not None:
            batches = _until(batches, stop)
        try:
            with _closing(batches), run.regressor.numerics():
                for batch in batches:
                    if run.should_stop():
                        # Finish the batch in flight, so a resume starts after it (its slow stages
                        # give up at their next slice boundary if the request still stands).
                        while inflight:
                            finish_oldest()
                        raise Cancelled(f"{path.name}: cancelled at frame {start + run.acc.frames}")
                    inflight.append((batch, lm_thread.submit(faces, batch)))
                    if len(inflight) > 1:
                        finish_oldest()
                while inflight:
                    finish_oldest()
        finally:
            wait([f for _, f in inflight])  # after an error: leave the landmark thread idle

    def _write(self, sinks: list[Sink], batches: list[FrameResults], paths: dict[str, Path],
               reporter: ProgressReporter, stop: Callable[[], bool], num_frames: int) -> dict[str, Path]:
        """Step 7 of :meth:`run`: every batch to every sink, every sink's files staged, then all
        renamed into place (a failure before the renames leaves none; the caller aborts)."""

        def sink_progress(done: int, total: int) -> None:
            reporter.update(frames_done=done, frames_total=max(total, num_frames), stage="overlay")
            reporter.report()

        hooks = SinkHooks(report=sink_progress, should_stop=stop)
        staged: dict[Path, Path] = {}
        for sink in sinks:
            for results in batches:
                sink.add(results)
            for fmt, tmp in sink.finish(hooks).items():
                staged[tmp] = paths[fmt]
        commit(staged)
        log.debug("wrote %s", ", ".join(str(p) for p in paths.values()))
        return paths

    def _landmark_thread(self) -> ThreadPoolExecutor:
        """One thread that runs the face stages (always the same thread, one call at a time)."""
        if self._lm_thread is None:
            self._lm_thread = ThreadPoolExecutor(1, thread_name_prefix="landmarks")
            self._own_lm_thread = True
        return self._lm_thread

    def _sink_context(self, fmt: str) -> SinkContext:
        return SinkContext(format=fmt, config=self.config, face_model=self.face_model)

    def _fingerprint(self, source: Path) -> str:
        """Identity of (input file, settings that change results) for resuming."""
        st = source.stat()
        cfg = self.config
        key = {
            "input": str(source.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "checkpoint": _file_identity(self._checkpoint_path()),
            "landmarks": name_of(cfg.landmarks),
            "keypoints": _file_identity(cfg.keypoints) if cfg.keypoints else None,
            "no_face": cfg.no_face.value,
            "keep_person": cfg.keep_person.value,
            "engine": __version__,
        }
        if cfg.mode != Mode.EXACT:  # the exact path's key is as before: its saved states stay valid
            key.update(mode=cfg.mode.value, detect_every=cfg.detect_every)
            if cfg.decoder != Decoder.PYAV:  # keeps earlier fast-path states valid
                key.update(decoder=cfg.decoder.value)
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _checkpoint_path(self) -> Path:
        """The regressor's checkpoint file, without loading it when it is not loaded yet (the
        split path's parent process fingerprints an input but runs no model)."""
        if self._regressor is not None:
            return self._regressor.checkpoint_path
        from engine.weights import find_checkpoint

        return find_checkpoint(self.config.checkpoint)

    def face_model(self):
        """The face model of ``BFM/`` on this engine's device, loaded once (visuals only)."""
        from engine.face3d.model import ParametricFaceModel
        from engine.weights import bfm_dir

        path = bfm_dir() / "BFM_model_front.mat"
        key = (str(path), path.stat().st_mtime_ns)
        if self._face_model is None or self._face_model[0] != key:
            self._face_model = (key, ParametricFaceModel.from_dir(path.parent, self.device))
        return self._face_model[1]

    def _finish_quality(self, batches: list[FrameResults]) -> tuple[list[FrameResults], dict]:
        """Step 6 of :meth:`run`: the ``abrupt_jump`` flag (it needs the whole input), smoothing
        when ``config.smooth_window`` is set (``coeff`` replaced, the raw kept as ``coeff_raw``),
        and the per-video quality summary (:func:`engine.quality.video_metrics`)."""
        whole = FrameResults.concat(batches)
        flags = whole.quality.get("flags")
        if flags is None:  # results made without quality arrays (an injected stage's own join)
            flags = np.zeros(len(whole), dtype=np.uint32)
        jumps = q.abrupt_jumps(whole.coeff, whole.trans_params, whole.crop_box, whole.valid)
        flags = flags | np.where(jumps, np.uint32(q.bit("abrupt_jump")), np.uint32(0))
        extra: dict[str, np.ndarray] = {"flags": flags}
        coeff, coeff_raw = whole.coeff, None
        window = int(self.config.smooth_window)
        if window:
            coeff_raw = whole.coeff
            coeff = q.smooth_coefficients(coeff_raw, whole.valid, jumps, q.Smoothing(window=window))
            extra["coeff_raw"] = coeff_raw
        summary = q.video_metrics(whole.valid, flags, coeff, whole.trans_params, coeff_raw)
        if window:
            summary["smoothing"] = {"method": "savitzky-golay", "window": window, "polyorder": 2,
                                    "applied_to": "coeff"}
        cuts = np.cumsum([len(b) for b in batches])[:-1]
        split = {k: np.split(v, cuts) for k, v in extra.items()}
        coeffs = np.split(coeff, cuts)
        out = [dataclasses.replace(b, coeff=coeffs[i], quality={**b.quality, **{k: v[i] for k, v in split.items()}})
               for i, b in enumerate(batches)]
        return out, summary

    def _add_face_model_extras(self, batches: list[FrameResults]) -> list[FrameResults]:
        """The batches with reprojected 68 landmarks when ``BFM/BFM_model_front.mat`` is set up,
        computed over the whole input at once.

        Optional: any failure here is logged and the coefficients are written without them.
        """
        from engine.weights import bfm_dir

        if not (bfm_dir() / "BFM_model_front.mat").is_file():
            return batches
        try:
            from engine.face3d import lm68_extras

            whole = FrameResults.concat(batches)
            extras = lm68_extras(whole.coeff, whole.trans_params, self.face_model(), crop_box=whole.crop_box)
        except Exception as e:  # an optional extra must not fail the input
            log.warning("face model present but unusable, lm68 not added: %s: %s", type(e).__name__, e)
            return batches
        cuts = np.cumsum([len(b) for b in batches])[:-1]
        per_batch = {name: np.split(arr, cuts) for name, arr in extras.items()}
        return [dataclasses.replace(b, extras={**b.extras, **{k: v[i] for k, v in per_batch.items()}})
                for i, b in enumerate(batches)]


def _never() -> bool:
    return False


def _abort(sinks: list[Sink]) -> None:
    """Abort every sink; one failing to clean up does not stop the others."""
    for sink in sinks:
        try:
            sink.abort()
        except Exception as e:  # cleanup after a failure must not hide that failure
            log.warning("sink %s did not clean up: %s: %s", type(sink).__name__, type(e).__name__, e)


def _until(batches: Iterator[FrameBatch], stop: int) -> Iterator[FrameBatch]:
    """``batches`` up to frame ``stop`` (exclusive): the batch that reaches it is cut there and
    the source is closed (it decodes no further)."""
    try:
        for batch in batches:
            keep = int(np.count_nonzero(np.asarray(batch.index) < stop))
            if keep == len(batch):
                yield batch
                continue
            if keep:
                yield rows_of(batch, slice(0, keep))
            return
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def segment_fingerprint(fingerprint: str, start: int, stop: int | None) -> str:
    """The resume fingerprint of frames ``[start, stop)`` of the input ``fingerprint`` names.

    >>> segment_fingerprint("ab", 0, 64) != segment_fingerprint("ab", 0, None)
    True
    """
    return hashlib.sha256(f"{fingerprint}:{start}:{'end' if stop is None else stop}".encode()).hexdigest()


@contextlib.contextmanager
def _closing(items: Iterator) -> Iterator[Iterator]:
    """Close ``items`` on the way out when it can be closed (a generator stops its thread)."""
    try:
        yield items
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _file_identity(path: Path) -> list:
    """(resolved path, size, mtime) of a file, for fingerprints; a folder gives only its path."""
    path = Path(path).resolve()
    if not path.is_file():
        return [str(path)]
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def extract(source: str | Path, out_base: str | Path, config: EngineConfig | None = None, **kwargs) -> RunReport:
    """One-shot helper: ``Engine(config).run(source, out_base, **kwargs)`` and close."""
    with Engine(config) as engine:
        return engine.run(source, out_base, **kwargs)
