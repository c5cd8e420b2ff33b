"""Ascend chips by generation, and what torch_npu documents for each (bf16, quantized matmuls, graph mode).

A table, no torch_npu import: the device layer asks it whether a chip supports a feature, the NPU
quantized layers ask it before building. Sources: model/quant/npu.py's docstring; data/npu_unverified.yaml
lists what no NPU run has confirmed.
"""
import torch
import yaml

from llmbench.core.paths import DATA


_NOT_910 = ("torch_npu documents its quantized matmuls for Atlas A2/A3 and the Atlas inference series (310P); "
            "the first-generation Ascend 910 is not listed")


_A2_A3_ONLY = "documented for Atlas A2/A3 (Ascend910B1 and later) only"


# Chip names exactly as torch.npu.get_device_name() returns them (torch_npu NpuVariables.cpp, SocVersion).
# A plain "Ascend910B" is the first-generation 910 (below Ascend910B1: no bf16), not an A2 chip.
CHIPS = {
    "a2": ("Ascend910B1", "Ascend910B2", "Ascend910B2C", "Ascend910B3", "Ascend910B4", "Ascend910B4-1"),
    "a3": ("Ascend910_9391", "Ascend910_9392", "Ascend910_9381", "Ascend910_9382", "Ascend910_9372",
           "Ascend910_9362", "Ascend910_9363"),
    "910": ("Ascend910PremiumA", "Ascend910ProA", "Ascend910A", "Ascend910ProB", "Ascend910B"),
    "310p": ("Ascend310P1", "Ascend310P2", "Ascend310P3", "Ascend310P4", "Ascend310P5", "Ascend310P7"),
}


GENERATION = {name: gen for gen, names in CHIPS.items() for name in names}


# generation -> feature -> "" when documented, else why not. Features: bf16, the three methods, and graph
# (torch.compile backend npugraph_ex: where undocumented it is still tried, since vllm-ascend captures ACL
# graphs on 310P, and a failed capture is recorded). 310P runs w8a16 in fp16 only (its x and scale must be fp16).
SUPPORT = {
    "a2": {"bf16": "", "w8a16": "", "w4a16": "", "w8a8": "", "graph": ""},
    "a3": {"bf16": "", "w8a16": "", "w4a16": "", "w8a8": "", "graph": ""},
    "310p": {"bf16": "no bf16 on 310P",
             "w8a16": "",
             "w4a16": f"int4 weights and per-group scales in npu_weight_quant_batchmatmul are {_A2_A3_ONLY}",
             "w8a8": f"npu_dynamic_quant is {_A2_A3_ONLY}, and npu_quant_matmul takes no per-token scale on 310P",
             "graph": f"npugraph_ex graph mode is {_A2_A3_ONLY}"},
    "910": {"bf16": "no bf16 on the first-generation Ascend 910",
            "w8a16": _NOT_910, "w4a16": _NOT_910, "w8a8": _NOT_910,
            "graph": f"npugraph_ex graph mode is {_A2_A3_ONLY}"},
}


FEATURES = tuple(SUPPORT["a2"])


def chip_supports(chip_name: str, feature: str) -> tuple[bool, str]:
    """(True, "") when torch_npu documents `feature` on this exact chip, else (False, why)."""
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r}; valid: {', '.join(FEATURES)}")
    gen = GENERATION.get(chip_name)
    if gen is None:
        return False, f"chip {chip_name!r} is not in llmbench's chip table ({', '.join(GENERATION)})"
    why = SUPPORT[gen][feature]
    return (not why), (f"{chip_name}: {why}" if why else "")


def method_refusal(chip_name: str, method: str, dtype: str) -> str:
    """Why `method` at activation `dtype` cannot run on this chip, or "" when it can."""
    if dtype not in ("fp16", "bf16"):
        return f"torch_npu quantized matmuls take fp16/bf16 activations, not {dtype}"
    for feature in (method, "bf16") if dtype == "bf16" else (method,):
        ok, why = chip_supports(chip_name, feature)
        if not ok:
            return why
    return ""


def chip_name() -> str:
    """The NPU's chip name (needs torch_npu imported, which device.py does when it picks npu)."""
    return torch.npu.get_device_name(0)


def unverified() -> list[dict]:
    """NPU behaviour this project follows from documentation but has not seen run (for the report's limitations)."""
    return yaml.safe_load((DATA / "npu_unverified.yaml").read_text())["unverified"]
