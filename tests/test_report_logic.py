"""The report's judgements on small synthetic record frames: anomalies, verdicts, the TPOT fit, the
engine axis, What to choose, figures' alt text. No notebook runs here: each test takes well under a second."""
import zlib

import numpy as np
import pandas as pd
import pytest

from llmbench.results import anomalies as A
from llmbench.report import choose as CH
from llmbench import claims
from llmbench.claims import checks as C
from llmbench.claims import check_all
from llmbench.model import costmodel as cm
from llmbench.results import decode_fit
from llmbench.report import engines as E
from llmbench.report import figures as F
from llmbench.report import sections as R
from llmbench.model.models import load_config
from llmbench.results.frame import repeats
from llmbench.results.status import status_lines
from llmbench.results import ratios

S, L = "llama-3.2-1b", "llama-3.2-3b"
BW = 200e9  # bytes/s of the planted machine
CEILING = 250e9  # bytes/s its 00_device read probe measured: above BW, so no planted step beats its own bound
FIXED = 0.017  # s per step


def rec(metric, median, model=S, spread=0.01, n=9, **kw):
    # a stable seed: hash() of a string changes with PYTHONHASHSEED, so each run drew other noise
    rng = np.random.default_rng(zlib.crc32(repr((metric, model, sorted(kw.items()))).encode()))
    samples = list(median * (1 + spread * rng.standard_normal(n)))
    row = {"run_id": f"run-{model}-{kw.get('engine', 'eager')}", "experiment": kw.pop("experiment", "decode"),
           "model": model, "weights": "synthetic", "weights_source": "synthetic", "tokens": "synthetic-ids",
           "device": "cpu", "device_name": "test cpu", "dtype": "fp32", "quant": "none", "engine": "eager",
           "batch": 1, "prompt_len": np.nan, "context_len": np.nan, "new_tokens": np.nan, "metric": metric,
           "unit": "s", "status": "ok", "n": n, "median": float(np.median(samples)), "ci_low": min(samples),
           "ci_high": max(samples), "samples": samples, "flops": np.nan, "bytes": np.nan, "bound_s": np.nan,
           "mbu": np.nan, "mfu": np.nan, "note": "", "study": "latency"}
    row.update(kw)
    return row


def tpot(model, engine="eager", context=128, fixed=FIXED, bw=BW, dtype="fp32"):
    cfg = load_config(model)
    nbytes = cm.decode_bytes(cfg, cm.dense_weight_bytes(cfg, 4), 1, context, dtype)
    t = fixed + nbytes / bw
    return rec("tpot", t, model, engine=engine, context_len=context, prompt_len=context, bytes=nbytes,
               flops=cm.decode_flops(cfg, 1, context), bound_s=nbytes / CEILING, mbu=nbytes / t / CEILING)


def ttft(model, prompt, t, engine="eager", spread=0.01):
    return rec("ttft", t, model, engine=engine, prompt_len=prompt, experiment="prefill", spread=spread)


def frame(rows):
    return pd.DataFrame(rows)


def study(engines=("eager",)):
    rows = []
    for e in engines:
        fixed = FIXED if e == "eager" else 0.002
        for m in (S, L):
            rows += [tpot(m, e, c, fixed=fixed) for c in (64, 256)]
            rows += [ttft(m, p, 0.05 * p / 64 * (2.6 if m == L else 1)) for p in (64, 256)]
    return frame(rows)


# --- anomalies ---------------------------------------------------------------------------------------

def test_a_planted_ttft_drop_is_flagged_and_a_clean_rise_is_not():
    clean = frame([ttft(S, 16, 0.010), ttft(S, 128, 0.050)])
    assert A.check_all(clean).empty
    planted = frame([ttft(S, 16, 0.200), ttft(S, 128, 0.050)])
    a = A.check_all(planted)
    assert list(a.check) == ["TTFT falls with prompt length"]
    assert "16 tokens" in a.detail.iat[0] and "128" in a["where"].iat[0]


def test_a_record_faster_than_its_bound_a_wide_ci_and_an_impossible_ratio_are_flagged():
    d = frame([rec("tpot", 0.010, bound_s=0.020, context_len=64), rec("tpot", 0.010, spread=0.5, context_len=128)])
    checks = set(A.check_all(d).check)
    assert {"faster than its lower bound", "wide confidence interval"} <= checks
    ratios = pd.DataFrame([{"what": "TPOT 3B/1B", "ratio": 0.8, "ci_low": 0.75, "ci_high": 0.85, "low": 1.0,
                            "high": 2.6, "why": "3B does more work"}])
    assert "ratio outside its physical range" in set(A.check_all(d, ratios).check)


def test_a_flagged_record_points_at_its_disturbed_window():
    d = frame([{**ttft(S, 16, 0.2), "quiet": False, "disturbance": "another process took 90% of a core"},
               ttft(S, 128, 0.05)])
    detail = A.check_all(d).detail.iat[0]
    assert "another process" in detail and "not quiet" in detail


def test_ttft_prose_follows_the_numbers():
    d = frame([ttft(m, p, t) for m in (S, L) for p, t in ((16, 0.2), (128, 0.05))] + [tpot(S), tpot(L)])
    d["study"] = "latency"
    text = R.latency_text(d)
    assert "falls from" in text and "grows" not in text
    rising = frame([ttft(m, p, t) for m in (S, L) for p, t in ((16, 0.01), (128, 0.05))] + [tpot(S), tpot(L)])
    assert "rises from" in R.latency_text(rising)


# --- the engine axis never collapses a table --------------------------------------------------------

def test_ratio_table_keeps_one_row_per_engine():
    t = ratios.ratio_table(study(("eager", "compiled")))
    tp = t[t.metric == "TPOT"]
    assert sorted(tp.engine.unique()) == ["compiled", "eager"]
    assert len(tp) == 4  # two engines x two contexts
    eager, compiled = (tp[tp.engine == e].ratio.iat[0] for e in ("eager", "compiled"))
    assert compiled > eager  # a smaller fixed cost brings the ratio nearer the bytes ratio


def test_engine_section_computes_overhead_and_ratios():
    d = study(("eager", "compiled"))
    d = pd.concat([d, frame([rec("compile_time", 42.0, S, engine="compiled", experiment="load", n=1, spread=0)])])
    o = E.overhead(d)
    assert set(o.model) == {S, L} and (o["eager/compiled"] > 1).all()
    assert "overhead the compiled engine removes" in E.overhead_text(d)
    assert "42 s over 1 shapes" in E.compile_text(d)
    assert set(E.ratio_by_engine(d).engine) == {"eager", "compiled"}
    t = E.engine_table(d)
    assert set(t.engine) == {"eager", "compiled"} and "compile time" in t


@pytest.mark.parametrize("device,engine", [("npu", "eager"), ("cuda", "compiled"), ("cpu", "eager")])
def test_decode_below_the_dispatch_threshold_is_called_dispatch_bound_in_every_table(device, engine):
    # one threshold and one label for the engine table, the ratio tables, the text and the claims
    low, high = A.DISPATCH_MBU * 0.95, A.DISPATCH_MBU * 1.05
    d = frame([{**tpot(S, engine), "device": device, "mbu": low}])
    assert E.engine_table(d).note.iat[0] == (f"dispatch-bound: decode reaches {low:.0%} of bandwidth (below 15%); host "
                                             "dispatch dominates, so this engine's 3B/1B ratios are left out of the "
                                             "verdicts about the models")
    assert "note" not in E.engine_table(frame([{**tpot(S, engine), "device": device, "mbu": high}]))
    pair = frame([{**tpot(S, engine), "device": device, "mbu": low}, {**tpot(L, engine), "device": device, "mbu": high}])
    t = ratios.ratio_table(pair)
    assert list(t.dispatch) == [f"dispatch-bound (decode MBU {S} {low:.0%}, {L} {high:.0%}; below 15%)"]
    assert E.ratio_by_engine(pair).dispatch.iat[0] == t.dispatch.iat[0]
    assert f"[{t.dispatch.iat[0]}: its 3B/1B ratio measures the host's" in R.latency_text(pair)
    fine = frame([{**tpot(S, engine), "device": device, "mbu": high}, {**tpot(L, engine), "device": device, "mbu": high}])
    assert list(ratios.ratio_table(fine).dispatch) == [""] and "dispatch-bound" not in R.latency_text(fine)


def test_a_ttft_ratio_is_never_called_dispatch_bound():
    d = study()  # prefill is compute-bound: a low prefill MBU is no sign of dispatch
    d.loc[d.metric == "ttft", "mbu"] = A.DISPATCH_MBU / 10
    tt = ratios.ratio_table(d)
    assert len(tt[tt.metric == "TTFT"]) and (tt[tt.metric == "TTFT"].dispatch == "").all()


# --- the TPOT fit -----------------------------------------------------------------------------------

def test_the_fit_recovers_a_planted_fixed_cost_and_bandwidth():
    f = decode_fit.fits(study())[("eager", "fp32", "cpu")]
    assert f.fixed_s == pytest.approx(FIXED, rel=0.1)
    assert f.bandwidth == pytest.approx(BW, rel=0.1)
    text = R.decode_fit_text(study())
    assert "17" in text and "GB/s" in text and "instead of the bytes ratio" in text


def test_one_model_alone_gives_no_fit():
    d = frame([tpot(S, context=c) for c in (64, 128, 256)])
    assert decode_fit.fits(d) == {}


# --- verdicts ---------------------------------------------------------------------------------------

def _claim(**kw):
    base = {"quote": "q", "gloss": "g", "rule": "r", "device": "npu"}
    return {**base, **kw}


def test_a_claimed_rate_above_the_devices_bound_is_contradicted_by_a_physical_bound():
    above = _claim(check="throughput_range", range={"small": [1e6, 2e6], "large": [1e6, 2e6]},
                   batch={"small": 32, "large": 16}, request={"prompt": 128, "new": 128}, reading="full")
    within = {**above, "range": {"small": [1, 2], "large": [1, 2]}}
    out = check_all(study(), R.projection([S, L]), claims=[above, within])
    assert out[0]["verdict"] == C.BOUND
    assert out[1]["verdict"].startswith("not testable: needs an Ascend NPU")
    assert "requests/s" in out[0]["value"]


def test_not_testable_names_the_missing_input():
    robust = _claim(check="quant_robustness", device="any")
    gain = _claim(check="quant_speedup", device="any", range=[2.0, 4.0])
    d = pd.concat([study(), frame([{**tpot(S, context=64), "quant": "w8a8", "median": 0.03},
                                   rec("kl_mean", 1e-3, S, quant="w8a8", unit="nats", experiment="fidelity")])])
    out = check_all(d, R.projection([S, L]), claims=[robust, gain])
    assert "real weights" in out[0]["verdict"]
    assert "16-bit baseline" in out[1]["verdict"] and "vs fp32" in out[1]["value"]


def test_quant_gain_is_judged_against_16_bit_when_it_ran():
    gain = _claim(check="quant_speedup", device="any", range=[2.0, 4.0])
    rows = [{**tpot(S), "dtype": "bf16", "median": 0.090, "samples": [0.090] * 5},
            {**tpot(S), "dtype": "bf16", "quant": "w8a16", "median": 0.030, "samples": [0.030] * 5}]
    out = check_all(frame(rows), R.projection([S, L]), claims=[gain])[0]
    assert out["verdict"] == "supported" and "3" in out["why"]


def test_ratio_claims_are_judged_per_engine():
    claim = _claim(check="tpot_ratio", device="any", range=[2.0, 3.0])
    # eager with a 40 ms fixed cost per step: 3B/1B = (40 + 64) / (40 + 25) ms = 1.6, below the claim
    d = frame([tpot(m, e, c, fixed=0.040 if e == "eager" else 0.002) for e in ("eager", "compiled") for m in (S, L)
               for c in (64, 256)])
    out = check_all(d, R.projection([S, L]), claims=[claim])
    assert sorted(o["engine"] for o in out) == ["compiled", "eager"]
    by = {o["engine"]: o["verdict"] for o in out}
    assert by["eager"] == "contradicted"
    assert by["compiled"] == "supported"


def test_memory_ratio_uses_the_measured_peaks():
    claim = _claim(check="memory_ratio", device="any", range=[2.5, 3.5])
    rows = [rec("peak_memory", 5.0e9, S, unit="bytes", context_len=64, spread=0),
            rec("peak_memory", 12.2e9, L, unit="bytes", context_len=64, spread=0)]
    out = check_all(frame(rows), R.projection([S, L]), claims=[claim])[0]
    assert out["verdict"] == "contradicted" and "2.44" in out["value"]


def test_every_claim_in_the_data_has_a_rule():
    for c in claims.load_claims():
        assert c.get("rule"), c["id"]
        assert c["check"] in claims.CHECKS


# --- what to choose ---------------------------------------------------------------------------------

def test_choose_picks_configurations_by_their_measured_latency():
    targets = [{"name": "tight", "ttft_s": 0.5, "tpot_s": 0.050}, {"name": "loose", "ttft_s": 2.0, "tpot_s": 0.1},
               {"name": "impossible", "ttft_s": 0.001, "tpot_s": 0.001}]
    m = CH.choose_matrix(study(), targets)
    small, large = m[m.model == S].iloc[0], m[m.model == L].iloc[0]
    # planted: TPOT 1B = 17 ms + 4.9 GB / 200 GB/s = 42 ms, 3B = 81 ms; TTFT at 256 tokens 0.2 s and 0.52 s
    assert (small["tight"], small["loose"], small["impossible"]) == ("yes", "yes", "no")
    assert (large["tight"], large["loose"], large["impossible"]) == ("no", "yes", "no")
    assert "no configuration measured here meets it" in CH.choose_text(study(), targets)


def test_memory_classes_from_kv_bytes():
    t = CH.memory_classes([S], [16, 64])
    row = t[t.weights == "16-bit"].iloc[0]
    kv = 32768  # bytes per token, 16-bit, 1B: 2 x 16 layers x 8 KV heads x 64 x 2
    assert row["16 GB: KV tokens"] == f"{(16e9 - 2 * 1_235_814_400) / kv / 1e3:.0f}k"


# --- figures ----------------------------------------------------------------------------------------

def test_every_figure_has_alt_text(tmp_path):
    d = study(("eager", "compiled"))
    figs = [F.latency(d, tmp_path), F.engines(d, tmp_path), F.projection(R.projection([S, L]), tmp_path)]
    for f in figs:
        assert f is not None and len(f.alt) > 40 and f.path.is_file()
        assert (f.path.with_suffix(".txt")).read_text().strip() == f.alt


def test_llmbench_status_lists_the_anomalies_of_a_grid_folder(tmp_path):
    from llmbench.core.files import write_json
    run = tmp_path / "01_latency-x"
    run.mkdir()
    d = frame([ttft(S, 16, 0.200), ttft(S, 128, 0.050)]).drop(columns=["study"])  # as written before that column
    d.to_parquet(run / "records.parquet", index=False)
    write_json({"run_id": "01_latency-x", "notebook": "01_latency", "status": "ok", "grid": "t"}, run / "run.json")
    lines = status_lines(tmp_path)
    assert len(lines) == 1 and lines[0].startswith("anomaly  TTFT falls with prompt length")


def test_choose_finds_the_largest_batch_whose_decode_step_meets_the_limit():
    t1 = tpot(S)["median"]  # 42 ms per step at batch 1
    sweep = [rec("decode_tokens_per_s", b / (t1 * f), S, unit="tokens/s", experiment="batch", batch=b,
                 study="batch_sweep", spread=0) for b, f in ((1, 1.0), (2, 1.1), (4, 1.5))]
    sweep += [rec("peak_memory", 3e9 + b * 1e8, S, unit="bytes", experiment="batch", batch=b,
                  study="batch_sweep", spread=0) for b in (1, 2, 4)]
    d = pd.concat([study(), frame(sweep)])
    t = CH.choose(d, [{"name": "limit", "ttft_s": 2.0, "tpot_s": 1.2 * t1}])
    row = t[(t.model == S)].iloc[0]
    assert row["largest batch within TPOT"] == 2  # batch 4's step takes 1.5x: over the limit
    assert row["decode tokens/s"] == f"{2 / (t1 * 1.1):.3g}" and row["peak memory"] == "3.2 GB"


def test_a_ratio_resamples_the_repeats_its_records_were_measured_in():
    g = frame([{**tpot(S), "samples": [1.0, 1.1, 1.2, 2.0, 2.1], "sample_blocks": [3, 2]}])
    assert repeats(g) == [[1.0, 1.1, 1.2], [2.0, 2.1]]
    assert list(repeats(frame([tpot(S)]))) == tpot(S)["samples"]  # no blocks: flat


def test_the_batch_search_beyond_the_grid_is_reported_as_the_finding():
    rows = [rec("generate_latency", 0.1, S, experiment="batch", batch=b, study="batch_sweep") for b in (1, 2)]
    rows.append(rec("largest_batch_predicted", 64, S, unit="sequences", experiment="batch", batch=np.nan,
                    study="batch_sweep", spread=0))
    text = R.batch_text(frame(rows))
    assert "predicted to fit the memory is 64" in text and "grid's largest batch" not in text


def test_compiled_records_that_compiled_while_timed_are_counted_and_agreement_is_shown():
    bad = {**tpot(S, "compiled"), "status": "error: 2 compilation(s) during the timed calls (samples include compile time)"}
    agree = [rec("greedy_steps_equal", 16, S, engine="compiled", experiment="agreement", unit="tokens", new_tokens=16,
                 spread=0),
             rec("graph_rel_logit_error", 3e-6, S, engine="compiled", experiment="agreement", unit="ratio", spread=0)]
    d = pd.concat([study(("eager", "compiled")), frame([bad, *agree])])
    t = E.engine_table(d)
    assert t[(t.model == S) & (t.engine == "compiled")]["records that compiled while timed"].iat[0] == 1
    a = E.agreement(d)
    assert a["greedy tokens equal to eager"].iat[0] == "16 of 16" and a["max relative logit error"].iat[0] == "3.00e-06"
    assert a["where tokens diverge"].iat[0] == ""


@pytest.mark.parametrize("gap,tie", [(1e-3, True), (1.5e-2, True), (5e-2, False)])
def test_a_greedy_divergence_is_judged_by_the_top2_gap_against_the_logit_error_there(gap, tie):
    common = dict(engine="compiled", experiment="agreement", spread=0, dtype="bf16")
    d = frame([rec("greedy_steps_equal", 3, S, unit="tokens", new_tokens=16, **common),
               rec("graph_rel_logit_error", 0.03, S, unit="ratio", **common),
               rec("top2_gap_at_divergence", gap, S, unit="ratio", **common),
               rec("logit_error_at_divergence", 0.01, S, unit="ratio", **common)])
    a = E.agreement(d)
    assert a["greedy tokens equal to eager"].iat[0] == "3 of 16"
    text = a["where tokens diverge"].iat[0]
    # each logit may be off by the error (0.01) in opposite directions: a gap below 0.02 can flip by rounding
    assert text.split(": ", 1)[1].startswith("a near-tie" if tie else "NOT a near-tie")


def test_provenance_names_the_npu_dispatch_settings_and_noise_counts():
    runs = [{"device": {"device": "npu", "cann": "8.1.RC1", "task_queue_enable": "2",
                        "graph_compile_backend": "npugraph_ex (torch.compile; engine=compiled)", "cpu_threads": 8}}]
    f = R.device_fields(runs)
    assert "task_queue_enable = 2" in f and "cann = 8.1.RC1" in f and "npugraph_ex" in f and "cpu_threads" not in f
    d = frame([{**tpot(S), "quiet": False, "attempts": 3, "disturbance": "steal 12%"}, {**tpot(L), "quiet": True,
                                                                                        "attempts": 1, "disturbance": None}])
    text = R.noise_text(d)
    assert "1 of 2 records measured in a window that was not quiet" in text and "at most 3" in text


def test_peer_ratio_takes_our_faster_engine_and_judges_by_the_ci():
    # eager (fixed 17 ms/step) and compiled (2 ms) against a llama.cpp that is 5 ms/step slower than compiled
    d = pd.concat([study(("eager", "compiled")), frame([tpot(m, "llamacpp", c, fixed=0.007) for m in (S, L)
                                                        for c in (64, 256)])])
    t = E.peer_ratio(d)
    assert list(t.model) == [S, L] and (t.context == 64).all()
    assert t["our best path"].str.startswith("compiled").all() and t.verdict.str.startswith("ours faster within these records").all()
    r = float(t["llama.cpp / ours"].iat[0].split()[0])
    assert r > 1
    assert E.peer_ratio(study(("eager", "compiled"))).empty  # no llama.cpp records: no table


def test_the_anomaly_list_never_cuts_a_serious_anomaly():
    import pandas as pd
    from llmbench.results import anomalies as A
    row = lambda check, i: {"check": check, "where": f"run {i}", "detail": "", "run_id": str(i)}
    planted = [row("TTFT falls with prompt length", i) for i in range(50)]
    wide = [row(A.WIDE_CI, i) for i in range(100)]
    rows, line = A.listed(pd.DataFrame(wide[:30] + planted + wide[30:]))
    assert (rows.check != A.WIDE_CI).sum() == 50 and (rows.check == A.WIDE_CI).sum() == 40
    assert line.startswith("150 anomalies; 60 of the 100 wide confidence intervals are not listed")
    assert A.listed(pd.DataFrame(planted))[1] == "50 anomalies."
    assert A.listed(pd.DataFrame(columns=["check"]))[1] == "No anomaly found in these records."


def test_choose_is_between_the_two_models_not_a_trained_model_beside_them():
    other = [{**r, "model": "smollm2-135m"} for r in (tpot(S), ttft(S, 16, 0.01))]
    other = [{**r, "median": r["median"] / 100, "samples": [x / 100 for x in r["samples"]]} for r in other]
    m = CH.choose_matrix(pd.concat([study(), frame(other)]), [{"name": "loose", "ttft_s": 2.0, "tpot_s": 0.1}])
    assert set(m.model) == {S, L}
