"""The report's tokenization section: what a Chinese character costs in tokens (Llama 3 against Qwen), the
figure, and latency per 1,000 characters."""
import numpy as np
import pandas as pd

from llmbench.core.errors import UserError
from llmbench.core.keys import CONFIG_KEYS
from llmbench.model import tokenizers as T
from llmbench.model.inputs import HAN_DOMINANT, KCHARS, is_cjk, load_prompts, overall, tokenization_table, tokens_per_char
from llmbench.report import figures as F


def per_kchars(df: pd.DataFrame, tpc: float) -> pd.DataFrame:
    """Batch-1 latency in units of text, from the measured records and tokens per character `tpc`.

    Per configuration (config.CONFIG_KEYS): prefill time per 1,000 prompt characters at the longest
    measured prompt (TTFT / (prompt_len / tpc)), and decode time for 1,000 generated characters
    (1,000 * tpc tokens at the median TPOT of the largest measured context). Rates, not predictions:
    beyond the longest prompt, attention makes prefill grow faster than linearly."""
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


def figure(table: pd.DataFrame, figures_dir):
    """Grouped bars: tokens per character per task, one bar per tokenizer, 95% CI whiskers."""
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
