"""Timing loops, nanoGPT-bench style: warm up, synchronize, measure each unit, keep every sample.

- prefill (TTFT): one forward over the prompt plus the argmax that yields the first token;
- decode (TPOT): single-token steps timed one by one on top of a filled KV cache;
- generate: a whole `model.generate` call, to compare with TTFT + (n-1) x TPOT.
Every shape that is timed is also run untimed first: accelerators compile per shape on first use.
"""
import torch

from .device import peak_memory, reset_peak_memory, timed


def forward_step(model, ids, cache=None):
    """One forward: returns (cache, next token ids [batch, 1]). Only the last position's logits."""
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def time_prefill(model, ids, kind: str, warmup: int = 1, repeats: int = 3) -> list[float]:
    for _ in range(warmup):
        forward_step(model, ids)
    return [timed(lambda: forward_step(model, ids), kind)[1] for _ in range(repeats)]


@torch.inference_mode()
def time_decode(model, ids, kind: str, steps: int = 8, warmup: int = 2, repeats: int = 1) -> list[float]:
    """Per-token decode latency with ids.shape[1] + warmup tokens already in the cache."""
    samples = []
    for _ in range(repeats):
        cache, tok = forward_step(model, ids)
        for i in range(warmup + steps):
            (cache, tok), t = timed(lambda: forward_step(model, tok, cache), kind)
            if i >= warmup:
                samples.append(t)
        del cache
    return samples


def generate(model, ids, new_tokens: int):
    """Greedy generation of exactly new_tokens tokens (EOS cannot stop it early)."""
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


@torch.inference_mode()
def time_generate(model, ids, new_tokens: int, kind: str, warmup: int = 1, repeats: int = 3) -> list[float]:
    for _ in range(warmup):
        out = generate(model, ids, new_tokens)
        assert out.shape[1] == ids.shape[1] + new_tokens, "generate stopped early"
    return [timed(lambda: generate(model, ids, new_tokens), kind)[1] for _ in range(repeats)]


def with_peak_memory(fn, kind: str):
    """(fn(), peak bytes, what the peak measures) with the peak window opened just before fn."""
    reset_peak_memory(kind)
    out = fn()
    peak, label = peak_memory(kind)
    return out, peak, label
