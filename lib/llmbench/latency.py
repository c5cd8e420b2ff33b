"""Experiment 01: latency of one (model, weights, dtype, quant, device) at batch 1.

TTFT per prompt length, TPOT per context position (steps timed one by one), whole-generate latency
compared with TTFT + (n-1) x TPOT measured on the same prompt, and peak memory.
"""
from . import costmodel as cm
from .device import torch_device
from .measure import time_decode, time_generate, time_prefill, with_peak_memory
from .session import add, row
from .workload import make_batch


def _ids(ctx, info, batch, length, seed):
    ids, source = make_batch(batch, length, info["cfg"], seed, info["tokenizer"])
    return ids.to(torch_device(ctx["kind"])), source


def prefill(ctx, model, info, length, warmup, repeats, seed, batch=1):
    cfg, dt, wb = info["cfg"], ctx["params"]["dtype"], info["read_bytes"]
    ids, src = _ids(ctx, info, batch, length, seed)
    samples, peak, label = with_peak_memory(lambda: time_prefill(model, ids, ctx["kind"], warmup, repeats), ctx["kind"])
    common = dict(batch=batch, prompt_len=length, tokens=src, **info["fields"])
    return add(ctx, [row(ctx, samples, flops=cm.prefill_flops(cfg, batch, length),
                         nbytes=cm.prefill_bytes(cfg, wb, batch, length, dt), compute_dtype=info.get("compute_dtype"),
                         experiment="prefill", metric="ttft", unit="s", **common),
                     row(ctx, [peak], experiment="prefill", metric="peak_memory", unit="bytes", note=label, **common)])[0]


def decode(ctx, model, info, context, steps, warmup, repeats, seed, batch=1):
    cfg, dt, wb = info["cfg"], ctx["params"]["dtype"], info["read_bytes"]
    ids, src = _ids(ctx, info, batch, context, seed)
    samples, peak, label = with_peak_memory(
        lambda: time_decode(model, ids, ctx["kind"], steps=steps, warmup=warmup, repeats=repeats), ctx["kind"])
    mid = context + warmup + steps // 2  # the cache grows during the timed steps; cost at its middle
    common = dict(batch=batch, prompt_len=context, context_len=context + warmup, tokens=src, **info["fields"])
    return add(ctx, [row(ctx, samples, flops=cm.decode_flops(cfg, batch, mid), nbytes=cm.decode_bytes(cfg, wb, batch, mid, dt),
                         compute_dtype=info.get("compute_dtype"), experiment="decode", metric="tpot", unit="s",
                         note=f"{steps} steps after {warmup} warm-up steps", **common),
                     row(ctx, [peak], experiment="decode", metric="peak_memory", unit="bytes", note=label, **common)])[0]


def generate_cost(cfg, wb, batch, prompt_len, new_tokens, dtype):
    """FLOPs and bytes of prefill plus new_tokens - 1 decode steps."""
    steps = range(prompt_len, prompt_len + new_tokens - 1)
    flops = cm.prefill_flops(cfg, batch, prompt_len) + sum(cm.decode_flops(cfg, batch, c) for c in steps)
    nbytes = cm.prefill_bytes(cfg, wb, batch, prompt_len, dtype) + sum(cm.decode_bytes(cfg, wb, batch, c, dtype) for c in steps)
    return flops, nbytes


def generate(ctx, model, info, prompt_len, new_tokens, steps, warmup, repeats, seed):
    """Whole generate vs the sum of its parts, all measured here on the same prompt."""
    cfg, dt, wb = info["cfg"], ctx["params"]["dtype"], info["read_bytes"]
    ttft = prefill(ctx, model, info, prompt_len, warmup, repeats, seed)
    tpot = decode(ctx, model, info, prompt_len, steps, warmup, repeats, seed)
    ids, src = _ids(ctx, info, 1, prompt_len, seed)
    samples = time_generate(model, ids, new_tokens, ctx["kind"], warmup, repeats)
    predicted = ttft["median"] + (new_tokens - 1) * tpot["median"]
    flops, nbytes = generate_cost(cfg, wb, 1, prompt_len, new_tokens, dt)
    common = dict(batch=1, prompt_len=prompt_len, new_tokens=new_tokens, tokens=src, **info["fields"])
    add(ctx, [row(ctx, samples, flops=flops, nbytes=nbytes, experiment="generate", metric="generate_latency", unit="s",
                  note=f"TTFT + (n-1) x TPOT = {predicted:.4g} s", **common),
              row(ctx, [s - predicted for s in samples], experiment="generate", metric="generate_gap", unit="s",
                  note="generate latency minus (TTFT + (n-1) x TPOT): framework overhead not in the step timings",
                  **common)])


def run(ctx, model, info, prompt_lens, decode_contexts, decode_steps, gen_prompt_len, gen_new_tokens,
        warmup, repeats, seed):
    for length in prompt_lens:
        prefill(ctx, model, info, length, warmup, repeats, seed)
    for context in decode_contexts:
        decode(ctx, model, info, context, decode_steps, warmup, repeats, seed)
    for n in gen_new_tokens:
        generate(ctx, model, info, gen_prompt_len, n, min(decode_steps, max(n - 1, 1)), warmup, repeats, seed)
    return ctx["rows"]
