"""Upload: queue uploaded videos, or register every video of a server folder in place."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.data import get_registry
from dashboard.fmt import DECODER_LABELS, md_escape
from dashboard.gate import current_actor
from dashboard.install import default_backend, weight_statuses
from dashboard.navigation import route_through_app
from db import PermissionDenied, service
from db.access import relative_text
from engine.config import DEFAULT_FORMATS, MODE_HELP, Decoder, EngineConfig, Mode
from engine.errors import StudioError
from engine.formats import FORMATS, formats_help
from engine.landmarks import BACKENDS
from engine.sources import IMAGE_EXTS, VIDEO_EXTS

route_through_app()
actor = current_actor()

DEVICES = {"auto": None, "GPU (cuda)": "cuda", "CPU": "cpu"}
UPLOAD_TYPES = sorted(e.lstrip(".") for e in VIDEO_EXTS | IMAGE_EXTS)


#: Widget key → query parameter remembering it in this browser's address (bookmark it).
REMEMBERED = {"up_backend": "backend", "up_batch": "batch", "up_device": "device", "up_formats": "formats"}


def _parse(key: str, text: str):
    """A remembered value read back from the address (None when it is not a valid choice)."""
    if key == "up_batch":
        return int(text) if text.isdigit() and 1 <= int(text) <= 1024 else None
    if key == "up_formats":
        chosen = [f for f in text.split(",") if f in FORMATS]
        return chosen or None
    options = list(BACKENDS) if key == "up_backend" else list(DEVICES)
    return text if text in options else None


def _restore_settings() -> None:
    """Settings widgets start from what this browser chose last: this session's choice, else the
    address's query parameters; otherwise the defaults (the first landmark backend that is ready)."""
    saved = st.session_state.setdefault("up_prefs", {})
    for key, param in REMEMBERED.items():
        if key in st.session_state:
            continue
        value = saved.get(key)
        if value is None and param in st.query_params:
            value = _parse(key, st.query_params[param])
        if value is None and key == "up_backend":
            value = default_backend(weight_statuses(), list(BACKENDS))
        if value is not None:
            st.session_state[key] = value


def _remember(key: str) -> None:
    """on_change: keep the choice for this session and in the address (``?backend=mtcnn&…``)."""
    value = st.session_state[key]
    st.session_state.setdefault("up_prefs", {})[key] = value
    st.query_params[REMEMBERED[key]] = ",".join(value) if isinstance(value, list) else str(value)


def _settings_form() -> EngineConfig | None:
    """The settings widgets; returns the config, or None (with the reason shown) when invalid."""
    st.subheader("Settings")
    _restore_settings()
    for key in REMEMBERED:  # keep the address in step with the widgets
        if key in st.session_state and REMEMBERED[key] not in st.query_params:
            _remember(key)
    c1, c2 = st.columns(2)
    with c1:
        backend = st.radio(
            "Landmark backend",
            list(BACKENDS),
            key="up_backend",
            on_change=_remember,
            args=("up_backend",),
            format_func=lambda b: BACKENDS[b].label,
            horizontal=True,
        )
        st.caption(BACKENDS[backend].help)
        if backend == "fan":
            missing = [w.title for w in weight_statuses() if w.key in ("sfd", "fan") and not w.present]
            if missing:
                st.warning(
                    "FAN's weights are not installed on this machine (S3FD and 2D-FAN-4); a worker "
                    "without internet access will fail these jobs. Install them on Models / setup, "
                    "or choose MTCNN."
                )
        keypoints = None
        if backend == "file":
            keypoints = (
                st.text_input("Keypoints file or folder (empty: next to each video)", key="up_keypoints").strip()
                or None
            )
    with c2:
        batch = st.number_input(
            "Batch size (frames per network batch)",
            min_value=1,
            max_value=1024,
            **({} if "up_batch" in st.session_state else {"value": 32}),
            step=8,
            key="up_batch",
            on_change=_remember,
            args=("up_batch",),
            help="speed and memory only: results do not depend on it",
        )
        device = st.selectbox(
            "Device",
            list(DEVICES),
            key="up_device",
            on_change=_remember,
            args=("up_device",),
            help="auto: the first free worker takes the job. GPU or CPU: only a worker on that kind "
            "of device takes it (make run starts one worker per GPU, or one CPU worker), so a job "
            "asking for a device no worker has stays queued.",
        )
        keep_person = st.radio(
            "With several faces in a frame, keep",
            ["reference", "continuity"],
            key="up_keep_person",
            horizontal=True,
            format_func={"reference": "the most confident (reference)",
                         "continuity": "the same person (continuity)"}.__getitem__,
            help="reference: as Deep3D/PIRender do (the exact path). continuity: the face whose box "
            "continues the previous frame's. Either way such frames are flagged several_faces.",
        )
        mode = st.radio(
            "Mode", [m.value for m in Mode], key="up_engine_mode", horizontal=True,
            format_func={"exact": "exact (reference)", "fast": "fast (GPU)"}.__getitem__,
            help=MODE_HELP,
        )
        st.caption("fast: GPU tracking and fp16, small measured differences, see docs/compatibility.md"
                   if mode == "fast" else "exact: bit-identical to the reference.")
        decoder = Decoder.PYAV.value
        if mode == "fast":
            decoder = st.radio(
                "Decoder", [d.value for d in Decoder], key="up_decoder", horizontal=True,
                format_func=DECODER_LABELS.__getitem__,
                help="NVDEC decodes on the GPU's video engine and keeps the frames there: the fastest "
                "fast path, about twice FFmpeg's frames/s on a 16-core GPU machine (docs/PERFORMANCE.md). "
                "The worker needs an NVIDIA GPU and `pip install pynvvideocodec` "
                "(Models / setup lists it); otherwise the job fails saying so.",
            )
        smooth = st.number_input(
            "Smoothing window (frames; 0 = off)", min_value=0, max_value=31, value=0, step=2, key="up_smooth",
            help="0 keeps the reference's coefficients. An odd number smooths them over time with a centred "
            "Savitzky–Golay window (no lag); the raw ones stay in the npz as coeff_raw.",
        )
    formats = st.pills(
        "Output formats",
        list(FORMATS),
        selection_mode="multi",
        key="up_formats",
        on_change=_remember,
        args=("up_formats",),
        **({} if "up_formats" in st.session_state else {"default": [f.value for f in DEFAULT_FORMATS]}),
        format_func=lambda f: FORMATS[f].label,
        help=formats_help(),
        width="stretch",
        wrap=True,
    )
    if not formats:
        st.warning("Choose at least one output format.")
        return None
    if any(FORMATS[f].needs_face_model for f in formats) and not any(
        w.key == "bfm" and w.present for w in weight_statuses()
    ):
        st.warning(
            "The overlay video needs the face model (BFM), which is not set up: these jobs would fail. "
            "Install it on Models / setup, or leave the overlay out."
        )
    if "npz" not in formats:
        st.caption("Without npz the results page cannot draw charts for these jobs.")
    try:
        return EngineConfig(
            landmarks=backend,
            formats=tuple(formats),
            batch_size=int(batch),
            device=DEVICES[device],
            keypoints=keypoints,
            keep_person=keep_person,
            smooth_window=int(smooth),
            mode=mode,
            decoder=decoder,
        )
    except ValueError as e:
        st.error(md_escape(f"These settings are not valid: {e}"))
        return None


def _submit_uploads(files, config: EngineConfig) -> None:
    reg = get_registry()
    queued, failed, repeats = 0, [], []
    bar = st.progress(0.0, text="Storing uploads…")
    for i, f in enumerate(files, start=1):
        try:
            f.seek(0)
            job = service.submit_upload(reg, f, f.name, config, actor=actor)
            queued += 1
            same = service.duplicates_of(reg, job.id)
            if same:
                repeats.append(f"{f.name} (same content and settings as job "
                               f"{', '.join(str(j.id) for j in same[:3])}, {same[0].status.value})")
        except (StudioError, ValueError, OSError, PermissionDenied) as e:
            failed.append(f"{f.name}: {relative_text(str(e), reg.data_dir)}")
        bar.progress(i / len(files), text=f"Stored {i} of {len(files)}")
    if repeats:
        st.session_state["jobs_notice"] = "Submitted again: " + "; ".join(repeats) + "."
    _finish(queued, failed)


def _submit_folder(folder: str, config: EngineConfig) -> None:
    reg = get_registry()
    path = Path(folder).expanduser()
    try:  # role and allowed roots first: say nothing about folders this user may not import
        actor.require("import")
        actor.imports.folder(path)
    except PermissionDenied as e:
        st.error(md_escape(f"The folder could not be imported: {e}"))
        return
    if not path.is_dir():
        st.error(f"{md_escape(path)} is not a folder on this server (give an absolute path to a folder of videos).")
        return
    refused: list[str] = []
    with st.spinner(f"Registering the videos under {path} (hashing each file once)…"):
        try:
            jobs = service.import_folder(reg, path, config, actor=actor, refused=refused)
        except (StudioError, ValueError, OSError, PermissionDenied) as e:
            st.error(md_escape(f"The folder could not be imported: {relative_text(str(e), reg.data_dir)}"))
            return
    if refused:
        _finish(len(jobs), refused)
        return
    if not jobs:
        st.warning(f"No video or image found under {md_escape(path)} ({', '.join(UPLOAD_TYPES)}).")
        return
    _finish(len(jobs), [])


def _finish(queued: int, failed: list[str]) -> None:
    if failed:
        st.error("Not queued:\n\n" + "\n\n".join(f"- {md_escape(m)}" for m in failed))
    if queued:
        st.session_state["jobs_flash"] = ("success", f"Queued {queued} job(s).")
        if not failed:
            st.switch_page("pages/jobs.py")
        st.success(f"Queued {queued} job(s).")
        st.page_link("pages/jobs.py", label="Go to Jobs", icon=":material/list:")


st.title("Upload")
if not actor.may("submit"):
    st.info(f"Queueing videos needs the user or admin role; {actor.name} is signed in as {actor.role}.")
    st.stop()
modes = ["Upload files"]
if actor.may("import") and actor.imports.roots != ():
    modes.append("Import a folder on the server")
elif actor.may("import"):
    st.caption(md_escape(actor.imports.reason[0].upper() + actor.imports.reason[1:] + "."))
mode = st.segmented_control("Source", modes, default="Upload files", key="up_mode", required=True)
if mode == "Upload files":
    files = st.file_uploader(
        "Videos (or images)",
        type=UPLOAD_TYPES,
        accept_multiple_files=True,
        key="up_files",
        help="several at once; each file is stored once, however often it is uploaded",
    )
    folder = ""
else:
    files = []
    folder = st.text_input(
        "Folder on the server",
        key="up_folder",
        placeholder=str(actor.imports.roots[0] / "…") if actor.imports.roots else "/data/datasets/voxceleb/test",
        help="every video and image under it (sub-folders too) is registered where it "
        "lies, without copying; keep the files there until the jobs are done"
        + (f". Allowed: folders under {', '.join(str(r) for r in actor.imports.roots)}"
           if actor.imports.roots else ""),
    )
config = _settings_form()
ready = config is not None and (bool(files) if mode == "Upload files" else bool(folder.strip()))
label = f"Queue {len(files)} file(s)" if mode == "Upload files" else "Import folder"
if st.button(label, type="primary", disabled=not ready, key="up_submit", icon=":material/play_arrow:"):
    if mode == "Upload files":
        _submit_uploads(files, config)
    else:
        _submit_folder(folder.strip(), config)
