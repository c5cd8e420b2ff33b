"""engine: llamacpp - llama.cpp as a peer engine, through llama-cpp-python's low-level C API.

The model is a GGUF written by gguf_export from the same weights the torch engines load. Which GGUF
type stands for which (dtype, quant) of this study, and what it really computes:
  quant none    fp32 -> F32, fp16 -> F16, bf16 -> BF16   weights and matmul inputs in that type
  quant w8a8    Q8_0 on cpu and cuda: int8 weights in blocks of 32 (one fp16 scale each); the
                activations are quantized to int8 blocks (q8_0 / q8_1) and the dot products are int8
  quant w8a16   Q8_0 on npu: CANN dequantizes the weights and multiplies in fp16
  quant w4a16   Q4_0: int4 weights in blocks of 32; on cpu and cuda the activations are quantized to
                int8 blocks, so it computes w4a8 - the only 4-bit type compared here, labelled as such
Any other (quant, backend) raises quant.Unsupported with the reason. The KV cache is kept in the
request's dtype (F32 / F16 / BF16), as the torch engines keep it.

One llama_context per engine holds one state: max_batch sequences (n_seq_max), each with max_seq KV
cells (n_ctx = max_batch * max_seq). A batch of B prompts is one llama_batch with B sequence ids, and a
decode step is one llama_decode of B tokens - as llama-batched-bench does. prefill starts from an
empty cache. A crash inside llama.cpp kills the process: the lines this module prints to stderr
before each phase (and faulthandler's trace) say which model, type and backend it was.
"""
import ctypes
import faulthandler
import json
import sys
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from llmbench.core.errors import Unsupported
from llmbench.engines import Engine, LoadRequest
from llmbench.model import gguf_export
from llmbench.model.gguf_types import BACKEND, KV_TYPE, MEANING, gguf_type
from llmbench.model.models import check_weights_path, load_config, load_tokenizer, weights_label
from llmbench.system.device import backend
from llmbench.system.llamacpp_build import BUILD_INFO, not_built

GGML_TYPE = {"F32": 0, "F16": 1, "BF16": 30}  # ggml.h enum ggml_type, for the KV cache


def compute_dtype(t: str, dtype: str, kind: str) -> str:
    if t in ("Q8_0", "Q4_0"):
        return "fp16" if kind == "npu" else "int8"
    return {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}[t]


def build_info() -> dict:
    """What make setup built (llamacpp_build writes it), or what the installed package says."""
    import llama_cpp
    info = json.loads(BUILD_INFO.read_text()) if BUILD_INFO.exists() else {}
    if info.get("llama_cpp_python") != llama_cpp.__version__:
        info = {"llama_cpp_python": llama_cpp.__version__, "llama_cpp_commit": "unknown",
                "cmake_args": "unknown (not built by make setup)"}
    info["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return info


def say(e_or_label, phase: str) -> None:
    """One line before each phase that can crash inside llama.cpp: the log then names the culprit."""
    label = e_or_label if isinstance(e_or_label, str) else e_or_label.extra["label"]
    print(f"llmbench llamacpp: {label}: {phase}", file=sys.stderr, flush=True)


@dataclass
class State:
    batch: int       # sequences 0..batch-1 are live
    pos: int         # next position of every sequence


def _quiet_logs(llama_cpp) -> None:
    """Keep llama.cpp's warnings and errors, drop its per-tensor info lines (the run log stays short)."""
    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h)
            print(text.decode(errors="replace"), end="", file=sys.stderr, flush=True)
    _quiet_logs.cb = cb  # ctypes callbacks must outlive the call
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))


def load(req: LoadRequest) -> Engine:
    t = gguf_type(req.dtype, req.quant, req.kind)
    if req.kind not in BACKEND:
        raise Unsupported(f"llama.cpp has no backend for device kind {req.kind!r}")
    try:
        import llama_cpp
    except ImportError as err:
        raise Unsupported(not_built() or f"llama-cpp-python is not installed ({err}); make setup builds it") from err
    try:  # the process's own stderr: in a Jupyter kernel sys.stderr is a stream without a file descriptor
        faulthandler.enable(file=sys.__stderr__)
    except (AttributeError, ValueError, OSError):
        pass  # no usable stderr: the phase lines below still name what crashed
    _quiet_logs(llama_cpp)
    llama_cpp.llama_backend_init()
    info = build_info()
    backend = BACKEND[req.kind]
    flags = " ".join(info["cmake_args"]) if isinstance(info["cmake_args"], list) else info["cmake_args"]
    built_with = f"{backend} :" in info["system_info"] or f"-DGGML_{backend}=ON" in flags
    if req.kind != "cpu" and not (built_with and llama_cpp.llama_supports_gpu_offload()):
        raise Unsupported(f"this llama-cpp-python build has no {backend} backend (flags: {info.get('cmake_args')}); "
                          f"rebuild with make setup on a machine where it is available")
    if req.max_batch > llama_cpp.llama_max_parallel_sequences():
        raise Unsupported(f"batch {req.max_batch} exceeds llama.cpp's {llama_cpp.llama_max_parallel_sequences()} sequences")
    label = f"{req.model} {t} on {backend}"

    weights = check_weights_path(req.weights)
    say(label, "exporting GGUF")
    g = gguf_export.export(req.model, weights, req.seed, t, req.dtype)

    say(label, f"loading {g.path.name}")
    t0 = time.perf_counter()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0 if req.kind == "cpu" else 999
    model = llama_cpp.llama_model_load_from_file(str(g.path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {g.path} ({label})")
    seq_cells = -(-req.max_seq // 256) * 256  # llama.cpp pads each sequence's KV cells to a multiple of 256
    n_ctx = req.max_batch * seq_cells
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, min(n_ctx, 512)
    cp.n_seq_max = req.max_batch
    cp.n_threads = cp.n_threads_batch = torch.get_num_threads()  # the threads the torch engines use
    kv = KV_TYPE[req.dtype]
    cp.type_k = cp.type_v = GGML_TYPE[kv]
    cp.op_offload = req.kind != "cpu"  # on cpu nothing may move to another device
    # llama.cpp's CPU flash attention rounds Q, K and V to fp16 (relative logit error ~2e-4 against fp32,
    # against ~3e-7 without it): an fp32 point keeps attention in fp32; 16-bit and quantized ones let
    # llama.cpp choose, as its users get.
    fa = "off (fp32 attention)" if req.dtype == "fp32" else "llama.cpp's auto choice"
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED if req.dtype == "fp32" else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    cp.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens ({label})")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    load_s = time.perf_counter() - t0

    cfg = load_config(req.model)
    wbytes = sum(g.tensor_bytes.values())
    # Tied weights: token_embd is also the LM head and is read whole every step; untied, a lookup reads one row.
    read = wbytes if "output.weight" not in g.tensor_bytes else wbytes - g.tensor_bytes["token_embd.weight"]
    meaning = MEANING.get(f"{t}/{req.kind}", MEANING[t])
    no_amx = (" (-mno-amx-int8: llama.cpp's AMX matmul segfaults on AMX CPUs, llama.cpp#20824)"
              if "-mno-amx-int8" in flags else "")
    desc = (f"llama.cpp {info.get('llama_cpp_commit')} via llama-cpp-python {info['llama_cpp_python']} "
            f"(built with {flags}{no_amx}); "
            f"backend {backend}; GGUF {t}: {meaning}; KV cache {kv}; {cp.n_threads} threads; "
            f"{req.max_batch} sequence(s) of {seq_cells} KV cells (allocated at load) in one context, "
            f"a batch is one llama_batch; "
            f"flash attention {fa}")
    say(label, "loaded")
    e = Engine(
        name="llamacpp", model=model, cfg=cfg, kind=req.kind, dtype=req.dtype, quant=req.quant,
        compute_dtype=compute_dtype(t, req.dtype, req.kind), weight_bytes=wbytes, read_bytes=read,
        weights=weights_label(weights), weights_source=weights,
        tokenizer=load_tokenizer(req.weights, req.tokens), load_s=load_s, quantize_s=g.export_s, description=desc,
        max_batch=req.max_batch, max_seq=req.max_seq,
        extra={"ctx": ctx, "batch": batch, "n_vocab": n_vocab, "gguf_type": t, "gguf": str(g.path),
               "gguf_cached": g.cached, "kv_type": kv, "kv_cells": n_ctx, "backend": backend, "label": label, "build": info,
               "phases": set()})
    # Freed when the Engine is dropped, as a torch engine's weights are (a notebook loads several in turn).
    e.extra["free"] = weakref.finalize(e, _free, model, ctx, batch)
    return e


def _free(model, ctx, batch) -> None:
    import llama_cpp
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


def _decode(e: Engine, rows: list[tuple[int, int, int, bool]]) -> None:
    """One llama_decode of (token, pos, seq, wants_logits) rows."""
    import llama_cpp
    b = e.extra["batch"]
    for i, (tok, pos, seq, out) in enumerate(rows):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
        b.seq_id[i][0] = seq
    b.n_tokens = len(rows)
    rc = llama_cpp.llama_decode(e.extra["ctx"], b)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc} for {len(rows)} tokens ({e.extra['label']}; "
                           f"1 means no KV slot: context {e.max_batch} x {e.max_seq})")


def _row_logits(e: Engine, i: int) -> np.ndarray:
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(e.extra["ctx"], i)
    return np.ctypeslib.as_array(ptr, shape=(e.extra["n_vocab"],))


def _check(e: Engine, ids: torch.Tensor, new: int) -> None:
    b, n = ids.shape
    if b > e.max_batch or n + new > e.max_seq:
        raise ValueError(f"batch {b} x {n + new} tokens exceeds the engine's {e.max_batch} x {e.max_seq}")


def _first(e: Engine, phase: str) -> None:
    if phase not in e.extra["phases"]:
        say(e, f"first {phase}")
        e.extra["phases"].add(phase)


def _clear(e: Engine) -> None:
    import llama_cpp
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(e.extra["ctx"]), True)


def prefill(e: Engine, ids: torch.Tensor):
    _check(e, ids, 0)
    _first(e, "prefill")
    _clear(e)
    b, n = ids.shape
    rows = [(int(t), p, s, p == n - 1) for s, seq in enumerate(ids.tolist()) for p, t in enumerate(seq)]
    _decode(e, rows)
    nxt = [int(_row_logits(e, s * n + n - 1).argmax()) for s in range(b)]
    return State(b, n), torch.tensor(nxt, dtype=torch.long, device=ids.device).view(b, 1)


def decode(e: Engine, state: State, token: torch.Tensor):
    if state.pos + 1 > e.max_seq:
        raise ValueError(f"context {state.pos + 1} exceeds the engine's max_seq {e.max_seq}")
    _first(e, "decode")
    _decode(e, [(int(t), state.pos, s, True) for s, t in enumerate(token.view(-1).tolist())])
    nxt = [int(_row_logits(e, s).argmax()) for s in range(state.batch)]
    return State(state.batch, state.pos + 1), torch.tensor(nxt, dtype=torch.long, device=token.device).view(-1, 1)


def generate(e: Engine, ids: torch.Tensor, n: int):
    _check(e, ids, n)
    out = [ids]
    state, tok = prefill(e, ids)
    out.append(tok)
    for _ in range(n - 1):
        state, tok = decode(e, state, tok)
        out.append(tok)
    release(e, state)
    return torch.cat(out, dim=1)


def logits(e: Engine, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of every position [batch, len, vocab], from one llama_decode of the whole batch."""
    import llama_cpp
    _check(e, ids, 0)
    _first(e, "logits")
    _clear(e)
    b, n = ids.shape
    _decode(e, [(int(t), p, s, True) for s, seq in enumerate(ids.tolist()) for p, t in enumerate(seq)])
    ptr = llama_cpp.llama_get_logits(e.extra["ctx"])
    out = np.ctypeslib.as_array(ptr, shape=(b * n, e.extra["n_vocab"])).copy()
    _clear(e)
    return torch.from_numpy(out).view(b, n, -1)


def release(e: Engine, state) -> None:
    _clear(e)


def close(e: Engine) -> None:
    """Free the context and the model now rather than when the Engine is collected (unusable afterwards)."""
    e.extra["free"]()
    e.model = e.extra["ctx"] = e.extra["batch"] = None  # a later call fails in Python, not in C


def memory(e: Engine) -> tuple[int, str] | None:
    """Device memory for a llama.cpp point, or None on cpu (there process peak RSS measures it).

    torch's allocator never sees llama.cpp's buffers, so torch.<kind>.max_memory_allocated reads ~0.
    llama.cpp allocates weights, KV cache and compute buffers when the context is made, so the memory
    in use on the device after load is its peak (other processes on the device are counted too)."""
    if e.kind == "cpu":
        return None
    free, total = backend(e.kind).mem_get_info()
    return total - free, f"device memory in use ({e.kind} mem_get_info: llama.cpp's buffers, not torch's allocator)"
