import pytest
import torch

from llmbench.model import models
from llmbench.core.errors import UserError


def test_exact_published_counts_without_allocating():
    c1 = models.count_params(models.load_config("llama-3.2-1b"))
    c3 = models.count_params(models.load_config("llama-3.2-3b"))
    assert c1["total"] == 1_235_814_400 and c3["total"] == 3_212_749_824
    assert c1["embedding"] == 262_668_288 and c3["embedding"] == 394_002_432
    assert c1["per_layer"] == 60_821_504 and c3["per_layer"] == 100_669_440


def test_kv_cache_bytes_per_token():
    assert models.kv_bytes_per_token(models.load_config("llama-3.2-1b"), "bf16") == 32_768
    assert models.kv_bytes_per_token(models.load_config("llama-3.2-3b"), "fp16") == 114_688
    assert models.kv_bytes_per_token(models.load_config("llama-3.2-3b"), "fp32") == 2 * 114_688


def test_synthetic_counts_match_the_config_and_weights_are_tied():
    model, info = models.load_model("tiny-3b")
    n = sum(p.numel() for p in model.parameters())  # parameters() counts the tied tensor once
    assert n == models.count_params(models.load_config("tiny-3b"))["total"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert info["weights"] == "synthetic" and info["seed"] == 0


def test_synthetic_weights_deterministic_per_seed_and_different_across_seeds():
    a, _ = models.load_model("tiny-1b", seed=1)
    b, _ = models.load_model("tiny-1b", seed=1)
    c, _ = models.load_model("tiny-1b", seed=2)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["model.layers.0.mlp.up_proj.weight"], pc["model.layers.0.mlp.up_proj.weight"])
    for p in a.parameters():
        assert torch.isfinite(p).all()
        small = p[(p != 0) & (p.abs() < torch.finfo(p.dtype).tiny)]
        assert small.numel() == 0  # no denormals
    w = pa["model.layers.0.mlp.up_proj.weight"]
    assert 0.015 < w.std().item() < 0.025  # the published init scale (initializer_range = 0.02)


def test_real_weights_from_a_local_safetensors_directory(tmp_path):
    src, _ = models.load_model("tiny-1b", seed=3)
    src.save_pretrained(tmp_path / "w", safe_serialization=True)
    assert list((tmp_path / "w").glob("*.safetensors"))
    loaded, info = models.load_model("tiny-1b", weights=str(tmp_path / "w"))
    assert info["weights"] == "real" and info["weights_source"] == str(tmp_path / "w")
    ids = torch.randint(0, 500, (2, 12))
    with torch.inference_mode():
        assert torch.allclose(src(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def test_pickle_only_weights_are_refused(tmp_path):
    src, _ = models.load_model("tiny-1b")
    src.config.save_pretrained(tmp_path / "bin")  # a checkpoint in the old pickle format only
    torch.save(src.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no \*\.safetensors file \(found: .*pytorch_model\.bin.*only safetensors"):
        models.load_model("tiny-1b", weights=str(tmp_path / "bin"))


def test_bad_weights_and_models_name_the_value(tmp_path):
    with pytest.raises(UserError, match=r"weights '/no/such/dir' does not exist; valid: 'synthetic'"):
        models.load_model("tiny-1b", weights="/no/such/dir")
    with pytest.raises(UserError, match=r"unknown model 'llama-9b'; valid: llama-3.2-1b, llama-3.2-3b, smollm2-135m, tiny-1b, tiny-3b"):
        models.load_model("llama-9b")
    src, _ = models.load_model("tiny-3b")
    src.save_pretrained(tmp_path / "w3", safe_serialization=True)
    with pytest.raises(UserError, match=r"do not have the architecture of tiny-1b: hidden_size=96 \(expected 64\)"):
        models.load_model("tiny-1b", weights=str(tmp_path / "w3"))
