"""Our best path against llama.cpp, batch 1 decode, at 32-bit, 16-bit and int8, for 1B and 3B, in one run.

    python benchmarks/peer.py [--models llama-3.2-1b llama-3.2-3b] [--context 64] [--steps 8] [--rounds 4]
                              [--ours compiled eager]

Each configuration is its own process, so a crash (a llama.cpp segfault) costs one figure and its reason
is printed. Both sides stay loaded and take turns: round after round, each times `--steps` decode steps
one by one while the other waits, so both see the same machine (on a shared VM the memory bandwidth
moves by a third from one minute to the next, and one side timed after the other measures the VM).
Where the two do not fit in memory together (3B f32 on 24 GiB) they run one after the other, and the
line says so. Each of our engines (--ours: compiled and eager) is paired with llama.cpp in turn, and our
best path is the one with the lowest TPOT of its own (not the highest ratio: that would pick whichever
pairing found llama.cpp in a slow minute); its ratio comes from rounds in the same machine phases (in
int8 on CPU, eager's fbgemm Linear and compiled's C kernel are different kernels). At 16 bit
each side takes its 16-bit types (ours: those device.usable_dtypes allows here; llama.cpp: F16 and
BF16, the faster counts); int8 is w8a8 against Q8_0 (on npu Q8_0 is w8a16: see engine_llamacpp). Same
weights (synthetic unless --weights), same prompt, same threads.
Last line: ratio = llama.cpp TPOT / our TPOT (above 1: we are faster), or `failed` / `unsupported`.
"""
import argparse
import json
import re
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ENGINES_OURS = ("compiled", "eager")


def serve(cfg: dict) -> None:
    """The child: load one configuration, prefill and warm up, say READY; then for each number n read
    from stdin, time n decode steps one by one and print them; 0 ends."""
    from llmbench import engines as engine  # before torch: its allocator's huge-page setting (llmbench/__init__.py)
    import torch
    from llmbench.system.device import synchronize, timed, torch_device
    from llmbench.engines import LoadRequest
    from llmbench.model.models import load_config
    from llmbench.core.errors import Unsupported
    from llmbench.model.inputs import make_batch
    kind, ctx, warmup = cfg["kind"], cfg["context"], cfg["warmup"]
    req = LoadRequest(cfg["engine"], cfg["model"], cfg["weights"], cfg["dtype"], cfg["quant"], kind,
                      max_batch=1, max_seq=ctx + warmup + cfg["max_steps"] + 1, tokens="random")
    try:
        e = engine.load(req)
    except (Unsupported, ImportError) as err:
        print("READY " + json.dumps({"status": f"unsupported: {err}"}), flush=True)
        return
    ids, _ = make_batch(1, ctx, load_config(cfg["model"]), 0)
    with torch.inference_mode():
        state, tok = engine.prefill(e, ids.to(torch_device(kind)))
        for _ in range(warmup):
            state, tok = engine.decode(e, state, tok)
        synchronize(kind)
        print("READY " + json.dumps({"status": "ok", "description": e.description, "gguf_type": e.extra.get("gguf_type"),
                                     "compute_dtype": e.compute_dtype}), flush=True)
        for line in sys.stdin:
            samples = []
            for _ in range(int(line)):
                (state, tok), s = timed(lambda: engine.decode(e, state, tok), kind)
                samples.append(s)
            if not samples:
                break
            print("SAMPLES " + json.dumps(samples), flush=True)
        engine.release(e, state)


def start(cfg: dict, timeout: int) -> dict:
    """A configuration's process, loaded and warmed up: {"status", "blocks", ...} (status "ok" when ready)."""
    err = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(cfg)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
    h = handle(p, err)
    msg = reply(h, "READY", timeout)
    if msg is not None:
        h.update(msg)
    return h


def handle(p: subprocess.Popen, err) -> dict:
    """A child's handle; a thread moves its stdout lines to a queue (None at its end), so that a wait
    with a timeout never misses a line already read into a buffer."""
    lines = queue.Queue()

    def pump():
        for line in p.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return {"proc": p, "err": err, "lines": lines, "blocks": [], "status": "starting"}


def reply(h: dict, tag: str, timeout: int):
    """The child's next `tag` line as JSON, or None with h["status"] saying why it never came."""
    p = h["proc"]
    while True:
        try:
            line = h["lines"].get(timeout=timeout)
        except queue.Empty:
            p.kill()
            h["status"] = f"failed: no answer within {timeout} s"
            return None
        if line is None:  # the child died: say how, and what it was doing
            p.wait()
            h["err"].seek(0)
            h["status"] = failure(p.returncode, h["err"].read())
            return None
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])


def steps(h: dict, n: int, timeout: int) -> None:
    if h["status"] != "ok":
        return
    try:
        h["proc"].stdin.write(f"{n}\n")
        h["proc"].stdin.flush()
    except BrokenPipeError:
        pass  # reply() reads the death and its reason
    s = reply(h, "SAMPLES", timeout)
    if s is not None:
        h["blocks"].append(s)


def stop(h: dict) -> None:
    p = h["proc"]
    try:
        p.stdin.write("0\n")
        p.stdin.close()
        p.wait(timeout=60)
    except (BrokenPipeError, OSError, ValueError, subprocess.TimeoutExpired):
        p.kill()
        p.wait()
    h["err"].close()


def failure(returncode: int, stderr: str) -> str:
    """Why a child died: the signal or exit status, the phase engine_llamacpp announced last (model,
    GGUF type, backend), and the error line (faulthandler's 'Fatal Python error', or the last line)."""
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    phase = [ln for ln in lines if ln.startswith("llmbench llamacpp:")][-1:]
    error = ([ln for ln in lines if ln.startswith("Fatal Python error")][-1:]
             or [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Unsupported)\b", ln)][-1:] or lines[-1:])
    return f"failed: {how}; " + "; ".join(phase + error)


def export(cfg: dict, timeout: int) -> int:
    """Write the configuration's GGUF now, in a process of its own (it loads the model), so that it is
    not written beside a loaded engine; returns its size in bytes (0 if it could not be written)."""
    try:
        p = subprocess.run([sys.executable, __file__, "--export", json.dumps(cfg)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return 0
    m = re.search(r"^GGUF (\d+)$", p.stdout, re.M)
    return int(m.group(1)) if m else 0


def gguf_size(cfg: dict) -> None:
    from llmbench.engines import llamacpp as engine_llamacpp
    from llmbench.model import gguf_export
    from llmbench.model.models import check_weights_path
    t = engine_llamacpp.gguf_type(cfg["dtype"], cfg["quant"], cfg["kind"])
    g = gguf_export.export(cfg["model"], check_weights_path(cfg["weights"]), 0, t, cfg["dtype"])
    print(f"GGUF {g.path.stat().st_size}")


def mem_available() -> int:
    m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def median_ms(blocks) -> float:
    s = sorted(x for b in blocks for x in b)
    return 1e3 * s[len(s) // 2]


def compare(ours, ours_cfg: dict, peer_cfg: dict, size: int, args) -> tuple:
    """Time ours and one llama.cpp type (GGUF of `size` bytes, written already) in turns. Returns (our
    handle, or None if it had to stop to make room; the peer's handle; our blocks of those same rounds;
    how they ran). `ours` may be None: then it is started here."""
    if ours is None:
        ours = start(ours_cfg, args.timeout)
    together = size and mem_available() > 1.2 * size + 2**30  # with ours loaded: what is left for the peer
    first = len(ours["blocks"])
    if not together:  # ours alone, then the peer alone
        for _ in range(args.rounds):
            steps(ours, args.steps, args.timeout)
        mine = ours["blocks"][first:]
        stop(ours)
        peer = start(peer_cfg, args.timeout)
        for _ in range(args.rounds):
            steps(peer, args.steps, args.timeout)
        stop(peer)
        return None, peer, mine, "one after the other (the two do not fit in memory together)"
    peer = start(peer_cfg, args.timeout)
    for r in range(args.rounds):
        for h in ((ours, peer) if r % 2 == 0 else (peer, ours)):
            steps(h, args.steps, args.timeout)
    stop(peer)
    return ours, peer, ours["blocks"][first:], "in alternating rounds"


def against_peer(ours_cfg: dict, peer_c, base: dict, sizes: dict, args) -> tuple:
    """One of our engines against each llama.cpp type in turn: (status, description, {peer name: (peer
    handle, our blocks beside it, how they ran)})."""
    ours = start(ours_cfg, args.timeout)
    if ours["status"] != "ok":
        stop(ours)
        return ours["status"], "", {}
    desc, pairs = ours["description"], {}
    for d, q in peer_c:
        peer_cfg = {**base, "engine": "llamacpp", "dtype": d, "quant": q}
        ours, peer, mine, how = compare(ours, ours_cfg, peer_cfg, sizes[(d, q)], args)
        pairs[f"llama.cpp {peer.get('gguf_type') or d + ' ' + q}"] = (peer, mine, how)
    if ours is not None:
        stop(ours)
    return "ok", desc, pairs


def precision(model, prec, dtype, quant, peer_c, base, sizes, args) -> str:
    """Each of our engines (compiled, eager) against llama.cpp at one precision, each pair in the same
    machine phases; our best path is the engine with the lowest TPOT of its own, and its ratio
    (llama.cpp's faster type over ours) is the figure. Returns the summary cell."""
    from llmbench.core.stats import ratio_of_medians
    best, statuses = None, []
    for eng in args.ours:
        status, desc, pairs = against_peer({**base, "engine": eng, "dtype": dtype, "quant": quant}, peer_c, base,
                                           sizes, args)
        if status != "ok":
            print(f"{model} {prec}: ours {eng}: {status}", flush=True)
            statuses.append(status)
            continue
        ok = {k: v for k, v in pairs.items() if v[0]["status"] == "ok" and v[0]["blocks"] and v[1]}
        for k, (peer, _, _) in pairs.items():
            if k not in ok:
                print(f"{model} {prec}: {k} {peer['status']}", flush=True)
                statuses.append(peer["status"])
        if not ok:
            continue
        k = min(ok, key=lambda k: median_ms(ok[k][0]["blocks"]))  # llama.cpp's faster type
        peer, mine, how = ok[k]
        r, lo, hi = ratio_of_medians(mine, peer["blocks"])
        print(f"{model} {prec}: ours {eng} {dtype} {quant} | "
              + ", ".join(f"{kk} {median_ms(v[0]['blocks']):.1f} ms (ours {median_ms(v[1]):.1f} ms beside it)"
                          for kk, v in ok.items())
              + f"\n    {k} / ours {eng}: {r:.2f} (95% CI {lo:.2f}-{hi:.2f}), {args.rounds} rounds of {args.steps} "
              f"steps, {how}; ours: {desc}\n    llama.cpp: {peer['description']}", flush=True)
        if best is None or median_ms(mine) < best[2]:
            best = (r, eng, median_ms(mine))
    if best is None:
        return f"{prec}={'failed' if any(s.startswith('failed') for s in statuses) else 'unsupported'}"
    print(f"{model} {prec}: our best path is {best[1]}, the lower TPOT of ours ({best[2]:.1f} ms; ratio {best[0]:.2f})",
          flush=True)
    return f"{prec}={best[0]:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.2-3b"])
    ap.add_argument("--weights", default="synthetic")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens before the timed steps")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed one by one per round and side")
    ap.add_argument("--rounds", type=int, default=4, help="turns each side takes")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per step of a child (export, load, compile, a round)")
    ap.add_argument("--ours", nargs="+", default=list(ENGINES_OURS), help="our engines to time (best is kept)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(json.loads(args.serve))
    if args.export:
        return gguf_size(json.loads(args.export))
    from llmbench.system.device import pick_device, usable_dtypes
    from llmbench.core.errors import check_choice
    from llmbench.model.models import model_names
    for m in args.models:
        check_choice("model", m, model_names())
    for eng in args.ours:
        check_choice("engine", eng, list(ENGINES_OURS))
    kind = pick_device(args.device)
    usable = usable_dtypes(kind)
    ours16 = [d for d in ("bf16", "fp16") if not usable[d]]
    for d in ("bf16", "fp16"):
        if usable[d]:
            print(f"ours {d}: not run on {kind}: {usable[d]}")
    int8_dtype = "fp32" if kind == "cpu" else (ours16 or ["fp32"])[0]  # w8a8's activations on the CPU are fp32
    precisions = {  # name -> (our (dtype, quant), llama.cpp's (dtype, quant) candidates)
        "f32": ("fp32", "none", [("fp32", "none")]),
        "16bit": ((ours16 or [None])[0], "none", [("fp16", "none"), ("bf16", "none")]),
        "int8": (int8_dtype, "w8a8", [(int8_dtype, "w8a8" if kind != "npu" else "w8a16")]),
    }
    summary = []
    for model in args.models:
        cells = []
        for prec, (dtype, quant, peer_c) in precisions.items():
            base = dict(weights=args.weights, kind=kind, context=args.context, warmup=args.warmup, model=model,
                        max_steps=args.rounds * args.steps * len(peer_c))
            if dtype is None:
                print(f"{model} {prec}: ours unsupported: no 16-bit dtype is usable on {kind}", flush=True)
                cells.append(f"{prec}=unsupported")
                continue
            # every GGUF first, each in a process of its own, before any engine holds memory
            sizes = {(d, q): export({**base, "engine": "llamacpp", "dtype": d, "quant": q}, args.timeout)
                     for d, q in peer_c}
            cells.append(precision(model, prec, dtype, quant, peer_c, base, sizes, args))
        summary.append(f"{model.rsplit('-', 1)[-1]} " + " ".join(cells))
    print("peer: " + " | ".join(summary))


if __name__ == "__main__":
    from llmbench.core.errors import UserError
    try:
        main()
    except UserError as e:  # a bad --model or --device: one line, no traceback
        sys.exit(f"error: {e}")
