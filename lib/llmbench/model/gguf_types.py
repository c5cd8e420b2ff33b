"""The llama.cpp side of the study's vocabulary: the GGUF type that is a (dtype, quant) on a backend, the KV cache
type of a dtype, and llama.cpp's name for each device kind (the llamacpp engine and the llama-server of
04_serving map them the same way)."""
from llmbench.core.errors import Unsupported


KV_TYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


BACKEND = {"cpu": "CPU", "cuda": "CUDA", "npu": "CANN"}  # llama.cpp's name for each device kind


def gguf_type(dtype: str, quant: str, kind: str) -> str:
    """The GGUF type that is this (dtype, quant) on this backend, or Unsupported with the reason."""
    if quant == "none":
        return KV_TYPE[dtype]
    if quant == "w8a8" and kind != "npu":
        return "Q8_0"
    if quant == "w8a16" and kind == "npu":
        return "Q8_0"
    if quant == "w4a16":
        return "Q4_0"
    if quant == "w8a8":
        raise Unsupported("llama.cpp's CANN backend dequantizes Q8_0 weights to fp16 (that is w8a16): no int8-activation type")
    if quant == "w8a16":
        raise Unsupported(f"llama.cpp's {BACKEND[kind]} Q8_0 matmul quantizes the activations to int8 (that is w8a8): "
                          "no int8-weight type with 16-bit activations")
    raise Unsupported(f"no llama.cpp type for quant {quant!r}")


MEANING = {
    "F32": "fp32 weights, fp32 matmuls",
    "F16": "fp16 weights; matmul inputs converted to fp16",
    "BF16": "bf16 weights; matmul inputs converted to bf16",
    "Q8_0": "int8 weights in blocks of 32 with an fp16 scale each; activations quantized to int8 blocks, int8 dot products",
    "Q8_0/npu": "int8 weights in blocks of 32 with an fp16 scale each, dequantized by CANN; fp16 matmuls",
    "Q4_0": "int4 weights in blocks of 32 with an fp16 scale each; activations quantized to int8 blocks (w4a8)",
    "Q4_0/npu": "int4 weights in blocks of 32 with an fp16 scale each, dequantized by CANN; fp16 matmuls",
}
