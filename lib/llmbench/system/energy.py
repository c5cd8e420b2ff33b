"""Energy over a measured window, on every backend: joules, seconds, average watts, and how they were read.

One meter per device kind, read by a background thread while the work runs (the way peak memory is
read around a window):
  cuda  NVML's cumulative energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since the driver
        loaded; Volta and later), through nvidia-ml-py; where a GPU lacks it, NVML's power reading
        (nvmlDeviceGetPowerUsage, mW) sampled and integrated.
  npu   `npu-smi info -t power -i <NPU ID> -c <chip>` prints the power now (no energy counter): sampled
        at a fixed interval and integrated (trapezoid). The NPU ID and chip are npu-smi's own, mapped from
        the logical device by `npu-smi info -m` (npu_smi.py; LLMBENCH_NPU_SMI_ID overrides). npu-smi prints each field as "%-30s : %.1f": "Power
        Dissipation(W)" for a card, "NPU Real-time Power(W)" for a chip (Ascend's own ais_bench energy
        option parses the first). "Rated Power Dissipation(W)" is a rating, not a reading: refused.
  cpu   RAPL energy_uj counters under /sys/class/powercap (package and DRAM zones), unwrapped at
        max_energy_range_uj. Since Linux 5.10 they are readable by root only (CVE-2020-8694), and
        virtual machines usually expose none.
Where nothing is readable the reading says "unsupported: no readable energy counter (why)"; no number
is ever estimated from a TDP. A window must be long (seconds, many calls): energy over one decode
step is below every meter's resolution.
"""
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from llmbench.system import npu_smi
from llmbench.system.device import synchronize

# Seconds between meter readings. NVML and RAPL reads cost microseconds; one npu-smi call is a process.
INTERVAL_S = {"cuda": 0.1, "npu": 0.5, "cpu": 0.1}
NPU_SMI_FIELDS = ("Power Dissipation(W)", "NPU Real-time Power(W)")
RAPL_ZONE = re.compile(r"package-\d+|dram")  # core/uncore are parts of a package; psys overlaps it


class Unreadable(Exception):
    """No energy meter can be read here; the message says why."""


class MeterError(Exception):
    """A meter that opened failed to give a reading during a window."""


@dataclass
class Source:
    method: str
    read: Callable[[], float]  # joules since some origin (counter=True) or watts now (counter=False)
    counter: bool
    interval_s: float
    close: Callable[[], None] = lambda: None


@dataclass
class EnergyReading:
    status: str                 # ok | unsupported: why | error: why
    method: str = ""
    joules: float = float("nan")
    seconds: float = float("nan")
    avg_watts: float = float("nan")
    samples: int = 0            # meter readings taken in the window
    interval_s: float = float("nan")  # median time between readings
    chunks: list = field(default_factory=list)  # (joules, seconds, calls) of consecutive sub-windows
    t_start: float = float("nan")  # time.perf_counter() at the window's ends
    t_end: float = float("nan")


# --- the meters ---------------------------------------------------------------------------------------

def _nvml_handle(nvml):
    """The NVML handle of the GPU torch calls cuda:0: the first of CUDA_VISIBLE_DEVICES, an index or a
    (prefix of a) UUID, as torch.cuda maps it for its own NVML queries; NVML itself ignores that variable."""
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    if first.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(first))
    if first.startswith("MIG-"):
        raise Unreadable(f"CUDA_VISIBLE_DEVICES selects a MIG instance ({first}): NVML meters whole GPUs")
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        uuid = nvml.nvmlDeviceGetUUID(h)
        if (uuid.decode() if isinstance(uuid, bytes) else uuid).startswith(first):
            return h
    raise Unreadable(f"no GPU with a UUID starting {first!r} (CUDA_VISIBLE_DEVICES)")


def nvml_source(interval_s: float) -> Source:
    try:
        import pynvml  # nvidia-ml-py (requirements-cuda.txt)
    except ImportError:
        raise Unreadable("nvidia-ml-py is not installed (pip install -r requirements-cuda.txt)") from None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # pynvml.NVMLError_LibraryNotFound and the like: no driver here
        raise Unreadable(f"NVML did not start: {e}") from None
    try:
        h = _nvml_handle(pynvml)
    except Unreadable:
        pynvml.nvmlShutdown()
        raise
    except pynvml.NVMLError as e:
        pynvml.nvmlShutdown()
        raise Unreadable(f"NVML has no handle for the GPU: {e}") from None
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        return Source("NVML total energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ)",
                      lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3, True, interval_s,
                      pynvml.nvmlShutdown)
    except pynvml.NVMLError as e:
        no_counter = str(e)
    try:
        pynvml.nvmlDeviceGetPowerUsage(h)
    except pynvml.NVMLError as e:
        pynvml.nvmlShutdown()
        raise Unreadable(f"NVML has neither an energy counter ({no_counter}) nor a power reading ({e})") from None
    return Source(f"NVML power (nvmlDeviceGetPowerUsage) sampled and integrated; no energy counter: {no_counter}",
                  lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1e3, False, interval_s, pynvml.nvmlShutdown)


def parse_npu_smi_power(text: str) -> float:
    """Watts from `npu-smi info -t power` output ("\\tPower Dissipation(W)   : 71.3")."""
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in NPU_SMI_FIELDS:
            return float(value.strip())  # "NA" (e.g. in a container without the MCU) raises ValueError
    raise ValueError(f"no {' or '.join(NPU_SMI_FIELDS)} line in {text.strip()[:200]!r}")


def npu_smi_source(interval_s: float) -> Source:
    exe = shutil.which("npu-smi")
    if exe is None:
        raise Unreadable("npu-smi is not on PATH")
    try:
        where = npu_smi.target()
    except npu_smi.Unmapped as e:
        raise Unreadable(f"no npu-smi NPU ID for this device: {e}") from None
    cmd = [exe, "info", "-t", "power", *where.args()]

    def read() -> float:
        out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=10)
        if out.returncode:
            raise RuntimeError(f"exit status {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}")
        return parse_npu_smi_power(out.stdout)
    try:
        read()
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        raise Unreadable(f"`npu-smi {' '.join(cmd[1:])}` gave no power reading: {e}") from None
    return Source(f"npu-smi {' '.join(cmd[1:])} sampled and integrated (trapezoid); {where.how}", read, False,
                  interval_s)


class RaplCounters:
    """Sum of RAPL energy_uj counters in joules, unwrapped: a counter that went down wrapped at
    max_energy_range_uj. Must be read more often than a counter wraps (minutes at full load)."""

    def __init__(self, zones: list[Path]):
        self.zones = zones
        self.max_uj = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self.last = [self._raw(z) for z in zones]
        self.total_uj = 0

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def __call__(self) -> float:
        for i, z in enumerate(self.zones):
            raw = self._raw(z)
            d = raw - self.last[i]
            self.total_uj += d + self.max_uj[i] if d < 0 else d
            self.last[i] = raw
        return self.total_uj / 1e6


def powercap_root() -> Path:
    return Path(os.environ.get("LLMBENCH_POWERCAP_ROOT") or "/sys/class/powercap")


def _virtual() -> str:
    """Why RAPL is likely absent: the CPU flag a hypervisor sets (hypervisors rarely pass RAPL through)."""
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return ""
    vm = flags and "hypervisor" in flags.group(1).split()
    return "; this is a virtual machine (cpu flag 'hypervisor')" if vm else ""


def rapl_source(interval_s: float) -> Source:
    root = powercap_root()
    if not root.is_dir():
        raise Unreadable(f"{root} does not exist: no powercap (RAPL) driver{_virtual()}")
    zones = []
    for z in sorted(root.glob("intel-rapl:*")):  # AMD's RAPL shows here too; intel-rapl-mmio duplicates a package
        try:
            if RAPL_ZONE.fullmatch((z / "name").read_text().strip()):
                zones.append(z)
        except OSError:
            continue
    if not zones:
        raise Unreadable(f"no package or dram RAPL zone under {root}")
    try:
        counters = RaplCounters(zones)
    except PermissionError:
        raise Unreadable(f"{zones[0]}/energy_uj is readable by root only (Linux 5.10+, CVE-2020-8694)") from None
    except (OSError, ValueError) as e:
        raise Unreadable(f"RAPL counters under {root} cannot be read: {e}") from None
    names = "+".join(f"{(z / 'name').read_text().strip()}" for z in zones)
    return Source(f"RAPL energy_uj ({names}) under {root}", counters, True, interval_s)


def open_source(kind: str, interval_s: float | None = None) -> Source:
    """The energy meter of this device kind; raises Unreadable("no readable energy counter (why)")."""
    interval_s = interval_s or INTERVAL_S[kind]
    opener = {"cuda": nvml_source, "npu": npu_smi_source, "cpu": rapl_source}[kind]
    try:
        return opener(interval_s)
    except Unreadable as e:
        raise Unreadable(f"no readable energy counter ({e})") from None


# --- one window ---------------------------------------------------------------------------------------

class Window:
    """Readings of one source, taken by a background thread at its interval, plus on demand."""

    def __init__(self, src: Source):
        self.src, self.readings, self.errors = src, [], []
        self.lock, self.done = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> float:
        with self.lock:  # RaplCounters keeps state; one reader at a time
            t0 = time.perf_counter()
            try:
                v = self.src.read()
            except Exception as e:
                raise MeterError(f"{type(e).__name__}: {e}") from None
            t = (t0 + time.perf_counter()) / 2  # a reading belongs to the middle of its call
            self.readings.append((t, float(v)))
        return t

    def _loop(self):
        while not self.done.wait(self.src.interval_s):
            try:
                self.sample()
            except MeterError as e:  # a missed reading leaves a gap that the integral spans
                self.errors.append(str(e))

    def start(self) -> float:
        t = self.sample()
        self.thread.start()
        return t

    def mark(self) -> float:
        """A time stamp between calls. A counter is read right then (exact); power is interpolated."""
        return self.sample() if self.src.counter else time.perf_counter()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self.sample()

    def energy_at(self, times) -> np.ndarray:
        """Joules since the first reading at each time: a counter's increase, or the trapezoid integral
        of the power readings (exact for power that is linear between readings)."""
        t, v = (np.array(x) for x in zip(*sorted(self.readings)))
        cum = v - v[0] if self.src.counter else np.concatenate([[0.0], np.cumsum(np.diff(t) * (v[1:] + v[:-1]) / 2)])
        return np.interp(times, t, cum)


def measure(kind: str, fn, min_seconds: float = 5.0, sync=None, source: Source | None = None,
            interval_s: float | None = None) -> tuple[EnergyReading, int]:
    """Call fn() repeatedly for at least min_seconds inside one meter window; (reading, calls).

    The window is cut at call boundaries into sub-windows ("chunks") of at least max(4 intervals,
    min_seconds / 5), so that J/token has several samples and a CI. Where no meter is readable fn is
    not called: (an "unsupported: ..." reading, 0). sync() waits for queued device work (default: the
    device's synchronize), so that a call's energy is billed to it.
    """
    if sync is None:
        sync = lambda: synchronize(kind)  # noqa: E731
    try:
        src = source or open_source(kind, interval_s)
    except Unreadable as e:
        return EnergyReading(status=f"unsupported: {e}"), 0
    w = Window(src)
    chunk_s = max(4 * src.interval_s, min_seconds / 5)
    calls, at = 0, [0]
    try:
        sync()
        w.start()
        marks = [w.mark()]
        while True:
            fn()
            sync()
            calls += 1
            now = time.perf_counter()
            if now - marks[-1] >= chunk_s:
                marks.append(w.mark())
                at.append(calls)
                if marks[-1] - marks[0] >= min_seconds:
                    break
        w.stop()
    except MeterError as e:  # the work itself ran; only its energy is missing
        return EnergyReading(status=f"error: energy meter failed: {e}", method=src.method), calls
    finally:
        w.done.set()
        src.close()
    return reading_of(w, marks, at), calls


def reading_of(w: Window, marks: list[float], at: list[int]) -> EnergyReading:
    t = sorted(r[0] for r in w.readings)
    inside = [x for x in t if marks[0] <= x <= marks[-1]]
    if len(t) < 2:
        return EnergyReading(status=f"error: {len(t)} meter reading(s); {'; '.join(w.errors[:3])}", method=w.src.method)
    e = w.energy_at(marks)
    chunks = [(float(e[i + 1] - e[i]), marks[i + 1] - marks[i], at[i + 1] - at[i]) for i in range(len(marks) - 1)]
    joules, seconds = float(e[-1] - e[0]), marks[-1] - marks[0]
    method = w.src.method + (f"; {len(w.errors)} readings failed ({w.errors[0]})" if w.errors else "")
    return EnergyReading(status="ok", method=method, joules=joules, seconds=seconds, avg_watts=joules / seconds,
                         samples=len(inside), interval_s=float(np.median(np.diff(t))), chunks=chunks,
                         t_start=marks[0], t_end=marks[-1])


def idle(kind: str, seconds: float = 5.0, source: Source | None = None) -> EnergyReading:
    """The device's draw while this process does nothing (other processes on the machine still count)."""
    reading, _ = measure(kind, lambda: time.sleep(0.05), seconds, sync=lambda: None, source=source)
    return reading


# --- records ------------------------------------------------------------------------------------------

def describe(r: EnergyReading, calls: int | None = None) -> str:
    return (f"{r.method}; {r.joules:.4g} J over {r.seconds:.3g} s" + (f", {calls} calls" if calls else "")
            + f", {r.samples} readings every {r.interval_s * 1e3:.0f} ms, {len(r.chunks)} sub-windows")


def rows(reading: EnergyReading, calls: int, tokens_per_call: int, requests_per_call: int,
         idle_watts: float | None = None) -> list[dict]:
    """Record fields (for session.row) of one window: J/token, tokens/J, J/request, average W; the same
    above idle where the idle draw is known. Samples are per sub-window. Tokens: generated tokens."""
    if reading.status != "ok":
        return [dict(experiment="energy", metric="energy_per_token", unit="J/token", status=reading.status,
                     note=reading.method)]
    j, s, n = (np.array(x, dtype=float) for x in zip(*reading.chunks))
    tok, req = n * tokens_per_call, n * requests_per_call
    note = describe(reading, calls)
    out = [dict(experiment="energy", metric=m, unit=u, samples=list(x), note=note) for m, u, x in (
        ("energy_per_token", "J/token", j / tok), ("tokens_per_joule", "tokens/J", tok / j),
        ("energy_per_request", "J/request", j / req), ("avg_power", "W", j / s))]
    if idle_watts is not None and np.isfinite(idle_watts):
        above, inote = j - idle_watts * s, f"{note}; minus idle {idle_watts:.4g} W (00_device)"
        out += [dict(experiment="energy", metric=m, unit=u, samples=list(x), note=inote) for m, u, x in (
            ("energy_per_token_above_idle", "J/token", above / tok),
            ("energy_per_request_above_idle", "J/request", above / req), ("avg_power_above_idle", "W", above / s))]
    return out


def measure_rows(kind: str, fn, tokens_per_call: int, requests_per_call: int, idle_watts: float | None = None,
                 min_seconds: float = 5.0) -> list[dict]:
    """measure() then rows(): the record fields of one energy window of repeated fn() calls."""
    reading, calls = measure(kind, fn, min_seconds)
    return rows(reading, calls, tokens_per_call, requests_per_call, idle_watts)


def idle_rows(reading: EnergyReading) -> list[dict]:
    """Record fields of an idle window: the device's draw doing nothing (W per sub-window)."""
    if reading.status != "ok":
        return [dict(experiment="energy", metric="idle_power", unit="W", status=reading.status, note=reading.method)]
    return [dict(experiment="energy", metric="idle_power", unit="W", samples=[j / s for j, s, _ in reading.chunks],
                 note=describe(reading))]


def idle_watts(device_run) -> float | None:
    """The idle draw a 00_device run folder recorded; None without a run or where it was unreadable."""
    import pandas as pd
    if device_run is None or not (Path(device_run) / "records.parquet").is_file():
        return None
    df = pd.read_parquet(Path(device_run) / "records.parquet")
    d = df[(df.metric == "idle_power") & (df.status == "ok")]
    return float(d["median"].iat[0]) if len(d) else None
