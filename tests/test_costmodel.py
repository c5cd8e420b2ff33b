import pytest

from llmbench.model import costmodel as cm
from llmbench.model.models import load_config


def test_flops_per_token_is_2n_over_matmul_weights():
    # 1B: 16 layers x 60,817,408 linear weights + the tied 128,256 x 2,048 LM head.
    assert cm.flops_per_token(load_config("llama-3.2-1b")) == 2 * (16 * 60_817_408 + 128_256 * 2048)
    # 3B: every parameter except the norm gains (28 x 2 x 3072 + 3072).
    assert cm.flops_per_token(load_config("llama-3.2-3b")) == 2 * (3_212_749_824 - 28 * 2 * 3072 - 3072)


def test_tiny_prefill_and_decode_by_hand():
    cfg = load_config("tiny-1b")  # d=64, ff=256, 2 layers, 4 heads x 16, 2 kv heads, vocab 512
    linear = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 256  # q, k+v, o, gate/up/down
    assert linear == 61_440
    L, B = 10, 3
    attn = 4 * 2 * 4 * 16 * L * (L + 1) / 2
    assert cm.prefill_flops(cfg, B, L) == B * (2 * 2 * linear * L + attn + 2 * 64 * 512)
    ctx = 7
    assert cm.decode_flops(cfg, B, ctx) == B * (2 * (2 * linear + 512 * 64) + 4 * 2 * 4 * 16 * (ctx + 1))
    kv = 2 * 2 * 2 * 16 * 4  # fp32 bytes per token
    assert cm.decode_bytes(cfg, 1000, 1, ctx, "fp32") == pytest.approx(1000 + kv * (ctx + 1) + 64 * 1000 / 155_968)


def test_bounds_and_shares():
    assert cm.bound_s(1e12, 1e9, 1e12, 1e10) == 1.0  # compute bound: 1 s against 0.1 s of memory
    assert cm.bound_s(1e9, 1e10, 1e12, 1e10) == 1.0  # memory bound
    e = cm.efficiency(1e9, 1e10, 2.0, 1e12, 1e10)
    assert e["mbu"] == pytest.approx(0.5) and e["mfu"] == pytest.approx(0.0005)


def test_measured_time_is_never_below_the_bound(smoke_runs):
    from llmbench.measure.records import read_all
    df = read_all(smoke_runs)
    timed = df[(df.unit == "s") & df.bound_s.notna() & (df.status == "ok")]
    assert len(timed) > 20
    resolution = 2e-6  # perf_counter resolution and call overhead
    assert (timed["median"] + resolution >= timed.bound_s).all(), timed[timed["median"] < timed.bound_s]
    assert (timed.mbu <= 1.0).all() and (timed.mfu <= 1.0).all()
