from types import SimpleNamespace

import pytest
import torch

from npukit import device


def test_detect_on_cpu_machine_is_cpu():
    # CI has no NPU / GPU; detect() must not pretend otherwise.
    assert device.detect() == "cpu"
    assert device.resolve("auto") == torch.device("cpu")


def test_npu_without_torch_npu_says_what_to_install():
    with pytest.raises(device.DeviceError, match=r"torch_npu.*npukit\[npu\].*set_env\.sh"):
        device.resolve("npu")


def test_cuda_and_unknown_devices_are_refused_clearly():
    with pytest.raises(device.DeviceError, match="CUDA is not available"):
        device.resolve("cuda")
    with pytest.raises(device.DeviceError, match="unknown device 'tpu'"):
        device.resolve("tpu")


def test_npu_is_checked_before_cuda(monkeypatch):
    # torch_npu's transfer shim can make torch.cuda.is_available() report the NPU.
    monkeypatch.setattr(device, "torch_npu_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.detect() == "npu"
    assert not device.is_available("cuda")


def test_cpu_memory_stats_are_process_and_system_memory():
    s = device.memory_stats("cpu")
    assert 0 < s.allocated <= s.peak
    assert 0 < s.free <= s.total
    big = torch.ones(64 * 1024 * 1024, dtype=torch.uint8)  # 64 MiB, touched
    assert device.memory_stats("cpu").allocated >= s.allocated + 32 * 1024 * 1024
    del big


def test_dtype_probe_really_runs_a_matmul():
    assert device.supports_dtype("cpu", torch.float32) == (True, "ok")
    ok, why = device.supports_dtype("cpu", torch.bfloat16)
    assert ok and why == "ok"


def test_bf16_refused_on_310p(monkeypatch):
    monkeypatch.setattr(device, "resolve", lambda d: SimpleNamespace(type="npu", index=0))
    monkeypatch.setenv("NPUKIT_SOC_VERSION", "Ascend310P3")
    ok, why = device.supports_dtype("npu", torch.bfloat16)
    assert not ok and "fp16" in why


def test_synchronize_and_empty_cache_are_safe_on_cpu():
    device.synchronize("cpu")
    device.empty_cache("cpu")
    device.reset_peak_memory_stats("cpu")
    assert device.device_count("cpu") == 1 and device.device_count("npu") == 0
    assert isinstance(device.device_name("cpu"), str)
