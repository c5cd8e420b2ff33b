"""The seed document's quantitative claims, each checked against the records (claims.yaml names the check).

checks.py holds the latency, throughput, memory, quantization and device checks and the verdict
vocabulary; energy.py the energy claims; serving.py the requests/s and dynamic-batching claims from the serving
records; vocabulary.py the tokenizer claim. CHECKS merges them.
"""
from llmbench.claims.checks import CHECKS as _RECORD_CHECKS
from llmbench.claims.checks import ClaimContext, load_claims
from llmbench.claims.energy import CLAIM_CHECKS as _ENERGY_CHECKS
from llmbench.claims.serving import CLAIM_CHECKS as _SERVING_CHECKS
from llmbench.claims.vocabulary import vocabulary_claim
from llmbench.results import anomalies, frame

CHECKS = {**_RECORD_CHECKS, **_ENERGY_CHECKS, **_SERVING_CHECKS, "vocabulary_claim": vocabulary_claim}


def check_all(df, proj, claims=None) -> list[dict]:
    """One row per claim (per engine for the ratio claims): claim, rule, value, verdict, basis, why."""
    # every check sees only unflagged records in ctx.df; ctx.all and ctx.flags let it name the rest
    df = df.reset_index(drop=True)  # one label per record, so a selection finds its flags
    flags = anomalies.record_flags(df)
    ctx = ClaimContext(df=df[flags == ""], kind=frame.device_kind(df), pair=frame.pair(df), proj=proj, all=df,
                       flags=flags)
    out = []
    for claim in claims or load_claims():
        res = CHECKS[claim["check"]](claim, ctx)
        for r in res if isinstance(res, list) else [res]:
            out.append({"claim": claim["quote"], "gloss": claim["gloss"], "rule": claim.get("rule", ""),
                        "engine": r.pop("engine", None) or "", **r})
    return out


def verdict_counts(checks) -> dict:
    counts = {}
    for c in checks:
        v = c["verdict"].split(":")[0]
        counts[v] = counts.get(v, 0) + 1
    return counts
