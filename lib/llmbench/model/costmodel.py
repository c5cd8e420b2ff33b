"""Cost model: FLOPs and bytes of prefill and decode, and the lower-bound times they imply.

Conventions (kipply's "Transformer inference arithmetic"; Kaplan et al. 2020, Table 1):
- a matmul with P weights costs 2*P FLOPs per token; the tied LM head is one d x vocab matmul;
- causal attention (QK^T and AV) costs 4 * layers * heads * head_dim FLOPs per (query, key) pair;
- prefill computes logits for the last position only (as generate does), decode for the new token;
- one decode step reads every stored weight once (quantized bytes and scales as measured; the tied
  embedding once, as the LM head; an embedding table the LM head does not share only row by row)
  plus the whole KV cache.
A lower bound is max(FLOPs / peak FLOP/s, bytes / bandwidth): no implementation can beat it.
"""
import math

from llmbench.model.models import count_params, head_dim, kv_bytes_per_token, layer_linear_params


def attention_flops_per_pair(cfg) -> int:
    return 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim(cfg)


def prefill_flops(cfg, batch: int, prompt_len: int) -> float:
    linear = 2 * cfg.num_hidden_layers * layer_linear_params(cfg) * prompt_len
    attention = attention_flops_per_pair(cfg) * prompt_len * (prompt_len + 1) / 2  # causal pairs
    lm_head = 2 * cfg.hidden_size * cfg.vocab_size  # last position only
    return batch * (linear + attention + lm_head)


def decode_flops(cfg, batch: int, context_len: int) -> float:
    """One new token per sequence attending to context_len cached tokens plus itself."""
    per_token = 2 * count_params(cfg)["matmul_per_token"] + attention_flops_per_pair(cfg) * (context_len + 1)
    return batch * per_token


def flops_per_token(cfg) -> float:
    """The 2N rule (N = weights used in matmuls), without the attention term."""
    return 2 * count_params(cfg)["matmul_per_token"]


def dense_weight_bytes(cfg, dtype_bytes: int) -> int:
    """Bytes of the stored weights (tied embedding counted once)."""
    return count_params(cfg)["total"] * dtype_bytes


def decode_bytes(cfg, weight_bytes: int, batch: int, context_len: int, kv_dtype: str) -> float:
    """Bytes one decode step must move: all weights read once, KV cache read, new K/V written."""
    kv = kv_bytes_per_token(cfg, kv_dtype)
    embed_row = cfg.hidden_size * (weight_bytes / max(count_params(cfg)["total"], 1))
    return weight_bytes + batch * (kv * (context_len + 1) + embed_row)


def prefill_bytes(cfg, weight_bytes: int, batch: int, prompt_len: int, kv_dtype: str) -> float:
    return weight_bytes + batch * kv_bytes_per_token(cfg, kv_dtype) * prompt_len


def kv_cache_bytes(cfg, batch: int, tokens: int, dtype: str) -> int:
    return batch * tokens * kv_bytes_per_token(cfg, dtype)


def footprint_bytes(cfg, weight_bytes: int, batch: int, tokens: int, dtype: str) -> float:
    """Expected resident memory: weights + KV cache + the largest transient (fp32 logits of a step)."""
    logits = batch * cfg.vocab_size * 4
    hidden = batch * tokens * max(cfg.intermediate_size, cfg.hidden_size) * 4 * 3
    return weight_bytes + kv_cache_bytes(cfg, batch, tokens, dtype) + logits + hidden


def bound_s(flops: float, nbytes: float, peak_flops: float | None, bandwidth: float | None) -> float:
    times = [x / y for x, y in ((flops, peak_flops), (nbytes, bandwidth)) if y and not math.isnan(y)]
    return max(times) if times else float("nan")


def efficiency(flops: float, nbytes: float, seconds: float, peak_flops, bandwidth) -> dict:
    """Lower bound and the shares of the ceilings that a measured time achieved."""
    def share(work, peak):
        return work / seconds / peak if peak and seconds and not math.isnan(peak) else float("nan")
    return {"bound_s": bound_s(flops, nbytes, peak_flops, bandwidth),
            "mbu": share(nbytes, bandwidth), "mfu": share(flops, peak_flops)}
