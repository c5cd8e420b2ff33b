import time

import pytest
import torch

from llmbench.system import device
from llmbench.core.errors import UserError


def test_cpu_is_picked_here_and_env_overrides_auto(monkeypatch):
    monkeypatch.delenv("LLMBENCH_DEVICE", raising=False)
    assert device.pick_device("auto") == "cpu"  # no torch_npu, no CUDA on this machine
    monkeypatch.setenv("LLMBENCH_DEVICE", "cpu")
    assert device.pick_device("auto") == "cpu"


def test_unknown_and_unavailable_devices_name_the_value_and_the_choices():
    with pytest.raises(UserError, match=r"unknown device 'tpu'; valid: auto, npu, cuda, cpu"):
        device.pick_device("tpu")
    with pytest.raises(UserError, match=r"device 'cuda' is not available here .*available: cpu"):
        device.pick_device("cuda")
    ok, why = device.availability("npu")
    assert not ok and "torch_npu" in why


def test_dtype_checks_per_device(monkeypatch):
    # a CPU without a native 16-bit path (measured rates of an AVX2-only EPYC)
    monkeypatch.setattr(device, "cpu_matmul_rates", lambda: {"fp32": 150.0, "fp16": 0.3, "bf16": 0.3})
    device.check_dtype("cpu", "fp32")
    assert device.fastest_dtype("cpu") == "fp32"
    with pytest.raises(UserError, match=r"dtype 'bf16' cannot run on cpu.*valid on cpu: fp32"):
        device.check_dtype("cpu", "bf16")
    with pytest.raises(UserError, match=r"unknown dtype 'int3'"):
        device.check_dtype("cpu", "int3")


def test_cpu_timer_measures_the_call():
    out, t = device.timed(lambda: time.sleep(0.05) or 7, "cpu")
    assert out == 7 and 0.045 <= t < 0.5


def test_cpu_peak_memory_is_resettable_process_rss():
    assert device.reset_peak_memory("cpu")
    base, label = device.peak_memory("cpu")
    assert "peak RSS" in label
    x = torch.ones(300 * 2**20 // 4)  # touch 300 MiB
    peak, _ = device.peak_memory("cpu")
    del x
    assert peak - base >= 250 * 2**20
    device.reset_peak_memory("cpu")
    after, _ = device.peak_memory("cpu")
    assert after < peak  # the window was reset, not the lifetime maximum


def test_describe_cpu_has_versions_and_hardware():
    info = device.describe("cpu")
    for key in ("device", "device_name", "cpu_model", "cpu_threads", "torch", "transformers", "host_memory_bytes"):
        assert info[key], key


def test_oom_detection():
    assert device.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert device.is_oom(RuntimeError("NPU out of memory. Tried to allocate"))
    assert not device.is_oom(RuntimeError("shape mismatch"))
