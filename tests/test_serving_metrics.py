"""Serving metrics on hand-built requests: every number checked against arithmetic done by hand."""
import math

import numpy as np
import pytest

from llmbench.measure import serving_metrics as SM
from llmbench.measure.serving_metrics import Limit, RequestResult

LIMITS = [Limit("MLPerf interactive", 0.5, 0.030), Limit("MLPerf conversational", 2.0, 0.100)]


def req(i, scheduled, first, tpot, n=5, sent=None, warmup=False, error=None):
    """A request scheduled at `scheduled`, first chunk at `first`, then n-1 chunks every tpot s."""
    chunks = [first + k * tpot for k in range(n)] if error is None else []
    return RequestResult(i, warmup, scheduled, sent if sent is not None else scheduled, chunks,
                         chunks[-1] + 0.001 if chunks else None, 128, n if error is None else None, 0, error)


def test_request_metrics_count_from_the_scheduled_send():
    r = req(0, scheduled=1.0, first=1.3, tpot=0.05, n=5, sent=1.2)  # the client sent it 0.2 s late
    m = SM.request_metrics(r)
    assert m["ttft"] == pytest.approx(0.3)          # not 0.1: the client's lateness is latency too
    assert m["send_lag"] == pytest.approx(0.2)
    assert m["tpot"] == pytest.approx(0.05)         # (1.5 - 1.3) / (5 - 1)
    assert m["e2e"] == pytest.approx(0.5)           # last chunk 1.5 - scheduled 1.0
    assert m["itl"] == pytest.approx([0.05] * 4)


def test_tpot_uses_the_servers_token_count_not_the_chunks():
    r = req(0, 0.0, 0.1, 0.04, n=5)
    r.output_tokens = 9  # 5 chunks carried 9 tokens (a server that packs tokens)
    assert SM.request_metrics(r)["tpot"] == pytest.approx((0.26 - 0.1) / 8)
    r.output_tokens = None  # no usage reported: no TPOT rather than a guess
    assert SM.request_metrics(r)["tpot"] is None


def test_run_summary_throughput_goodput_and_percentiles():
    # warm-up at 0 (ignored), then 4 counted requests at 1, 2, 3, 4 s
    rs = [req(0, 0.0, 5.0, 0.5, warmup=True),                  # slow warm-up: must not count anywhere
          req(1, 1.0, 1.2, 0.02), req(2, 2.0, 2.4, 0.05), req(3, 3.0, 4.0, 0.02), req(4, 4.0, 4.1, 0.2)]
    s = SM.summarize_run(rs, LIMITS, target_rate=1.0)
    assert (s["requests"], s["completed"], s["failed"], s["incomplete"]) == (4, 4, 0, 0)
    # duration: first counted scheduled send (1.0) to last counted chunk (4.1 + 4 x 0.2 = 4.9)
    assert s["duration_s"] == pytest.approx(3.9)
    assert s["request_throughput"] == pytest.approx(4 / 3.9)
    assert s["output_throughput"] == pytest.approx(20 / 3.9)
    assert s["ttft"] == pytest.approx([0.2, 0.4, 1.0, 0.1])
    assert s["ttft_p50"] == pytest.approx(0.3)
    assert s["ttft_p99"] == pytest.approx(np.percentile([0.2, 0.4, 1.0, 0.1], 99))
    # interactive (0.5 s, 30 ms): requests 1 only (2 has TPOT 50 ms, 3 TTFT 1 s, 4 TPOT 200 ms)
    assert s["goodput"]["MLPerf interactive"] == pytest.approx(1 / 3.9)
    # conversational (2 s, 100 ms): 1, 2, 3
    assert s["goodput"]["MLPerf conversational"] == pytest.approx(3 / 3.9)
    assert not s["meets"]["MLPerf conversational"]  # p99 TPOT is near 200 ms
    assert s["arrival_rate"] == pytest.approx(1.0)   # 3 gaps over 3 s


def test_meets_is_the_p99_rule_and_needs_every_request():
    rs = [req(i, float(i), i + 0.3, 0.02) for i in range(5)]
    s = SM.summarize_run(rs, LIMITS, target_rate=1.0)
    assert s["meets"] == {"MLPerf interactive": True, "MLPerf conversational": True}
    rs[2] = req(2, 2.0, 0, 0, error="HTTP 503: busy")
    s = SM.summarize_run(rs, LIMITS, target_rate=1.0)
    assert s["failed"] == 1 and not s["meets"]["MLPerf interactive"]


def test_saturation_when_departures_fall_behind_arrivals():
    # arrivals every 1 s, completions every 2 s: a growing queue
    rs = [req(i, float(i), 2.0 * i + 0.5, 0.01, n=2) for i in range(6)]
    s = SM.summarize_run(rs, LIMITS, target_rate=1.0)
    assert s["saturated"] and "completions left at" in s["saturated_why"]
    keep_up = [req(i, float(i), i + 0.5, 0.01, n=2) for i in range(6)]
    assert not SM.summarize_run(keep_up, LIMITS, target_rate=1.0)["saturated"]


def test_time_limit_cuts_requests_and_saturates_only_on_a_growing_queue():
    done = [req(i, float(i), i + 0.1, 0.01) for i in range(4)]  # each took 0.14 s in all
    # sent at 4.0 and stopped at 4.1: cut by the limit, not waiting long: incomplete, no saturation
    cut = RequestResult(4, False, 4.0, 4.0, error="cancelled: run time limit")
    s = SM.summarize_run(done + [cut], LIMITS, target_rate=1.0, stopped_at=4.1)
    assert (s["requests"], s["incomplete"], s["stale"]) == (4, 1, 0) and not s["saturated"]
    assert s["meets"]["MLPerf interactive"]  # the cut request is left out, as GuideLLM leaves it
    # stopped at 9.0: it had waited 5 s, longer than any completed request took: the queue grew
    s = SM.summarize_run(done + [cut], LIMITS, target_rate=1.0, stopped_at=9.0)
    assert s["stale"] == 1 and s["saturated"] and "slowest completed one took (0.14 s)" in s["saturated_why"]
    assert not s["meets"]["MLPerf conversational"]
    # a closed loop that completed nothing before the limit and never sent the rest
    s = SM.summarize_run([RequestResult(0, False, 0.0, 0.0, error="cancelled: run time limit")], LIMITS, None,
                         stopped_at=90.0, planned=6)
    assert (s["completed"], s["incomplete"]) == (0, 6) and s["saturated"] and "no request completed" in s["saturated_why"]


def test_saturation_on_errors():
    bad = [req(i, float(i), 0, 0, error="ConnectError") for i in range(3)] + [req(3, 3.0, 3.1, 0.01)]
    s = SM.summarize_run(bad, LIMITS, target_rate=1.0)
    assert s["failed"] == 3 and s["saturated"] and "failed" in s["saturated_why"]


def test_a_closed_loop_is_never_saturated_by_its_rates():
    rs = [req(i, 2.0 * i, 2.0 * i + 0.5, 0.01, n=2) for i in range(4)]
    assert not SM.summarize_run(rs, LIMITS, target_rate=None)["saturated"]


def test_empty_run_is_nan_not_an_error():
    s = SM.summarize_run([RequestResult(0, False, 0.0, error="ConnectError: refused")], LIMITS, 1.0)
    assert s["completed"] == 0 and math.isnan(s["request_throughput"]) and math.isnan(s["ttft_p99"])
    assert not any(s["meets"].values())


def test_poisson_schedule_is_seeded_and_offers_the_rate_exactly():
    a, b = SM.poisson_schedule(2.0, 4000, seed=3), SM.poisson_schedule(2.0, 4000, seed=3)
    assert a == b and a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    assert SM.poisson_schedule(2.0, 4000, seed=4) != a
    for n in (2, 5, 4000):  # short runs too: the offered rate is the target, not a draw's stray
        s = SM.poisson_schedule(0.1, n, seed=1)
        assert (n - 1) / s[-1] == pytest.approx(0.1, rel=1e-9)
    gaps = np.diff(a)  # still Poisson burstiness: exponential gaps have a coefficient of variation of 1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            SM.poisson_schedule(bad, 3)


def test_requests_per_run_are_bounded():
    assert SM.requests_for(0.1, 60, 16, 1) == 1 + 6
    assert SM.requests_for(0.01, 60, 16, 1) == 1 + SM.MIN_REQUESTS
    assert SM.requests_for(10.0, 60, 16, 2) == 2 + 16


def run_at(rate, meets, saturated=False, achieved=None):
    return {"target_rate": rate, "meets": {"L": meets}, "saturated": saturated,
            "request_throughput": achieved if achieved is not None else rate * 0.95}


def test_sustainable_rate_is_the_highest_met_with_the_next_failure():
    lim = Limit("L", 1.0, 0.1)
    s = SM.sustainable([run_at(0.4, False), run_at(0.1, True), run_at(0.2, True, achieved=0.19)], lim)
    assert (s.rate, s.achieved, s.next_rate) == (0.2, 0.19, 0.4)
    s = SM.sustainable([run_at(0.1, True), run_at(0.2, True, saturated=True)], lim)  # saturated never counts
    assert (s.rate, s.next_rate) == (0.1, 0.2)
    s = SM.sustainable([run_at(0.1, False), run_at(0.2, False)], lim)
    assert s.rate is None and s.next_rate == 0.1
    s = SM.sustainable([run_at(0.1, True), run_at(None, True, achieved=0.5)], lim)  # closed-loop runs are not rates
    assert s.rate == 0.1 and s.next_rate is None
