"""Claim verdicts follow from their numbers: a ratio's CI must lie inside (or wholly outside) the claimed
range, no verdict rests on a flagged record, and a dispatch-bound engine's 3B/1B ratio is not judged.
Planted record frames, as in test_report_logic.py; each test takes well under a second."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import test_report_energy as TE
from llmbench.results import anomalies as A
from llmbench import claims
from llmbench.claims import check_all
from llmbench.claims import checks as C
from llmbench.model import costmodel as cm
from llmbench.report import sections as R
from llmbench.model.models import load_config
from llmbench.claims import energy
from llmbench.results import fmt, ratios
from test_report_logic import L, S, _claim, frame, rec, tpot

RATIO = _claim(check="tpot_ratio", device="any", range=[2.0, 3.0])  # the seed's "3B is 2-3x slower"


def step(model, t, mbu, context=128, dtype="bf16", engine="eager", spread=0.01, **kw):
    """A batch-1 TPOT record of `t` seconds reading its bytes at `mbu` of the ceiling, with a bound from
    that same ceiling (so bound_s = mbu x t, and mbu > 1 is a step faster than its bound)."""
    cfg = load_config(model)
    nbytes = cm.decode_bytes(cfg, cm.dense_weight_bytes(cfg, 2), 1, context, dtype)
    return rec("tpot", t, model, engine=engine, dtype=dtype, context_len=context, prompt_len=context, spread=spread,
               bytes=nbytes, flops=cm.decode_flops(cfg, 1, context), bound_s=mbu * t, mbu=mbu, **kw)


def verdicts(d, claim=RATIO, proj=None):
    out = check_all(d, R.projection([S, L]) if proj is None else proj, claims=[claim])
    return {o["engine"]: o for o in out}


# --- 1. a verdict needs a conclusive interval ---------------------------------------------------------

def test_the_ci_must_lie_inside_the_range_to_support_and_wholly_outside_to_contradict():
    assert C.ci_verdict(2.5, 2.2, 2.8, 2, 3) == (C.SUPPORTED, "")
    assert C.ci_verdict(1.6, 1.5, 1.7, 2, 3) == (C.CONTRADICTED, "")
    assert C.ci_verdict(3.4, 3.1, 3.7, 2, 3) == (C.CONTRADICTED, "")
    v, why = C.ci_verdict(1.16, 0.47, 2.84, 2, 3)  # the H200 eager record (measured on one H200, 2026-12-04)
    assert v == "inconclusive: CI 0.47-2.84 is wider than the claimed range 2-3 and straddles the claimed bound 2"
    assert "both sides" in why
    v, _ = C.ci_verdict(2.9, 2.7, 3.2, 2, 3)  # narrower than the range, over its top
    assert v == "inconclusive: CI 2.7-3.2 straddles the claimed bound 3"
    v, _ = C.ci_verdict(2.5, 1.5, 3.5, 2, 3)
    assert v.startswith("inconclusive: CI 1.5-3.5 is wider") and "bounds 2 and 3" in v
    assert C.ci_verdict(1.3, 1.1, 1.6, 1.0) == (C.SUPPORTED, "")  # one-sided: "above 1"
    assert C.ci_verdict(1.3, 0.9, 1.6, 1.0)[0] == "inconclusive: CI 0.9-1.6 straddles the claimed bound 1"
    assert C.ci_verdict(2.5, np.nan, np.nan, 2, 3) == (C.SUPPORTED, "no CI (too few samples): judged on the median alone")


def test_the_planted_h200_ratio_is_inconclusive(monkeypatch):
    # the record the H200 report called "supported": eager bf16 3B/1B TPOT 1.16 (95% CI 0.47-2.84)
    h200 = pd.DataFrame([{"metric": "TPOT", "engine": "eager", "dtype": "bf16", "quant": "none", "device": "cuda",
                          "tokens": 128, "ratio": 1.16, "ci_low": 0.47, "ci_high": 2.84, "work ratio": 2.6,
                          f"{S} MBU": 0.31, f"{L} MBU": 0.40, "flag": ""}])
    monkeypatch.setattr(ratios, "ratio_table", lambda df: h200)
    [out] = C.tpot_ratio(RATIO, C.ClaimContext(df=frame([tpot(S), tpot(L)]), kind="cuda", pair=(S, L)))
    assert out["verdict"].startswith("inconclusive: CI 0.47-2.84 ") and "1.16 (95% CI 0.47–2.84)" in out["value"]


def test_a_wide_per_step_spread_from_the_records_gives_inconclusive():
    # H200-like eager steps, 6.7-37 ms per step around medians of 15.8 and 18.3 ms (MBU kept sane: see the
    # dispatch-bound test for the real 4% and 8%)
    ms = np.array([6.7, 9.0, 12.0, 15.8, 18.0, 25.0, 37.0]) * 1e-3
    d = frame([{**step(S, 0.0158, 0.5), "samples": list(ms), "median": 0.0158},
               {**step(L, 0.0183, 0.5), "samples": list(ms * 18.3 / 15.8), "median": 0.0183}])
    row = ratios.ratio_table(d).iloc[-1]
    assert row.ci_low < 2 < row.ci_high
    assert verdicts(d)["eager"]["verdict"].startswith(f"inconclusive: CI {row.ci_low:.3g}-{row.ci_high:.3g}")


def test_energy_claims_with_a_ci_holding_the_bound_are_inconclusive():
    [per_req] = energy.energy_per_request({}, TE.ctx(TE.frame(ratio_none=1.0, ratio_q=1.0)))
    assert per_req["verdict"].startswith("inconclusive: CI ") and "bound 1" in per_req["verdict"]
    gap = energy.quant_energy_gap({}, TE.ctx(TE.frame(ratio_none=2.0, ratio_q=2.0)))
    assert gap["verdict"].startswith("inconclusive: CI ") and "overlaps" in gap["verdict"]


def test_a_quant_speedup_whose_ci_straddles_the_range_is_inconclusive():
    gain = _claim(check="quant_speedup", device="any", range=[2.0, 4.0])
    base = [0.090, 0.080, 0.100, 0.085, 0.095]
    rows = [{**step(S, 0.090, 0.3), "samples": base},
            {**step(S, 0.045, 0.3), "quant": "w8a16", "samples": [0.030, 0.060, 0.045, 0.035, 0.055]}]
    out = check_all(frame(rows), R.projection([S, L]), claims=[gain])[0]
    assert out["verdict"].startswith("inconclusive: CI ") and "bound 2" in out["verdict"]


# --- 2. verdicts never rest on a flagged record ---------------------------------------------------------

def test_a_record_faster_than_its_bound_turns_the_verdict_into_not_judged():
    ok = [step(m, t, mbu, context=c) for m, t, mbu in ((S, 0.050, 0.6), (L, 0.120, 0.65)) for c in (64, 256)]
    assert verdicts(frame(ok))["eager"]["verdict"] == "supported"  # 2.4x, CI well inside 2-3
    # the 3B at both contexts faster than its lower bound (MBU 119%, as on the shared EPYC: issue 24)
    bad = [step(m, t, 1.19 if m == L else 0.6, context=c) for m, t in ((S, 0.050), (L, 0.085)) for c in (64, 256)]
    d = frame(bad)
    assert "faster than its lower bound" in set(A.check_all(d, ratios.physical_ratios(d)).check)
    out = verdicts(d)["eager"]
    assert out["verdict"].startswith(f"not judged: tpot model={L} engine=eager dtype=bf16")
    assert "is flagged (faster than its lower bound" in out["verdict"] and "MBU 119.0% above 100%" in out["verdict"]
    assert "[flagged" in out["value"]  # the impossible 1.7x is never shown bare


def test_an_unflagged_record_answers_the_claim_when_there_is_one():
    d = frame([step(S, 0.050, 0.6, context=64), step(L, 0.085, 1.19, context=64),  # flagged at context 64
               step(S, 0.052, 0.6, context=256), step(L, 0.125, 0.6, context=256)])  # clean at 256: 2.4x
    out = verdicts(d)["eager"]
    assert out["verdict"] == "supported" and "context 256" in out["value"]
    assert "judged at context 256" in out["why"] and "is flagged (faster than its lower bound" in out["why"]


def test_the_utilization_value_never_shows_an_impossible_mbu_without_its_flag():
    util = _claim(check="utilization", range=[0.80, 0.90])
    d = frame([{**step(S, 0.050, 1.386), "device": "npu"}, {**step(L, 0.120, 0.85), "device": "npu"}])
    out = check_all(d, R.projection([S, L]), claims=[util])[0]
    assert out["value"].startswith("best decode MBU 85.0%") and out["verdict"] == "supported"
    shown = out["value"].split("138.6%")[0]
    assert "not counted: " in shown and "is flagged (" in shown  # the figure comes only inside its flag
    only_bad = check_all(frame([{**step(S, 0.050, 1.386), "device": "npu"}]), R.projection([S, L]), claims=[util])[0]
    assert only_bad["verdict"].startswith("not judged: tpot model=llama-3.2-1b") and "MBU 138.6%" in only_bad["verdict"]
    assert "n/a (no unflagged record)" in only_bad["value"]


def test_tokens_per_s_inherits_the_flag_of_the_step_time_it_was_derived_from():
    claim = _claim(check="throughput_ratio", device="any", range=[2.0, 3.0])

    def sweep(model, b, t, mbu):
        common = dict(experiment="batch", batch=b, study="batch_sweep", run_id=f"sweep-{model}", spread=0.01)
        return [rec("decode_step_time", t, model, bound_s=mbu * t, mbu=mbu, **common),
                rec("decode_tokens_per_s", b / t, model, unit="tokens/s", **common)]
    clean = [r for b in (1, 8) for m, t in ((S, 0.05), (L, 0.12)) for r in sweep(m, b, t * (1 + b / 32), 0.6)]
    assert verdicts(frame(clean), claim)["eager"]["verdict"] == "supported"  # 2.4x at batch 8
    planted = clean[:-4] + sweep(S, 8, 0.05, 0.6) + sweep(L, 8, 0.12, 1.3)  # the 3B's batch-8 step beats its bound
    d = frame(planted)
    flags = A.record_flags(d)
    why = flags[(d.metric == "decode_tokens_per_s") & (d.model == L) & (d.batch == 8)].iat[0]
    assert why.startswith("from its decode_step_time record: faster than its lower bound") and "MBU 130.0%" in why
    out = verdicts(d, claim)["eager"]
    assert out["verdict"] == "supported" and "batch 1" in out["value"] and "judged at batch 1" in out["why"]


def test_a_ratio_above_the_bytes_ratio_is_judged_and_one_below_1_is_not():
    # Xeon eager bf16 (measured on a 2-core Xeon, 2026-12-06): 382.0 / 130.9 ms = 2.92 with MBU 0.54 vs 0.61: possible
    d = frame([step(S, 0.1309, 0.61), step(L, 0.3820, 0.54)])
    assert ratios.ratio_table(d).iloc[-1]["work ratio"] < 2.92
    assert A.check_all(d, ratios.physical_ratios(d)).empty
    out = verdicts(d)["eager"]
    assert out["verdict"] == "supported"
    assert "larger model reads at a lower rate (MBU 0.54 vs 0.61" in out["why"]
    # 3B faster than 1B: impossible, so flagged and not judged
    d = frame([step(S, 0.100, 0.3), step(L, 0.080, 0.9)])
    a = A.check_all(d, ratios.physical_ratios(d))
    assert list(a.check) == ["ratio outside its physical range"] and "below 1" in a.detail.iat[0]
    out = verdicts(d)["eager"]
    assert out["verdict"].startswith("not judged: the 3B/1B TPOT ratio at context 128 is flagged")


def test_a_ratio_on_a_flagged_record_is_flagged_as_a_ratio_too():
    d = frame([step(S, 0.050, 0.6), step(L, 0.085, 1.19)])
    a = A.check_all(d, ratios.physical_ratios(d))
    assert "ratio from a flagged record" in set(a.check)
    assert ratios.ratio_table(d).flag.iat[-1].startswith(f"tpot model={L}")
    summary = R.summary_text(d, [], [], a)  # the summary shows no impossible figure bare either
    assert "119% of measured memory bandwidth [flagged" in summary and "[rests on a flagged record" in summary


# --- 3. a dispatch-bound engine's ratio measures the host -------------------------------------------------

def test_a_dispatch_bound_engine_is_excluded_from_the_ratio_verdict():
    # H200 (measured on one H200, 2026-12-04): eager 15.8 / 18.3 ms at MBU 4% / 8%; compiled 1.9 / 3.7 ms at 31% / 40%
    d = frame([step(S, 0.0158, 0.04), step(L, 0.0183, 0.08),
               step(S, 0.0019, 0.31, engine="compiled"), step(L, 0.0037, 0.40, engine="compiled")])
    by = verdicts(d)
    assert by["eager"]["verdict"] == (f"not judged: eager (bf16) is dispatch-bound (decode MBU {S} 4%, {L} 8%; below "
                                      f"{A.DISPATCH_MBU:.0%}): its 3B/1B ratio measures the host's per-step dispatch, "
                                      "not the models")
    assert by["compiled"]["verdict"] == "contradicted"  # 1.95x, CI below 2
    assert "dispatch-bound" in next(c["rule"] for c in claims.load_claims() if c["id"] == "latency_ratio")


def test_the_dispatch_threshold_is_defined_once_at_the_issues_15_percent():
    lib = Path(A.__file__).parents[1]
    defs = [p.relative_to(lib).as_posix() for p in lib.rglob("*.py")
            if re.search(r"^\s*(DISPATCH_MBU|LAUNCH_MBU)\s*=", p.read_text(), re.M)]
    assert defs == ["results/anomalies.py"] and A.DISPATCH_MBU == 0.15 and A.DISPATCH_LABEL == "dispatch-bound"


@pytest.mark.parametrize("mbu,judged", [(A.DISPATCH_MBU * 1.05, True), (A.DISPATCH_MBU * 0.95, False)])
def test_the_dispatch_threshold_is_the_named_constant(mbu, judged):
    d = frame([step(S, 0.050, mbu), step(L, 0.120, 0.6)])
    v = verdicts(d)["eager"]["verdict"]
    assert (v == "supported") if judged else ("is dispatch-bound" in v)


# --- 4. the serving claims: requests/s and dynamic batching, from 04_serving records ------------------------

def closed_loop(conc, ttft, tpot, per_worker=4, spread=0.05, seed=0):
    """A closed loop of `conc` workers, each sending its next request when the last one ends; TTFT and TPOT
    (s) drawn around the given values, 11 output tokens per request."""
    from llmbench.measure import serving_metrics as SM
    rng, rs = np.random.default_rng(seed), []
    for w in range(conc):
        t = 0.0
        for _ in range(per_worker):
            first = t + ttft * (1 + spread * rng.standard_normal())
            step_s = tpot * (1 + spread * rng.standard_normal())
            chunks = [first + k * step_s for k in range(11)]
            rs.append(SM.RequestResult(len(rs), False, t, t, chunks, chunks[-1], 128, 11, 0, None))
            t = chunks[-1]
    return SM.summarize_run(rs, SM.limits(), None)


def serving_frame(tmp_path, loads, device="npu", quant="w8a8", prompt_len=128, new_tokens=128):
    """Records of closed-loop runs: loads = {model: {concurrency: (ttft, tpot)}}, one run_id per model."""
    import test_report_serving as TS
    from llmbench.experiments import serving as SV
    from llmbench.experiments.session import add
    rows = []
    for model, runs in loads.items():
        c = TS.ctx(tmp_path, model)
        for conc, (ttft, tpot) in runs.items():
            rows += add(c, SV._rows(c, closed_loop(conc, ttft, tpot, seed=conc), dict(
                engine="llama-server", prompt_len=prompt_len, new_tokens=new_tokens, tokens="random",
                request_rate=None, concurrency=conc, other_cores=0.1)))
    d = pd.DataFrame(rows)
    d["device"], d["quant"] = device, quant
    return d


def serving_verdict(d, cid, kind="npu", flags=None):
    from llmbench.claims import serving as CS
    claim = next(c for c in claims.load_claims() if c["id"] == cid)
    ok = d if flags is None else d[flags == ""]
    return CS.CLAIM_CHECKS[claim["check"]](claim, C.ClaimContext(df=ok, kind=kind, pair=(S, L), all=d, flags=flags))


BATCHING = {S: {1: (0.2, 0.02), 4: (0.2, 0.03)}}  # 4 in flight: TPOT 1.5x, E2E 0.5 s against 0.4 s


def test_dynamic_batching_is_supported_by_the_throughput_gain_and_shows_the_latency_it_adds(tmp_path):
    from llmbench.claims import serving as CS
    d = serving_frame(tmp_path, BATCHING)
    [v] = serving_verdict(d, "dynamic_batching")
    runs = CS.serving_runs(d).set_index("concurrency", drop=False)
    gain = CS.batching_gain(runs.loc[1], runs.loc[4])["gain"]
    assert 2.8 < gain[0] < 3.6 and gain[1] > 1  # 4 x 0.4 / 0.5 = 3.2
    assert v["verdict"] == "supported" and v["engine"] == "llama-server"
    assert f"achieved {runs.loc[1].achieved:.3g} vs {runs.loc[4].achieved:.3g} req/s" in v["value"]
    assert f"{fmt.fmt_ci(*gain)}x" in v["value"] and "p99" in v["value"]
    assert f"TPOT p50 {fmt.fmt_time(np.percentile(runs.loc[1].tpot, 50))}" in v["value"]
    tpot = CS.batching_gain(runs.loc[1], runs.loc[4])["tpot"][0]
    assert 1.3 < tpot < 1.7 and "may add latency" in v["why"] and f"TPOT p50 x{tpot:.3g}" in v["why"]


def test_dynamic_batching_without_a_gain_is_contradicted(tmp_path):
    # 4 in flight served one after another: each request waits for the other three (E2E 4.4x)
    d = serving_frame(tmp_path, {S: {1: (0.2, 0.02), 4: (0.88, 0.088)}})
    [v] = serving_verdict(d, "dynamic_batching")
    assert v["verdict"] == "contradicted", v


def test_dynamic_batching_off_the_npu_is_context_with_its_numbers(tmp_path):
    [v] = serving_verdict(serving_frame(tmp_path, BATCHING, device="cpu"), "dynamic_batching", kind="cpu")
    assert v["basis"] == "measured here, for context" and v["verdict"].startswith("not testable: needs an Ascend NPU")
    assert "req/s" in v["value"] and "throughput gain" in v["value"]


def test_dynamic_batching_never_rests_on_a_failed_or_flagged_run(tmp_path):
    d = serving_frame(tmp_path, BATCHING)
    failed = d.assign(status=np.where(d.concurrency == 4, "failed: server exited with code 9 (during this run)", "ok"))
    [v] = serving_verdict(failed, "dynamic_batching")
    assert v["verdict"].startswith("not testable") and "closed loop, 4 in flight: failed: server exited" in v["value"]
    flags = pd.Series(np.where((d.concurrency == 4) & (d.metric == "serving_e2e"), "planted flag", ""), index=d.index)
    [v] = serving_verdict(d, "dynamic_batching", flags=flags)
    assert v["verdict"].startswith("not testable") and "E2E record is missing, flagged or failed" in v["value"]
    assert "is flagged (planted flag)" in v["value"]


def test_serving_throughput_on_the_npu_is_judged_from_the_best_quantized_run(tmp_path):
    d = serving_frame(tmp_path, {S: {1: (0.2, 0.02), 4: (0.2, 0.03)}, L: {1: (0.3, 0.05)}})
    thr = d.metric == "request_throughput"
    d.loc[thr & (d.model == S) & (d.concurrency == 4), "median"] = 1500.0
    d.loc[thr & (d.model == L), "median"] = 400.0
    v = serving_verdict(d, "serving_throughput")
    assert v["verdict"] == "supported" and f"{S}: 1.5e+03 req/s" in v["value"] and f"{L}: 400 req/s" in v["value"]
    d.loc[thr & (d.model == S) & (d.concurrency == 4), "median"] = 50.0
    assert serving_verdict(d, "serving_throughput")["verdict"] == "contradicted"
    # a failed run's higher rate is named, never counted
    d.loc[thr & (d.model == S) & (d.concurrency == 1), ["median", "status"]] = [1500.0, "failed: planted"]
    v = serving_verdict(d, "serving_throughput")
    assert v["verdict"] == "contradicted" and "failed: planted" in v["value"]


def test_serving_throughput_needs_the_claims_request_and_quantization(tmp_path):
    v = serving_verdict(serving_frame(tmp_path, {S: {1: (0.2, 0.02)}, L: {1: (0.3, 0.05)}}, prompt_len=8, new_tokens=11),
                        "serving_throughput")
    assert v["verdict"].startswith("not testable: needs quantized serving runs of both models with 128-token")
    assert "other request lengths (8+11 tokens)" in v["value"]
    v = serving_verdict(serving_frame(tmp_path, {S: {1: (0.2, 0.02)}, L: {1: (0.3, 0.05)}}, device="cpu"),
                        "serving_throughput", kind="cpu")
    assert v["basis"] == "measured here, for context" and f"{S}: " in v["value"]


def test_serving_throughput_judges_only_runs_of_a_known_quantization(tmp_path):
    # an endpoint's "as served" (unknown precision) and an unquantized run are shown apart, never judged
    d = serving_frame(tmp_path, {S: {1: (0.2, 0.02)}, L: {1: (0.3, 0.05)}}, quant="as served")
    thr = d.metric == "request_throughput"
    d.loc[thr & (d.model == S), "median"], d.loc[thr & (d.model == L), "median"] = 1500.0, 400.0
    v = serving_verdict(d, "serving_throughput")
    assert v["verdict"].startswith("not testable: needs quantized serving runs")
    assert "unknown precision, not judged" in v["value"] and "quant as served" in v["value"]
    q = serving_frame(tmp_path, {S: {1: (0.2, 0.02)}, L: {1: (0.3, 0.05)}})  # w8a8: judged, and what the value shows
    q.loc[q.metric == "request_throughput", "median"] = 1.0
    v = serving_verdict(pd.concat([q, d], ignore_index=True), "serving_throughput")
    assert v["verdict"] == "contradicted"
    judged = v["value"].split("(what is judged): ")[1].split("; not quantized")[0]
    assert f"{S}: 1 req/s" in judged and "1.5e+03" not in judged
