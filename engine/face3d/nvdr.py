"""nvdiffrast backend: ``RasterizeCudaContext`` only (never OpenGL), with a fix for its plugin loader.

nvdiffrast (packaged as ``diffrp-nvdiffrast`` 0.3.3.1) compiles its CUDA plugin with
``torch.utils.cpp_extension.load`` at first use, then imports it by name. Current torch no
longer registers the built module in ``sys.modules``, so that import fails with
``ModuleNotFoundError: No module named 'nvdiffrast_plugin_…'``. :func:`load_nvdiffrast`
catches exactly that error, loads the built library from torch's extension folder, registers
it under the name nvdiffrast asks for, and retries — nvdiffrast's files are never edited.

Nothing here is imported unless CUDA is available and this backend is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from engine.errors import StudioError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install diffrp-nvdiffrast==0.3.3.1"
_LOCK = threading.Lock()


class RendererError(StudioError):
    """A renderer backend cannot be used (the message says why in plain words)."""

    code = "renderer"


def cuda_problem() -> str | None:
    """Why torch cannot use an NVIDIA GPU here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA support)"
    if not torch.cuda.is_available():
        return "no NVIDIA driver or GPU found (torch.cuda.is_available() is False)"
    return None


def _plugin_name(nvdiffrast_version: str) -> str:
    # The name nvdiffrast 0.3.3's loader builds (its ``sanitize_name`` rule).
    import re

    raw = f"nvdiffrast_plugin_{nvdiffrast_version}_torch{torch.__version__}"
    return re.sub(r"\W|^(?=\d)", "_", raw)


def _extension_root() -> Path:
    """torch's extension build root (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/pyXY_cuZZ``)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    cu = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(cpp_extension.get_default_build_root()) / f"{py}_{cu}"


def plugin_built() -> bool:
    """True when a compiled nvdiffrast CUDA plugin for this torch is already on disk."""
    try:
        import nvdiffrast
    except ImportError:
        return False
    name = _plugin_name(getattr(nvdiffrast, "__version__", "0"))
    folder = _extension_root() / name
    return any(folder.glob(f"{name}.*so")) or any(folder.glob(f"{name}.pyd"))


def toolkit_problem() -> str | None:
    """Why nvdiffrast's plugin cannot be compiled here (no nvcc, no ninja), or None."""
    from torch.utils import cpp_extension

    cuda = torch.version.cuda or "?"
    home = cpp_extension.CUDA_HOME
    nvcc = Path(home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc") if home else None
    if nvcc is None or not nvcc.is_file():
        where = f" (CUDA_HOME={home} has no bin/nvcc)" if home else ""
        return (
            f"no CUDA toolkit found{where}: nvdiffrast compiles its CUDA plugin on first use and needs "
            f"nvcc from a CUDA {cuda} toolkit; install it and set CUDA_HOME"
        )
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed: torch needs it to compile nvdiffrast's plugin (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) found: torch needs one to compile nvdiffrast's plugin"
    return None


def nvdiffrast_problem() -> str | None:
    """Why the nvdiffrast backend cannot be used, without compiling anything; None if it should work."""
    problem = cuda_problem()
    if problem:
        return problem
    if importlib.util.find_spec("nvdiffrast") is None:
        return f"nvdiffrast is not installed ({INSTALL_HINT})"
    if plugin_built():
        return None
    return toolkit_problem()


def _register_built_plugin(name: str) -> ModuleType:
    """Load the compiled plugin ``name`` from torch's extension folder and put it in ``sys.modules``."""
    from torch.utils import cpp_extension

    folder = _extension_root() / name
    try:
        module = cpp_extension._import_module_from_library(name, str(folder), True)
    except (AttributeError, TypeError):  # the private helper moved: load the file ourselves
        path = next(iter(sorted(folder.glob(f"{name}.*so")) + sorted(folder.glob(f"{name}.pyd"))), None)
        if path is None:
            raise ModuleNotFoundError(f"no built module {name} in {folder}", name=name) from None
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def load_nvdiffrast() -> ModuleType:
    """Import ``nvdiffrast.torch`` with its CUDA plugin built and loaded.

    The first call on a machine compiles the plugin (about 1–2 minutes).

    Raises:
        RendererError: no CUDA, nvdiffrast missing, no toolkit, or the build failed.
    """
    problem = nvdiffrast_problem()
    if problem:
        raise RendererError(problem)
    with _LOCK:
        try:
            import nvdiffrast.torch as dr
            from nvdiffrast.torch import ops
        except ImportError as e:
            raise RendererError(
                f"nvdiffrast cannot be imported ({e}); reinstall it ({INSTALL_HINT})"
            ) from None
        get_plugin = getattr(ops, "_get_plugin", None)
        if get_plugin is None:
            return dr  # another nvdiffrast layout: let it load its plugin itself
        try:
            try:
                get_plugin(gl=False)
            except ModuleNotFoundError as e:
                # Built (or already importable from disk) but not registered under its name.
                if not (e.name or "").startswith("nvdiffrast_plugin"):
                    raise
                log.info("registering nvdiffrast's built plugin %s (torch no longer does)", e.name)
                _register_built_plugin(e.name)
                get_plugin(gl=False)
        except RendererError:
            raise
        except Exception as e:  # compiler errors arrive as RuntimeError/OSError/subprocess errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RendererError(f"nvdiffrast's CUDA plugin could not be built or loaded: {first}") from e
    return dr


class NvdiffrastBackend:
    """Rasterize + interpolate with nvdiffrast's CUDA rasterizer on one device."""

    name = "nvdiffrast"

    def __init__(self, device: str | torch.device) -> None:
        self.dr = load_nvdiffrast()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RendererError(f"nvdiffrast renders on CUDA devices only, got {self.device}")
        self.ctx = self.dr.RasterizeCudaContext(device=self.device)

    def render(
        self, pos_clip: torch.Tensor, tri: torch.Tensor, attrs: torch.Tensor, resolution: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 4) clip positions, (F, 3) triangles, (B, N, C) attributes.

        Returns mask bool (B, H, W) and the interpolated attributes × mask (B, H, W, C).
        """
        tri32 = tri.to(device=self.device, dtype=torch.int32).contiguous()
        rast, _ = self.dr.rasterize(
            self.ctx, pos_clip.contiguous().float(), tri32, resolution=list(resolution)
        )
        image, _ = self.dr.interpolate(attrs.contiguous().float(), rast, tri32)
        mask = rast[..., 3] > 0
        return mask, image * mask[..., None]
