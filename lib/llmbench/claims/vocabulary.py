"""The seed's vocabulary claim (a larger Chinese vocabulary costs less compute per character) checked against
the tokenizers' measured tokens per character and the cost model."""
from llmbench.core.errors import UserError
from llmbench.model import costmodel as cm
from llmbench.model import tokenizers as T
from llmbench.model.inputs import overall, tokenization_table
from llmbench.model.models import load_config


def vocabulary_claim(claim, ctx) -> dict:
    """Claim: a Chinese-optimized (larger) vocabulary leaves compute efficiency about the same.

    Derived for each architecture: forward FLOPs per Chinese character = 2N FLOPs per token (N with the
    vocabulary's embedding/LM head) x measured tokens per character, with Qwen's vocabulary against
    Llama 3's. 'Similar' is the claim's range of that ratio (data/claims.yaml)."""
    lo, hi = claim["range"]
    try:
        table = tokenization_table(("llama3", "qwen"), n_boot=0)
    except UserError as e:
        return {"value": "", "verdict": f"not testable: needs both tokenizers ({e})", "basis": "", "why": ""}
    tpc = {n: overall(table, n) for n in ("llama3", "qwen")}
    vocab = {n: T.load(n).vocab_size for n in ("llama3", "qwen")}
    parts, ratios = [], []
    for model in claim.get("models", ("llama-3.2-1b", "llama-3.2-3b")):
        cfg = load_config(model)
        per_tok = {}
        for n in ("llama3", "qwen"):
            cfg.vocab_size = vocab[n]
            per_tok[n] = cm.flops_per_token(cfg)
        r = (per_tok["qwen"] * tpc["qwen"]) / (per_tok["llama3"] * tpc["llama3"])
        ratios.append(r)
        parts.append(f"{model}: FLOPs/token x{per_tok['qwen'] / per_tok['llama3']:.3f}, FLOPs per character x{r:.3f}")
    value = (f"vocabulary {vocab['llama3']:,} -> {vocab['qwen']:,} ids; tokens per character "
             f"{tpc['llama3']:.3f} -> {tpc['qwen']:.3f}; " + "; ".join(parts))
    larger = vocab["qwen"] > vocab["llama3"]
    ok = larger and all(lo <= r <= hi for r in ratios)
    why = "" if ok else ("the Chinese-optimized vocabulary is not the larger one" if not larger else
                         f"FLOPs per character change by {min(ratios) - 1:+.0%} to {max(ratios) - 1:+.0%}, outside "
                         f"{lo - 1:+.0%} to {hi - 1:+.0%}: tokens per character change by "
                         f"{tpc['qwen'] / tpc['llama3'] - 1:+.0%}")
    return {"value": value, "verdict": "supported" if ok else "contradicted",
            "basis": "measured (tokens per character on data/prompts/zh.jsonl) and derived (2N on the exact configs)",
            "why": why}
