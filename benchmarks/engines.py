"""Eager vs compiled decode of Llama 3.2 1B and 3B at batch 1 on the detected device, in one run.

    python benchmarks/engines.py [--dtype auto] [--quant none] [--context 32] [--steps 16] [--repeats 3] [--models ...]

Per model, engine "compiled" is loaded (synthetic weights of the exact architecture; its compile timed on
its own) and engine "eager" runs transformers on the very same weight tensors (the compiled engine keeps
that model as its reference), so both models and both engines stay loaded at once. Repeats alternate
model and engine: each is a block of decode steps timed one by one with device synchronization, so the
eager/compiled and 3B/1B ratios compare the same machine phases (a shared VM's memory bandwidth moves
by half from one minute to the next).
MBU of a step = the cost model's bytes of one step (weights streamed + KV cache) over its time, against
the read rate of the engine's own weight tensors measured right before that step (on CPU the faster of
two passes of the C read loop, one and four streams per thread, or torch's sum without a C compiler; elsewhere ceilings.measure_bandwidth's device buffer,
once); the median over all steps is printed. Greedy tokens of the two engines are compared on the same
prompt. With --quant (e.g. w8a8) each engine loads its own quantized model (eager: fbgemm's dynamic Linear
on CPU; compiled: the C int8 kernel) and both are held to the read rate of the compiled engine's weights
(fbgemm's packed weights are not tensors one can read); the token comparison then shows how far two int8
kernels agree, not an identity. Last line, exactly:
  engines: 1b eager MBU=<x> compiled MBU=<y> | 3b eager MBU=<x> compiled MBU=<y> | 3b/1b compiled TPOT ratio=<r>
With --profile, after the timed repeats, --profile-steps compiled decode steps per model (warm: every shape
was compiled by the greedy comparison) run under torch.profiler (CPU, and CUDA on cuda; experiments/pairs.
profile_side, which 05_pairs runs with profile=True); measure/profile.py turns the events into a kernel
table (calls, time, the bytes each kernel must read, GB/s) and the kernel sum against the step's wall time,
written to <--out>/profile.csv and printed (top ten and the summary). The profiler's own overhead is inside
the profiled wall time. On npu the profile is unsupported (printed, and the reason is profile.csv's row).
"""
import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import llmbench  # noqa: F401  (before torch: its allocator's huge-page setting, see llmbench/__init__.py)
import torch

from llmbench.measure import ceilings
from llmbench import engines as engine
from llmbench.model import costmodel as cm
from llmbench.system.device import DTYPES, fastest_dtype, pick_device, torch_device
from llmbench.core.errors import UserError, check_choice
from llmbench.model.quant.methods import METHODS
from llmbench.core.errors import Unsupported
from llmbench.experiments.pairs import Side, profile_side, time_round, weight_reader  # the grid's 05_pairs times its rounds the same way
from llmbench.core.stats import flatten, ratio_of_medians
from llmbench.model.inputs import make_batch
from llmbench.measure import profile as prof
from llmbench.core import paths

MODELS = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b"}
ENGINES = ("eager", "compiled")


def read_bandwidth(kind: str) -> float:
    """Best read rate (B/s) of ceilings.measure_bandwidth's probes on a 1 GiB (cpu) or 4 GiB buffer."""
    rows = ceilings.measure_bandwidth(kind, (1024 if kind == "cpu" else 4096) * 2**20)
    return ceilings.from_records(pd.DataFrame(rows))["bandwidth"]


def load_model(name, dtype, quant, kind, context, steps, gen_tokens, device_rate):
    """{engine: (its pairs.Side, result record)} of one model: compiled, and eager on the same tensors (eager alone
    where compiled is unsupported; quantized, each its own). Each runs the greedy generation that is both
    the token comparison and the warm-up that compiles every shape."""
    req = engine.LoadRequest(engine="compiled", model=name, weights="synthetic", dtype=dtype, quant=quant,
                             kind=kind, max_batch=1, max_seq=context + 3 + steps + gen_tokens, tokens="random")
    out = {}
    try:
        c = engine.load(req)
        out["compiled"] = c
        if quant == "none":
            out["eager"] = dataclasses.replace(c, name="eager", model=c.extra["reference"], compile_s=0.0, extra={},
                                               description="transformers eager, DynamicCache, on the same tensors")
    except Unsupported as why:
        print(f"{name} compiled: unsupported: {why}", flush=True)
    if "eager" not in out:
        out["eager"] = engine.load(dataclasses.replace(req, engine="eager"))
    ids = make_batch(1, context, out["eager"].cfg, 0, None)[0].to(torch_device(kind))
    read = weight_reader(out.get("compiled", out["eager"]), device_rate)
    res = {}
    for eng, e in out.items():
        print(f"{name} {eng}: {e.description}", flush=True)
        tokens = engine.generate(e, ids, gen_tokens).cpu()
        res[eng] = (Side(fields={"engine": eng}, e=e, ids=ids, read=read),
                    dict(tokens=tokens, compile_s=e.compile_s, load_s=e.load_s,
                         bytes=cm.decode_bytes(e.cfg, e.read_bytes, 1, context + 2 + steps // 2, dtype)))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="fp32, fp16, bf16, or auto: bf16 where usable, else fp32 "
                    "(quantized on CPU: fp32, the activations its int8 kernels take)")
    ap.add_argument("--quant", default="none", help="none, or a method of llmbench.model.quant.methods (w8a8, ...)")
    ap.add_argument("--context", type=int, default=32, help="prompt tokens in the cache before decoding")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens compared between engines")
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="1b and/or 3b")
    ap.add_argument("--profile", action="store_true", help="also profile the compiled decode step (profile.csv)")
    ap.add_argument("--profile-steps", type=int, default=3, help="decode steps under the profiler, per model")
    ap.add_argument("--out", default="", help="folder of profile.csv (default data/runs/benchmarks/"
                    "engines-profile-<device>-<UTC time>)")
    args = ap.parse_args()
    for m in args.models:
        check_choice("model", m, list(MODELS))
    for flag, v in (("--profile-steps", args.profile_steps), ("--gen-tokens", args.gen_tokens), ("--steps", args.steps),
                    ("--repeats", args.repeats)):
        if v < 1:  # transformers' generate fails on 0 new tokens with a traceback
            raise UserError(f"{flag}={v}: give a whole number of at least 1")
    if args.context < 1:
        raise UserError(f"--context={args.context}: give a whole number of at least 1")
    kind = pick_device(args.device)
    check_choice("quant", args.quant, list(METHODS))
    auto = "fp32" if kind == "cpu" and args.quant != "none" else fastest_dtype(kind)
    dtype = auto if args.dtype == "auto" else args.dtype
    check_choice("dtype", dtype, list(DTYPES))
    device_rate = read_bandwidth(kind)
    print(f"device {kind}, dtype {dtype}, quant {args.quant}, {torch.get_num_threads()} threads; read bandwidth of a fresh buffer "
          f"(as 00_device measures it) {device_rate / 1e9:.1f} GB/s", flush=True)
    # Quantized, each engine holds its own copy of each model (3B's fp32 load alone is 12.9 GB): the models
    # then run one after the other, and their ratio compares separate minutes.
    groups = [args.models] if args.quant == "none" else [[m] for m in args.models]
    if len(groups) > 1:
        print("quantized: each engine holds its own copy of each model, so the models run one after the other "
              "(both do not fit in memory together); the 3B/1B ratio compares separate minutes", flush=True)
    res, order, tables = {}, [], {}
    out = Path(args.out) if args.out else paths.RUNS / "benchmarks" / time.strftime(
        f"engines-profile-{kind}-%Y%m%d-%H%M%S", time.gmtime())
    for group in groups:
        loaded = {short: load_model(MODELS[short], dtype, args.quant, kind, args.context, args.steps,
                                    args.gen_tokens, device_rate)
                  for short in group}
        group_order = [(s, g) for s in group for g in ENGINES if g in loaded[s]]  # eager, then compiled
        for rep in range(args.repeats):  # alternate models and engines; the order flips every repeat
            for short, eng in (group_order if rep % 2 == 0 else group_order[::-1]):
                time_round(loaded[short][eng][0], args.steps)
        for short, eng in group_order:  # the timings only: the Side holds the weights
            side, r = loaded[short][eng]
            res[(short, eng)] = {**r, "blocks": side.blocks, "rates": side.rates, "recompiles": side.recompiles}
        for short in group if args.profile else []:
            if "compiled" not in loaded[short]:
                print(f"{short} profile: unsupported: no compiled engine", flush=True)
                continue
            try:
                tables[short] = profile_side(loaded[short]["compiled"][0], args.profile_steps)
            except Unsupported as why:
                tables[short] = f"unsupported: {why}"
                print(f"{short} profile: {tables[short]}", flush=True)
                continue
            print(f"{short} compiled decode step, profiled over {args.profile_steps} steps (per step):\n"
                  + prof.text(*tables[short]), flush=True)
        order += group_order
        del loaded
        if len(groups) > 1:
            torch._dynamo.reset()  # compiled graphs may hold on to the model's tensors
        gc.collect()
    for short, eng in order:
        r = res[(short, eng)]
        s, rates = flatten(r["blocks"]), flatten(r["rates"])
        r["tpot"] = float(np.median(s))
        r["mbu"] = float(np.median(r["bytes"] / s / rates))
        print(f"{short} {eng:>8}: TPOT median {r['tpot'] * 1e3:.1f} ms (min {s.min() * 1e3:.1f}, max "
              f"{s.max() * 1e3:.1f}, n={s.size}), MBU {r['mbu']:.2f} of the weights' read rate just before "
              f"each step ({np.median(rates) / 1e9:.1f} GB/s median, {rates.min() / 1e9:.1f}-"
              f"{rates.max() / 1e9:.1f}) ({r['bytes'] / 1e9:.2f} GB/step), load {r['load_s']:.1f} s, "
              f"compile {r['compile_s']:.1f} s"
              + (f", {r['recompiles']} RECOMPILES during timing" if r["recompiles"] else ""), flush=True)
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
    if tables:
        out.mkdir(parents=True, exist_ok=True)
        prof.frame(tables).to_csv(out / "profile.csv", index=False)
        print(f"profile: {out / 'profile.csv'}", flush=True)
    print(f"engines: 1b eager MBU={mbu('1b', 'eager')} compiled MBU={mbu('1b', 'compiled')} | "
          f"3b eager MBU={mbu('3b', 'eager')} compiled MBU={mbu('3b', 'compiled')} | 3b/1b compiled TPOT ratio={ratio}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"engines.py: error: {e}", file=sys.stderr)
        sys.exit(1)
