"""Quantized Linear layers per backend (methods.py), the Ascend NPU layers (npu.py) and the CPU decode kernels (cpu_gemv)."""
