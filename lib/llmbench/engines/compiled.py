"""Engine `compiled`: a gpt-fast style Llama (llama.py) with a preallocated static KV cache, whose decode
step has fixed shapes and is compiled once per batch size, then replayed.

- cuda: torch.compile(mode="reduce-overhead", fullgraph=True): the step is captured as a CUDA graph;
- npu:  torch.compile(backend="npugraph_ex", fullgraph=True, dynamic=False) (torchair's ACL graph mode,
        documented for A2/A3; on other chips it is tried, and a capture that fails is "unsupported: why").
        Task queue mode 1: NPU graph capture refuses 2 ("Do not support TASK_QUEUE_ENABLE = 2 during NPU
        graph capture"), and torch_npu leaves 0 under ipykernel;
- cpu:  inductor, with every linear of up to 16 rows (decode at batch <= 16) as one call of the C kernel in
        cpu_gemv.c (built here with -march=native; bf16 via AVX512-BF16 where the CPU has it). Inductor's
        own fused multiply-reduce reached 75-84% of the read bandwidth in bf16 and MKL's GEMV at M=1 about
        60% on an EPYC, yet MKL's fp32 GEMV matched the C kernel on a Xeon: per dtype, the op calls aten's
        linear where cpu_gemv measured it faster here. Where no C compiler exists the multiply-reduce is
        used at batch 1 and the description says so.
Prefill runs the same module eagerly on the CPU (it is compute bound there) and compiled per prompt
length on accelerators. Compile time is measured per (function, shape) on the first call and kept in
`e.extra["compiles"]`; `compile_count` reads dynamo's counter and npugraph_ex's capture and recapture
counters, so that a recompilation or a graph recapture during timed steps is detected by the caller.
The KV cache is allocated once, for max_batch x max_seq (llama.KVCache): npugraph_ex keys its graphs on
the addresses of the inputs a graph mutates, and a new cache would make it recapture every graph.
"""
import dataclasses
import functools
import time
from dataclasses import dataclass

import torch

from llmbench.core.errors import Unsupported
from llmbench.engines import Engine, LoadRequest, greedy
from llmbench.engines.eager import build
from llmbench.model import llama
from llmbench.model.quant import cpu_gemv
from llmbench.model.quant.methods import replace_linears
from llmbench.system.device import is_oom, set_task_queue, synchronize, torch_device
from llmbench.system.npu_chips import chip_supports

CPU_REDUCE_ROWS = 1  # rows (batch x tokens) up to which the inductor multiply-reduce beats its GEMM


@dataclass
class State:
    pos: int     # next position to write in the static cache


def _reduce_linear(w, x):
    """y = x W^T as a multiply-reduce: under inductor on CPU, one pass over W (the fallback path)."""
    if x.dtype == torch.float32:
        return (x[..., None, :] * w).sum(-1)
    return (x.float()[..., None, :] * w.float()).sum(-1).to(x.dtype)


def _c_linear(w, x):
    return torch.ops.llmbench.gemv(x, w)


def _cpu_linear_path() -> tuple:
    """(function, rows up to which it is used, description): the C gemv kernel where it builds here,
    else inductor's multiply-reduce at batch 1, with the reason the kernel is missing."""
    try:
        return _c_linear, cpu_gemv.MAX_ROWS, f"linears of <= {cpu_gemv.MAX_ROWS} rows: C gemv ({cpu_gemv.paths()})"
    except Unsupported as why:
        return _reduce_linear, CPU_REDUCE_ROWS, f"batch-1 linears as inductor multiply-reduce (C gemv unavailable: {why})"


def _cpu_w8a8(model, req: LoadRequest) -> tuple[list[str], str]:
    """w8a8 on CPU through the C kernel: fbgemm's dynamic Linear (engine eager's w8a8) cannot be traced."""
    if req.dtype != "fp32":
        raise Unsupported(f"the CPU int8 kernels here take fp32 activations, not {req.dtype}")
    # library(): Unsupported (no C compiler) before any weight is touched
    isa = cpu_gemv.library().gemv_paths().decode().split("int8: ")[-1]
    return replace_linears(model, cpu_gemv.W8A8Linear), (
        f"C gemv_w8a8 (cpu_gemv.c; {isa}): int8 per-channel weights, "
        "int8 per-token symmetric activations, int32 accumulation")


def _install_linear(model, fn, max_rows: int) -> None:
    """Route plain bias-free Linear modules through fn inside compiled graphs of at most max_rows rows."""
    for m in model.modules():
        if type(m) is torch.nn.Linear and m.bias is None:
            m.forward = functools.partial(_linear_forward, m, fn, max_rows)


def _linear_forward(mod, fn, max_rows, x):
    if torch.compiler.is_compiling() and x.numel() // x.shape[-1] <= max_rows:
        return fn(mod.weight, x)
    return torch.nn.functional.linear(x, mod.weight)


def _compile_options(kind: str) -> tuple[dict, str, str]:
    """(torch.compile options, what runs, why this chip's docs do not list its graph mode or "")."""
    if kind == "cuda":
        return (dict(mode="reduce-overhead", fullgraph=True, dynamic=False),
                "torch.compile reduce-overhead (CUDA graphs)", "")
    if kind == "npu":
        ok, why = chip_supports(torch.npu.get_device_name(0), "graph")
        tq = set_task_queue(1)  # capture refuses mode 2
        return (dict(backend="npugraph_ex", fullgraph=True, dynamic=False),
                f"torch.compile backend=npugraph_ex (torchair ACL graph mode), task queue mode {tq} "
                f"(torch.npu.get_task_queue_enable)", why)
    return dict(fullgraph=True, dynamic=False), "torch.compile inductor", ""


def _decode_step(model, token, pos):
    return model(token, pos)  # logits; the argmax runs outside the graph, so the agreement check reads them


def _prefill_step(model, ids, pos):
    return model(ids, pos)


def load(req: LoadRequest) -> Engine:
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 64  # one graph per batch size and prompt length; never fall back
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    hf = []
    e = build(req, "compiled", convert=lambda m: hf.append(m) or llama.from_hf(m),
              quantize=_cpu_w8a8 if (req.kind, req.quant) == ("cpu", "w8a8") else None)
    if req.quant == "none":
        e.extra["reference"] = hf[0]  # HF eager on the very same tensors: the agreement check's reference
    opts, how, undocumented = _compile_options(req.kind)
    if req.kind == "cpu":
        fn, rows, linears = _cpu_linear_path()
        _install_linear(e.model, fn, rows)
        how += f"; {linears}"
    e.model.setup_caches(req.max_batch, req.max_seq)  # once, at the largest shape (see the module docstring)
    e.extra.update(decode=torch.compile(_decode_step, **opts),
                   prefill=torch.compile(_prefill_step, **opts) if req.kind != "cpu" else _prefill_step,
                   compiled={"decode"} if req.kind == "cpu" else {"decode", "prefill"},
                   compiles={}, cuda_graphs=req.kind == "cuda")
    try:
        _first_compile(e)
    except Unsupported as exc:  # where the docs do not list graph mode, the record says it was tried
        raise Unsupported(f"{exc} ({undocumented}: tried)" if undocumented else str(exc)) from None
    how += f"; {undocumented}: tried, and it captured" if undocumented else ""
    e.description = (f"own static-cache Llama (llama.py, KV cache allocated once for batch {req.max_batch} x "
                     f"{req.max_seq} positions); decode: {how}; prefill: "
                     f"{'eager' if req.kind == 'cpu' else 'compiled per prompt length'}; {e.description}")
    return e


def _first_compile(e: Engine) -> None:
    """Compile the decode step at the load's batch size now, so that a model the compiler cannot
    capture (e.g. a quantized Linear it cannot trace) is an "unsupported: why" record, not a crash."""
    try:
        with torch.inference_mode():  # the token an inference tensor, as every later step's: else dynamo recompiles
            tok = torch.zeros(e.model.max_batch, 1, dtype=torch.long, device=torch_device(e.kind))
            _call(e, "decode", tok, _positions(e, 0, 1))  # writes cache slot 0, which every prefill rewrites
    except Exception as exc:
        if is_oom(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise Unsupported(f"torch.compile of the {e.quant} decode step failed on {e.kind}: {type(exc).__name__}: {first}")


def _call(e: Engine, name: str, *args):
    """Run a (possibly compiled) step; the first call of each shape is timed as its compile time."""
    fn = e.extra[name]
    key = (name, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
    if e.extra["cuda_graphs"]:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
    if key in e.extra["compiles"] or name not in e.extra["compiled"]:
        return fn(e.model, *args).clone()
    synchronize(e.kind)
    t0 = time.perf_counter()
    out = fn(e.model, *args).clone()
    synchronize(e.kind)
    e.extra["compiles"][key] = time.perf_counter() - t0
    e.compile_s += e.extra["compiles"][key]
    return out


def _positions(e: Engine, start: int, n: int):
    if start + n > e.model.max_seq:
        raise ValueError(f"sequence of {start + n} tokens exceeds the static cache ({e.model.max_seq}); "
                         "raise max_seq")
    return torch.arange(start, start + n, device=torch_device(e.kind))


@torch.inference_mode()
def prefill(e: Engine, ids):
    b, t = ids.shape
    e.model.setup_caches(b, e.max_seq)  # a no-op up to max_batch: a smaller batch uses the cache's first rows
    return State(pos=t), greedy(_call(e, "prefill", ids, _positions(e, 0, t)))


@torch.inference_mode()
def reference(e: Engine) -> Engine | None:
    """HF eager on the very same weight tensors (kept at load when unquantized), as an eager Engine."""
    ref = e.extra.get("reference")
    return None if ref is None else dataclasses.replace(e, name="eager", model=ref)


@torch.inference_mode()  # as decode: under grad mode dynamo would compile the step again (and mark the cache)
def decode_logits(e: Engine, state: State, token):
    """One decode step through the compiled graph: (next state, logits [batch, vocab])."""
    return State(pos=state.pos + 1), _call(e, "decode", token, _positions(e, state.pos, 1))


@torch.inference_mode()
def decode(e: Engine, state: State, token):
    state, logits = decode_logits(e, state, token)
    return state, greedy(logits)


@torch.inference_mode()
def generate(e: Engine, ids, n: int):
    state, tok = prefill(e, ids)
    out = [ids, tok]
    for _ in range(n - 1):
        state, tok = decode(e, state, tok)
        out.append(tok)
    return torch.cat(out, dim=1)


@torch.inference_mode()
def logits(e: Engine, ids):
    """Every position's logits, eagerly through the same module (fidelity; not timed)."""
    b, t = ids.shape
    e.model.setup_caches(b, t)  # grows the cache only when ids do not fit (graphs then recapture, counted)
    return e.model.all_logits(ids, _positions(e, 0, t)).float().cpu()


def release(e: Engine, state) -> None:
    pass  # the static cache is reused; positions past a state's end are masked


def compile_count(e: Engine) -> int:
    """Graphs dynamo compiled, plus npugraph_ex's captures and recaptures (its counters, by graph name:
    captured_<fx graph>, recapture_due_to_<reason>_<fx graph>): a recapture compiles nothing in dynamo."""
    from torch._dynamo.utils import counters
    graphs = sum(v for k, v in counters["npugraph_ex"].items() if k.startswith(("captured_", "recapture_")))
    return int(counters["stats"]["unique_graphs"]) + int(graphs)
