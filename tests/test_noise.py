"""Noise detection: a busy process during a timed window is seen, the window redone, the record marked."""
import os
import signal
import subprocess
import sys
import time
import types

import pytest

from llmbench.system import noise
from llmbench.measure.records import COLUMNS

NO_IDLE_EXCUSE = noise.Limits(free_cores=float("inf"))  # judge others' use alone: same verdict on 2 or 64 cores


def _spin(seconds: float) -> int:
    """Keep this process on one core for `seconds`."""
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += 1
    return n


class _Busy:
    """A busy loop that is not our child: started by a shell that exits at once, so its CPU time is
    another process's (as a neighbour's would be), never folded into our children's times on reaping."""

    def __init__(self):
        out = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
        self.pid = int(out.stdout.strip())


def _busy_process() -> _Busy:
    return _Busy()


def _stop(p: _Busy) -> None:
    try:
        os.kill(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_cpu_verdict_counts_others_only_when_no_core_stood_idle():
    # 1 s window, this process used 1 core. Others used 1 core on a 2-core machine: disturbed.
    why = noise.cpu_verdict(other_s=1.0, own_s=1.0, steal_s=0, total_s=2.0, wall_s=1.0, ncpu=2)
    assert len(why) == 1 and "other processes used" in why[0]
    # the same on 16 cores leaves 14 idle: nothing competed with us
    assert noise.cpu_verdict(1.0, 1.0, 0, 16.0, 1.0, 16) == []
    # tick rounding alone (a few 10 ms ticks) is not a disturbance
    assert noise.cpu_verdict(0.05, 1.0, 0, 2.0, 1.0, 2) == []
    # steal above its limit is one
    assert "steal" in noise.cpu_verdict(0.0, 1.0, 0.2, 2.0, 1.0, 2)[0]


def test_a_busy_process_started_half_way_is_detected_and_the_window_redone():
    planted = []

    def measurement():  # attempt 1: a busy process starts half-way through the timed work
        if not planted:
            _spin(0.3)
            planted.append(_busy_process())
            try:
                return _spin(0.6)
            finally:
                _stop(planted[0])
        return _spin(0.6)

    result, c = noise.measure(measurement, "cpu", max_attempts=3, backoff_s=0.5, limits=NO_IDLE_EXCUSE)
    assert c.attempts >= 2 and len(c.reasons) == c.attempts - (1 if c.quiet else 0)
    assert c.reasons[0].startswith("attempt 1: other processes used")
    assert result > 0 and c.window.wall_s > 0.5
    f = noise.fields(c)
    assert tuple(f) == noise.FIELDS
    assert set(f) <= set(COLUMNS) and f["attempts"] == c.attempts and "attempt 1" in f["disturbance"]


def _fake_windows(monkeypatch, verdicts):
    """measure() sees these windows in turn (a list of why-lists); returns the back-offs it asked for."""
    seq, waits = iter(verdicts), []

    def watch(fn, kind, limits):
        return fn(), noise.Window(wall_s=1, ncpu=2, own_cores=1, other_cores=1, free_cores=0, steal_share=0,
                                  cpu_why=list(next(seq)))
    monkeypatch.setattr(noise, "watch", watch)
    monkeypatch.setattr(noise, "settle", lambda max_s, *a, **k: waits.append(max_s))
    return waits


def test_redo_policy_backs_off_and_keeps_a_disturbed_result_marked(monkeypatch):
    calls = []
    waits = _fake_windows(monkeypatch, [["busy"], []])
    out, c = noise.measure(lambda: calls.append(1) or len(calls), backoff_s=2)
    assert out == 2 and c.attempts == 2 and c.quiet is True and c.reasons == ["attempt 1: busy"] and waits == [2]

    calls.clear()
    waits = _fake_windows(monkeypatch, [["a"], ["b"], ["c"]])
    out, c = noise.measure(lambda: calls.append(1) or len(calls), max_attempts=3, backoff_s=2)
    assert out == 3 and c.attempts == 3 and c.quiet is False and waits == [2, 4]  # never dropped
    assert noise.fields(c)["disturbance"] == "attempt 1: a | attempt 2: b | attempt 3: c"


def test_a_busy_accelerator_is_waited_out_without_probing_the_cpu(monkeypatch):
    seq, slept = iter([["another process used the cuda at 60%"], []]), []
    monkeypatch.setattr(noise, "watch", lambda fn, kind, limits: (fn(), noise.Window(
        wall_s=1, ncpu=16, own_cores=1, other_cores=0, free_cores=15, steal_share=0, device_why=next(seq))))
    monkeypatch.setattr(noise, "settle", lambda *a, **k: pytest.fail("the CPU was quiet"))
    monkeypatch.setattr(noise.time, "sleep", slept.append)
    _, c = noise.measure(lambda: 1, "cuda", backoff_s=3)
    assert c.attempts == 2 and c.quiet and slept == [3] and "cuda at 60%" in c.reasons[0]


def test_unreadable_counters_measure_once_and_say_unknown(monkeypatch):
    monkeypatch.setattr(noise, "snapshot", lambda: None)
    out, c = noise.measure(lambda: 7)
    assert out == 7 and c.attempts == 1 and c.quiet is None and noise.fields(c)["quiet"] is None


def test_settle_waits_out_a_busy_process_and_returns_early_when_quiet():
    p = _busy_process()
    try:
        waited = noise.settle(1.2, own_cores=1.0, limits=NO_IDLE_EXCUSE, probe_s=0.3)
    finally:
        _stop(p)
    assert waited >= 1.2  # the busy process never let up


def test_machine_check_names_a_busy_process_and_strict_refuses(tmp_path, capsys, monkeypatch):
    p = _busy_process()
    try:
        time.sleep(0.2)
        check = noise.machine_check(sample_s=0.6)
    finally:
        _stop(p)
    assert check["busy"] is True and any(f"pid {p.pid}," in b for b in check["busy_processes"])
    assert check["line"].startswith("machine BUSY") and "\n" not in check["line"]
    assert "governor" in check["line"] and check["mem_total_bytes"] > 0

    from llmbench.orchestration import runner
    from llmbench import cli
    monkeypatch.setattr(runner, "load_grid", lambda path: {"name": "g", "points": []})  # validation: tested elsewhere
    grid = tmp_path / "g.yaml"
    p = _busy_process()
    try:
        time.sleep(0.2)
        rc = cli.main(["run", str(grid), "--strict", "--runs", str(tmp_path / "runs")])
    finally:
        _stop(p)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("llmbench: error: --strict: the machine is busy")
    assert not (tmp_path / "runs").exists()  # nothing started


def test_npu_smi_process_table():
    text = """
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 0       0                 | 48988         | python                   | 13330                   |
| 0       0                 | 1234          | python                   | 2000                    |
| 1       0                 | 777           | other                    | 3806                    |
| No running processes found in NPU 2                                                            |
"""
    assert noise.parse_npu_smi(text, npu=0, me=1234) == ["pid 48988 python (13330 MB)"]
    assert noise.parse_npu_smi(text, npu=2, me=1234) == []
    container = "| 0       0                 | 29570         | python             | 3806    | 12         |\n"
    assert noise.parse_npu_smi(container, npu=0, me=12) == []  # our own pid, seen from inside the container


def test_another_process_busy_on_the_gpu_disturbs_the_window(monkeypatch):
    me = os.getpid()
    proc = lambda pid, mib: types.SimpleNamespace(pid=pid, usedGpuMemory=mib * 2**20)
    sample = lambda pid, sm: types.SimpleNamespace(pid=pid, smUtil=sm)
    state = {"util": [sample(me, 90), sample(4242, 60)]}

    class NVMLError(Exception):
        def __init__(self, value):
            self.value = value

    def util(h, since):
        if isinstance(state["util"], int):
            raise NVMLError(state["util"])
        return state["util"]
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc(me, 3000), proc(4242, 500)],
        nvmlDeviceGetProcessUtilization=util)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _, w = noise.watch(lambda: None, "cuda")
    assert w.device_others == ["pid 4242 (500 MiB)"] and w.device_util_pct == 60
    assert any("another process used the cuda at 60%" in y for y in w.why)
    state["util"] = [sample(me, 90), sample(4242, 0)]
    _, w = noise.watch(lambda: None, "cuda")
    assert not any("cuda" in y for y in w.why)  # present but idle
    state["util"] = 6  # NVML_ERROR_NOT_FOUND: no sample in the window, nobody kept the GPU busy
    _, w = noise.watch(lambda: None, "cuda")
    assert w.device_util_pct == 0 and not any("cuda" in y for y in w.why)
    state["util"] = 3  # NVML_ERROR_NOT_SUPPORTED: presence alone is suspect
    _, w = noise.watch(lambda: None, "cuda")
    assert any("other processes on the cuda: pid 4242" in y for y in w.why)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: unknown, said so
    _, w = noise.watch(lambda: None, "cuda")
    assert w.device_others is None and w.device_source.startswith("nvml unavailable")
