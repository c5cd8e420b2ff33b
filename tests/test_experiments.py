"""Experiment functions in-process on tiny models: out-of-memory is a result, not a crash."""
import pandas as pd
import torch

from llmbench.experiments import batch_sweep
from llmbench.experiments import latency
from llmbench.experiments import session
from llmbench.experiments.params import batch_sizes
from llmbench.experiments.plans import PLANS, BatchPlan, LatencyPlan


def _ctx(tmp_path, **params):
    p = {"model": "tiny-1b", "weights": "synthetic", "dtype": "fp32", "quant": "none", "kind": "cpu", "seed": 0,
         "tokens": "random",
         "out_dir": str(tmp_path / "run"), **params}
    return session.start("02_batch_sweep", p)


def test_predicted_oom_is_recorded_and_the_sweep_goes_on(tmp_path):
    ctx = _ctx(tmp_path)
    e = session.load(ctx, max_batch=8, max_seq=32)
    # a budget that fits batches 1-2 of tiny-1b (weights + KV + transients) but not 4 and 8
    need = {b: batch_sweep.cm.footprint_bytes(e.cfg, 0, b, 16 + 4, "fp32") for b in (2, 4)}
    limit_gb = (e.weight_bytes + (need[2] + need[4]) / 2) / 1e9
    batch_sweep.run(ctx, e, BatchPlan(max_batch=8, batch_factor=2, prompt_len=16, new_tokens=4, warmup=0, repeats=2, seed=0,
                                      decode_steps=4, memory_limit_gb=limit_gb))
    df = pd.read_parquet(tmp_path / "run" / "records.parquet")
    lat = df[df.metric == "generate_latency"].set_index("batch").status
    assert list(lat.index) == [1, 2, 4, 8]
    assert lat[1] == "ok" and lat[2] == "ok" and lat[4].startswith("oom: predicted") and lat[8].startswith("oom")
    largest = df[df.metric == "largest_batch_predicted"].iloc[0]
    assert largest["median"] == 2  # the predicted largest batch is a finding, not the grid's maximum
    split = df[df.metric.isin(["prefill_tokens_per_s", "decode_tokens_per_s"])]
    assert set(split.batch) == {1, 2} and (split["median"] > 0).all()


def test_batch_sizes_step_by_the_factor_and_always_end_at_max_batch():
    assert batch_sizes(8, 2) == [1, 2, 4, 8]
    assert batch_sizes(64, 4) == [1, 4, 16, 64]
    assert batch_sizes(6, 2) == [1, 2, 4, 6]      # max_batch runs even where it is no power of the factor
    assert batch_sizes(100, 10) == [1, 10, 100]
    assert batch_sizes(1, 2) == [1]


def test_real_oom_is_caught_memory_freed_and_recorded(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    e = session.load(ctx, max_batch=4, max_seq=16)
    real = batch_sweep.time_generate

    def flaky(e, ids, *a, **k):
        if ids.shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(e, ids, *a, **k)
    monkeypatch.setattr(batch_sweep, "time_generate", flaky)
    batch_sweep.run(ctx, e, BatchPlan(max_batch=4, batch_factor=2, prompt_len=8, new_tokens=2, warmup=0, repeats=2, seed=0,
                                      decode_steps=4, memory_limit_gb=0.0))
    df = pd.read_parquet(tmp_path / "run" / "records.parquet")
    lat = df[df.metric == "generate_latency"].set_index("batch").status
    assert lat[1] == "ok" and lat[2] == "oom: out of memory while generating" and lat[4] == "ok"


def test_latency_records_carry_bounds_and_samples(tmp_path):
    ctx = session.start("01_latency", {"model": "tiny-3b", "weights": "synthetic", "dtype": "fp32", "quant": "none",
                                       "kind": "cpu", "tokens": "random", "seed": 0, "out_dir": str(tmp_path / "lat")})
    e = session.load(ctx, max_seq=32)
    latency.run(ctx, e, LatencyPlan(prompt_lens=(8,), decode_contexts=(8,), decode_steps=3, gen_prompt_len=8,
                                    gen_new_tokens=(4,), warmup=1, repeats=3, seed=0))
    df = pd.read_parquet(tmp_path / "lat" / "records.parquet")
    tpot = df[df.metric == "tpot"].iloc[0]
    assert tpot.n == 9 and len(tpot.samples) == 9  # 3 repeats x 3 timed steps
    assert tpot.context_len == 9 and tpot.bound_s > 0 and 0 < tpot.mbu < 1
    assert set(df.metric) >= {"ttft", "tpot", "generate_latency", "generate_gap", "peak_memory", "load_time", "weight_bytes"}
    # the whole-generate comparison reuses the TTFT and TPOT of its prompt, timed once
    assert (df.metric == "ttft").sum() == 1 and (df.metric == "tpot").sum() == 1


def test_batch_1_of_a_timed_prompt_reuses_its_samples_and_times_only_the_generate(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    e = session.load(ctx, max_seq=32)
    ttft, tpot = latency.prefill(ctx, e, 8, 1, 2, 0), latency.decode(ctx, e, 8, 3, 1, 2, 0)

    def no_second_timing(*a, **k):
        raise AssertionError("timed again")
    monkeypatch.setattr(batch_sweep, "time_prefill", no_second_timing)
    monkeypatch.setattr(batch_sweep, "time_decode", no_second_timing)
    batch_sweep.one_batch(ctx, e, 1, 8, 4, 1, 2, 0, decode_steps=3, timed_at_batch_1=(ttft, tpot))
    df = pd.read_parquet(tmp_path / "run" / "records.parquet").set_index("metric")
    assert list(df.loc["prefill_time", "samples"]) == list(df.loc["ttft", "samples"])
    assert list(df.loc["decode_step_time", "samples"]) == list(df.loc["tpot", "samples"])
    assert list(df.loc["decode_step_time", "sample_blocks"]) == [3, 3]
    assert df.loc["generate_latency", "status"] == "ok" and df.loc["tokens_per_s", "n"] == 2


def test_each_plan_field_is_a_declared_parameter_of_its_notebook():
    from dataclasses import fields

    from llmbench.experiments.params import declared
    for notebook, plan in PLANS.items():
        decl = declared(notebook)
        for f in fields(plan):
            assert f.name in decl, f"{plan.__name__}.{f.name} is not a parameter of {notebook}"
            assert f.metadata["help"], f"{plan.__name__}.{f.name} has no help"


def test_records_say_which_study_measured_them(tmp_path):
    ctx = _ctx(tmp_path)
    assert isinstance(ctx, session.Session) and ctx.base["study"] == "batch_sweep"
    session.add(ctx, session.row(ctx, experiment="batch", metric="x", unit=""))
    assert pd.read_parquet(tmp_path / "run" / "records.parquet").study.tolist() == ["batch_sweep"]
