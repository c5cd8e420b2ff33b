import contextlib
import importlib.machinery
import itertools
import os
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path
from typing import Optional

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


def gone(pid: int, within: float = 10.0) -> bool:
    """True once process pid has exited (a zombie counts as exited), polling for up to `within` seconds."""
    from llmbench.experiments.serving import pid_alive
    t0 = time.time()
    while time.time() - t0 < within:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


class FakeNpu:
    """Stands in for torch.npu (and torch_npu.npu, the same module in torch_npu): records every call, answers
    like one idle 64 GB NPU of chip `chip`, and keeps torch_npu's task queue and graph-capture state."""

    def __init__(self, chip="Ascend910B2", cann="8.5.0"):
        self.calls, self.chip, self.cann = [], chip, cann
        # torch_npu reads TASK_QUEUE_ENABLE at import (default 1) and sets it to 0 first when ipykernel is
        # loaded (wheel torch_npu/_init/core/optional_features.py, utils/utils.py _is_interactive_command_line)
        self.task_queue = 0 if "ipykernel" in sys.modules else int(os.environ.get("TASK_QUEUE_ENABLE", "1"))
        self.capturing = False

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

    def get_cann_version(self, module="CANN"):
        return self.cann

    # torch_npu/npu/utils.py (2.13.0): mode 0, 1 or 2, str accepted; returns the mode in effect
    def set_task_queue_enable(self, mode):
        if isinstance(mode, str):
            mode = int(mode)
        if mode not in (0, 1, 2):
            raise RuntimeError(f"mode must be 0, 1, or 2, but got {mode}.")
        self._rec("set_task_queue_enable", mode)
        self.task_queue = mode

    def get_task_queue_enable(self):
        return self.task_queue

    def NPUGraph(self):
        return FakeNPUGraph(self)

    @contextlib.contextmanager
    def graph(self, npu_graph, pool=None, stream=None, capture_error_mode="global"):
        npu_graph.capture_begin()
        try:
            yield npu_graph
        finally:
            npu_graph.capture_end()

    def names(self):
        return [c[0] for c in self.calls]


class FakeNPUGraph:
    """torch.npu.NPUGraph: capture refuses task queue mode 2 (libtorch_npu.so of the 2.13.0 wheel:
    "Do not support TASK_QUEUE_ENABLE = 2 during NPU graph capture, please export TASK_QUEUE_ENABLE=1/0.")."""

    def __init__(self, npu):
        self.npu = npu

    def capture_begin(self, pool=None, capture_error_mode="global"):
        if self.npu.task_queue == 2:
            raise RuntimeError("Do not support TASK_QUEUE_ENABLE = 2 during NPU graph capture, "
                               "please export TASK_QUEUE_ENABLE=1/0.")
        self.npu._rec("NPUGraph.capture_begin")
        self.npu.capturing = True

    def capture_end(self):
        self.npu.capturing = False


# The fake's own chip table, written from torch_npu's docs independently of llmbench.system.npu_chips, so that a
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
ENUM_DTYPE = {v: k for k, v in DTYPE_ENUM.items()}
ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ = 2, 29


class NpuKernelError(RuntimeError):
    """What the real op raises (a RuntimeError from TORCH_CHECK / aclnn) when a documented contract is broken."""


def _check(ok, msg):
    if not ok:
        raise NpuKernelError(msg)


def _is_transposed(t):
    """op-plugin's is_transpose_last_two_dims for 2-D tensors: a .t() view of a contiguous [N, K]."""
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) == t.size(0) and not (t.size(0) == 1 and t.size(1) == 1)


# The installed fake's op log and switches (fake_torch_npu sets them per test). The runtime ops are torch custom
# ops, as torch_npu's are registered ops: torch.compile puts them in the graph as calls, and their contract
# checks run on the real tensors at every eager call, capture and replay.
_RUN = {"calls": [], "nz_single_op": False}
_NZ = weakref.WeakValueDictionary()  # storage address -> the tensor npu_format_cast made FRACTAL_NZ


def _npu_format(t):
    return ACL_FORMAT_FRACTAL_NZ if _NZ.get(t.untyped_storage().data_ptr()) is not None else ACL_FORMAT_ND


def _rec(name, **info):
    _RUN["calls"].append((name, info))


def _chip_gate(op):
    chip = torch.npu.get_device_name(0)
    gen = FAKE_CHIPS.get(chip)
    _check(gen in FAKE_OP_CHIPS[op], f"{op}: not supported on {chip} (supported: Atlas {FAKE_OP_CHIPS[op]})")
    return gen


def _wqbmm(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias, antiquant_group_size,
           inner_precise, weight_dtype):
    """Contracts: torch_npu/_op_plugin_docs.py; op-plugin WeightQuantBatchMatmulV2KernelNpuOpApi.cpp; hicann ops-nn
    matmul/weight_quant_batch_matmul_v2/op_host/op_api/aclnn_weight_quant_batch_matmul_v2.cpp (ContiguousCheck,
    TransposeAndTransDataForInputs)."""
    gen = _chip_gate("npu_weight_quant_batchmatmul")
    int4, trans, nz = weight.dtype == torch.int32, _is_transposed(weight), _npu_format(weight) == ACL_FORMAT_FRACTAL_NZ
    _rec("npu_weight_quant_batchmatmul", x=(tuple(x.shape), x.dtype), weight=(tuple(weight.shape), weight.dtype),
         weight_transposed=trans, scale=(tuple(antiquant_scale.shape), antiquant_scale.dtype),
         group=antiquant_group_size, weight_format="FRACTAL_NZ" if nz else "ND",
         transdata=gen == "310p" and not nz)  # 310P: an ND weight is TransData'd to FRACTAL_NZ in every call
    _check(x.dim() == 2 and weight.dim() == 2, "x and weight must be (M, K) and (K, N)")
    _check(x.is_contiguous() or _is_transposed(x), "only support x tensor is contiguous or transpose last two dims.")
    _check(x.dtype in ((torch.float16,) if gen == "310p" else (torch.float16, torch.bfloat16)),
           f"x dtype {x.dtype} not supported on {gen}")
    _check(weight.dtype == torch.int8 or (weight.dtype == torch.int32 and gen in ("a2", "a3")),
           f"weight dtype {weight.dtype} not supported on {gen}")
    _check(weight.is_contiguous() or trans, "only support weight tensor is contiguous or transpose last two dims.")
    _check(trans or antiquant_scale.is_contiguous(),
           "only support antiquantScale tensor is contiguous or transpose last two dims.")
    if nz and gen == "310p":
        _check(_RUN["nz_single_op"], "weight in FRACTAL_NZ: the Atlas inference series runs it in graph mode only, "
                                     "not as a single op (torch_npu 2.13.0 docs, npu_weight_quant_batchmatmul)")
        _check(trans, "310P FRACTAL_NZ weight: pass the transpose of npu_format_cast([N, K], 29) (docs' example)")
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


def _dynamic_quant(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max):
    _chip_gate("npu_dynamic_quant")
    _rec("npu_dynamic_quant", x=(tuple(input.shape), input.dtype))
    _check(input.dtype in (torch.float16, torch.bfloat16), f"x dtype {input.dtype}: fp16 or bf16 only")
    _check(input.dim() > 1, "the dimension of x must be greater than 1")
    _check(smooth_scales is None and group_index is None and dst_type in (None, 1) and quant_mode == "pertoken",
           "the fake models per-token int8 only")
    scale = input.float().abs().amax(dim=-1).clamp(min=1e-8) / 127
    return torch.round(input.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def _quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype):
    gen = _chip_gate("npu_quant_matmul")
    out = torch.int8 if output_dtype is None else ENUM_DTYPE[output_dtype]
    _rec("npu_quant_matmul", x1=(tuple(x1.shape), x1.dtype), x2=(tuple(x2.shape), x2.dtype),
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


@torch.library.custom_op("fake_torch_npu::npu_weight_quant_batchmatmul", mutates_args=())
def _wqbmm_op(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
              antiquant_offset: Optional[torch.Tensor], quant_scale: Optional[torch.Tensor],
              quant_offset: Optional[torch.Tensor], bias: Optional[torch.Tensor], antiquant_group_size: int,
              inner_precise: int, weight_dtype: Optional[int]) -> torch.Tensor:
    return _wqbmm(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias, antiquant_group_size,
                  inner_precise, weight_dtype)


@_wqbmm_op.register_fake
def _(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias, antiquant_group_size,
      inner_precise, weight_dtype):
    n = weight.size(1) * (8 if weight.dtype == torch.int32 and not _is_transposed(weight) else 1)
    return x.new_empty(x.size(0), n)


@torch.library.custom_op("fake_torch_npu::npu_dynamic_quant", mutates_args=())
def _dynamic_quant_op(input: torch.Tensor, smooth_scales: Optional[torch.Tensor], group_index: Optional[torch.Tensor],
                      dst_type: Optional[int], quant_mode: str, dst_type_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _dynamic_quant(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)


@_dynamic_quant_op.register_fake
def _(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max):
    return input.new_empty(input.shape, dtype=torch.int8), input.new_empty(input.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fake_torch_npu::npu_quant_matmul", mutates_args=())
def _quant_matmul_op(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor],
                     pertoken_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     output_dtype: Optional[int]) -> torch.Tensor:
    return _quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype)


@_quant_matmul_op.register_fake
def _(x1, x2, scale, offset, pertoken_scale, bias, output_dtype):
    out = torch.int8 if output_dtype is None else ENUM_DTYPE[output_dtype]
    return x1.new_empty((*x1.shape[:-1], x2.size(-1)), dtype=out)


def _fake_ops():
    """torch_npu's functions with torch_npu's signatures (data/torch_npu_ops.json), computed on the CPU, refusing
    what the real kernels refuse. Contracts: torch_npu/_op_plugin_docs.py and op_plugin/meta/_meta_registrations.py
    of the torch-npu 2.13.0 wheel, Ascend/op-plugin op_plugin/ops/opapi/*KernelNpuOpApi.cpp, hicann ops-nn."""
    ops = torch.ops.fake_torch_npu

    def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                     quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                     weight_dtype=None):
        return ops.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset,
                                                bias, antiquant_group_size, inner_precise, weight_dtype)

    def npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
        _chip_gate("npu_convert_weight_to_int4pack")
        _rec("npu_convert_weight_to_int4pack", weight=(tuple(weight.shape), weight.dtype),
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
        dst = DTYPE_ENUM.get(dst_type, dst_type) if dst_type is not None else None
        return ops.npu_dynamic_quant(input, smooth_scales, group_index, dst, quant_mode, float(dst_type_max))

    def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                         x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                         y_scale=None):
        _check(x1_dtype is None and x2_dtype is None and pertoken_scale_dtype is None and scale_dtype is None
               and group_sizes is None and y_scale is None, "the fake models int8 x int8 only")
        out = DTYPE_ENUM.get(output_dtype, output_dtype) if output_dtype is not None else None
        return ops.npu_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, out)

    def npu_format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
        """A copy tagged with its format (FRACTAL_NZ: 29, ND: 2), which get_npu_format and the kernels read."""
        _rec("npu_format_cast", x=(tuple(self.shape), self.dtype), acl_format=acl_format)
        _check(acl_format in (ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ), f"the fake models ND and FRACTAL_NZ, not {acl_format}")
        _check(customize_dtype is None and input_dtype is None, "the fake models no customize_dtype/input_dtype")
        out = self.clone(memory_format=torch.contiguous_format)
        if acl_format == ACL_FORMAT_FRACTAL_NZ:
            _NZ[out.untyped_storage().data_ptr()] = out
        return out

    def get_npu_format(input):
        return _npu_format(input)

    return dict(npu_weight_quant_batchmatmul=npu_weight_quant_batchmatmul,
                npu_convert_weight_to_int4pack=npu_convert_weight_to_int4pack,
                npu_dynamic_quant=npu_dynamic_quant, npu_quant_matmul=npu_quant_matmul,
                npu_format_cast=npu_format_cast, get_npu_format=get_npu_format)


def unpack_int4(packed):
    """Inverse of the pack: [K, N/8] int32 -> [K, N] int8 values in [-8, 7] (byte-wise: no large temporaries)."""
    b = packed.contiguous().view(torch.uint8).reshape(packed.shape[0], -1, 1)
    nibs = torch.cat([b & 0xF, b >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int8)
    return (nibs ^ 8) - 8  # 4-bit two's complement


# --- npugraph_ex: the torch.compile backend torch_npu registers (entry point torch_dynamo_backends) ---------

_GRAPH_IDS = itertools.count()


def _fake_npugraph_ex(gm, example_inputs, **kwargs):
    """npugraph_ex as llmbench relies on it (torch_npu/dynamo/npugraph_ex/_acl_concrete_graph/acl_graph.py, 2.13.0):
    AOT with the inputs a graph mutates kept as copy_ into them (the KV cache); each FX graph captured under
    torch.npu.graph on its first run, replayed after, and recaptured when the address of an input it mutates
    changes (is_need_to_recapture); npugraph_ex's counters: captured_<name>, recapture_due_to_mutated_input_change_<name>.
    The fake runs the FX graph on each replay (on the CPU there is nothing to replay)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters
    from torch._functorch.aot_autograd import make_boxed_func
    name = f"fake_graph_{next(_GRAPH_IDS)}"

    def compiler(fx, inputs):
        places = [n for n in fx.graph.nodes if n.op == "placeholder"]
        mutated = sorted({places.index(n.args[0]) for n in fx.graph.nodes
                          if n.op == "call_function" and n.target is torch.ops.aten.copy_.default and n.args[0] in places})
        captured = {}

        def run(*args):
            ptrs = [args[i].data_ptr() for i in mutated]
            if captured.get("ptrs") == ptrs:
                return fx(*args)  # replay
            if "ptrs" in captured:
                counters["npugraph_ex"]["recapture_due_to_mutated_input_change_" + name] += 1
            g = torch.npu.NPUGraph()
            with torch.npu.graph(g):
                out = fx(*args)
            captured["ptrs"] = ptrs
            counters["npugraph_ex"]["captured_" + name] = 1
            torch.npu._rec("npugraph_ex.capture", name, mutated=len(mutated))
            return out
        return make_boxed_func(run)
    return aot_autograd(fw_compiler=compiler, keep_inference_input_mutations=True)(gm, example_inputs)


def _register_npugraph_ex():
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend
    if "npugraph_ex" not in _COMPILER_FNS:
        register_backend(_fake_npugraph_ex, "npugraph_ex")


def fake_torch_npu(monkeypatch, chip="Ascend910B2", cann="8.5.0", nz_single_op=False):
    """Install a fake torch_npu (ops + torch.npu, and the npugraph_ex backend) for chip; returns (FakeNpu, module).
    nz_single_op: whether the 310P weight-quant matmul takes a FRACTAL_NZ weight as a single op (the 2.13.0 docs
    say graph mode only; ops-nn's aclnn code and vllm-ascend run it)."""
    import llmbench.system.device
    import llmbench.model.quant.npu
    from torch._dynamo.utils import counters
    npu = FakeNpu(chip, cann)
    op_calls = []
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    mod.__version__ = "2.13.0-fake"
    for name, fn in _fake_ops().items():
        setattr(mod, name, fn)
    mod.op_calls = op_calls
    mod.npu = npu  # torch_npu.npu is the module torch_npu installs as torch.npu
    monkeypatch.setitem(_RUN, "calls", op_calls)
    monkeypatch.setitem(_RUN, "nz_single_op", nz_single_op)
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.delenv("LLMBENCH_DEVICE", raising=False)
    monkeypatch.setattr(llmbench.system.device, "_task_queue_set", False, raising=False)  # a fresh import
    monkeypatch.setattr(llmbench.model.quant.npu, "_nz_probe", {}, raising=False)
    counters["npugraph_ex"].clear()
    _register_npugraph_ex()
    return npu, mod


@pytest.fixture(autouse=True)
def _no_memory_canary(monkeypatch):
    """Watched windows skip the memory canary (two reads of a 256-512 MiB buffer at each edge, tens of ms
    each, and the buffer itself); tests/test_canary.py switches it back on where it is the subject."""
    from llmbench.system import canary
    monkeypatch.setattr(canary, "ENABLED", False)


@pytest.fixture
def fake_npu(monkeypatch):
    """A fake torch_npu: importing it installs a recording torch.npu, as the real one does (chip Ascend910B2)."""
    return fake_torch_npu(monkeypatch)


@pytest.fixture
def npu_on_cpu(monkeypatch):
    """Device "npu" placed on the CPU (the fake computes there): for engines loaded end to end on a fake NPU."""
    from llmbench.measure import ceilings
    from llmbench.system import device
    from llmbench.engines import compiled as engine_compiled
    from llmbench.experiments import latency
    from llmbench.model import models
    from llmbench.experiments import quantization as quant_study
    place = lambda kind: "cpu" if kind in ("cpu", "npu") else f"{kind}:0"  # noqa: E731
    for m in (device, ceilings, engine_compiled, latency, models, quant_study):
        monkeypatch.setattr(m, "torch_device", place)


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """The smoke grid run once, end to end through papermill, into a temporary results root."""
    root = tmp_path_factory.mktemp("runs")
    r = cli("run", "data/grids/smoke.yaml", "--runs", root, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    return root
