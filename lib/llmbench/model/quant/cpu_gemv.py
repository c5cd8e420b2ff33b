"""CPU decode linears as one C kernel (cpu_gemv.c), built for this machine and called from compiled graphs.

At batch 1 a decode step is a chain of matrix-vector products: time is bytes of weights over read
bandwidth. Inductor's fused multiply-reduce reached 75-84% of the measured read bandwidth in bf16 on a
2-core EPYC; the C kernel reads four weight rows side by side and, where the CPU has AVX512-BF16,
multiplies bf16 pairs with vdpbf16ps (as llama.cpp does), or with AMX tiles where it has them, so bf16
costs half the bytes of fp32 and little compute.

`gemv` is a torch op (llmbench::gemv): torch.compile keeps it as one opaque call in the graph.
The shared library is compiled once per source, compiler and CPU (-march=native), cached outside the
repository; a machine without a C compiler gets `Unsupported` with the reason, and the compiled engine
records which linear path it used.
"""
import ctypes
import hashlib
import json
import os
import statistics
import subprocess
import time
from functools import cache
from pathlib import Path

import torch

from llmbench.core.errors import Unsupported
from llmbench.model.quant.npu import int8_per_channel
from llmbench.system.llamacpp_build import cpu_id

SOURCE = Path(__file__).with_suffix(".c")
MAX_ROWS = 16  # x rows (batch x tokens) up to which a linear is memory bound enough for this kernel
PREFILL_ROWS = 4096  # weight rows W8A8Linear widens to fp32 at a time beyond MAX_ROWS (<= 128 MB at K = 8192)
KEEP_MARGIN = 0.97  # a measured choice replaces the default only where it cuts the time by more than 3% (noise)
KERNELS = ("fp32", "bf16", "int8")
READ_STREAMS = (1, 4)  # read probes: one stream per thread, or four side by side as the kernels read


def _cpu_id() -> str:
    return cpu_id()


def _cache_dir() -> Path:
    return Path(os.environ.get("LLMBENCH_KERNEL_CACHE") or Path.home() / ".cache" / "llmbench" / "cpu_gemv")


@cache
def library() -> ctypes.CDLL:
    """Build (once per source, compiler and CPU) and load the kernel library; Unsupported without a compiler."""
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Unsupported(f"the CPU gemv kernel needs a C compiler ({cc}): {exc}") from None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, " ".join(flags), _cpu_id()]).encode()).hexdigest()[:16]
    so = _cache_dir() / f"libgemv-{key}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        p = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if p.returncode != 0:
            raise Unsupported(f"building the CPU gemv kernel with {cc} failed: {p.stderr.strip()[-300:]}")
        tmp.replace(so)  # atomic: a concurrent build never loads a half-written file
    lib = ctypes.CDLL(str(so))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gemv_f32.argtypes, lib.gemv_f32.restype = [ptr, ptr, ptr, i64, i64, i64], None
    lib.gemv_bf16.argtypes, lib.gemv_bf16.restype = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int], None
    lib.gemv_w8a8.argtypes, lib.gemv_w8a8.restype = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64], None
    lib.read_f32.argtypes, lib.read_f32.restype = [ptr, i64, i64], ctypes.c_float
    lib.gemv_paths.restype = ctypes.c_char_p
    lib.amx = bool(lib.amx_bf16_enable())
    lib.tuned = _tune(lib, so.with_suffix(".tuned.json"))
    return lib


def pick(seconds: dict, default=0):
    """The candidate to use from timings {candidate: [s, ...]}: the fastest median, if it beats the
    default by more than the noise margin, else the default."""
    med = {c: statistics.median(t) for c, t in seconds.items()}
    best = min(med, key=med.get)
    return best if med[best] < KEEP_MARGIN * med[default] else default


LAYER = ((2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192))  # 1B's linears


def candidates(lib, kernel: str) -> tuple:
    """The paths one kernel may take here: the C kernel first (the default), AMX tiles for bf16 where this
    build has them and the OS grants them, aten's own linear (MKL / oneDNN, what eager runs) for fp32 and bf16."""
    return {"fp32": ("C", "aten"), "bf16": ("C", *(("AMX",) if lib.amx else ()), "aten"), "int8": ("C",)}[kernel]


def _tune(lib, cached: Path) -> dict:
    """{kernel: {"path": the fastest candidate, "time_vs_C": each candidate's time over the C kernel's}},
    timed here on the linears of Llama 3.2 1B decoder layers, as many as make 464 MB (beyond the caches),
    in alternating rounds; once per library. int8 has one path and is not timed."""
    if cached.exists():
        tuned = json.loads(cached.read_text())
        if all(tuned[k]["path"] in candidates(lib, k) for k in KERNELS):  # e.g. AMX measured, now refused: again
            return tuned
    per_layer = sum(n * k for n, k in LAYER)
    # Random bytes (a constant buffer read faster on a VM: pages the host can share), every odd byte 0x3c:
    # the high byte of each bf16 and fp32, so every value is a normal float
    buf = torch.randint(0, 256, (4 * 2 * per_layer,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buf[1::2] = 0x3C
    x, y = torch.full((8192,), 0.5), torch.empty(8192)
    out = {"int8": {"path": "C", "time_vs_C": {}}}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        xs = {k: x[:k].to(dtype) for k in (2048, 8192)}
        ws, at = [], 0
        for _ in range(len(buf) // (dtype.itemsize * per_layer)):
            for n, k in LAYER:
                ws.append(buf[at:at + dtype.itemsize * n * k].view(dtype).view(n, k))
                at += dtype.itemsize * n * k

        def run(path, ws=ws, xs=xs, name=name):
            for w in ws:
                if path == "aten":
                    torch.nn.functional.linear(xs[w.shape[1]], w)
                elif name == "fp32":
                    lib.gemv_f32(xs[w.shape[1]].data_ptr(), w.data_ptr(), y.data_ptr(), 1, *w.shape)
                else:
                    lib.gemv_bf16(xs[w.shape[1]].data_ptr(), w.data_ptr(), y.data_ptr(), 1, *w.shape, path == "AMX")
        seconds = {c: [] for c in candidates(lib, name)}
        for i in range(6):
            for c in seconds:
                t0 = time.perf_counter()
                run(c)
                if i:  # the first round warms up
                    seconds[c].append(time.perf_counter() - t0)
        med = {c: statistics.median(t) for c, t in seconds.items()}
        out[name] = {"path": pick(seconds, "C"), "time_vs_C": {c: round(med[c] / med["C"], 3) for c in med if c != "C"}}
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(cached)
    return out


def choice(kernel: str) -> str:
    """What _tune chose for one kernel (fp32, bf16, int8), in words."""
    v = library().tuned[kernel]
    times = ", ".join(f"{c} {r}" for c, r in v["time_vs_C"].items())
    return f"{kernel} {'aten linear' if v['path'] == 'aten' else v['path']}" + (f" (time over C's: {times})" if times else "")


def paths() -> str:
    lib = library()
    measured = [choice(k) for k in KERNELS if len(candidates(lib, k)) > 1]  # int8 has one path: nothing to choose
    return (f"{lib.gemv_paths().decode()}; measured here on 1B's linears, each choice kept where it cut "
            f"the time by more than {1 - KEEP_MARGIN:.0%}: {'; '.join(measured)}")


def _check_shapes(x, w) -> None:
    """The kernels trust their sizes: a mismatch here would read past a buffer, so it is refused first."""
    if (w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1] or w.shape[1] == 0
            or x.device.type != "cpu" or w.device.type != "cpu"):
        raise ValueError(f"x {tuple(x.shape)} on {x.device} and w {tuple(w.shape)} on {w.device}: "
                         "need CPU tensors with x [..., k] and w [n, k], k > 0")


# The ops, registered plainly (no autograd: decode runs under inference_mode). A call cost 8 us here against
# 18 us through torch.library.custom_op's wrapper, and a 1B decode step makes 113 of them.
OPS = torch.library.Library("llmbench", "DEF")
OPS.define("gemv(Tensor x, Tensor w) -> Tensor")
OPS.define("gemv_w8a8(Tensor x, Tensor w, Tensor scale, Tensor wsum) -> Tensor")


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., k] @ w[n, k]^T for fp32 or bf16 CPU tensors of one dtype: the C kernel, its AMX path, or
    aten's linear, whichever _tune measured fastest on this machine."""
    if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"gemv takes fp32 or bf16 CPU tensors of one dtype, got {x.dtype} and {w.dtype} on {x.device}")
    _check_shapes(x, w)
    x, w = x.contiguous(), w.contiguous()
    lib = library()
    path = lib.tuned["fp32" if x.dtype == torch.float32 else "bf16"]["path"]
    if path == "aten":  # measured faster here (_tune): what eager runs, inside the graph
        return torch.nn.functional.linear(x, w)
    n, k = w.shape
    y = x.new_empty(*x.shape[:-1], n)
    if x.dtype == torch.float32:
        lib.gemv_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // k, n, k)
    else:
        lib.gemv_bf16(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // k, n, k, path == "AMX")
    return y


OPS.impl("gemv", gemv, "CPU")


@torch.library.register_fake("llmbench::gemv")
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def gemv_w8a8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, wsum: torch.Tensor) -> torch.Tensor:
    """x [..., k] fp32, quantized per row to int8 inside the kernel, @ w [n, k] int8 (per-row fp32 scale,
    int32 row sums) -> fp32."""
    if x.dtype != torch.float32 or w.dtype != torch.int8 or scale.dtype != torch.float32 or wsum.dtype != torch.int32:
        raise ValueError(f"gemv_w8a8 takes fp32 x, int8 w, fp32 scale, int32 wsum; got {x.dtype}, {w.dtype}, "
                         f"{scale.dtype}, {wsum.dtype}")
    _check_shapes(x, w)
    if scale.shape != (w.shape[0],) or wsum.shape != (w.shape[0],):
        raise ValueError(f"gemv_w8a8: scale {tuple(scale.shape)} and wsum {tuple(wsum.shape)} must be ({w.shape[0]},)")
    x, w, scale, wsum = x.contiguous(), w.contiguous(), scale.contiguous(), wsum.contiguous()
    n, k = w.shape
    y = x.new_empty(*x.shape[:-1], n)
    lib = library()
    lib.gemv_w8a8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), wsum.data_ptr(), y.data_ptr(),
                  x.numel() // k, n, k)
    return y


OPS.impl("gemv_w8a8", gemv_w8a8, "CPU")


@torch.library.register_fake("llmbench::gemv_w8a8")
def _(x, w, scale, wsum):
    return x.new_empty(*x.shape[:-1], w.shape[0])


class W8A8Linear(torch.nn.Module):
    """w8a8 through gemv_w8a8: int8 per-channel weights (the same quantization as every backend here,
    quant_npu.int8_per_channel), int8 per-token activations. Rows beyond MAX_ROWS (a CPU prefill) run
    the same integer product as fp32 matmul of the int8 values (exact below 2^24 per dot product), a
    slice of weight rows at a time."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        q, scale = int8_per_channel(lin.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("wsum", q.sum(1, dtype=torch.int32))
        self.out_features = lin.out_features

    def forward(self, x):
        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return torch.ops.llmbench.gemv_w8a8(x, self.weight, self.scale, self.wsum)
        sx = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
        xq = torch.round(x / sx).clamp_(-127, 127)
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for i in range(0, self.out_features, PREFILL_ROWS):  # fp32 copies of a slice, never of the whole weight
            y[..., i:i + PREFILL_ROWS] = xq @ self.weight[i:i + PREFILL_ROWS].t().float()
        return y * sx * self.scale


def read_f32(x: torch.Tensor, streams: int = 1) -> float:
    """Sum of a contiguous fp32 CPU tensor by the kernel library's read loop (the bandwidth probe), each
    thread reading 1 or 4 streams side by side (READ_STREAMS: the patterns of the kernels)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"read_f32 takes a contiguous fp32 CPU tensor, got {x.dtype} on {x.device}")
    if streams not in READ_STREAMS:
        raise ValueError(f"read_f32: streams must be one of {READ_STREAMS}, got {streams}")
    return library().read_f32(x.data_ptr(), x.numel(), streams)
