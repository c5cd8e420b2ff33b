"""The engine seam: one interface over every way of running a model (gpt-fast style: functions, no
class hierarchy). Experiments call only these functions; engines never write records.

An engine is a module `engines/<name>.py` with:
  load(req: LoadRequest) -> Engine        weights loaded, quantized and compiled or captured;
                                          raises core.errors.Unsupported("why") when it cannot run here
  prefill(e, ids) -> (state, token)       one forward over ids [batch, len] (LongTensor on the device);
                                          state holds the KV cache; token: next ids [batch, 1]
  decode(e, state, token) -> (state, token)   one step: one new token per sequence
  generate(e, ids, n) -> ids              greedy, exactly n new tokens: LongTensor [batch, len + n]
  logits(e, ids) -> Tensor                fp32 logits of every position, on the CPU [batch, len, vocab]
  release(e, state) -> None               drop a state (frees its KV cache, or resets a static one)
and may add the optional hooks of OPTIONAL (the interface's defaults stand in where it does not):
  decode_logits(e, state, token) -> (state, logits)   one step that returns its fp32 logits [batch, vocab]
  reference(e) -> Engine | None           the eager engine over this engine's very own weight tensors
                                          (the agreement check's reference), or None
  close(e) -> None                        free the engine's native memory now (llama.cpp), not at collection
The Engine record carries what the cost model and the records need (bytes streamed per step, compute
dtype, load/quantize/compile times, a description of what actually runs).
"""
import importlib
from dataclasses import dataclass, field
from typing import Any

from llmbench.core.errors import Unsupported, check_choice

ENGINES = ("eager", "compiled", "llamacpp")


@dataclass
class LoadRequest:
    engine: str                # eager | compiled | llamacpp
    model: str                 # data/models name
    weights: str               # "synthetic" or a local safetensors dir / cached hub id
    dtype: str                 # fp32 | fp16 | bf16 (llama.cpp maps it to a GGUF type)
    quant: str                 # none | w8a16 | w8a8 | w4a16
    kind: str                  # npu | cuda | cpu
    seed: int = 0              # synthetic weights
    max_batch: int = 1         # static engines size their KV cache from these two
    max_seq: int = 256
    tokens: str = "corpus"     # where input ids come from (workload); engines only pass it on
    task_queue: int = 2        # npu, engine eager: torch.npu.set_task_queue_enable mode (graph capture uses 1)


@dataclass
class Engine:
    name: str                  # eager | compiled | llamacpp
    model: Any                 # the engine's own object (HF module, compiled module, llama_cpp.Llama)
    cfg: Any                   # transformers LlamaConfig of the architecture (the cost model reads it)
    kind: str
    dtype: str
    quant: str
    compute_dtype: str         # dtype of the matmuls: the ceiling MFU is taken against ("int8" for w8a8)
    weight_bytes: int          # bytes the weights occupy as stored
    read_bytes: int            # weight bytes one forward step streams
    weights: str               # synthetic | real
    weights_source: str
    tokenizer: Any = None
    load_s: float = 0.0
    quantize_s: float = 0.0
    compile_s: float = 0.0     # graph capture / compile, paid once per shape; never part of warm-up
    description: str = ""      # what runs: cache, compile mode, kernels
    replaced: list = field(default_factory=list)  # Linear modules the quantization replaced
    max_batch: int = 1
    max_seq: int = 256
    extra: dict = field(default_factory=dict)     # engine-private (e.g. dynamo counters)


def greedy(logits):
    """The next token of each row [batch, vocab] -> [batch, 1]: the first maximum, as argmax. torch's CPU
    argmax took 0.47 ms over a 128256-wide bf16 row on a 2-core Xeon, max's indices 0.10 ms (same first-maximum rule)."""
    return logits.max(-1, keepdim=True).indices


def module(name: str):
    """The engine module for a name (imported on first use: llama_cpp or torch_npu only when asked)."""
    check_choice("engine", name, ENGINES)
    return importlib.import_module(f"llmbench.engines.{name}")


# Experiments call these; each dispatches to the engine's module.
def load(req: LoadRequest) -> Engine:
    return module(req.engine).load(req)


def prefill(e: Engine, ids):
    return module(e.name).prefill(e, ids)


def decode(e: Engine, state, token):
    return module(e.name).decode(e, state, token)


def generate(e: Engine, ids, n: int):
    return module(e.name).generate(e, ids, n)


def logits(e: Engine, ids):
    return module(e.name).logits(e, ids)


def release(e: Engine, state) -> None:
    module(e.name).release(e, state)


def _no_decode_logits(e: Engine, state, token):
    raise Unsupported(f"the {e.name} engine does not return per-step decode logits")


# Optional hooks -> what stands in where an engine module does not define them.
OPTIONAL = {
    "decode_logits": _no_decode_logits,
    "reference": lambda e: None,
    "close": lambda e: None,  # Python engines free with their tensors
}


def _hook(e: Engine, name: str):
    return getattr(module(e.name), name, OPTIONAL[name])


def decode_logits(e: Engine, state, token):
    return _hook(e, "decode_logits")(e, state, token)


def reference(e: Engine) -> Engine | None:
    return _hook(e, "reference")(e)


def close(e: Engine) -> None:
    _hook(e, "close")(e)
