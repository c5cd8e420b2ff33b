"""The report's Serving section on records built by hand: the numbers in its tables follow from them."""
import pandas as pd
import pytest

from llmbench.report import serving as RS
from llmbench.experiments import serving as S
from llmbench.measure import serving_metrics as SM
from llmbench.experiments.session import add
from llmbench.measure.serving_metrics import RequestResult


def ctx(tmp_path, model):
    from llmbench.experiments.session import Session
    return Session(notebook="04_serving", params={"dtype": "bf16"}, kind="cpu", info={}, spec=None,
                   spec_ceilings={"flops": {}, "bandwidth": None}, dir=tmp_path,
                   base={"run_id": f"04_serving-{model}", "study": "serving", "device": "cpu",
                         "device_name": "test cpu", "model": model, "weights": "synthetic", "dtype": "bf16",
                         "quant": "none", "tokens": "random"})


def run(rate, ttft, tpot, n=5, gap=None, concurrency=None):
    """n requests arriving 1/rate apart, served `gap` apart (default: as they arrive), each with this TTFT
    (from its arrival, or from when the server got to it) and TPOT over 11 output tokens."""
    step = 1 / rate if rate else gap
    gap = gap or step
    rs = []
    for i in range(n):
        first = max(i * step, i * gap) + ttft
        chunks = [first + k * tpot for k in range(11)]
        rs.append(RequestResult(i, False, i * step, i * step, chunks, chunks[-1], 8, 11, 0, None))
    return SM.summarize_run(rs, SM.limits(), rate if concurrency is None else None)


def records(tmp_path) -> pd.DataFrame:
    rows = []
    # 1B: meets interactive up to 0.2 req/s, conversational up to 0.4, saturated at 0.8 (completions at half the arrivals)
    plan = {"llama-3.2-1b": [(0.2, run(0.2, 0.3, 0.02)), (0.4, run(0.4, 0.9, 0.05)),
                             (0.8, run(0.8, 1.0, 0.05, gap=2.5))],
            # 3B: conversational only at 0.1; never interactive (TPOT 60 ms)
            "llama-3.2-3b": [(0.1, run(0.1, 1.0, 0.06)), (0.2, run(0.2, 3.0, 0.09))]}
    for model, runs in plan.items():
        c = ctx(tmp_path, model)
        for rate, s in runs:
            rows += add(c, S._rows(c, s, dict(engine="llama-server", prompt_len=8, new_tokens=11, tokens="random",
                                              request_rate=rate, concurrency=None, other_cores=0.1)))
        for conc, tp in ((1, 0.02), (4, 0.03)):
            s = run(None, 0.2, tp, gap=0.5 / conc, concurrency=conc)
            rows += add(c, S._rows(c, s, dict(engine="llama-server", prompt_len=8, new_tokens=11, tokens="random",
                                              request_rate=None, concurrency=conc, other_cores=0.1)))
    return pd.DataFrame(rows)


def test_table_has_one_row_per_run_with_its_percentiles(tmp_path):
    t = RS.table(records(tmp_path))
    assert len(t) == 5 + 4
    r = t[(t.model == "llama-3.2-1b") & (t.load == "Poisson 0.2 req/s")].iloc[0]
    assert (r["TTFT p50"], r["TPOT p99"], r["saturated"]) == ("300 ms", "20 ms", "no")
    assert t[(t.model == "llama-3.2-1b") & (t.load == "Poisson 0.8 req/s")].iloc[0]["saturated"] == "yes"
    assert set(t.load) >= {"closed loop, 1 in flight", "closed loop, 4 in flight"}


def test_sustainable_rates_and_the_1b_3b_ratio(tmp_path):
    df = records(tmp_path)
    st = RS.sustainable_table(df).set_index(["model", "limit"])
    assert st.loc[("llama-3.2-1b", "MLPerf interactive"), "highest rate met (req/s)"] == "0.2"
    assert st.loc[("llama-3.2-1b", "MLPerf interactive"), "next rate, not met"] == "0.4"
    assert st.loc[("llama-3.2-1b", "MLPerf conversational"), "highest rate met (req/s)"] == "0.4"
    assert st.loc[("llama-3.2-1b", "MLPerf conversational"), "next rate, not met"] == "0.8"  # saturated
    assert st.loc[("llama-3.2-3b", "MLPerf interactive"), "highest rate met (req/s)"] == "none"
    assert st.loc[("llama-3.2-3b", "MLPerf conversational"), "highest rate met (req/s)"] == "0.1"
    rt = RS.ratio_table(df).set_index("limit")
    a1 = st.loc[("llama-3.2-1b", "MLPerf conversational"), "_achieved"]
    a3 = st.loc[("llama-3.2-3b", "MLPerf conversational"), "_achieved"]
    assert rt.loc["MLPerf conversational", "llama-3.2-1b/llama-3.2-3b"] == f"{a1 / a3:.3g}"
    assert rt.loc["MLPerf interactive", "llama-3.2-1b/llama-3.2-3b"].startswith("n/a: llama-3.2-3b met the limit at no")


def test_text_and_figure(tmp_path):
    df = records(tmp_path)
    text = RS.text(df)
    assert "Highest swept rate meeting MLPerf conversational" in text and "llama-3.2-3b on llama-server: 0.1 req/s" in text
    assert "llama-3.2-3b on llama-server: no swept rate" in text  # interactive: none met, said so
    assert "measured here, for context" in text  # cpu records never judge the seed's Ascend claims
    assert "1 to 4 requests in flight" in text
    fig = RS.figure(df, tmp_path / "fig")
    assert fig.path.is_file() and "MLPerf conversational: TTFT 2.0 s" in fig.alt


def test_failures_are_listed_and_an_empty_frame_says_so(tmp_path):
    df = records(tmp_path)
    bad = dict(df.iloc[0])
    bad.update(status="failed: server exited with code 3 (during this run)", request_rate=1.6, metric="serving_ttft")
    df = pd.concat([df, pd.DataFrame([bad])], ignore_index=True)
    assert "Poisson 1.6 req/s: failed: server exited with code 3" in RS.failures_text(df)
    assert RS.text(df.iloc[0:0]).startswith("No serving records")
    assert RS.table(df.iloc[0:0]).empty and RS.figure(df.iloc[0:0], tmp_path) is None


@pytest.mark.parametrize("model", ["llama-3.2-1b"])
def test_busy_machine_is_said(tmp_path, model):
    df = records(tmp_path)
    df["other_cores"] = 1.2
    assert "shared the machine" in RS.text(df)


def test_what_to_choose_uses_goodput_where_serving_records_exist(tmp_path):
    from llmbench.report import choose as CH
    from llmbench.results import frame
    df = records(tmp_path)
    sat = (df.metric == "goodput_mlperf_conversational") & (df.request_rate == 0.8)  # the saturated 1B run
    df.loc[sat, "median"] = 99.0  # a run that fell behind its load is never chosen, whatever its goodput
    targets = frame.published()["latency_targets"]
    conv = next(t for t in targets if t["name"] == "MLPerf conversational")
    best = CH.goodput_choice(df, conv)
    t = RS.runs(df)
    usable = t[~t.saturated & (t.completed_share == 1)]
    col = "goodput_mlperf_conversational"
    assert best.goodput.iloc[0] == usable[col].max()  # the highest goodput of a run that kept up
    assert set(best.index) <= set(usable.index) and best.goodput.max() < 99
    text = CH.choose_text(df, targets)
    line = next(x for x in text.splitlines() if "MLPerf conversational" in x)
    assert "from the serving runs (04_serving), by goodput" in line
    top = best.iloc[0]
    assert f"Highest: {top.model} on llama-server (bf16, quant none), {top.goodput:.3g} req/s" in line
    # without serving records: today's logic, which needs batch-1 latency records
    assert CH.choose_text(df[df.experiment != "serving"], targets) == "No batch-1 latency records: nothing to choose from."
    # a target that is not a serving limit keeps today's logic even with serving records
    assert CH.goodput_choice(df, next(t for t in targets if t["name"].startswith("seed:"))).empty
    # no request met the limit in any usable run (goodput 0): nothing is chosen, and the line says so
    df.loc[df.metric == "goodput_mlperf_conversational", "median"] = 0.0
    assert CH.goodput_choice(df, conv).empty
    line = next(x for x in CH.choose_text(df, targets).splitlines() if "MLPerf conversational" in x)
    assert "no served configuration had a request meet both limits" in line and "Highest" not in line
