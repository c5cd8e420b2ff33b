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
    """Stands in for torch.npu: records every call, answers like one idle 64 GB NPU of chip `chip`."""

    def __init__(self, chip="Ascend910B2"):
        self.calls, self.chip = [], chip

    def _rec(self, name, *a, **k):
        self.calls.append((name, a, k))

    def is_available(self):
        self._rec("is_available")
        return True

    def is_bf16_supported(self):
        return FAKE_CHIPS[self.chip] in ("a2", "a3")  # torch_npu: bf16 from Ascend910B1 on

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
        return self.chip

    def names(self):
        return [c[0] for c in self.calls]


# The fake's own chip table, written from torch_npu's docs independently of llmbench.model.quant.npu, so that a
# wrong gate in the library shows up as a kernel error here. Chip names: torch_npu NpuVariables.cpp/.h (2.13.0).
FAKE_CHIPS = {**{c: "a2" for c in ("Ascend910B1", "Ascend910B2", "Ascend910B2C", "Ascend910B3", "Ascend910B4",
                                    "Ascend910B4-1")},
              **{c: "a3" for c in ("Ascend910_9391", "Ascend910_9392", "Ascend910_9381", "Ascend910_9382",
                                    "Ascend910_9372", "Ascend910_9362", "Ascend910_9363")},
              **{c: "910" for c in ("Ascend910A", "Ascend910ProA", "Ascend910PremiumA", "Ascend910ProB",
                                     "Ascend910B")},
              **{c: "310p" for c in ("Ascend310P1", "Ascend310P2", "Ascend310P3", "Ascend310P4", "Ascend310P5",
                                      "Ascend310P7")}}
# "Supported models" of each op in torch_npu/_op_plugin_docs.py (torch-npu 2.13.0).
FAKE_OP_CHIPS = {"npu_weight_quant_batchmatmul": ("a2", "a3", "310p"), "npu_convert_weight_to_int4pack": ("a2", "a3"),
                 "npu_dynamic_quant": ("a2", "a3"), "npu_quant_matmul": ("a2", "a3", "310p")}
MAX_KN = 65535
# ScalarType enum values: torch_npu's int? dtype arguments arrive as these (TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP)
DTYPE_ENUM = {torch.int8: 1, torch.int32: 3, torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}


class NpuKernelError(RuntimeError):
    """What the real op raises (a RuntimeError from TORCH_CHECK / aclnn) when a documented contract is broken."""


def _check(ok, msg):
    if not ok:
        raise NpuKernelError(msg)


def _is_transposed(t):
    """op-plugin's is_transpose_last_two_dims for 2-D tensors: a .t() view of a contiguous [N, K]."""
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) == t.size(0) and not (t.size(0) == 1 and t.size(1) == 1)


def _fake_ops(calls):
    """torch_npu's quantized-matmul ops, computed on the CPU, refusing what the real kernels refuse.

    Contracts: torch_npu/_op_plugin_docs.py and op_plugin/meta/_meta_registrations.py of the torch-npu 2.13.0
    wheel, Ascend/op-plugin op_plugin/ops/opapi/*KernelNpuOpApi.cpp. Signatures: data/torch_npu_ops.json.
    """
    def rec(name, **info):
        calls.append((name, info))

    def chip_gate(op):
        chip = torch.npu.get_device_name(0)
        gen = FAKE_CHIPS.get(chip)
        _check(gen in FAKE_OP_CHIPS[op], f"{op}: not supported on {chip} (supported: Atlas {FAKE_OP_CHIPS[op]})")
        return gen

    def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                     quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                     weight_dtype=None):
        gen = chip_gate("npu_weight_quant_batchmatmul")
        rec("npu_weight_quant_batchmatmul", x=(tuple(x.shape), x.dtype), weight=(tuple(weight.shape), weight.dtype),
            weight_transposed=_is_transposed(weight), scale=(tuple(antiquant_scale.shape), antiquant_scale.dtype),
            group=antiquant_group_size)
        _check(x.dim() == 2 and weight.dim() == 2, "x and weight must be (M, K) and (K, N)")
        _check(x.dtype in ((torch.float16,) if gen == "310p" else (torch.float16, torch.bfloat16)),
               f"x dtype {x.dtype} not supported on {gen}")
        _check(weight.dtype == torch.int8 or (weight.dtype == torch.int32 and gen in ("a2", "a3")),
               f"weight dtype {weight.dtype} not supported on {gen}")
        int4, trans = weight.dtype == torch.int32, _is_transposed(weight)
        _check(weight.is_contiguous() or trans, "weight must be contiguous or a transposed view")
        k = weight.size(0) * 8 if int4 and trans else weight.size(0)
        n = weight.size(1) * 8 if int4 and not trans else weight.size(1)
        _check(x.size(1) == k, f"The k of x and weight should be equal. but x_k_dim is {x.size(1)}, weight_k_dim is {k}")
        _check(1 <= k <= MAX_KN and 1 <= n <= MAX_KN, f"k,n shouldn't be larger than {MAX_KN} (k={k}, n={n})")
        _check(antiquant_scale.dtype == x.dtype, f"antiquant_scale dtype {antiquant_scale.dtype} must equal x's {x.dtype}")
        g = antiquant_group_size
        _check(g == 0 or (g % 32 == 0 and 32 <= g <= k - 1),
               "antiquant_group_size can be either 0 or a multiple of 32 within the range 32 to weight_k_dim - 1.")
        _check(g == 0 or gen in ("a2", "a3"), f"per-group quantization not supported on {gen}")
        want = [((-(-k // g)), n)] if g else [(n,), (1, n)]
        _check(tuple(antiquant_scale.shape) in want, f"antiquant_scale shape {tuple(antiquant_scale.shape)}, want {want}")
        _check(antiquant_offset is None and quant_scale is None and quant_offset is None and bias is None,
               "the fake models antiquant_scale only")
        w = unpack_int4(weight.t().contiguous()).t() if int4 and trans else unpack_int4(weight) if int4 else weight
        s = antiquant_scale.float().reshape(-1, n)
        if not g:  # per channel: scale the output columns, no [K, N] temporary
            return ((x.float() @ w.float()) * s).to(x.dtype)
        y = sum(x[:, i:i + g].float() @ (w[i:i + g].float() * s[i // g]) for i in range(0, k, g))
        return y.to(x.dtype)

    def npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
        chip_gate("npu_convert_weight_to_int4pack")
        rec("npu_convert_weight_to_int4pack", weight=(tuple(weight.shape), weight.dtype),
            lo=int(weight.min()), hi=int(weight.max()))
        _check(weight.is_contiguous(), "weight should be contiguous")
        _check(weight.dim() == 2, f"weight shape only support dim num 2, but it is {weight.dim()}")
        _check(weight.dtype == torch.int32, f"weight dtype only support int32, but it is {weight.dtype}")
        _check(weight.size(-1) % 8 == 0, f"weight last dim should be the multiple of 8, but it is {weight.size(-1)}")
        _check(-8 <= int(weight.min()) and int(weight.max()) <= 7, "weight values must lie in the int4 range [-8, 7]")
        nib = (weight & 0xF).to(torch.uint8).reshape(weight.size(0), -1, 4, 2)
        # low nibble first, as op-plugin's convert_to_int4_pack; little-endian bytes of an int32
        return (nib[..., 0] | (nib[..., 1] << 4)).contiguous().view(torch.int32).reshape(weight.size(0), -1)

    def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                          dst_type_max=0.0):
        chip_gate("npu_dynamic_quant")
        rec("npu_dynamic_quant", x=(tuple(input.shape), input.dtype))
        _check(input.dtype in (torch.float16, torch.bfloat16), f"x dtype {input.dtype}: fp16 or bf16 only")
        _check(input.dim() > 1, "the dimension of x must be greater than 1")
        _check(smooth_scales is None and group_index is None and dst_type in (None, torch.int8, 1)
               and quant_mode == "pertoken", "the fake models per-token int8 only")
        scale = input.float().abs().amax(dim=-1).clamp(min=1e-8) / 127
        return torch.round(input.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale

    def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                         x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                         y_scale=None):
        gen = chip_gate("npu_quant_matmul")
        out = {v: k for k, v in DTYPE_ENUM.items()}.get(output_dtype, output_dtype) if output_dtype is not None \
            else torch.int8
        rec("npu_quant_matmul", x1=(tuple(x1.shape), x1.dtype), x2=(tuple(x2.shape), x2.dtype),
            x2_transposed=_is_transposed(x2), scale=(tuple(scale.shape), scale.dtype),
            pertoken=None if pertoken_scale is None else (tuple(pertoken_scale.shape), pertoken_scale.dtype),
            output_dtype=out)
        _check(x1.dtype == torch.int8 and x2.dtype == torch.int8, "the fake models int8 x int8 only")
        _check(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, "x1 and x2 must have 2 to 6 dims")
        _check(x1.size(-1) == x2.size(-2), "k dim of x1 and x2 need be same")
        _check(x1.size(-1) <= MAX_KN and x2.size(-1) <= MAX_KN,
               f"the last dim of x1 and x2 must not exceed {MAX_KN} (x1 {tuple(x1.shape)}, x2 {tuple(x2.shape)})")
        m, n = x1.size(-2), x2.size(-1)
        _check(scale.dim() == 1 and scale.size(0) in (1, n), f"scale shape {tuple(scale.shape)}, want (1,) or ({n},)")
        if pertoken_scale is not None:
            _check(gen in ("a2", "a3"), f"pertoken_scale is not supported on {gen}")
            _check(pertoken_scale.dtype == torch.float32 and tuple(pertoken_scale.shape) == (m,),
                   f"pertoken_scale must be float32 ({m},), got {pertoken_scale.dtype} {tuple(pertoken_scale.shape)}")
        # Table 1 (A2/A3) rows for int8 x int8; 310P: the first two rows only.
        rows = [({torch.int64, torch.float32}, False, torch.float16), ({torch.int64, torch.float32}, False, torch.int8)]
        if gen in ("a2", "a3"):
            rows += [({torch.float32, torch.bfloat16}, None, torch.bfloat16), ({torch.float32}, True, torch.float16),
                     ({torch.float32, torch.bfloat16}, False, torch.int32)]
        has_pt = pertoken_scale is not None
        _check(any(scale.dtype in sd and (pt is None or pt == has_pt) and out == od for sd, pt, od in rows),
               f"unsupported combination on {gen}: scale {scale.dtype}, pertoken_scale {has_pt}, output {out}")
        _check(offset is None and bias is None, "the fake models no offset or bias")
        y = (x1.float() @ x2.float()) * scale.float()
        if has_pt:
            y = y * pertoken_scale.float()[:, None]
        return y.to(out)

    return dict(npu_weight_quant_batchmatmul=npu_weight_quant_batchmatmul,
                npu_convert_weight_to_int4pack=npu_convert_weight_to_int4pack,
                npu_dynamic_quant=npu_dynamic_quant, npu_quant_matmul=npu_quant_matmul)


def unpack_int4(packed):
    """Inverse of the pack: [K, N/8] int32 -> [K, N] int8 values in [-8, 7] (byte-wise: no large temporaries)."""
    b = packed.contiguous().view(torch.uint8).reshape(packed.shape[0], -1, 1)
    nibs = torch.cat([b & 0xF, b >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int8)
    return (nibs ^ 8) - 8  # 4-bit two's complement


def fake_torch_npu(monkeypatch, chip="Ascend910B2", cann="8.5.0"):
    """Install a fake torch_npu (ops + torch.npu) for chip; returns (FakeNpu, module)."""
    npu = FakeNpu(chip)
    op_calls = []
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    mod.__version__ = "2.13.0-fake"
    for name, fn in _fake_ops(op_calls).items():
        setattr(mod, name, fn)
    mod.op_calls = op_calls

    def get_cann_version(module="CANN"):
        return cann
    mod.npu = types.SimpleNamespace(get_cann_version=get_cann_version)
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.delenv("LLMBENCH_DEVICE", raising=False)
    return npu, mod


@pytest.fixture
def fake_npu(monkeypatch):
    """A fake torch_npu: importing it installs a recording torch.npu, as the real one does (chip Ascend910B2)."""
    return fake_torch_npu(monkeypatch)


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """The smoke grid run once, end to end through papermill, into a temporary results root."""
    root = tmp_path_factory.mktemp("runs")
    r = cli("run", "data/grids/smoke.yaml", "--runs", root, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    return root
