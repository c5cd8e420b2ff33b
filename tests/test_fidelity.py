import math

import pytest
import torch

from llmbench.fidelity import compare_logits, perplexity


def test_identical_logits():
    z = torch.randn(2, 5, 11)
    f = compare_logits(z, z.clone())
    assert f["kl_mean"] == pytest.approx(0, abs=1e-12) and f["top1_agreement"] == 1 and f["rel_logit_error"] == 0


def test_known_kl_and_agreement():
    p, q = torch.tensor([0.8, 0.2]), torch.tensor([0.4, 0.6])
    ref, test = p.log().view(1, 1, 2).repeat(1, 4, 1), q.log().view(1, 1, 2).repeat(1, 4, 1)
    test[0, :2] = ref[0, :2]  # half the positions identical
    f = compare_logits(ref, test)
    kl = 0.8 * math.log(0.8 / 0.4) + 0.2 * math.log(0.2 / 0.6)
    assert f["kl_mean"] == pytest.approx(kl / 2) and f["kl_max"] == pytest.approx(kl)
    assert f["top1_agreement"] == 0.5


def test_relative_logit_error():
    ref = torch.ones(1, 2, 4)
    f = compare_logits(ref, ref * 1.1)
    assert f["rel_logit_error"] == pytest.approx(0.1)


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 37)})()
    assert perplexity(Uniform(), torch.randint(0, 37, (2, 9))) == pytest.approx(37)
