"""Eager vs compiled decode of Llama 3.2 1B and 3B at batch 1 on the detected device, in one run.

    python benchmarks/engines.py [--dtype auto] [--context 32] [--steps 16] [--repeats 3] [--models ...]

For each engine, both models are loaded (synthetic weights of the exact architecture), compiled (timed
on its own) and warmed up; then their repeats alternate, each a block of decode steps timed one by one
with device synchronization. MBU is the cost model's
bytes of one step (weights streamed + KV cache) over the median step time of a repeat, against the read
rate measured right before that repeat: on CPU the best of 3 reads of the engine's own weight tensors by
the C read loop, elsewhere ceilings.measure_bandwidth's device buffer; the median over repeats is printed.
On a shared VM the bandwidth drifts by a third within minutes, so each repeat is held to what memory
delivered in its own time window. Greedy tokens of the two engines are compared on the same prompt.
Last line, exactly:
  engines: 1b eager MBU=<x> compiled MBU=<y> | 3b eager MBU=<x> compiled MBU=<y> | 3b/1b compiled TPOT ratio=<r>
"""
import argparse
import gc
import sys
import time

import numpy as np
import pandas as pd
import llmbench  # noqa: F401  (before torch: its allocator's huge-page setting, see llmbench/__init__.py)
import torch

from llmbench import ceilings, engine
from llmbench import costmodel as cm
from llmbench.device import DTYPES, empty_cache, fastest_dtype, pick_device, torch_device
from llmbench.errors import UserError, check_choice
from llmbench.measure import time_decode
from llmbench.quant import Unsupported
from llmbench.stats import flatten, ratio_of_medians
from llmbench.workload import make_batch

MODELS = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b"}


def read_bandwidth(kind: str) -> float:
    """Best read rate (B/s) of ceilings.measure_bandwidth's probes on a 1 GiB (cpu) or 4 GiB buffer."""
    rows = ceilings.measure_bandwidth(kind, (1024 if kind == "cpu" else 4096) * 2**20)
    return ceilings.from_records(pd.DataFrame(rows))["bandwidth"]


def weights_read_bandwidth(e, repeats: int = 3) -> float:
    """Best rate (B/s) at which the C read loop reads the engine's own weight tensors once, on CPU: the
    very bytes a decode step streams, wherever the allocator placed them. Elsewhere: a device buffer."""
    if e.kind != "cpu":
        return read_bandwidth(e.kind)
    from llmbench import cpu_gemv
    seen, flat = set(), []
    for t in [*e.model.parameters(), *e.model.buffers()]:
        if t.data_ptr() not in seen and t.is_contiguous() and t.numel() * t.element_size() % 4 == 0:
            seen.add(t.data_ptr())
            flat.append(t.detach().reshape(-1).view(torch.float32))
    nbytes, best = sum(f.numel() * 4 for f in flat), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in flat:
            cpu_gemv.read_f32(f)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def load_one(name, eng, dtype, kind, context, steps, gen_tokens):
    """Load one engine and run the greedy generation that is both the token comparison and the warm-up
    that compiles every shape; returns the engine, the prompt and its result record."""
    e = engine.load(engine.LoadRequest(engine=eng, model=name, weights="synthetic", dtype=dtype, quant="none",
                                       kind=kind, max_batch=1, max_seq=context + 2 + steps + gen_tokens,
                                       tokens="random"))
    ids = make_batch(1, context, e.cfg, 0, None)[0].to(torch_device(kind))
    tokens = engine.generate(e, ids, gen_tokens).cpu()
    step_bytes = cm.decode_bytes(e.cfg, e.read_bytes, 1, context + 2 + steps // 2, dtype)
    return e, ids, dict(blocks=[], wbw=[], recompiles=0, bytes=step_bytes, compile_s=e.compile_s, load_s=e.load_s,
                        tokens=tokens, description=e.description)


def time_repeat(e, ids, r: dict, steps: int) -> None:
    """One repeat: a read of the engine's own weights, then a block of decode steps right after it."""
    r["wbw"].append(weights_read_bandwidth(e))
    b, n = time_decode(e, ids, e.kind, steps=steps, warmup=2, repeats=1)
    r["blocks"] += b
    r["recompiles"] += n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="fp32, fp16, bf16, or auto: bf16 where usable, else fp32")
    ap.add_argument("--context", type=int, default=32, help="prompt tokens in the cache before decoding")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens compared between engines")
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="1b and/or 3b")
    args = ap.parse_args()
    for m in args.models:
        check_choice("model", m, list(MODELS))
    kind = pick_device(args.device)
    dtype = fastest_dtype(kind) if args.dtype == "auto" else args.dtype
    check_choice("dtype", dtype, list(DTYPES))
    print(f"device {kind}, dtype {dtype}, {torch.get_num_threads()} threads; read bandwidth of a fresh buffer "
          f"(as 00_device measures it) {read_bandwidth(kind) / 1e9:.1f} GB/s", flush=True)
    res = {}
    for eng in ("eager", "compiled"):
        # Both models loaded, their repeats alternated: the 3B/1B ratio compares the same machine phases.
        loaded = {}
        for short in args.models:
            try:
                loaded[short] = load_one(MODELS[short], eng, dtype, kind, args.context, args.steps, args.gen_tokens)
            except Unsupported as why:
                print(f"{short} {eng}: unsupported: {why}", flush=True)
        for _ in range(args.repeats):
            for e, ids, r in loaded.values():
                time_repeat(e, ids, r, args.steps)
        for short, (e, ids, r) in loaded.items():
            r["tpot"] = float(np.median(flatten(r["blocks"])))
            # per repeat: bytes / median step time / the weights' read rate just before it; then the median
            r["mbu"] = float(np.median([r["bytes"] / np.median(b) / w for b, w in zip(r["blocks"], r["wbw"])]))
            res[(short, eng)] = r
            s = flatten(r["blocks"])
            print(f"{short} {eng:>8}: TPOT median {r['tpot'] * 1e3:.1f} ms (min {s.min() * 1e3:.1f}, max "
                  f"{s.max() * 1e3:.1f}, n={s.size}), MBU {r['mbu']:.2f} of the weights' read rate ("
                  f"{', '.join(f'{w / 1e9:.1f}' for w in r['wbw'])} GB/s before each repeat) "
                  f"({r['bytes'] / 1e9:.2f} GB/step), load {r['load_s']:.1f} s, compile {r['compile_s']:.1f} s"
                  + (f", {r['recompiles']} RECOMPILES during timing" if r["recompiles"] else ""), flush=True)
        loaded.clear()
        e = None  # the loop's last engine: free it before the next engine loads
        gc.collect()
        empty_cache(kind)
    for short in args.models:
        if (short, "eager") in res and (short, "compiled") in res:
            a, b = res[(short, "eager")], res[(short, "compiled")]
            same = (a["tokens"][:, args.context:] == b["tokens"][:, args.context:]).all(0)
            agree = int(same.long().cumprod(0).sum())  # leading steps with identical tokens
            r, lo, hi = ratio_of_medians(b["blocks"], a["blocks"])
            print(f"{short}: eager/compiled TPOT = {r:.2f} (95% CI {lo:.2f}-{hi:.2f}); greedy tokens agree for "
                  f"{agree} of {args.gen_tokens} steps", flush=True)

    def mbu(short, eng):
        r = res.get((short, eng))
        return f"{r['mbu']:.2f}" if r else "n/a"
    ratio = "n/a"
    if ("1b", "compiled") in res and ("3b", "compiled") in res:
        r, lo, hi = ratio_of_medians(res[("1b", "compiled")]["blocks"], res[("3b", "compiled")]["blocks"])
        ratio = f"{r:.2f}"
        print(f"3b/1b compiled TPOT ratio {r:.2f} (95% CI {lo:.2f}-{hi:.2f}); weight-bytes ratio "
              f"{res[('3b', 'compiled')]['bytes'] / res[('1b', 'compiled')]['bytes']:.2f} (bytes per step)")
    print(f"engines: 1b eager MBU={mbu('1b', 'eager')} compiled MBU={mbu('1b', 'compiled')} | "
          f"3b eager MBU={mbu('3b', 'eager')} compiled MBU={mbu('3b', 'compiled')} | 3b/1b compiled TPOT ratio={ratio}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"engines.py: error: {e}", file=sys.stderr)
        sys.exit(1)
