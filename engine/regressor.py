"""Deep3DFaceRecon's coefficient regressor: ResNet-50 + seven 1×1 heads → 257 coefficients (spec §1).

:class:`ReconNet` has exactly the reference's ``net_recon`` state-dict layout (332 keys,
``backbone.*`` without ``fc`` and ``final_layers.{0..6}``), so ``epoch_20.pth`` loads
strictly. :func:`load_checkpoint` accepts the layouts users actually have (spec §1.3):
Deep3D's ``{net_recon, opt_00, sched_00}`` pickle, a bare state dict (optionally with a
``module.`` prefix or without ``num_batches_tracked``), and SadTalker's safetensors
(``face_3drecon.*``). Pickles are read as data only (:mod:`engine.safe_load`): a file
that asks for a Python object is refused, never run. Anything else fails with a one-line
:class:`CheckpointError` that says what the file is.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from engine.align import crops_to_tensor_input, uint8_to_unit_table
from engine.checks import check_shape
from engine.errors import CheckpointError
from engine.layout import HEAD_SIZES, NUM_COEFFS
from engine.safe_load import UnsafeWeightsError, load_weights

log = logging.getLogger(__name__)

#: Backbone name → channels of its last feature map (Deep3D's ``func_dict``).
ARCH_LAST_DIM = {"resnet18": 512, "resnet50": 2048}

_ARCH_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}

#: ``layout`` values of :class:`CheckpointInfo`.
LAYOUT_DEEP3D = "deep3d-pth"
LAYOUT_STATE_DICT = "state-dict"
LAYOUT_SADTALKER = "sadtalker-safetensors"

#: Inference precisions of :class:`Regressor`; only ``fp32`` reproduces the reference.
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")

SADTALKER_PREFIX = "face_3drecon."
_EPOCH20_MB = 289
_GET_MODEL = (
    "download the released epoch_20.pth (linked from Deep3DFaceRecon_pytorch's README) into "
    "checkpoints/<name>/epoch_20.pth or checkpoints/epoch_20.pth"
)


class ReconNet(nn.Module):
    """Deep3D's ``ReconNetWrapper``: torchvision ResNet (v1.5) without ``fc`` + seven 1×1 heads.

    Forward: float32 (B, 3, 224, 224) RGB in [0, 1] → float32 (B, 257) coefficients laid
    out as :mod:`engine.layout`. Heads are in the order of :data:`engine.layout.HEAD_SIZES`.
    """

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        if arch not in ARCH_LAST_DIM:
            raise ValueError(f"arch: expected one of {sorted(ARCH_LAST_DIM)}, got {arch!r}")
        self.arch = arch
        backbone = getattr(torchvision.models, arch)(weights=None)
        del backbone.fc
        self.backbone = backbone
        last_dim = ARCH_LAST_DIM[arch]
        self.final_layers = nn.ModuleList(
            nn.Conv2d(last_dim, k, kernel_size=1, bias=True) for k in HEAD_SIZES
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        x = b.avgpool(x)  # (B, C, 1, 1)
        return torch.flatten(torch.cat([head(x) for head in self.final_layers], dim=1), 1)


@functools.lru_cache(maxsize=4)
def expected_shapes(arch: str = "resnet50") -> dict[str, tuple[int, ...]]:
    """Key → shape of ``net_recon``'s state dict for ``arch`` (332 keys for ResNet-50)."""
    with torch.device("meta"):
        net = ReconNet(arch)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


# --------------------------------------------------------------------------- reading files


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found in a file.

    Attributes:
        path: the file.
        layout: ``"deep3d-pth"``, ``"state-dict"``, ``"sadtalker-safetensors"``, or None
            when the file holds no recognisable state dict.
        num_tensors: tensors of the reconstruction net found in it (0 when unreadable).
        bytes: file size in bytes (0 when missing).
        ok: True when the net loads strictly for ``arch``.
        message: one line: a summary when ok, else why not.
        arch: the architecture it was checked against.
    """

    path: Path
    layout: str | None
    num_tensors: int
    bytes: int
    ok: bool
    message: str
    arch: str = "resnet50"


def _describe_foreign(head: bytes, text: str) -> str | None:
    """Name a file that is obviously not a checkpoint, from its first bytes."""
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head[:4] in (b"GIF8",):
        return "a GIF image"
    if head[4:8] == b"ftyp":
        return "an MP4/MOV video"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive (unpack it first)"
    if head.startswith(b"MATLAB"):
        return "a MATLAB .mat file (e.g. a BFM file or coefficients, not network weights)"
    lowered = text.lstrip().lower()
    if lowered.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the weights (run `git lfs pull`)"
    if lowered.startswith(("<!doctype html", "<html")):
        return "an HTML page (a failed download, e.g. Google Drive's confirmation page)"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character may be cut at the end of the sample.
        try:
            head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _safetensors_header(path: Path, size: int) -> dict | None:
    """The JSON header of a safetensors file, or None if it is not one; raises if truncated."""
    with path.open("rb") as f:
        first = f.read(9)
        if len(first) < 9 or first[8:9] != b"{":
            return None
        (n,) = struct.unpack("<Q", first[:8])
        if n < 2 or n > 100_000_000:
            return None
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: safetensors file is truncated (size {size} bytes, its header alone needs {8 + n})"
            )
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is corrupt ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is corrupt (not a JSON object)")
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: safetensors file is truncated (size {size} bytes, its header needs {8 + n + end})"
        )
    return header


def _st_dtype(name: str) -> torch.dtype:
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    return table.get(name, torch.float32)


def _read_safetensors(path: Path, header: dict, materialize: bool) -> tuple[str, dict[str, torch.Tensor]]:
    keys = list(header)
    ours = [k for k in keys if k.startswith(SADTALKER_PREFIX)]
    layout = LAYOUT_SADTALKER if ours else LAYOUT_STATE_DICT
    wanted = ours or keys
    if not materialize:
        sd = {
            k: torch.empty(header[k]["shape"], dtype=_st_dtype(header[k]["dtype"]), device="meta")
            for k in wanted
        }
        return layout, sd
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: safetensors file is corrupt ({str(e).splitlines()[0]})") from None
    return layout, sd


def _torch_load(path: Path, mmap: bool):
    """``torch.load`` on CPU as data only (:func:`engine.safe_load.load_weights`); never a full unpickle."""
    return load_weights(path, map_location="cpu", mmap=mmap)


def _find_state_dict(obj, path: Path) -> tuple[str, Mapping]:
    """Pick the reconstruction net's state dict out of whatever ``torch.load`` returned."""
    if isinstance(obj, nn.Module):
        return LAYOUT_STATE_DICT, obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: PyTorch file holds a {type(obj).__name__}, expected a dict of tensors"
        )
    if isinstance(obj.get("net_recon"), Mapping):
        return LAYOUT_DEEP3D, obj["net_recon"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return LAYOUT_STATE_DICT, tensors
    for key in ("state_dict", "model", "net"):
        if isinstance(obj.get(key), Mapping):
            return _find_state_dict(obj[key], path)
    top = ", ".join(sorted(map(str, obj))[:8])
    hint = ""
    if {"net_G", "net_G_ema"} & set(obj):
        hint = " (this is a PIRender generator checkpoint)"
    raise CheckpointError(
        f"{path}: PyTorch file holds no state dict (top-level keys: {top}); expected 'net_recon'{hint}"
    )


def _read_state_dict(path: Path, materialize: bool = True) -> tuple[str, dict[str, torch.Tensor], int]:
    """Read the raw state dict: ``(layout, {key: tensor}, file size)``; keys are not yet normalised."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"reconstruction checkpoint not found: {path}; {_GET_MODEL}")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors"))
        found = f"; it contains {', '.join(inside[:5])}" if inside else ""
        raise CheckpointError(f"{path} is a folder, expected the checkpoint file itself{found}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); {_GET_MODEL}")
    with path.open("rb") as f:
        head = f.read(512)
    text = head.decode("utf-8", errors="replace")
    foreign = _describe_foreign(head, text)
    if foreign:
        raise CheckpointError(f"{path} is not a checkpoint: it is {foreign}")

    header = _safetensors_header(path, size)
    if header is not None:
        layout, sd = _read_safetensors(path, header, materialize)
        return layout, sd, size

    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = head[:1] == b"\x80" and 2 <= head[1] <= 5
    if not (is_zip or is_pickle):
        what = "a text file" if _looks_like_text(head) else "an unknown binary file"
        raise CheckpointError(
            f"{path} is not a checkpoint: it is {what} (expected a PyTorch .pth or a .safetensors file)"
        )
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            names = None  # truncated: torch.load below reports it
        if names is not None:
            if any(n.endswith("/constants.pkl") for n in names):
                fa = any("face_alignment" in n for n in names)
                fa = " such as face_alignment's FAN or S3FD" if fa else ""
                raise CheckpointError(f"{path} is a TorchScript model{fa}, not a Deep3DFaceRecon checkpoint")
            if not any(n.endswith("/data.pkl") for n in names):
                raise CheckpointError(
                    f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl); "
                    "if it is a zipped folder, unpack it and point to epoch_20.pth inside"
                )
    try:
        obj = _torch_load(path, mmap=is_zip)
    except UnsafeWeightsError as e:
        raise CheckpointError(str(e)) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError, KeyError) as e:
        msg = str(e)
        damaged = ("central directory", "EOF", "truncated", "corrupt")
        if isinstance(e, EOFError) or any(s in msg for s in damaged):
            raise CheckpointError(
                f"{path} is truncated or corrupt (size {size} bytes; a complete epoch_20.pth is about "
                f"{_EPOCH20_MB} MB); download it again"
            ) from None
        first = msg.strip().splitlines()[0][:200] if msg.strip() else type(e).__name__
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint: {first}") from None
    layout, sd = _find_state_dict(obj, path)
    return layout, dict(sd), size


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only tensors; drop other SadTalker groups and the ``face_3drecon.``/``module.`` prefixes."""
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(SADTALKER_PREFIX) for k in sd):
        sd = {k[len(SADTALKER_PREFIX) :]: v for k, v in sd.items() if k.startswith(SADTALKER_PREFIX)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _complete(sd: Mapping[str, torch.Tensor], materialize: bool) -> dict[str, torch.Tensor]:
    """Cast floats to float32 (own memory when ``materialize``); add missing ``num_batches_tracked``."""
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.dtype != torch.float32:
            v = v.to(torch.float32)
        elif materialize and v.device.type != "meta":
            v = v.clone()  # detach from the memory-mapped file (zip checkpoints are mmap-loaded)
        out[k] = v
    for k in list(out):
        if k.endswith(".running_mean"):
            nbt = k[: -len("running_mean")] + "num_batches_tracked"
            if nbt not in out:
                out[nbt] = torch.zeros((), dtype=torch.int64)
    return out


def _guess_what(shapes: Mapping[str, tuple[int, ...]], arch: str) -> str | None:
    """Name the network a foreign state dict belongs to, from its keys and shapes."""
    keys = set(shapes)
    head0 = shapes.get("final_layers.0.weight")
    if head0 is not None and len(head0) == 4:
        for other, dim in ARCH_LAST_DIM.items():
            if head0[1] == dim:
                name = _ARCH_NAMES[other]
                if other == arch:
                    return f"an incomplete or modified {name} net_recon"
                return f"a {name} Deep3D net_recon (use arch='{other}')"
    if any(k.startswith(("m0.", "top_m_0.", "conv_last0.")) for k in keys):
        return "a face_alignment FAN landmark network, not Deep3D's reconstruction net"
    if {"conv1_1.weight", "fc7.weight"} <= keys or any(k.startswith("conv3_3_norm") for k in keys):
        return "an S3FD face detector, not Deep3D's reconstruction net"
    if "features.weight" in keys or any(".prelu." in k for k in keys):
        return "an ArcFace recognition net (iresnet), not Deep3D's reconstruction net"
    if any(k.startswith("prelu") for k in keys):
        return "an MTCNN face detector, not Deep3D's reconstruction net"
    fc = shapes.get("fc.weight") or shapes.get("backbone.fc.weight")
    if fc is not None and ("layer1.0.conv1.weight" in keys or "backbone.layer1.0.conv1.weight" in keys):
        return (
            f"an ImageNet ResNet classifier ({fc[0]} classes; the training init weights), "
            "not a trained Deep3D net_recon"
        )
    if any(k.startswith("backbone.") for k in keys) and not any(k.startswith("final_layers.") for k in keys):
        return "a backbone without the 7 coefficient heads"
    groups = sorted({k.split(".", 1)[0] for k in keys})
    known = {"kp_extractor", "generator", "audio2exp", "audio2pose", "mapping", "he_estimator", "net_G"}
    if set(groups) & known:
        return f"SadTalker/PIRender networks ({', '.join(groups[:5])}) without the face_3drecon weights"
    return None


def _examples(items, n: int = 3) -> str:
    items = sorted(items)
    more = ", ..." if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _validate(sd: Mapping[str, torch.Tensor], arch: str, path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``sd`` has exactly ``net_recon``'s keys and shapes."""
    want = expected_shapes(arch)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = set(want) - set(got)
    unexpected = set(got) - set(want)
    wrong = {k for k in set(want) & set(got) if want[k] != got[k]}
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(want)} keys missing (e.g. {_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {_examples(unexpected)})")
    if wrong:
        k = sorted(wrong)[0]
        parts.append(f"{len(wrong)} with another shape (e.g. {k}: expected {want[k]}, found {got[k]})")
    guess = _guess_what(got, arch)
    tail = f"; this looks like {guess}" if guess else ""
    raise CheckpointError(f"{path}: not a Deep3DFaceRecon {arch} net_recon: {', '.join(parts)}{tail}")


def load_checkpoint(path: str | Path, arch: str = "resnet50") -> dict[str, torch.Tensor]:
    """Read and check the ``net_recon`` state dict from any supported layout (spec §1.3).

    Accepts Deep3D's ``{net_recon, opt_00, sched_00}`` pickle (other keys ignored), a bare
    state dict, a ``module.`` prefix, missing ``num_batches_tracked`` (filled with 0), and
    SadTalker's safetensors (``face_3drecon.*``; other groups ignored). A ``.pth`` is read
    as data only (``weights_only=True``, :mod:`engine.safe_load`): a file that asks for any
    other Python object is refused, never unpickled in full.

    Returns:
        CPU float32 tensors keyed exactly like :class:`ReconNet`'s state dict
        (332 keys for ResNet-50; ``num_batches_tracked`` int64).

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file, not a checkpoint, a
            pickle asking for Python objects (the message names the object), or another
            architecture (the message says which).
    """
    path = Path(path)
    _, raw, _ = _read_state_dict(path, materialize=True)
    sd = _complete(_strip_prefixes(raw), materialize=True)
    _validate(sd, arch, path)
    return sd


def inspect_checkpoint(path: str | Path, arch: str = "resnet50") -> CheckpointInfo:
    """Check a checkpoint file without building the network (for ``doctor`` and the setup page).

    Safetensors files are checked from their header alone; PyTorch zips are memory-mapped.
    Never raises for a bad file: ``ok`` is False and ``message`` says why.
    """
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    layout = None
    num = 0
    try:
        layout, raw, size = _read_state_dict(path, materialize=False)
        stripped = _strip_prefixes(raw)
        num = len(stripped)
        sd = _complete(stripped, materialize=False)
        _validate(sd, arch, path)
    except CheckpointError as e:
        return CheckpointInfo(path, layout, num, size, False, str(e), arch)
    message = f"{layout} layout, {_ARCH_NAMES[arch]} net_recon, {num} tensors, {size / 1e6:.1f} MB file"
    return CheckpointInfo(path, layout, num, size, True, message, arch)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- inference


def uint8_nhwc_to_input(crops: torch.Tensor) -> torch.Tensor:
    """Network input on the crops' device: ``uint8 / 255.`` (float64 division) as float32 (spec §1.2).

    Args:
        crops: uint8 (B, 224, 224, 3) tensor, any device.

    Returns:
        float32 (B, 3, 224, 224) on the same device, values identical to
        :func:`engine.align.crops_to_tensor_input`; an NCHW view of NHWC memory, i.e. already
        ``channels_last``.
    """
    lut = torch.from_numpy(uint8_to_unit_table().copy()).to(crops.device)
    return lut[crops.int()].permute(0, 3, 1, 2)


@contextlib.contextmanager
def _fp32_matmul_precision(mode: str) -> Iterator[None]:
    """Set cuDNN-conv and CUDA-matmul float32 precision (``"ieee"`` or ``"tf32"``), then restore."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:  # torch >= 2.9: the new per-backend API (never mix it with allow_tf32)
        old = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode
        try:
            yield
        finally:
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = old
        return
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


class Regressor:
    """The reconstruction network, loaded once, applied to batches of aligned crops.

    Args:
        checkpoint_path: ``epoch_20.pth`` (or any layout :func:`load_checkpoint` accepts).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; None picks ``cuda`` when available.
        precision: ``"fp32"`` (default; on CUDA TF32 is switched off during each call, so the
            numbers match the reference up to GPU/cuDNN differences), ``"tf32"``, ``"fp16"``
            or ``"bf16"`` (autocast): faster, not bit-compatible.
        arch: ``"resnet50"`` (the released model) or ``"resnet18"``.

    The TF32 switch is process-wide while :meth:`predict` runs; to run other models in other
    threads meanwhile, hold :meth:`numerics` around the whole run (the engine does).
    """

    def __init__(
        self,
        checkpoint_path: str | Path,
        device: str | None = None,
        precision: str = "fp32",
        arch: str = "resnet50",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        self.checkpoint_path = Path(checkpoint_path)
        self.precision = precision
        self.arch = arch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        sd = load_checkpoint(self.checkpoint_path, arch)
        with torch.device("meta"):
            net = ReconNet(arch)
        net.load_state_dict(sd, strict=True, assign=True)
        net.eval().requires_grad_(False)
        if self.device.type == "cuda":
            net = net.to(self.device, memory_format=torch.channels_last)
        else:
            net = net.to(self.device)
        self.net = net
        log.info("loaded %s (%s) on %s, %s", self.checkpoint_path, arch, self.device, precision)

    @functools.cached_property
    def checkpoint_sha256(self) -> str:
        """Hex SHA-256 of the checkpoint file (computed on first access, streaming)."""
        return file_sha256(self.checkpoint_path)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def describe(self) -> dict:
        """JSON-serialisable summary: arch, parameter count, device, precision, checkpoint path."""
        return {
            "arch": self.arch,
            "params": self.num_parameters,
            "device": str(self.device),
            "precision": self.precision,
            "checkpoint": str(self.checkpoint_path),
        }

    def _input(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, 224, 224, 3) → float32 (B, 3, 224, 224) on the device, values of spec §1.2.

        The same values and memory layout whether the crops come as numpy or as a tensor.
        """
        if self.device.type == "cpu":
            host = crops.cpu().numpy() if isinstance(crops, torch.Tensor) else crops
            return torch.from_numpy(crops_to_tensor_input(host))
        if isinstance(crops, torch.Tensor):  # already on a device: no host round trip
            return uint8_nhwc_to_input(crops.to(self.device))
        # Ship uint8 (4× less than float32) and convert on the device.
        return uint8_nhwc_to_input(torch.from_numpy(np.ascontiguousarray(crops)).to(self.device))

    def numerics(self) -> contextlib.AbstractContextManager:
        """The float32 precision this regressor needs (TF32 off for ``fp32``), set process-wide.

        :meth:`predict` enters it on every call. Hold it around a whole run when other threads
        use the GPU meanwhile (the engine's landmark thread), so they see one setting throughout
        instead of flags that flip with every batch.
        """
        if self.device.type == "cuda" and self.precision in ("fp32", "tf32"):
            return _fp32_matmul_precision("ieee" if self.precision == "fp32" else "tf32")
        return contextlib.nullcontext()

    def predict(self, crops: np.ndarray | torch.Tensor) -> np.ndarray:
        """Coefficients of aligned crops.

        Args:
            crops: uint8 (B, 224, 224, 3) RGB crops from :func:`engine.align.align_batch`, or
                the same as a torch uint8 tensor on any device
                (``engine.stages.align.TorchAligner(keep_on_device=True)``); the coefficients
                do not depend on which.

        Returns:
            float32 (B, 257) coefficients ``[id | exp | tex | angle | gamma | trans]``.
        """
        if isinstance(crops, torch.Tensor):
            check_shape(crops, ("B", "224", "224", "3"), "crops")
            if crops.dtype != torch.uint8:
                raise ValueError(f"crops: expected dtype uint8, got {crops.dtype}")
        else:
            crops = np.asarray(crops)
            check_shape(crops, ("B", "224", "224", "3"), "crops")
            if crops.dtype != np.uint8:
                raise ValueError(f"crops: expected dtype uint8, got {crops.dtype}")
        if crops.shape[0] == 0:
            return np.zeros((0, NUM_COEFFS), dtype=np.float32)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(self.numerics())
            if self.precision in ("fp16", "bf16"):
                dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
                stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
            out = self.net(self._input(crops))
        return out.float().cpu().numpy()
