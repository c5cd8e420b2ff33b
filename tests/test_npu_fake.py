"""The NPU path against a fake torch_npu that records calls (no NPU can run here)."""
import pytest
import torch
from torch import nn

from llmbench.system import device
from llmbench.model.quant import methods as quant
from llmbench.core.errors import UserError
from llmbench.model.quant.npu import NpuW4A16Linear, NpuW8A8Linear, NpuW8A16Linear
from llmbench.core import errors


def test_npu_comes_first_when_torch_npu_is_available(fake_npu):
    npu, _ = fake_npu
    assert device.pick_device("auto") == "npu"
    assert device.torch_device("npu") == "npu:0"
    assert "is_available" in npu.names()


def test_npu_timer_uses_device_events_and_synchronizes(fake_npu):
    npu, _ = fake_npu
    out, seconds = device.timed(lambda: "done", "npu")
    assert out == "done" and seconds == pytest.approx(0.0125)
    names = npu.names()
    assert names[0] == "synchronize"  # queued work is drained before the start event
    assert names.count("Event") == 2 and all(k == {"enable_timing": True} for n, _, k in npu.calls if n == "Event")
    assert names.index("Event.record") < names.index("Event.synchronize") < names.index("Event.elapsed_time")
    assert names.count("Event.record") == 2


def test_npu_memory_statistics(fake_npu):
    npu, _ = fake_npu
    device.reset_peak_memory("npu")
    peak, label = device.peak_memory("npu")
    assert peak == 123456789 and "max_memory_allocated" in label
    assert device.free_memory("npu") == 60 * 2**30
    assert {"reset_peak_memory_stats", "max_memory_allocated", "mem_get_info"} <= set(npu.names())


def test_npu_describe_and_dtypes(fake_npu, monkeypatch):
    npu, _ = fake_npu
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "0")  # what torch_npu leaves under ipykernel
    npu.task_queue = 0
    info = device.describe("npu")
    assert info["device_name"] == "Ascend910B2" and info["torch_npu"] == "2.13.0-fake"
    assert info["cann"] == "8.5.0" and info["cann_source"] == "torch_npu.npu.get_cann_version()"
    # set once, explicitly, after the import; recorded from torch.npu.get_task_queue_enable(), not the env var
    assert info["task_queue_enable"] == device.TASK_QUEUE_AT_IMPORT == 1 and info["task_queue_env"] == "0"
    assert info["graph_compile_backend"].startswith("npugraph_ex")
    npu.set_task_queue_enable(2)  # an engine set its own mode: describe reports it, never resets it
    npu.chip = "Ascend310P3"
    info = device.describe("npu")
    assert info["task_queue_enable"] == 2 and npu.names().count("set_task_queue_enable") == 2
    assert info["graph_compile_backend"].startswith("npugraph_ex, tried at load") and "Ascend310P3" in \
        info["graph_compile_backend"]
    npu.chip = "Ascend910B2"
    device.check_dtype("npu", "bf16")
    npu.chip = "Ascend910A"  # first-generation 910: no bf16
    with pytest.raises(UserError, match=r"no bf16.*valid on npu: fp32, fp16"):
        device.check_dtype("npu", "bf16")


def _linear(k=256, n=64, dtype=torch.float16):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data.uniform_(-0.05, 0.05)
    return lin.to(dtype)


def test_w8a16_calls_weight_quant_batchmatmul_with_documented_layout(fake_npu):
    _, mod = fake_npu
    lin = _linear()
    q = NpuW8A16Linear(lin)
    x = torch.randn(2, 3, 256, dtype=torch.float16)
    y = q(x)
    name, info = mod.op_calls[-1]
    assert name == "npu_weight_quant_batchmatmul"
    assert info["x"] == ((6, 256), torch.float16)  # (M, K)
    assert info["weight"] == ((256, 64), torch.int8)  # (K, N)
    assert info["scale"] == ((64,), torch.float16)  # per channel, in the activation dtype
    assert y.shape == (2, 3, 64) and y.dtype == torch.float16
    ref = x.float() @ lin.weight.float().t()
    assert ((y.float() - ref).norm() / ref.norm()) < 0.02


def test_w8a8_quantizes_activations_per_token(fake_npu):
    _, mod = fake_npu
    lin = _linear(dtype=torch.bfloat16)
    q = NpuW8A8Linear(lin)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    y = q(x)
    (n1, i1), (n2, i2) = mod.op_calls[-2:]
    assert n1 == "npu_dynamic_quant" and i1["x"] == ((5, 256), torch.bfloat16)
    assert n2 == "npu_quant_matmul"
    assert i2["x1"] == ((5, 256), torch.int8) and i2["x2"] == ((256, 64), torch.int8)
    assert i2["scale"] == ((64,), torch.float32) and i2["pertoken"] == ((5,), torch.float32)
    assert i2["output_dtype"] == torch.bfloat16 and y.dtype == torch.bfloat16
    ref = x.float() @ lin.weight.float().t()
    assert ((y.float() - ref).norm() / ref.norm()) < 0.05


def test_w4a16_packs_int4_and_passes_group_scales(fake_npu):
    _, mod = fake_npu
    lin = _linear()
    q = NpuW4A16Linear(lin, group=128)
    pack = [c for c in mod.op_calls if c[0] == "npu_convert_weight_to_int4pack"][-1][1]
    assert pack["weight"] == ((256, 64), torch.int32) and -8 <= pack["lo"] and pack["hi"] <= 7
    x = torch.randn(4, 256, dtype=torch.float16)
    y = q(x)
    name, info = mod.op_calls[-1]
    assert name == "npu_weight_quant_batchmatmul"
    assert info["weight"] == ((256, 8), torch.int32)  # (K, N/8): 8 int4 per int32
    assert info["scale"] == ((2, 64), torch.float16) and info["group"] == 128  # (K/group, N)
    ref = x.float() @ lin.weight.float().t()
    assert ((y.float() - ref).norm() / ref.norm()) < 0.2


def test_quantize_on_npu_replaces_every_linear_and_refuses_fp32(fake_npu):
    from llmbench.model.models import load_model
    model, _ = load_model("tiny-1b", dtype="fp32", device="cpu")
    model = model.to(torch.float16)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    replaced = quant.quantize(model, "w8a16", "npu", "fp16")
    assert len(replaced) == n_linear == 7 * 2 + 1 and "lm_head" in replaced
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    with pytest.raises(errors.Unsupported, match="fp16/bf16 activations"):
        quant.quantize(model, "w8a8", "npu", "fp32")


def test_torch_npu_import_failure_names_a_cuda_build_of_torch(monkeypatch):
    import importlib.machinery
    import sys
    import types
    broken = types.ModuleType("torch_npu")
    broken.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` raises ImportError
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: broken.__spec__)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    mod, why = device.import_torch_npu()
    assert mod is None and "import torch_npu failed" in why and "CUDA build" in why
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CUDA build" not in device.import_torch_npu()[1]
