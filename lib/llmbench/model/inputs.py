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

from llmbench.core import paths
from llmbench.core.errors import UserError
from llmbench.model import tokenizers as T
from llmbench.model.tokenizers import label

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


# --- the report section -------------------------------------------------------------------------------


# --- the seed's vocabulary claim ---------------------------------------------------------------------

