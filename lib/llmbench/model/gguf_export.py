"""GGUF files for llama.cpp, written from exactly the weights the torch engines run.

The source is the HF LlamaForCausalLM that models.load_model(name, weights, dtype, "cpu", seed)
returns: the same seeded synthetic values, or the user's safetensors. Tensors are renamed and laid
out as llama.cpp's convert_hf_to_gguf.py does for LlamaForCausalLM (conversion/llama.py):
  - q_proj / k_proj rows are permuted: HF rotates the two halves of each head (rotate_half), llama.cpp's
    LLAMA arch rotates adjacent pairs, so `permute` interleaves the halves;
  - llama3 rope scaling becomes a `rope_freqs` tensor of per-frequency divisors (generate_extra_tensors);
  - a tied LM head is not written: llama.cpp then uses token_embd as the output matrix;
  - 1-D tensors (norms, rope_freqs) stay F32 in every file type, as convert does.
No tokenizer goes in: the study feeds token ids. Every file carries llama.cpp's test vocabulary (one entry
per id, its text the id in hex), so llama-server can turn each generated token into a text piece to stream
(with tokenizer model "none" it aborts on the first one) and every token is one complete piece; the
in-process engine, which reads logits, loads the same file, so a model and type is exported once.
Files are cached in data/cache/gguf/, keyed by model, weights, seed, source dtype and type; a file is
written under a temporary name and renamed, so a killed export leaves nothing half-written.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmbench.core import paths
from llmbench.model import models
from llmbench.model.gguf_import import resolve
from llmbench.model.models import head_dim, load_model
from llmbench.model.rope import rope_freqs

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}  # gguf.LlamaFileType
CACHE = paths.DATA / "cache" / "gguf"
CHUNK_ROWS = 4096  # quantize this many rows at a time: bounded memory on a 128256-row embedding


@dataclass
class GgufFile:
    path: Path
    gguf_type: str
    tensor_bytes: dict          # GGUF tensor name -> bytes stored
    export_s: float             # 0.0 when it came from the cache
    cached: bool


def weights_key(weights: str, seed: int) -> str:
    """Synthetic weights are named by their seed and generator; real ones by path, size and mtime of every safetensors file."""
    if weights == "synthetic":  # keyed by the generator's code too: a changed generator never reuses a stale file
        import inspect
        code = inspect.getsource(models.synthetic_model) + inspect.getsource(models._fill_synthetic)
        return f"synthetic-seed{seed}-{hashlib.sha256(code.encode()).hexdigest()[:8]}"
    p = resolve(weights) or Path(weights).expanduser()  # a GGUF source is named by its own file
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.suffix == ".gguf" else []
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return "real-" + hashlib.sha256(json.dumps([str(p.resolve()) if p.is_dir() else weights, stamp]).encode()).hexdigest()[:12]


def cache_path(model: str, weights: str, seed: int, src_dtype: str, gguf_type: str) -> Path:
    # "-vtest": the vocabulary it carries (files of older versions without one are never reused)
    return CACHE / f"{model}-{weights_key(weights, seed)}-{src_dtype}-{gguf_type}-vtest.gguf"


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, interleave the two rotate_half halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str | None:
    """HF LlamaForCausalLM parameter name -> llama.cpp tensor name (None: not written)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")  # model.layers.{i}.{module}.{proj}.weight
    if parts[:2] != ["model", "layers"]:
        return None
    i, rest = parts[2], ".".join(parts[3:])
    per_layer = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
                 "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                 "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
                 "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    return f"blk.{i}.{per_layer[rest]}.weight" if rest in per_layer else None


def tensors(model, cfg):
    """(gguf name, torch tensor in llama.cpp's layout) for every tensor the file holds, in file order."""
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf, t in model.state_dict().items():
        name = gguf_name(hf)
        if name is None or (tied and name == "output.weight"):
            continue
        t = t.detach()
        if name.endswith("attn_q.weight"):
            t = permute(t, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = permute(t, cfg.num_key_value_heads)
        yield name, t
    rf = rope_freqs(cfg)
    if rf is not None:
        yield "rope_freqs.weight", torch.from_numpy(rf)


def tensor_type(t: torch.Tensor, gguf_type: str) -> str:
    return "F32" if t.dim() == 1 else gguf_type


def encode(t: torch.Tensor, ttype: str) -> np.ndarray:
    """The bytes llama.cpp reads for one tensor of this type (quantized a chunk of rows at a time)."""
    import gguf
    if ttype == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if ttype == "F16":
        return t.to(torch.float16).contiguous().numpy()
    if ttype == "BF16":  # no numpy bfloat16: the raw 16-bit words
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    qtype = gguf.GGMLQuantizationType[ttype]
    rows = t.reshape(-1, t.shape[-1])
    row_bytes = gguf.quant_shape_to_byte_shape((t.shape[-1],), qtype)[0]
    out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
    for r in range(0, rows.shape[0], CHUNK_ROWS):
        out[r:r + CHUNK_ROWS] = gguf.quants.quantize(rows[r:r + CHUNK_ROWS].to(torch.float32).numpy(), qtype)
    return out


def nbytes(shape, ttype: str) -> int:
    import gguf
    n = math.prod(shape)
    if ttype in ("F32",):
        return 4 * n
    if ttype in ("F16", "BF16"):
        return 2 * n
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ttype]]
    return n // block * size


def write(model, cfg, name: str, gguf_type: str, path: Path) -> dict:
    """Stream the model into one GGUF file: header and tensor table first, then one tensor at a time."""
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim(cfg))
    w.add_value_length(head_dim(cfg))
    w.add_rope_dimension_count(head_dim(cfg))
    rs = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rs.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPE[gguf_type])
    if gguf_type in ("Q8_0", "Q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("test")  # llama.cpp's LLAMA_VOCAB_TYPE_TEST: token id -> its hex text, no special tokens
    w.add_token_list([f"{i:x}" for i in range(cfg.vocab_size)])

    plan = [(n, t, tensor_type(t, gguf_type)) for n, t in tensors(model, cfg)]
    sizes = {}
    for n, t, tt in plan:
        sizes[n] = nbytes(t.shape, tt)
        w.add_tensor_info(n, tuple(t.shape), np.dtype(np.float32), sizes[n], raw_dtype=gguf.GGMLQuantizationType[tt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n, t, tt in plan:
        w.write_tensor_data(encode(t, tt))
    w.close()
    return sizes


def source_dtype(gguf_type: str, dtype: str) -> str:
    """The torch dtype the weights are loaded in: the one whose values the file then holds exactly."""
    return {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(gguf_type, dtype)


def export(model_name: str, weights: str, seed: int, gguf_type: str, dtype: str = "fp32") -> GgufFile:
    """The cached GGUF of (model, weights, seed, type), written first if missing.

    F32/F16/BF16 hold the weights load_model gives in fp32/fp16/bf16; Q8_0/Q4_0 quantize the weights
    load_model gives in `dtype` (the torch engines quantize from the same ones)."""
    if gguf_type not in TYPES:
        raise ValueError(f"gguf type {gguf_type!r} is not one of {', '.join(TYPES)}")
    src = source_dtype(gguf_type, dtype)
    path = cache_path(model_name, weights, seed, src, gguf_type)
    sizes_file = path.with_suffix(".json")
    if path.exists() and sizes_file.exists():
        return GgufFile(path, gguf_type, json.loads(sizes_file.read_text()), 0.0, True)
    t0 = time.perf_counter()
    model, _ = load_model(model_name, weights, src, "cpu", seed)
    cfg = model.config  # the loaded weights' own config (real weights were checked against the name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad():
            sizes = write(model, cfg, model_name, gguf_type, tmp)
        sizes_file.write_text(json.dumps(sizes))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    del model
    return GgufFile(path, gguf_type, sizes, time.perf_counter() - t0, False)
