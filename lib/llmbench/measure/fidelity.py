"""How far a quantized model's next-token distributions move from the unquantized model's.

All three compare logits over the same inputs, every position:
- mean KL(P_ref || P_test) in nats; 0 when identical;
- top-1 agreement: share of positions whose argmax token is unchanged;
- relative logit error: ||z_test - z_ref|| / ||z_ref|| (Frobenius norm over all logits).
With synthetic weights these are NOT the fidelity of the real model: random weights have no outlier
channels, which are what make real LLM weights and activations hard to quantize.
"""
import math

import torch

FIDELITY_PPL = "perplexity_fidelity_row0"  # metric: perplexity of a method on the fidelity inputs' English row


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> dict:
    ref, test = ref.double(), test.double()
    lp_ref, lp_test = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    kl = (lp_ref.exp() * (lp_ref - lp_test)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == test.argmax(-1)).double().mean()),
            "rel_logit_error": float((test - ref).norm() / ref.norm())}


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of logits [b, t, vocab] over the sequence(s) in ids [b, t]."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            ids[:, 1:].reshape(-1).to(logits.device))
    return math.exp(float(nll))
