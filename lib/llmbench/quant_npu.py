"""Quantized Linear layers on Ascend NPU, built only from documented torch_npu ops (see FACTS.md s.4).

- w8a16: torch_npu.npu_weight_quant_batchmatmul(x[M,K], weight[K,N] int8, antiquant_scale[N])
- w4a16: the same op with an int4-packed weight (npu_convert_weight_to_int4pack, 8 int4 per int32)
         and group-wise antiquant_scale[K/g, N]
- w8a8:  torch_npu.npu_dynamic_quant(x) -> (int8 x, per-token fp32 scale[M]), then
         torch_npu.npu_quant_matmul(x, weight[K,N] int8, scale[N] fp32, pertoken_scale=..., output_dtype=x.dtype)
Weights are stored [N, K] and passed transposed, the layout the docs recommend for per-channel.
Nothing here runs without an NPU; the tests drive it against a fake torch_npu that records calls.
"""
import torch
from torch import nn


def _ops():
    import torch_npu  # imported late: only ever reached on an NPU run
    return torch_npu


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N,K] int8, scale [N] fp32)."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int4_groupwise(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4 along K: (q [N,K] int32 in [-8, 7], scale [K/group, N] fp32)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    scale = g.abs().amax(dim=2).clamp(min=1e-8) / 7  # [N, K/group]
    q = torch.round(g / scale[..., None]).clamp(-8, 7).reshape(n, k).to(torch.int32)
    return q, scale.t().contiguous()


class NpuW8A16Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        q, scale = int8_per_channel(lin.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(lin.weight.dtype))  # antiquant scale in the activation dtype
        self.out_features = lin.out_features

    def forward(self, x):
        y = _ops().npu_weight_quant_batchmatmul(_flat(x), self.weight.t(), self.scale)
        return y.reshape(*x.shape[:-1], self.out_features)


class NpuW4A16Linear(nn.Module):
    def __init__(self, lin: nn.Linear, group: int):
        super().__init__()
        q, scale = int4_groupwise(lin.weight.detach(), group)
        # Pack [K, N] int32 (one int4 each) into [K, N/8]: the layout the op takes as weight.
        self.register_buffer("weight", _ops().npu_convert_weight_to_int4pack(q.t().contiguous()))
        self.register_buffer("scale", scale.to(lin.weight.dtype))
        self.group, self.out_features = group, lin.out_features

    def forward(self, x):
        y = _ops().npu_weight_quant_batchmatmul(_flat(x), self.weight, self.scale,
                                                antiquant_group_size=self.group)
        return y.reshape(*x.shape[:-1], self.out_features)


class NpuW8A8Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        q, scale = int8_per_channel(lin.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)  # fp32: valid with per-token scales for fp16 and bf16 output
        self.out_features = lin.out_features

    def forward(self, x):
        ops = _ops()
        xq, x_scale = ops.npu_dynamic_quant(_flat(x))
        y = ops.npu_quant_matmul(xq, self.weight.t(), self.scale, pertoken_scale=x_scale, output_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)
