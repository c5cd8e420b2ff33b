"""Experiment 03: every quantization method of one model, speed and fidelity in the same records.

The unquantized model runs first: it is the speed baseline and the fidelity reference, on the same
inputs. Each method then starts from freshly loaded weights (same seed or files), so methods never
stack. An unsupported method is a recorded result with its reason.
"""
from . import latency
from .device import empty_cache, torch_device
from .fidelity import all_logits, compare_logits, perplexity
from .quant import KERNELS
from .session import add, load, row
from .stats import ratio_of_medians
from .workload import make_batch

SYNTHETIC_NOTE = ("synthetic weights: random weights have no outlier channels, so this is not the fidelity "
                  "of the real model")


def _corpus_ids(info, length):
    return make_batch(1, length, info["cfg"], 0, info["tokenizer"])[0]


def run(ctx, methods, prompt_len, decode_steps, batch, new_tokens, fidelity_batch, fidelity_len,
        warmup, repeats, seed):
    from . import batch_sweep
    ref, base = None, {}
    for method in ["none"] + [m for m in methods if m != "none"]:
        model, info = load(ctx, method)
        if model is None:
            continue
        dev = torch_device(ctx["kind"])
        f = info["fields"]
        fid_ids, src = make_batch(fidelity_batch, fidelity_len, info["cfg"], seed + 1, info["tokenizer"])
        logits = all_logits(model, fid_ids.to(dev))
        note = SYNTHETIC_NOTE if info["weights"] == "synthetic" else "real weights"
        if method == "none":
            ref = logits
        else:
            fid = compare_logits(ref, logits)
            add(ctx, [row(ctx, [fid[k]], experiment="fidelity", metric=k, unit=u, batch=fidelity_batch,
                          prompt_len=fidelity_len, tokens=src, note=note, **f)
                      for k, u in (("kl_mean", "nats"), ("kl_max", "nats"), ("top1_agreement", "share"),
                                   ("rel_logit_error", "ratio"))])
        if info["tokenizer"] is not None:
            ppl = perplexity(model, _corpus_ids(info, fidelity_len * 4).to(dev))
            add(ctx, row(ctx, [ppl], experiment="fidelity", metric="perplexity", unit="", tokens="corpus", **f))
        ttft = latency.prefill(ctx, model, info, prompt_len, warmup, repeats, seed)
        tpot = latency.decode(ctx, model, info, prompt_len, decode_steps, warmup, repeats, seed)
        batch_sweep.one_batch(ctx, model, info, batch, prompt_len, new_tokens, warmup, repeats, seed)
        measured = {"ttft": ttft, "tpot": tpot}
        if method == "none":
            base = measured
        else:
            for k, r in measured.items():  # speed-up = baseline time / method time, with a bootstrap CI
                ratio, lo, hi = ratio_of_medians(r["samples"], base[k]["samples"])
                add(ctx, row(ctx, experiment="quant", metric=f"{k}_speedup_vs_none", unit="x", n=r["n"],
                             median=ratio, ci_low=lo, ci_high=hi, batch=1, prompt_len=prompt_len,
                             note=KERNELS.get((ctx["kind"], method)), **f))
        del model, logits
        empty_cache(ctx["kind"])
    return ctx["rows"]
