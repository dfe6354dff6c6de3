"""Per-frame quality flags, per-video metrics and optional smoothing (pure functions).

One registry, :data:`FLAGS`, names every flag a frame can carry, with the bit it takes in the
``flags`` bitmask (uint32 per frame) and a plain-language description. Everything that shows
flags reads it: the npz (``flags`` + ``flag_names``), the CSV (``flags`` column), the run
report, the registry's quality summary, the bundle manifest and the dashboard.

Flags never change ``valid`` / ``reason`` (those stay as the reference computes them); they
add what a researcher needs to know about a frame. Angles are ``coeff[:, 224:227]`` radians,
x = pitch, y = yaw, z = roll (``docs/conventions.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import layout
from engine.conventions import wrap_deg

CROP_SIZE = 224

#: MTCNN probability (the Deep3D recipe keeps faces above 0.7 at its last stage) under which a
#: face's landmarks are flagged ``low_confidence``.
MTCNN_MIN_PROBABILITY = 0.95
#: S3FD score (faces are kept above 0.5) under which a FAN face is flagged ``low_confidence``.
S3FD_MIN_SCORE = 0.9
#: Detector name → the score under which its kept face is flagged ``low_confidence`` (a detector
#: not listed never flags it), for landmarkers that report no confidence of their own.
MIN_SCORE = {"mtcnn": MTCNN_MIN_PROBABILITY, "s3fd": S3FD_MIN_SCORE}
#: FAN: mean heat-map peak of the 68 points (0…1; a confident point peaks near 1) under which the
#: landmarks are flagged ``low_confidence``. Provisional: set from how 2D-FAN-4's heat maps are
#: trained (Gaussian targets of peak 1), not yet calibrated on the released weights.
FAN_MIN_HEATMAP_PEAK = 0.3
#: Extreme pose: |yaw| above this many degrees ...
EXTREME_YAW_DEG = 60.0
#: ... or |pitch| above this many degrees.
EXTREME_PITCH_DEG = 45.0
#: An abrupt jump is a frame-to-frame change more than this many robust standard deviations
#: (1.4826 × median absolute deviation) away from the video's median change ...
JUMP_MADS = 8.0
#: ... and above these absolute floors: degrees (any angle), Deep3D translation units (any axis),
#: crop widths (crop position), and |Δ log crop scale|.
JUMP_FLOOR_DEG = 10.0
JUMP_FLOOR_TRANS = 0.1
JUMP_FLOOR_CROP_POS = 0.1
JUMP_FLOOR_LOG_SCALE = 0.1


@dataclass(frozen=True)
class FlagSpec:
    """One per-frame flag.

    Attributes:
        bit: its bit in the ``flags`` bitmask (``flags & (1 << bit)``).
        label: a short name for people.
        description: what it means, in plain language.
    """

    bit: int
    label: str
    description: str


#: Flag name → what it is. The order is the order shown to users; bits never change meaning.
FLAGS: dict[str, FlagSpec] = {
    "no_face": FlagSpec(0, "No face", "no face was found in the frame (its coefficients are a filler)"),
    "several_faces": FlagSpec(
        1, "Several faces", "the detector found more than one face; `kept_rank` says which one was kept"),
    "other_face_kept": FlagSpec(
        2, "Other face kept",
        "several faces and the kept one is not the reference's choice (the most confident face): "
        "the continuity tracker followed the previous frame's person"),
    "low_confidence": FlagSpec(
        3, "Low confidence",
        f"the landmarks' confidence is low (FAN: mean heat-map peak < {FAN_MIN_HEATMAP_PEAK}; "
        f"MTCNN: probability < {MTCNN_MIN_PROBABILITY})"),
    "crop_outside": FlagSpec(
        4, "Crop outside frame", "the 224×224 crop reaches past the frame's edge (padded with black)"),
    "extreme_pose": FlagSpec(
        5, "Extreme pose", f"|yaw| > {EXTREME_YAW_DEG:g}° or |pitch| > {EXTREME_PITCH_DEG:g}°"),
    "abrupt_jump": FlagSpec(
        6, "Abrupt jump",
        f"the change in angles, translation or crop from the previous frame with a face is over "
        f"{JUMP_MADS:g} robust deviations above the video's typical change (and above an absolute floor): "
        "a cut, another person, or a detection error"),
    "filled": FlagSpec(
        7, "Filled", "no face: the frame was aligned with landmarks borrowed from an earlier frame"),
}


def flag_names() -> list[str]:
    """Flag names in bit order (index = bit)."""
    return [name for name, _ in sorted(FLAGS.items(), key=lambda kv: kv[1].bit)]


def bit(name: str) -> int:
    """The mask of flag ``name``: ``1 << FLAGS[name].bit``."""
    return 1 << FLAGS[name].bit


def has_flag(flags: np.ndarray, name: str) -> np.ndarray:
    """bool (N,): frames of ``flags`` (uint (N,)) that carry ``name``."""
    return (np.asarray(flags).astype(np.uint32) & np.uint32(bit(name))) != 0


def flag_counts(flags: np.ndarray) -> dict[str, int]:
    """Frames carrying each flag (every flag listed, 0 included).

    >>> flag_counts(np.array([1, 3, 0], np.uint32))["several_faces"]
    1
    """
    return {name: int(has_flag(flags, name).sum()) for name in FLAGS}


def flags_text(value: int) -> str:
    """``"no_face|filled"``: the names set in one frame's bitmask, ``""`` for none."""
    return "|".join(name for name in flag_names() if int(value) & bit(name))


# ----------------------------------------------------------------------------- per frame


def low_confidence(score: np.ndarray, detector: str, landmark_confidence: np.ndarray | None = None) -> np.ndarray:
    """bool (B,): the landmarks are not to be trusted. With ``landmark_confidence`` (the
    landmarker's own, FAN's mean heat-map peak) it is under :data:`FAN_MIN_HEATMAP_PEAK`;
    otherwise the kept face's detector ``score`` is under :data:`MIN_SCORE` of ``detector``.
    NaN (no face) is never flagged here.

    >>> low_confidence(np.array([0.99, 0.8, np.nan]), "mtcnn").tolist()
    [False, True, False]
    >>> low_confidence(np.array([0.99, 0.99]), "s3fd", np.array([0.8, 0.1])).tolist()
    [False, True]
    """
    if landmark_confidence is not None:
        conf = np.asarray(landmark_confidence, dtype=np.float64)
        return np.isfinite(conf) & (conf < FAN_MIN_HEATMAP_PEAK)
    score = np.asarray(score, dtype=np.float64)
    threshold = MIN_SCORE.get(detector)
    if threshold is None:
        return np.zeros(score.shape, dtype=bool)
    return np.isfinite(score) & (score < threshold)


def crop_outside(crop_box: np.ndarray) -> np.ndarray:
    """bool (N,): the 224×224 crop at ``crop_box`` int (N, 4) ``[left, up, w, h]`` (in the frame
    resized to ``w × h``) is not wholly inside that frame.

    >>> crop_outside(np.array([[0, 0, 300, 300], [-3, 0, 300, 300], [100, 0, 300, 300]])).tolist()
    [False, True, True]
    """
    b = np.asarray(crop_box, dtype=np.int64).reshape(-1, 4)
    left, up, w, h = b.T
    return (left < 0) | (up < 0) | (left + CROP_SIZE > w) | (up + CROP_SIZE > h)


def angles_deg(coeff: np.ndarray) -> np.ndarray:
    """float64 (N, 3) ``pitch, yaw, roll`` in degrees from ``coeff`` (N, 257) (x, y, z radians)."""
    return np.degrees(np.asarray(coeff, dtype=np.float64)[:, layout.ANGLE])


def extreme_pose(coeff: np.ndarray) -> np.ndarray:
    """bool (N,): |yaw| > :data:`EXTREME_YAW_DEG` or |pitch| > :data:`EXTREME_PITCH_DEG`, with the
    angles wrapped to −180…180 first (the network's radians have no range: 2π + 0.1 is a frontal face).

    >>> c = np.zeros((2, 257)); c[0, 225] = 2 * np.pi + 0.1; c[1, 225] = np.radians(70)
    >>> extreme_pose(c).tolist()
    [False, True]
    """
    a = wrap_deg(angles_deg(coeff))
    return (np.abs(a[:, 1]) > EXTREME_YAW_DEG) | (np.abs(a[:, 0]) > EXTREME_PITCH_DEG)


def frame_flags(*, face_found: np.ndarray, faces_found: np.ndarray, kept_rank: np.ndarray,
                low_confidence: np.ndarray, crop_box: np.ndarray, coeff: np.ndarray,
                filled: np.ndarray) -> np.ndarray:
    """uint32 (B,) bitmask of the flags one batch shows on its own (all but ``abrupt_jump``).

    Args:
        face_found: bool (B,) the landmarker found a face.
        faces_found: int (B,) faces the detector reported (-1: unknown, no detector).
        kept_rank: int (B,) rank of the kept face in the reference's order (0: its choice, -1: none).
        low_confidence: bool (B,) the kept face's score is under its detector's threshold.
        crop_box: int (B, 4) ``[left, up, w, h]``. coeff: float (B, 257). filled: bool (B,).
    """
    out = np.zeros(len(face_found), dtype=np.uint32)
    for name, mask in (
        ("no_face", ~np.asarray(face_found, dtype=bool)),
        ("several_faces", np.asarray(faces_found) > 1),
        ("other_face_kept", np.asarray(kept_rank) > 0),
        ("low_confidence", np.asarray(low_confidence, dtype=bool)),
        ("crop_outside", crop_outside(crop_box)),
        ("extreme_pose", extreme_pose(coeff) & np.asarray(face_found, dtype=bool)),
        ("filled", np.asarray(filled, dtype=bool)),
    ):
        out |= np.where(mask, np.uint32(bit(name)), np.uint32(0))
    return out


# ----------------------------------------------------------------------------- per video


def motion_signals(coeff: np.ndarray, trans_params: np.ndarray, crop_box: np.ndarray | None) -> dict[str, np.ndarray]:
    """The per-frame trajectories jumps and jitter are measured on, each float64 (N, k).

    ``angles_deg`` (pitch, yaw, roll °), ``trans`` (Deep3D x, y, z), ``crop_pos`` (crop corner in
    crop widths, from ``crop_box``; absent when None), ``log_scale`` (log of ``trans_params`` s),
    ``exp10`` (the first 10 expression coefficients).
    """
    c = np.asarray(coeff, dtype=np.float64)
    out = {"angles_deg": angles_deg(c), "trans": c[:, layout.TRANS]}
    if crop_box is not None:
        out["crop_pos"] = np.asarray(crop_box, dtype=np.float64)[:, :2] / CROP_SIZE
    s = np.asarray(trans_params, dtype=np.float64)[:, 2:3]
    out["log_scale"] = np.log(np.where(s > 0, s, np.nan))
    out["exp10"] = c[:, layout.EXP][:, :10]
    return out


_JUMP_FLOORS = {"angles_deg": JUMP_FLOOR_DEG, "trans": JUMP_FLOOR_TRANS, "crop_pos": JUMP_FLOOR_CROP_POS,
                "log_scale": JUMP_FLOOR_LOG_SCALE}


def robust_outliers(d: np.ndarray, k: float, floor: float) -> np.ndarray:
    """bool (M,) rows of changes ``d`` (M, c) where any column is more than ``k`` robust standard
    deviations (1.4826 · MAD) from that column's median and also larger than ``floor`` in size.

    >>> d = np.array([[0.1], [-0.1], [0.12], [5.0], [0.0]])
    >>> robust_outliers(d, 8, 1.0).tolist()
    [False, False, False, True, False]
    """
    d = np.asarray(d, dtype=np.float64).reshape(len(d), -1)
    if len(d) == 0:
        return np.zeros(0, dtype=bool)
    med = np.nanmedian(d, axis=0)
    sigma = 1.4826 * np.nanmedian(np.abs(d - med), axis=0)
    dev = np.abs(d - med)
    out = (dev > k * sigma) & (np.abs(d) > floor)
    return np.any(np.nan_to_num(out, nan=False).astype(bool), axis=1)


def abrupt_jumps(coeff: np.ndarray, trans_params: np.ndarray, crop_box: np.ndarray | None,
                 valid: np.ndarray, k: float = JUMP_MADS) -> np.ndarray:
    """bool (N,): frames whose change from the previous *valid* frame is an outlier in angles,
    translation, crop position or crop scale (:func:`robust_outliers` with the floors above).

    Frames without a face are skipped (never flagged, never compared against), so a face that
    comes back where it was after a gap is no jump.
    """
    valid = np.asarray(valid, dtype=bool)
    idx = np.flatnonzero(valid)
    out = np.zeros(len(valid), dtype=bool)
    if len(idx) < 3:
        return out
    signals = motion_signals(coeff, trans_params, crop_box)
    jump = np.zeros(len(idx) - 1, dtype=bool)
    for name, floor in _JUMP_FLOORS.items():
        if name in signals:
            jump |= robust_outliers(np.diff(signals[name][idx], axis=0), k, floor)
    out[idx[1:][jump]] = True
    return out


def second_differences(x: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """float64 (M, k): ``x[t+1] - 2 x[t] + x[t-1]`` of ``x`` (N, k) for every t whose three frames
    are all ``ok`` (bool (N,)).

    >>> second_differences(np.array([[0.], [1.], [4.], [9.]]), np.ones(4, bool)).ravel().tolist()
    [2.0, 2.0]
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    ok = np.asarray(ok, dtype=bool)
    if len(x) < 3:
        return np.zeros((0, x.shape[1]))
    d2 = x[2:] - 2 * x[1:-1] + x[:-2]
    keep = ok[2:] & ok[1:-1] & ok[:-2]
    return d2[keep]


def jitter(coeff: np.ndarray, trans_params: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Jitter of a video: the median absolute second difference over time (per frame²).

    Over runs of three consecutive frames with a face. Keys and units: ``pitch_deg``,
    ``yaw_deg``, ``roll_deg`` (degrees), ``trans`` (Deep3D translation units, x, y, z pooled),
    ``crop_scale`` (relative: of log ``s``), ``exp10`` (the first 10 expression coefficients
    pooled). NaN when no three consecutive frames have a face.
    """
    sig = motion_signals(coeff, trans_params, None)
    groups = {"pitch_deg": sig["angles_deg"][:, 0], "yaw_deg": sig["angles_deg"][:, 1],
              "roll_deg": sig["angles_deg"][:, 2], "trans": sig["trans"], "crop_scale": sig["log_scale"],
              "exp10": sig["exp10"]}
    out = {}
    for name, x in groups.items():
        d2 = second_differences(x, valid)
        out[name] = float(np.nanmedian(np.abs(d2))) if d2.size else float("nan")
    return out


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


def video_metrics(valid: np.ndarray, flags: np.ndarray, coeff: np.ndarray, trans_params: np.ndarray,
                  coeff_raw: np.ndarray | None = None) -> dict:
    """The per-video quality summary (JSON-ready).

    Keys: ``frames``; ``valid_ratio`` (0-1); ``longest_invalid_run`` (frames); ``flags``
    (name → frame count, :func:`flag_counts`); ``jitter`` (:func:`jitter` of ``coeff``);
    ``jitter_raw`` (of ``coeff_raw``, only when smoothing made ``coeff`` from it).
    """
    valid = np.asarray(valid, dtype=bool)
    n = len(valid)
    out = {
        "frames": n,
        "valid_ratio": float(valid.mean()) if n else 0.0,
        "longest_invalid_run": longest_run(~valid),
        "flags": flag_counts(flags),
        "jitter": _json_floats(jitter(coeff, trans_params, valid)),
    }
    if coeff_raw is not None:
        out["jitter_raw"] = _json_floats(jitter(coeff_raw, trans_params, valid))
    return out


def _json_floats(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if not np.isfinite(v) else round(float(v), 6)) for k, v in d.items()}


# ----------------------------------------------------------------------------- smoothing


@dataclass(frozen=True)
class Smoothing:
    """Savitzky–Golay smoothing of the coefficients over time, centred (no lag).

    Attributes:
        window: frames in the centred window (odd, >= 3); the filter looks ``window // 2``
            frames ahead and behind. A segment shorter than the window gets the longest odd
            window that fits (>= ``polyorder + 2``), or stays raw.
        polyorder: degree of the local polynomial (2 follows constant accelerations exactly).
    """

    window: int = 7
    polyorder: int = 2

    def __post_init__(self) -> None:
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f"smoothing window must be an odd number >= 3, got {self.window}")
        if not 0 <= self.polyorder < self.window - 1:
            raise ValueError(f"smoothing polyorder must be in [0, window - 2], got {self.polyorder}")


def segments(keep: np.ndarray, breaks: np.ndarray) -> list[slice]:
    """Runs of consecutive ``keep`` frames, cut before every ``breaks`` frame.

    >>> [(s.start, s.stop) for s in segments(np.array([1, 1, 0, 1, 1, 1], bool), np.array([0, 0, 0, 0, 1, 0], bool))]
    [(0, 2), (3, 4), (4, 6)]
    """
    out, start = [], None
    for i, (k, b) in enumerate(zip(np.asarray(keep, bool), np.asarray(breaks, bool), strict=True)):
        if start is not None and (not k or b):
            out.append(slice(start, i))
            start = None
        if k and start is None:
            start = i
    if start is not None:
        out.append(slice(start, len(keep)))
    return out


def smooth_coefficients(coeff: np.ndarray, valid: np.ndarray, breaks: np.ndarray,
                        settings: Smoothing = Smoothing()) -> np.ndarray:
    """float32 (N, 257): ``coeff`` smoothed over time within each run of valid frames.

    Runs are cut at ``breaks`` (the ``abrupt_jump`` frames: a cut is not blurred). Frames
    without a face keep their raw (filler) values and stay marked invalid.
    """
    from scipy.signal import savgol_filter

    raw = np.asarray(coeff, dtype=np.float64)
    out = raw.copy()
    for seg in segments(valid, breaks):
        n = seg.stop - seg.start
        w = min(settings.window, n if n % 2 else n - 1)
        if w < settings.polyorder + 2 or w < 3:
            continue
        out[seg] = savgol_filter(raw[seg], w, settings.polyorder, axis=0, mode="interp")
    return out.astype(np.float32)


def lag_frames(raw: np.ndarray, smoothed: np.ndarray, max_lag: float = 5.0, step: float = 0.01) -> float:
    """Delay of ``smoothed`` behind ``raw`` (1-D, same length) in frames, to ``step``: the shift
    ``d`` that best aligns them, i.e. maximises the cross-correlation of ``smoothed(t)`` with
    ``raw(t - d)`` (means removed; ``raw`` shifted by linear interpolation, compared over the
    frames both cover for every shift tried) — equivalently, minimises their squared difference.

    Positive: ``smoothed`` lags. ``max_lag`` bounds the search (frames).

    >>> t = np.arange(60.0)
    >>> round(lag_frames(np.sin(t / 6), np.sin((t - 2) / 6)), 2), round(lag_frames(t ** 2, (t + 0.5) ** 2), 2)
    (2.0, -0.5)
    """
    a = np.asarray(raw, dtype=np.float64)
    b = np.asarray(smoothed, dtype=np.float64)
    t = np.arange(len(a), dtype=np.float64)
    m = int(np.ceil(max_lag))
    inner = t[m:len(t) - m]
    shifts = np.arange(-max_lag, max_lag + step / 2, step)
    err = [np.mean((b[m:len(t) - m] - np.interp(inner - d, t, a)) ** 2) for d in shifts]
    return float(shifts[int(np.argmin(err))])
