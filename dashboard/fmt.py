"""Small formatters shared by the pages: durations, sizes, ages, job states and error hints."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timezone

#: Job status → Material icon and colour for Markdown labels (``:green[:material/check_circle:]``).
STATUS_ICONS = {
    "queued": ("schedule", "gray"),
    "running": ("play_circle", "blue"),
    "succeeded": ("check_circle", "green"),
    "failed": ("error", "red"),
    "cancelled": ("cancel", "orange"),
}
#: Job status → text colour in tables.
STATUS_COLOURS = {
    "queued": "#6b7280",
    "running": "#1d4ed8",
    "succeeded": "#15803d",
    "failed": "#b91c1c",
    "cancelled": "#b45309",
}

#: ``EngineConfig.decoder`` values as the job settings show them.
DECODER_LABELS = {"pyav": "FFmpeg (CPU)", "nvdec": "NVDEC (GPU)"}

#: Error code (``engine.StudioError.code``) → what it means for the researcher and what to do.
ERROR_HINTS = {
    "input": "The input file is missing, empty or not a supported video/image (mp4, mov, mkv, avi, webm, jpg, png).",
    "decode": "The file could not be decoded: it is probably truncated or corrupt. Re-export or re-download "
    "it and submit it again.",
    "no_face": "No usable face was found. Check that the video shows one frontal face that is large enough, "
    "or try the other landmark backend.",
    "checkpoint": "The reconstruction checkpoint could not be loaded. Install a valid one on the Models / setup page.",
    "weights_missing": "A model file is missing. Install it on the Models / setup page.",
    "weights": "A model file is not what it should be. Replace it on the Models / setup page.",
    "output": "The results could not be written (disk full or no permission). Free some space under data/.",
    "disk_full": "The disk under the data folder is full. The worker paused and requeued the job; it goes on "
    "by itself once space is freed.",
    "read_only": "A folder under the data folder is read-only. The worker paused and requeued the job; it goes "
    "on by itself once the folder is writable again.",
    "too_large": "The file is over a size limit (bytes, pixels per frame or duration; see docs/RELIABILITY.md). "
    "Scale it down or cut it into parts.",
    "too_small": "The frames are too small to find a face in. Use a larger video.",
    "cancelled": "The job was cancelled.",
    "nvdec": "The job asks for NVDEC decoding, which its worker cannot do: it needs an NVIDIA GPU and "
    "`pip install pynvvideocodec` (Models / setup lists it). Retry with the FFmpeg decoder, or install it.",
    "shape": "An internal array had an unexpected shape: this is a bug, please report it with the video.",
}


#: (words in the message, hint): the message says more than its code, so these are looked at first.
MESSAGE_HINTS = (
    ("has no video stream", "The file holds no picture (audio only, or subtitles/data): submit the video "
     "file itself, not its sound track."),
    ("not a regular file", "The path is not an ordinary file (a folder, named pipe or device): submit the "
     "video or image file itself."),
    ("refuses to load", "The weight file was refused because loading it would run code: install the released "
     "file (or a plain state dict saved with torch.save(model.state_dict())) on the Models / setup page."),
)


def fmt_duration(seconds: float | None) -> str:
    """``"1 h 02 min"``, ``"3 min 05 s"``, ``"12 s"``; ``"–"`` for None/negative.

    >>> fmt_duration(3725), fmt_duration(185), fmt_duration(9.4)
    ('1 h 02 min', '3 min 05 s', '9 s')
    """
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def fmt_bytes(n: float | None) -> str:
    """Human-readable size in powers of 1024.

    >>> fmt_bytes(0), fmt_bytes(1536), fmt_bytes(3 * 2**30)
    ('0 B', '1.5 KiB', '3.0 GiB')
    """
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_age(when: datetime | None, now: datetime | None = None) -> str:
    """``"12 s ago"``, ``"3 min ago"``, ``"2 h ago"``, ``"4 days ago"``; ``"never"`` for None."""
    if when is None:
        return "never"
    now = now or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    s = max(0.0, (now - when).total_seconds())
    if s < 60:
        return f"{int(s)} s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    if s < 86400:
        return f"{int(s // 3600)} h ago"
    return f"{int(s // 86400)} days ago"


def status_label(status) -> str:
    """Status (enum or string) → its plain name (``"succeeded"``)."""
    return str(getattr(status, "value", status))


def status_markdown(status) -> str:
    """Status → Markdown with a coloured Material icon, e.g. ``:green[:material/check_circle: succeeded]``."""
    value = status_label(status)
    icon, colour = STATUS_ICONS.get(value, ("help", "gray"))
    return f":{colour}[:material/{icon}: {value}]"


def explain_error(error: str | None, code: str | None) -> str:
    """The error as stored on the job, followed by what it means in plain words (when known)."""
    if not error:
        return ""
    hint = next((h for words, h in MESSAGE_HINTS if words in error), None) or ERROR_HINTS.get(code or "")
    if hint is None and error.split(":", 1)[0].endswith(("Error", "Exception")):
        hint = "An unexpected error stopped the job: retry it; if it fails again, report it with the video."
    return f"{error} — {hint}" if hint else error


def rows_key(prefix: str, ids: Sequence[int]) -> str:
    """Widget key of a selectable table showing rows ``ids`` in this order.

    The key changes whenever the rows shown change, so a selection (row positions) always
    refers to the rows it was made on and never shifts onto other jobs.

    >>> rows_key("t", [1, 2]) == rows_key("t", [1, 2]) != rows_key("t", [2, 1])
    True
    """
    return f"{prefix}_{hashlib.sha1(','.join(map(str, ids)).encode()).hexdigest()[:12]}"


def md_escape(text: str) -> str:
    r"""Make outside text (paths, error messages) safe to show as Streamlit Markdown.

    ``$`` would start LaTeX and ``~`` strike text through; both are escaped.

    >>> md_escape("$TORCH_HOME defaults to ~/.cache")
    '\\$TORCH_HOME defaults to \\~/.cache'
    """
    return str(text).replace("\\", "\\\\").replace("$", "\\$").replace("~", "\\~")


def worker_device(worker_id: str, device: str) -> str:
    """The device a worker serves, with its slot when it is one of several workers of that device
    (its id ends in ``#<slot>``, see ``worker.loop.default_worker_id``).

    >>> worker_device("gpu1-4242-cuda0#1", "cuda:0"), worker_device("gpu1-4242-cuda0", "cuda:0")
    ('cuda:0 #1', 'cuda:0')
    """
    _, sep, slot = str(worker_id).rpartition("#")
    return f"{device} #{slot}" if sep and slot.isdigit() else device


def check_text(detail: str, fix: str) -> tuple[str, str]:
    """A doctor check's (what was found, what to do), without saying the same thing twice."""
    detail, fix = (detail or "").strip(), (fix or "").strip()
    if fix and (fix == detail or detail in fix):
        return fix, ""
    if fix and fix in detail:
        return detail, ""
    return detail, fix


def blocking_checks(checks) -> tuple[list, list]:
    """Split failed doctor checks into (blocking, optional) by their ``required`` flag.

    The doctor already counts one usable landmark backend as enough (its "a landmark
    detector" line), so a missing FAN alone is optional when MTCNN works.
    """
    blocking, optional = [], []
    for c in checks:
        if c.ok:
            continue
        (blocking if c.required else optional).append(c)
    return blocking, optional
