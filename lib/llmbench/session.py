"""What every experiment notebook shares: its output folder, device facts, ceilings, record fields.

Records are saved after every step (atomically), so a run that dies later keeps what it measured.
"""
import time
from pathlib import Path

from . import ceilings, paths
from .costmodel import efficiency
from .device import describe
from .records import record, write_records


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
    if measure_ceilings:
        dtypes = sorted({params.get("dtype", "fp32"), "fp32"})
        ctx["ceilings"], ctx["ceilings_source"] = ceilings.load_or_measure(params.get("grid_dir"), kind, dtypes)
    ctx["base"] = {"run_id": ctx["dir"].name, "device": kind, "device_name": info["device_name"],
                   **{k: params[k] for k in ("model", "dtype", "quant") if k in params}}
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


def load(ctx: dict, method: str | None = None):
    """(model, info) with weights loaded and quantized, or (None, info) when the method is unsupported
    here; either way the load is recorded. info: weights, load_s, weight_bytes,
    read_bytes (what a forward step streams), tokenizer, cfg."""
    from .models import load_config, load_model, load_tokenizer
    from .quant import KERNELS, Unsupported, quantize, streamed_weight_bytes, weight_bytes
    p = ctx["params"]
    method = method or p.get("quant", "none")
    model, info = load_model(p["model"], p["weights"], p["dtype"], ctx["kind"], p.get("seed", 0))
    fields = dict(weights=info["weights"], weights_source=info["weights_source"], quant=method)
    t0 = time.perf_counter()
    try:
        info["replaced"] = quantize(model, method, ctx["kind"], p["dtype"])
    except Unsupported as e:
        add(ctx, row(ctx, experiment="load", metric="quantize", unit="", status=f"unsupported: {e}", **fields))
        return None, info
    # w8a8 multiplies int8 by int8: its compute ceiling is the int8 one; the others dequantize to dtype.
    info["compute_dtype"] = "int8" if method == "w8a8" else p["dtype"]
    info.update(quantize_s=time.perf_counter() - t0, weight_bytes=weight_bytes(model),
                read_bytes=streamed_weight_bytes(model), cfg=load_config(p["model"]),
                tokenizer=load_tokenizer(p["weights"]), fields=fields)
    add(ctx, [row(ctx, experiment="load", metric="load_time", unit="s", samples=[info["load_s"]], **fields),
              row(ctx, experiment="load", metric="quantize_time", unit="s", samples=[info["quantize_s"]], **fields),
              row(ctx, experiment="load", metric="weight_bytes", unit="bytes", samples=[info["weight_bytes"]],
                  note=f"{len(info['replaced'])} Linear modules quantized: {KERNELS.get((ctx['kind'], method))}"
                  if method != "none" else "", **fields)])
    return model, info
