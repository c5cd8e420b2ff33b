"""Quantized Linear layers on Ascend NPU, built only from documented torch_npu ops, and the chips they run on.

- w8a16: torch_npu.npu_weight_quant_batchmatmul(x[M,K], weight[K,N] int8, antiquant_scale[N])
- w4a16: the same op with an int4-packed weight (npu_convert_weight_to_int4pack, 8 int4 per int32)
         and group-wise antiquant_scale[K/g, N]
- w8a8:  torch_npu.npu_dynamic_quant(x) -> (int8 x, per-token fp32 scale[M]), then
         torch_npu.npu_quant_matmul(x, weight[K,N] int8, scale[N] fp32, pertoken_scale=..., output_dtype=x.dtype)
Weights are stored [N, K] and passed transposed, the layout the docs recommend for per-channel.
x is passed as a contiguous [M, K]: aclnnWeightQuantBatchMatmulV2 takes x only contiguous or as a transpose
of its last two dims (hicann ops-nn aclnn_weight_quant_batch_matmul_v2.cpp, ContiguousCheck), and the LM head
gets the last position of every sequence, a strided view at batch > 1.

310P: the op's host code re-lays an ND int8 weight out to FRACTAL_NZ (TransData) on every call (ops-nn,
TransposeAndTransDataForInputs). torch_npu 2.13's docs say an NZ weight runs in graph mode only, while
ops-nn's aclnn code and vllm-ascend (which casts every 310P weight to NZ) run it as a single op: whether
this install takes it is tried once per process (nz_probe); it either casts the weights once at load
(npu_format_cast(w, 29)) or keeps ND and says in the record that every call includes the TransData.

Both matmuls reject K or N above 65535 ("k,n shouldn't be larger than 65535", CANN
aclnnWeightQuantBatchMatmulV2; npu_quant_matmul: "the last dim of x1 and x2 must not exceed 65535").
The Llama LM head has N = 128,256, so every layer here splits N into chunks of at most 65,535 columns
(the LM head: 2 x 64,128) and concatenates the outputs, as vllm-ascend does; the LM head stays
quantized like every other Linear, and its bytes are the chunks' bytes.

Sources: torch-npu 2.13.0 wheel (torch_npu/_op_plugin_docs.py, torch_npu/op_plugin/meta/_meta_registrations.py,
torch_npu/include/torch_npu/csrc/core/npu/NpuVariables.h); Ascend/op-plugin op_plugin/ops/opapi/
{WeightQuantBatchMatmulV2,ConvertWeightToINT4Pack,DynamicQuant,QuantMatmul}KernelNpuOpApi.cpp.
data/torch_npu_ops.json holds the signatures; data/npu_unverified.yaml what no NPU run has confirmed.
"""
import torch
from torch import nn

from llmbench.system.npu_chips import GENERATION, chip_name

MAX_KN = 65535  # K and N limit of npu_weight_quant_batchmatmul and npu_quant_matmul
CHUNK_ALIGN = 64  # chunk widths are multiples of 64 (int4 packing needs 8; 64 keeps the cube tiles whole)


def _ops():
    import torch_npu  # imported late: only ever reached on an NPU run
    return torch_npu


def _flat(x):
    """[..., K] -> contiguous [M, K]: the kernels refuse a strided x (see the module docstring); a copy
    only where x was a view (the LM head's last positions at batch > 1, tokens [b, K] from [b, t, K])."""
    return x.reshape(-1, x.shape[-1]).contiguous()


ACL_FORMAT_FRACTAL_NZ = 29  # torch_npu's acl_format id of FRACTAL_NZ (vllm-ascend ACL_FORMAT_FRACTAL_NZ)
_nz_probe: dict = {}


def nz_probe(device) -> tuple[bool, str]:
    """(True, "") when npu_weight_quant_batchmatmul runs a FRACTAL_NZ int8 weight here as a single op and
    matches the ND result, else (False, what happened). Tried once per process, on a 64 x 64 weight."""
    if "result" not in _nz_probe:
        ops = _ops()
        w = (torch.arange(64 * 64, device=device) % 7 - 3).to(torch.int8).reshape(64, 64)  # [N, K]
        s = torch.ones(64, dtype=torch.float16, device=device)
        x = torch.ones(1, 64, dtype=torch.float16, device=device)
        try:
            nd = ops.npu_weight_quant_batchmatmul(x, w.t(), s)
            nz = ops.npu_weight_quant_batchmatmul(x, ops.npu_format_cast(w, ACL_FORMAT_FRACTAL_NZ).t(), s)
            same = torch.equal(nd.cpu(), nz.cpu())  # integer sums below 2048: exact in fp16 in any order
            _nz_probe["result"] = (True, "") if same else (False, "an NZ weight gave other results than ND")
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            _nz_probe["result"] = (False, f"an NZ weight was refused: {type(e).__name__}: {first}")
    return _nz_probe["result"]


def _weight_layout(q: torch.Tensor, chip_gen: str) -> tuple[torch.Tensor, str]:
    """An int8 [N, K] weight as the kernel should get it on this chip generation, and the record's words."""
    if chip_gen != "310p":
        return q, ""
    nz, why = nz_probe(q.device)
    if nz:
        return _ops().npu_format_cast(q, ACL_FORMAT_FRACTAL_NZ), "310P: int8 weights cast to FRACTAL_NZ once at load"
    return q, ("310P: ND int8 weights, so every call includes an ND -> FRACTAL_NZ TransData of the weight "
               f"(aclnnWeightQuantBatchMatmulV2 host code); {why}")


def n_chunks(n: int) -> list[tuple[int, int]]:
    """[start, stop) column ranges of at most MAX_KN, as few and as even as possible, widths multiples of 64."""
    parts = -(-n // MAX_KN)
    while True:
        width = -(-(-(-n // parts)) // CHUNK_ALIGN) * CHUNK_ALIGN
        if width <= MAX_KN:
            return [(i, min(i + width, n)) for i in range(0, n, width)]
        parts += 1


def group_size(ks, preferred=(128, 64, 32)) -> int | None:
    """The largest int4 group that divides every K and that the kernel accepts: a multiple of 32 in [32, K-1]."""
    return next((g for g in preferred if all(k % g == 0 and g <= k - 1 for k in ks)), None)


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N,K] int8, scale [N] fp32)."""
    wf = w.to(torch.float32, copy=True)  # one fp32 copy (never w itself: a tied embedding), then in place
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127
    return wf.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


def int4_groupwise(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4 along K: (q [N,K] int32 in [-8, 7], scale [K/group, N] fp32)."""
    n, k = w.shape
    g = w.to(torch.float32, copy=True).reshape(n, k // group, group)
    scale = g.abs().amax(dim=2).clamp(min=1e-8) / 7  # [N, K/group]
    q = g.div_(scale[..., None]).round_().clamp_(-8, 7).reshape(n, k).to(torch.int32)
    return q, scale.t().contiguous()


def _keep(mod: nn.Module, name: str, tensors: list) -> None:
    for i, t in enumerate(tensors):
        mod.register_buffer(f"{name}{i}", t)


def _chunks(mod: nn.Module, name: str) -> list:
    return [getattr(mod, f"{name}{i}") for i in range(mod.n_chunks)]


def _join(ys: list, x, n):
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    return y.reshape(*x.shape[:-1], n)


class NpuW8A16Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach()
        qs = [int8_per_channel(w[a:b]) for a, b in n_chunks(lin.out_features)]  # per chunk: bounded peak memory
        gen = GENERATION.get(chip_name(), "")
        laid = [_weight_layout(q, gen) for q, _ in qs]
        _keep(self, "weight", [q for q, _ in laid])
        _keep(self, "scale", [s.to(w.dtype) for _, s in qs])  # antiquant scale in the activation dtype
        self.n_chunks, self.out_features, self.layout = len(qs), lin.out_features, laid[0][1]

    def forward(self, x):
        x2 = _flat(x)
        ys = [_ops().npu_weight_quant_batchmatmul(x2, w.t(), s)
              for w, s in zip(_chunks(self, "weight"), _chunks(self, "scale"))]
        return _join(ys, x, self.out_features)


class NpuW4A16Linear(nn.Module):
    def __init__(self, lin: nn.Linear, group: int):
        super().__init__()
        w = lin.weight.detach()
        packed, scales = [], []
        for a, b in n_chunks(lin.out_features):
            q, scale = int4_groupwise(w[a:b], group)
            # Pack [K, n] int32 (one int4 each) into [K, n/8]: the layout the op takes as weight.
            packed.append(_ops().npu_convert_weight_to_int4pack(q.t().contiguous()))
            scales.append(scale.to(w.dtype))
        _keep(self, "weight", packed)
        _keep(self, "scale", scales)
        self.group, self.n_chunks, self.out_features = group, len(packed), lin.out_features

    def forward(self, x):
        x2 = _flat(x)
        ys = [_ops().npu_weight_quant_batchmatmul(x2, w, s, antiquant_group_size=self.group)
              for w, s in zip(_chunks(self, "weight"), _chunks(self, "scale"))]
        return _join(ys, x, self.out_features)


class NpuW8A8Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach()
        qs = [int8_per_channel(w[a:b]) for a, b in n_chunks(lin.out_features)]
        _keep(self, "weight", [q for q, _ in qs])
        _keep(self, "scale", [s for _, s in qs])  # fp32: valid with per-token scales for fp16 and bf16 output
        self.n_chunks, self.out_features = len(qs), lin.out_features

    def forward(self, x):
        ops = _ops()
        xq, x_scale = ops.npu_dynamic_quant(_flat(x))  # once: every chunk shares the quantized activations
        ys = [ops.npu_quant_matmul(xq, w.t(), s, pertoken_scale=x_scale, output_dtype=x.dtype)
              for w, s in zip(_chunks(self, "weight"), _chunks(self, "scale"))]
        return _join(ys, x, self.out_features)
