"""The wall time a grid would take, before running it (llmbench run --dry-run).

A grid file may carry an `estimate:` block: figures measured on one device, with their source. The
estimate walks what each notebook does with its parameters (the same loops as latency.py, batch_sweep.py
and quant_study.py) and prices it with those figures:

    point = overhead + compiled shapes x compile_s + prefills + decode steps + energy windows (+ 00_device's work)

It is coarse by construction: a decode step costs the same at every batch and context, a prefill is its
tokens at the measured prefill rate (never less than one step), quantized models step like unquantized
ones, and a second model load (a quantized copy) is free. A point already run is priced at its measured
duration instead. Without an `estimate:` block nothing is estimated.
"""
import ast
from dataclasses import dataclass

from llmbench.core.errors import UserError
from llmbench.experiments.params import batch_sizes, declared
from llmbench.model import costmodel as cm
from llmbench.model.models import load_config

ENERGY_WINDOW_S = 5.0  # energy.measure_rows' min_seconds: every energy window lasts at least this long
AGREEMENT_STEPS = 16   # latency.AGREEMENT_STEPS (not imported: that module imports torch)
IDLE_S = {True: 2.0, False: 10.0}  # 00_device's idle-power window, quick or not
KEYS = {"source", "point_overhead_s", "compile_s", "step_ms", "prefill_tokens_per_s", "memory_GB", "device_work_s"}


@dataclass
class Anchors:
    source: str
    point_overhead_s: float
    compile_s: dict          # model -> seconds per compiled shape
    step_ms: dict            # engine -> model -> one decode step, batch 1
    prefill_tokens_per_s: dict  # model -> prompt tokens per second
    memory_GB: float         # device memory: where the largest-batch search stops
    device_work_s: dict      # "quick"/"full" -> 00_device's ceilings, beyond its idle window


def anchors(path: str, block) -> Anchors | None:
    if block is None:
        return None
    if not isinstance(block, dict) or set(block) != KEYS:
        raise UserError(f"{path}: estimate: expected the keys {', '.join(sorted(KEYS))}")
    return Anchors(**block)


def _prefill(a: Anchors, model: str, engine: str, tokens: int) -> float:
    return max(a.step_ms[engine][model] / 1e3, tokens / a.prefill_tokens_per_s[model])


def _cost(a, model, engine, p) -> tuple[float, int]:
    """(seconds of work, compiled shapes) of one point's experiment, notebook by notebook."""
    step = a.step_ms[engine][model] / 1e3
    W, R = max(p["warmup"], 1), p["repeats"]

    def pre(tokens):
        return _prefill(a, model, engine, tokens)

    def decode_block(batch, prompt, steps):  # measure.time_decode
        return R * (pre(batch * prompt) + (W + steps) * step)

    def generate(batch, prompt, n):  # measure.time_generate, then one energy window of generates
        return (W + R) * (pre(batch * prompt) + n * step) + max(ENERGY_WINDOW_S, pre(batch * prompt) + n * step)

    agreement = 2 * (pre(p.get("gen_prompt_len", p.get("prompt_len", 0))) + AGREEMENT_STEPS * step) \
        if engine != "eager" else 0.0
    nb = p["notebook"]
    if nb == "01_latency":
        s = agreement + sum((W + R) * pre(n) for n in p["prompt_lens"])
        s += sum(decode_block(1, c, p["decode_steps"]) for c in p["decode_contexts"])
        s += sum(generate(1, p["gen_prompt_len"], n) for n in p["gen_new_tokens"])
        shapes = len({*p["prompt_lens"], *p["decode_contexts"], p["gen_prompt_len"]}) + 1
        return s, shapes
    if nb == "02_batch_sweep":
        L, n = p["prompt_len"], p["new_tokens"]
        batches = batch_sizes(p["max_batch"], p["batch_factor"])
        s = sum((W + R) * pre(b * L) + decode_block(b, L, p["decode_steps"]) + generate(b, L, n) for b in batches)
        # batch_sweep.largest: doubling past max_batch to the search limit or out of memory
        cfg, b, tried = load_config(model), p["max_batch"], 0
        while b < 4096 and cm.footprint_bytes(cfg, 0, 2 * b, L + n, p["dtype"]) < a.memory_GB * 1e9:
            b *= 2
            tried += 1
            s += pre(b * L) + 2 * step
        return s, 2 * (len(batches) + tried)
    if nb == "03_quantization":
        methods = ["none"] + [m for m in p["methods"] if m != "none"]
        L, steps, b = p["prompt_len"], p["decode_steps"], p["batch"]
        per = (pre(p["fidelity_batch"] * p["fidelity_len"]) + (W + R) * pre(L) + decode_block(1, L, steps)
               + (W + R) * pre(b * L) + decode_block(b, L, steps) + generate(b, L, p["new_tokens"]))
        return agreement + len(methods) * per, len(methods) * 5  # fidelity, prefill and decode at 1 and at batch
    raise UserError(f"no estimate for notebook {nb!r}")


def point_seconds(a: Anchors, point: dict) -> float:
    # the notebook's defaults (papermill gives their source text: literals only, never evaluated as code)
    p = {k: ast.literal_eval(v["default"]) for k, v in declared(point["notebook"]).items()} | point["params"] | \
        {"notebook": point["notebook"]}
    if point["notebook"] == "00_device":
        return a.point_overhead_s + IDLE_S[p["quick"]] + a.device_work_s["quick" if p["quick"] else "full"]
    if point["notebook"] == "05_pairs":
        return a.point_overhead_s + sum(_pair_side_s(a, side, p) for side in _pair_sides(p))
    model, engine = p["model"], p["engine"]
    _check_tables(a, model, engine)
    work, shapes = _cost(a, model, engine, p)
    return a.point_overhead_s + work + (shapes * a.compile_s[model] if engine != "eager" else 0.0)


def _check_tables(a: Anchors, model: str, engine: str) -> None:
    for key, table in (("compile_s", a.compile_s), ("prefill_tokens_per_s", a.prefill_tokens_per_s),
                       ("step_ms", a.step_ms.get(engine, {}))):
        if model not in table:
            raise UserError(f"estimate: {key} has no figure for {engine} {model}")


def _pair_sides(p: dict) -> list[tuple[str, str]]:
    """(model, engine) of each side of a 05_pairs point (experiments/pairs.sides, without loading torch)."""
    a = {"model": p["model"], "engine": p["engine"], "quant": p["quant"]}
    b = {**a, p["pair"]: p["versus"]}
    return [(s["model"], s["engine"]) for s in (a, b)]


def _pair_side_s(a: Anchors, side: tuple[str, str], p: dict) -> float:
    """One side's rounds (pairs.time_round: a prefill, two untimed steps, the timed steps; warm-up rounds
    too) and its two compiled shapes (prefill, decode)."""
    model, engine = side
    _check_tables(a, model, engine)
    step = a.step_ms[engine][model] / 1e3
    rounds = p["warmup"] + p["repeats"]
    work = rounds * (_prefill(a, model, engine, p["decode_context"]) + (2 + p["decode_steps"]) * step)
    return work + (2 * a.compile_s[model] if engine != "eager" else 0.0)


def summary(a: Anchors | None, seconds: list[float], measured: int) -> str:
    if a is None:
        return "no estimate: the grid has no `estimate:` block"
    total = sum(seconds)
    return (f"estimated wall time {total / 60:.1f} min ({total:.0f} s; {measured} of {len(seconds)} points at their "
            f"measured duration), from {a.source}")
