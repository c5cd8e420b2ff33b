"""The NPU quantization path against a fake torch_npu that refuses what the real kernels refuse (conftest.py),
on the real Llama 3.2 shapes (vocabulary 128,256, hidden 2048 and 3072, ffn 8192; one layer), per chip."""
import copy

import pytest
import torch
from torch import nn

from conftest import NpuKernelError, fake_torch_npu, unpack_int4
from llmbench.model.quant import methods as quant
from llmbench.model.quant import npu as quant_npu
from llmbench.system.device import DTYPES
from llmbench.model.models import load_config
from llmbench.core import errors
from llmbench.system import npu_chips

# What torch_npu's docs say each chip runs (independent of quant_npu's table): "ran" or a word of the refusal.
EXPECTED = {
    "a2": {"w8a16": "ran", "w8a8": "ran", "w4a16": "ran"},
    "a3": {"w8a16": "ran", "w8a8": "ran", "w4a16": "ran"},
    "310p": {"w8a16": "ran", "w8a8": "per-token", "w4a16": "int4"},
    "910": {"w8a16": "not listed", "w8a8": "not listed", "w4a16": "not listed"},
}
# Real shapes on one or two chips per generation (a forward of the 128,256-column head costs seconds here);
# every other known chip name goes through the same gate and kernels at tiny shapes (test_every_chip_name).
CHIPS = {"Ascend910B2": "a2", "Ascend910B4": "a2", "Ascend910_9392": "a3", "Ascend910A": "910", "Ascend910B": "910",
         "Ascend310P3": "310p"}
BOUND = {"w8a16": 0.03, "w8a8": 0.05, "w4a16": 0.25}  # relative logit error against the fp32 model


def _dtype(chip):
    return "fp16" if CHIPS[chip] in ("310p", "910") else "bf16"  # bf16 only from Ascend910B1 on


_models, _refs = {}, {}


def build_real_shape(name: str):
    """A one-layer model with the real architecture of `name` (full vocabulary), fp32, seeded."""
    from transformers import LlamaForCausalLM
    cfg = load_config(name)
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if "norm" in n else p.uniform_(-0.02, 0.02)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # its buffers were left empty on meta
    return model


def real_shape_model(name: str):
    if name not in _models:
        _models[name] = build_real_shape(name)
    return _models[name]


_quantized = {}


def run_method(monkeypatch, chip, method, model_name="llama-3.2-1b", tokens=4):
    """Quantize a real-shape model on a fake `chip` and run one forward: ('ran', info) or ('refused', why).

    The chip gate is llmbench's own (quant.quantize on the tiny model, the same code path); a model of the real
    shapes is quantized once per (model, method, dtype) and its forward runs on every chip the gate admits,
    where the fake checks each op against its own chip table."""
    from llmbench.model.models import load_model
    _, mod = fake_torch_npu(monkeypatch, chip=chip)
    dtype = _dtype(chip)
    tiny, _ = load_model("tiny-1b", dtype="fp32", device="cpu")
    try:
        quant.quantize(tiny.to(DTYPES[dtype]), method, "npu", dtype)
    except errors.Unsupported as e:
        return "refused", str(e)
    key = (model_name, method, dtype)
    if key not in _quantized:
        model = copy.deepcopy(real_shape_model(model_name)).to(DTYPES[dtype])
        _quantized[key] = model, quant.quantize(model, method, "npu", dtype)
    model, replaced = _quantized[key]
    base = real_shape_model(model_name)
    ids = torch.arange(tokens)[None] * 997 % base.config.vocab_size
    del mod.op_calls[:]
    with torch.no_grad():
        y = model(ids).logits.float()
        if (model_name, tokens) not in _refs:
            _refs[model_name, tokens] = base(ids).logits.float()
        ref = _refs[model_name, tokens]
    return "ran", dict(replaced=replaced, logits=y, err=float((y - ref).norm() / ref.norm()), calls=mod.op_calls,
                       weight_bytes=quant.weight_bytes(model), read_bytes=quant.streamed_weight_bytes(model),
                       model=model)


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _models.clear(), _refs.clear(), _quantized.clear()


@pytest.mark.parametrize("method", ["w8a16", "w8a8", "w4a16"])
@pytest.mark.parametrize("chip", list(CHIPS))
def test_real_llama_shapes_per_chip(monkeypatch, chip, method):
    outcome, info = run_method(monkeypatch, chip, method)
    want = EXPECTED[CHIPS[chip]][method]
    print(f"\n{chip:15s} {method:6s} {_dtype(chip)}: {outcome}"
          + (f" (rel. logit error {info['err']:.4f})" if outcome == "ran" else f": {info}"))
    if want != "ran":
        assert outcome == "refused" and want in info
        return
    assert outcome == "ran", info
    assert info["logits"].shape == (1, 4, 128256) and torch.isfinite(info["logits"]).all()
    assert len(info["replaced"]) == 7 + 1 and "lm_head" in info["replaced"]
    assert info["err"] < BOUND[method]
    # the LM head ran as two calls of 64,128 columns: no call above the kernels' 65,535
    mm = [c for c in info["calls"] if c[0] in ("npu_weight_quant_batchmatmul", "npu_quant_matmul")]
    ns = [c[1]["scale"][0][-1] for c in mm]
    assert max(ns) == 64128 and ns.count(64128) == 2


def test_real_3b_shapes_on_a2(monkeypatch):
    """hidden 3072 (24 heads of 128) and its 128,256 x 3072 LM head, w8a16 on an Ascend910B2. One model, converted
    and quantized in place after its fp32 reference (3B tensors are large; int4 at 3B: the next test)."""
    _, mod = fake_torch_npu(monkeypatch, chip="Ascend910B2")
    model = build_real_shape("llama-3.2-3b")
    ids = torch.arange(3)[None] * 997 % 128256
    with torch.no_grad():
        ref = model(ids).logits.float()
        replaced = quant.quantize(model.to(torch.bfloat16), "w8a16", "npu", "bf16")
        y = model(ids).logits.float()
    err = float((y - ref).norm() / ref.norm())
    print(f"\nAscend910B2 llama-3.2-3b w8a16 bf16: ran (rel. logit error {err:.4f})")
    assert len(replaced) == 8 and y.shape == (1, 3, 128256) and err < BOUND["w8a16"]
    shapes = {c[1]["weight"][0] for c in mod.op_calls if c[0] == "npu_weight_quant_batchmatmul"}
    assert (3072, 64128) in shapes and (8192, 3072) in shapes  # head chunks (K, N); down_proj


@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 1024), (3072, 8192), (8192, 3072)])
def test_w4a16_on_3b_layer_shapes(monkeypatch, k, n):
    """Every 3B projection shape through int4 packing and group-wise scales (K = 3072: 24 groups of 128)."""
    _, mod = fake_torch_npu(monkeypatch, chip="Ascend910B2")
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    g = quant_npu.group_size([k])
    q = quant_npu.NpuW4A16Linear(lin, g)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    y = q(x)
    call = mod.op_calls[-1][1]
    assert g == 128 and call["weight"] == ((k, n // 8), torch.int32) and call["scale"] == ((k // 128, n), torch.bfloat16)
    ref = x.float() @ lin.weight.detach().float().t()
    assert float((y.float() - ref).norm() / ref.norm()) < 0.2


@pytest.mark.parametrize("chip", [c for c in npu_chips.GENERATION if c not in CHIPS])
def test_every_chip_name(monkeypatch, chip):
    """Each known chip name through llmbench's gate and the fake's kernels (tiny shapes): ran or refused as documented."""
    from llmbench.model.models import load_model
    gen = npu_chips.GENERATION[chip]
    for method in ("w8a16", "w8a8", "w4a16"):
        _, mod = fake_torch_npu(monkeypatch, chip=chip)
        dtype = "bf16" if gen in ("a2", "a3") else "fp16"
        model, _ = load_model("tiny-1b", dtype="fp32", device="cpu")
        model = model.to(DTYPES[dtype])
        want = EXPECTED[gen][method]
        try:
            quant.quantize(model, method, "npu", dtype)
        except errors.Unsupported as e:
            print(f"\n{chip:15s} {method:6s} {dtype}: refused: {e}")
            assert want != "ran" and want in str(e)
            continue
        y = model(torch.arange(5)[None]).logits
        print(f"\n{chip:15s} {method:6s} {dtype}: ran (tiny shapes)")
        assert want == "ran" and torch.isfinite(y.float()).all() and mod.op_calls


def test_lm_head_bytes_are_the_chunks(monkeypatch):
    """The quantized head is stored once, as int8 chunks plus scales; the tied embedding is not streamed."""
    _, info = run_method(monkeypatch, "Ascend910B2", "w8a16")
    head = info["model"].lm_head
    v, d = 128256, 2048
    assert head.n_chunks == 2 and head.weight0.shape == (64128, d) and head.weight1.dtype == torch.int8
    assert sum(getattr(head, f"{n}{i}").numel() * getattr(head, f"{n}{i}").element_size()
               for n in ("weight", "scale") for i in range(2)) == v * d + v * 2
    emb = v * d * 2  # bf16 embedding table kept for the lookup
    assert info["weight_bytes"] - info["read_bytes"] == emb


# --- the fake enforces the documented contracts: each refusal is one that the real kernel makes -----

def _wqbmm(mod, **kw):
    k, n = kw.pop("k", 256), kw.pop("n", 64)
    x = kw.pop("x", torch.randn(2, k, dtype=torch.float16))
    w = kw.pop("weight", torch.zeros(n, k, dtype=torch.int8).t())
    s = kw.pop("scale", torch.ones(n, dtype=x.dtype))
    return mod.npu_weight_quant_batchmatmul(x, w, s, **kw)


def test_fake_refuses_what_weight_quant_batchmatmul_refuses(monkeypatch):
    _, mod = fake_torch_npu(monkeypatch)
    assert _wqbmm(mod).shape == (2, 64)
    with pytest.raises(NpuKernelError, match="k,n shouldn't be larger than 65535"):
        _wqbmm(mod, k=64, n=128256)  # an unsplit Llama LM head
    with pytest.raises(NpuKernelError, match="must equal x's"):
        _wqbmm(mod, scale=torch.ones(64, dtype=torch.float32))
    q = torch.zeros(256, 64, dtype=torch.int32)
    packed = mod.npu_convert_weight_to_int4pack(q)
    for g, msg in ((16, "multiple of 32"), (48, "multiple of 32"), (256, "multiple of 32")):
        with pytest.raises(NpuKernelError, match=msg):
            _wqbmm(mod, weight=packed, scale=torch.ones(256 // max(g, 1), 64, dtype=torch.float16),
                   antiquant_group_size=g)
    with pytest.raises(NpuKernelError, match="antiquant_scale shape"):
        _wqbmm(mod, weight=packed, scale=torch.ones(64, dtype=torch.float16), antiquant_group_size=128)
    assert _wqbmm(mod, weight=packed, scale=torch.ones(2, 64, dtype=torch.float16), antiquant_group_size=128).shape \
        == (2, 64)


def test_fake_int4pack_rules_and_layout(monkeypatch):
    _, mod = fake_torch_npu(monkeypatch)
    q = torch.randint(-8, 8, (16, 32), dtype=torch.int32)
    packed = mod.npu_convert_weight_to_int4pack(q)
    assert packed.shape == (16, 4) and packed.dtype == torch.int32 and torch.equal(unpack_int4(packed), q.to(torch.int8))
    assert int(mod.npu_convert_weight_to_int4pack(torch.tensor([[1, 2, 0, 0, 0, 0, 0, 0]], dtype=torch.int32))) \
        == 0x21  # low nibble first
    for bad, msg in ((q.t(), "contiguous"), (q[:, :12].contiguous(), "multiple of 8"), (q + 8, r"\[-8, 7\]"),
                     (q.to(torch.int8), "int32"), (q.reshape(2, 8, 32), "dim num 2")):
        with pytest.raises(NpuKernelError, match=msg):
            mod.npu_convert_weight_to_int4pack(bad)


def test_fake_dynamic_quant_and_quant_matmul_rules(monkeypatch):
    npu, mod = fake_torch_npu(monkeypatch)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    xq, s = mod.npu_dynamic_quant(x)
    assert xq.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (5,)
    for bad, msg in ((x.float(), "fp16 or bf16"), (x[0], "greater than 1")):
        with pytest.raises(NpuKernelError, match=msg):
            mod.npu_dynamic_quant(bad)
    w = torch.zeros(32, 64, dtype=torch.int8).t()
    ok = dict(pertoken_scale=s, output_dtype=torch.bfloat16)
    assert mod.npu_quant_matmul(xq, w, torch.ones(32), **ok).dtype == torch.bfloat16
    assert mod.npu_quant_matmul(xq, w, torch.ones(32), pertoken_scale=s, output_dtype=15).dtype == torch.bfloat16
    assert mod.npu_quant_matmul(xq, w, torch.ones(32), pertoken_scale=s, output_dtype=torch.float16).dtype \
        == torch.float16
    for kw, msg in ((dict(ok, output_dtype=torch.float32), "unsupported combination"),
                    (dict(ok, pertoken_scale=s.half()), "pertoken_scale must be float32"),
                    (dict(ok, pertoken_scale=s[:4]), r"pertoken_scale must be float32 \(5,\)"),
                    (dict(pertoken_scale=s, output_dtype=torch.int8), "unsupported combination")):
        with pytest.raises(NpuKernelError, match=msg):
            mod.npu_quant_matmul(xq, w, torch.ones(32), **kw)
    with pytest.raises(NpuKernelError, match="unsupported combination"):  # bf16 scale only for bf16/int32 output
        mod.npu_quant_matmul(xq, w, torch.ones(32, dtype=torch.bfloat16), pertoken_scale=s, output_dtype=torch.float16)
    with pytest.raises(NpuKernelError, match="must not exceed 65535"):
        mod.npu_quant_matmul(torch.zeros(1, 8, dtype=torch.int8), torch.zeros(128256, 8, dtype=torch.int8).t(),
                             torch.ones(128256), pertoken_scale=torch.ones(1), output_dtype=torch.bfloat16)
    npu.chip = "Ascend310P3"  # inference series: no per-token scale, no dynamic quant
    with pytest.raises(NpuKernelError, match="not supported on Ascend310P3"):
        mod.npu_dynamic_quant(x.half())
    with pytest.raises(NpuKernelError, match="pertoken_scale is not supported"):
        mod.npu_quant_matmul(xq, w, torch.ones(32), pertoken_scale=s, output_dtype=torch.float16)


def test_fake_refuses_quantized_layers_on_chips_that_lack_them(monkeypatch):
    """Bypassing llmbench's gate, the layers hit the fake's own chip table: the gate is not the only check."""
    npu, _ = fake_torch_npu(monkeypatch, chip="Ascend910A")
    lin = nn.Linear(256, 64, bias=False).half()
    with pytest.raises(NpuKernelError, match="not supported on Ascend910A"):
        quant_npu.NpuW8A16Linear(lin)(torch.randn(2, 256, dtype=torch.float16))
    npu.chip = "Ascend310P3"
    with pytest.raises(NpuKernelError, match="not supported on Ascend310P3"):
        quant_npu.NpuW4A16Linear(lin, 128)


# --- the chip table -----------------------------------------------------------------------------

def test_chip_names_match_exactly():
    assert npu_chips.chip_supports("Ascend910B2", "bf16") == (True, "")
    ok, why = npu_chips.chip_supports("Ascend910B", "bf16")  # first generation, not an A2
    assert not ok and "first-generation" in why
    ok, why = npu_chips.chip_supports("ascend910b2", "w8a16")
    assert not ok and "not in llmbench's chip table" in why
    assert npu_chips.chip_supports("Ascend910_9392", "graph") == (True, "")
    assert not npu_chips.chip_supports("Ascend310P3", "graph")[0]
    assert not npu_chips.chip_supports("Ascend910A", "graph")[0]
    with pytest.raises(ValueError, match="unknown feature"):
        npu_chips.chip_supports("Ascend910B2", "fp8")
    assert npu_chips.method_refusal("Ascend310P3", "w8a16", "fp16") == ""
    assert "no bf16" in npu_chips.method_refusal("Ascend310P3", "w8a16", "bf16")
    assert "fp16/bf16" in npu_chips.method_refusal("Ascend910B2", "w8a8", "fp32")


def test_n_chunks():
    assert quant_npu.n_chunks(128256) == [(0, 64128), (64128, 128256)]
    assert quant_npu.n_chunks(8192) == [(0, 8192)]
    for n in (1, 65535, 65536, 131071, 200000):
        c = quant_npu.n_chunks(n)
        assert c[0][0] == 0 and c[-1][1] == n and all(b - a <= quant_npu.MAX_KN for a, b in c)
        assert all(c[i][1] == c[i + 1][0] for i in range(len(c) - 1))


def test_unverified_items_are_data():
    items = npu_chips.unverified()
    assert len(items) >= 3 and all({"what", "why", "source"} <= set(i) for i in items)


# --- the fake's signatures are torch_npu's (data/torch_npu_ops.json, regenerated from the wheel) ---------

def test_fake_signatures_match_torch_npu(monkeypatch):
    import ast
    import inspect
    import json
    from pathlib import Path
    ref = json.loads((Path(__file__).resolve().parents[1] / "data" / "torch_npu_ops.json").read_text())
    assert ref["source"]["torch_npu_version"] == "2.13.0" and len(ref["source"]["sha256"]) == 64
    _, mod = fake_torch_npu(monkeypatch)
    fns = {name: getattr(mod, name) for name in ref["ops"]}
    fns.update({name: getattr(mod.npu, name.removeprefix("npu.")) for name in ref["python"]})
    for name, want in [*ref["ops"].items(), *ref["python"].items()]:
        params = list(inspect.signature(fns[name]).parameters.values())
        got = [(p.name, p.kind == p.KEYWORD_ONLY, None if p.default is p.empty else p.default) for p in params]
        exp = [(a["name"], a["kwonly"], None if a["default"] is None else ast.literal_eval(a["default"]))
               for a in want["args"]]
        assert got == exp, name
    # and the library calls only these ops, by these names
    src = (Path(quant_npu.__file__)).read_text()
    called = set(__import__("re").findall(r"\.(npu_\w+)\(", src))
    assert called == set(ref["ops"])


# --- ceilings on npu: the int8 ceiling is what w8a8 runs; published specs match exact chip names ---------

def test_npu_int8_ceiling_times_dynamic_quant_and_quant_matmul(monkeypatch):
    from llmbench.measure import ceilings
    npu, mod = fake_torch_npu(monkeypatch)
    monkeypatch.setattr(ceilings, "torch_device", lambda kind: "cpu")  # the fake computes on the CPU
    r = ceilings.measure_int8_matmul("npu", (64, 256, 128), repeats=3)
    assert r["status"] == "ok" and r["dtype"] == "int8" and len(r["samples"]) == 3
    assert r["samples"][0] == pytest.approx(2 * 64 * 256 * 128 / 0.0125 / 1e9)  # fake events: 12.5 ms
    names = [c[0] for c in mod.op_calls]
    assert names.count("npu_dynamic_quant") == names.count("npu_quant_matmul") == 5  # 2 warm-up + 3 timed
    qmm = [c[1] for c in mod.op_calls if c[0] == "npu_quant_matmul"][-1]
    assert qmm["x2_transposed"] and qmm["pertoken"] == ((64,), torch.float32) and qmm["output_dtype"] == torch.bfloat16
    npu.chip = "Ascend310P3"
    r = ceilings.measure_int8_matmul("npu", (64, 256, 128))
    assert r["status"].startswith("unsupported: Ascend310P3") and "per-token" in r["status"]


def test_spec_for_matches_exact_chip_names():
    from llmbench.measure.ceilings import spec_for
    assert spec_for("Ascend910B2")["key"] == "ascend-910b2"
    assert spec_for("Ascend910B4")["key"] == "ascend-910b4"
    assert spec_for("Ascend910A")["key"] == "ascend-910a"
    assert spec_for("Ascend910B") is None  # first generation: not an A2, no bf16
    assert spec_for("Ascend910B25") is None and spec_for("ascend910b2") is None
    assert spec_for("NVIDIA H100 80GB HBM3")["key"] == "nvidia-h100"
    assert spec_for("NVIDIA H100 PCIe") is None  # other bandwidth than the SXM spec
    for key, spec in __import__("llmbench.measure.ceilings", fromlist=["load_specs"]).load_specs().items():
        if key.startswith("ascend"):
            assert set(spec["names"]) <= set(npu_chips.GENERATION), key
