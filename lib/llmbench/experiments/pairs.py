"""Experiment 05: a ratio measured side by side. Both sides of a pair are loaded in one process and their
batch-1 decode steps are timed in alternating rounds, so the ratio compares the same machine phases (on a
shared VM the memory bandwidth moves by half from one minute to the next, with no CPU-time signal).

A pair differs in one axis: `model` (the 1B and the 3B, one engine and dtype), `engine` (eager and
compiled, one model) or `quant` (a method and none). Side A is the run's own configuration; side B
changes the paired axis to `versus`; the ratio is B's TPOT over A's. A round times `decode_steps` steps
of each side at one context (prefill, two untimed steps, then each step timed on its own, right after one
read of that engine's own weight tensors: the rate the step is held to, `mbu_read`); the order of the
sides flips every round. One ratio per round (median step of B over median step of A) is the ratio
record's sample, and its CI comes from those rounds (core/stats: a t interval over fewer than 10
rounds). Where the two sides do not fit in memory together (cost-model estimate against the free memory),
they run one after the other in this process and the records say `pairing: sequential`.
With `profile`, each side's decode step then runs under torch.profiler (after its timed rounds, so no
sample carries the profiler) and the run folder keeps profile.csv (measure/profile.py's kernel table).
The approach is benchmarks/engines.py's, which imports its timing from here.
"""
import dataclasses
import gc
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from llmbench import engines as engine
from llmbench.core.errors import Unsupported, UserError
from llmbench.experiments.params import PAIR_KINDS
from llmbench.experiments.plans import PairPlan
from llmbench.experiments.session import Session, add, add_compile_times, config_fields, load, row
from llmbench.measure import profile as prof
from llmbench.measure.timing import compiles_so_far
from llmbench.model import costmodel as cm
from llmbench.model.inputs import make_batch
from llmbench.model.models import count_params, load_config, model_names
from llmbench.model.quant import cpu_gemv
from llmbench.model.quant.methods import METHODS
from llmbench.system import noise
from llmbench.system.device import DTYPE_BYTES, empty_cache, free_memory, timed, torch_device

HEADROOM = 0.8        # both sides must fit in this share of the free memory to be loaded together
UNTIMED_STEPS = 2     # decode steps after prefill before a round's timed steps (the cache settles)
PROFILE_STEPS = 3     # decode steps under the profiler per side (plan.profile); the table is per step


def versus_choices(pair: str) -> list[str]:
    return {"model": model_names(), "engine": list(engine.ENGINES), "quant": list(METHODS)}[pair]


def sides(params: dict, plan: PairPlan) -> tuple[dict, dict]:
    """(A, B): the LoadRequest fields of each side; B differs from A in the paired axis only."""
    if plan.pair not in PAIR_KINDS:
        raise UserError(f"pair: unknown value {plan.pair!r}; valid: {', '.join(PAIR_KINDS)}")
    if plan.versus not in versus_choices(plan.pair):
        raise UserError(f"versus={plan.versus!r} does not name a {plan.pair}; valid: "
                        f"{', '.join(versus_choices(plan.pair))}")
    a = dict(model=params["model"], engine=params.get("engine", "eager"), quant=params.get("quant", "none"))
    if a[plan.pair] == plan.versus:
        raise UserError(f"versus={plan.versus!r} is side A's own {plan.pair}: a pair needs two different sides")
    return a, {**a, plan.pair: plan.versus}


def estimated_bytes(side: dict, dtype: str, max_seq: int) -> float:
    """Resident bytes one side is expected to take: its weights at the dtype (twice where a quantized
    copy is made from them), KV cache and the largest transients (cost model)."""
    cfg = load_config(side["model"])
    weights = cm.dense_weight_bytes(cfg, DTYPE_BYTES[dtype]) * (2 if side["quant"] != "none" else 1)
    return cm.footprint_bytes(cfg, weights, 1, max_seq, dtype)


def shares_weights(a: dict, b: dict) -> bool:
    """Side A compiled, side B eager, one unquantized model: B runs on the tensors A's compiled engine
    keeps as its reference (no second copy)."""
    return (a["model"] == b["model"] and a["quant"] == b["quant"] == "none"
            and (a["engine"], b["engine"]) == ("compiled", "eager"))


def fits_together(kind: str, a: dict, b: dict, dtype: str, max_seq: int) -> tuple[bool, str]:
    """(both sides fit in memory at once, why) from the cost model and the free memory now."""
    need = estimated_bytes(a, dtype, max_seq) + (0 if shares_weights(a, b) else estimated_bytes(b, dtype, max_seq))
    free = free_memory(kind)
    why = f"both sides need about {need / 1e9:.1f} GB; {free / 1e9:.1f} GB free ({HEADROOM:.0%} usable)"
    return need <= HEADROOM * free, why


def weight_reader(e, device_rate: float | None):
    """() -> B/s: one read of the engine's own weight tensors, the very bytes a decode step streams,
    wherever the allocator placed them (CPU: the C read loop with one and with four streams per thread,
    the faster; torch's sum where it cannot be built). On accelerators the device buffer's rate measured
    once (their bandwidth does not drift like a VM's). None where the engine's weights are not torch
    tensors (llama.cpp): its steps then have no read rate."""
    if e.kind != "cpu":
        return None if device_rate is None else (lambda: device_rate)
    if not hasattr(e.model, "parameters"):
        return None
    seen, flat = set(), []
    weights = [*e.model.parameters(), *(b for n, b in e.model.named_buffers() if n.endswith("weight"))]  # int8 ones
    for t in weights:
        if t.data_ptr() not in seen and t.is_contiguous() and t.numel() * t.element_size() % 4 == 0:
            seen.add(t.data_ptr())
            flat.append(t.detach().reshape(-1).view(torch.float32))
    nbytes = sum(f.numel() * 4 for f in flat)
    try:
        cpu_gemv.library()
        readers = [lambda f, n=n: cpu_gemv.read_f32(f, n) for n in cpu_gemv.READ_STREAMS]
    except Unsupported:
        readers = [torch.sum]

    def rate():  # the faster of the access patterns (one or four streams per thread), read in turn
        best = 0.0
        for read in readers:
            t0 = time.perf_counter()
            for f in flat:
                read(f)
            best = max(best, nbytes / (time.perf_counter() - t0))
        return best
    return rate


@dataclasses.dataclass
class Side:
    """One loaded side of a pair and what its rounds measured."""
    fields: dict                    # model, engine, quant
    e: object                       # the loaded Engine
    ids: torch.Tensor               # [1, context] prompt
    read: object = None             # () -> B/s, or None
    blocks: list = dataclasses.field(default_factory=list)   # [round][step] seconds
    rates: list = dataclasses.field(default_factory=list)    # [round][step] B/s read just before the step
    recompiles: int = 0


def time_round(s: Side, steps: int) -> None:
    """One round of one side: prefill, UNTIMED_STEPS steps, then `steps` decode steps timed one by one,
    each right after one read of the engine's own weights (the rate it is held to)."""
    e = s.e
    state, tok = engine.prefill(e, s.ids)
    for _ in range(UNTIMED_STEPS):
        state, tok = engine.decode(e, state, tok)
    before, block, rates = compiles_so_far(e), [], []
    for _ in range(steps):
        if s.read is not None:
            rates.append(s.read())
        (state, tok), t = timed(lambda: engine.decode(e, state, tok), e.kind)
        block.append(t)
    s.recompiles += compiles_so_far(e) - before
    engine.release(e, state)
    s.blocks.append(block)
    s.rates.append(rates)


def alternate(a: Side, b: Side, rounds: int, steps: int, warmup: int) -> None:
    """`warmup` untimed rounds of each side (every shape compiled), then `rounds` timed rounds, A then B,
    the order flipped every round so neither side always runs first."""
    for _ in range(warmup):
        for s in (a, b):
            time_round(s, steps)
            s.blocks.pop(), s.rates.pop()
    a.recompiles = b.recompiles = 0  # compilations of the untimed rounds are not the samples' concern
    for r in range(rounds):
        for s in ((a, b) if r % 2 == 0 else (b, a)):
            time_round(s, steps)


def round_ratios(a: Side, b: Side) -> list[float]:
    """One ratio per round: B's median step over A's, the two measured within the same round."""
    return [float(np.median(tb) / np.median(ta)) for ta, tb in zip(a.blocks, b.blocks)]


def profiler_events(e, ids, steps: int) -> tuple[list[prof.Event], float]:
    """(events of `steps` decode steps, mean wall seconds of one) under torch.profiler, after a prefill and
    UNTIMED_STEPS steps outside it (as in a round; every shape was compiled before). cuda: the GPU's
    kernels with their device time (a CUDA graph replay hides the ops and their shapes); cpu: every op
    with its self CPU time, its input shapes and its caller."""
    if e.kind not in ("cpu", "cuda"):
        raise Unsupported(f"profile on {e.kind}: only torch.profiler's CPU and CUDA activities are read here "
                          "(torch_npu.profiler writes its own trace files)")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if e.kind == "cuda" else [])
    state, tok = engine.prefill(e, ids)
    for _ in range(UNTIMED_STEPS):
        state, tok = engine.decode(e, state, tok)
    walls = []
    with profile(activities=acts, record_shapes=e.kind == "cpu") as p:
        for _ in range(steps):
            (state, tok), t = timed(lambda: engine.decode(e, state, tok), e.kind)
            walls.append(t)
    engine.release(e, state)
    evs = [x for x in p.events() if not x.is_async]
    if e.kind == "cuda":
        kernels = [prof.Event(x.name, 1, x.time_range.elapsed_us() / 1e6) for x in evs
                   if x.device_type == torch.autograd.DeviceType.CUDA]
        if not kernels:
            raise Unsupported("profile on cuda: torch.profiler recorded no GPU kernel of the decode step")
        return kernels, float(np.mean(walls))
    cpu = [x for x in evs if x.device_type == torch.autograd.DeviceType.CPU]
    index = {id(x): i for i, x in enumerate(cpu)}
    return [prof.Event(x.name, 1, x.self_cpu_time_total / 1e6, tuple(tuple(s) for s in x.input_shapes),
                       index.get(id(x.cpu_parent))) for x in cpu], float(np.mean(walls))


def profile_side(s: Side, steps: int = PROFILE_STEPS) -> tuple[list[prof.Row], prof.Summary]:
    """The kernel table and summary of one side's decode step (measure/profile.py), per step over `steps`.
    Unsupported where the engine is not a torch module on cpu or cuda."""
    e = s.e
    if e.name == "llamacpp":
        raise Unsupported("profile of llama.cpp: its kernels are not torch ops")
    events, wall = profiler_events(e, s.ids, steps)
    ctx = s.ids.shape[1] + UNTIMED_STEPS + steps // 2  # tokens the middle profiled step attends to
    rows = prof.kernel_rows(events, e.cfg, e.read_bytes / count_params(e.cfg)["total"], e.dtype, ctx, steps)
    return rows, prof.summarize(rows, wall, cm.decode_bytes(e.cfg, e.read_bytes, 1, ctx, e.dtype))


def _load_side(sess: Session, fields: dict, plan: PairPlan, max_seq: int, shared=None):
    """The side's Engine (load recorded), or None where it cannot run here (recorded as unsupported).
    `shared`: a compiled Engine whose eager reference is this side (same tensors, no second load)."""
    if shared is not None:
        e = engine.reference(shared)
        if e is not None:
            e = dataclasses.replace(e, compile_s=0.0, extra={},
                                    description="transformers eager on the compiled engine's own weight tensors")
            add(sess, row(sess, experiment="load", metric="weight_bytes", unit="bytes", samples=[e.weight_bytes],
                          note=e.description, model=fields["model"], **config_fields(e)))
            return e
    return load(sess, method=fields["quant"], max_seq=max_seq, model=fields["model"], engine=fields["engine"])


def _side(sess: Session, fields: dict, e, plan: PairPlan) -> Side:
    ids, _ = make_batch(1, plan.decode_context, e.cfg, plan.seed, e.tokenizer)
    rate = (sess.ceilings or {}).get("bandwidth")
    return Side(fields=fields, e=e, ids=ids.to(torch_device(sess.kind)), read=weight_reader(e, rate))


def _drop(sess: Session, s: Side) -> None:
    """Free a side's memory before the other side loads (sequential pairs)."""
    s.e = s.read = None
    torch._dynamo.reset()  # compiled graphs may hold on to the model's tensors
    gc.collect()
    empty_cache(sess.kind)


def _conditions(conds) -> dict:
    """One record's noise fields over the windows of a pair (one window side by side, two sequential)."""
    f = [noise.fields(c) for c in conds]
    if len(f) == 1:
        return f[0]
    quiet = [x["quiet"] for x in f]
    return dict(quiet=None if None in quiet else all(quiet), attempts=max(x["attempts"] for x in f),
                disturbance=" | ".join(x["disturbance"] for x in f if x["disturbance"]) or None,
                other_cores=max((x["other_cores"] for x in f if x["other_cores"] is not None), default=None),
                steal_share=max((x["steal_share"] for x in f if x["steal_share"] is not None), default=None),
                cpu_mhz=min((x["cpu_mhz"] for x in f if x["cpu_mhz"] is not None), default=None))


def max_seq(plan: PairPlan) -> int:
    """The longest sequence a round builds: what a static KV cache must hold."""
    return plan.decode_context + UNTIMED_STEPS + plan.decode_steps + 1


def run(sess: Session, plan: PairPlan) -> list[dict]:
    """Measure the pair and add its records: each side's TPOT (experiment pair, metric tpot, one block
    per round) and the ratio (metric tpot_ratio, one sample per round). A side that cannot run here leaves
    its unsupported load record and no ratio."""
    fa, fb = sides(sess.params, plan)
    dtype, n = sess.params["dtype"], max_seq(plan)
    together, fit_why = fits_together(sess.kind, fa, fb, dtype, n)
    pairing = "alternating" if together else "sequential"
    common = dict(experiment="pair", pair=plan.pair, versus=plan.versus, pairing=pairing, batch=1,
                  prompt_len=plan.decode_context, context_len=plan.decode_context + UNTIMED_STEPS)
    conds, tables = [], {}
    if together:
        ea = _load_side(sess, fa, plan, n)
        eb = ea and _load_side(sess, fb, plan, n, shared=ea if shares_weights(fa, fb) else None)
        if ea is None or eb is None:
            return sess.rows
        a, b = _side(sess, fa, ea, plan), _side(sess, fb, eb, plan)
        _, cond = noise.measure(lambda: _fresh(a, b) or alternate(a, b, plan.repeats, plan.decode_steps, plan.warmup),
                                sess.kind)
        conds.append(cond)
        for s in (a, b):
            add_compile_times(sess, s.e, s.fields["model"])
            _profile(s, plan, tables)
        rows = [_side_row(sess, a, plan, common), _side_row(sess, b, plan, common)]
    else:  # one after the other: each side's rounds in its own window, the memory freed between them
        rows, done = [], []
        for fields in (fa, fb):
            e = _load_side(sess, fields, plan, n)
            if e is None:
                return sess.rows
            s = _side(sess, fields, e, plan)
            _, cond = noise.measure(lambda: _fresh(s) or _alone(s, plan), sess.kind)
            conds.append(cond)
            add_compile_times(sess, e, fields["model"])
            rows.append(_side_row(sess, s, plan, common))
            _profile(s, plan, tables)
            done.append(s)
            _drop(sess, s)
        a, b = done
    for r in rows:
        r.update(_conditions(conds))
    ratios = round_ratios(a, b)
    how = ("side by side: alternating rounds in one process" if together else
           f"sequential: one after the other in one process ({fit_why})")
    status = "ok" if a.recompiles == b.recompiles == 0 else \
        f"error: {a.recompiles + b.recompiles} compilation(s) during the timed steps"
    mbu = lambda r: "n/a" if r.get("mbu_read") is None else f"{r['mbu_read']:.2f}"
    rows.append(row(sess, [[x] for x in ratios], experiment="pair", metric="tpot_ratio", unit="ratio", status=status,
                    model=fa["model"], engine=fa["engine"], quant=fa["quant"],
                    pair=plan.pair, versus=plan.versus, pairing=pairing, batch=1, prompt_len=plan.decode_context,
                    context_len=plan.decode_context + UNTIMED_STEPS, **_conditions(conds),
                    note=f"TPOT of {plan.versus} over {fa[plan.pair]}, one ratio per round of {plan.decode_steps} steps "
                         f"each; {how}; medians {rows[1]['median'] * 1e3:.4g} / {rows[0]['median'] * 1e3:.4g} ms, "
                         f"MBU against the read rate before each step {mbu(rows[1])} / {mbu(rows[0])}"))
    add(sess, rows)
    if plan.profile:
        prof.frame(tables).to_csv(sess.dir / "profile.csv", index=False)
    return sess.rows


def _profile(s: Side, plan: PairPlan, tables: dict) -> None:
    """With plan.profile, after the side's timed rounds: its decode step's kernel table (profile_side) into
    tables under "<model> <engine> <quant>", or "unsupported: why"."""
    if not plan.profile:
        return
    label = " ".join(str(s.fields[k]) for k in ("model", "engine", "quant"))
    try:
        tables[label] = profile_side(s, PROFILE_STEPS)
    except Unsupported as why:
        tables[label] = f"unsupported: {why}"


def _fresh(*ss: Side) -> None:
    """A redone window (noise.measure) starts its rounds over."""
    for s in ss:
        s.blocks, s.rates, s.recompiles = [], [], 0


def _alone(s: Side, plan: PairPlan) -> None:
    for _ in range(plan.warmup):
        time_round(s, plan.decode_steps)
        s.blocks.pop(), s.rates.pop()
    s.recompiles = 0
    for _ in range(plan.repeats):
        time_round(s, plan.decode_steps)


def _side_row(sess: Session, s: Side, plan: PairPlan, common: dict) -> dict:
    """The side's TPOT record: one block of steps per round, its bound and MBU against the run's ceilings,
    and `mbu_read`, the median over steps of the step's bytes over its time and the read rate just before."""
    e = s.e
    mid = plan.decode_context + UNTIMED_STEPS + plan.decode_steps // 2  # the cache grows during the steps
    nbytes = cm.decode_bytes(e.cfg, e.read_bytes, 1, mid, e.dtype)
    steps, rates = np.concatenate(s.blocks), np.concatenate(s.rates) if s.read is not None else None
    mbu_read = float(np.median(nbytes / steps / rates)) if rates is not None and rates.size == steps.size else None
    status = "ok" if s.recompiles == 0 else f"error: {s.recompiles} compilation(s) during the timed steps"
    return row(sess, s.blocks, flops=cm.decode_flops(e.cfg, 1, mid), nbytes=nbytes, compute_dtype=e.compute_dtype,
               metric="tpot", unit="s", status=status, model=s.fields["model"], mbu_read=mbu_read,
               note=f"{plan.repeats} rounds x {plan.decode_steps} steps, alternating with the other side"
                    if common["pairing"] == "alternating" else f"{plan.repeats} rounds x {plan.decode_steps} steps",
               **common, **config_fields(e))
