"""A small Llama in the style of gpt-fast, with a preallocated static KV cache: every decode step has
the same shapes, so it can be compiled once and replayed (CUDA graphs, Ascend graph mode, inductor).

It loads the Hugging Face LlamaForCausalLM state dict as is (same tensor names after a rename, same
tensors: nothing is copied), and computes what HF computes: RMSNorm in fp32 then cast, rotate-half
RoPE with HF's own llama3 frequency table, grouped-query attention through SDPA, SwiGLU MLP, a tied
LM head. The engine tests check greedy tokens and logits against HF eager on the same weights.
"""
import torch
import torch.nn.functional as F
from torch import nn

from llmbench.model.models import head_dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache(nn.Module):
    """K and V for every position up to max_seq: [batch, kv_heads, max_seq, head_dim], allocated once at
    the largest batch; a smaller batch uses its first rows (same address: a captured NPU/CUDA graph that
    mutates the cache stays valid, where a new allocation makes npugraph_ex recapture)."""

    def __init__(self, batch: int, max_seq: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        b = k.shape[0]
        kc, vc = self.k[:b], self.v[:b]  # [b, kv_heads, max_seq, head_dim]
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return kc, vc


class Attention(nn.Module):
    def __init__(self, cfg, head_dim: int):
        super().__init__()
        d, h, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.h, self.kv, self.hd = h, kv, head_dim
        self.q_proj = nn.Linear(d, h * head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv * head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv * head_dim, bias=False)
        self.o_proj = nn.Linear(h * head_dim, d, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, pos, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = self.cache.update(pos, k, v)
        # The mask hides every cache position after the current one (and the unused tail of the cache).
        if t == 1 and x.device.type == "cpu":
            y = decode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, head_dim: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, head_dim)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, pos, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def decode_attention(q, k, v, mask):
    """One query position per sequence, in plain ops (fp32): on CPU, SDPA's flash kernel cost about
    0.6 ms per layer here for a single query, 10% of a 1B decode step; this is a few small loops.
    q [b, h, 1, d]; k, v [b, kv, S, d] with h a multiple of kv (grouped-query); mask [1, S]."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv, d).float()                      # the query heads that share a KV head
    s = (qg @ k.float().transpose(-1, -2)) * d ** -0.5              # [b, kv, h/kv, S]
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ v.float()).to(q.dtype).reshape(b, h, 1, d)


def rope(x, cos, sin):
    """HF's rotate-half convention; cos/sin: [t, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RotaryTable(nn.Module):
    """cos and sin of every position up to max_seq (from HF's own inverse-frequency function)."""

    def __init__(self, cfg, head_dim: int, max_seq: int, dtype, device):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        rp = cfg.rope_parameters
        if rp.get("rope_type", "default") == "default":
            inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scale = 1.0
        else:
            inv, scale = ROPE_INIT_FUNCTIONS[rp["rope_type"]](cfg, "cpu")
        freqs = torch.arange(max_seq, dtype=torch.float)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scale).to(dtype).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scale).to(dtype).to(device), persistent=False)


class Llama(nn.Module):
    """Parameter names follow HF's LlamaForCausalLM (model.layers.N.self_attn.q_proj ...), flattened:
    `embed_tokens`, `layers`, `norm`, `lm_head`."""

    def __init__(self, cfg, head_dim: int):
        super().__init__()
        self.cfg, self.head_dim = cfg, head_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, head_dim) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: RotaryTable | None = None
        self.max_batch = self.max_seq = 0

    # HF's accessors, so quant.streamed_weight_bytes works on this module as on HF's.
    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def setup_caches(self, batch: int, max_seq: int) -> None:
        """Allocate the static caches to hold batch x max_seq; they only grow (a no-op when they already
        do), so graphs captured on them keep their addresses."""
        batch, max_seq = max(batch, self.max_batch), max(max_seq, self.max_seq)
        if (batch, max_seq) == (self.max_batch, self.max_seq):
            return
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        for layer in self.layers:
            layer.self_attn.cache = None  # free the old cache before allocating the new one
        for layer in self.layers:
            layer.self_attn.cache = KVCache(batch, max_seq, self.cfg.num_key_value_heads, self.head_dim, dtype, device)
        self.rotary = RotaryTable(self.cfg, self.head_dim, max_seq, dtype, device)
        self.max_batch, self.max_seq = batch, max_seq

    def forward(self, ids, pos):
        """ids [b, t] at positions pos [t] -> fp32-or-model-dtype logits of the last position [b, vocab]."""
        return self.lm_head(self.hidden(ids, pos)[:, -1])

    def hidden(self, ids, pos):
        cos, sin = self.rotary.cos[pos], self.rotary.sin[pos]
        # Causal over the whole static cache: query at position p sees cache slots 0..p.
        mask = pos[:, None] >= torch.arange(self.max_seq, device=ids.device)[None, :]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, pos, mask)
        return self.norm(x)

    def all_logits(self, ids, pos):
        return self.lm_head(self.hidden(ids, pos))


def from_hf(hf_model) -> Llama:
    """A Llama that shares the HF model's parameter tensors (no copy); tied head stays tied."""
    cfg = hf_model.config
    with torch.device("meta"):
        m = Llama(cfg, head_dim(cfg))
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if "lm_head.weight" not in sd or cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    m.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.embed_tokens.weight
    return m.eval()
