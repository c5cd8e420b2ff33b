"""A memory canary at both edges of a watched window: did the memory (or the accelerator) slow down?

CPU time and steal do not show another guest saturating the memory bus we share. So, outside the timed
calls, each watched window reads a buffer much larger than the last-level cache just before and just
after the measurement, and compares the read rate with the run's own 00_device read ceiling:
  read below ceiling  the canary read more than LIMITS.canary_below_ceiling below the ceiling;
  read drift          the two reads differ by more than LIMITS.canary_drift (of the faster one).
On CUDA the canary is NVML's clocks and throttle reasons at the window's edges: a thermal or hardware
slowdown (or power brake) there disturbs the window; the clocks are recorded, never judged (at a
window's edge the GPU may sit at its idle clock as often as at its load clock). On Ascend it is
`npu-smi info -t common` (AI core clock, recorded) and `npu-smi info -t health` (not OK disturbs).
Every reading is guarded: what cannot be read is None and says why, never a guess.
"""
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmbench.system import npu_smi

ENABLED = True  # tests switch it off where the canary's reads would only slow tiny-model runs down

MIN_BYTES, MAX_BYTES = 256 * 2**20, 512 * 2**20
LLC_MULTIPLE = 4
READS = 2  # per edge; the best one counts (one read is ~40 ms of 256 MiB on a shared 2-core VM)


@dataclass
class Reading:
    """The canary at one edge of a window."""
    read_gbs: float | None = None                       # CPU: streaming read rate of the canary buffer
    clocks_mhz: dict = field(default_factory=dict)      # e.g. {"sm": 1980, "mem": 2619} or {"aicore": 1800}
    flags: list[str] = field(default_factory=list)      # states that disturb a window (thermal slowdown, health)
    notes: list[str] = field(default_factory=list)      # states recorded only (power cap, rated clock)
    source: str = ""                                    # how it was read, or why it could not be


# ---- CPU: a streaming read of a buffer larger than the last-level cache ----------------------------

def llc_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of cpu0's highest-level data or unified cache (sysfs), or None where not exposed."""
    best = None
    for d in root.glob("index*"):
        try:
            level, kind, size = (Path(d, f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if kind == "Instruction" or not m:
            continue
        nbytes = int(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m[2]]
        if best is None or int(level) > best[0]:
            best = (int(level), nbytes)
    return None if best is None else best[1]


def buffer_bytes(llc: int | None) -> int:
    """LLC_MULTIPLE x the last-level cache, at least MIN_BYTES; at most MAX_BYTES, since a VM may report the
    whole host's L3 (480 MiB on a 2-core EPYC guest here) and a read must stay a few tens of ms."""
    return min(max(LLC_MULTIPLE * (llc or 0), MIN_BYTES), MAX_BYTES)


_buffer: dict = {}


def buffer() -> torch.Tensor:
    """The process's canary buffer (fp32, random values: a constant buffer can read faster than any
    weights on a VM, pages the host can share), made once."""
    if "x" not in _buffer:
        _buffer["x"] = torch.rand(buffer_bytes(llc_bytes()) // 4, dtype=torch.float32)
    return _buffer["x"]


def cpu_read(reader=None, reads: int = READS) -> Reading:
    """Best read rate of the canary buffer over `reads` reads. reader: (label, fn) where fn(x) reads x
    once (the measure layer passes the ceiling probe's C read loop); None: torch's sum."""
    x = buffer()
    label, read = reader or ("torch sum", lambda t: float(t.sum()))
    best = float("inf")
    for _ in range(reads):
        t0 = time.perf_counter()
        read(x)
        best = min(best, time.perf_counter() - t0)
    return Reading(read_gbs=x.numel() * 4 / best / 1e9,
                   source=f"{label}, {x.numel() * 4 / 2**20:.0f} MiB, best of {reads} reads")


# ---- CUDA: NVML clocks and throttle reasons ---------------------------------------------------------

# nvml.h nvmlClocksEventReason* bits (the same values as the older nvmlClocksThrottleReason* names).
DISTURBING = {0x8: "hw_slowdown", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
              0x80: "hw_power_brake"}
RECORDED = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x10: "sync_boost",
            0x100: "display_clock_setting"}


def reasons(mask: int) -> tuple[list[str], list[str]]:
    """(disturbing reasons, recorded-only reasons) of an NVML throttle/clock-event bit mask."""
    return ([n for b, n in DISTURBING.items() if mask & b], [n for b, n in RECORDED.items() if mask & b])


def cuda_read(index: int = 0) -> Reading:
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            clocks = {"sm": float(pynvml.nvmlDeviceGetClockInfo(h, 1)),   # NVML_CLOCK_SM
                      "mem": float(pynvml.nvmlDeviceGetClockInfo(h, 2))}  # NVML_CLOCK_MEM
            get = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
                or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
            flags, notes = reasons(int(get(h)))
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # no pynvml, no driver, a call this driver lacks: unknown, said so
        return Reading(source=f"nvml unavailable ({type(e).__name__})")
    return Reading(clocks_mhz=clocks, flags=flags, notes=notes, source="nvml")


# ---- Ascend: npu-smi -------------------------------------------------------------------------------

def parse_fields(text: str) -> dict[str, str]:
    """`name : value` lines of `npu-smi info -t ...` (the first of a repeated name: the NPU chip's, not the MCU's)."""
    out = {}
    for m in re.finditer(r"^\s*([^:\n]+?)\s*:\s*(.*?)\s*$", text, re.M):
        out.setdefault(m[1], m[2])
    return out


def npu_reading(common: str, health: str) -> Reading:
    """A Reading from the texts of `npu-smi info -t common` and `-t health` (pure: tests feed it text)."""
    c, h = parse_fields(common), parse_fields(health)
    r = Reading(source="npu-smi")
    cur, rated = c.get("Aicore curFreq(MHZ)", ""), c.get("Aicore Freq(MHZ)", "")
    if cur.isdigit():
        r.clocks_mhz["aicore"] = float(cur)
    if rated.isdigit():
        r.notes.append(f"aicore rated {rated} MHz")
    status = next((v for k, v in h.items() if k.lower().startswith("health")), None)
    if status is None:
        r.notes.append("health not reported")
    elif status.strip().lower() not in ("ok", "healthy"):
        r.flags.append(f"health {status.strip()}")
    return r


def npu_read() -> Reading:
    try:
        where = npu_smi.target()
        run = lambda t: subprocess.run(["npu-smi", "info", "-t", t, *where.args()], capture_output=True,
                                       text=True, errors="replace", timeout=20)
        common, health = run("common"), run("health")
    except (OSError, subprocess.SubprocessError, npu_smi.Unmapped) as e:
        return Reading(source=f"npu-smi unavailable ({type(e).__name__}: {str(e)[:120]})")
    if common.returncode and health.returncode:
        return Reading(source=f"npu-smi unavailable (exit status {common.returncode})")
    return npu_reading(common.stdout, health.stdout)


def read(kind: str, reader=None, device_index: int = 0) -> Reading | None:
    """The canary of this device now; None when switched off."""
    if not ENABLED:
        return None
    if kind == "cpu":
        return cpu_read(reader)
    return cuda_read(device_index) if kind == "cuda" else npu_read()


# ---- the verdict -----------------------------------------------------------------------------------

PREFIX = "canary: "  # every canary reason starts so: the report counts windows the canary disturbed


def verdict(before: Reading | None, after: Reading | None, ceiling_bps: float | None,
            below_ceiling: float, drift: float) -> list[str]:
    """Why the canary says the window was disturbed (empty: it does not)."""
    why = []
    ceil = ceiling_bps / 1e9 if ceiling_bps and ceiling_bps == ceiling_bps else None
    for edge, r in (("start", before), ("end", after)):
        if r is None:
            continue
        if r.read_gbs is not None and ceil and r.read_gbs < (1 - below_ceiling) * ceil:
            why.append(f"{PREFIX}memory read {r.read_gbs:.1f} GB/s at the window's {edge}, "
                       f"{1 - r.read_gbs / ceil:.0%} below the run's ceiling {ceil:.1f} GB/s (limit {below_ceiling:.0%})")
        if r.flags:
            why.append(f"{PREFIX}{', '.join(r.flags)} at the window's {edge}")
    a, b = (before.read_gbs if before else None), (after.read_gbs if after else None)
    if a and b and abs(a - b) / max(a, b) > drift:
        why.append(f"{PREFIX}memory read moved from {a:.1f} to {b:.1f} GB/s across the window (limit {drift:.0%})")
    return why


def window_gbs(before_gbs: float | None, after_gbs: float | None) -> float | None:
    """The window's own read rate: the mean of its two canary reads (one where only one was read)."""
    vals = [v for v in (before_gbs, after_gbs) if v is not None and v == v and v > 0]
    return sum(vals) / len(vals) if vals else None


def mbu_window(nbytes: float | None, seconds: float | None, before_gbs: float | None,
               after_gbs: float | None) -> float | None:
    """Bytes per second of a measured unit over the window's own canary read rate; None without both."""
    rate = window_gbs(before_gbs, after_gbs)
    if rate is None or not nbytes or not seconds or seconds != seconds or seconds <= 0:
        return None
    return nbytes / seconds / (rate * 1e9)


def describe(before: Reading | None, after: Reading | None) -> str | None:
    """One line for the record: how the canary was read, and the device's clocks and states at the
    window's start -> end; None where no canary was read."""
    if before is None and after is None:
        return None
    b, a = before or Reading(), after or Reading()
    mhz = lambda v: "?" if v is None else f"{v:.0f}"
    parts = [f"{k} {mhz(b.clocks_mhz.get(k))}->{mhz(a.clocks_mhz.get(k))} MHz"
             for k in dict.fromkeys([*b.clocks_mhz, *a.clocks_mhz])]
    states = sorted(set(b.flags + b.notes + a.flags + a.notes))
    return "; ".join([b.source or a.source, *([", ".join(parts + states)] if parts or states else [])])
