"""llmbench: measured inference efficiency of Llama 3.2 1B vs 3B on Ascend NPU, CUDA or CPU.

Data flow, one folder per stage:
    data/grids/*.yaml -> orchestration/ (one process per grid point; executor local or ray)
    -> papermill runs notebooks/NN_*.ipynb -> experiments/ -> engines/ (one interface) over model/,
       timed by measure/ on system/
    -> data/runs/<grid>/<run_id>/{records.parquet, run.json, notebook}
    -> notebooks/99_report.ipynb: results/ -> claims/ -> report/ -> figures/, report/index.html

The import rule (tests/test_layers.py checks it from the code): a module imports its own folder or a
lower layer, never a higher one, and there is no import cycle.
    core                 paths, errors (UserError, Unsupported), configuration keys, statistics, files
    system               device, NPU chips, noise watch, energy meters, native builds, kernel, provenance
    model                configs and weights, Llama, tokenizers, inputs, cost model, quant/
    engines              the engine interface and registry (__init__), eager, compiled, llamacpp
    measure              timing, ceilings, records, fidelity
    experiments          parameters, the run session, one module per notebook
    orchestration        grids, run folders, points, executors, estimates  (core, system, model, experiments.params)
    results              frames over the records, ratios, anomalies  (never engines or experiments)
    claims, report       the seed's claims judged; the report's sections and figures
Outside engines/ only the interface (llmbench.engines) is imported, never an engine module. Imports inside
functions only in the registries that import what was chosen by name (engines, executors, cli's commands).
"""
import os
import sys

__version__ = "0.1.0"

# Transparent huge pages for torch's large CPU buffers (weights, KV cache). torch reads
# THP_MEM_ALLOC_ENABLE once, at its first allocation, so it is set here, before this package imports
# torch, unless torch came first (then the process keeps what it started with). On a 2-core EPYC the
# decode kernels read 4 KiB-page weights 5-10% slower than llama.cpp's file-backed ones and equal with
# huge pages. device.describe records the setting and the kernel's THP mode in every run.json.
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # torch-npu registers a `torch.backends` entry point that torch loads at `import torch`; where CANN
    # is not sourced that import raises, and `import torch` with it. Off by default, here (the CLI, the
    # runner, every notebook kernel and Ray worker imports this package before torch, and child
    # processes inherit it): device.py imports torch_npu itself, guarded, when it probes for an NPU.
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
