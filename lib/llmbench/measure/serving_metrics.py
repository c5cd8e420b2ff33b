"""Serving metrics: pure functions from per-request timestamps to the numbers a deployer asks for.

Open-loop honesty: every latency is counted from the request's *scheduled* send time (its Poisson
arrival), not from when the client got round to sending it, so queueing inside the client is never
hidden (vLLM issue 54101); the send lag is kept beside it. Output tokens are the server's reported
usage (completion_tokens), not the client's count of streamed chunks.

Per request (times in seconds since the run's start):
  TTFT  = first content chunk - scheduled send
  ITL   = gaps between consecutive content chunks (a chunk may carry several tokens)
  TPOT  = (last chunk - first chunk) / (output tokens - 1)           (vLLM's definition)
  E2E   = last content chunk - scheduled send
Per run:
  duration            from the first counted scheduled send to the last counted completion
  request_throughput  completed counted requests / duration (the achieved requests/s)
  output_throughput   server-reported output tokens of those requests / duration
  goodput (a limit)   requests meeting both the limit's TTFT and TPOT / duration (vLLM --goodput)
  meets (a limit)     p99 TTFT and p99 TPOT within the limit (MLPerf's Server rule)
  saturated           the server fell behind the offered load: completions left at a lower rate than
                      those requests arrived (departure rate < SATURATION x arrival rate), a request still
                      open at the run's time limit had waited longer than any completed one took, or more
                      than MAX_ERROR_SHARE of requests failed
  incomplete          open when the run's time limit stopped it (or never sent): left out, and counted
Warm-up requests (the first `warmup` of each run's schedule) are sent but counted nowhere.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from llmbench.core.files import published

SATURATION = 0.85      # departures slower than this share of arrivals: the queue grows
MAX_ERROR_SHARE = 0.10  # more failed requests than this: stop the sweep (GuideLLM issue 105)
MIN_REQUESTS = 4       # a run counts at least this many requests after its warm-up


@dataclass
class Limit:
    name: str
    ttft_s: float | None   # None: no TTFT limit
    tpot_s: float | None


@dataclass
class RequestResult:
    index: int                       # position in the run's schedule (send order)
    warmup: bool                     # sent, never counted
    scheduled: float                 # s since run start: when the schedule says it is sent
    sent: float | None = None        # when the client actually sent it
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    done: float | None = None        # end of the stream
    prompt_tokens: int | None = None    # server usage
    output_tokens: int | None = None    # server usage (completion_tokens)
    cached_tokens: int | None = None    # prompt tokens the server reused from its cache
    error: str | None = None            # None: completed

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None and bool(self.chunks)


def poisson_schedule(rate: float, n: int, seed: int = 0) -> list[float]:
    """n send times (s), the first at 0: a Poisson process of `rate` requests/s conditioned on its
    (n-1)th arrival falling at (n-1)/rate. Exponential gaps scaled to that sum are exactly such a
    process (uniform order statistics): Poisson burstiness, and the target rate offered exactly. A raw
    draw of a few requests strays far (4 requests at 0.1 and 0.2 req/s offered 0.05 and 0.42 here)."""
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(n - 1, 0))
    if len(gaps):
        gaps *= (len(gaps) / rate) / gaps.sum()
    return [0.0, *np.cumsum(gaps).tolist()][:n]


def requests_for(rate: float, run_s: float, max_requests: int, warmup: int) -> int:
    """Requests a Poisson run sends: about rate x run_s counted ones (at least MIN_REQUESTS, at most
    max_requests), plus the warm-up."""
    return warmup + min(max_requests, max(MIN_REQUESTS, round(rate * run_s)))


def request_metrics(r: RequestResult) -> dict:
    """TTFT, TPOT, E2E, send lag (s) and ITL list of one completed request; TPOT None with fewer than
    two output tokens or no usage from the server."""
    ttft = r.chunks[0] - r.scheduled
    e2e = r.chunks[-1] - r.scheduled
    tpot = ((r.chunks[-1] - r.chunks[0]) / (r.output_tokens - 1)
            if r.output_tokens is not None and r.output_tokens > 1 else None)
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e, "itl": np.diff(r.chunks).tolist(),
            "send_lag": (r.sent - r.scheduled) if r.sent is not None else None}


def good(m: dict, limit: Limit) -> bool:
    """One request within both of the limit's bounds (a missing TPOT fails a TPOT limit)."""
    if limit.ttft_s is not None and not m["ttft"] <= limit.ttft_s:
        return False
    if limit.tpot_s is not None and (m["tpot"] is None or not m["tpot"] <= limit.tpot_s):
        return False
    return True


def pct(values, q: float) -> float:
    """Percentile q (0-100) by linear interpolation, as numpy and vLLM compute it; NaN when empty."""
    v = [x for x in values if x is not None]
    return float(np.percentile(v, q)) if v else float("nan")


def rate_of(times: list[float]) -> float:
    """Events per second over the span of sorted times: (n - 1) / (last - first); NaN if undefined."""
    if len(times) < 2 or times[-1] <= times[0]:
        return float("nan")
    return (len(times) - 1) / (times[-1] - times[0])


def summarize_run(results: list[RequestResult], limits: list[Limit], target_rate: float | None = None,
                  stopped_at: float | None = None, planned: int | None = None) -> dict:
    """Everything one run reports (see the module docstring); plain floats, NaN where undefined.

    stopped_at: when (s since the run's start) the run's time limit stopped it, None if it ended by
    itself. Requests still open then, and those a closed loop never got to send (planned: the counted
    requests it meant to send), are *incomplete* (as GuideLLM counts them): cut by the study's own time
    bound, left out of the latencies and of `requests`. An incomplete request that had already waited
    longer than the slowest completed one took in all is evidence of a growing queue: saturation."""
    counted = [r for r in results if not r.warmup]
    done = [r for r in counted if r.ok]
    failed = [r for r in counted if not r.ok and r.error is not None and not r.error.startswith("cancelled")]
    open_ = [r for r in counted if not r.ok and (r.error is None or r.error.startswith("cancelled"))]
    never_sent = max((planned or 0) - len(counted), 0)
    ms = [request_metrics(r) for r in done]
    slowest = max((m["e2e"] for m in ms), default=None)
    stale = [r for r in open_ if stopped_at is not None and (slowest is None or stopped_at - r.scheduled > slowest)]
    start = min((r.scheduled for r in counted), default=float("nan"))
    end = max((r.chunks[-1] for r in done), default=float("nan"))
    duration = end - start if done else float("nan")
    out_tokens = [r.output_tokens for r in done]
    out = {
        "requests": len(done) + len(failed), "completed": len(done), "failed": len(failed),
        "incomplete": len(open_) + never_sent, "stale": len(stale) + (never_sent if not done else 0),
        "slowest_e2e": slowest, "duration_s": duration,
        "request_throughput": len(done) / duration if done and duration > 0 else float("nan"),
        "output_throughput": (sum(out_tokens) / duration if done and duration > 0 and None not in out_tokens
                              else float("nan")),
        "missing_usage": sum(t is None for t in out_tokens),
        "arrival_rate": rate_of(sorted(r.scheduled for r in counted)),
        "departure_rate": rate_of(sorted(r.chunks[-1] for r in done)),
        "done_arrival_rate": rate_of(sorted(r.scheduled for r in done)),
        "ttft": [m["ttft"] for m in ms], "tpot": [m["tpot"] for m in ms if m["tpot"] is not None],
        "e2e": [m["e2e"] for m in ms], "itl": [m["itl"] for m in ms],
        "send_lag": [m["send_lag"] for m in ms if m["send_lag"] is not None],
        "output_tokens": out_tokens, "prompt_tokens": [r.prompt_tokens for r in done],
        "cached_tokens": [r.cached_tokens for r in done], "chunks": [len(r.chunks) for r in done],
        "target_rate": target_rate,
    }
    for key in ("ttft", "tpot", "e2e"):
        for q in (50, 90, 99):
            out[f"{key}_p{q}"] = pct(out[key], q)
    out["goodput"] = {lim.name: (sum(good(m, lim) for m in ms) / duration if done and duration > 0 else float("nan"))
                      for lim in limits}
    out["meets"] = {lim.name: meets(out, lim) for lim in limits}
    out["saturated"], out["saturated_why"] = saturation(out)
    return out


def meets(s: dict, limit: Limit) -> bool:
    """MLPerf's Server rule: p99 TTFT and p99 TPOT within the limit, no counted request failed, and
    the server kept up (a saturated run meets nothing)."""
    if s["completed"] == 0 or s["failed"] or s.get("stale"):
        return False
    if limit.ttft_s is not None and not s["ttft_p99"] <= limit.ttft_s:
        return False
    if limit.tpot_s is not None and not s["tpot_p99"] <= limit.tpot_s:
        return False
    return True


def saturation(s: dict) -> tuple[bool, str]:
    """(saturated, why): the server no longer keeps up with this run's offered load."""
    if s["requests"] and (s["failed"] / s["requests"]) > MAX_ERROR_SHARE:
        return True, f"{s['failed']} of {s['requests']} requests failed"
    if s["stale"]:
        if not s["completed"]:
            return True, f"no request completed before the run's time limit ({s['incomplete']} incomplete)"
        return True, (f"{s['stale']} request(s) still open at the run's time limit after waiting longer than the "
                      f"slowest completed one took ({s['slowest_e2e']:.3g} s)")
    if s["target_rate"] is None:  # a closed loop sends only when a request ends: it cannot over-run
        return False, ""
    arr, dep = s["done_arrival_rate"], s["departure_rate"]
    if math.isfinite(arr) and math.isfinite(dep) and dep < SATURATION * arr:
        return True, f"completions left at {dep:.3g} req/s against arrivals at {arr:.3g} req/s"
    return False, ""


@dataclass
class Sustainable:
    limit: str
    rate: float | None          # highest target rate that met the limit (None: none did)
    achieved: float | None      # its achieved requests/s
    next_rate: float | None     # the lowest higher rate measured that did not (None: none measured)


def sustainable(runs: list[dict], limit: Limit) -> Sustainable:
    """The highest swept Poisson rate whose run met the limit and was not saturated, with the lowest
    failing rate above it: the sustainable rate lies in [rate, next_rate)."""
    runs = sorted((r for r in runs if r.get("target_rate") is not None), key=lambda r: r["target_rate"])
    ok = [r for r in runs if r["meets"].get(limit.name) and not r["saturated"]]
    if not ok:
        return Sustainable(limit.name, None, None, runs[0]["target_rate"] if runs else None)
    best = ok[-1]
    above = [r["target_rate"] for r in runs if r["target_rate"] > best["target_rate"]
             and not (r["meets"].get(limit.name) and not r["saturated"])]
    return Sustainable(limit.name, best["target_rate"], best["request_throughput"], above[0] if above else None)


LIMIT_NAMES = ("MLPerf interactive", "MLPerf conversational")


def limits() -> list[Limit]:
    """The MLPerf Server limits of data/published.yaml (its latency_targets keep their sources)."""
    targets = published()["latency_targets"]
    return [Limit(t["name"], t["ttft_s"], t["tpot_s"]) for t in targets if t["name"] in LIMIT_NAMES]


def slug(limit_name: str) -> str:
    return limit_name.lower().replace(" ", "_")
