"""The energy section and the seed's energy claims, on records made by energy.rows with known values."""
import numpy as np
import pandas as pd
import pytest

from llmbench import claims
from llmbench.claims import checks as C
from llmbench.system import energy
from llmbench.report import energy as RE
from llmbench.measure.records import COLUMNS, record
from llmbench.claims import energy as energy_claims

BASE = dict(weights="synthetic", tokens="synthetic-ids", device="cuda", device_name="Fake GPU", engine="eager",
            dtype="bf16", prompt_len=128, new_tokens=64)
JPT_1B = {1: 0.8, 8: 0.2}  # J per generated token of the 1B at each batch (unquantized)


def window(jpt, batch, new_tokens=64, chunks=5, jitter=0.02):
    """A reading whose sub-windows give J/token = jpt (within +-jitter) for calls of batch x new_tokens."""
    spread = 1 + jitter * np.linspace(-1, 1, chunks)
    j = [jpt * batch * new_tokens * 2 * s for s in spread]  # 2 calls per sub-window
    return energy.EnergyReading(status="ok", method="NVML total energy counter (fake)", joules=sum(j),
                                seconds=float(chunks), avg_watts=sum(j) / chunks, samples=10 * chunks,
                                interval_s=0.1, chunks=[(x, 1.0, 2) for x in j])


def energy_records(model, quant, batch, jpt, idle=None):
    r = window(jpt, batch)
    return [record(**f, **BASE, model=model, quant=quant, batch=batch, run_id=f"{model}-{quant}")
            for f in energy.rows(r, calls=10, tokens_per_call=batch * 64, requests_per_call=batch, idle_watts=idle)]


def frame(ratio_none=2.5, ratio_q=2.0):
    recs = []
    for b, jpt in JPT_1B.items():
        recs += energy_records("llama-3.2-1b", "none", b, jpt, idle=60.0)
        recs += energy_records("llama-3.2-3b", "none", b, jpt * ratio_none, idle=60.0)
        recs += energy_records("llama-3.2-1b", "w8a8", b, jpt / 2)
        recs += energy_records("llama-3.2-3b", "w8a8", b, jpt / 2 * ratio_q)
    recs.append(record(experiment="energy", metric="idle_power", unit="W", samples=[59.0, 60.0, 61.0],
                       note="NVML total energy counter (fake); ...", device="cuda", device_name="Fake GPU"))
    df = pd.DataFrame(recs)
    df["study"] = np.where(df.metric == "idle_power", "device", "batch_sweep")
    return df


def test_table_ratio_text_and_figure(tmp_path):
    df = frame()
    t = RE.table(df)
    assert len(t) == 8 and {"J/token", "tokens/J", "J/request", "average W", "J/token above idle"} <= set(t.columns)
    row = t[(t.model == "llama-3.2-1b") & (t.quant == "none") & (t.batch == 1)].iloc[0]
    assert row["J/token"].startswith("0.8 (95% CI") and row["meter"] == "NVML total energy counter (fake)"
    rt = RE.ratio_table(df)
    assert len(rt) == 4 and rt._ratio.to_numpy() == pytest.approx([2.5, 2.5, 2.0, 2.0])
    assert (rt._lo < rt._ratio).all() and (rt._ratio < rt._hi).all()
    text = RE.text(df)
    assert "2–2.5 times" in text and "Idle draw of Fake GPU" in text and "60 (95% CI" in text
    assert "not readable" not in text
    fig = RE.figure(df, tmp_path)
    assert fig.path.is_file() and (tmp_path / "energy_per_token.svg").is_file()
    assert "batch 1: " in fig.alt and "batch 8: " in fig.alt and "llama-3.2-3b none 2" in fig.alt  # 0.8 x 2.5


def test_unreadable_energy_is_said_from_the_records():
    status = "unsupported: no readable energy counter (/sys/class/powercap does not exist)"
    df = pd.DataFrame([record(**f, device="cpu", device_name="Some CPU", model=m, batch=1)
                       for m in ("llama-3.2-1b", "llama-3.2-3b")
                       for f in energy.rows(energy.EnergyReading(status=status), 0, 64, 1)])
    df["study"] = "batch_sweep"
    text = RE.text(df)
    assert "not readable** on Some CPU (cpu): " + status in text and "2 energy records say so" in text
    assert RE.table(df).empty and RE.ratio_table(df).empty and RE.figure(df, "unused") is None
    res = energy_claims.energy_per_request({}, C.ClaimContext(df=df, kind="cpu", pair=("llama-3.2-1b", "llama-3.2-3b")))
    assert res["verdict"] == f"not testable: needs a readable energy meter (here: {status})"
    assert RE.text(pd.DataFrame(columns=list(COLUMNS))).startswith("No energy records")


def ctx(df, kind="cuda"):
    return C.ClaimContext(df=df, kind=kind, pair=("llama-3.2-1b", "llama-3.2-3b"))


def test_energy_claims_follow_the_numbers():
    df = frame(ratio_none=2.5, ratio_q=2.0)
    [per_req] = energy_claims.energy_per_request({}, ctx(df))
    assert per_req["verdict"] == C.SUPPORTED and per_req["engine"] == "eager" and "batch 8" in per_req["value"]
    assert energy_claims.quant_energy_gap({}, ctx(df))["verdict"] == C.SUPPORTED
    assert energy_claims.quant_energy_gap({}, ctx(frame(ratio_none=2.0, ratio_q=2.5)))["verdict"] == C.CONTRADICTED
    [per_req] = energy_claims.energy_per_request({}, ctx(frame(ratio_none=0.9, ratio_q=0.9)))
    assert per_req["verdict"] == C.CONTRADICTED
    tw = energy_claims.tops_per_watt({}, ctx(df))  # on cuda: a value for context, judged only on an NPU
    assert tw["verdict"].startswith("not testable: needs an Ascend NPU") and "TOPS/W" in tw["value"]
    # the 3B does 2.60x the 1B's FLOPs per token: at 2.0x the energy (w8a8) it wins, at 2.8x it loses
    assert energy_claims.tops_per_watt({}, ctx(df, "npu"))["verdict"] == C.SUPPORTED
    assert energy_claims.tops_per_watt({}, ctx(frame(2.8, 2.8), "npu"))["verdict"] == C.CONTRADICTED


def test_energy_claims_are_in_the_claims_check():
    ids = {c["check"] for c in claims.load_claims()}
    assert {"energy_per_request", "tops_per_watt", "quant_energy_gap"} <= ids <= set(claims.CHECKS)
