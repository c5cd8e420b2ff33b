import pytest
import torch
from torch import nn

from llmbench.model.quant import methods as quant
from llmbench.measure.fidelity import compare_logits
from llmbench.model.models import load_model
from llmbench.core import errors


def all_logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.parametrize("method", ["w8a8", "w8a16", "w4a16"])
def test_cpu_methods_replace_exactly_the_linears_and_keep_kl_bounded(method):
    model, _ = load_model("tiny-3b", seed=5)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = all_logits(model, ids)
    before = quant.weight_bytes(model)
    replaced = quant.quantize(model, method, "cpu", "fp32")
    assert set(replaced) == linears and len(linears) == 7 * 3 + 1
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    after = quant.weight_bytes(model)
    assert after < before
    fid = compare_logits(ref, all_logits(model, ids))
    assert fid["kl_mean"] < {"w8a8": 1e-3, "w8a16": 1e-4, "w4a16": 1e-2}[method]
    assert fid["top1_agreement"] > 0.9


def test_w8a8_linears_are_the_ones_quantize_dynamic_makes_and_know_their_bytes():
    """dynamic_int8_linear packs each weight once: same outputs, same bytes as torch.ao's quantize_dynamic."""
    import copy
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    model, _ = load_model("tiny-3b", seed=5)
    theirs = copy.deepcopy(model)
    torch.ao.quantization.quantize_dynamic(theirs, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                                           dtype=torch.qint8, inplace=True)
    quant.quantize(model, "w8a8", "cpu", "fp32")
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(all_logits(model, ids), all_logits(theirs, ids))
    ours = [m for m in model.modules() if isinstance(m, DynamicLinear)]
    assert len(ours) == 7 * 3 + 1
    for m in ours:  # the bytes kept at quantization are those of the packed weight read back
        w = m.weight()
        assert (m.in_features, m.out_features) == (w.shape[1], w.shape[0])
        assert m.stored_bytes == w.numel() + 16 * w.shape[0]  # int8 weight, float64 scale and int64 zero point per row


def test_linears_made_in_threads_are_the_serial_ones_in_the_same_places():
    serial, _ = load_model("tiny-3b", seed=5)
    threaded, _ = load_model("tiny-3b", seed=5)
    names = quant.replace_linears(serial, quant.dynamic_int8_linear)
    assert quant.replace_linears(threaded, quant.dynamic_int8_linear, workers=3) == names
    for n in names:  # each module holds the weight of the Linear it replaced, not a neighbour's
        a, b = serial.get_submodule(n).weight(), threaded.get_submodule(n).weight()
        assert torch.equal(a.int_repr(), b.int_repr()) and torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(all_logits(serial, ids), all_logits(threaded, ids))


def test_weight_bytes_count_tied_embedding_once_and_scales():
    model, _ = load_model("tiny-1b")
    assert quant.weight_bytes(model) == 155_968 * 4
    quant.quantize(model, "w8a16", "cpu", "fp32")
    linear = 2 * 61_440 + 512 * 64  # int8 bytes of every Linear, LM head included
    scales = (2 * (64 + 32 + 32 + 64 + 256 + 256 + 64) + 512) * 4  # fp32 per output channel
    embed_and_norms = 512 * 64 * 4 + (2 * 2 * 64 + 64) * 4
    assert quant.weight_bytes(model) == linear + scales + embed_and_norms


def test_a_step_streams_the_tied_embedding_once_and_a_left_behind_table_not_at_all():
    model, _ = load_model("tiny-1b")
    assert quant.streamed_weight_bytes(model) == quant.weight_bytes(model)  # tied: the table is the LM head
    quant.quantize(model, "w8a8", "cpu", "fp32")
    table = 512 * 64 * 4  # fp32 embedding, now only looked up row by row
    assert quant.streamed_weight_bytes(model) == quant.weight_bytes(model) - table


def test_uint4_groupwise_dequantizes_to_the_weight():
    w = torch.randn(48, 256) * 0.02
    q, sz = quant.uint4_groupwise(w, 128)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (2, 48, 2)
    scale = sz[..., 0].t().repeat_interleave(128, dim=1)
    zero = sz[..., 1].t().repeat_interleave(128, dim=1)
    deq = (q - 8) * scale + zero
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-7


def test_unsupported_combinations_are_reasons_not_fallbacks():
    model, _ = load_model("tiny-1b")
    with pytest.raises(errors.Unsupported, match="fp32 activations, not bf16"):
        quant.quantize(model, "w8a8", "cpu", "bf16")
    with pytest.raises(errors.Unsupported, match="torchao"):
        quant.quantize(model, "w8a16", "cuda", "bf16")  # torchao is not installed in the CPU environment
    assert quant.quantize(model, "none", "cpu", "fp32") == []
