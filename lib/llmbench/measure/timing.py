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
from llmbench import engines as engine
from llmbench.system import noise
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


def watched(fn, e, kind: str):
    """fn() as one watched measurement: redone while other processes disturb its window (noise.measure),
    inside a peak-memory window. (result, peak bytes, what the peak measures, noise.Conditions)."""
    (out, peak, label), cond = noise.measure(lambda: with_peak_memory(fn, kind, e), kind)
    return out, peak, label, cond


def with_peak_memory(fn, kind: str, e=None):
    """(fn(), peak bytes, what the peak measures) with the peak window opened just before fn. An engine
    with its own device allocator (llama.cpp on cuda/npu) reports its own memory instead."""
    reset_peak_memory(kind)
    out = fn()
    own = getattr(engine.module(e.name), "memory", lambda e: None)(e) if e is not None and kind != "cpu" else None
    peak, label = own or peak_memory(kind)
    return out, peak, label
