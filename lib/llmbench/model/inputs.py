"""Inputs: batches of prompts with an exact number of tokens, and what a Chinese character costs in tokens.

By default (`tokens="corpus"`) the ids are real: the Chinese prompt corpus (data/prompts/zh.jsonl)
through a real tokenizer (the one next to real weights, else Llama 3's from tokenizers.py). With
`tokens="random"` they are seeded random ids. Records say which, in the `tokens` column.
Prompt length in tokens is what costs time; tokens per character turns it into characters, so the
report can state latency per 1,000 Chinese characters and compare Llama 3's vocabulary with Qwen's.
"""
import json

import numpy as np
import pandas as pd
import torch

from . import paths
from .errors import UserError

TOKENS = ("corpus", "random")
KCHARS = 1000  # the report's unit of text: 1,000 characters
HAN_DOMINANT = 0.8  # a prompt at least this share Han characters counts as running Chinese text


def load_prompts(path=None) -> list[dict]:
    """The corpus: one JSON object per line with id, task and text."""
    path = path or paths.PROMPTS
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def corpus_stream(tokenizer, prompts=None) -> list[int]:
    """Every prompt's ids, concatenated in corpus order (no special tokens)."""
    ids = []
    for p in prompts or load_prompts():
        ids.extend(tokenizer.encode(p["text"], add_special_tokens=False))
    return ids


def source_label(tokenizer) -> str:
    """The `tokens` column: which corpus through which tokenizer, or synthetic-ids."""
    if tokenizer is None:
        return "synthetic-ids"
    from .tokenizers import label
    return f"corpus:{paths.PROMPTS.name} via {label(tokenizer)}"


def make_batch(batch: int, length: int, cfg, seed: int = 0, tokenizer=None) -> tuple[torch.Tensor, str]:
    """(LongTensor [batch, length], source). Row i starts at a different corpus offset (or seed)."""
    bos = cfg.bos_token_id if isinstance(cfg.bos_token_id, int) and cfg.bos_token_id < cfg.vocab_size else None
    body = length - (bos is not None)
    if tokenizer is not None:
        stream = corpus_stream(tokenizer)
        if max(stream) >= cfg.vocab_size:  # e.g. a tiny test model: its embedding cannot take these ids
            raise UserError(f"tokens='corpus': the tokenizer's ids reach {max(stream)} but the model's vocabulary "
                            f"has {cfg.vocab_size} entries; use tokens='random' for this model")
        step = max(1, len(stream) // max(batch, 1))
        rows = []
        for i in range(batch):
            start = (seed * 7919 + i * step) % len(stream)
            rows.append([stream[(start + j) % len(stream)] for j in range(body)])
        ids = torch.tensor(rows, dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(seed)
        # Stay below the special-token range of the Llama 3 vocabulary (ids >= 128000).
        ids = torch.randint(0, min(cfg.vocab_size, 128000), (batch, body), generator=g)
    if bos is not None:
        ids = torch.cat([torch.full((batch, 1), bos, dtype=torch.long), ids], dim=1)
    return ids, source_label(tokenizer)


# --- tokens per character ---------------------------------------------------------------------------

def is_cjk(ch: str) -> bool:
    """CJK Unified Ideographs and Extension A (the Han characters of modern Chinese text)."""
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def tokens_per_char(tokenizer, prompts=None) -> dict:
    """Tokens per character (every Unicode code point of the text) over the corpus, per task and overall."""
    prompts = prompts or load_prompts()
    by_task: dict[str, list[int]] = {}
    for p in prompts:
        n_tok = len(tokenizer.encode(p["text"], add_special_tokens=False))
        t = by_task.setdefault(p["task"], [0, 0])
        t[0] += n_tok
        t[1] += len(p["text"])
    out = {task: tok / chars for task, (tok, chars) in by_task.items()}
    out["all"] = sum(t for t, _ in by_task.values()) / sum(c for _, c in by_task.values())
    return out


def _ratio_ci(groups, n_boot: int, rng) -> tuple[float, float]:
    """95% bootstrap CI of sum(tokens) / sum(chars), resampling whole prompts within each group (task), so
    the corpus-wide figure keeps each task's share of the text."""
    if n_boot <= 0 or any(len(g) < 2 for g in groups):
        return float("nan"), float("nan")
    tok = chars = 0
    for g in groups:
        t, c = g.tokens.to_numpy(float), g.chars.to_numpy(float)
        i = rng.integers(0, len(g), size=(n_boot, len(g)))
        tok, chars = tok + t[i].sum(1), chars + c[i].sum(1)
    r = tok / chars
    return float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def tokenization_table(names=None, prompts=None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per tokenizer and task (and `all`): prompts, characters, share of Han characters, tokens,
    tokens per character with a bootstrap 95% CI over prompts, characters per token."""
    from . import tokenizers as T
    prompts = prompts or load_prompts()
    rng = np.random.default_rng(seed)
    rows = []
    for name in names or T.NAMES:
        tok = T.load(name)
        counts = pd.DataFrame({"task": [p["task"] for p in prompts],
                               "chars": [len(p["text"]) for p in prompts],
                               "han": [sum(map(is_cjk, p["text"])) for p in prompts],
                               "ascii": [sum(ch.isascii() for ch in p["text"]) for p in prompts],
                               "tokens": [len(tok.encode(p["text"])) for p in prompts]})
        tasks = list(counts.groupby("task", sort=True))
        for task, g, strata in [(t, g, [g]) for t, g in tasks] + [("all", counts, [g for _, g in tasks])]:
            lo, hi = _ratio_ci(strata, n_boot, rng)
            tpc = g.tokens.sum() / g.chars.sum()
            rows.append({"tokenizer": name, "vocabulary": tok.vocab_size, "source": tok.source, "task": task,
                         "prompts": len(g), "characters": int(g.chars.sum()), "han_share": g.han.sum() / g.chars.sum(),
                         "ascii_share": g.ascii.sum() / g.chars.sum(),
                         "tokens": int(g.tokens.sum()), "tokens_per_char": tpc, "ci_low": lo, "ci_high": hi,
                         "chars_per_token": 1 / tpc})
    return pd.DataFrame(rows)


def overall(table: pd.DataFrame, name: str) -> float:
    """Tokens per character of a tokenizer over the whole corpus."""
    return float(table[(table.tokenizer == name) & (table.task == "all")].tokens_per_char.iat[0])


# --- latency per 1,000 characters ---------------------------------------------------------------------

def per_kchars(df: pd.DataFrame, tpc: float) -> pd.DataFrame:
    """Batch-1 latency in units of text, from the measured records and tokens per character `tpc`.

    Per configuration (config.CONFIG_KEYS): prefill time per 1,000 prompt characters at the longest
    measured prompt (TTFT / (prompt_len / tpc)), and decode time for 1,000 generated characters
    (1,000 * tpc tokens at the median TPOT of the largest measured context). Rates, not predictions:
    beyond the longest prompt, attention makes prefill grow faster than linearly."""
    from .config import CONFIG_KEYS
    cols = ["model", "prompt_len", "TTFT (ms)", "TTFT per 1,000 chars (ms)", "context_len", "TPOT (ms)",
            "decode 1,000 chars (s)", "1,000 in + 1,000 out (s)"]
    if df is None or df.empty or "metric" not in df:
        return pd.DataFrame(columns=cols)
    d = df[(df.status == "ok") & (df.batch == 1)]
    keys = [k for k in CONFIG_KEYS if k in d.columns]
    ttft, tpot = d[d.metric == "ttft"], d[d.metric == "tpot"]
    rows = []
    for cfg, g in ttft.groupby(keys, dropna=False):
        length = g.prompt_len.max()
        t = g[g.prompt_len == length]["median"].median()  # several runs of one configuration: their median
        match = tpot
        for k, v in zip(keys, cfg):
            match = match[match[k].isna()] if pd.isna(v) else match[match[k] == v]
        ttft_per_k = t / (length / tpc) * KCHARS
        row = {**dict(zip(keys, cfg)), "prompt_len": int(length), "TTFT (ms)": t * 1e3,
               "TTFT per 1,000 chars (ms)": ttft_per_k * 1e3}
        if len(match):
            context = match.context_len.max()
            p = match[match.context_len == context]["median"].median()
            dec = p * KCHARS * tpc
            row.update({"context_len": int(context), "TPOT (ms)": p * 1e3,
                        "decode 1,000 chars (s)": dec, "1,000 in + 1,000 out (s)": ttft_per_k + dec})
        rows.append(row)
    out = pd.DataFrame(rows)
    const = [k for k in keys if k != "model" and out[k].nunique(dropna=False) <= 1] if len(out) else []
    return out.drop(columns=const).reset_index(drop=True) if len(out) else pd.DataFrame(columns=cols)


# --- the report section -------------------------------------------------------------------------------

def figure(table: pd.DataFrame, figures_dir):
    """Grouped bars: tokens per character per task, one bar per tokenizer, 95% CI whiskers."""
    from . import figures as F
    plt = F.plt
    names = list(dict.fromkeys(table.tokenizer))
    tasks = [t for t in dict.fromkeys(table.task) if t != "all"] + ["all"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(names)
    colors = ["#4c72b0", "#c44e52", "#55a868"]
    for j, name in enumerate(names):
        g = table[table.tokenizer == name].set_index("task").loc[tasks]
        x = np.arange(len(tasks)) + (j - (len(names) - 1) / 2) * width
        err = [(g.tokens_per_char - g.ci_low).clip(lower=0).fillna(0),
               (g.ci_high - g.tokens_per_char).clip(lower=0).fillna(0)]
        ax.bar(x, g.tokens_per_char, width, yerr=err, capsize=3, color=colors[j % len(colors)],
               label=f"{name} ({g.vocabulary.iat[0]:,} ids)")
    ax.set_xticks(np.arange(len(tasks)), [f"{t}\n{int(table[(table.task == t)].characters.iat[0]):,} chars"
                                          for t in tasks], fontsize=9)
    ax.set(ylabel="tokens per character", title="Chinese prompt corpus: tokens per character (95% CI over prompts)")
    ax.set_ylim(bottom=0)
    F.legend_below(fig, ax)
    tpc = table.set_index(["tokenizer", "task"]).tokens_per_char
    desc = "; ".join(f"{t}: " + ", ".join(f"{n} {tpc[n, t]:.2f}" for n in names) for t in tasks)
    alt = (f"Grouped bar chart of tokens per character on the project's Chinese prompt corpus, one bar per tokenizer "
           f"({', '.join(names)}) for each task and the whole corpus, with bootstrap 95% confidence whiskers. {desc}.")
    return F.save(fig, figures_dir, "tokens_per_char", alt)


def section(df: pd.DataFrame, figures_dir) -> tuple[str, pd.DataFrame, pd.DataFrame, object]:
    """(text, tokens-per-character table, latency-per-1,000-characters table, figure) of the report's
    "Chinese tokenization" section. Tokenizers that cannot be loaded here are named in the text."""
    from . import tokenizers as T
    names, missing = [], []
    for n in T.NAMES:
        try:
            T.load(n)
            names.append(n)
        except UserError as e:
            missing.append(f"{n}: {e}")
    if "llama3" not in names:
        return ("The Llama 3 tokenizer could not be loaded (" + "; ".join(missing) + "), so tokens per character were "
                "not measured.", pd.DataFrame(), pd.DataFrame(), None)
    table = tokenization_table(names)
    fig = figure(table, figures_dir)
    tpc = overall(table, "llama3")
    c = table[(table.tokenizer == "llama3") & (table.task == "all")].iloc[0]
    llama = T.load("llama3")
    text = (f"Token counts of the project's Chinese prompt corpus (`data/prompts/zh.jsonl`: {c.prompts} prompts, "
            f"{c.characters:,} characters: {c.han_share:.0%} Han characters, {c.ascii_share:.0%} ASCII (Latin "
            f"letters, digits, code, spaces), {1 - c.han_share - c.ascii_share:.0%} other). Llama 3's tokenizer "
            f"(the one Llama 3.2 uses; {llama.vocab_size:,} ids, from {llama.source}) needs "
            f"**{tpc:.3f} tokens per character** ({1 / tpc:.2f} characters per token).")
    if "qwen" in names:
        q, vq, vl = overall(table, "qwen"), T.load("qwen").vocab_size, T.load("llama3").vocab_size
        fewer = "fewer" if q < tpc else "more"
        text += (f" Qwen's tokenizer ({vq:,} ids, from {T.load('qwen').source}) needs **{q:.3f}** "
                 f"({1 / q:.2f} characters per token): {abs(1 - q / tpc):.0%} {fewer} tokens for the same text, so "
                 f"{abs(1 - q / tpc):.0%} {fewer} prefill tokens, decode steps and KV-cache entries per character, "
                 f"with a vocabulary {abs(vq / vl - 1):.0%} {'larger' if vq > vl else 'smaller'} (embedding and LM "
                 "head grow with it: weight bytes and FLOPs per token).")
    lt = table[(table.tokenizer == "llama3") & (table.task != "all")].set_index("task")
    lo, hi = lt.tokens_per_char.idxmin(), lt.tokens_per_char.idxmax()
    text += (f" Per task, Llama 3 needs from {lt.tokens_per_char[lo]:.2f} tokens per character ({lo}, "
             f"{lt.han_share[lo]:.0%} Han characters) to {lt.tokens_per_char[hi]:.2f} ({hi}, "
             f"{lt.han_share[hi]:.0%} Han characters).")
    han = [p for p in load_prompts() if sum(map(is_cjk, p["text"])) >= HAN_DOMINANT * len(p["text"])]
    if han:
        n_chars = sum(len(p["text"]) for p in han)
        text += (f" On the {len(han)} prompts that are at least {HAN_DOMINANT:.0%} Han characters ({n_chars:,} "
                 "characters): " + ", ".join(f"{n} {tokens_per_char(T.load(n), han)['all']:.3f}" for n in names)
                 + " tokens per character.")
    wide = [f"{r.task} ({r.ci_low:.2f}–{r.ci_high:.2f})" for r in table[table.tokenizer == "llama3"].itertuples()
            if r.ci_high - r.ci_low > 0.2 * r.tokens_per_char]
    text += (" The 95% CIs resample whole prompts within each task" +
             (f"; they are widest, for Llama 3, for {', '.join(wide)}, whose prompts differ most from one another."
              if wide else "."))
    if missing:
        text += " Not loaded: " + "; ".join(missing) + "."
    lat = per_kchars(df, tpc)
    if len(lat) and "TTFT per 1,000 chars (ms)" in lat:
        text += (f"\n\nMeasured latency in units of Chinese text, at {tpc:.3f} Llama 3 tokens per character: the "
                 "prefill rate at the longest measured prompt (TTFT per 1,000 characters of prompt) and the time to "
                 f"generate 1,000 characters ({KCHARS * tpc:.0f} tokens) at the batch-1 TPOT of the largest measured "
                 "context. These are rates from measured points: beyond the longest measured prompt, attention "
                 "makes prefill grow faster than linearly.")
    else:
        text += "\n\nNo batch-1 TTFT records: latency per 1,000 characters is not shown."
    show = table.assign(**{"tokens/char": table.tokens_per_char.map(lambda x: f"{x:.3f}"),
                           "95% CI": [f"{a:.3f}–{b:.3f}" if np.isfinite(a) else ""
                                      for a, b in zip(table.ci_low, table.ci_high)],
                           "chars/token": table.chars_per_token.map(lambda x: f"{x:.2f}"),
                           "Han share": table.han_share.map(lambda x: f"{x:.0%}")})
    show = show[["tokenizer", "vocabulary", "task", "prompts", "characters", "Han share", "tokens", "tokens/char",
                 "95% CI", "chars/token"]]
    return text, show, lat, fig


# --- the seed's vocabulary claim ---------------------------------------------------------------------

def vocabulary_claim(claim, ctx) -> dict:
    """Claim: a Chinese-optimized (larger) vocabulary leaves compute efficiency about the same.

    Derived for each architecture: forward FLOPs per Chinese character = 2N FLOPs per token (N with the
    vocabulary's embedding/LM head) x measured tokens per character, with Qwen's vocabulary against
    Llama 3's. 'Similar' is the claim's range of that ratio (data/claims.yaml)."""
    from . import costmodel as cm
    from . import tokenizers as T
    from .models import load_config
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
