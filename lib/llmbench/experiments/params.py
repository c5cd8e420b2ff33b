"""Notebook parameters: their declared types (read from the `parameters` cell) and value rules.

The same checks guard a grid before anything runs and each notebook's validation cell, so a value
is either rejected up front with its name, or valid everywhere. Nothing here evaluates a string.
"""
import re
from functools import lru_cache

from llmbench.core import paths
from llmbench.core.errors import UserError
from llmbench.engines import ENGINES
from llmbench.experiments.serving import SERVERS, check_url
from llmbench.model.inputs import TOKENS
from llmbench.model.models import check_weights_path, model_names
from llmbench.model.quant.methods import METHODS
from llmbench.system.device import DEVICES, DTYPES, fastest_dtype, pick_device

# Set by the runner for each grid point; a grid file may not set them.
RESERVED = ("out_dir", "grid_dir")
# What the two sides of a 05_pairs run differ in (experiments/pairs.py).
PAIR_KINDS = ("model", "engine", "quant")


@lru_cache(maxsize=None)
def declared(notebook: str) -> dict:
    """name -> {type, default, help} from the notebook's `parameters` cell (papermill's parser)."""
    import papermill
    path = paths.NOTEBOOKS / f"{notebook}.ipynb"
    if not path.is_file():
        valid = sorted(p.stem for p in paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
        raise UserError(f"unknown notebook {notebook!r}; valid: {', '.join(valid)}")
    return {name: {"type": p["inferred_type_name"], "default": p["default"], "help": p["help"]}
            for name, p in papermill.inspect_notebook(str(path)).items()}


def batch_sizes(max_batch: int, factor: int) -> list[int]:
    """02_batch_sweep's batch sizes (the dry-run estimate walks the same): 1, f, f^2, ... below max_batch,
    then max_batch; (64, 4) is 1, 4, 16, 64 and (6, 2) is 1, 2, 4, 6."""
    out = [1]
    while out[-1] * factor < max_batch:
        out.append(out[-1] * factor)
    return out + [max_batch] if max_batch > 1 else out


def _type_ok(value, type_name: str) -> bool:
    scalar = {"str": str, "int": int, "float": (int, float), "bool": bool}
    if type_name in ("int", "float") and isinstance(value, bool):
        return False
    if type_name in scalar:
        return isinstance(value, scalar[type_name])
    m = re.fullmatch(r"list\[(\w+)\]", type_name)
    if m:
        return isinstance(value, list) and len(value) > 0 and all(_type_ok(v, m.group(1)) for v in value)
    raise ValueError(f"parameter type {type_name!r} is not supported by the validator")


def _positive(name, v):
    vals = v if isinstance(v, list) else [v]
    if any(x <= 0 for x in vals):
        raise UserError(f"{name}={v!r}: must be positive")


def _choice(valid):
    def check(name, v):
        for x in (v if isinstance(v, list) else [v]):
            if x not in valid:
                raise UserError(f"{name}: unknown value {x!r}; valid: {', '.join(valid)}")
    return check


def _task_queue(name, v):
    if v not in (0, 1, 2):
        raise UserError(f"{name}: unknown value {v!r}; valid: 0, 1, 2 (torch.npu.set_task_queue_enable modes)")


def _weights(name, v):
    check_weights_path(v)


def _non_negative(name, v):
    if any(x < 0 for x in (v if isinstance(v, list) else [v])):
        raise UserError(f"{name}={v!r}: must be 0 or more")


def _factor(name, v):
    if v < 2:
        raise UserError(f"{name}={v!r}: must be 2 or more (each batch size is this times the one before)")


def _port(name, v):
    if not 0 <= v <= 65535:
        raise UserError(f"{name}={v!r}: must be a TCP port, 1-65535 (0: a free one)")


def _endpoint(name, v):
    if v:
        check_url(v)


def _servers():
    return SERVERS


RULES = {
    "model": lambda n, v: _choice(model_names())(n, v),
    "device": _choice(DEVICES), "dtype": _choice([*DTYPES, "auto"]), "quant": _choice(METHODS),
    "methods": _choice(METHODS), "weights": _weights, "tokens": _choice(TOKENS), "engine": _choice(ENGINES),
    "prompt_lens": _positive, "decode_contexts": _positive, "decode_steps": _positive, "gen_new_tokens": _positive,
    "gen_prompt_len": _positive, "repeats": _positive, "max_batch": _positive, "batch_factor": _factor, "prompt_len": _positive,
    "new_tokens": _positive, "batch": _positive, "fidelity_batch": _positive, "fidelity_len": _positive,
    "task_queue": _task_queue, "pair": _choice(PAIR_KINDS), "decode_context": _positive,
    "versus": lambda n, v: _choice([*model_names(), *ENGINES, *METHODS])(n, v),
    # 04_serving
    "server": lambda n, v: _choice(_servers())(n, v), "endpoint": _endpoint, "rates": _positive,
    "concurrencies": _non_negative, "requests": _positive, "run_s": _positive, "max_run_s": _positive,
    "parallel": _positive, "threads": _non_negative, "warmup": _non_negative, "port": _port,
}


def check_value(notebook: str, name: str, value) -> None:
    decl = declared(notebook)
    if name not in decl:
        raise UserError(f"{notebook}: unknown parameter {name!r}; valid: {', '.join(decl)}")
    t = decl[name]["type"]
    if not _type_ok(value, t):
        hint = " (a list value is written as [[...]] in a grid, one list per candidate)" if t.startswith("list") else ""
        raise UserError(f"{notebook}: parameter {name}={value!r} has the wrong type; expected {t}{hint}")
    if name in RULES:
        RULES[name](name, value)


def validate(notebook: str, scope: dict) -> dict:
    """The validation cell: check every declared parameter found in scope; resolve the device and the
    dtype "auto" (the device's fastest usable 16-bit type, else fp32). A dtype this device cannot run
    well is not an error here: the engine load records it as "unsupported: why"."""
    params = {name: scope[name] for name in declared(notebook) if name in scope}
    for name, value in params.items():
        check_value(notebook, name, value)
    if "device" in params:
        params["kind"] = pick_device(params["device"])
        if params.get("dtype") == "auto":
            params["dtype"] = fastest_dtype(params["kind"])
    return params
