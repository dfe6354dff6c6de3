"""How engine threads wait for the GPU (``engine.cudasync``): the mode from the environment,
and the CUDA driver calls, against a stand-in driver that records them (no GPU here)."""

from __future__ import annotations

import ctypes
import logging

import pytest

from engine import Engine, EngineConfig
from engine.cudasync import ENV, apply_cuda_sync, cuda_sync_mode, set_cuda_sync


class FakeDriver:
    """The five driver entry points ``set_cuda_sync`` calls, on ``flags`` (one int per device)."""

    def __init__(self, flags: list[int], active: bool = False, fail_set: int = 0) -> None:
        self.flags, self.active, self.fail_set = list(flags), active, fail_set
        self.calls: list[str] = []

    def cuInit(self, _flags):
        self.calls.append("init")
        return 0

    def cuDeviceGetCount(self, count):
        count._obj.value = len(self.flags)
        return 0

    def cuDeviceGet(self, device, ordinal):
        device._obj.value = ordinal
        return 0

    def cuDevicePrimaryCtxGetState(self, device, flags, active):
        flags._obj.value, active._obj.value = self.flags[device.value], int(self.active)
        return 0

    def cuDevicePrimaryCtxSetFlags_v2(self, device, flags):
        self.calls.append(f"set {device.value} {flags.value:#x}")
        if self.fail_set:
            return self.fail_set
        self.flags[device.value] = flags.value
        return 0


def test_the_mode_comes_from_the_environment_and_a_wrong_one_is_refused():
    assert cuda_sync_mode({}) == "auto"
    assert cuda_sync_mode({ENV: ""}) == "auto"
    assert cuda_sync_mode({ENV: " Blocking "}) == "blocking"
    with pytest.raises(ValueError, match="STUDIO_CUDA_SYNC='sleepy': use one of auto, spin, yield, blocking"):
        cuda_sync_mode({ENV: "sleepy"})


def test_blocking_sets_the_scheduling_bits_of_every_device_and_keeps_the_others():
    driver = FakeDriver([0x0, 0x8 | 0x1, 0x4])  # auto; spin with another flag (LMEM_RESIZE_TO_MAX); blocking
    assert set_cuda_sync("blocking", driver) == 3
    assert driver.flags == [0x4, 0x8 | 0x4, 0x4]
    assert driver.calls == ["init", "set 0 0x4", "set 1 0xc"]  # device 2 already had it


def test_auto_leaves_the_driver_alone_and_errors_are_logged_not_raised(caplog):
    driver = FakeDriver([0x0])
    assert apply_cuda_sync({}, driver) == "auto"
    assert driver.calls == []
    failing = FakeDriver([0x0], active=True, fail_set=708)  # CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE
    with caplog.at_level(logging.WARNING, logger="engine.cudasync"):
        assert apply_cuda_sync({ENV: "yield"}, failing) == "yield"
    assert "not applied: cuDevicePrimaryCtxSetFlags returned CUresult 708" in caplog.text
    with pytest.raises(RuntimeError, match="CUresult 708"):
        set_cuda_sync("yield", failing)


def test_without_a_driver_nothing_is_set():
    class NoGpu(FakeDriver):
        def cuInit(self, _flags):
            return 100  # CUDA_ERROR_NO_DEVICE

    assert set_cuda_sync("blocking", NoGpu([0x0])) == 0


def test_the_engine_applies_the_mode_when_built_and_refuses_a_wrong_one(monkeypatch):
    seen = []
    monkeypatch.setattr("engine.pipeline.apply_cuda_sync", lambda: seen.append(True))
    Engine(EngineConfig(device="cpu")).close()
    assert seen == [True]
    monkeypatch.undo()
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(ValueError, match=ENV):
        Engine(EngineConfig(device="cpu"))


def test_the_real_library_is_loaded_where_there_is_one():
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pytest.skip("no NVIDIA driver (libcuda.so.1) on this machine: the stand-in tests cover the calls")
    assert set_cuda_sync("auto") >= 0


def test_the_cli_refuses_a_wrong_mode_before_running_anything(monkeypatch, capsys):
    from engine.cli import main

    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(SystemExit) as stop:
        main(["doctor"])
    assert stop.value.code == 2
    assert "STUDIO_CUDA_SYNC='fast': use one of auto, spin, yield, blocking" in capsys.readouterr().err
