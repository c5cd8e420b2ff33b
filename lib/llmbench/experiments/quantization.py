"""Experiment 03: every quantization method of one model, speed and fidelity in the same records.

The unquantized model runs first: it is the speed baseline and the fidelity reference, on the same
inputs; a graph engine's unquantized model is also checked against transformers eager (greedy
tokens). Each method then starts from freshly loaded weights (same seed or files), so methods never
stack. An unsupported method is a recorded result with its reason.
"""
from llmbench import engines as engine
from llmbench.core.stats import ratio_of_medians, regroup
from llmbench.experiments import batch_sweep, latency
from llmbench.experiments.plans import QuantPlan
from llmbench.experiments.session import Session, add, config_fields, load, row
from llmbench.measure.fidelity import compare_logits, perplexity
from llmbench.model.inputs import make_batch
from llmbench.model.models import is_real
from llmbench.system.device import empty_cache, torch_device

SYNTHETIC_NOTE = ("synthetic weights: random weights have no outlier channels, so this is not the fidelity "
                  "of the real model")


def run(sess: Session, plan: QuantPlan) -> list[dict]:
    """Each method of the plan (none first), each from freshly loaded weights: fidelity, TTFT, TPOT, a batch run."""
    prompt_len, decode_steps, batch, new_tokens = plan.prompt_len, plan.decode_steps, plan.batch, plan.new_tokens
    fidelity_batch, fidelity_len = plan.fidelity_batch, plan.fidelity_len
    warmup, repeats, seed = plan.warmup, plan.repeats, plan.seed
    ref, base = None, {}
    # One cache fits every measurement of this notebook: the batch run, the timed prompt and the
    # fidelity inputs (llama.cpp's context cannot grow after load).
    seq = max(prompt_len + max(warmup, 1) + decode_steps, prompt_len + max(new_tokens, latency.AGREEMENT_STEPS),
              fidelity_len) + 1
    for method in ["none"] + [m for m in plan.methods if m != "none"]:
        e = load(sess, method, max_batch=max(batch, fidelity_batch, 1), max_seq=seq)
        if e is None:
            continue
        dev = torch_device(sess.kind)
        f = config_fields(e)
        fid_ids, src = make_batch(fidelity_batch, fidelity_len, e.cfg, seed + 1, e.tokenizer)
        logits = engine.logits(e, fid_ids.to(dev))
        note = SYNTHETIC_NOTE if e.weights == "synthetic" else f"{e.weights} weights"
        if method == "none":
            ref = logits
            latency.agreement(sess, e, prompt_len, latency.AGREEMENT_STEPS, seed)  # graph engines vs eager
        else:
            fid = compare_logits(ref, logits)
            add(sess, [row(sess, [fid[k]], experiment="fidelity", metric=k, unit=u, batch=fidelity_batch,
                          prompt_len=fidelity_len, tokens=src, note=note, **f)
                      for k, u in (("kl_mean", "nats"), ("kl_max", "nats"), ("top1_agreement", "share"),
                                   ("rel_logit_error", "ratio"))])
        if is_real(e.weights) and e.tokenizer is not None:
            ids, corpus = make_batch(1, fidelity_len * 4, e.cfg, 0, e.tokenizer)
            add(sess, row(sess, [perplexity(engine.logits(e, ids.to(dev)), ids)], experiment="fidelity",
                         metric="perplexity", unit="", tokens=corpus, **f))
        ttft = latency.prefill(sess, e, prompt_len, warmup, repeats, seed)
        tpot = latency.decode(sess, e, prompt_len, decode_steps, warmup, repeats, seed)
        batch_sweep.one_batch(sess, e, batch, prompt_len, new_tokens, warmup, repeats, seed, decode_steps=decode_steps,
                              timed_at_batch_1=(ttft, tpot))
        measured = {"ttft": ttft, "tpot": tpot}
        if method == "none":
            base = measured
        elif base:
            for k, r in measured.items():  # speed-up = baseline time / method time, with a bootstrap CI
                ratio, lo, hi = ratio_of_medians(regroup(r["samples"], r["sample_blocks"]),
                                                 regroup(base[k]["samples"], base[k]["sample_blocks"]))
                add(sess, row(sess, experiment="quant", metric=f"{k}_speedup_vs_none", unit="x", n=r["n"],
                             median=ratio, ci_low=lo, ci_high=hi, batch=1, prompt_len=prompt_len,
                             note=e.description, **f))
        del e, logits
        empty_cache(sess.kind)
    return sess.rows
