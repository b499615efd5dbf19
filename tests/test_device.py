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


def _fresh_python(code: str, **env) -> str:
    """Run `code` in a new interpreter (ATEN_CPU_CAPABILITY is read once, when torch starts)."""
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_isa_caps_turn_off_fast_bf16_and_auto_picks_fp32():
    # NOTE: on an AVX512-BF16 machine this is the AVX2 imitation the notebooks are checked under; on an
    # AVX2-only machine the answer is the same without the variables.
    code = ("import torch; from npukit import device; from npukit.loading import choose_dtype; "
            "print(device.cpu_has_fast_bf16(), choose_dtype(torch.device('cpu'))[0])")
    for env in ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ATEN_CPU_CAPABILITY": "avx2"},
                {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}):
        assert _fresh_python(code, **env) == "False torch.float32", env


def test_isa_cap_reason_names_the_variable(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in device.cpu_isa_cap()
    assert device.cpu_has_fast_bf16() is False
    for isa in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert device.cpu_isa_cap() is None
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert device.cpu_isa_cap() is None  # no variable: the CPU's own answer decides
