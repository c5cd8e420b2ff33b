"""What every experiment notebook shares: its output folder, device facts, ceilings, record fields.

Records are saved after every step (atomically), so a run that dies later keeps what it measured.
"""
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmbench import engines as engine
from llmbench.core import paths
from llmbench.core.errors import Unsupported
from llmbench.core.files import write_json
from llmbench.core.keys import CONFIG_KEYS, STUDIES
from llmbench.measure import ceilings
from llmbench.measure.records import record, write_records
from llmbench.model.costmodel import efficiency
from llmbench.system import canary, energy
from llmbench.system.device import describe


def out_dir(params: dict, notebook: str) -> Path:
    """The runner's folder for this grid point, or (interactive use) data/runs/interactive/<nb>-<time>."""
    d = params.get("out_dir") or paths.RUNS / "interactive" / f"{notebook}-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


@dataclass
class Session:
    """One notebook run: where its records go, the device it runs on, the ceilings its records are put
    against, and every record so far (saved after each step)."""
    notebook: str                      # e.g. 01_latency
    params: dict                       # the validated parameters (params.validate)
    kind: str                          # npu | cuda | cpu
    info: dict                         # device description (device.describe), also written to device.json
    spec: dict | None                  # the device's published spec (data/devices.yaml), if one is known
    spec_ceilings: dict                # bandwidth and flops per dtype from that spec
    dir: Path                          # the run folder
    ceilings: dict | None = None       # measured: {"bandwidth": B/s, "flops": {dtype: FLOP/s}}
    ceilings_source: str | None = None  # the 00_device run they come from, or quick-in-run
    idle_watts: float | None = None    # for energy above idle; None where unknown
    base: dict = field(default_factory=dict)   # fields every record of this run carries
    rows: list = field(default_factory=list)
    compiled_seen: set = field(default_factory=set)  # compiled shapes already recorded (add_compile_times)


def start(notebook: str, params: dict, measure_ceilings: bool = True) -> Session:
    kind = params["kind"]
    info = describe(kind)
    spec = ceilings.spec_for(info["device_name"])
    sess = Session(notebook=notebook, params=params, kind=kind, info=info, spec=spec,
                   spec_ceilings=ceilings.spec_ceilings(spec), dir=out_dir(params, notebook))
    write_json(info, sess.dir / "device.json")  # the runner's run.json takes it: described here, not in the parent
    if measure_ceilings:
        dtypes = sorted({params.get("dtype", "fp32"), "fp32"})
        sess.ceilings, sess.ceilings_source = ceilings.load_or_measure(params.get("grid_dir"), kind, dtypes)
        device_run = None if sess.ceilings_source == ceilings.IN_RUN else Path(params["grid_dir"]) / sess.ceilings_source
        sess.idle_watts = energy.idle_watts(device_run)
    sess.base = {"run_id": sess.dir.name, "study": STUDIES[notebook], "device": kind,
                 "device_name": info["device_name"], "ceilings_run": sess.ceilings_source,
                 **{k: params[k] for k in CONFIG_KEYS if k in params and k not in ("device", "tokens")}}
    return sess


def add(sess: Session, rows) -> list[dict]:
    """Append rows (each gets the run's common fields unless it sets them) and save everything so far."""
    rows = [rows] if isinstance(rows, dict) else list(rows)
    for r in rows:
        for k, v in sess.base.items():
            if r.get(k) is None:
                r[k] = v
    sess.rows.extend(rows)
    write_records(sess.rows, sess.dir / "records.parquet")
    return rows


def row(sess: Session, samples=None, flops=None, nbytes=None, compute_dtype=None, **fields) -> dict:
    """A record; a timed row (unit s) with a cost-model entry also gets its bound, MBU and MFU."""
    r = record(samples=samples, **fields)
    if flops is not None and r.get("median") is not None and fields.get("unit") == "s":
        dt = compute_dtype or sess.params.get("dtype", "fp32")
        ceil, spec = sess.ceilings or {"bandwidth": None, "flops": {}}, sess.spec_ceilings
        m = efficiency(flops, nbytes, r["median"], ceil["flops"].get(dt), ceil["bandwidth"])
        s = efficiency(flops, nbytes, r["median"], spec["flops"].get(dt), spec["bandwidth"])
        r.update(flops=flops, bytes=nbytes, bound_s=m["bound_s"], mbu=m["mbu"], mfu=m["mfu"],
                 bound_spec_s=s["bound_s"], mbu_spec=s["mbu"], mfu_spec=s["mfu"],
                 mbu_window=canary.mbu_window(nbytes, r["median"], r.get("canary_before_gbs"), r.get("canary_after_gbs")))
    return r


def config_fields(e) -> dict:
    """The configuration columns an engine fixes (the rest come from the run's parameters)."""
    return dict(weights=e.weights, weights_source=e.weights_source, quant=e.quant, engine=e.name)


def load(sess: Session, method: str | None = None, max_batch: int = 1, max_seq: int = 256, **request):
    """The engine of this run's parameters, loaded (and quantized, compiled) and its load recorded;
    None when the method or engine cannot run here (recorded as "unsupported: why").
    max_batch and max_seq size a static engine's KV cache; `request`: LoadRequest fields that differ
    from the run's parameters (the other side of a pair)."""
    p = sess.params
    method = method or p.get("quant", "none")
    req = engine.LoadRequest(engine=p.get("engine", "eager"), model=p["model"], weights=p["weights"],
                             dtype=p["dtype"], quant=method, kind=sess.kind, seed=p.get("seed", 0),
                             max_batch=max_batch, max_seq=max_seq, tokens=p.get("tokens", "corpus"),
                             task_queue=p.get("task_queue", 2))
    req = dataclasses.replace(req, **request)
    try:
        e = engine.load(req)
    except Unsupported as why:
        add(sess, row(sess, experiment="load", metric="load", unit="", status=f"unsupported: {why}", quant=method,
                      engine=req.engine, weights_source=req.weights, model=req.model))
        return None
    f = {**config_fields(e), "model": req.model}
    add(sess, [row(sess, experiment="load", metric="load_time", unit="s", samples=[e.load_s], **f),
               row(sess, experiment="load", metric="quantize_time", unit="s", samples=[e.quantize_s], **f),
               row(sess, experiment="load", metric="weight_bytes", unit="bytes", samples=[e.weight_bytes],
                   note=f"{len(e.replaced)} Linear modules quantized; " * (method != "none") + e.description, **f),
               row(sess, experiment="load", metric="streamed_bytes", unit="bytes", samples=[e.read_bytes],
                   note="weight bytes one forward step reads (cost model)", **f)])
    return e


def add_compile_times(sess: Session, e, model: str | None = None) -> None:
    """Record each shape the engine compiled since the last call (compile time is paid once per shape,
    never folded into warm-up or samples). model: the engine's model where it is not the run's (a pair's
    other side); a shape is one per model and configuration (1B and 3B compile the same shapes)."""
    fields = {**config_fields(e), **({"model": model} if model else {})}
    for key, seconds in (e.extra.get("compiles") or {}).items():
        seen = (tuple(sorted(fields.items())), key)
        if seen not in sess.compiled_seen:
            sess.compiled_seen.add(seen)
            add(sess, row(sess, experiment="load", metric="compile_time", unit="s", samples=[seconds],
                          note=f"{key[0]} step, input shapes {key[1:]}", **fields))
