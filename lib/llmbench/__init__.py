"""llmbench: measured inference efficiency of Llama 3.2 1B vs 3B on Ascend NPU, CUDA or CPU.

Data flow: data/grids/*.yaml -> runner -> papermill runs notebooks/NN_*.ipynb per grid point ->
data/runs/<grid>/<run_id>/{records.parquet, run.json, notebook} -> notebooks/99_report.ipynb ->
figures/ and report/index.html.
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
