"""Experiment 02: throughput and memory against batch size (BatchPlan.batches: 1, 2, 4, ... up to a bound).

Per batch: prefill tokens/s and decode tokens/s from timed prefill and decode steps (as llama-bench's
pp and tg), and a whole generate's latency, tokens/s and requests/s. Running out of memory at a batch
size is a result, not a crash: it is recorded, memory is freed, and the sweep goes on. On the CPU a
real out-of-memory kills the process (the kernel's OOM killer), so there a batch predicted not to fit
is recorded without being run, and the largest batch that fits is predicted from the cost model's
footprint; on accelerators it is tried (short prefill + decode steps, doubling until out of memory).
"""
from llmbench import engines as engine
from llmbench.core.stats import regroup
from llmbench.experiments.latency import generate_cost, ids_for, read_ceiling, recompile_status
from llmbench.experiments.plans import BatchPlan
from llmbench.experiments.session import Session, add, add_compile_times, config_fields, row
from llmbench.measure.timing import time_decode, time_generate, time_prefill, watched
from llmbench.model import costmodel as cm
from llmbench.system import energy, noise
from llmbench.system.device import empty_cache, free_memory, is_oom

SEARCH_LIMIT = 4096  # never try batches beyond this when searching for the largest one


def available_bytes(sess: Session, e, memory_limit_gb: float) -> float:
    if memory_limit_gb > 0:
        return memory_limit_gb * 1e9 - e.weight_bytes
    return free_memory(sess.kind)


def predicted_largest_batch(e, tokens: int, available: float) -> int:
    """The largest power-of-two batch whose predicted footprint beyond the weights fits in `available`."""
    b = 0
    while 2 * max(b, 1) <= SEARCH_LIMIT and cm.footprint_bytes(e.cfg, 0, max(2 * b, 1), tokens, e.dtype) <= available:
        b = max(2 * b, 1)
    return b


def run(sess: Session, e, plan: BatchPlan) -> list[dict]:
    for b in plan.batches():
        one_batch(sess, e, b, plan.prompt_len, plan.new_tokens, plan.warmup, plan.repeats, plan.seed,
                  plan.memory_limit_gb, plan.decode_steps)
    largest(sess, e, plan.max_batch, plan.prompt_len, plan.new_tokens, plan.seed, plan.memory_limit_gb)
    return sess.rows


def _oom_row(sess: Session, common, status):
    add(sess, row(sess, experiment="batch", metric="generate_latency", unit="s", status=status, **common))


def _timed_rows(r: dict) -> tuple:
    """(samples by repeat, status, conditions) of a TTFT or TPOT row of latency.prefill/decode."""
    return regroup(r["samples"], r.get("sample_blocks")), r["status"], {k: r.get(k) for k in noise.FIELDS}


def one_batch(sess: Session, e, b, prompt_len, new_tokens, warmup, repeats, seed, memory_limit_gb=0.0, decode_steps=4,
              timed_at_batch_1=None):
    """Batch b: prefill and decode tokens/s, generate latency, tokens/s, requests/s, peak memory; or OOM.
    timed_at_batch_1: (TTFT row, TPOT row) that latency.prefill/decode just measured on this very prompt
    at batch 1 with these steps: their samples serve instead of timing the same calls twice."""
    kind, ceil = sess.kind, read_ceiling(sess)  # the memory canary of every window is held to the read ceiling
    ids, src = ids_for(sess, e, b, prompt_len, seed)
    common = dict(batch=b, prompt_len=prompt_len, new_tokens=new_tokens, tokens=src, **config_fields(e))
    need = cm.footprint_bytes(e.cfg, 0, b, prompt_len + new_tokens, e.dtype)
    avail = available_bytes(sess, e, memory_limit_gb)
    if (kind == "cpu" or memory_limit_gb > 0) and need > avail:
        _oom_row(sess, common, f"oom: predicted {need / 1e9:.2f} GB beyond the weights > {avail / 1e9:.2f} GB "
                              "available (not run)")
        return
    try:
        if timed_at_batch_1 and b == 1:
            (pre, pre_st, pre_c), (blocks, dec_st, dec_c) = map(_timed_rows, timed_at_batch_1)
        else:
            (pre, pre_rc), _, _, pre_c = watched(lambda: time_prefill(e, ids, kind, warmup, repeats), e, kind, ceil)
            (blocks, dec_rc), _, _, dec_c = watched(
                lambda: time_decode(e, ids, kind, steps=decode_steps, warmup=warmup, repeats=repeats), e, kind, ceil)
            pre_st, dec_st = recompile_status(pre_rc), recompile_status(dec_rc)
            pre_c, dec_c = noise.fields(pre_c), noise.fields(dec_c)
        (gen, gen_rc), peak, label, gen_c = watched(
            lambda: time_generate(e, ids, new_tokens, kind, warmup, repeats), e, kind, ceil)
    except Exception as exc:
        if not is_oom(exc):
            raise
        del exc
        empty_cache(kind)
        _oom_row(sess, common, "oom: out of memory while generating")
        return
    add_compile_times(sess, e)
    flops, nbytes = generate_cost(e.cfg, e.read_bytes, b, prompt_len, new_tokens, e.dtype)
    ctx_mid = prompt_len + warmup + decode_steps // 2
    add(sess, [row(sess, pre, flops=cm.prefill_flops(e.cfg, b, prompt_len),
                  nbytes=cm.prefill_bytes(e.cfg, e.read_bytes, b, prompt_len, e.dtype), compute_dtype=e.compute_dtype,
                  experiment="batch", metric="prefill_time", unit="s", status=pre_st, **pre_c, **common),
              row(sess, [b * prompt_len / t for t in pre], experiment="batch", metric="prefill_tokens_per_s",
                  unit="tokens/s", status=pre_st, note="prompt tokens processed per second", **common),
              row(sess, blocks, flops=cm.decode_flops(e.cfg, b, ctx_mid), nbytes=cm.decode_bytes(e.cfg, e.read_bytes, b, ctx_mid, e.dtype),
                  compute_dtype=e.compute_dtype, experiment="batch", metric="decode_step_time", unit="s",
                  status=dec_st, **dec_c, **common),
              row(sess, [[b / t for t in blk] for blk in blocks], experiment="batch", metric="decode_tokens_per_s",
                  unit="tokens/s", status=dec_st, note="one new token per sequence per step", **common),
              row(sess, gen, flops=flops, nbytes=nbytes, compute_dtype=e.compute_dtype,
                  experiment="batch", metric="generate_latency", unit="s", status=recompile_status(gen_rc),
                  note="per-request latency: every request of the batch finishes together", **noise.fields(gen_c),
                  **common),
              row(sess, [b * new_tokens / t for t in gen], experiment="batch", metric="tokens_per_s",
                  unit="tokens/s", status=recompile_status(gen_rc), note="generated tokens only (prefill included in the time)",
                  **common),
              row(sess, [b / t for t in gen], experiment="batch", metric="requests_per_s", unit="requests/s",
                  status=recompile_status(gen_rc), **common),
              row(sess, [peak], experiment="batch", metric="peak_memory", unit="bytes", note=label, **common)])
    # Energy over a window of whole generates at this batch ("unsupported: why" where unreadable).
    add(sess, [row(sess, **f, **common) for f in energy.measure_rows(
        kind, lambda: engine.generate(e, ids, new_tokens), b * new_tokens, b, sess.idle_watts)])


def largest(sess: Session, e, max_batch, prompt_len, new_tokens, seed, memory_limit_gb=0.0):
    """The largest feasible batch: predicted on the CPU (an OOM there kills the process), tried on
    accelerators by doubling past the grid's max_batch until a prefill + one decode step runs out."""
    kind, tokens = sess.kind, prompt_len + new_tokens
    common = dict(prompt_len=prompt_len, new_tokens=new_tokens, **config_fields(e))
    avail = available_bytes(sess, e, memory_limit_gb)
    pred = predicted_largest_batch(e, tokens, avail)
    add(sess, row(sess, [pred], experiment="batch", metric="largest_batch_predicted", unit="sequences",
                 note=f"cost-model footprint of {tokens} tokens per sequence within {avail / 1e9:.2f} GB available "
                      "beyond the weights", **common))
    if kind == "cpu" or memory_limit_gb > 0:
        return
    b, ok = max_batch, max_batch
    while b < SEARCH_LIMIT:
        b *= 2
        try:
            ids = ids_for(sess, e, b, prompt_len, seed)[0]
            time_decode(e, ids, kind, steps=1, warmup=1, repeats=1)
            ok = b
        except Exception as exc:
            if not is_oom(exc):
                raise
            del exc
            break
        finally:
            empty_cache(kind)
    add(sess, row(sess, [ok], experiment="batch", metric="largest_batch_tried", unit="sequences",
                 note=f"doubling from {max_batch}: batch {ok} ran a prefill and a decode step"
                      + (f", {b} ran out of memory" if b > ok else f"; stopped at the search limit {SEARCH_LIMIT}"),
                 **common))
