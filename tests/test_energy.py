"""Energy meters against fake sources with known answers: a fake NVML module, a fake npu-smi on PATH
printing npu-smi's own line format, and a fake powercap tree whose package counter wraps around."""
import os
import stat
import sys
import time
import types

import numpy as np
import pandas as pd
import pytest

from llmbench.system import energy
from llmbench.measure.records import record

NOSYNC = dict(sync=lambda: None)


# --- cuda: a fake NVML ---------------------------------------------------------------------------------

class NVMLError(Exception):
    pass


def fake_nvml(energy_mj=None, power_mw=None):
    """A pynvml stand-in: energy_mj(t) and power_mw(t) of perf_counter time, None = not supported."""
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.calls = []
    m.nvmlInit = lambda: m.calls.append("init")
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: 4
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h[1]}a{h[1]}b-0000".encode()

    def counter(h):
        if energy_mj is None:
            raise NVMLError("Not Supported")
        return int(energy_mj(time.perf_counter()))

    def power(h):
        if power_mw is None:
            raise NVMLError("Not Supported")
        return int(power_mw(time.perf_counter()))
    m.nvmlDeviceGetTotalEnergyConsumption = counter
    m.nvmlDeviceGetPowerUsage = power
    return m


def test_nvml_energy_counter_gives_the_known_energy(monkeypatch):
    t0 = time.perf_counter()
    nvml = fake_nvml(energy_mj=lambda t: 5e6 + 250_000 * (t - t0))  # 250 W, counter not starting at 0
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    r, calls = energy.measure("cuda", lambda: time.sleep(0.01), min_seconds=0.5, interval_s=0.02, **NOSYNC)
    assert r.status == "ok" and "nvmlDeviceGetTotalEnergyConsumption" in r.method
    assert r.seconds >= 0.5 and calls >= 10
    assert r.joules == pytest.approx(250 * r.seconds, rel=1e-3)  # counter is in whole mJ
    assert r.avg_watts == pytest.approx(250, rel=1e-3)
    assert sum(c[0] for c in r.chunks) == pytest.approx(r.joules) and sum(c[2] for c in r.chunks) == calls
    assert len(r.chunks) >= 4 and r.samples >= 10
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_without_counter_integrates_sampled_power(monkeypatch):
    t0 = time.perf_counter()
    nvml = fake_nvml(power_mw=lambda t: 1000 * (100 + 40 * (t - t0)))  # a ramp: trapezoid is exact
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    r, calls = energy.measure("cuda", lambda: time.sleep(0.01), min_seconds=0.5, interval_s=0.02, **NOSYNC)
    a, b = r.t_start - t0, r.t_end - t0
    expected = 100 * (b - a) + 20 * (b * b - a * a)
    assert r.status == "ok" and "nvmlDeviceGetPowerUsage" in r.method and "Not Supported" in r.method
    assert r.joules == pytest.approx(expected, rel=2e-3)


def test_nvml_with_no_reading_at_all_is_unsupported_and_runs_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    ran = []
    r, calls = energy.measure("cuda", lambda: ran.append(1), min_seconds=0.1, **NOSYNC)
    assert r.status.startswith("unsupported: no readable energy counter (NVML has neither")
    assert calls == 0 and not ran


def test_nvml_handle_is_the_gpu_torch_calls_cuda_0(monkeypatch):
    nvml = fake_nvml(energy_mj=lambda t: 0)
    for visible, want in ((None, 0), ("2,3", 2), ("GPU-3a3b", 3), ("GPU-1", 1)):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert energy._nvml_handle(nvml) == ("handle", want)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-abc")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    r, _ = energy.measure("cuda", lambda: None, min_seconds=0.1, **NOSYNC)
    assert r.status.startswith("unsupported: no readable energy counter (CUDA_VISIBLE_DEVICES selects a MIG")
    assert nvml.calls == ["init", "shutdown"]


def test_missing_nvidia_ml_py_is_unsupported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    r, _ = energy.measure("cuda", lambda: None, min_seconds=0.1, **NOSYNC)
    assert r.status == ("unsupported: no readable energy counter (nvidia-ml-py is not installed "
                        "(pip install -r requirements-cuda.txt))")


# --- npu: a fake npu-smi -------------------------------------------------------------------------------

def fake_npu_smi(tmp_path, monkeypatch, body):
    """An npu-smi executable first on PATH; it appends its arguments to args.txt."""
    d = tmp_path / "bin"
    d.mkdir()
    exe = d / "npu-smi"
    exe.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/args.txt\n{body}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "args.txt"


# npu-smi prints each field as printf("\t%-30s : %.1f\n", name, watts) (show_ascend_chip_power_info)
CARD = "printf '\\t%-30s : %.1f\\n' 'Power Dissipation(W)' 87.5"


# `npu-smi info -m` of an 8-card A2 server: NPU ID = logical id, one chip each (tests/test_npu_runtime.py: a 310P's)
MAP_A2 = "printf '\\tNPU ID  Chip ID  Chip Logic ID  Chip Name\\n' && for i in 0 1 2 3 4 5 6 7; do " \
         "printf '\\t%s  0  %s  Ascend 910B3\\n\\t%s  1  -  Mcu\\n' $i $i $i; done"


def test_npu_smi_power_is_sampled_and_integrated(tmp_path, monkeypatch):
    args = fake_npu_smi(tmp_path, monkeypatch, f'if [ "$*" = "info -m" ]; then {MAP_A2}; else {CARD}; fi')
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "3,4")
    monkeypatch.delenv("LLMBENCH_NPU_SMI_ID", raising=False)
    r, calls = energy.measure("npu", lambda: time.sleep(0.02), min_seconds=0.6, interval_s=0.05, **NOSYNC)
    assert r.status == "ok", r.status
    assert r.joules == pytest.approx(87.5 * r.seconds, rel=1e-9)  # constant power: the integral is exact
    assert r.method.startswith("npu-smi info -t power -i 3 -c 0 sampled and integrated")
    assert r.samples >= 4 and 0.04 <= r.interval_s < 0.3
    assert set(args.read_text().splitlines()) == {"info -m", "info -t power -i 3 -c 0"}


def test_npu_smi_output_formats():
    assert energy.parse_npu_smi_power("\tPower Dissipation(W)           : 71.3\n") == 71.3
    assert energy.parse_npu_smi_power("\tNPU Real-time Power(W)         : 212.0\n") == 212.0
    with pytest.raises(ValueError):  # a 310's rating is not a reading
        energy.parse_npu_smi_power("\tRated Power Dissipation(W)     : 8.0\n")
    with pytest.raises(ValueError):
        energy.parse_npu_smi_power("\tPower Dissipation(W)           : NA\n")


def test_npu_smi_failing_or_absent_is_unsupported(tmp_path, monkeypatch):
    fake_npu_smi(tmp_path, monkeypatch, "echo 'Error: device 0 not found' >&2; exit 1")
    monkeypatch.setenv("LLMBENCH_NPU_SMI_ID", "0")
    r, calls = energy.measure("npu", lambda: None, min_seconds=0.1, **NOSYNC)
    assert r.status.startswith("unsupported: no readable energy counter (`npu-smi info -t power -i 0` gave no "
                               "power reading: exit status 1: Error: device 0 not found")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r, calls = energy.measure("npu", lambda: None, min_seconds=0.1, **NOSYNC)
    assert r.status == "unsupported: no readable energy counter (npu-smi is not on PATH)" and calls == 0


def test_npu_id_must_be_a_number(monkeypatch):
    from llmbench.system import npu_smi
    from llmbench.core.errors import UserError
    monkeypatch.setenv("LLMBENCH_NPU_SMI_ID", "0; rm -rf /")
    with pytest.raises(UserError, match="not a number"):
        npu_smi.target()
    monkeypatch.setenv("LLMBENCH_NPU_SMI_ID", "224:1")
    assert npu_smi.target().args() == ["-i", "224", "-c", "1"]


# --- cpu: a fake powercap tree -------------------------------------------------------------------------

MAX_UJ = 262_143_328_850


def zone(root, name, dirname, uj, max_uj=MAX_UJ):
    z = root / dirname
    z.mkdir(parents=True)
    (z / "name").write_text(name + "\n")
    (z / "energy_uj").write_text(f"{uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def bump(z, uj, max_uj=MAX_UJ):
    """Advance a counter by uj, wrapping as RAPL does."""
    (z / "energy_uj").write_text(f"{(int((z / 'energy_uj').read_text()) + uj) % max_uj}\n")


@pytest.fixture
def powercap(tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    zones = {"pkg": zone(root, "package-0", "intel-rapl:0", MAX_UJ - 7_000_000),  # wraps after 3.5 calls
             "core": zone(root, "core", "intel-rapl:0:0", 1000),
             "dram": zone(root, "dram", "intel-rapl:0:2", 42)}
    (root / "intel-rapl").mkdir()  # the control type: no counter of its own
    monkeypatch.setenv("LLMBENCH_POWERCAP_ROOT", str(root))
    return zones


def test_rapl_package_and_dram_with_a_wrap_around(powercap):
    def work():  # each call: 2 J on the package (of which 1.5 J in its core zone), 0.5 J on DRAM
        bump(powercap["pkg"], 2_000_000)
        bump(powercap["core"], 1_500_000)
        bump(powercap["dram"], 500_000)
        time.sleep(0.01)
    r, calls = energy.measure("cpu", work, min_seconds=0.3, interval_s=0.02, **NOSYNC)
    assert r.status == "ok" and "package-0+dram" in r.method
    assert calls > 4  # the package counter wrapped during the window
    assert int((powercap["pkg"] / "energy_uj").read_text()) < MAX_UJ - 7_000_000
    assert r.joules == pytest.approx(2.5 * calls, rel=1e-12)
    assert [c[0] for c in r.chunks] == pytest.approx([2.5 * c[2] for c in r.chunks])


def test_rapl_counter_unwraps(powercap):
    c = energy.RaplCounters([powercap["pkg"]])
    assert c() == 0
    bump(powercap["pkg"], 9_000_000)  # from max - 7e6 past the wrap to 2e6
    assert int((powercap["pkg"] / "energy_uj").read_text()) == 2_000_000
    assert c() == pytest.approx(9.0)


def test_no_powercap_is_unsupported(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_POWERCAP_ROOT", str(tmp_path / "nothing"))
    r, calls = energy.measure("cpu", lambda: None, min_seconds=0.1, **NOSYNC)
    assert r.status.startswith("unsupported: no readable energy counter (") and "does not exist" in r.status
    assert calls == 0


def test_root_only_counters_are_unsupported(powercap, monkeypatch):
    def denied(zone):  # what a non-root user gets since Linux 5.10 (chmod cannot show it to root)
        raise PermissionError(13, "Permission denied", str(zone / "energy_uj"))
    monkeypatch.setattr(energy.RaplCounters, "_raw", staticmethod(denied))
    r, _ = energy.measure("cpu", lambda: None, min_seconds=0.1, **NOSYNC)
    assert "readable by root only" in r.status


# --- records -------------------------------------------------------------------------------------------

def test_rows_per_token_request_power_and_above_idle():
    r = energy.EnergyReading(status="ok", method="m", joules=30.0, seconds=3.0, avg_watts=10.0, samples=30,
                             interval_s=0.1, chunks=[(10.0, 1.0, 2), (12.0, 1.0, 2), (8.0, 1.0, 2)])
    out = {f["metric"]: f for f in energy.rows(r, calls=6, tokens_per_call=40, requests_per_call=4, idle_watts=2.0)}
    assert out["energy_per_token"]["samples"] == pytest.approx([10 / 80, 12 / 80, 8 / 80])
    assert out["tokens_per_joule"]["samples"] == pytest.approx([8.0, 80 / 12, 10.0])
    assert out["energy_per_request"]["samples"] == pytest.approx([1.25, 1.5, 1.0])
    assert out["avg_power"]["samples"] == pytest.approx([10, 12, 8])
    assert out["energy_per_token_above_idle"]["samples"] == pytest.approx([8 / 80, 10 / 80, 6 / 80])
    assert out["avg_power_above_idle"]["samples"] == pytest.approx([8, 10, 6])
    rec = record(**out["energy_per_token"])  # the fields are record columns
    assert rec["median"] == pytest.approx(0.125) and rec["unit"] == "J/token" and rec["experiment"] == "energy"
    assert "above_idle" not in "".join(f["metric"] for f in energy.rows(r, 6, 40, 4))


def test_measure_rows_in_one_call(monkeypatch):
    t0 = time.perf_counter()
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=lambda t: 120_000 * (t - t0)))  # 120 W
    monkeypatch.setattr(energy, "synchronize", lambda kind: None)  # energy imports it by name
    out = {f["metric"]: f for f in energy.measure_rows("cuda", lambda: time.sleep(0.02), tokens_per_call=8,
                                                        requests_per_call=2, idle_watts=20.0, min_seconds=0.3)}
    assert np.median(out["avg_power"]["samples"]) == pytest.approx(120, rel=1e-2)
    assert np.median(out["avg_power_above_idle"]["samples"]) == pytest.approx(100, rel=1e-2)
    per_token = np.median(out["energy_per_token"]["samples"])
    assert np.median(out["energy_per_request"]["samples"]) == pytest.approx(4 * per_token)


def test_unsupported_reading_is_one_row_saying_why():
    out = energy.rows(energy.EnergyReading(status="unsupported: no readable energy counter (x)"), 0, 10, 1)
    assert len(out) == 1 and out[0]["status"] == "unsupported: no readable energy counter (x)"
    assert record(**out[0])["median"] is None


def test_idle_power_and_reading_it_back(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=lambda t: 30_000 * (t - t0)))  # 30 W
    fields = energy.idle_rows(energy.idle("cuda", seconds=0.4, source=energy.nvml_source(0.02)))
    assert fields[0]["metric"] == "idle_power" and np.median(fields[0]["samples"]) == pytest.approx(30, rel=1e-2)
    run = tmp_path / "grid" / "00_device-x"
    run.mkdir(parents=True)
    pd.DataFrame([record(**f) for f in fields]).to_parquet(run / "records.parquet")
    assert energy.idle_watts(run) == pytest.approx(30, rel=1e-2)
    assert energy.idle_watts(None) is None
    pd.DataFrame([record(**energy.idle_rows(energy.EnergyReading(status="unsupported: x"))[0])]).to_parquet(
        run / "records.parquet")
    assert energy.idle_watts(run) is None
