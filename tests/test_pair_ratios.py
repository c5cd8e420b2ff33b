"""The report's other ratios from pair records (issue 24 item 2): eager/compiled overhead, the peer table and
the quantization speed-ups each take the 05_pairs record where one exists and label the cross-point (or
same-run) figure otherwise; a flagged pair side gives no verdict. Hand-built records, each test well under
a second."""
import zlib

import numpy as np
import pandas as pd
import pytest

from llmbench.claims import check_all, checks
from llmbench.measure.records import record
from llmbench.report import engines as E
from llmbench.report.sections import quant_table
from llmbench.results import ratios

S, L = "llama-3.2-1b", "llama-3.2-3b"
WORK = {S: 2.5e9, L: 6.4e9}  # bytes (and FLOPs) of one step, about the bf16 weights


def _tpot(model, median, run, engine="compiled", quant="none", study="latency", experiment="decode", context=17,
          dtype="bf16", **kw):
    rng = np.random.default_rng(zlib.crc32(repr((model, run, engine, quant)).encode()))  # hash() differs per process
    blocks = [list(median * (1 + 0.01 * rng.standard_normal(4))) for _ in range(3)]
    nbytes = WORK[model] / (2 if quant != "none" else 1)
    return record(blocks, run_id=run, study=study, experiment=experiment, metric="tpot", unit="s", model=model,
                  weights="synthetic", dtype=dtype, quant=quant, device="cpu", batch=1, engine=engine,
                  prompt_len=context - 1, context_len=context, tokens="random", flops=WORK[model], bytes=nbytes,
                  bound_s=nbytes / 100e9, mbu=nbytes / 100e9 / median, **kw)


def _pair(kind, a: dict, versus, a_s, b_s, rounds, model=S, dtype="bf16", run=None):
    """A 05_pairs run: side A's and side B's TPOT records and the tpot_ratio record of B/A per round."""
    run = run or f"pair-{kind}-{versus}-{model}"
    common = dict(study="pairs", experiment="pair", pair=kind, versus=versus, pairing="alternating", context=18,
                  dtype=dtype)
    side_a = {"engine": "compiled", "quant": "none", **a}
    side_b = {**side_a, kind: versus}
    rows = [_tpot(model, a_s, run, **side_a, **common), _tpot(model, b_s, run, **side_b, **common)]
    rows.append(record([[r] for r in rounds], run_id=run, study="pairs", experiment="pair", metric="tpot_ratio",
                       unit="ratio", model=model, weights="synthetic", dtype=dtype, device="cpu", batch=1,
                       prompt_len=16, context_len=18, pair=kind, versus=versus, pairing="alternating", **side_a))
    return rows


def _flag_side(df, **sel):
    """Make one pair side faster than its lower bound (the anomaly checks flag it)."""
    m = (df.experiment == "pair") & (df.metric == "tpot")
    for k, v in sel.items():
        m &= df[k] == v
    assert m.sum() == 1
    df.loc[m, "bound_s"] = 1.0
    return df


# --- eager/compiled overhead ----------------------------------------------------------------------------

def _engines():
    """1B: latency records minutes apart (eager/compiled 1.5) and an engine pair saying 1.3; 3B: latency only."""
    rows = [_tpot(S, 0.100, "c1"), _tpot(S, 0.150, "e1", engine="eager"),
            _tpot(L, 0.200, "c3"), _tpot(L, 0.260, "e3", engine="eager")]
    rows += _pair("engine", {"engine": "compiled"}, "eager", 0.100, 0.130, [1.29, 1.31, 1.30, 1.32, 1.28])
    return pd.DataFrame(rows)


def test_overhead_takes_the_engine_pair_and_labels_the_cross_point_ratio():
    o = E.overhead(_engines()).set_index("model")
    assert o.loc[S, "eager/compiled"] == pytest.approx(1.30)
    assert o.loc[S, "ci_low"] < 1.30 < o.loc[S, "ci_high"] and o.loc[S, "source"].startswith("paired (alternating)")
    assert o.loc[L, "eager/compiled"] == pytest.approx(1.3, rel=0.03) and o.loc[L, "source"] == ratios.CROSS_POINT
    assert (o.flag == "").all()
    text = E.overhead_text(_engines())
    assert "1.3" in text and "paired (alternating)" in text and ratios.CROSS_POINT in text
    assert "1.5" not in text  # the 1B cross-point ratio is left out where the pair ran


def test_a_flagged_engine_pair_side_gives_the_overhead_no_verdict():
    df = _flag_side(_engines(), engine="eager")
    o = E.overhead(df).set_index("model")
    assert "faster than its lower bound" in o.loc[S, "flag"] and o.loc[L, "flag"] == ""
    text = E.overhead_text(df)
    assert f"{S} bf16" in text and "not judged: " in text.split(f"{L} bf16")[0]


# --- the peer table --------------------------------------------------------------------------------------

def _peers():
    """1B: cross-point llama.cpp/ours 0.7 and an engine pair (compiled vs llamacpp) saying 0.9; 3B cross-point."""
    rows = [_tpot(S, 0.100, "c1"), _tpot(S, 0.070, "p1", engine="llamacpp"),
            _tpot(L, 0.200, "c3"), _tpot(L, 0.220, "p3", engine="llamacpp")]
    rows += _pair("engine", {"engine": "compiled"}, "llamacpp", 0.100, 0.090, [0.89, 0.90, 0.91, 0.90, 0.92])
    return pd.DataFrame(rows)


def test_the_peer_table_takes_the_engine_pair_and_labels_the_cross_point_ratio():
    p = E.peer_ratio(_peers()).set_index("model")
    assert p.loc[S, "llama.cpp / ours"].startswith("0.9") and p.loc[S, "source"].startswith("paired")
    assert p.loc[S, "verdict"] == "llama.cpp faster within these rounds"
    assert p.loc[L, "llama.cpp / ours"].startswith("1.1") and p.loc[L, "source"] == ratios.CROSS_POINT
    assert "within these records" in p.loc[L, "verdict"]


def test_a_flagged_peer_pair_side_gives_no_verdict():
    p = E.peer_ratio(_flag_side(_peers(), engine="llamacpp")).set_index("model")
    assert p.loc[S, "verdict"].startswith("not judged: ") and "faster than its lower bound" in p.loc[S, "verdict"]


# --- quantization speed-ups ------------------------------------------------------------------------------

def _quant(pair=True):
    """03_quantization: 1B and 3B, none and w8a8 in one run each (speed-up 1.2); a 1B quant pair saying 2.5."""
    q = dict(study="quantization", engine="eager")
    rows = [_tpot(S, 0.120, "q1", **q), _tpot(S, 0.100, "q1", quant="w8a8", **q),
            _tpot(L, 0.240, "q3", **q), _tpot(L, 0.200, "q3", quant="w8a8", **q)]
    rows += [record([[0.5]], run_id=r, study="quantization", experiment="load", metric="weight_bytes", unit="bytes",
                    model=m, weights="synthetic", dtype="bf16", quant=qq, device="cpu", engine="eager")
             for r, m in (("q1", S), ("q3", L)) for qq in ("none", "w8a8")]
    if pair:
        rows += _pair("quant", {"engine": "eager"}, "w8a8", 0.120, 0.048, [0.40, 0.41, 0.39, 0.40, 0.42])
    return pd.DataFrame(rows)


SPEEDUP = {"id": "q", "quote": "q", "gloss": "q", "rule": "", "check": "quant_speedup", "range": [2.0, 4.0],
           "device": "any"}


def test_quant_speedups_take_the_quant_pair_and_label_the_same_run_ones():
    df = _quant()
    got = {r["model"]: r for r in checks._speedups(checks.ClaimContext(df=df, kind="cpu", pair=checks.MODELS))}
    assert got[S]["bf16"][0] == pytest.approx(1 / 0.40) and got[S]["bf16 source"].startswith("paired (alternating)")
    assert got[S]["bf16"][1] < 2.5 < got[S]["bf16"][2]
    assert got[L]["bf16"][0] == pytest.approx(1.2, rel=0.03) and got[L]["bf16 source"] == ratios.SAME_RUN
    t = quant_table(df).set_index(["model", "method"])
    assert t.loc[(S, "w8a8"), "speed-up vs bf16"].startswith("2.5") and "paired" in t.loc[(S, "w8a8"), "speed-up source"]
    assert t.loc[(L, "w8a8"), "speed-up vs bf16"].startswith("1.2")
    assert t.loc[(L, "w8a8"), "speed-up source"] == f"vs bf16: {ratios.SAME_RUN}"
    out = check_all(df, pd.DataFrame(), claims=[SPEEDUP])[0]
    assert out["verdict"] == checks.SUPPORTED and "paired (alternating)" in out["value"]


def test_a_flagged_quant_pair_side_makes_the_claim_not_judged():
    df = _flag_side(_quant(), quant="w8a8")
    got = {r["model"]: r for r in checks._speedups(checks.ClaimContext(df=df, kind="cpu", pair=checks.MODELS))}
    assert "paired" in got[S]["bf16 source"]  # every record: the flagged pair still answers
    out = check_all(df, pd.DataFrame(), claims=[SPEEDUP])[0]
    # without the flagged side the 1B falls back to its same-run 1.2, the 3B gives 1.2: contradicted, not 2.5
    assert out["verdict"].startswith(checks.CONTRADICTED) and "2.5" not in out["value"].split("not counted")[0]
    only_pair = _flag_side(_quant()[lambda d: d.study == "pairs"].reset_index(drop=True), quant="w8a8")
    out = check_all(only_pair, pd.DataFrame(), claims=[SPEEDUP])[0]
    assert out["verdict"].startswith(f"{checks.NOT_JUDGED}: ") and "faster than its lower bound" in out["verdict"]


def test_a_speed_up_is_the_inverse_of_the_rounds_median_ratio():
    """Two rounds (0.25 and 2.5: a noisy machine): the speed-up is 1 / 1.375, not the median of the inverses
    (2.2); its CI is the ratio's CI inverted."""
    df = pd.DataFrame(_pair("quant", {"engine": "eager"}, "w8a8", 0.27, 0.33, [0.25, 2.5]))
    r = ratios.pair_ratios(df, "quant").iloc[0]
    s = ratios.pair_ratios(df, "quant", invert=True).iloc[0]
    assert r.ratio == pytest.approx(1.375) and s.ratio == pytest.approx(1 / 1.375)
    assert s.ci_high == (pytest.approx(1 / r.ci_low) if r.ci_low > 0 else np.inf)
    assert s.ci_low == pytest.approx(1 / r.ci_high)
