"""What each experiment notebook measures: one frozen plan per notebook, built from its validated parameters.

The notebook's `parameters` cell declares each value (type, default, a comment for JupyterLab and
papermill); the plan carries the ones its experiment uses, typed, so an experiment is called as
`run(session, engine, plan)` and never with a dozen positional numbers. tests/test_experiments.py checks
that every plan field is a declared parameter of its notebook.
"""
from dataclasses import dataclass, field, fields

from llmbench.experiments.params import batch_sizes


def _help(text: str):
    return field(metadata={"help": text})


@dataclass(frozen=True, kw_only=True)
class Repeats:
    """Shared by every timed experiment."""
    warmup: int = _help("untimed runs of each shape before timing (accelerators compile per shape)")
    repeats: int = _help("timed repeats of each measurement")
    seed: int = _help("seed of synthetic weights and token ids")


@dataclass(frozen=True, kw_only=True)
class LatencyPlan(Repeats):
    prompt_lens: tuple[int, ...] = _help("prompt lengths for time to first token, in tokens")
    decode_contexts: tuple[int, ...] = _help("tokens already in the KV cache when decode steps are timed")
    decode_steps: int = _help("decode steps timed one by one at each context")
    gen_prompt_len: int = _help("prompt length of the whole-generate comparison")
    gen_new_tokens: tuple[int, ...] = _help("new tokens of each whole-generate run")


@dataclass(frozen=True, kw_only=True)
class BatchPlan(Repeats):
    max_batch: int = _help("largest batch; the sweep runs the powers of batch_factor below it, then it")
    batch_factor: int = _help("each batch size is this times the one before (2: every power of two)")
    prompt_len: int = _help("prompt tokens per request")
    new_tokens: int = _help("generated tokens per request")
    decode_steps: int = _help("decode steps timed one by one at each batch (decode tokens/s)")
    memory_limit_gb: float = _help("treat memory beyond this as absent (0: what the device reports free)")

    def batches(self) -> list[int]:
        return batch_sizes(self.max_batch, self.batch_factor)

    def max_seq(self) -> int:
        """The longest sequence the sweep builds: what a static KV cache must hold."""
        return self.prompt_len + max(self.warmup, 1) + max(self.decode_steps, self.new_tokens) + 1


@dataclass(frozen=True, kw_only=True)
class QuantPlan(Repeats):
    methods: tuple[str, ...] = _help("methods to compare; none always runs first")
    prompt_len: int = _help("prompt tokens for TTFT and the decode context")
    decode_steps: int = _help("decode steps timed one by one")
    batch: int = _help("batch of the throughput measurement")
    new_tokens: int = _help("generated tokens per request in the throughput measurement")
    fidelity_batch: int = _help("sequences whose logits are compared")
    fidelity_len: int = _help("tokens per compared sequence")


@dataclass(frozen=True, kw_only=True)
class PairPlan(Repeats):
    pair: str = _help("what the two sides differ in: model, engine or quant")
    versus: str = _help("side B's value of the paired axis; the ratio is B's TPOT over A's")
    decode_context: int = _help("tokens in the KV cache when a round's decode steps start")
    decode_steps: int = _help("decode steps of each side timed one by one in each round")
    profile: bool = _help("each side's decode step under torch.profiler after the rounds: profile.csv")


PLANS = {"01_latency": LatencyPlan, "02_batch_sweep": BatchPlan, "03_quantization": QuantPlan, "05_pairs": PairPlan}


def plan_for(notebook: str, params: dict):
    """The notebook's plan from its validated parameters (lists become tuples: a plan is immutable)."""
    cls = PLANS[notebook]
    return cls(**{f.name: tuple(params[f.name]) if isinstance(params[f.name], list) else params[f.name]
                  for f in fields(cls)})
