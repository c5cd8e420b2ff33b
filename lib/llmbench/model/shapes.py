"""Shapes every layer of the model code derives from a config (a leaf: imports nothing of ours)."""


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
