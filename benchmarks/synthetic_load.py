"""Time to get a synthetic model ready (allocated, filled, tied, on the device), and its determinism.

    python benchmarks/synthetic_load.py [--model llama-3.2-3b] [--dtype fp32] [--repeats 2]

Prints wall seconds per load (target: the 3B within 30 s on the 2-core build machine), the
weight bytes, and whether two loads with the same seed are identical.
"""
import argparse
import sys
import gc
import time

import llmbench  # noqa: F401  (before torch: its allocator's huge-page setting, see llmbench/__init__.py)
import torch

from llmbench.system.device import pick_device
from llmbench.core.errors import UserError
from llmbench.model.models import load_model
from llmbench.model.quant.methods import weight_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-3b")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    kind = pick_device(args.device)
    checksum = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        model, info = load_model(args.model, "synthetic", args.dtype, kind, seed=0)
        wall = time.perf_counter() - t0
        w = model.model.layers[-1].mlp.down_proj.weight
        checksum.append(float(w.double().sum()))
        print(f"load {i + 1}: {args.model} {args.dtype} on {kind} ready in {wall:.1f} s "
              f"({weight_bytes(model) / 1e9:.2f} GB of weights, {torch.get_num_threads()} threads)", flush=True)
        del model, w
        gc.collect()
    print(f"same seed, same weights: {len(set(checksum)) == 1}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad --model, --device or --dtype: one line, no traceback
        sys.exit(f"error: {e}")
