"""The memory canary of watched windows (system/canary.py): the disturbed decision and mbu_window on
hand-built readings, NVML and npu-smi readings from fakes, a window whose canary drops mid-run is redone,
and records of a tiny-model latency run carry the canary figures."""
import os
import sys
import types

import pandas as pd
import pytest

from llmbench.measure.records import COLUMNS
from llmbench.results.fmt import fmt_mbu
from llmbench.report import sections
from llmbench.system import canary, noise

R = canary.Reading
BELOW, DRIFT = noise.LIMITS.canary_below_ceiling, noise.LIMITS.canary_drift


def test_the_verdict_holds_the_reads_to_the_ceiling_and_to_each_other():
    ceil = 10e9
    assert canary.verdict(R(9.0), R(8.8), ceil, BELOW, DRIFT) == []
    slow = canary.verdict(R(7.0), R(7.1), ceil, BELOW, DRIFT)  # 30% below the ceiling at both edges
    assert len(slow) == 2 and all(w.startswith(canary.PREFIX) for w in slow)
    assert "7.0 GB/s at the window's start, 30% below the run's ceiling 10.0 GB/s (limit 25%)" in slow[0]
    moved = canary.verdict(R(9.5), R(7.7), ceil, BELOW, DRIFT)  # 19% apart: within the limit
    assert moved == []
    moved = canary.verdict(R(9.5), R(7.5), ceil, BELOW, DRIFT)
    assert moved == [f"{canary.PREFIX}memory read moved from 9.5 to 7.5 GB/s across the window (limit 20%)"]
    # no ceiling (or a NaN one): only the drift is judged
    assert canary.verdict(R(1.0), R(1.0), None, BELOW, DRIFT) == []
    assert canary.verdict(R(1.0), R(1.0), float("nan"), BELOW, DRIFT) == []
    assert len(canary.verdict(R(1.0), R(0.5), None, BELOW, DRIFT)) == 1
    # a device state that disturbs (a thermal slowdown at the end); recorded-only notes do not
    hot = canary.verdict(R(notes=["sw_power_cap"]), R(flags=["hw_thermal_slowdown"]), None, BELOW, DRIFT)
    assert hot == [f"{canary.PREFIX}hw_thermal_slowdown at the window's end"]
    assert canary.verdict(None, None, ceil, BELOW, DRIFT) == []


def test_mbu_window_is_the_rate_over_the_windows_own_read_rate():
    # 1 GB per step in 0.1 s = 10 GB/s; the window read 8 and 12 GB/s (mean 10): 100%
    assert canary.mbu_window(1e9, 0.1, 8.0, 12.0) == pytest.approx(1.0)
    assert canary.mbu_window(1e9, 0.1, 8.0, None) == pytest.approx(1.25)
    assert canary.mbu_window(1e9, 0.1, None, None) is None
    assert canary.mbu_window(None, 0.1, 8.0, 8.0) is None and canary.mbu_window(1e9, float("nan"), 8.0, 8.0) is None
    assert fmt_mbu(1.19, 0.84) == "119% (window 84%)" and fmt_mbu(0.5, float("nan")) == "50%"
    assert fmt_mbu(float("nan"), 0.8) == ""


def test_the_buffer_is_sized_from_the_last_level_cache(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                                             (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, v in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(f"{v}\n")
    assert canary.llc_bytes(tmp_path) == 32 * 2**20
    assert canary.llc_bytes(tmp_path / "missing") is None
    assert canary.buffer_bytes(32 * 2**20) == 256 * 2**20 == canary.buffer_bytes(None)   # at least 256 MiB
    assert canary.buffer_bytes(100 * 2**20) == 400 * 2**20                               # 4 x LLC
    assert canary.buffer_bytes(480 * 2**20) == 512 * 2**20   # a VM reporting the host's L3: capped


def test_cpu_read_measures_the_buffer_with_the_given_reader(monkeypatch):
    monkeypatch.setattr(canary, "_buffer", {})
    monkeypatch.setattr(canary, "MIN_BYTES", 2**20)
    monkeypatch.setattr(canary, "MAX_BYTES", 2**20)
    seen = []
    r = canary.cpu_read(("test reader", lambda x: seen.append(x.numel())), reads=3)
    assert seen == [2**18] * 3 and r.read_gbs > 0 and r.source == "test reader, 1 MiB, best of 3 reads"


def _fake_nvml(monkeypatch, mask, sm=1410, mem=1593, events=True):
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: calls.append(i) or i,
        nvmlDeviceGetClockInfo=lambda h, t: {1: sm, 2: mem}[t],
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: mask)
    if events:  # newer pynvml: the same bits under the new name
        fake.nvmlDeviceGetCurrentClocksEventReasons = lambda h: mask
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return calls


def test_nvml_throttle_reasons_disturb_and_clocks_are_recorded(monkeypatch):
    calls = _fake_nvml(monkeypatch, 0x4 | 0x40, events=False)  # sw power cap + hw thermal slowdown
    r = canary.cuda_read(3)
    assert calls == [3] and r.clocks_mhz == {"sm": 1410.0, "mem": 1593.0}
    assert r.flags == ["hw_thermal_slowdown"] and r.notes == ["sw_power_cap"] and r.source == "nvml"
    _fake_nvml(monkeypatch, 0x1, sm=1980)
    quiet = canary.cuda_read()
    assert quiet.flags == [] and quiet.notes == ["gpu_idle"]
    assert canary.describe(r, quiet) == "nvml; sm 1410->1980 MHz, mem 1593->1593 MHz, gpu_idle, hw_thermal_slowdown, sw_power_cap"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: unknown, said so
    r = canary.cuda_read()
    assert r.clocks_mhz == {} and r.flags == [] and r.source.startswith("nvml unavailable")


# `npu-smi info -t common -i 0` of a 910B (fields printed as printf("\t%-30s : %u\n", ...)), then the MCU's
COMMON = ("\tNPU ID                         : 0\n\tChip Count                     : 1\n\n"
          "\tChip ID                        : 0\n\tAicore Usage Rate(%)           : 0\n"
          "\tAicore Freq(MHZ)               : 1800\n\tAicore curFreq(MHZ)            : 800\n"
          "\tTemperature(C)                 : 46\n\n\tChip Name                      : mcu\n"
          "\tTemperature(C)                 : 38\n")


def test_npu_smi_clock_and_health(tmp_path, monkeypatch):
    r = canary.npu_reading(COMMON, "\tHealth Status                  : OK\n")
    assert r.clocks_mhz == {"aicore": 800.0} and r.flags == [] and r.notes == ["aicore rated 1800 MHz"]
    bad = canary.npu_reading(COMMON, "\tHealth Status                  : Warning\n")
    assert bad.flags == ["health Warning"]
    assert canary.verdict(r, bad, None, BELOW, DRIFT) == [f"{canary.PREFIX}health Warning at the window's end"]
    # through a fake npu-smi on PATH, addressed by npu-smi's own id
    d = tmp_path / "bin"
    d.mkdir()
    exe = d / "npu-smi"
    exe.write_text("#!/bin/sh\necho \"$*\" >> %s\ncase \"$*\" in *common*) printf '%s';; "
                   "*health*) printf '\\tHealth Status : OK\\n';; esac\n" % (tmp_path / "args.txt", COMMON.replace("\t", "\\t").replace("\n", "\\n").replace("%", "%%")))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LLMBENCH_NPU_SMI_ID", "224:1")
    r = canary.npu_read()
    assert r.clocks_mhz == {"aicore": 800.0} and r.flags == [] and r.source == "npu-smi"
    assert (tmp_path / "args.txt").read_text().split("\n")[:2] == ["info -t common -i 224 -c 1", "info -t health -i 224 -c 1"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("LLMBENCH_NPU_SMI_ID")
    assert canary.npu_read().source.startswith("npu-smi unavailable (Unmapped: npu-smi is not on PATH")


def _quiet_window(fn, kind, limits):
    return fn(), noise.Window(wall_s=1, ncpu=2, own_cores=1, other_cores=0, free_cores=1, steal_share=0)


def test_a_window_whose_canary_drops_mid_run_is_redone(monkeypatch):
    # attempt 1: the memory read falls from 10 to 6 GB/s during the measurement; attempt 2: steady at 10
    reads = iter([R(10.0, source="fake"), R(6.0, source="fake"), R(10.0, source="fake"), R(9.8, source="fake")])
    monkeypatch.setattr(canary, "ENABLED", True)
    monkeypatch.setattr(canary, "cpu_read", lambda reader=None: next(reads))
    monkeypatch.setattr(noise, "watch", _quiet_window)
    monkeypatch.setattr(noise, "settle", lambda *a, **k: pytest.fail("the CPU was quiet: no CPU probe"))
    slept = []
    monkeypatch.setattr(noise.time, "sleep", slept.append)
    calls = []
    out, c = noise.measure(lambda: calls.append(1) or len(calls), "cpu", backoff_s=2, ceiling_bps=10.5e9)
    assert out == 2 and c.attempts == 2 and c.quiet is True and slept == [2]
    assert c.reasons == [f"attempt 1: {canary.PREFIX}memory read 6.0 GB/s at the window's end, 43% below the run's "
                         f"ceiling 10.5 GB/s (limit 25%); {canary.PREFIX}memory read moved from 10.0 to 6.0 GB/s "
                         "across the window (limit 20%)"]
    f = noise.fields(c)
    assert tuple(f) == noise.FIELDS and set(f) <= set(COLUMNS)
    assert (f["canary_before_gbs"], f["canary_after_gbs"], f["canary_note"]) == (10.0, 9.8, "fake")

    # a memory bus that stays slow: every attempt disturbed, the last one kept and marked, never dropped
    reads = iter([R(5.0, source="fake")] * 6)
    out, c = noise.measure(lambda: 7, "cpu", max_attempts=3, backoff_s=1, ceiling_bps=10e9)
    assert out == 7 and c.attempts == 3 and c.quiet is False and len(c.reasons) == 3
    # switched off: no reading, no canary fields
    monkeypatch.setattr(canary, "ENABLED", False)
    out, c = noise.measure(lambda: 8, "cpu", ceiling_bps=10e9)
    f = noise.fields(c)
    assert c.attempts == 1 and f["canary_before_gbs"] is None and f["canary_note"] is None


def test_the_noise_text_counts_windows_the_canary_disturbed():
    P = canary.PREFIX
    df = pd.DataFrame({"quiet": [True, True, False], "attempts": [1, 2, 3],
                       "disturbance": [None, f"attempt 1: {P}memory read moved",
                                       f"attempt 1: other processes used 1.2 cores | attempt 2: {P}x; {P}y | attempt 3: {P}z"],
                       "canary_before_gbs": [9.5, 9.9, 6.0], "canary_after_gbs": [9.6, 9.8, 5.5]})
    text = sections.noise_text(df)
    assert "3 windows of 2 records were disturbed by the memory canary" in text
    assert "the memory canary read 5.5-9.9 GB/s in 3 records' windows" in text


def test_latency_records_carry_the_canary_figures(tmp_path, monkeypatch):
    from llmbench.experiments import latency, session
    from llmbench.experiments.plans import LatencyPlan
    monkeypatch.setattr(canary, "ENABLED", True)
    monkeypatch.setattr(canary, "_buffer", {})
    monkeypatch.setattr(canary, "MAX_BYTES", 16 * 2**20)  # a small buffer: this checks the plumbing, not the bus
    monkeypatch.setattr(noise, "settle", lambda *a, **k: 0.0)  # a redone window does not wait here
    monkeypatch.setattr(noise.time, "sleep", lambda s: None)
    ctx = session.start("01_latency", {"model": "tiny-1b", "weights": "synthetic", "dtype": "fp32", "quant": "none",
                                       "kind": "cpu", "tokens": "random", "seed": 0, "out_dir": str(tmp_path / "lat")})
    e = session.load(ctx, max_seq=32)
    latency.run(ctx, e, LatencyPlan(prompt_lens=(8,), decode_contexts=(8,), decode_steps=3, gen_prompt_len=8,
                                    gen_new_tokens=(4,), warmup=1, repeats=2, seed=0))
    df = pd.read_parquet(tmp_path / "lat" / "records.parquet")
    timed = df[df.metric.isin(["ttft", "tpot", "generate_latency"])]
    assert len(timed) == 3 and (timed.canary_before_gbs > 0).all() and (timed.canary_after_gbs > 0).all()
    assert timed.canary_note.str.contains("16 MiB, best of 2 reads").all()
    for _, r in timed.iterrows():
        rate = (r.canary_before_gbs + r.canary_after_gbs) / 2 * 1e9
        assert r.mbu_window == pytest.approx(r["bytes"] / r["median"] / rate)
    assert df[df.metric == "peak_memory"].canary_before_gbs.isna().all()  # untimed rows carry none
