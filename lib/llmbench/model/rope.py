"""llama3 rope scaling as the per-frequency divisors llama.cpp stores in a GGUF (rope_freqs.weight): written by
gguf_export, checked by gguf_import."""
import math

import numpy as np
import torch

from llmbench.model.shapes import head_dim


def rope_freqs(cfg) -> np.ndarray | None:
    """llama3 rope scaling as llama.cpp's rope_freqs tensor: the divisor of each base frequency."""
    rs = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    if (rs.get("rope_type") or rs.get("type") or "").lower() != "llama3":
        return None
    base = rs.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    dim = head_dim(cfg)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
