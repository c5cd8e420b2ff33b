"""The decode-step profile: profiler events -> kernel rows with the bytes each must read (measure/profile.py),
on hand-built events; and one real profiled step of the tiny compiled model on the CPU (experiments/pairs.profile_side,
what benchmarks/engines.py --profile runs)."""
import importlib.util
import sys

import pandas as pd
import pytest

from llmbench.core import paths
from llmbench.core.errors import Unsupported
from llmbench.measure import profile as prof
from llmbench.measure.profile import Event, Row
from llmbench.model.models import load_config

CFG = load_config("tiny-1b")  # d 64, ffn 256, 4 heads of 16, 2 KV heads, 2 layers, vocab 512
W = 4  # fp32 bytes per weight element
GATE = 256 * 64 * W  # gate_proj and up_proj share the shape (256, 64); down_proj is (64, 256)
KV_LAYER = 2 * 2 * 16 * W  # K and V of one layer, one token


def test_weights_of_a_layer_by_shape():
    w = prof.linear_weights(CFG)
    assert w == {(64, 64): ["q_proj", "o_proj"], (32, 64): ["k_proj", "v_proj"], (256, 64): ["gate_proj", "up_proj"],
                 (64, 256): ["down_proj"], (512, 64): ["lm_head"]}
    # mm takes the transpose (in, out); the activation's last dimension tells gate (in 64) from down (in 256)
    assert prof.match_weight([(1, 64), (64, 256)], w) == (256, 64)
    assert prof.match_weight([(1, 256), (256, 64)], w) == (64, 256)
    assert prof.match_weight([(1, 1, 256), (64, 256)], w) == (64, 256)
    assert prof.match_weight([(256, 64), (), ()], w) is None  # a transpose of the weight reads nothing
    assert prof.match_weight([(1, 64)], w) is None and prof.match_weight([], w) is None


EVENTS = [  # times in whole and half units (sums exact); rows come out per step in the same unit
    Event("aten::linear", 1, 1.0, ((1, 1, 64), (256, 64), ()), None),   # 0: calls mm below
    Event("aten::mm", 1, 4.0, ((1, 64), (64, 256)), 0),                 # 1: gate/up, the innermost reader
    Event("llmbench::gemv", 2, 2.0, ((1, 1, 256), (64, 256))),          # 2: down_proj, twice
    Event("aten::mm", 1, 1.0, ((1, 64), (64, 256))),                    # 3: gate/up again: same row as 1
    Event("flash_fwd_splitkv_kernel", 2, 3.0),                          # 4: attention, two layers
    Event("aten::add", 1, 0.5, ((1, 64), (1, 64))),                     # 5: reads no weight
]


def test_events_become_one_row_per_kernel_and_weight_longest_first():
    rows = prof.kernel_rows(EVENTS, CFG, W, "fp32", context_len=9)
    assert rows == [
        Row("aten::mm", "gate_proj|up_proj 256x64", 2, 5.0, 2 * GATE),
        Row("flash_fwd_splitkv_kernel", "attention KV", 2, 3.0, 2 * KV_LAYER * 10),  # 9 cached + the new token
        Row("llmbench::gemv", "down_proj 64x256", 2, 2.0, 2 * GATE),
        Row("aten::linear", "", 1, 1.0, None),  # its mm child reads the weight, not it
        Row("aten::add", "", 1, 0.5, None),
    ]
    assert rows[0].gbps == pytest.approx(2 * GATE / 5.0 / 1e9) and rows[3].gbps is None
    # two profiled steps: everything per step
    two = prof.kernel_rows(EVENTS, CFG, W, "fp32", context_len=9, steps=2)
    assert two[0] == Row("aten::mm", "gate_proj|up_proj 256x64", 1, 2.5, GATE)


def test_summary_sets_kernel_time_against_the_wall_and_the_step_bytes():
    rows = prof.kernel_rows(EVENTS, CFG, W, "fp32", context_len=9)
    s = prof.summarize(rows, wall_s=20.0, step_bytes=1e6)
    assert s.kernel_s == pytest.approx(11.5) and s.gap_s == pytest.approx(8.5)
    assert s.mapped_bytes == 4 * GATE + 20 * KV_LAYER
    t = pd.DataFrame(prof.table(rows, s))
    assert list(t.columns) == prof.COLUMNS
    assert list(t.kind) == ["kernel"] * 5 + ["summary"] * 3
    summ = t[t.kind == "summary"].set_index("name")
    assert summ.loc["kernel sum", "time_s"] == pytest.approx(11.5)
    assert summ.loc["kernel sum", "share_of_wall"] == pytest.approx(0.575)
    assert summ.loc["step wall", "bytes"] == 1e6 and summ.loc["step wall", "gbps"] == pytest.approx(1e6 / 20.0 / 1e9)
    assert summ.loc["gap", "time_s"] == pytest.approx(8.5)
    assert "27%" in summ.loc["kernel sum", "what"]  # (4 * 65536 + 20 * 256) / 1e6 of the step's bytes mapped
    out = prof.text(rows, s, top=2)
    assert out.count("\n") == 3 and "gap 8500000.0 us" in out and "[attention KV]" in out


def test_a_profiled_compiled_step_on_the_cpu_writes_profile_csv(tmp_path):
    # what benchmarks/engines.py --profile and 05_pairs (profile=True) run: experiments/pairs.profile_side
    from llmbench import engines as engine
    from llmbench.experiments.pairs import Side, profile_side
    from llmbench.model.inputs import make_batch
    from llmbench.model.quant import cpu_gemv
    e = engine.load(engine.LoadRequest(engine="compiled", model="tiny-1b", weights="synthetic", dtype="fp32",
                                       quant="none", kind="cpu", max_batch=1, max_seq=40, tokens="random"))
    ids = make_batch(1, 8, e.cfg, 0)[0]
    engine.generate(e, ids, 8)  # warm: the decode graph is compiled before the profile
    rows, s = profile_side(Side(fields={}, e=e, ids=ids), steps=2)
    path = tmp_path / "profile.csv"
    prof.frame({"tiny": (rows, s), "npu side": "unsupported: profile on npu: ..."}).to_csv(path, index=False)
    t = pd.read_csv(path)
    assert list(t.columns) == ["model", *prof.COLUMNS] and set(t.model) == {"tiny", "npu side"}
    assert t[t.model == "npu side"].kind.tolist() == ["unsupported"]
    t = t[t.model == "tiny"]
    summ = t[t.kind == "summary"].set_index("name")
    assert list(summ.index) == ["kernel sum", "step wall", "gap"]
    assert 0 < summ.loc["kernel sum", "time_s"] <= summ.loc["step wall", "time_s"]
    assert (t[t.kind == "kernel"].calls > 0).all()
    try:
        cpu_gemv.library()
    except Unsupported:
        return  # without the C kernel the linears are fused into inductor's code: no op to map
    assert (t.what == "lm_head 512x64").sum() == 1  # the C gemv's op takes the weight with its shape


def test_profile_is_unsupported_where_the_profiler_is_not_read():
    from llmbench.experiments.pairs import Side, profile_side
    from types import SimpleNamespace
    with pytest.raises(Unsupported, match="profile on npu: only torch.profiler's CPU and CUDA"):
        profile_side(Side(fields={}, e=SimpleNamespace(name="compiled", kind="npu"), ids=None))
    with pytest.raises(Unsupported, match="llama.cpp"):
        profile_side(Side(fields={}, e=SimpleNamespace(name="llamacpp", kind="cpu"), ids=None))


def test_the_benchmark_flag_writes_profile_csv_and_prints_the_table(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_engines", paths.ROOT / "benchmarks" / "engines.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "MODELS", {"1b": "tiny-1b", "3b": "tiny-3b"})  # the real models' size is the lead's
    monkeypatch.setattr(bench, "read_bandwidth", lambda kind: 1e10)  # no 1 GiB probe in a test
    monkeypatch.setattr(sys, "argv", ["engines.py", "--device", "cpu", "--dtype", "fp32", "--models", "1b", "--steps", "2",
                                      "--repeats", "1", "--gen-tokens", "2", "--profile", "--out", str(tmp_path)])
    bench.main()
    out = capsys.readouterr().out
    assert "1b compiled decode step, profiled over 3 steps (per step):" in out and "kernel sum " in out
    assert f"profile: {tmp_path / 'profile.csv'}" in out and out.strip().splitlines()[-1].startswith("engines: 1b eager")
    t = pd.read_csv(tmp_path / "profile.csv")
    assert set(t.model) == {"1b"} and list(t[t.kind == "summary"].name) == ["kernel sum", "step wall", "gap"]


@pytest.mark.parametrize("flag", ["--gen-tokens", "--steps", "--repeats", "--context", "--profile-steps"])
def test_the_benchmark_names_a_count_below_1_in_one_line(flag):
    import subprocess
    r = subprocess.run([sys.executable, str(paths.ROOT / "benchmarks" / "engines.py"), flag, "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == f"engines.py: error: {flag}=0: give a whole number of at least 1"
