"""The engine seam: eager and compiled run the same weights to the same tokens; compilation inside a
timed window is caught; CPU dtypes are decided by measurement."""
import pytest
import torch

from llmbench.system import device
from llmbench import engines as engine
from llmbench.engines import eager as engine_eager
from llmbench.experiments import latency
from llmbench.measure import timing as measure
from llmbench.model.inputs import make_batch


def _load(name, model="tiny-1b", **kw):
    req = dict(engine=name, model=model, weights="synthetic", dtype="fp32", quant="none", kind="cpu", seed=3,
               max_batch=2, max_seq=40, tokens="random")
    return engine.load(engine.LoadRequest(**{**req, **kw}))


def test_compiled_and_eager_agree_on_tokens_and_logits():
    eager, comp = _load("eager"), _load("compiled")
    ids = make_batch(2, 12, eager.cfg, 0)[0]
    a, b = engine.generate(eager, ids, 16), engine.generate(comp, ids, 16)
    assert a.shape == b.shape == (2, 28)
    assert torch.equal(a, b)  # 16 greedy steps, both sequences of the batch
    la, lb = engine.logits(eager, a), engine.logits(comp, a)
    assert la.shape == lb.shape == (2, 28, eager.cfg.vocab_size)
    assert float((la - lb).abs().max() / la.abs().max()) < 1e-5
    # the decode graph was compiled once per batch size, and that time is kept apart from any sample
    shapes = [k for k in comp.extra["compiles"] if k[0] == "decode"]
    assert shapes and comp.compile_s > 0 and all(v > 0 for v in comp.extra["compiles"].values())
    assert eager.weight_bytes == comp.weight_bytes and eager.read_bytes == comp.read_bytes
    # a second decode at the same shapes compiles nothing new
    before = measure.compiles_so_far(comp)
    blocks, recompiles = measure.time_decode(comp, ids, "cpu", steps=3, warmup=1, repeats=2)
    assert recompiles == 0 and measure.compiles_so_far(comp) == before and [len(b) for b in blocks] == [3, 3]


def test_the_agreement_check_runs_the_decode_step_compiled_at_load():
    """Greedy generation and the teacher-forced logits (latency.agreement) reuse the one decode graph: a token
    of another kind (not an inference tensor), other strides or grad mode would each compile it again
    (a 1B compiled point compiled it four times, about 20 s on 2 cores)."""
    comp = _load("compiled", max_batch=1)
    ids = make_batch(1, 12, comp.cfg, 0)[0]
    before = measure.compiles_so_far(comp)
    seq = engine.generate(engine.reference(comp), ids, 8)
    engine.generate(comp, ids, 8)
    lg = latency._graph_logits(comp, seq, 12)
    assert lg.shape == (7, comp.cfg.vocab_size)
    assert measure.compiles_so_far(comp) == before


def test_a_compilation_inside_timed_steps_is_counted_and_refused(monkeypatch):
    e = _load("eager")
    ids = make_batch(1, 8, e.cfg, 0)[0]
    calls = {"n": 0}
    real = engine_eager.decode

    def decode_that_compiles(e, state, tok):
        calls["n"] += 1
        return real(e, state, tok)
    monkeypatch.setattr(engine_eager, "decode", decode_that_compiles)
    monkeypatch.setattr(engine_eager, "compile_count", lambda e: calls["n"] // 3, raising=False)
    _, recompiles = measure.time_decode(e, ids, "cpu", steps=6, warmup=1, repeats=1)
    assert recompiles >= 1
    assert latency.recompile_status(recompiles).startswith("error: ")
    assert latency.recompile_status(0) == "ok"


def test_unknown_engine_is_one_clear_error():
    from llmbench.core.errors import UserError
    with pytest.raises(UserError, match=r"unknown engine 'vllm'; valid: eager, compiled, llamacpp"):
        engine.module("vllm")


def test_cpu_16bit_dtypes_follow_the_measured_matmul_rate(monkeypatch):
    monkeypatch.setattr(device, "cpu_matmul_rates", lambda: {"fp32": 150.0, "bf16": 0.3, "fp16": 400.0})
    got = device.usable_dtypes("cpu")
    assert got["fp32"] == "" and got["fp16"] == ""
    assert "bf16 matmul measured at 0.3 GFLOP/s against 150 for fp32" in got["bf16"]
    with pytest.raises(Exception, match="valid on cpu: fp32, fp16"):
        device.check_dtype("cpu", "bf16")


def test_cpu_matmul_rates_are_measured_once_and_cached(monkeypatch, tmp_path):
    from llmbench.core import paths
    monkeypatch.setattr(paths, "DATA", tmp_path)
    monkeypatch.setattr(device, "CPU_RATE_SHAPE", (16, 32, 32))
    first = device.cpu_matmul_rates()
    assert set(first) == {"fp32", "fp16", "bf16"} and all(v > 0 for v in first.values())
    assert len(list((tmp_path / "cache").glob("cpu-matmul-*.json"))) == 1
    assert device.cpu_matmul_rates() == first  # read back, not re-measured


@pytest.mark.parametrize("b,h,kv,filled", [(1, 4, 2, 5), (3, 8, 8, 1), (2, 6, 2, 12)])
def test_cpu_decode_attention_equals_sdpa_with_grouped_heads_and_a_masked_tail(b, h, kv, filled):
    """The compiled engine's single-query attention (plain ops) against SDPA on the same cache: query heads
    share KV heads in groups, and cache slots past the current position are masked out."""
    from llmbench.model.llama import decode_attention
    g = torch.Generator().manual_seed(b * h + filled)
    S, d = 12, 16
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = torch.randn(b, kv, S, d, generator=g), torch.randn(b, kv, S, d, generator=g)
    mask = (torch.arange(S) < filled)[None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(decode_attention(q, k, v, mask), ref, atol=1e-5)
    k[:, :, filled:], v[:, :, filled:] = 1e4, 1e4  # whatever lies past the position is never read into the result
    assert torch.allclose(decode_attention(q, k, v, mask), ref, atol=1e-5)
