"""The device: pick npu, then cuda, then cpu; synchronize, time, and read peak memory correctly on it.

torch_npu is only ever imported here, guarded: without CANN it cannot load, and it cannot share a
process with a CUDA build of torch. Since torch_npu 2.5.1 torch auto-loads it at `import torch`;
TORCH_DEVICE_BACKEND_AUTOLOAD=0 (set by llmbench/__init__.py before torch loads) turns that off, and
then we import it explicitly when probing.

Task queue: torch_npu sets TASK_QUEUE_ENABLE=0 when it is imported under ipykernel (papermill always
runs one; wheel torch_npu/_init/core/optional_features.py), so the mode is set explicitly once torch_npu
has loaded (set_task_queue) and read back from torch.npu.get_task_queue_enable(), never from the env var.
"""
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

from llmbench.core import paths
from llmbench.core.errors import UserError, check_choice
from llmbench.system.npu_chips import chip_supports

DEVICES = ("auto", "npu", "cuda", "cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# torch.npu.set_task_queue_enable modes (torch_npu/npu/utils.py): 0 synchronous dispatch, 1 the default
# outside interactive shells, 2 "highest throughput, pure-inference only". NPU graph capture refuses 2.
TASK_QUEUE_MODES = (0, 1, 2)
TASK_QUEUE_AT_IMPORT = 1  # what a script gets: undoes the 0 torch_npu picks under ipykernel
_task_queue_set = False


def import_torch_npu():
    """(module, "") when torch_npu imports, else (None, why not). The first successful import sets the
    task queue mode explicitly (TASK_QUEUE_AT_IMPORT); engines set their own at load."""
    global _task_queue_set
    if importlib.util.find_spec("torch_npu") is None:
        return None, "torch_npu is not installed"
    try:
        import torch_npu
    except Exception as e:  # a missing CANN shows up as any kind of error
        hint = "" if torch.version.cuda is None else (
            f" (torch {torch.__version__} is a CUDA build: torch_npu needs the CPU build of torch, see README 'Ascend NPU')")
        return None, f"import torch_npu failed: {type(e).__name__}: {e}{hint}"
    if not _task_queue_set:
        _task_queue_set = True
        set_task_queue(TASK_QUEUE_AT_IMPORT)
    return torch_npu, ""


def set_task_queue(mode: int) -> int:
    """Set torch_npu's task queue mode and return the mode now in effect, as torch_npu reports it
    (ASCEND_LAUNCH_BLOCKING=1 keeps it at 0 whatever is set). It drains every NPU stream: load time only."""
    if mode not in TASK_QUEUE_MODES:
        raise UserError(f"task_queue {mode!r} is not a torch_npu task queue mode; valid: 0, 1, 2")
    torch.npu.set_task_queue_enable(mode)
    return int(torch.npu.get_task_queue_enable())


def availability(kind: str) -> tuple[bool, str]:
    """Whether a device kind can be used here, and why not."""
    if kind == "cpu":
        return True, ""
    if kind == "cuda":
        return (True, "") if torch.cuda.is_available() else (False, "torch.cuda.is_available() is False")
    mod, why = import_torch_npu()
    if mod is None:
        return False, why
    try:
        ok = bool(torch.npu.is_available())
    except Exception as e:
        return False, f"torch.npu.is_available() failed: {e}"
    return (True, "") if ok else (False, "torch.npu.is_available() is False")


def pick_device(requested: str = "auto") -> str:
    """npu, then cuda, then cpu. A parameter other than auto wins; else LLMBENCH_DEVICE; else detect."""
    if requested in (None, "", "auto"):
        requested = os.environ.get("LLMBENCH_DEVICE", "auto") or "auto"
    check_choice("device", requested, DEVICES)
    if requested != "auto":
        ok, why = availability(requested)
        if not ok:
            valid = [k for k in DEVICES[1:] if availability(k)[0]]
            raise UserError(f"device {requested!r} is not available here ({why}); available: {', '.join(valid)}")
        return requested
    for kind in ("npu", "cuda"):
        if availability(kind)[0]:
            return kind
    return "cpu"


def torch_device(kind: str) -> str:
    """The device string torch APIs take ("npu" only parses once torch_npu has registered it)."""
    return "cpu" if kind == "cpu" else f"{kind}:0"


def backend(kind: str):
    """torch.cuda or torch.npu: both expose the same synchronize/Event/memory-statistics API."""
    return getattr(torch, kind)


def cpu_flags() -> set[str]:
    try:
        m = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return set(m.group(1).split()) if m else set()
    except OSError:
        return set()


CPU_RATE_SHAPE = (256, 2048, 2048)  # a prefill-sized matmul: tokens x hidden @ hidden x hidden


def cpu_matmul_rates() -> dict[str, float]:
    """GFLOP/s of a prefill-sized matmul per dtype on this CPU, measured once per machine and torch
    version (cached under data/cache/): whether bf16/fp16 are fast depends on the CPU (AMX, AVX512-BF16)
    and the torch build, so it is measured, never assumed."""
    import json
    key = re.sub(r"[^\w.-]+", "_", f"{cpu_model()}-{torch.get_num_threads()}t-torch{torch.__version__}")
    cache = paths.DATA / "cache" / f"cpu-matmul-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    m, k, n = CPU_RATE_SHAPE
    rates = {}
    for name, dt in DTYPES.items():
        a, b = torch.rand(m, k).to(dt), torch.rand(k, n).to(dt)
        a @ b  # warm-up
        best, budget = float("inf"), time.perf_counter() + 2.0  # a slow dtype gets two seconds, not minutes
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() > budget:
                break
        rates[name] = 2 * m * k * n / best / 1e9
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rates))
    return rates


def usable_dtypes(kind: str) -> dict[str, str]:
    """dtype name -> "" if usable on this device kind, else the reason it is not.

    On the CPU a 16-bit dtype is usable when its measured matmul rate is at least half of fp32's
    (on CPUs without a native path it runs hundreds of times slower, which would time a fallback)."""
    if kind == "cpu":
        rates, flags = cpu_matmul_rates(), cpu_flags()
        have = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16") if f in flags) or "none"
        return {name: "" if name == "fp32" or rates[name] >= 0.5 * rates["fp32"] else
                f"no fast kernel on this CPU: {name} matmul measured at {rates[name]:.3g} GFLOP/s against "
                f"{rates['fp32']:.3g} for fp32 (16-bit CPU flags: {have})" for name in DTYPES}
    bf16 = getattr(backend(kind), "is_bf16_supported", lambda: True)()
    return {"fp32": "", "fp16": "", "bf16": "" if bf16 else f"this {kind} device has no bf16 (e.g. Ascend 910A, 310P)"}


def fastest_dtype(kind: str) -> str:
    """bf16 where it is usable on this device (measured on the CPU), else fp16 on accelerators, else fp32."""
    usable = usable_dtypes(kind)
    return next(d for d in ("bf16", "fp16", "fp32") if not usable[d] and (d != "fp16" or kind != "cpu"))


def check_dtype(kind: str, dtype: str) -> None:
    check_choice("dtype", dtype, DTYPES)
    why = usable_dtypes(kind)[dtype]
    if why:
        ok = [d for d, w in usable_dtypes(kind).items() if not w]
        raise UserError(f"dtype {dtype!r} cannot run on {kind}: {why}; valid on {kind}: {', '.join(ok)}")


def synchronize(kind: str) -> None:
    if kind != "cpu":
        backend(kind).synchronize()


def timed(fn, kind: str):
    """Run fn() once; return (its result, seconds). Device events on npu/cuda, perf_counter on cpu.

    We synchronize first so that queued work from before is not billed to fn; dispatch is
    asynchronous on both accelerators, so the end is read only after the end event completes.
    """
    synchronize(kind)
    if kind == "cpu":
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0
    start, end = backend(kind).Event(enable_timing=True), backend(kind).Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end) / 1e3


def _read_status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak_memory(kind: str) -> bool:
    """Start a new peak-memory window. On cpu, writing 5 to clear_refs resets the process's VmHWM."""
    if kind != "cpu":
        backend(kind).reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(kind: str) -> tuple[int, str]:
    """(bytes, what was measured) since the last reset_peak_memory."""
    if kind != "cpu":
        return int(backend(kind).max_memory_allocated()), f"torch.{kind}.max_memory_allocated (allocator peak)"
    hwm = _read_status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024, "process peak RSS (VmHWM, reset per measurement)"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS since start (not resettable)"


def free_memory(kind: str) -> int:
    """Bytes that can still be allocated: the device's free memory, or MemAvailable on cpu."""
    if kind != "cpu":
        return int(backend(kind).mem_get_info()[0])
    m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(m.group(1)) * 1024


def empty_cache(kind: str) -> None:
    import gc
    gc.collect()
    if kind != "cpu":
        backend(kind).empty_cache()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "failed to allocate" in msg


def _first_line(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        return ""


def _ascend_versions() -> dict:
    """CANN toolkit and driver versions from their install info files, where readable."""
    out = {}
    home = Path(os.environ.get("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest"))
    # ascend_toolkit_install.info: "version=8.0.0" (its "innerversion=V100R001C20..." is not it).
    # version.cfg: "toolkit_running_version=[7.6.0.1.220:8.0.0]": the component build, then the CANN release.
    for key, path, field in (("cann", home / "arm64-linux/ascend_toolkit_install.info", r"^version=([\w.-]+)"),
                             ("cann", home / "x86_64-linux/ascend_toolkit_install.info", r"^version=([\w.-]+)"),
                             ("cann", home / "version.cfg", r"^\w*_running_version=\[[^:\]]*:([^\]\s]+)\]"),
                             ("ascend_driver", Path("/usr/local/Ascend/driver/version.info"), r"^Version=([\w.-]+)")):
        if key not in out and path.is_file():
            m = re.search(field, path.read_text(errors="replace"), re.M)
            if m:
                out[key] = m.group(1)
    return out


def cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def thp_alloc() -> str:
    """Whether torch's large CPU allocations ask for transparent huge pages (see llmbench/__init__.py),
    and what the kernel grants: with THP "never", the request does nothing."""
    try:
        mode = re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(1)
    except (OSError, AttributeError):
        mode = "unknown"
    v = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    return f"{'requested' if v == '1' else 'not requested'} (THP_MEM_ALLOC_ENABLE={v}); kernel THP mode {mode}"


def describe(kind: str) -> dict:
    """The device and software a measurement ran on, for run.json and the report."""
    import transformers
    info = {
        "device": kind,
        "host": platform.node(),  # with device_name, the key of this device's ceilings (ceilings.this_device)
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "host_memory_bytes": int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
                                 .group(1)) * 1024,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_thp_alloc": thp_alloc(),
    }
    if kind == "cpu":
        info.update(device_name=info["cpu_model"], device_count=1)
        return info
    mod = backend(kind)
    info.update(device_name=mod.get_device_name(0), device_count=mod.device_count(),
                device_memory_bytes=int(mod.mem_get_info()[1]))
    if kind == "cuda":
        info.update(cuda=torch.version.cuda,
                    nvidia_driver=_first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        info.update(_describe_npu(info["device_name"]))
    return info


def _describe_npu(chip: str) -> dict:
    """torch_npu and CANN versions (CANN pairs with torch_npu), and the settings that decide whether eager
    decode is launch-bound: the task queue mode (asynchronous dispatch) and the graph backend this chip has."""
    torch_npu, _ = import_torch_npu()
    files = _ascend_versions()
    try:
        cann, source = torch_npu.npu.get_cann_version(), "torch_npu.npu.get_cann_version()"
    except Exception as e:  # older torch_npu, or CANN not readable: the toolkit's version file, labelled so
        cann, source = files.get("cann", ""), f"toolkit version file (get_cann_version failed: {type(e).__name__})"
    graph, why = chip_supports(chip, "graph")
    return {**files, "torch_npu": getattr(torch_npu, "__version__", "unknown"), "cann": cann, "cann_source": source,
            # the mode in effect now (engines set their own at load and name it in their description);
            # the env var only says what the process started with (torch_npu rewrites it under ipykernel)
            "task_queue_enable": int(torch.npu.get_task_queue_enable()),
            "task_queue_env": os.environ.get("TASK_QUEUE_ENABLE", "unset"),
            "graph_compile_backend": "npugraph_ex (torch.compile; engine=compiled)" if graph else
            f"npugraph_ex, tried at load (engine=compiled): {why}"}
