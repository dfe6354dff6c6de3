"""Frames on the host or on the GPU: the few operations the fast path's stages apply to
``FrameBatch.images``, written once for both kinds.

``FrameBatch.images`` is a uint8 (B, H, W, 3) RGB array, y down. Sources that decode on the
host (:class:`~engine.stages.source.MediaSource`) give a numpy array; NVDEC with frames kept on
the device (:class:`~engine.stages.nvdec.NvdecSource` with ``on_device=True``) gives a torch
tensor on its CUDA device, so no frame ever crosses PCIe. Both kinds index, slice and report
``shape`` the same way; what differs is allocating, resizing and handing windows to torch,
which the functions here do without a host round trip for device frames.

``import engine.frames`` does not import torch; the functions import it when given a tensor.
"""

from __future__ import annotations

import sys

import numpy as np


def on_device(images) -> bool:
    """True when ``images`` is a torch tensor (frames kept on a device), False for numpy."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(images, torch.Tensor)


def takes_device_frames(stage) -> bool:
    """Whether a face stage (detector, landmarker, aligner) takes frames whose ``images`` are a
    torch tensor: it says so with a true ``device_frames`` attribute. The exact path gives its
    stages device frames only when every one of them does (:func:`engine.fast.default_source`)."""
    return bool(getattr(stage, "device_frames", False))


def zeros_like_frames(images, shape: tuple[int, ...]):
    """uint8 zeros of ``shape`` where ``images`` live: numpy on the host, a tensor on its device."""
    if on_device(images):
        import torch

        return torch.zeros(shape, dtype=torch.uint8, device=images.device)
    return np.zeros(shape, dtype=np.uint8)


def to_torch(x, device, non_blocking: bool = False):
    """``x`` (numpy array or tensor) as a torch tensor on ``device``; no copy when it is there."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=non_blocking)


def to_numpy(x) -> np.ndarray:
    """``x`` as a host numpy array (a device tensor is copied back)."""
    return x.detach().cpu().numpy() if on_device(x) else np.asarray(x)


def shrink_area(images, size: tuple[int, int]):
    """uint8 (B, h, w, 3) frames shrunk to ``size`` = (w, h) by pixel-area averaging.

    Host frames: ``cv2.resize(INTER_AREA)`` per frame. Device frames: torch's ``area``
    interpolation, rounded to uint8, on the device: the same block means for integer factors
    (1920×1080 → 640×360), up to rounding at ties; close to OpenCV's weights otherwise.
    """
    width, height = size
    if not on_device(images):
        import cv2

        return np.stack([cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images])
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        x = images.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(height, width), mode="area")
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


__all__ = ["on_device", "shrink_area", "takes_device_frames", "to_numpy", "to_torch", "zeros_like_frames"]
