"""Engine `eager`: Hugging Face transformers in eager mode with its growing DynamicCache.

What a user gets from plain transformers: every decode step dispatches each operator from Python, so
on accelerators small models measure mostly dispatch. Loading and quantization live here and are
shared with the compiled engine (`build`), so both run exactly the same weights. On Ascend the task
queue mode (asynchronous dispatch) is the load request's, set at load and read back for the record.
"""
import functools
import inspect
import time

import torch

from llmbench.core.errors import Unsupported
from llmbench.engines import Engine, LoadRequest, greedy
from llmbench.model.models import load_config, load_model, load_tokenizer
from llmbench.model.quant import methods as quant
from llmbench.model.quant.methods import streamed_weight_bytes, weight_bytes
from llmbench.system.device import set_task_queue, synchronize, usable_dtypes


def build(req: LoadRequest, name: str, convert=None, quantize=None) -> Engine:
    """Load weights, convert them to the engine's module (sharing tensors), quantize (quant.quantize unless
    the engine brings its own kernels: quantize(model, req) -> (replaced names, kernel description)); no compile."""
    why = usable_dtypes(req.kind)[req.dtype]
    if why:
        raise Unsupported(f"dtype {req.dtype} on {req.kind}: {why}")
    model, info = load_model(req.model, req.weights, req.dtype, req.kind, req.seed)
    if convert is not None:
        model = convert(model)
    t0 = time.perf_counter()
    if quantize is None:
        replaced = quant.quantize(model, req.quant, req.kind, req.dtype)  # raises Unsupported with the reason
        kernel = quant.KERNELS.get((req.kind, req.quant), "") if req.quant != "none" else f"{req.dtype} matmuls"
    else:
        replaced, kernel = quantize(model, req)
    layouts = sorted({m.layout for m in model.modules() if getattr(m, "layout", "")})  # e.g. 310P TransData
    kernel += "".join(f"; {x}" for x in layouts)
    synchronize(req.kind)
    return Engine(
        name=name, model=model, cfg=load_config(req.model), kind=req.kind, dtype=req.dtype, quant=req.quant,
        # w8a8 multiplies int8 by int8: its compute ceiling is the int8 one; the others dequantize to dtype.
        compute_dtype="int8" if req.quant == "w8a8" else req.dtype,
        weight_bytes=weight_bytes(model), read_bytes=streamed_weight_bytes(model),
        weights=info["weights"], weights_source=info["weights_source"],
        tokenizer=load_tokenizer(req.weights, req.tokens), load_s=info["load_s"],
        quantize_s=time.perf_counter() - t0, description=kernel, replaced=replaced,
        max_batch=req.max_batch, max_seq=req.max_seq)


def load(req: LoadRequest) -> Engine:
    e = build(req, "eager")
    tq = ""
    if req.kind == "npu":
        tq = f"; task queue mode {set_task_queue(req.task_queue)} (torch.npu.get_task_queue_enable)"
    e.description = f"transformers {_version()} eager, DynamicCache{tq}; {e.description}"
    return e


def _version() -> str:
    import transformers
    return transformers.__version__


@functools.cache
def cache_name(model_type: type) -> str:
    """The KV cache's keyword and output field in this transformers release. Newer releases call it `cache`
    (5.24 still takes `past_key_values` with a deprecation warning, until 5.40); 5.17, the oldest release
    pyproject.toml allows, knows only `past_key_values`. Asked of the signature, not the version number,
    since the release that renamed it is not one this project has run."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _forward(e: Engine, ids, cache=None):
    name = cache_name(type(e.model))
    out = e.model(input_ids=ids, **{name: cache}, use_cache=True, logits_to_keep=1)
    return getattr(out, name), greedy(out.logits[:, -1])


@torch.inference_mode()
def prefill(e: Engine, ids):
    return _forward(e, ids)


@torch.inference_mode()
def decode(e: Engine, state, token):
    return _forward(e, token, state)


@torch.inference_mode()
def generate(e: Engine, ids, n: int):
    """Greedy generation of exactly n tokens (EOS cannot stop it early)."""
    out = e.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + n, "generate stopped early"
    return out


@torch.inference_mode()
def logits(e: Engine, ids):
    return e.model(input_ids=ids, use_cache=False).logits.float().cpu()


def release(e: Engine, state) -> None:
    del state  # the DynamicCache is freed with its last reference

