"""Our best path against llama.cpp, batch 1 decode, at 32-bit, 16-bit and int8, for 1B and 3B, in one run.

    python benchmarks/peer.py [--models llama-3.2-1b llama-3.2-3b] [--context 64] [--steps 16] [--device auto]

Our best path is the faster (median TPOT) of engine "compiled" and "eager"; at 16 bit each side takes
its fastest usable 16-bit type (ours: the 16-bit dtypes device.usable_dtypes allows here; llama.cpp:
F16 or BF16); int8 is w8a8 against Q8_0 (on npu Q8_0 is w8a16: see engine_llamacpp). Every
configuration runs in its own process, so a crash (a llama.cpp segfault) costs one figure, and its
reason is printed. Same weights on both sides (synthetic unless --weights), same prompt, same threads.
Last line: ratio = llama.cpp TPOT / our TPOT (above 1: we are faster), or `failed` / `unsupported`.
"""
import argparse
import json
import re
import signal
import subprocess
import sys
import time

ENGINES_OURS = ("compiled", "eager")


def child(cfg: dict) -> dict:
    """Load one engine configuration and time batch-1 decode steps one by one (this process only)."""
    from llmbench import engine  # before torch: its allocator's huge-page setting (llmbench/__init__.py)
    import torch
    from llmbench.device import synchronize, timed, torch_device
    from llmbench.engine import LoadRequest
    from llmbench.models import load_config
    from llmbench.quant import Unsupported
    from llmbench.workload import make_batch
    kind, ctx, steps, warmup = cfg["kind"], cfg["context"], cfg["steps"], cfg["warmup"]
    req = LoadRequest(cfg["engine"], cfg["model"], cfg["weights"], cfg["dtype"], cfg["quant"], kind,
                      max_batch=1, max_seq=ctx + warmup + steps + 1, tokens="random")
    try:
        e = engine.load(req)
    except (Unsupported, ImportError) as err:
        return {"status": f"unsupported: {err}"}
    ids, _ = make_batch(1, ctx, load_config(cfg["model"]), 0)
    ids = ids.to(torch_device(kind))
    with torch.inference_mode():
        state, tok = engine.prefill(e, ids)
        for _ in range(warmup):
            state, tok = engine.decode(e, state, tok)
        samples = []
        for _ in range(steps):
            (state, tok), s = timed(lambda: engine.decode(e, state, tok), kind)
            samples.append(s)
        synchronize(kind)
        engine.release(e, state)
    return {"status": "ok", "tpot_s": samples, "description": e.description,
            "gguf_type": e.extra.get("gguf_type"), "compute_dtype": e.compute_dtype}


def run_one(cfg: dict, timeout: int) -> dict:
    """One configuration in a fresh process; a crash or a hang is a result with its reason."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timed out after {timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("PEER "):
            return {**json.loads(line[5:]), "wall_s": time.perf_counter() - t0}
    return {"status": failure(p.returncode, p.stderr)}


def failure(returncode: int, stderr: str) -> str:
    """Why a child died: the signal or exit status, the phase engine_llamacpp announced last (model,
    GGUF type, backend), and the error line (faulthandler's 'Fatal Python error', or the last line)."""
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    phase = [ln for ln in lines if ln.startswith("llmbench llamacpp:")][-1:]
    error = ([ln for ln in lines if ln.startswith("Fatal Python error")][-1:]
             or [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Unsupported)\b", ln)][-1:] or lines[-1:])
    return f"failed: {how}; " + "; ".join(phase + error)


def median_ms(r: dict) -> float:
    s = sorted(r["tpot_s"])
    return 1e3 * s[len(s) // 2]


def best(results: dict) -> tuple[str, dict]:
    """The fastest configuration that ran, or the most telling failure (failed before unsupported)."""
    ok = {k: r for k, r in results.items() if r["status"] == "ok"}
    if ok:
        k = min(ok, key=lambda k: median_ms(ok[k]))
        return k, ok[k]
    k = next((k for k, r in results.items() if r["status"].startswith("failed")), next(iter(results)))
    return k, results[k]


def show(k: str, r: dict) -> str:
    return f"{k} {median_ms(r):.1f} ms" if r["status"] == "ok" else f"{k} {r['status']}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.2-3b"])
    ap.add_argument("--weights", default="synthetic")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens before the timed steps")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed one by one")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration (export, load, compile, run)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # the child: one configuration, one JSON line
        print("PEER " + json.dumps(child(json.loads(args.one))), flush=True)
        return
    from llmbench.device import pick_device, usable_dtypes
    from llmbench.errors import check_choice
    from llmbench.models import model_names
    from llmbench.stats import ratio_of_medians
    for m in args.models:
        check_choice("model", m, model_names())
    kind = pick_device(args.device)
    usable = usable_dtypes(kind)
    ours16 = [d for d in ("bf16", "fp16") if not usable[d]]
    for d in ("bf16", "fp16"):
        if usable[d]:
            print(f"ours {d}: not run on {kind}: {usable[d]}")
    int8_dtype = "fp32" if kind == "cpu" else (ours16 or ["fp32"])[0]  # w8a8's activations on the CPU are fp32
    base = dict(weights=args.weights, kind=kind, context=args.context, steps=args.steps, warmup=args.warmup)
    precisions = {  # name -> (our (dtype, quant) candidates, llama.cpp's (dtype, quant) candidates)
        "f32": ([("fp32", "none")], [("fp32", "none")]),
        "16bit": ([(d, "none") for d in ours16], [("fp16", "none"), ("bf16", "none")]),
        "int8": ([(int8_dtype, "w8a8")], [(int8_dtype, "w8a8" if kind != "npu" else "w8a16")]),
    }
    summary = []
    for model in args.models:
        cells = []
        for prec, (ours_c, peer_c) in precisions.items():
            ours = {f"{eng} {d} {q}": run_one({**base, "engine": eng, "model": model, "dtype": d, "quant": q},
                                              args.timeout) for d, q in ours_c for eng in ENGINES_OURS}
            if not ours:
                ours = {"ours 16-bit": {"status": f"unsupported: no 16-bit dtype is usable on {kind}"}}
            peer = {}
            for d, q in peer_c:
                r = run_one({**base, "engine": "llamacpp", "model": model, "dtype": d, "quant": q}, args.timeout)
                peer[f"llama.cpp {r.get('gguf_type') or d + ' ' + q}"] = r
            (ko, ro), (kp, rp) = best(ours), best(peer)
            line = f"{model} {prec}: ours " + ", ".join(show(k, r) for k, r in ours.items())
            line += " | " + ", ".join(show(k, r) for k, r in peer.items())
            if ro["status"] == "ok" and rp["status"] == "ok":
                r, lo, hi = ratio_of_medians(ro["tpot_s"], rp["tpot_s"])
                cell = f"{r:.2f}"
                line += f"\n    {kp} / {ko}: {r:.2f} (95% CI {lo:.2f}-{hi:.2f}); {ro['description']}"
                line += f"\n    llama.cpp: {rp['description']}"
            else:
                cell = "failed" if "failed" in (ro["status"][:6], rp["status"][:6]) else "unsupported"
            print(line, flush=True)
            cells.append(f"{prec}={cell}")
        summary.append(f"{model.rsplit('-', 1)[-1]} " + " ".join(cells))
    print("peer: " + " | ".join(summary))


if __name__ == "__main__":
    from llmbench.errors import UserError
    try:
        main()
    except UserError as e:  # a bad --model or --device: one line, no traceback
        sys.exit(f"error: {e}")
