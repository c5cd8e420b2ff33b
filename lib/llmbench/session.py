"""What every experiment notebook shares: its output folder, device facts, ceilings, record fields.

Records are saved after every step (atomically), so a run that dies later keeps what it measured.
"""
import time
from pathlib import Path

from . import ceilings, energy, paths
from .config import CONFIG_KEYS
from .costmodel import efficiency
from .device import describe
from .records import record, write_json, write_records


def out_dir(params: dict, notebook: str) -> Path:
    """The runner's folder for this grid point, or (interactive use) data/runs/interactive/<nb>-<time>."""
    d = params.get("out_dir") or paths.RUNS / "interactive" / f"{notebook}-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


def start(notebook: str, params: dict, measure_ceilings: bool = True) -> dict:
    kind = params["kind"]
    info = describe(kind)
    spec = ceilings.spec_for(info["device_name"])
    ctx = {"notebook": notebook, "params": params, "kind": kind, "info": info, "spec": spec,
           "spec_ceilings": ceilings.spec_ceilings(spec), "dir": out_dir(params, notebook), "rows": []}
    write_json(info, ctx["dir"] / "device.json")  # the runner's run.json takes it: described here, not in the parent
    if measure_ceilings:
        dtypes = sorted({params.get("dtype", "fp32"), "fp32"})
        ctx["ceilings"], ctx["ceilings_source"] = ceilings.load_or_measure(params.get("grid_dir"), kind, dtypes)
        device_run = None if ctx["ceilings_source"] == ceilings.IN_RUN else Path(params["grid_dir"]) / ctx["ceilings_source"]
        ctx["idle_watts"] = energy.idle_watts(device_run)  # for energy above idle; None where unknown
    ctx["base"] = {"run_id": ctx["dir"].name, "device": kind, "device_name": info["device_name"],
                   "ceilings_run": ctx.get("ceilings_source"),
                   **{k: params[k] for k in CONFIG_KEYS if k in params and k not in ("device", "tokens")}}
    return ctx


def add(ctx: dict, rows) -> list[dict]:
    """Append rows (each gets the run's common fields unless it sets them) and save everything so far."""
    rows = [rows] if isinstance(rows, dict) else list(rows)
    for r in rows:
        for k, v in ctx["base"].items():
            if r.get(k) is None:
                r[k] = v
    ctx["rows"].extend(rows)
    write_records(ctx["rows"], ctx["dir"] / "records.parquet")
    return rows


def row(ctx: dict, samples=None, flops=None, nbytes=None, compute_dtype=None, **fields) -> dict:
    """A record; a timed row (unit s) with a cost-model entry also gets its bound, MBU and MFU."""
    r = record(samples=samples, **fields)
    if flops is not None and r.get("median") is not None and fields.get("unit") == "s":
        dt = compute_dtype or ctx["params"].get("dtype", "fp32")
        ceil, spec = ctx.get("ceilings") or {"bandwidth": None, "flops": {}}, ctx["spec_ceilings"]
        m = efficiency(flops, nbytes, r["median"], ceil["flops"].get(dt), ceil["bandwidth"])
        s = efficiency(flops, nbytes, r["median"], spec["flops"].get(dt), spec["bandwidth"])
        r.update(flops=flops, bytes=nbytes, bound_s=m["bound_s"], mbu=m["mbu"], mfu=m["mfu"],
                 bound_spec_s=s["bound_s"], mbu_spec=s["mbu"], mfu_spec=s["mfu"])
    return r


def config_fields(e) -> dict:
    """The configuration columns an engine fixes (the rest come from the run's parameters)."""
    return dict(weights=e.weights, weights_source=e.weights_source, quant=e.quant, engine=e.name)


def load(ctx: dict, method: str | None = None, max_batch: int = 1, max_seq: int = 256):
    """The engine of this run's parameters, loaded (and quantized, compiled) and its load recorded;
    None when the method or engine cannot run here (recorded as "unsupported: why").
    max_batch and max_seq size a static engine's KV cache."""
    from . import engine
    from .quant import Unsupported
    p = ctx["params"]
    method = method or p.get("quant", "none")
    req = engine.LoadRequest(engine=p.get("engine", "eager"), model=p["model"], weights=p["weights"],
                             dtype=p["dtype"], quant=method, kind=ctx["kind"], seed=p.get("seed", 0),
                             max_batch=max_batch, max_seq=max_seq, tokens=p.get("tokens", "corpus"),
                             task_queue=p.get("task_queue", 2))
    try:
        e = engine.load(req)
    except Unsupported as why:
        add(ctx, row(ctx, experiment="load", metric="load", unit="", status=f"unsupported: {why}", quant=method,
                     engine=req.engine, weights_source=req.weights))
        return None
    f = config_fields(e)
    add(ctx, [row(ctx, experiment="load", metric="load_time", unit="s", samples=[e.load_s], **f),
              row(ctx, experiment="load", metric="quantize_time", unit="s", samples=[e.quantize_s], **f),
              row(ctx, experiment="load", metric="weight_bytes", unit="bytes", samples=[e.weight_bytes],
                  note=f"{len(e.replaced)} Linear modules quantized; " * (method != "none") + e.description, **f),
              row(ctx, experiment="load", metric="streamed_bytes", unit="bytes", samples=[e.read_bytes],
                  note="weight bytes one forward step reads (cost model)", **f)])
    return e


def add_compile_times(ctx: dict, e, seen: set) -> None:
    """Record each shape the engine compiled since the last call (compile time is paid once per shape,
    never folded into warm-up or samples)."""
    for key, seconds in (e.extra.get("compiles") or {}).items():
        if key not in seen:
            seen.add(key)
            add(ctx, row(ctx, experiment="load", metric="compile_time", unit="s", samples=[seconds],
                         note=f"{key[0]} step, input shapes {key[1:]}", **config_fields(e)))
