"""Where one decode step's time goes: torch.profiler events -> a kernel table with the bytes each kernel
must read (cost model) and the rate it achieved, and the sum of kernel time against the step's wall time.

Pure functions over plain events; the profiler call itself is experiments/pairs.profile_side (run by
benchmarks/engines.py --profile and by 05_pairs with profile=True).
- time per event: device time of a kernel on cuda; self CPU time of an op on cpu (inductor's fused C++
  kernels have no op of their own there: their time is the self time of the compiled region around them);
- bytes: an op maps to a weight where one of its inputs has that Linear's weight shape and its activation's
  last dimension is the weight's input size (a GEMV of a Linear reads the weight once: its bytes, given
  to the innermost op that takes the weight, aten::mm rather than the aten::linear around it); an
  attention kernel (name) reads one layer's KV cache at the step's context. Inside a CUDA graph the
  profiler gives kernel names only, no shapes: GEMV kernels there stay unmapped, and the summary's
  `mapped share` says how much of the step's bytes the table accounts for;
- the gap = wall time - kernel time: launch, graph and host overhead (on cpu: Python between ops).
"""
from dataclasses import dataclass

import pandas as pd

from llmbench.model.models import head_dim, kv_bytes_per_token

ATTENTION_NAMES = ("attention", "sdpa", "flash", "fmha")  # substrings of attention kernels' names
COLUMNS = ["kind", "name", "what", "calls", "time_s", "share_of_wall", "bytes", "gbps"]


@dataclass(frozen=True)
class Event:
    """One profiler event (or an aggregate of calls): its name, number of calls, total time in seconds."""
    name: str
    calls: int
    time_s: float
    shapes: tuple = ()   # input shapes as the profiler recorded them (empty for GPU kernels)
    parent: int | None = None  # index of the op that called it, in the same event list


@dataclass(frozen=True)
class Row:
    """One kernel (name and what it reads) over one step."""
    name: str
    what: str            # the weight(s) or "attention KV" it maps to, or "" where nothing maps
    calls: float         # per step
    time_s: float        # per step
    bytes: float | None  # per step, where it maps

    @property
    def gbps(self) -> float | None:
        return self.bytes / self.time_s / 1e9 if self.bytes is not None and self.time_s > 0 else None


def linear_weights(cfg) -> dict[tuple[int, int], list[str]]:
    """(out, in) shape of every Linear weight of one decoder layer and the LM head -> their names."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, head_dim(cfg)
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out: dict[tuple[int, int], list[str]] = {}
    for name, shape in (("q_proj", (h * hd, d)), ("k_proj", (kv * hd, d)), ("v_proj", (kv * hd, d)),
                        ("o_proj", (d, h * hd)), ("gate_proj", (f, d)), ("up_proj", (f, d)),
                        ("down_proj", (d, f)), ("lm_head", (cfg.vocab_size, d))):
        out.setdefault(shape, []).append(name)
    return out


def match_weight(shapes, weights: dict) -> tuple[int, int] | None:
    """The (out, in) weight an op reads, from its input shapes: the first input is the activation
    [..., in]; a later 2-D input of shape (out, in) (a Linear's weight, a GEMV) or (in, out) (its
    transpose, an mm) is the weight. None where no input fits."""
    shapes = [tuple(s) for s in shapes if s is not None]
    if len(shapes) < 2 or not shapes[0]:
        return None
    k = shapes[0][-1]
    for s in shapes[1:]:
        if len(s) != 2:
            continue
        for w in (s, s[::-1]):
            if w in weights and w[1] == k:
                return w
    return None


def kernel_rows(events: list[Event], cfg, weight_elem_bytes: float, kv_dtype: str, context_len: int,
                steps: int = 1) -> list[Row]:
    """Events of `steps` profiled steps -> one row per (name, what it reads), per step, longest first.
    weight_elem_bytes: bytes per weight element as stored; context_len: cached tokens the step attends to."""
    weights = linear_weights(cfg)
    kv_layer = kv_bytes_per_token(cfg, kv_dtype) / cfg.num_hidden_layers * (context_len + 1)
    reads = [match_weight(ev.shapes, weights) for ev in events]
    for i, ev in enumerate(events):  # a weight is read by the innermost op that takes it (mm, not linear)
        p = ev.parent
        while p is not None and reads[i] is not None:
            if reads[p] == reads[i]:
                reads[p] = None
            p = events[p].parent
    acc: dict[tuple[str, str], list] = {}  # (name, what) -> [calls, time, bytes or None]
    for ev, w in zip(events, reads):
        if w is not None:
            what, nbytes = "|".join(weights[w]) + f" {w[0]}x{w[1]}", w[0] * w[1] * weight_elem_bytes * ev.calls
        elif any(a in ev.name.lower() for a in ATTENTION_NAMES):
            what, nbytes = "attention KV", kv_layer * ev.calls
        else:
            what, nbytes = "", None
        a = acc.setdefault((ev.name, what), [0, 0.0, None])
        a[0] += ev.calls
        a[1] += ev.time_s
        if nbytes is not None:
            a[2] = (a[2] or 0.0) + nbytes
    rows = [Row(name=n, what=w, calls=c / steps, time_s=t / steps, bytes=None if b is None else b / steps)
            for (n, w), (c, t, b) in acc.items()]
    return sorted(rows, key=lambda r: (-r.time_s, r.name, r.what))


@dataclass(frozen=True)
class Summary:
    kernel_s: float      # sum of the rows' time, one step
    wall_s: float        # the step's wall time (host clock around it, synchronized)
    step_bytes: float    # the cost model's bytes of one step
    mapped_bytes: float  # the bytes the rows account for

    @property
    def gap_s(self) -> float:
        return self.wall_s - self.kernel_s


def summarize(rows: list[Row], wall_s: float, step_bytes: float) -> Summary:
    return Summary(kernel_s=sum(r.time_s for r in rows), wall_s=wall_s, step_bytes=step_bytes,
                   mapped_bytes=sum(r.bytes for r in rows if r.bytes is not None))


def table(rows: list[Row], s: Summary) -> list[dict]:
    """profile.csv's rows (COLUMNS): one per kernel, then the summary: kernel sum, wall, gap."""
    def line(kind, name, what, calls, t, nbytes):
        return dict(kind=kind, name=name, what=what, calls=calls, time_s=t,
                    share_of_wall=t / s.wall_s if s.wall_s > 0 else None, bytes=nbytes,
                    gbps=nbytes / t / 1e9 if nbytes is not None and t > 0 else None)
    out = [line("kernel", r.name, r.what, r.calls, r.time_s, r.bytes) for r in rows]
    mapped = f"bytes the kernel rows map: {s.mapped_bytes / s.step_bytes:.0%} of the step's" if s.step_bytes else ""
    out += [line("summary", "kernel sum", mapped, sum(r.calls for r in rows), s.kernel_s, s.mapped_bytes or None),
            line("summary", "step wall", "cost model bytes of one step", 1, s.wall_s, s.step_bytes),
            line("summary", "gap", "wall - kernel sum: launch, graph and host overhead", None, s.gap_s, None)]
    return out


def text(rows: list[Row], s: Summary, top: int = 10) -> str:
    """The top kernels and the summary, as printed by the benchmark."""
    lines = [f"{'time us':>9} {'share':>6} {'calls':>6} {'GB/s':>7}  kernel  [what it reads]"]
    for r in rows[:top]:
        gb = "" if r.gbps is None else f"{r.gbps:.1f}"
        lines.append(f"{r.time_s * 1e6:9.1f} {r.time_s / s.wall_s:6.1%} {r.calls:6.3g} {gb:>7}  {r.name[:70]}"
                     + (f"  [{r.what}]" if r.what else ""))
    lines.append(f"kernel sum {s.kernel_s * 1e6:.1f} us of a {s.wall_s * 1e6:.1f} us step "
                 f"({s.kernel_s / s.wall_s:.0%}); gap {s.gap_s * 1e6:.1f} us (launch/graph/host); "
                 f"rows map {s.mapped_bytes / s.step_bytes:.0%} of the step's {s.step_bytes / 1e6:.1f} MB; "
                 f"step at {s.step_bytes / s.wall_s / 1e9:.1f} GB/s")
    return "\n".join(lines)


def frame(tables: dict) -> pd.DataFrame:
    """profile.csv: {label (a model, a side): (rows, summary), or "unsupported: why"} -> one frame with a
    `model` column; an unsupported profile is one row of kind "unsupported" whose `what` says why."""
    out = []
    for label, t in tables.items():
        if isinstance(t, str):
            out.append({"model": label, "kind": "unsupported", "what": t})
        else:
            out += [{"model": label, **r} for r in table(*t)]
    return pd.DataFrame(out, columns=["model", *COLUMNS])
