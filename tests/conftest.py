import importlib.machinery
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
# transformers probes torch_npu once, on first import: import it before any test installs the fake.
from transformers import LlamaForCausalLM  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
LLMBENCH = [sys.executable, "-m", "llmbench.cli"]


def cli(*args, timeout=600, env=None):
    """Run the llmbench CLI as a user would; returns the CompletedProcess."""
    return subprocess.run([*LLMBENCH, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


class FakeNpu:
    """Stands in for torch.npu: records every call, answers like one idle 64 GB NPU."""

    def __init__(self, bf16=True):
        self.calls, self.bf16 = [], bf16

    def _rec(self, name, *a, **k):
        self.calls.append((name, a, k))

    def is_available(self):
        self._rec("is_available")
        return True

    def is_bf16_supported(self):
        return self.bf16

    def synchronize(self):
        self._rec("synchronize")

    def Event(self, enable_timing=False):
        npu = self
        self._rec("Event", enable_timing=enable_timing)

        class Ev:
            def record(self):
                npu._rec("Event.record")

            def synchronize(self):
                npu._rec("Event.synchronize")

            def elapsed_time(self, other):
                npu._rec("Event.elapsed_time")
                return 12.5  # ms

        return Ev()

    def reset_peak_memory_stats(self):
        self._rec("reset_peak_memory_stats")

    def max_memory_allocated(self):
        self._rec("max_memory_allocated")
        return 123456789

    def mem_get_info(self):
        self._rec("mem_get_info")
        return (60 * 2**30, 64 * 2**30)

    def empty_cache(self):
        self._rec("empty_cache")

    def device_count(self):
        return 1

    def get_device_name(self, i=0):
        return "Ascend910B2"

    def names(self):
        return [c[0] for c in self.calls]


def _fake_ops(calls):
    """torch_npu's quantized-matmul ops, computed on the CPU from their documented semantics."""
    def rec(name, **info):
        calls.append((name, info))

    def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                     quant_offset=None, bias=None, antiquant_group_size=0):
        rec("npu_weight_quant_batchmatmul", x=(tuple(x.shape), x.dtype), weight=(tuple(weight.shape), weight.dtype),
            scale=(tuple(antiquant_scale.shape), antiquant_scale.dtype), group=antiquant_group_size)
        if weight.dtype == torch.int32:  # int4 packed [K, N/8]
            w = unpack_int4(weight).float()
        else:
            w = weight.float()  # [K, N]
        s = antiquant_scale.float()
        if antiquant_group_size:
            s = s.repeat_interleave(antiquant_group_size, dim=0)  # [K/g, N] -> [K, N]
        return (x.float() @ (w * s)).to(x.dtype)

    def npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
        rec("npu_convert_weight_to_int4pack", weight=(tuple(weight.shape), weight.dtype),
            lo=int(weight.min()), hi=int(weight.max()))
        k, n = weight.shape
        nib = (weight & 0xF).reshape(k, n // 8, 8)
        packed = torch.zeros(k, n // 8, dtype=torch.int64)
        for j in range(8):
            packed |= nib[..., j].to(torch.int64) << (4 * j)
        return torch.from_numpy(packed.numpy().astype("uint32").view("int32"))

    def npu_dynamic_quant(x):
        rec("npu_dynamic_quant", x=(tuple(x.shape), x.dtype))
        scale = x.float().abs().amax(dim=-1).clamp(min=1e-8) / 127
        return torch.round(x.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
        rec("npu_quant_matmul", x1=(tuple(x1.shape), x1.dtype), x2=(tuple(x2.shape), x2.dtype),
            scale=(tuple(scale.shape), scale.dtype), pertoken=(tuple(pertoken_scale.shape), pertoken_scale.dtype),
            output_dtype=output_dtype)
        y = (x1.float() @ x2.float()) * scale.float() * pertoken_scale.float()[:, None]
        return y.to(output_dtype)

    return dict(npu_weight_quant_batchmatmul=npu_weight_quant_batchmatmul,
                npu_convert_weight_to_int4pack=npu_convert_weight_to_int4pack,
                npu_dynamic_quant=npu_dynamic_quant, npu_quant_matmul=npu_quant_matmul)


def unpack_int4(packed):
    """Inverse of the fake pack: [K, N/8] int32 -> [K, N] signed int4 values."""
    u = torch.from_numpy(packed.numpy().view("uint32").astype("int64"))
    nibs = torch.stack([(u >> (4 * j)) & 0xF for j in range(8)], dim=-1)
    nibs = torch.where(nibs >= 8, nibs - 16, nibs)
    return nibs.reshape(packed.shape[0], -1)


@pytest.fixture
def fake_npu(monkeypatch):
    """A fake torch_npu: importing it installs a recording torch.npu, as the real one does."""
    npu = FakeNpu()
    op_calls = []
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    mod.__version__ = "2.13.0-fake"
    for name, fn in _fake_ops(op_calls).items():
        setattr(mod, name, fn)
    mod.op_calls = op_calls
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.delenv("LLMBENCH_DEVICE", raising=False)
    return npu, mod


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """The smoke grid run once, end to end through papermill, into a temporary results root."""
    root = tmp_path_factory.mktemp("runs")
    r = cli("run", "data/grids/smoke.yaml", "--runs", root)
    assert r.returncode == 0, r.stdout + r.stderr
    return root
