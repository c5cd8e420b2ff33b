import math

import pytest
import torch

from llmbench.measure.fidelity import compare_logits, perplexity


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


def test_perplexity_of_uniform_logits_is_the_vocab_size():
    ids = torch.randint(0, 37, (2, 9))
    assert perplexity(torch.zeros(2, 9, 37), ids) == pytest.approx(37)
    confident = torch.nn.functional.one_hot(torch.roll(ids, -1, dims=1), 37).float() * 50  # predicts the next id
    assert perplexity(confident, ids) == pytest.approx(1.0, abs=1e-6)
