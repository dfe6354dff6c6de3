"""How this process's threads wait for the GPU: CUDA's scheduling flag for its primary contexts.

By default (``auto``) CUDA makes a thread that waits for the GPU (a copy back to the host, a
``synchronize``) *spin* on its core whenever the process has fewer CUDA contexts than the machine
has logical CPUs, which is always the case here. One engine process has several such threads
(decode/upload, landmarks, align + regress), and a dataset run has several processes per GPU:
their spinning takes cores, or hyper-thread siblings, from the host work the GPU is waiting for.
``blocking`` makes a waiting thread sleep until the GPU is done, at the cost of a wake-up
latency; ``yield`` makes it yield its core between polls.

The flag belongs to the device's primary context (the one torch uses) and only counts when set
before that context is created, so :func:`apply_cuda_sync` runs from ``Engine.__init__``, before
any model is loaded. It is chosen with the environment variable :data:`ENV`
(``STUDIO_CUDA_SYNC=auto|spin|yield|blocking``; unset: ``auto``, CUDA's own choice, untouched).
Process-wide, like :mod:`engine.hostmem`.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: The environment variable that picks the mode.
ENV = "STUDIO_CUDA_SYNC"
#: ``CU_CTX_SCHED_*`` values of the CUDA driver API (``cuda.h``), by mode.
SCHED_FLAGS = {"auto": 0x0, "spin": 0x1, "yield": 0x2, "blocking": 0x4}
#: The scheduling bits of a context's flags.
SCHED_MASK = 0x7


def cuda_sync_mode(environ: Mapping[str, str] | None = None) -> str:
    """The mode :data:`ENV` asks for (``auto`` when unset or empty).

    Raises:
        ValueError: any other value than :data:`SCHED_FLAGS`' names.
    """
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower() or "auto"
    if value not in SCHED_FLAGS:
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(SCHED_FLAGS)}")
    return value


def _load_driver():
    """The CUDA driver library, or None where there is none (no NVIDIA driver: nothing to set)."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def set_cuda_sync(mode: str, driver=None) -> int:
    """Give every visible GPU's primary context the scheduling flag of ``mode`` (see the module
    docstring), keeping its other flags. ``driver``: the CUDA driver library (default:
    ``libcuda.so.1``). Returns the number of devices set; 0 without a driver or a GPU.

    Raises:
        RuntimeError: a driver call failed (its ``CUresult`` in the message), e.g. the context
            is already active with another scheduling flag.
    """
    flag = SCHED_FLAGS[mode]
    driver = driver if driver is not None else _load_driver()
    if driver is None or driver.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    _check(driver.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    set_flags = getattr(driver, "cuDevicePrimaryCtxSetFlags_v2", None) or driver.cuDevicePrimaryCtxSetFlags
    for ordinal in range(count.value):
        device, flags, active = ctypes.c_int(0), ctypes.c_uint(0), ctypes.c_int(0)
        _check(driver.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
        _check(driver.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)),
               "cuDevicePrimaryCtxGetState")
        if flags.value & SCHED_MASK == flag:
            continue
        _check(set_flags(device, ctypes.c_uint((flags.value & ~SCHED_MASK) | flag)), "cuDevicePrimaryCtxSetFlags")
    return count.value


def apply_cuda_sync(environ: Mapping[str, str] | None = None, driver=None) -> str:
    """:func:`set_cuda_sync` with the mode :data:`ENV` names; nothing at all for ``auto``.
    A driver error is logged, not raised (the run goes on with CUDA's default). Returns the mode."""
    mode = cuda_sync_mode(environ)
    if mode != "auto":
        try:
            devices = set_cuda_sync(mode, driver)
        except RuntimeError as e:
            log.warning("%s=%s not applied: %s", ENV, mode, e)
        else:
            log.debug("CUDA waits: %s on %d device(s)", mode, devices)
    return mode


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} returned CUresult {result}")


__all__ = ["ENV", "SCHED_FLAGS", "apply_cuda_sync", "cuda_sync_mode", "set_cuda_sync"]
