"""The extraction pipeline: source → frames → landmarks → aligned crops → coefficients → sinks.

:class:`Engine` composes the stages (diffusers-style): a frame source
(:mod:`engine.sources`), a landmark backend (:mod:`engine.landmarks`), the aligner
(:mod:`engine.align`), the regressor (:mod:`engine.regressor`) and the writers
(:mod:`engine.writers`). Memory is O(batch): frames are decoded, aligned and regressed
one batch at a time and only the small per-frame results (≈2 KB a frame) are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import __version__
from engine.config import EngineConfig, LandmarkBackend, NoFacePolicy, OutputFormat
from engine.errors import Cancelled, DecodeError, InputError, NoFaceError, WeightsMissingError, storage_error
from engine.limits import InputLimits
from engine.sources import InputItem, iter_frames, prefetch, probe
from engine.structures import FrameBatch, Landmarks, MediaInfo, VideoResult
from engine.writers import output_paths, write_outputs

log = logging.getLogger(__name__)

STATE_VERSION = 1

#: Longest gap between two progress reports while a batch is being processed (seconds).
PROGRESS_INTERVAL_S = 1.0

#: Frames per landmark call on the CPU: between slices a cancel request is honoured.
CPU_LANDMARK_SLICE = 4


@dataclass(frozen=True)
class Progress:
    """Reported after every batch.

    Attributes:
        frames_done: frames finished so far (including frames restored from a resumed state).
        frames_total: expected frame count (the container's figure; may be an estimate).
        fps: frames per second processed in this run (not counting restored frames).
        stage: ``"extract"`` while running, ``"write"`` while writing outputs, ``"overlay"``
            while rendering the review video.
    """

    frames_done: int
    frames_total: int
    fps: float
    stage: str = "extract"


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

    @property
    def valid_ratio(self) -> float:
        return self.num_valid / self.num_frames if self.num_frames else 0.0


def longest_run(mask: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D bool array.

    >>> longest_run(np.array([True, False, True, True, False]))
    2
    """
    best = cur = 0
    for v in np.asarray(mask, dtype=bool):
        cur = cur + 1 if v else 0
        best = max(best, cur)
    return best


class _Accumulator:
    """Per-frame results of one input, kept as a list of per-batch chunks."""

    KEYS = ("coeff", "trans_params", "landmarks", "valid", "reason", "timestamps")

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.frames = 0

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        self.chunks.append(chunk)
        self.frames += int(chunk["valid"].shape[0])

    def concat(self, key: str) -> np.ndarray:
        return np.concatenate([c[key] for c in self.chunks], axis=0)


class _ResumeState:
    """Partial results of one input saved after every batch, so a restarted run resumes.

    Layout: ``state_dir/state.json`` (fingerprint, frames done, chunk count) and one
    ``chunk-NNNNNN.npz`` per batch. ``state.json`` is replaced atomically after the chunk
    it counts is on disk, so a crash at any point leaves a consistent state.
    """

    def __init__(self, state_dir: Path, fingerprint: str) -> None:
        self.dir = Path(state_dir)
        self.fingerprint = fingerprint

    def load(self, acc: _Accumulator) -> np.ndarray | None:
        """Fill ``acc`` from disk; return the last landmarks used (for the no-face policy)."""
        meta_path = self.dir / "state.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            log.warning("ignoring unreadable resume state in %s", self.dir)
            return None
        if meta.get("version") != STATE_VERSION or meta.get("fingerprint") != self.fingerprint:
            log.info("resume state in %s is for other settings or input; starting from frame 0", self.dir)
            self.clear()
            return None
        last_lm = None
        for i in range(int(meta["chunks"])):
            with np.load(self.dir / f"chunk-{i:06d}.npz", allow_pickle=False) as z:
                chunk = {k: z[k] for k in _Accumulator.KEYS}
                if "last_lm" in z:
                    last_lm = z["last_lm"]
            acc.add(chunk)
        log.info("resuming %s at frame %d", self.dir, acc.frames)
        return last_lm

    def save(self, acc: _Accumulator, last_lm: np.ndarray | None) -> None:
        i = len(acc.chunks) - 1
        arrays = dict(acc.chunks[-1])
        if last_lm is not None:
            arrays["last_lm"] = last_lm
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

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(("state.json", "chunk-")):
                    with contextlib.suppress(OSError):
                        p.unlink()


class Engine:
    """Extract Deep3DFaceRecon coefficients from videos and images.

    Models load on the first :meth:`run` and are reused for every later input; call
    :meth:`close` (or use ``with Engine(cfg) as engine``) to free them.

    Args:
        config: the settings (see :class:`~engine.config.EngineConfig`).
        regressor: an already-loaded :class:`~engine.regressor.Regressor` to reuse.
        landmarker: an already-built landmark backend to reuse (not for ``"file"``).
        limits: what an input may be (default: :meth:`~engine.limits.InputLimits.from_env`).
    """

    def __init__(self, config: EngineConfig | None = None, *, regressor=None, landmarker=None,
                 limits: InputLimits | None = None) -> None:
        self.config = config or EngineConfig()
        self.limits = limits or InputLimits.from_env()  # bytes, pixels, duration (engine.limits)
        self._regressor = regressor
        self._landmarker = landmarker
        self._executor: ThreadPoolExecutor | None = None
        self._lm_thread: ThreadPoolExecutor | None = None
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
    def regressor(self):
        """The reconstruction network, loaded on first use."""
        if self._regressor is None:
            from engine.regressor import Regressor
            from engine.weights import find_checkpoint

            self._regressor = Regressor(find_checkpoint(self.config.checkpoint), device=self.device)
        return self._regressor

    def landmarker_for(self, source: Path | InputItem):
        """The landmark backend for ``source`` (built per input for ``"file"``, else shared)."""
        from engine.landmarks import create_landmarker, needs_source

        if needs_source(self.config):
            return create_landmarker(self.config, self.device, source)
        if self._landmarker is None:
            self._landmarker = create_landmarker(self.config, self.device, source)
        return self._landmarker

    @property
    def components(self) -> dict:
        """Loaded stages, to share with another :class:`Engine` (``Engine(cfg, **engine.components)``)."""
        return {"regressor": self._regressor, "landmarker": self._landmarker}

    def close_threads(self) -> None:
        """Stop this engine's threads but keep its models (to hand them on with :attr:`components`)."""
        for pool in (self._executor, self._lm_thread):
            if pool is not None:
                pool.shutdown(wait=True)
        self._executor = self._lm_thread = None

    def close(self) -> None:
        """Release models and threads."""
        self.close_threads()
        if self._landmarker is not None and hasattr(self._landmarker, "close"):
            self._landmarker.close()
        self._landmarker = None
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
            progress: called with a :class:`Progress` after every batch, and at least once a
                second while a batch is in progress.
            should_stop: polled before every batch; returning True raises
                :class:`~engine.errors.Cancelled` (partial state is kept in ``state_dir``).
            state_dir: folder for resumable partial results (see :class:`_ResumeState`).

        Returns:
            a :class:`RunReport`; ``skipped`` is True when every output already existed.

        Raises:
            InputError / DecodeError: unreadable input. NoFaceError: no usable face.
            CheckpointError / WeightsMissingError: model files. OutputError: cannot write.
            Cancelled: ``should_stop`` returned True.
        """

        t_start = time.perf_counter()
        cfg = self.config
        item = source if isinstance(source, InputItem) else None
        source = item.path if item else Path(source)

        # 1. Check inputs before any model work.
        if not source.exists():
            raise InputError(f"{source}: no such file")
        self.limits.check_file(source)
        info = probe(source)
        self.limits.check_media(source.name, info)
        paths = output_paths(out_base, cfg.formats, info.kind)
        wants_overlay = OutputFormat.OVERLAY in cfg.formats
        if wants_overlay:
            self._check_face_model()
        if not cfg.overwrite and all(p.is_file() for p in paths.values()):
            log.info("%s: outputs exist, skipping (use overwrite to redo)", source)
            return RunReport(input=source, outputs=paths, info=info, skipped=True, config=cfg.to_dict())

        # 2. Load (or reuse) the models.
        regressor = self.regressor
        landmarker = self.landmarker_for(item or source)

        # 3. Restore partial results of an interrupted run.
        acc = _Accumulator()
        resume = _ResumeState(Path(state_dir), self._fingerprint(source)) if state_dir else None
        last_lm = resume.load(acc) if resume else None
        resumed_from = acc.frames

        # 4. Stream batches: landmarks → no-face policy → align → regress.
        frames_new, t_loop = self._stream(source, info, acc, resume, last_lm, landmarker, regressor,
                                          progress, should_stop)

        # 5. Judge the result.
        if acc.frames == 0:
            raise DecodeError(f"{source.name}: no frames could be decoded")
        if hasattr(landmarker, "check_frame_count"):  # precomputed landmarks must cover every frame
            landmarker.check_frame_count(acc.frames)
        result = self._result(info, acc)
        num_valid = int(result.valid.sum())
        if num_valid == 0:
            raise NoFaceError(f"{source.name}: no face found in any of its {acc.frames} frames")
        if num_valid / acc.frames < cfg.min_valid_ratio:
            raise NoFaceError(
                f"{source.name}: a face was found in only {num_valid}/{acc.frames} frames "
                f"(< min_valid_ratio {cfg.min_valid_ratio:.0%})"
            )

        # 6. Optional extras from the face model (never needed for coefficients).
        self._add_face_model_extras(result)

        # 7. Write every format atomically, then drop the partial state.
        if progress is not None:
            progress(Progress(acc.frames, acc.frames, 0.0, stage="write"))
        written = write_outputs(result, out_base, cfg.formats)
        if wants_overlay:
            written[OutputFormat.OVERLAY.value] = self._write_overlay(source, result, paths, progress, should_stop)
        if resume is not None:
            resume.clear()

        seconds = time.perf_counter() - t_start
        reasons = Counter(r for r in result.reason if r)
        return RunReport(
            input=source,
            outputs=written,
            info=info,
            num_frames=acc.frames,
            num_valid=num_valid,
            reasons=dict(reasons),
            longest_invalid_run=longest_run(~result.valid),
            seconds=seconds,
            fps=frames_new / max(time.perf_counter() - t_loop, 1e-9),
            resumed_from=resumed_from,
            checkpoint_sha256=getattr(regressor, "checkpoint_sha256", ""),
            config=cfg.to_dict(),
        )

    # ------------------------------------------------------------------ helpers

    def _stream(self, source: Path, info: MediaInfo, acc: _Accumulator, resume: _ResumeState | None, last_lm,
                landmarker, regressor, progress, should_stop) -> tuple[int, float]:
        """Step 4 of :meth:`run`: decode → landmarks → align → regress, appending to ``acc``.

        The landmarks of batch k+1 run in the landmark thread while batch k is aligned and
        regressed here; decoding runs ahead in its own thread. Returns (frames processed in
        this call, start time of the loop).
        """
        executor = self._thread_pool()
        lm_thread = self._landmark_thread()
        t0 = time.perf_counter()
        done = 0
        inflight: list[tuple[FrameBatch, Future]] = []  # the batch being finished, then the next one

        def report() -> None:
            if progress is not None:
                fps = done / max(time.perf_counter() - t0, 1e-9)
                progress(Progress(acc.frames, max(info.frame_count, acc.frames), fps))

        def finish_oldest() -> None:
            nonlocal last_lm, done
            batch, landmarks = inflight[0]
            while True:  # a slow batch (CPU) still reports at least once a second
                try:
                    lms = landmarks.result(timeout=PROGRESS_INTERVAL_S)
                    break
                except FutureTimeoutError:
                    report()
            inflight.pop(0)
            chunk, last_lm = self._finish_batch(batch, lms, regressor, executor, last_lm)
            acc.add(chunk)
            if resume is not None:
                resume.save(acc, last_lm)
            done += len(batch)
            report()

        batches = prefetch(iter_frames(source, self.config.batch_size, start=acc.frames), depth=2)
        try:
            with contextlib.closing(batches), regressor.numerics():
                for batch in batches:
                    if should_stop is not None and should_stop():
                        while inflight:  # finish the batch in flight, so a resume starts after it
                            finish_oldest()
                        raise Cancelled(f"{source.name}: cancelled at frame {acc.frames}")
                    inflight.append((batch, lm_thread.submit(self._landmarks, batch, landmarker, should_stop)))
                    if len(inflight) > 1:
                        finish_oldest()
                while inflight:
                    finish_oldest()
        finally:
            wait([f for _, f in inflight])  # after an error: leave the landmark thread idle
        return done, t0

    def _landmarks(self, batch: FrameBatch, landmarker, should_stop) -> Landmarks:
        """Run the landmark backend, in slices on the CPU so a cancel is seen within ~a second."""
        step = len(batch) if self.device.startswith("cuda") else CPU_LANDMARK_SLICE
        if step >= len(batch):
            return landmarker(batch)
        parts = []
        for a in range(0, len(batch), step):
            if a and should_stop is not None and should_stop():
                raise Cancelled(f"cancelled at frame {int(batch.index[a])}")
            sl = slice(a, a + step)
            parts.append(landmarker(FrameBatch(batch.images[sl], batch.index[sl], batch.timestamps[sl])))
        return Landmarks(
            points_img_ydown=np.concatenate([p.points_img_ydown for p in parts]),
            valid=np.concatenate([p.valid for p in parts]),
            reason=tuple(r for p in parts for r in p.reason),
        )

    def _finish_batch(self, batch: FrameBatch, lms: Landmarks, regressor, executor, last_lm):
        """No-face policy → align → regress for one batch with its landmarks; returns (chunk, last_lm)."""
        valid, reason = lms.valid.astype(bool), np.asarray(lms.reason, dtype=object)
        lm_used, use_fallback, last_lm = self._apply_no_face_policy(lms, last_lm)
        aligned = _align(batch, lm_used, use_fallback, valid, reason, executor)
        coeff = regressor.predict(aligned.crops)
        chunk = {
            "coeff": coeff.astype(np.float32),
            "trans_params": aligned.trans_params.astype(np.float32),
            "landmarks": np.where(use_fallback[:, None, None], np.float32(-1), lm_used).astype(np.float32),
            "valid": valid,
            "reason": reason.astype(str).reshape(-1),
            "timestamps": batch.timestamps.astype(np.float64),
        }
        return chunk, last_lm

    def _landmark_thread(self) -> ThreadPoolExecutor:
        """One thread that runs the landmark backend (always the same thread, one call at a time)."""
        if self._lm_thread is None:
            self._lm_thread = ThreadPoolExecutor(1, thread_name_prefix="landmarks")
        return self._lm_thread

    def _thread_pool(self) -> ThreadPoolExecutor | None:
        if self.config.num_threads <= 1:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.config.num_threads, thread_name_prefix="align")
        return self._executor

    def _fingerprint(self, source: Path) -> str:
        """Identity of (input file, settings that change results) for resuming."""
        st = source.stat()
        cfg = self.config
        key = {
            "input": str(source.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "checkpoint": _file_identity(self.regressor.checkpoint_path),
            "landmarks": cfg.landmarks.value,
            "keypoints": _file_identity(cfg.keypoints) if cfg.keypoints else None,
            "no_face": cfg.no_face.value,
            "engine": __version__,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _apply_no_face_policy(
        self, lms: Landmarks, last_lm: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Choose the landmarks each frame is aligned with.

        Returns:
            lm_used_img_ydown: float32 (B, K, 2); rows of fallback frames are unused.
            use_fallback: bool (B,) align this frame with the centred 5-point template.
            last_lm: float32 (K, 2) the last landmarks used, carried to the next batch.
        """
        pts = lms.points_img_ydown.astype(np.float32, copy=True)
        use_fallback = np.zeros(len(lms.valid), dtype=bool)
        # PIRender's detector script (extract_kp_videos.py) reuses the previous frame's landmarks;
        # its reconstruction script gives any -1 row of a keypoint file the template.
        carry = self.config.no_face == NoFacePolicy.REFERENCE and self.config.landmarks != LandmarkBackend.FILE
        for i, ok in enumerate(lms.valid):
            if ok:
                last_lm = pts[i].copy()
            elif carry and last_lm is not None:
                pts[i] = last_lm
            else:
                use_fallback[i] = True
                pts[i] = 0.0
        return pts, use_fallback, last_lm

    def _check_face_model(self) -> None:
        """The overlay format needs the face model: fail before any work if it is not set up."""
        from engine.face3d import face_model_available
        from engine.weights import bfm_dir

        if not face_model_available(bfm_dir()):
            raise WeightsMissingError(
                f"the overlay format needs the face model {bfm_dir() / 'BFM_model_front.mat'}; "
                f"set it up with 'python -m engine bfm convert --from {bfm_dir()}' (see 'python -m engine doctor')"
            )

    def _write_overlay(self, source: Path, result: VideoResult, paths: dict[str, Path], progress, should_stop) -> Path:
        """Render the review video (or image) of ``source``; written atomically by the face3d package."""
        from engine.face3d.overlay import ResultArrays, write_overlay_video

        out = paths[OutputFormat.OVERLAY.value]
        arrays = ResultArrays(result.coeff, result.trans_params, result.valid, result.landmarks_img_ydown)
        n = result.num_frames

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(Progress(done, max(total, n), 0.0, stage="overlay"))

        write_overlay_video(source, arrays, out, face_model=self.face_model(), device=self.device,
                            progress=report, should_stop=should_stop)
        return out

    @staticmethod
    def _result(info: MediaInfo, acc: _Accumulator) -> VideoResult:
        return VideoResult(
            info=info,
            coeff=acc.concat("coeff"),
            trans_params=acc.concat("trans_params"),
            landmarks_img_ydown=acc.concat("landmarks"),
            valid=acc.concat("valid"),
            reason=[str(r) for r in acc.concat("reason")],
            timestamps=acc.concat("timestamps"),
        )

    def face_model(self):
        """The face model of ``BFM/`` on this engine's device, loaded once (visuals only)."""
        from engine.face3d.model import ParametricFaceModel
        from engine.weights import bfm_dir

        path = bfm_dir() / "BFM_model_front.mat"
        key = (str(path), path.stat().st_mtime_ns)
        if self._face_model is None or self._face_model[0] != key:
            self._face_model = (key, ParametricFaceModel.from_dir(path.parent, self.device))
        return self._face_model[1]

    def _add_face_model_extras(self, result: VideoResult) -> None:
        """Add reprojected 68 landmarks when ``BFM/BFM_model_front.mat`` is set up.

        Optional: any failure here is logged and the coefficients are written without them.
        """
        from engine.weights import bfm_dir

        if not (bfm_dir() / "BFM_model_front.mat").is_file():
            return
        try:
            from engine.face3d import lm68_extras

            result.extras.update(lm68_extras(result.coeff, result.trans_params, self.face_model()))
        except Exception as e:  # an optional extra must not fail the input
            log.warning("face model present but unusable, lm68 not added: %s: %s", type(e).__name__, e)

def _file_identity(path: Path) -> list:
    """(resolved path, size, mtime) of a file, for fingerprints; a folder gives only its path."""
    path = Path(path).resolve()
    if not path.is_file():
        return [str(path)]
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _align(batch: FrameBatch, lm_img_ydown: np.ndarray, use_fallback: np.ndarray, valid: np.ndarray,
           reason: np.ndarray, executor):
    """Align a batch; a frame whose landmarks admit no fit (degenerate, non-finite) is
    re-aligned with the template fallback and flagged ``bad_landmarks`` (arrays updated in place)."""
    from engine.align import AlignmentError, align_batch, align_image

    try:
        return align_batch(batch.images, lm_img_ydown, use_fallback, executor=executor)
    except AlignmentError:
        for i in np.flatnonzero(~use_fallback):
            try:
                align_image(batch.images[i], lm_img_ydown[i])
            except AlignmentError as e:
                log.info("frame %d: %s; using the template fallback", batch.index[i], e)
                use_fallback[i], valid[i], reason[i] = True, False, "bad_landmarks"
        return align_batch(batch.images, lm_img_ydown, use_fallback, executor=executor)


def extract(source: str | Path, out_base: str | Path, config: EngineConfig | None = None, **kwargs) -> RunReport:
    """One-shot helper: ``Engine(config).run(source, out_base, **kwargs)`` and close."""
    with Engine(config) as engine:
        return engine.run(source, out_base, **kwargs)

