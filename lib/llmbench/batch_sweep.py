"""Experiment 02: throughput and memory against batch size (powers of two up to a bound).

Running out of memory at a batch size is a result, not a crash: it is recorded, memory is freed, and
the sweep goes on. On the CPU a real out-of-memory kills the process (the kernel's OOM killer), so
there a batch predicted not to fit is recorded as such without being run.
"""
from . import costmodel as cm
from .device import empty_cache, free_memory, is_oom, torch_device
from .latency import generate_cost
from .measure import time_generate, with_peak_memory
from .session import add, row
from .workload import make_batch


def batches_up_to(max_batch: int) -> list[int]:
    return [2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch]


def available_bytes(ctx, info, memory_limit_gb: float) -> float:
    if memory_limit_gb > 0:
        return memory_limit_gb * 1e9 - info["weight_bytes"]
    return free_memory(ctx["kind"])


def run(ctx, model, info, max_batch, prompt_len, new_tokens, warmup, repeats, seed, memory_limit_gb=0.0):
    for b in batches_up_to(max_batch):
        one_batch(ctx, model, info, b, prompt_len, new_tokens, warmup, repeats, seed, memory_limit_gb)
    return ctx["rows"]


def one_batch(ctx, model, info, b, prompt_len, new_tokens, warmup, repeats, seed, memory_limit_gb=0.0):
    """Generate at batch b: latency, tokens/s, requests/s, peak memory; or a recorded out-of-memory."""
    cfg, kind, dt, wb = info["cfg"], ctx["kind"], ctx["params"]["dtype"], info["read_bytes"]
    ids, src = make_batch(b, prompt_len, cfg, seed, info["tokenizer"])
    ids = ids.to(torch_device(kind))
    common = dict(batch=b, prompt_len=prompt_len, new_tokens=new_tokens, tokens=src, **info["fields"])
    need = cm.footprint_bytes(cfg, 0, b, prompt_len + new_tokens, dt)
    avail = available_bytes(ctx, info, memory_limit_gb)
    if (kind == "cpu" or memory_limit_gb > 0) and need > avail:
        add(ctx, row(ctx, experiment="batch", metric="generate_latency", unit="s",
                     status=f"oom: predicted {need / 1e9:.2f} GB beyond the weights > {avail / 1e9:.2f} GB "
                            "available (not run)", **common))
        return
    try:
        samples, peak, label = with_peak_memory(
            lambda: time_generate(model, ids, new_tokens, kind, warmup, repeats), kind)
    except Exception as e:
        if not is_oom(e):
            raise
        del e
        empty_cache(kind)
        add(ctx, row(ctx, experiment="batch", metric="generate_latency", unit="s",
                     status="oom: out of memory while generating", **common))
        return
    flops, nbytes = generate_cost(cfg, wb, b, prompt_len, new_tokens, dt)
    add(ctx, [row(ctx, samples, flops=flops, nbytes=nbytes, compute_dtype=info.get("compute_dtype"),
                  experiment="batch", metric="generate_latency", unit="s",
                  note="per-request latency: every request of the batch finishes together", **common),
              row(ctx, [b * new_tokens / t for t in samples], experiment="batch", metric="tokens_per_s",
                  unit="tokens/s", note="generated tokens only", **common),
              row(ctx, [b / t for t in samples], experiment="batch", metric="requests_per_s", unit="requests/s",
                  **common),
              row(ctx, [peak], experiment="batch", metric="peak_memory", unit="bytes", note=label, **common)])
