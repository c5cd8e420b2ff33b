"""Did anything else use the machine while we measured? Conditions of one timed window, and a redo policy.

A window reads the kernel's CPU accounting before and after a measurement (Linux /proc):
  other_cores  CPU seconds used by every process but this one (all its threads, waited-for children),
               per second of wall clock: /proc/stat busy time minus /proc/self/stat times;
  free_cores   cores that stood idle, per second;
  steal_share  share of CPU time the hypervisor gave to other guests (/proc/stat steal);
and records the 1-minute load average and the CPU clock where /sys exposes it. On an accelerator it
also asks which other processes hold the device (NVML on CUDA, `npu-smi info` on Ascend) and, where
NVML reports it, how busy they kept it during the window.

A window is disturbed when other processes took more than LIMITS.other_cores while less than
LIMITS.free_cores stood idle (on a 16-core GPU host a daemon on a spare core disturbs nothing; on a
2-core CPU run it does), when steal exceeds its limit, or when another process used the accelerator.
A memory canary (canary.py) at both edges of each window catches what CPU accounting cannot: another
guest on the memory bus (a read of a buffer beyond the last-level cache, against the run's own read
ceiling and between the two edges), a throttled GPU (NVML), an unhealthy NPU (npu-smi).
`measure` runs a whole measurement (all repeats of one TTFT, say) in a window and redoes it after a
back-off while it is disturbed; a measurement that stays disturbed is returned marked, never dropped.
"""
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmbench.system import canary, npu_smi

TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@dataclass(frozen=True)
class Limits:
    """Every threshold of the verdict, in one place."""
    other_cores: float = 0.25         # others may use a quarter of a core on average...
    free_cores: float = 1.0           # ...or more, as long as a whole core stood idle
    steal_share: float = 0.05         # of all CPU time, taken by the hypervisor
    device_util_pct: float = 5.0      # another process's SM utilization on our GPU (NVML)
    canary_below_ceiling: float = 0.25  # a canary read this far below the run's read ceiling (00_device)...
    canary_drift: float = 0.20        # ...or a window whose two canary reads differ by this share of the faster


LIMITS = Limits()


# ---- reading the counters ---------------------------------------------------------------------

@dataclass
class Snapshot:
    t: float              # monotonic clock, s
    epoch_us: int         # wall clock, us (NVML's sample timestamps)
    busy_s: float         # all CPUs: user + nice + system + irq + softirq, s
    idle_s: float         # all CPUs: idle + iowait, s
    steal_s: float
    own_s: float          # this process: utime + stime + cutime + cstime, s
    ncpu: int


def _proc_stat() -> tuple[list[int], int]:
    lines = Path("/proc/stat").read_text().splitlines()
    total = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    return total, sum(1 for ln in lines if re.match(r"cpu\d+ ", ln))


def _stat_fields(pid) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on: the command name before it may hold spaces and ')'."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _ticks(rest: list[str]) -> int:
    return sum(int(v) for v in rest[11:15])  # utime stime cutime cstime (fields 14-17)


def _own_ticks(pid="self") -> int:
    return _ticks(_stat_fields(pid))


def group_ticks(pgid: int) -> int:
    """CPU ticks of every live process in process group pgid: a server and what it started (vLLM's engine
    core and worker are processes of their own, in the server's group)."""
    total = 0
    for d in Path("/proc").glob("[0-9]*"):
        try:
            rest = _stat_fields(d.name)
            if int(rest[2]) == pgid:  # field 5: pgrp
                total += _ticks(rest)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return total


def snapshot() -> Snapshot | None:
    """The counters now, or None where /proc is not readable (not Linux)."""
    try:
        (user, nice, system, idle, iowait, irq, softirq, steal), ncpu = _proc_stat()
        own = _own_ticks()
    except (OSError, ValueError, IndexError):
        return None
    return Snapshot(t=time.monotonic(), epoch_us=time.time_ns() // 1000,
                    busy_s=(user + nice + system + irq + softirq) * TICK_S, idle_s=(idle + iowait) * TICK_S,
                    steal_s=steal * TICK_S, own_s=own * TICK_S, ncpu=ncpu)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_mhz() -> tuple[float | None, float | None]:
    """(lowest current clock over the cores, highest rated clock) in MHz, where cpufreq is exposed."""
    base = Path("/sys/devices/system/cpu")
    cur = [_read(p) for p in base.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")]
    top = [_read(p) for p in base.glob("cpu[0-9]*/cpufreq/cpuinfo_max_freq")]
    cur, top = [int(v) / 1e3 for v in cur if v and v.isdigit()], [int(v) / 1e3 for v in top if v and v.isdigit()]
    return (min(cur) if cur else None), (max(top) if top else None)


def load_avg() -> float | None:
    s = _read(Path("/proc/loadavg"))
    return float(s.split()[0]) if s else None


# ---- accelerators: other processes on our device ------------------------------------------------

def _visible_index(var: str) -> int:
    """Physical index of logical device 0 (the study uses one device) from CUDA_/ASCEND_RT_VISIBLE_DEVICES."""
    first = os.environ.get(var, "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def _nvml_others(since_us: int) -> tuple[list[str], float | None]:
    """(other compute processes on the GPU, their highest SM utilization % since since_us or None)."""
    import pynvml
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(_visible_index("CUDA_VISIBLE_DEVICES"))
        me = os.getpid()
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        others = [f"pid {p.pid} ({(p.usedGpuMemory or 0) / 2**20:.0f} MiB)" for p in procs if p.pid != me]
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(h, since_us)
            util = max((s.smUtil for s in samples if s.pid != me), default=0.0)
        except pynvml.NVMLError as e:  # no sample since then: nobody kept it busy; else not supported here
            util = 0.0 if getattr(e, "value", None) in (0, getattr(pynvml, "NVML_ERROR_NOT_FOUND", 6)) else None
        return others, util
    finally:
        pynvml.nvmlShutdown()


def parse_npu_smi(text: str, npu: int, me: int, chip: int | None = None) -> list[str]:
    """Other processes on NPU ID `npu` (chip `chip`, or any chip when None) from the process table of
    `npu-smi info`: npu-smi's own ids (npu_smi.target), not the logical device.

    Rows look like `| 0       0                 | 48988         | python   | 13330   |` (NPU, chip,
    pid, name, memory MB); in a container a last column gives the pid inside it."""
    out = []
    for m in re.finditer(r"^\|\s*(\d+)\s+(\d+)\s*\|\s*(\d+)\s*\|([^|]*)\|\s*(\d+)\s*\|(?:\s*(\d+)\s*\|)?", text, re.M):
        dev, pid, name, mb, inner = int(m[1]), int(m[3]), m[4].strip(), m[5], m[6]
        if dev == npu and chip in (None, int(m[2])) and me not in (pid, int(inner or -1)):
            out.append(f"pid {pid} {name} ({mb} MB)".replace("  ", " "))
    return out


def device_others(kind: str, since_us: int = 0) -> tuple[list[str] | None, float | None, str]:
    """(other processes on the accelerator or None if unknown, their utilization % or None, how we know)."""
    if kind == "cuda":
        try:
            others, util = _nvml_others(since_us)
            return others, util, "nvml"
        except Exception as e:  # no pynvml, no driver library: unknown, and said so
            return None, None, f"nvml unavailable ({type(e).__name__})"
    if kind == "npu":
        try:
            where = npu_smi.target()
            text = subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError, npu_smi.Unmapped) as e:
            return None, None, f"npu-smi unavailable ({type(e).__name__}: {str(e)[:160]})"
        return parse_npu_smi(text, where.npu_id, os.getpid(), where.chip), None, f"npu-smi ({where.how})"
    return [], None, "cpu"


# ---- one window -------------------------------------------------------------------------------

@dataclass
class Window:
    wall_s: float
    ncpu: int
    own_cores: float
    other_cores: float
    free_cores: float
    steal_share: float
    load_avg: float | None = None
    cpu_mhz: float | None = None          # lowest core clock at the end of the window
    cpu_max_mhz: float | None = None
    device_others: list[str] | None = None
    device_util_pct: float | None = None
    device_source: str = ""
    cpu_why: list[str] = field(default_factory=list)      # why the CPU side was disturbed
    device_why: list[str] = field(default_factory=list)   # why the accelerator side was
    canary_before: canary.Reading | None = None           # the memory canary just before the measurement
    canary_after: canary.Reading | None = None            # and just after it (outside the timed calls)
    canary_why: list[str] = field(default_factory=list)   # why the canary says the window was disturbed

    @property
    def why(self) -> list[str]:
        return self.cpu_why + self.device_why + self.canary_why

    @property
    def quiet(self) -> bool:
        return not self.why


def _slack_s(ncpu: int) -> float:
    """Rounding of tick counters: up to one tick per CPU in /proc/stat and four in our own times."""
    return (ncpu + 4) * TICK_S


def cpu_verdict(other_s: float, own_s: float, steal_s: float, total_s: float, wall_s: float, ncpu: int,
                limits: Limits = LIMITS) -> list[str]:
    """Why a window's CPU use says it was disturbed (empty list: it was not)."""
    why = []
    other = max(other_s - _slack_s(ncpu), 0.0) / max(wall_s, 1e-9)  # below ~0.1 s nothing shows: watch whole measurements
    free = ncpu - (other_s + own_s) / max(wall_s, 1e-9)
    if other > limits.other_cores and free < limits.free_cores:
        why.append(f"other processes used {other:.2f} cores (limit {limits.other_cores}) "
                   f"with {max(free, 0):.2f} of {ncpu} cores idle")
    if total_s > 0 and steal_s / total_s > limits.steal_share:
        why.append(f"hypervisor steal {steal_s / total_s:.1%} (limit {limits.steal_share:.0%})")
    return why


def stop(s0: Snapshot | None, kind: str = "cpu", limits: Limits = LIMITS) -> Window | None:
    """The window from s0 to now, judged; None when the counters could not be read."""
    s1 = snapshot()
    if s0 is None or s1 is None:
        return None
    wall = max(s1.t - s0.t, 1e-9)
    busy, own, steal = s1.busy_s - s0.busy_s, s1.own_s - s0.own_s, s1.steal_s - s0.steal_s
    other = max(busy - own, 0.0)
    total = busy + (s1.idle_s - s0.idle_s) + steal
    mhz, top = cpu_mhz()
    w = Window(wall_s=wall, ncpu=s1.ncpu, own_cores=own / wall, other_cores=other / wall,
               free_cores=(s1.idle_s - s0.idle_s) / wall, steal_share=steal / total if total else 0.0,
               load_avg=load_avg(), cpu_mhz=mhz, cpu_max_mhz=top)
    w.cpu_why = cpu_verdict(other, own, steal, total, wall, s1.ncpu, limits)
    if kind != "cpu":
        w.device_others, w.device_util_pct, w.device_source = device_others(kind, s0.epoch_us)
        if w.device_util_pct is not None:
            if w.device_util_pct > limits.device_util_pct:
                w.device_why.append(f"another process used the {kind} at {w.device_util_pct:.0f}% "
                             f"(limit {limits.device_util_pct:.0f}%): {', '.join(w.device_others or [])}")
        elif w.device_others:  # no per-process utilization: another process on the device is suspect
            w.device_why.append(f"other processes on the {kind}: {', '.join(w.device_others)}")
    return w


def watch(fn, kind: str = "cpu", limits: Limits = LIMITS):
    """(fn(), Window of the call) - the window is None where the counters cannot be read."""
    s0 = snapshot()
    out = fn()
    return out, stop(s0, kind, limits)


# ---- redo policy ------------------------------------------------------------------------------

@dataclass
class Conditions:
    window: Window | None     # of the attempt whose result is kept (the last one)
    attempts: int
    reasons: list[str]        # one entry per disturbed attempt: "attempt 1: ..."

    @property
    def quiet(self) -> bool | None:
        return None if self.window is None else self.window.quiet


def settle(max_s: float, own_cores: float, limits: Limits = LIMITS, probe_s: float = 0.5) -> float:
    """Back off: wait until a probe of probe_s would leave the measurement its cores, at most max_s.
    Returns the seconds waited. The probe uses the cores the disturbed measurement itself used."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        s0 = snapshot()
        time.sleep(min(probe_s, max(max_s - (time.monotonic() - t0), 0.01)))
        s1 = snapshot()
        if s0 is None or s1 is None:
            break
        wall = s1.t - s0.t
        other, steal = max((s1.busy_s - s0.busy_s) - (s1.own_s - s0.own_s), 0.0), s1.steal_s - s0.steal_s
        total = (s1.busy_s - s0.busy_s) + (s1.idle_s - s0.idle_s) + steal
        if not cpu_verdict(other, own_cores * wall, steal, total, wall, s1.ncpu, limits):
            break
    return time.monotonic() - t0


def measure(fn, kind: str = "cpu", max_attempts: int = 3, backoff_s: float = 2.0, limits: Limits = LIMITS,
            ceiling_bps: float | None = None, reader=None):
    """(result, Conditions): fn() run in a watched window, redone while the window is disturbed.

    fn must be a whole measurement (warm-up and every repeat), safe to run again. Between attempts we
    wait up to backoff_s, then 2 x backoff_s, ... for the machine to calm down. A result that stays
    disturbed after max_attempts is returned all the same, marked; unreadable counters give quiet None.
    The memory canary is read before and after each attempt, outside fn, and judged against
    ceiling_bps (the run's read ceiling, B/s; None: only its drift is judged); reader (label, fn(x))
    reads the canary buffer once on the CPU (None: torch's sum).
    """
    reasons = []
    for attempt in range(1, max_attempts + 1):
        out, w = watched_attempt(fn, kind, limits, ceiling_bps, reader)
        if w is None or w.quiet:
            break
        reasons.append(f"attempt {attempt}: " + "; ".join(w.why))
        if attempt < max_attempts:  # wait for the CPU to calm down; a busy accelerator or memory bus: wait it out
            wait = backoff_s * 2 ** (attempt - 1)
            if w.cpu_why:
                settle(wait, w.own_cores, limits)
            else:
                time.sleep(wait)
    return out, Conditions(window=w, attempts=attempt, reasons=reasons)


def watched_attempt(fn, kind: str, limits: Limits, ceiling_bps: float | None = None, reader=None):
    """watch(fn) between two canary readings; the canary's verdict joins the window's."""
    before = canary.read(kind, reader, _visible_index("CUDA_VISIBLE_DEVICES"))
    out, w = watch(fn, kind, limits)
    after = canary.read(kind, reader, _visible_index("CUDA_VISIBLE_DEVICES")) if before is not None else None
    if w is not None and before is not None:
        w.canary_before, w.canary_after = before, after
        w.canary_why = canary.verdict(before, after, ceiling_bps, limits.canary_below_ceiling, limits.canary_drift)
    return out, w


FIELDS = ("quiet", "attempts", "disturbance", "other_cores", "steal_share", "cpu_mhz",
          "canary_before_gbs", "canary_after_gbs", "canary_note")  # what fields() returns


def fields(c: Conditions) -> dict:
    """Record fields (records.COLUMNS) of a measurement's conditions."""
    w = c.window
    b, a = (None, None) if w is None else (w.canary_before, w.canary_after)
    gbs = lambda r: None if r is None or r.read_gbs is None else round(r.read_gbs, 3)
    return dict(quiet=c.quiet, attempts=c.attempts, disturbance=" | ".join(c.reasons) or None,
                other_cores=None if w is None else round(w.other_cores, 3),
                steal_share=None if w is None else round(w.steal_share, 4),
                cpu_mhz=None if w is None else w.cpu_mhz,
                canary_before_gbs=gbs(b), canary_after_gbs=gbs(a), canary_note=canary.describe(b, a))


# ---- before a grid ----------------------------------------------------------------------------

def _ancestors() -> set[int]:
    """This process and its ancestors (the runner, the shell): waiting on us, not 'others'."""
    pid, out = os.getpid(), set()
    while pid > 0 and pid not in out:
        out.add(pid)
        try:
            pid = int(_stat_fields(pid)[1])  # field 4: ppid
        except (OSError, ValueError, IndexError):
            break
    return out


def _process_ticks() -> dict[int, tuple[str, int]]:
    out = {}
    for p in Path("/proc").glob("[0-9]*"):
        try:
            head, rest = Path(p, "stat").read_text().rsplit(")", 1)
            out[int(p.name)] = (head.split("(", 1)[1], sum(int(v) for v in rest.split()[11:13]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def machine_check(sample_s: float = 1.0, limits: Limits = LIMITS) -> dict:
    """A short look at the machine before a grid: busy processes, CPU governor, memory, load.

    `busy` is True when other processes used more than limits.other_cores over sample_s (this
    process and its ancestors excluded); `line` says it all in one line."""
    fam = _ancestors()
    s0, p0 = snapshot(), _process_ticks()
    time.sleep(sample_s)
    s1, p1 = snapshot(), _process_ticks()
    out = {"ncpu": os.cpu_count()}
    if s0 is not None and s1 is not None:
        wall = s1.t - s0.t
        other = max((s1.busy_s - s0.busy_s) - (s1.own_s - s0.own_s), 0.0)
        out["other_cores"] = round(max(other - _slack_s(s1.ncpu), 0.0) / wall, 3)
        tot = (s1.busy_s - s0.busy_s) + (s1.idle_s - s0.idle_s) + (s1.steal_s - s0.steal_s)
        out["steal_share"] = round((s1.steal_s - s0.steal_s) / tot, 4) if tot else 0.0
        used = {pid: (p1[pid][1] - p0[pid][1]) * TICK_S / wall for pid in p1 if pid in p0 and pid not in fam}
        top = sorted((c, pid) for pid, c in used.items() if c >= 0.1)[::-1]
        out["busy_processes"] = [f"{p1[pid][0]} (pid {pid}, {c:.2f} cores)" for c, pid in top]
        out["busy"] = out["other_cores"] > limits.other_cores or out["steal_share"] > limits.steal_share
    else:
        out.update(other_cores=None, steal_share=None, busy_processes=[], busy=None)
    govs = sorted({g for g in (_read(p) for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor")) if g})
    out["governor"] = ",".join(govs) or "not exposed"
    mem = {m[1]: int(m[2]) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", _read(Path("/proc/meminfo")) or "", re.M)}
    out["mem_available_bytes"], out["mem_total_bytes"] = mem.get("MemAvailable"), mem.get("MemTotal")
    out["load_avg"] = load_avg()
    out["limits"] = asdict(limits)  # the thresholds every window of this run is judged against
    out["line"] = check_line(out)
    return out


def check_line(c: dict) -> str:
    gib = lambda b: f"{b / 2**30:.1f}" if b else "?"
    state = {True: "BUSY", False: "quiet", None: "unknown"}[c.get("busy")]
    busy = c.get("busy_processes") or []
    procs = ", ".join(busy[:5]) + (f" and {len(busy) - 5} more" if len(busy) > 5 else "") or "none"
    other = "?" if c.get("other_cores") is None else f"{c['other_cores']:.2f}"
    return (f"machine {state}: others use {other} of {c.get('ncpu')} cores (busy: {procs}); "
            f"governor {c.get('governor')}; {gib(c.get('mem_available_bytes'))} of "
            f"{gib(c.get('mem_total_bytes'))} GiB free; load {c.get('load_avg')}")
