"""The device's own ceilings, measured: streaming memory bandwidth and matmul throughput per dtype.

Measured once per device (host and device name) per grid by notebooks/00_device.ipynb; other runs on
the same device read them back to put MBU and MFU on every record, and name that run in `ceilings_run`.
Published specs (data/devices.yaml) are kept apart and labelled so.
"""
import platform
from pathlib import Path

import pandas as pd
import torch
import yaml

from llmbench.core import paths
from llmbench.core.errors import Unsupported
from llmbench.core.files import read_json
from llmbench.measure.records import record
from llmbench.model.quant import cpu_gemv
from llmbench.model.quant import npu as quant_npu
from llmbench.system import npu_chips
from llmbench.system.device import DTYPES, backend, cpu_model, timed, torch_device


def _repeat(fn, kind, warmup, repeats):
    for _ in range(warmup):
        fn()
    return [timed(fn, kind)[1] for _ in range(repeats)]


def measure_bandwidth(kind: str, nbytes: int, repeats: int = 5) -> list[dict]:
    """Read and copy of an nbytes fp32 buffer of random values, far larger than any cache. On CPU the
    read is probed both by torch's sum and by the C kernel library's own read loop (when it builds
    here) with one and with four streams per thread, alternately; from_records takes the best, so the
    ceiling is the best read rate observed, not one library's reduction or one access pattern. Random values: a constant buffer read up to 2x faster than
    any weights on a VM here (pages the host can share), which would overstate the ceiling."""
    x = torch.rand(nbytes // 4, dtype=torch.float32, device=torch_device(kind))
    y = torch.empty_like(x)
    probes = {"torch sum": lambda: x.sum()}
    if kind == "cpu":
        try:
            cpu_gemv.library()
            for n in cpu_gemv.READ_STREAMS:
                probes[f"C read loop (cpu_gemv.c), {n} stream(s) per thread"] = lambda n=n: cpu_gemv.read_f32(x, n)
        except Unsupported:
            pass
    for fn in probes.values():
        _repeat(fn, kind, 2, 0)
    read = {name: [] for name in probes}
    for _ in range(repeats):
        for name, fn in probes.items():
            read[name].append(timed(fn, kind)[1])
    copy = _repeat(lambda: y.copy_(x), kind, 2, repeats)
    del x, y
    note = f"fp32 buffer of {nbytes / 2**20:.0f} MiB, random values"
    return [record(experiment="ceiling", metric="mem_read_bandwidth", unit="GB/s", dtype="fp32",
                   note=f"{note}; {name}", samples=[nbytes / t / 1e9 for t in times]) for name, times in read.items()] + \
        [record(experiment="ceiling", metric="mem_copy_bandwidth", unit="GB/s", dtype="fp32",
                note=note + "; counts bytes read plus bytes written", samples=[2 * nbytes / t / 1e9 for t in copy])]


def measure_matmul(kind: str, dtype: str, shape: tuple[int, int, int], repeats: int = 5) -> dict:
    """(m, k) @ (k, n) in dtype: 2*m*k*n FLOPs per call."""
    m, k, n = shape
    dev = torch_device(kind)
    a = torch.rand(m, k, device=dev).to(DTYPES[dtype])
    b = torch.rand(k, n, device=dev).to(DTYPES[dtype])
    times = _repeat(lambda: a @ b, kind, 2, repeats)
    return record(experiment="ceiling", metric="matmul_throughput", unit="GFLOP/s", dtype=dtype,
                  note=f"{m}x{k} @ {k}x{n}", samples=[2 * m * k * n / t / 1e9 for t in times])


def measure_int8_matmul(kind: str, shape: tuple[int, int, int], repeats: int = 5) -> dict:
    """int8 x int8 matmul rate through the kernel the int8 methods use on this backend."""
    m, k, n = shape
    if kind == "cpu":
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
        q = DynLinear.from_float(_with_dynamic_qconfig(torch.nn.Linear(k, n, bias=False)))
        x = torch.rand(m, k)
        fn, note = (lambda: q(x)), f"fbgemm dynamic int8 Linear, {m}x{k} @ {k}x{n} (activation quantization included)"
    elif kind == "cuda":
        a = torch.randint(-127, 127, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 127, (k, n), dtype=torch.int8, device="cuda")
        fn, note = (lambda: torch._int_mm(a, b)), f"torch._int_mm {m}x{k} @ {k}x{n}"
    else:
        fn, note = _npu_int8(m, k, n)
        if fn is None:
            return record(experiment="ceiling", metric="matmul_throughput", unit="GFLOP/s", dtype="int8",
                          status=f"unsupported: {note}")
    times = _repeat(fn, kind, 2, repeats)
    return record(experiment="ceiling", metric="matmul_throughput", unit="GFLOP/s", dtype="int8", note=note,
                  samples=[2 * m * k * n / t / 1e9 for t in times])


def _npu_int8(m: int, k: int, n: int):
    """(fn, note) timing what w8a8 runs on npu: npu_dynamic_quant of bf16 activations, then npu_quant_matmul
    with fp32 per-channel and per-token scales and bf16 output; or (None, why) on a chip without them."""
    chip = npu_chips.chip_name()
    ok, why = npu_chips.chip_supports(chip, "w8a8")
    if not ok:
        return None, why
    if max(k, n) > quant_npu.MAX_KN:
        return None, f"k={k}, n={n}: npu_quant_matmul takes K, N <= {quant_npu.MAX_KN}"
    import torch_npu
    dev = torch_device("npu")
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    w = torch.randint(-127, 127, (n, k), dtype=torch.int8, device=dev)  # [N, K], passed transposed as w8a8 does
    scale = torch.rand(n, device=dev) / 127

    def fn():
        xq, xs = torch_npu.npu_dynamic_quant(x)
        return torch_npu.npu_quant_matmul(xq, w.t(), scale, pertoken_scale=xs, output_dtype=torch.bfloat16)
    return fn, (f"torch_npu.npu_dynamic_quant + npu_quant_matmul {m}x{k} @ {k}x{n} on {chip} (per-token and "
                "per-channel fp32 scales, bf16 output; activation quantization included, as in w8a8)")


def _with_dynamic_qconfig(lin):
    lin.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    return lin


# Square matmuls and the model's own (tokens x hidden) @ (hidden x ffn) shape: each ceiling is the best
# of them, so that no measured run can beat its own "ceiling" merely by having a friendlier shape.
SHAPES = {"cpu": [(1024, 1024, 1024), (2048, 2048, 2048), (128, 3072, 8192)],
          "accel": [(4096, 4096, 4096), (8192, 8192, 8192), (2048, 3072, 8192)]}


def measure_all(kind: str, dtypes, quick: bool = False) -> list[dict]:
    """Every ceiling for this device: bandwidth, matmul per dtype, int8 matmul."""
    nbytes = (256 if quick else 1024) * 2**20 if kind == "cpu" else (1 if quick else 4) * 2**30
    shapes = SHAPES["cpu" if kind == "cpu" else "accel"][:1 if quick else None]
    rows = measure_bandwidth(kind, nbytes)
    rows += [measure_matmul(kind, dt, shape) for dt in dtypes for shape in shapes]
    rows += [measure_int8_matmul(kind, shape) for shape in shapes]
    return rows


def from_records(df: pd.DataFrame) -> dict:
    """{'bandwidth': B/s, 'flops': {dtype: FLOP/s}}: the best rate observed (any sample, any shape),
    as STREAM reports its best run: a ceiling must not sit below what a real run achieved."""
    df = df[(df.experiment == "ceiling") & (df.status == "ok")]

    def best(rows):
        return max((max(s) for s in rows["samples"] if s is not None and len(s)), default=float("nan"))
    read = df[df.metric == "mem_read_bandwidth"]
    mm = df[df.metric == "matmul_throughput"]
    return {"bandwidth": best(read) * 1e9,
            "flops": {dt: best(g) * 1e9 for dt, g in mm.groupby("dtype")}}


# `source` of ceilings that no 00_device run of this host and device provided (recorded in `ceilings_run`).
IN_RUN = "quick-in-run"


def this_device(kind: str) -> tuple[str, str]:
    """(host, device name) of the device this process measures on: the key of its ceilings.
    Called in the process that runs the measurement (the kernel), never in a scheduler's parent."""
    return platform.node(), cpu_model() if kind == "cpu" else backend(kind).get_device_name(0)


def find_device_run(grid_dir, kind: str, host: str, device_name: str) -> Path | None:
    """The finished 00_device run of this grid for this very device (host and device name), if any;
    a full measurement is preferred over a quick one, then the latest. Another host's ceilings, or
    another model of GPU on this host, would put MBU and MFU against the wrong device."""
    found = []
    for rj in Path(grid_dir).glob("*/run.json"):
        info = read_json(rj)
        dev = info.get("device") or {}
        if info.get("notebook") == "00_device" and info.get("status") == "ok" and dev.get("device") == kind \
                and dev.get("host") == host and dev.get("device_name") == device_name \
                and (rj.parent / "records.parquet").is_file():
            found.append((not (info.get("parameters") or {}).get("quick", False), info.get("end") or "", rj.parent))
    return max(found)[2] if found else None


def load_or_measure(grid_dir: str, kind: str, dtypes) -> tuple[dict, str]:
    """Ceilings and their source: the run id of this device's 00_device run in the grid, or (none
    there, or run standalone) IN_RUN for a quick measurement made here."""
    run = find_device_run(grid_dir, kind, *this_device(kind)) if grid_dir else None
    if run is not None:
        return from_records(pd.read_parquet(run / "records.parquet")), run.name
    return from_records(pd.DataFrame(measure_all(kind, dtypes, quick=True))), IN_RUN


def load_specs() -> dict:
    return yaml.safe_load(paths.DEVICES_SPEC.read_text())["devices"]


def spec_for(device_name: str) -> dict | None:
    """The published spec that lists this exact device name, if any. Exact: a first-generation
    "Ascend910B" must not get an Ascend910B2's spec, nor an A100 PCIe an A100 SXM's."""
    name = (device_name or "").strip()
    for key, spec in load_specs().items():
        if name in spec.get("names", []):
            return {"key": key, **spec}
    return None


def spec_ceilings(spec: dict | None) -> dict:
    """A published spec in the same shape as from_records (B/s, FLOP/s)."""
    if not spec:
        return {"bandwidth": float("nan"), "flops": {}}
    return {"bandwidth": (spec.get("bandwidth_GBps") or float("nan")) * 1e9,
            "flops": {dt: v * 1e12 for dt, v in (spec.get("peak_TFLOPS") or {}).items()}}
