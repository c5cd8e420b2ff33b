import torch

from llmbench.model import inputs as workload
from llmbench.model.models import load_config


def test_corpus_is_chinese_mixed_and_long_tailed():
    prompts = workload.load_prompts()
    assert len(prompts) >= 40
    assert {p["task"] for p in prompts} == {"question", "summarization", "translation", "code", "dialogue"}
    lengths = [len(p["text"]) for p in prompts]
    assert min(lengths) < 30 and max(lengths) >= 3000
    cjk = sum(1 for p in prompts for ch in p["text"] if "\u4e00" <= ch <= "\u9fff")
    assert cjk > 5000


def test_synthetic_ids_have_exact_lengths_and_are_deterministic():
    cfg = load_config("llama-3.2-1b")
    a, src = workload.make_batch(3, 17, cfg, seed=4)
    b, _ = workload.make_batch(3, 17, cfg, seed=4)
    assert a.shape == (3, 17) and src == "synthetic-ids" and torch.equal(a, b)
    assert (a[:, 0] == 128000).all() and (a[:, 1:] < 128000).all()


def test_corpus_tokens_with_a_real_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator((p["text"] for p in workload.load_prompts()),
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "<s>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    cfg = load_config("tiny-1b")
    ids, src = workload.make_batch(2, 64, cfg, seed=0, tokenizer=hf)
    assert ids.shape == (2, 64) and src.startswith("corpus:") and not torch.equal(ids[0], ids[1])
    t = workload.tokens_per_char(hf)
    assert set(t) >= {"all", "question", "code"} and 0 < t["all"] < 3
