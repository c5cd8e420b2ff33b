"""Timing loops, nanoGPT-bench style: warm up, synchronize, measure each unit, keep every sample.

Everything goes through the engine interface (engine.py), so eager, compiled and llama.cpp are timed
by the same code:
- prefill (TTFT): one forward over the prompt plus the argmax that yields the first token;
- decode (TPOT): single-token steps timed one by one on top of a filled KV cache;
- generate: a whole greedy generation, to compare with TTFT + (n-1) x TPOT.
Every shape that is timed is also run untimed first: accelerators and compiled engines compile per
shape on first use (that time is the engine's compile time, never part of a sample). A compilation
during the timed calls is counted and returned, so the caller can refuse the samples.
"""
import functools

from llmbench import engines as engine
from llmbench.core.errors import Unsupported
from llmbench.model.quant import cpu_gemv
from llmbench.system import canary, noise
from llmbench.system.device import peak_memory, reset_peak_memory, timed


def compiles_so_far(e) -> int:
    return getattr(engine.module(e.name), "compile_count", lambda e: 0)(e)


def time_prefill(e, ids, kind: str, warmup: int = 1, repeats: int = 3) -> tuple[list[float], int]:
    """(seconds per repeat, compilations during the timed calls)."""
    for _ in range(max(warmup, 1)):
        engine.release(e, engine.prefill(e, ids)[0])
    before = compiles_so_far(e)
    samples = []
    for _ in range(repeats):
        (state, _), t = timed(lambda: engine.prefill(e, ids), kind)
        engine.release(e, state)
        samples.append(t)
    return samples, compiles_so_far(e) - before


def time_decode(e, ids, kind: str, steps: int = 8, warmup: int = 2, repeats: int = 1):
    """([[seconds per step] per repeat], compilations during timed steps). The cache holds
    ids.shape[1] + warmup tokens when the first timed step runs; steps within a repeat are correlated,
    so they are returned per repeat."""
    blocks, recompiles = [], 0
    for _ in range(repeats):
        state, tok = engine.prefill(e, ids)
        for _ in range(max(warmup, 1)):
            state, tok = engine.decode(e, state, tok)
        before = compiles_so_far(e)
        block = []
        for _ in range(steps):
            (state, tok), t = timed(lambda: engine.decode(e, state, tok), kind)
            block.append(t)
        recompiles += compiles_so_far(e) - before
        engine.release(e, state)
        blocks.append(block)
    return blocks, recompiles


def time_generate(e, ids, new_tokens: int, kind: str, warmup: int = 1, repeats: int = 3):
    for _ in range(max(warmup, 1)):
        engine.generate(e, ids, new_tokens)
    before = compiles_so_far(e)
    samples = [timed(lambda: engine.generate(e, ids, new_tokens), kind)[1] for _ in range(repeats)]
    return samples, compiles_so_far(e) - before


def watched(fn, e, kind: str, ceiling_bps: float | None = None):
    """fn() as one watched measurement: redone while other processes disturb its window or the memory
    canary says the memory slowed down against ceiling_bps, the run's read ceiling (noise.measure),
    inside a peak-memory window. (result, peak bytes, what the peak measures, noise.Conditions)."""
    reader = canary_reader() if kind == "cpu" and canary.ENABLED else None
    (out, peak, label), cond = noise.measure(lambda: with_peak_memory(fn, kind, e), kind,
                                             ceiling_bps=ceiling_bps, reader=reader)
    return out, peak, label, cond


@functools.cache
def canary_reader() -> tuple[str, object]:
    """(label, fn(x)) reading the CPU canary buffer once: the ceiling probe's C read loop (cpu_gemv.c, the
    most streams per thread), so the canary reads as the ceiling did; torch's sum where the kernel
    library does not build here, and the label says so."""
    try:
        cpu_gemv.library()
    except Unsupported as why:
        return f"torch sum (C read loop unavailable: {str(why)[:80]})", lambda x: float(x.sum())
    n = max(cpu_gemv.READ_STREAMS)
    return f"C read loop (cpu_gemv.c), {n} streams per thread", lambda x: cpu_gemv.read_f32(x, n)


def with_peak_memory(fn, kind: str, e=None):
    """(fn(), peak bytes, what the peak measures) with the peak window opened just before fn. An engine
    with its own device allocator (llama.cpp on cuda/npu) reports its own memory instead."""
    reset_peak_memory(kind)
    out = fn()
    own = getattr(engine.module(e.name), "memory", lambda e: None)(e) if e is not None and kind != "cpu" else None
    peak, label = own or peak_memory(kind)
    return out, peak, label
