"""The shipped Llama 3 and Qwen tokenizers: sizes, special ids, known encodings, tokens per character."""
import base64
import hashlib
import importlib.metadata as md
import importlib.util
import sys
import types

import pandas as pd
import pytest
import torch

from llmbench.model import tokenizers as T
from llmbench.model import inputs as W
from llmbench.core.errors import UserError
from llmbench.model.models import load_config, load_tokenizer
from llmbench.claims.vocabulary import vocabulary_claim
from llmbench.report import vocabulary

# Published encodings, independent of this code:
# - llama-models' own test (llama_models/llama3/tests/api/test_tokenizer.py): "This is a test sentence."
# - llama.cpp's tokenizer test vectors, written by the reference (Hugging Face) tokenizers:
#   models/ggml-vocab-llama-bpe.gguf.{inp,out} (Llama 3) and models/ggml-vocab-qwen2.gguf.{inp,out} (Qwen2,
#   whose BPE ranks, pattern and NFC step are Qwen's).
MIXED = "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～"
KNOWN = {
    "llama3": {
        MIXED: [9906, 11, 379, 65948, 0, 2650, 527, 499, 27623, 223, 949, 37046, 101067, 19000, 23182, 102301, 9263,
                18136, 16, 36827, 21909],
        "ied 4 ½ months": [1142, 220, 19, 220, 27154, 4038],
        "нещо на Български": [79862, 102118, 13373, 64571, 34694, 3114, 112203, 80112],
        "   Hello\n    Hello": [256, 22691, 198, 262, 22691],
        "333333333": [8765, 8765, 8765],
    },
    "qwen": {
        MIXED: [9707, 11, 379, 64848, 0, 2585, 525, 498, 26525, 223, 937, 104100, 18493, 22377, 99257, 16, 18, 16, 19,
                16, 20, 16, 35727, 21216],
        "ied 4 ½ months": [1122, 220, 19, 220, 26062, 3951],
        "Hello, world!": [9707, 11, 1879, 0],
        "333333333": [18] * 9,
    },
}


@pytest.fixture(scope="module")
def llama():
    return T.load("llama3")


@pytest.fixture(scope="module")
def qwen():
    return T.load("qwen")


@pytest.fixture(scope="module")
def table():
    return W.tokenization_table(n_boot=500)


def test_llama3_vocabulary_and_special_ids(llama):
    assert llama.vocab_size == 128_256 and llama.n_base == 128_000
    s = llama.special
    assert (s["<|begin_of_text|>"], s["<|end_of_text|>"]) == (128_000, 128_001)
    assert (s["<|start_header_id|>"], s["<|end_header_id|>"], s["<|eom_id|>"], s["<|eot_id|>"]) == (128_006, 128_007,
                                                                                                     128_008, 128_009)
    # numbering of llama-models' llama3/tokenizer.py (12 named, then reserved 2..245 up to the last id)
    assert (s["<|python_tag|>"], s["<|image|>"], s["<|reserved_special_token_245|>"]) == (128_010, 128_011, 128_255)
    assert llama.bos_token_id == 128_000
    assert llama.source.startswith("llama_models 0.3.0: llama_models/llama3/tokenizer.model")


def test_qwen_vocabulary_and_special_ids(qwen):
    assert qwen.vocab_size == 151_851 and qwen.n_base == 151_643
    assert [qwen.special[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>")] == \
        [151_643, 151_644, 151_645, 151_850]
    assert qwen.bos_token_id is None


@pytest.mark.parametrize("name", ["llama3", "qwen"])
def test_published_encodings(name):
    tok = T.load(name)
    for text, ids in KNOWN[name].items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text


def test_llama3_english_with_bos_matches_meta_test(llama):
    assert llama.encode("This is a test sentence.", add_special_tokens=True) == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert llama.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]


def test_special_token_text_is_plain_text(llama, qwen):
    assert 128_000 not in llama.encode("<|begin_of_text|>你好")
    assert 151_643 not in qwen.encode("<|endoftext|>你好")


def test_qwen_normalizes_nfc_and_llama3_does_not(llama, qwen):
    composed, decomposed = "café", "cafe\u0301"
    assert qwen.encode(composed) == qwen.encode(decomposed)
    assert llama.encode(composed) != llama.encode(decomposed)


def test_whole_corpus_matches_meta_tokenizer_class(llama):
    """Meta's own Llama 3 Tokenizer (llama_models.llama3.tokenizer, its tiktoken definition) on every prompt."""
    meta = pytest.importorskip("llama_models.llama3.tokenizer").Tokenizer.get_instance()
    for p in W.load_prompts():
        assert llama.encode(p["text"]) == meta.encode(p["text"], bos=False, eos=False), p["id"]


def test_whole_corpus_matches_dashscope_qwen_tokenizer(qwen):
    """dashscope's QwenTokenizer, loaded from its files without dashscope/__init__ (its network stack)."""
    folder = md.distribution("dashscope").locate_file("dashscope/tokenizers")
    pkg = types.ModuleType("_ds_tok")
    pkg.__path__ = [str(folder)]
    sys.modules["_ds_tok"] = pkg
    for name in ("tokenizer_base", "qwen_tokenizer"):
        spec = importlib.util.spec_from_file_location(f"_ds_tok.{name}", folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    ref = mod.QwenTokenizer(str(md.distribution("dashscope").locate_file("dashscope/resources/qwen.tiktoken")))
    for p in W.load_prompts():
        assert qwen.encode(p["text"]) == ref.encode(p["text"]), p["id"]


class _FakeDist:
    def __init__(self, path, data_hash):
        self.path, self.version, self.metadata = path, "9.9", {"Name": "fakepkg"}
        entry = md.PackagePath("pkg/tok.tiktoken")
        entry.hash = md.FileHash(f"sha256={data_hash}")
        self.files = [entry]

    def locate_file(self, f):
        return self.path


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_shipped_file_is_checked_against_record_hash(tmp_path, monkeypatch):
    spec = T.Spec(package="fakepkg", file="pkg/tok.tiktoken", pattern=".", special=(), bos=None, nfc=False)
    f = tmp_path / "tok.tiktoken"
    f.write_bytes(b"YQ== 0\nYg== 1\n")
    monkeypatch.setattr(md, "distribution", lambda name: _FakeDist(f, _b64(f.read_bytes())))
    data, source = T._shipped_file(spec)
    assert T.parse_ranks(data) == {b"a": 0, b"b": 1} and source == "fakepkg 9.9: pkg/tok.tiktoken"
    monkeypatch.setattr(md, "distribution", lambda name: _FakeDist(f, _b64(b"something else")))
    with pytest.raises(UserError, match="does not match"):
        T._shipped_file(spec)


def test_missing_package_is_one_clear_error(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(UserError, match="llama_models package .* is not installed"):
        T._shipped_file(T.SPECS["llama3"])
    with pytest.raises(UserError, match="unknown tokenizer 'gpt2'; valid: llama3, qwen"):
        T.load("gpt2")


def test_tokens_per_char_per_task(table, llama, qwen):
    tasks = {p["task"] for p in W.load_prompts()}
    for name, tok in (("llama3", llama), ("qwen", qwen)):
        t = table[table.tokenizer == name].set_index("task")
        assert set(t.index) == tasks | {"all"}
        direct = W.tokens_per_char(tok)
        for task in tasks | {"all"}:
            assert t.tokens_per_char[task] == pytest.approx(direct[task])
            assert t.ci_low[task] <= t.tokens_per_char[task] <= t.ci_high[task]
            assert 0.2 < t.tokens_per_char[task] < 1.5
        assert t.tokens.drop("all").sum() == t.tokens["all"] and t.characters.drop("all").sum() == t.characters["all"]
    # the same text, a vocabulary with more Chinese merges: fewer tokens on every Han-dominated task
    for task in table[(table.tokenizer == "llama3") & (table.han_share > 0.8)].task:
        pick = table[table.task == task].set_index("tokenizer").tokens_per_char
        assert pick["qwen"] < pick["llama3"], task


def test_every_task_has_enough_text_for_a_figure(table):
    t = table[(table.tokenizer == "llama3") & (table.task != "all")]
    assert (t.prompts >= 7).all() and (t.characters >= 1500).all(), t[["task", "prompts", "characters"]]


def test_make_batch_uses_corpus_ids_and_names_the_tokenizer(llama):
    cfg = load_config("llama-3.2-1b")
    ids, src = W.make_batch(2, 48, cfg, seed=0, tokenizer=llama)
    assert ids.shape == (2, 48) and src == "corpus:zh.jsonl via llama3 (llama_models 0.3.0)"
    assert (ids[:, 0] == 128_000).all() and not torch.equal(ids[0], ids[1])
    stream = W.corpus_stream(llama)
    row = ids[0, 1:].tolist()
    assert any(stream[i:i + len(row)] == row for i in range(len(stream) - len(row)))


def test_corpus_ids_refused_for_a_model_with_a_smaller_vocabulary(llama):
    with pytest.raises(UserError, match="vocabulary has 512 entries; use tokens='random'"):
        W.make_batch(1, 16, load_config("tiny-1b"), tokenizer=llama)


def test_load_tokenizer_rules(llama):
    assert load_tokenizer("synthetic") is llama and load_tokenizer("synthetic", "corpus") is llama
    assert load_tokenizer("synthetic", "random") is None
    with pytest.raises(UserError, match="unknown tokens 'ids'; valid: corpus, random"):
        load_tokenizer("synthetic", "ids")


def test_tokens_parameter_is_validated():
    from llmbench.experiments.params import check_value
    check_value("01_latency", "tokens", "random")
    with pytest.raises(UserError, match="unknown value 'real'; valid: corpus, random"):
        check_value("01_latency", "tokens", "real")


def _latency_records():
    rows = []
    for m, k in (("llama-3.2-1b", 1.0), ("llama-3.2-3b", 2.5)):
        common = dict(model=m, weights="synthetic", dtype="fp32", quant="none", engine="eager", device="cpu",
                      tokens="t", batch=1, status="ok")
        rows += [dict(common, metric="ttft", prompt_len=L, median=k * 1e-3 * L) for L in (16, 64, 256)]
        rows += [dict(common, metric="tpot", context_len=c, median=k * (0.1 + c * 1e-4)) for c in (16, 256)]
    rows.append(dict(rows[0], batch=4, metric="ttft", prompt_len=1024, median=9.0))  # batch 4: not used
    return pd.DataFrame(rows)


def test_latency_per_thousand_characters():
    out = vocabulary.per_kchars(_latency_records(), tpc=0.5).set_index("model")
    one, three = out.loc["llama-3.2-1b"], out.loc["llama-3.2-3b"]
    assert one.prompt_len == 256 and one["TTFT per 1,000 chars (ms)"] == pytest.approx(256e-3 / 512 * 1000 * 1e3)
    assert one.context_len == 256 and one["decode 1,000 chars (s)"] == pytest.approx(500 * (0.1 + 0.0256))
    assert three["decode 1,000 chars (s)"] / one["decode 1,000 chars (s)"] == pytest.approx(2.5)
    assert "engine" not in out.columns  # one engine only: not a column
    assert vocabulary.per_kchars(pd.DataFrame(), 0.5).empty


def test_report_section_text_table_and_figure(tmp_path, table):
    text, shown, lat, fig = vocabulary.section(_latency_records(), tmp_path)
    l, q = W.overall(table, "llama3"), W.overall(table, "qwen")
    assert f"**{l:.3f} tokens per character**" in text and f"**{q:.3f}**" in text and "151,851 ids" in text
    assert set(shown.tokenizer) == {"llama3", "qwen"} and len(lat) == 2
    assert fig.path.is_file() and (tmp_path / "tokens_per_char.svg").is_file()
    assert "tokens per character" in fig.alt and f"all: llama3 {l:.2f}, qwen {q:.2f}" in fig.alt


def test_vocabulary_claim_can_go_either_way():
    from llmbench.claims import CHECKS, load_claims
    claim = next(c for c in load_claims() if c["check"] == "vocabulary_claim")
    assert CHECKS["vocabulary_claim"] is vocabulary_claim
    res = vocabulary_claim(claim, {})
    assert "128,256 -> 151,851" in res["value"] and res["verdict"] in ("supported", "contradicted")
    wide = vocabulary_claim({**claim, "range": [0.01, 100]}, {})
    empty = vocabulary_claim({**claim, "range": [100, 200]}, {})
    assert (wide["verdict"], empty["verdict"]) == ("supported", "contradicted") and empty["why"]


def test_loading_reads_only_the_shipped_file(monkeypatch):
    """No network and no tiktoken cache: fetching or caching helpers and sockets all fail here."""
    import socket

    import tiktoken.load

    def refuse(*a, **k):
        raise AssertionError("tokenizer loading tried to fetch or cache a file")
    for name in ("read_file", "read_file_cached", "load_tiktoken_bpe"):
        monkeypatch.setattr(tiktoken.load, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for name in T.NAMES:
        tok = T.load.__wrapped__(name)  # bypass the per-process cache: really load
        assert tok.decode(tok.encode("推理速度")) == "推理速度"
