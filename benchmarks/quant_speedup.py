"""Decode speed-up of each quantization method over the unquantized model, with its fidelity, in one run.

    python benchmarks/quant_speedup.py [--model llama-3.2-1b] [--methods w8a8 w8a16 w4a16] [--steps 16]

Warm-up, then per-step decode timing (device-synchronized) at batch 1; speed-up = median TPOT of
`none` / median TPOT of the method, with a bootstrap 95% CI. Fidelity is against `none` on the same
inputs (synthetic weights unless --weights is given: not the fidelity of the real model).
"""
import argparse
import sys
import gc
import time

from llmbench import engines as engine
from llmbench.model.quant import methods as quant
from llmbench.system.device import pick_device
from llmbench.core.errors import UserError
from llmbench.measure.fidelity import compare_logits
from llmbench.measure.timing import time_decode, time_prefill
from llmbench.model.models import load_config
from llmbench.core.stats import flatten, ratio_of_medians
from llmbench.model.inputs import make_batch
from llmbench.core import errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--weights", default="synthetic")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engine", default="eager", help="eager or compiled (engine.py)")
    ap.add_argument("--methods", nargs="+", default=["w8a8"], help="also: w8a16 w4a16 (slow on CPUs without AVX-512)")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens")
    args = ap.parse_args()
    kind = pick_device(args.device)
    cfg = load_config(args.model)
    ids, _ = make_batch(1, args.context, cfg, 0)
    fid_ids, _ = make_batch(2, 32, cfg, 1)
    results, ref = {}, None
    seq = max(args.context + 2 + args.steps, args.prefill) + 1
    for method in ["none", *args.methods]:
        t0 = time.perf_counter()
        try:
            e = engine.load(engine.LoadRequest(engine=args.engine, model=args.model, weights=args.weights,
                                               dtype=args.dtype, quant=method, kind=kind, max_seq=seq, tokens="random"))
        except errors.Unsupported as why:
            print(f"{method:>6}: unsupported: {why}")
            continue
        wb = e.weight_bytes
        logits = engine.logits(e, fid_ids)
        ref = logits if method == "none" else ref
        tpot = flatten(time_decode(e, ids, kind, steps=args.steps, warmup=2)[0])
        ttft = time_prefill(e, make_batch(1, args.prefill, cfg, 0)[0], kind, 1, 3)[0] if args.prefill else None
        results[method] = tpot
        fid = compare_logits(ref, logits)
        line = (f"{method:>6}: TPOT median {sorted(tpot)[len(tpot) // 2] * 1e3:8.1f} ms | weights {wb / 1e9:5.2f} GB"
                f" | KL {fid['kl_mean']:.2e} nats, top-1 agreement {fid['top1_agreement']:.3f},"
                f" rel. logit error {fid['rel_logit_error']:.4f} | setup {time.perf_counter() - t0:5.1f} s")
        if ttft:
            line += f" | prefill {args.prefill} tok {sorted(ttft)[1]:.2f} s"
        if method != "none":
            r, lo, hi = ratio_of_medians(tpot, results["none"])
            line += f"\n{'':>8}decode speed-up over none: {r:.2f}x (95% CI {lo:.2f}-{hi:.2f})"
        print(line, flush=True)
        del e, logits
        gc.collect()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad --model, --device or --dtype: one line, no traceback
        sys.exit(f"error: {e}")
