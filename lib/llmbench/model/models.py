"""Models by name: published configs in data/models/, exact counts, and weights (real or synthetic).

Real weights come from a local directory or a hub id already in the local cache, safetensors only,
never with trust_remote_code. Synthetic weights have the exact architecture, are deterministic per
seed, and are drawn at the scale of the published init (uniform with std = initializer_range), so
no NaN or denormals. Timing does not depend on weight values; quality numbers do.
"""
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from llmbench.core import paths
from llmbench.core.errors import UserError, check_choice
from llmbench.model import gguf_import
from llmbench.model.gguf_import import NAMES  # trained models shipped as GGUF: their config is the file's metadata
from llmbench.model.inputs import TOKENS
from llmbench.model.shapes import head_dim
from llmbench.model.tokenizers import load
from llmbench.system.device import DTYPE_BYTES, DTYPES, torch_device
from llmbench.system.device import synchronize

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_names() -> list[str]:
    return sorted([p.stem for p in paths.MODELS.glob("*.json")] + list(NAMES))


def config_dict(name: str) -> dict:
    check_choice("model", name, model_names())
    if name in gguf_import.NAMES:
        return gguf_import.config_dict(gguf_import.shipped_path(name))
    return json.loads((paths.MODELS / f"{name}.json").read_text())


def load_config(name: str):
    from transformers import LlamaConfig
    d = {k: v for k, v in config_dict(name).items() if not k.startswith("_")}
    return LlamaConfig(**d)


def layer_linear_params(cfg) -> int:
    """Weights of one decoder layer that take part in matmuls (q, k, v, o, gate, up, down)."""
    d, hd = cfg.hidden_size, head_dim(cfg)
    q = d * cfg.num_attention_heads * hd
    kv = 2 * d * cfg.num_key_value_heads * hd
    return 2 * q + kv + 3 * d * cfg.intermediate_size


def count_params(cfg) -> dict:
    """Exact parameter counts from the config, without allocating any weight."""
    d = cfg.hidden_size
    embedding = cfg.vocab_size * d
    per_layer = layer_linear_params(cfg) + 2 * d  # two RMSNorm weights
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    total = embedding + cfg.num_hidden_layers * per_layer + d + lm_head
    return {"total": total, "embedding": embedding, "per_layer": per_layer, "lm_head_untied": lm_head,
            "matmul_per_token": cfg.num_hidden_layers * layer_linear_params(cfg) + cfg.vocab_size * d}


def kv_bytes_per_token(cfg, dtype: str) -> int:
    """K and V for every layer and KV head, one token."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * DTYPE_BYTES[dtype]


def describe_model(name: str) -> dict:
    cfg = load_config(name)
    c = count_params(cfg)
    return {"model": name, "params_total": c["total"], "params_embedding": c["embedding"],
            "embedding_share": c["embedding"] / c["total"], "params_per_layer": c["per_layer"],
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "head_dim": head_dim(cfg), "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            **{f"kv_bytes_per_token_{dt}": kv_bytes_per_token(cfg, dt) for dt in DTYPES}}


def _fill_synthetic(model, cfg, seed: int) -> None:
    """Deterministic per (seed, parameter name), independent of thread scheduling."""
    a = cfg.initializer_range * math.sqrt(3.0)  # uniform(-a, a) has std = initializer_range
    params = [(n, p) for n, p in model.named_parameters()]

    def fill(i):
        name, p = params[i]
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)  # RMSNorm gains start at one
            return
        g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + i)
        if p.dtype == torch.float32:
            p.data.uniform_(-a, a, generator=g)
        else:  # drawn in fp32 and rounded: every dtype holds the same model, so they can be compared
            p.data.copy_(torch.empty(p.shape, dtype=torch.float32, device=p.device).uniform_(-a, a, generator=g))

    # uniform_ on one tensor runs on one core; filling tensors side by side uses them all.
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(fill, range(len(params))))


def synthetic_model(name: str, dtype: str, device: str, seed: int = 0):
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights
    cfg = load_config(name)
    cfg.dtype = DTYPES[dtype]
    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # allocate once, in the target dtype, on the target device
    try:
        with torch.device(torch_device(device)), no_init_weights():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.tie_weights()
    _fill_synthetic(model, cfg, seed)
    return model.eval()


def check_weights_path(weights: str) -> str:
    """'synthetic', a GGUF (shipped name or *.gguf file), an existing directory with *.safetensors, or a hub id;
    else a clear error."""
    if weights == "synthetic" or gguf_import.resolve(weights) is not None:
        return weights
    p = Path(weights).expanduser()
    if p.is_dir():
        if not any(p.glob("*.safetensors")):
            found = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
            raise UserError(f"weights directory {str(p)!r} has no *.safetensors file (found: {found}); "
                            "only safetensors weights are loaded - convert pytorch_model.bin first")
        return str(p)
    if p.exists():
        raise UserError(f"weights {str(p)!r} is a file; give a *.gguf file or the directory that holds config.json "
                        "and *.safetensors")
    if HUB_ID.match(weights) and not weights.startswith((".", "/", "~")):
        return weights
    raise UserError(f"weights {weights!r} does not exist; valid: 'synthetic', {', '.join(gguf_import.NAMES)} (a "
                    "shipped GGUF), a Llama *.gguf file, a local directory with config.json and *.safetensors, "
                    "or a hub id (org/name) already in the local cache")


def weights_label(weights: str) -> str:
    """The records' `weights`: synthetic, real, or real (dequantized from <GGUF type>)."""
    if weights == "synthetic":
        return weights
    g = gguf_import.resolve(weights)
    return gguf_import.weights_label(g) if g is not None else "real"


def is_real(label) -> bool:
    """True for trained weights, whatever rounding they went through (a `weights` value of the records)."""
    return str(label).startswith("real")


def _matches(cfg, expected) -> list[str]:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return [f"{k}={getattr(cfg, k)} (expected {getattr(expected, k)})" for k in keys
            if getattr(cfg, k) != getattr(expected, k)]


def pretrained_model(name: str, weights: str, dtype: str, device: str):
    """Load real weights. Offline: a hub id must already be in the local cache."""
    from transformers import AutoConfig, AutoModelForCausalLM
    src = check_weights_path(weights)
    g = gguf_import.resolve(src)
    if g is not None:  # the named architecture, filled from the file (whose own config must match it)
        cfg = load_config(name)
        wrong = gguf_import.mismatches(g, cfg)
        if wrong:
            raise UserError(f"weights {weights!r} do not have the architecture of {name}: {', '.join(wrong)}")
        return gguf_import.hf_model(g, cfg, DTYPES[dtype], torch_device(device))
    try:
        cfg = AutoConfig.from_pretrained(src, trust_remote_code=False, local_files_only=True)
    except OSError as e:
        raise UserError(f"cannot read a config for weights {weights!r} offline: {str(e).splitlines()[0]}")
    wrong = _matches(cfg, load_config(name))
    if wrong:
        raise UserError(f"weights {weights!r} do not have the architecture of {name}: {', '.join(wrong)}")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], use_safetensors=True,
                                                 trust_remote_code=False, local_files_only=True)
    return model.to(torch_device(device)).eval()


def load_tokenizer(weights: str, tokens: str = "corpus"):
    """The tokenizer that turns the Chinese corpus into input ids, or None for seeded random ids.

    tokens="random": None. tokens="corpus": the tokenizer shipped next to real weights; else (synthetic
    weights, or real ones without a tokenizer) Llama 3's, the one Llama 3.2 uses, from the installed
    llama-models package (tokenizers.py). workload.make_batch records which one in `tokens`."""
    check_choice("tokens", tokens, TOKENS)
    if tokens == "random":
        return None
    g = gguf_import.resolve(weights) if weights != "synthetic" else None
    if g is not None:  # the file's own tokenizer; one it cannot build is an error, never Llama 3's by default
        return gguf_import.tokenizer(g)
    if weights != "synthetic":
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(check_weights_path(weights), trust_remote_code=False,
                                                 local_files_only=True)
        except (OSError, ValueError):
            pass  # no tokenizer files next to these weights: Llama 3's, named in the records
    return load("llama3")


def load_model(name: str, weights: str = "synthetic", dtype: str = "fp32", device: str = "cpu", seed: int = 0):
    """(model, info) where info says which weights were used and how long loading took."""
    check_choice("model", name, model_names())
    t0 = time.perf_counter()
    if weights == "synthetic":
        model = synthetic_model(name, dtype, device, seed)
    else:
        model = pretrained_model(name, weights, dtype, device)
    synchronize(device)
    return model, {"weights": weights_label(weights), "weights_source": weights,
                   "seed": seed if weights == "synthetic" else None, "load_s": time.perf_counter() - t0}
