"""``python -m engine doctor``: what is installed, what is missing, and what to do about it.

:func:`run_checks` returns plain :class:`Check` records; the CLI prints them and the
dashboard's setup page shows them. Checks never raise: a failing probe becomes a
``Check(ok=False)`` whose ``fix`` says what to do.
"""

from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    """One line of the report.

    Attributes:
        group: ``"system"``, ``"weights"``, ``"landmarks"`` or ``"face model"``.
        name: what was checked.
        ok: True when usable.
        detail: what was found (versions, sizes, paths).
        fix: what to do when not ok ("" when ok).
        required: False for optional parts (GPU, BFM, renderer, extra backends).
    """

    group: str
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _system_checks() -> list[Check]:
    out = [Check("system", "Python", sys.version_info >= (3, 10), platform.python_version(),
                 "use Python 3.10 or newer")]
    try:
        import numpy as np

        out.append(Check("system", "NumPy", True, np.__version__))
    except ImportError as e:
        out.append(Check("system", "NumPy", False, str(e), "pip install -r requirements.txt"))
    try:
        import torch

        out.append(Check("system", "PyTorch", True, f"{torch.__version__} (CUDA build {torch.version.cuda})"))
        if torch.cuda.is_available():
            names = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                names.append(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
            out.append(Check("system", "GPU", True, "; ".join(names), required=False))
        else:
            out.append(Check("system", "GPU", False, "no CUDA device visible; extraction runs on the CPU (slow)",
                             "on a GPU machine install an NVIDIA driver and a CUDA build of torch "
                             "(pip install torch torchvision)", required=False))
    except ImportError as e:
        out.append(Check("system", "PyTorch", False, str(e), "pip install -r requirements.txt"))
    try:
        import av

        libs = getattr(av, "library_versions", {})
        ff = ".".join(str(x) for x in libs.get("libavcodec", ())) or "?"
        out.append(Check("system", "FFmpeg (PyAV)", True, f"PyAV {av.__version__}, libavcodec {ff}"))
    except ImportError as e:
        out.append(Check("system", "FFmpeg (PyAV)", False, str(e), "pip install av"))
    out.append(_nvdec_check())
    return out


def _nvdec_check() -> Check:
    """NVDEC through PyNvVideoCodec: optional (``--decoder nvdec``, the fast path's fastest decoder)."""
    from engine.stages.nvdec import NvdecUnavailable, import_pynvvideocodec

    try:
        nvc = import_pynvvideocodec()
    except NvdecUnavailable as e:
        return Check("system", "NVDEC (optional)", False, f"not installed: {str(e).split(' (')[-1].rstrip(')')}",
                     "for `--mode fast --decoder nvdec` on an NVIDIA GPU: pip install pynvvideocodec",
                     required=False)
    return Check("system", "NVDEC (optional)", True,
                 f"PyNvVideoCodec {getattr(nvc, '__version__', '?')}: `--mode fast --decoder nvdec` available",
                 required=False)


def _checkpoint_check(checkpoint: Path | None) -> Check:
    from engine.errors import StudioError
    from engine.weights import find_checkpoint

    try:
        path = find_checkpoint(checkpoint)
    except StudioError as e:
        return Check("weights", "reconstruction net", False, str(e).split(". ")[0],
                     str(e).split(". ", 1)[-1])
    size = path.stat().st_size / 1e6
    try:
        from engine.regressor import inspect_checkpoint

        info = inspect_checkpoint(path)
    except Exception as e:
        return Check("weights", "reconstruction net", False, f"{path} ({size:.1f} MB): {e}",
                     "replace it with a valid epoch_20.pth")
    if not info.ok:
        return Check("weights", "reconstruction net", False, f"{path} ({size:.1f} MB): {info.message}",
                     "replace it with a valid epoch_20.pth or SadTalker safetensors")
    return Check("weights", "reconstruction net", True, f"{path} ({size:.1f} MB, {info.layout})")


def _landmark_checks() -> list[Check]:
    try:
        from engine.landmarks import available_backends
    except ImportError as e:
        return [Check("landmarks", "backends", False, str(e), "pip install -r requirements.txt")]
    backends = available_backends()
    out = []
    for b in backends:
        what, _, todo = b.message.partition("; ")  # "what is wrong; what to do"
        out.append(Check("landmarks", b.name, b.available, b.message if b.available else what,
                         "" if b.available else (todo or what), required=False))
    usable = [b.name for b in backends if b.available and b.name != "file"]
    out.append(Check(
        "landmarks", "a landmark detector", bool(usable),
        f"usable: {', '.join(usable)}" if usable else "neither fan nor mtcnn can run",
        "install face_alignment's weights (see the fan line) or facenet-pytorch for mtcnn",
    ))
    return out


def _face_model_checks() -> list[Check]:
    try:
        face3d = importlib.import_module("engine.face3d")
    except ImportError:
        return []
    checks = getattr(face3d, "doctor_checks", None)
    if checks is None:
        return []
    try:
        return [Check("face model", **c) if isinstance(c, dict) else c for c in checks()]
    except Exception as e:
        return [Check("face model", "face model", False, f"{type(e).__name__}: {e}", required=False)]


def run_checks(checkpoint: Path | None = None) -> list[Check]:
    """Every check, in report order."""
    return [*_system_checks(), _checkpoint_check(checkpoint), *_landmark_checks(), *_face_model_checks()]


def format_report(checks: list[Check]) -> str:
    """Plain-text report, one line per check plus an indented fix where needed."""
    lines = []
    group = None
    for c in checks:
        if c.group != group:
            group = c.group
            lines.append(f"\n[{group}]")
        mark = "ok  " if c.ok else ("MISS" if c.required else "--  ")
        lines.append(f"  {mark} {c.name}: {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"       → {c.fix}")
    missing = [c.name for c in checks if not c.ok and c.required]
    lines.append("")
    lines.append("ready to extract." if not missing else f"not ready: fix {', '.join(missing)}.")
    return "\n".join(lines).lstrip("\n")
