"""Experiment 01: latency of one configuration (model, weights, dtype, quant, engine, device) at batch 1.

TTFT per prompt length, TPOT per context position (steps timed one by one), whole-generate latency
compared with TTFT + (n-1) x TPOT measured on the same prompt, and peak memory. Only the engine
interface is called, so every engine is measured by the same code.
"""
import torch

from llmbench import engines as engine
from llmbench.experiments.plans import LatencyPlan
from llmbench.experiments.session import Session, add, add_compile_times, config_fields, row
from llmbench.measure.timing import time_decode, time_generate, time_prefill, watched
from llmbench.model import costmodel as cm
from llmbench.model.inputs import make_batch
from llmbench.system import energy, noise
from llmbench.system.device import torch_device

AGREEMENT_STEPS = 16  # greedy steps an engine is compared with transformers eager on the same weights


def ids_for(sess: Session, e, batch, length, seed):
    ids, source = make_batch(batch, length, e.cfg, seed, e.tokenizer)
    return ids.to(torch_device(sess.kind)), source


def read_ceiling(sess: Session) -> float | None:
    """The run's measured read bandwidth (B/s): what the memory canary of each watched window is held to."""
    return (sess.ceilings or {}).get("bandwidth")


def recompile_status(n: int) -> str:
    """A compilation inside timed calls means the samples timed a compiler: never report them as ok."""
    return "ok" if n == 0 else f"error: {n} compilation(s) during the timed calls (samples include compile time)"


def prefill(sess: Session, e, length, warmup, repeats, seed, batch=1):
    ids, src = ids_for(sess, e, batch, length, seed)
    (samples, recompiles), peak, label, cond = watched(
        lambda: time_prefill(e, ids, sess.kind, warmup, repeats), e, sess.kind, read_ceiling(sess))
    common = dict(batch=batch, prompt_len=length, tokens=src, **config_fields(e))
    add_compile_times(sess, e)
    return add(sess, [row(sess, samples, flops=cm.prefill_flops(e.cfg, batch, length),
                         nbytes=cm.prefill_bytes(e.cfg, e.read_bytes, batch, length, e.dtype),
                         compute_dtype=e.compute_dtype, experiment="prefill", metric="ttft", unit="s",
                         status=recompile_status(recompiles), **noise.fields(cond), **common),
                     row(sess, [peak], experiment="prefill", metric="peak_memory", unit="bytes", note=label, **common)])[0]


def decode(sess: Session, e, context, steps, warmup, repeats, seed, batch=1):
    ids, src = ids_for(sess, e, batch, context, seed)
    (blocks, recompiles), peak, label, cond = watched(
        lambda: time_decode(e, ids, sess.kind, steps=steps, warmup=warmup, repeats=repeats), e, sess.kind, read_ceiling(sess))
    mid = context + warmup + steps // 2  # the cache grows during the timed steps; cost at its middle
    common = dict(batch=batch, prompt_len=context, context_len=context + warmup, tokens=src, **config_fields(e))
    add_compile_times(sess, e)
    return add(sess, [row(sess, blocks, flops=cm.decode_flops(e.cfg, batch, mid),
                         nbytes=cm.decode_bytes(e.cfg, e.read_bytes, batch, mid, e.dtype),
                         compute_dtype=e.compute_dtype, experiment="decode", metric="tpot", unit="s",
                         status=recompile_status(recompiles), **noise.fields(cond),
                         note=f"{repeats} repeats x {steps} steps after {warmup} warm-up steps", **common),
                     row(sess, [peak], experiment="decode", metric="peak_memory", unit="bytes", note=label, **common)])[0]


def generate_cost(cfg, wb, batch, prompt_len, new_tokens, dtype):
    """FLOPs and bytes of prefill plus new_tokens - 1 decode steps."""
    steps = range(prompt_len, prompt_len + new_tokens - 1)
    flops = cm.prefill_flops(cfg, batch, prompt_len) + sum(cm.decode_flops(cfg, batch, c) for c in steps)
    nbytes = cm.prefill_bytes(cfg, wb, batch, prompt_len, dtype) + sum(cm.decode_bytes(cfg, wb, batch, c, dtype) for c in steps)
    return flops, nbytes


def generate(sess: Session, e, prompt_len, new_tokens, steps, warmup, repeats, seed, ttft=None, tpot=None):
    """Whole generate vs the sum of its parts, all measured on the same prompt: TTFT and TPOT are
    measured here unless the caller passes its own rows of this prompt (same length, seed and steps)."""
    ttft = ttft or prefill(sess, e, prompt_len, warmup, repeats, seed)
    tpot = tpot or decode(sess, e, prompt_len, steps, warmup, repeats, seed)
    ids, src = ids_for(sess, e, 1, prompt_len, seed)
    (samples, recompiles), _, _, cond = watched(
        lambda: time_generate(e, ids, new_tokens, sess.kind, warmup, repeats), e, sess.kind, read_ceiling(sess))
    predicted = ttft["median"] + (new_tokens - 1) * tpot["median"]
    flops, nbytes = generate_cost(e.cfg, e.read_bytes, 1, prompt_len, new_tokens, e.dtype)
    common = dict(batch=1, prompt_len=prompt_len, new_tokens=new_tokens, tokens=src, **config_fields(e))
    add(sess, [row(sess, samples, flops=flops, nbytes=nbytes, compute_dtype=e.compute_dtype, experiment="generate",
                  metric="generate_latency", unit="s", status=recompile_status(recompiles), **noise.fields(cond),
                  predicted_s=predicted, note=f"TTFT + (n-1) x TPOT = {predicted:.4g} s", **common),
              row(sess, [s - predicted for s in samples], experiment="generate", metric="generate_gap", unit="s",
                  note="generate latency minus (TTFT + (n-1) x TPOT): framework overhead not in the step timings",
                  **common)])
    # Energy over a window of whole generates (several seconds; "unsupported: why" where unreadable).
    add(sess, [row(sess, **f, **common) for f in energy.measure_rows(
        sess.kind, lambda: engine.generate(e, ids, new_tokens), new_tokens, 1, sess.idle_watts)])


def agreement(sess: Session, e, prompt_len, new_tokens, seed):
    """Greedy tokens and logits of this engine against HF eager on the very same weight tensors (the
    compiled engine keeps that reference when unquantized): leading steps with identical tokens; the
    max relative logit error of the compiled decode graph itself, fed eager's greedy tokens step by step
    (teacher forcing, so every step compares the same inputs); and, where the tokens diverge, how close
    eager's top two logits were there: a flip at a gap below the logit error is a rounding-size tie."""
    eager = engine.reference(e)
    if eager is None:
        return
    ids, src = ids_for(sess, e, 1, prompt_len, seed)
    a, b = engine.generate(eager, ids, new_tokens).cpu(), engine.generate(e, ids, new_tokens).cpu()
    la = engine.logits(eager, a.to(ids.device))[0, prompt_len:-1]  # eager's logits after each fed token
    lb = _graph_logits(e, a.to(ids.device), prompt_len)
    same = int((a[0, prompt_len:] == b[0, prompt_len:]).long().cumprod(0).sum())
    scale = la.abs().max(-1).values
    err = (la - lb).abs().max(-1).values / scale                # per step
    common = dict(batch=1, prompt_len=prompt_len, new_tokens=new_tokens, tokens=src, **config_fields(e))
    rows = [row(sess, [same], experiment="agreement", metric="greedy_steps_equal", unit="tokens",
                note=f"leading greedy tokens equal to transformers eager on the same weights, of {new_tokens}", **common),
            row(sess, [float(err.max())], experiment="agreement", metric="graph_rel_logit_error", unit="ratio",
                note="max |logits - eager logits| / max |eager logits| over the decode steps of the compiled graph, "
                     "fed eager's greedy tokens", **common)]
    if 1 <= same < new_tokens:  # the first token comes from prefill; step `same` is the first that differs
        top2 = la[same - 1].topk(2).values
        at = dict(experiment="agreement", unit="ratio", **common)
        rows += [row(sess, [float((top2[0] - top2[1]) / scale[same - 1])], metric="top2_gap_at_divergence",
                     note="eager's (top-1 - top-2 logit) / max |logit| at the first differing step", **at),
                 row(sess, [float(err[same - 1])], metric="logit_error_at_divergence",
                     note="the graph's max relative logit error at that step", **at)]
    add(sess, rows)
    add_compile_times(sess, e)


@torch.inference_mode()  # its tokens inference tensors like decode's: any other kind recompiles the step
def _graph_logits(e, seq, prompt_len: int):
    """The compiled decode graph's logits [steps, vocab] after each of seq's tokens from prompt_len on."""
    state, _ = engine.prefill(e, seq[:, :prompt_len])
    out = []
    for t in range(prompt_len, seq.shape[1] - 1):
        # a fresh [batch, 1] token as decode's own: a column sliced from seq has other strides, and the
        # compiled step would be compiled again for them
        token = seq[:, t:t + 1].clone(memory_format=torch.contiguous_format)
        state, lg = engine.decode_logits(e, state, token)
        out.append(lg[0].float().cpu())
    return torch.stack(out)


def max_seq(plan: LatencyPlan) -> int:
    """The longest sequence this experiment builds: what a static KV cache must hold."""
    return max(max(plan.prompt_lens), max(plan.decode_contexts) + max(plan.warmup, 1) + plan.decode_steps,
               plan.gen_prompt_len + max(*plan.gen_new_tokens, AGREEMENT_STEPS)) + 1


def run(sess: Session, e, plan: LatencyPlan) -> list[dict]:
    w, r, seed = plan.warmup, plan.repeats, plan.seed
    agreement(sess, e, plan.gen_prompt_len, AGREEMENT_STEPS, seed)
    ttft = {length: prefill(sess, e, length, w, r, seed) for length in plan.prompt_lens}
    tpot = {context: decode(sess, e, context, plan.decode_steps, w, r, seed) for context in plan.decode_contexts}
    for n in plan.gen_new_tokens:
        steps = min(plan.decode_steps, max(n - 1, 1))
        # a prompt length also timed above is not timed again (same ids: same length and seed)
        generate(sess, e, plan.gen_prompt_len, n, steps, w, r, seed, ttft.get(plan.gen_prompt_len),
                 tpot.get(plan.gen_prompt_len) if steps == plan.decode_steps else None)
    return sess.rows
