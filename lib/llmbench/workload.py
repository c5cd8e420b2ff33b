"""Inputs: batches of prompts with an exact number of tokens.

With a real tokenizer the tokens come from the Chinese prompt corpus (data/prompts/zh.jsonl); without
one (synthetic weights) they are deterministic random ids. Records say which, in the `tokens` column.
"""
import json

import torch

from . import paths


def load_prompts(path=None) -> list[dict]:
    """The corpus: one JSON object per line with id, task and text."""
    path = path or paths.PROMPTS
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _corpus_stream(tokenizer, prompts) -> list[int]:
    ids = []
    for p in prompts:
        ids.extend(tokenizer.encode(p["text"], add_special_tokens=False))
    return ids


def make_batch(batch: int, length: int, cfg, seed: int = 0, tokenizer=None) -> tuple[torch.Tensor, str]:
    """(LongTensor [batch, length], source). Row i starts at a different corpus offset (or seed)."""
    bos = cfg.bos_token_id if isinstance(cfg.bos_token_id, int) and cfg.bos_token_id < cfg.vocab_size else None
    body = length - (bos is not None)
    if tokenizer is not None:
        stream = _corpus_stream(tokenizer, load_prompts())
        step = max(1, len(stream) // max(batch, 1))
        rows = []
        for i in range(batch):
            start = (seed * 7919 + i * step) % len(stream)
            rows.append([stream[(start + j) % len(stream)] for j in range(body)])
        ids, source = torch.tensor(rows, dtype=torch.long), f"corpus:{paths.PROMPTS.name}"
    else:
        g = torch.Generator().manual_seed(seed)
        # Stay below the special-token range of the Llama 3 vocabulary (ids >= 128000).
        ids, source = torch.randint(0, min(cfg.vocab_size, 128000), (batch, body), generator=g), "synthetic-ids"
    if bos is not None:
        ids = torch.cat([torch.full((batch, 1), bos, dtype=torch.long), ids], dim=1)
    return ids, source


def tokens_per_char(tokenizer, prompts=None) -> dict:
    """Tokens per Chinese character over the corpus, per task and overall."""
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
