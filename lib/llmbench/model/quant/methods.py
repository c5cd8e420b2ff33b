"""Quantization methods with one meaning on every backend, and the bytes the weights then take.

  none   the model dtype
  w8a16  int8 per-channel weights, activations in the model dtype
  w8a8   int8 per-channel weights, dynamic per-token int8 activations
  w4a16  int4 group-wise weights, activations in the model dtype
Every nn.Linear is replaced, the LM head included (so a tied embedding keeps its full-precision copy
for the lookup). A (method, backend, dtype) without a real kernel raises Unsupported with the
reason; callers record it. There is no fallback to another method.
"""
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from llmbench.core.errors import Unsupported
from llmbench.model.quant import npu as quant_npu
from llmbench.system import npu_chips

METHODS = ("none", "w8a16", "w8a8", "w4a16")
GROUP_SIZE = 128  # int4 group along K, as in gpt-fast and torchao defaults


# What actually runs for each (backend, method): recorded next to every quantized number.
KERNELS = {
    ("cpu", "w8a8"): "fbgemm dynamic int8 (torch.ao's dynamic quantized Linear, per-channel weights); activations are "
                     "quantized per tensor with a 7-bit range, not per token",
    ("cpu", "w8a16"): "aten._weight_int8pack_mm (int8 per-channel weights, fp32 activations)",
    ("cpu", "w4a16"): "aten._weight_int4pack_mm_for_cpu (uint4 group-wise weights with zero points)",
    ("cuda", "w8a16"): "torchao Int8WeightOnlyConfig", ("cuda", "w8a8"): "torchao Int8DynamicActivationInt8WeightConfig",
    ("cuda", "w4a16"): "torchao Int4WeightOnlyConfig",
    # The NPU kernels take K, N <= 65535: every layer splits N into chunks of at most 65,535 columns (the LM head,
    # N = 128,256, runs as 2 calls of 64,128) and concatenates; the LM head stays quantized (quant_npu.py).
    ("npu", "w8a16"): "torch_npu.npu_weight_quant_batchmatmul (int8 per-channel; N split into chunks <= 65535, "
                      "LM head quantized, 2 calls)",
    ("npu", "w8a8"): "torch_npu.npu_dynamic_quant + npu_quant_matmul (per-token activations; N split into chunks "
                     "<= 65535, LM head quantized, 2 calls)",
    ("npu", "w4a16"): "torch_npu.npu_weight_quant_batchmatmul with int4-packed group-wise weights (N split into "
                      "chunks <= 65535, LM head quantized, 2 calls)",
}


def replace_linears(model: nn.Module, make, workers: int = 1) -> list[str]:
    """Swap every nn.Linear for make(linear); returns the dotted names replaced. With workers > 1 the
    Linears are made side by side in threads (for makers whose work is torch ops, which release the GIL);
    each is swapped in as soon as it is made, so the originals are freed one by one as before."""
    slots = [(parent_name, parent, name) for parent_name, parent in list(model.named_modules())
             for name, child in list(parent.named_children()) if isinstance(child, nn.Linear)]
    linears = (getattr(parent, name) for _, parent, name in slots)
    with ThreadPoolExecutor(workers) as pool:
        made = pool.map(make, linears) if workers > 1 else map(make, linears)
        for (_, parent, name), new in zip(slots, made):
            setattr(parent, name, new)
    return [f"{parent_name}.{name}" if parent_name else name for parent_name, _, name in slots]


def group_size(model: nn.Module) -> int:
    """GROUP_SIZE, or the largest smaller group (64, 32) that divides every in_features (tiny models)."""
    ks = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    for g in (GROUP_SIZE, 64, 32):
        if all(k % g == 0 for k in ks):
            return g
    raise Unsupported(f"in_features {sorted(ks)} are not all divisible by an int4 group size of 32 or more")


# --- CPU: fbgemm dynamic int8 for w8a8; aten's int8/int4 weight-only kernels for the others ---------

class CpuInt8WeightLinear(nn.Module):
    """w8a16 on CPU: aten._weight_int8pack_mm (int8 weight [N,K], per-channel scale [N])."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        q, scale = quant_npu.int8_per_channel(lin.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(lin.weight.dtype))
        self.out_features = lin.out_features

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features)


def uint4_groupwise(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise uint4 (gpt-fast layout): q [N,K] in [0, 15], scales_and_zeros [K/g, N, 2].

    Dequantized weight = (q - 8) * scale + zero, with zero = min + 8 * scale.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo).clamp(min=1e-6) / 15)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).reshape(n, k).to(torch.int32)
    zero = lo + 8 * scale
    return q, torch.stack([scale.t(), zero.t()], dim=2).contiguous()


class CpuInt4WeightLinear(nn.Module):
    """w4a16 on CPU: aten._weight_int4pack_mm_for_cpu with group-wise scales and zeros."""

    def __init__(self, lin: nn.Linear, group: int):
        super().__init__()
        q, sz = uint4_groupwise(lin.weight.detach(), group)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_and_zeros", sz.to(lin.weight.dtype))
        self.group, self.out_features = group, lin.out_features

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), self.weight,
                                                       self.group, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def dynamic_int8_linear(lin: nn.Linear):
    """torch.ao's dynamic int8 Linear of `lin` (what quantize_dynamic with per_channel_dynamic_qconfig makes:
    the same observer, quantized weight and module), with its weight packed once: from_float first packs a
    zero weight of the full size, and reading a packed weight back (for its bytes) unpacks it, each about
    as slow as the packing (3B: 102 s of quantization, mostly these). Its stored bytes are kept as
    `stored_bytes`: the int8 weight, its per-channel scales and zero points."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.nn.quantized.modules.utils import _quantize_weight
    observer = torch.ao.quantization.per_channel_dynamic_qconfig.weight()
    observer(lin.weight)
    qweight = _quantize_weight(lin.weight.float(), observer)
    q = DynamicLinear(1, 1, bias_=lin.bias is not None, dtype=torch.qint8)  # a 1x1 placeholder: nothing to pack
    q.in_features, q.out_features = lin.in_features, lin.out_features
    q.set_weight_bias(qweight, lin.bias)
    s, z = qweight.q_per_channel_scales(), qweight.q_per_channel_zero_points()
    q.stored_bytes = qweight.numel() + s.numel() * s.element_size() + z.numel() * z.element_size()
    return q


def _cpu_w8a8(model):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        # fbgemm packs a weight on one core: the Linears are packed side by side (3B: 40 s on one core)
        return replace_linears(model, dynamic_int8_linear, workers=torch.get_num_threads())


def _quantize_cpu(model, method, dtype):
    if dtype != "fp32":
        raise Unsupported(f"the CPU int8/int4 kernels here take fp32 activations, not {dtype}")
    if method == "w8a8":
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise Unsupported("this torch build has no fbgemm quantized engine")
        return _cpu_w8a8(model)
    if method == "w8a16":
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            raise Unsupported("this torch build has no aten._weight_int8pack_mm")
        return replace_linears(model, CpuInt8WeightLinear)
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise Unsupported("this torch build has no aten._weight_int4pack_mm_for_cpu")
    g = group_size(model)
    return replace_linears(model, lambda lin: CpuInt4WeightLinear(lin, g))


def _quantize_cuda(model, method, dtype):
    try:
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, quantize_)
    except ImportError as e:
        raise Unsupported(f"torchao is not installed ({e}); it provides the CUDA int8/int4 kernels")
    if method == "w4a16" and dtype != "bf16":
        raise Unsupported("torchao int4 weight-only takes bf16 activations")
    before = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = {"w8a16": Int8WeightOnlyConfig, "w8a8": Int8DynamicActivationInt8WeightConfig}.get(method)
    quantize_(model, config() if config else Int4WeightOnlyConfig(group_size=group_size(model)))
    return before


def _quantize_npu(model, method, dtype):
    if dtype not in ("fp16", "bf16"):
        raise Unsupported(f"torch_npu quantized matmuls take fp16/bf16 activations, not {dtype}")
    why = npu_chips.method_refusal(npu_chips.chip_name(), method, dtype)  # gate on the exact chip name
    if why:
        raise Unsupported(why)
    ks = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    if max(ks, default=0) > quant_npu.MAX_KN:  # N is split into chunks; K cannot be
        raise Unsupported(f"in_features {max(ks)} exceeds the NPU kernels' K limit of {quant_npu.MAX_KN}")
    if method == "w8a16":
        return replace_linears(model, quant_npu.NpuW8A16Linear)
    if method == "w8a8":
        return replace_linears(model, quant_npu.NpuW8A8Linear)
    g = quant_npu.group_size(ks, (GROUP_SIZE, 64, 32))
    if g is None:
        raise Unsupported(f"no int4 group of 128, 64 or 32 divides every in_features {sorted(ks)} and lies in [32, K-1]")
    return replace_linears(model, lambda lin: quant_npu.NpuW4A16Linear(lin, g))


def quantize(model: nn.Module, method: str, kind: str, dtype: str) -> list[str]:
    """Quantize in place; returns the names of the Linear modules replaced. Raises Unsupported."""
    if method == "none":
        return []
    return {"cpu": _quantize_cpu, "cuda": _quantize_cuda, "npu": _quantize_npu}[kind](model, method, dtype)


def streamed_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one forward step reads: every stored weight, except an input embedding table that the
    LM head does not share (untied, or left behind when the LM head was quantized): the lookup reads
    only its rows, which the cost model adds per token."""
    emb = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)
    return weight_bytes(model) - (0 if head is emb else emb.numel() * emb.element_size())


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights occupy as stored: each tensor once (tied ones too), scales included."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    seen, total = set(), 0

    def add(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for m in model.modules():
        if isinstance(m, DynamicLinear):  # packed int8 weight: 1 byte per element, plus per-channel qparams
            total += m.stored_bytes
        elif "Rotary" not in type(m).__name__:  # rotary tables derive from the config: not weights
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
                add(t)
    return total
