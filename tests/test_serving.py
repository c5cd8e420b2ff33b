"""Serving: server lifecycle (no orphan, pids recorded), the load client, and bad input, against a
stand-in server (tests/fake_openai_server.py); the llama-server tests run where it is built."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from conftest import gone
from llmbench.experiments import serving as S
from llmbench.measure import serving_metrics as SM
from llmbench.core.errors import UserError

FAKE = Path(__file__).with_name("fake_openai_server.py")
ROOT = Path(__file__).resolve().parents[1]


def fake_cmd(port, *extra):
    return [sys.executable, str(FAKE), "--port", str(port), *map(str, extra)]


def start_fake(tmp_path, *extra) -> S.Server:
    for attempt in range(3):  # as start_llama_server: a free port can be taken before the bind
        port = S.free_port()
        log = tmp_path / "fake.log"
        proc = S.spawn(fake_cmd(port, *extra), log, tmp_path / "servers.json")
        server = S.Server("llama-server", f"http://127.0.0.1:{port}", "fake-model", proc, log, tmp_path / "servers.json")
        try:
            server.startup_s = S.wait_ready(server, timeout=30)
            return server
        except S.ServerFailed:
            S.stop(server)
    raise AssertionError("the stand-in server did not start in 3 tries")


def test_server_lifecycle_records_pid_and_leaves_nothing(tmp_path):
    server = start_fake(tmp_path, "--load-s", 0.5)
    assert server.startup_s >= 0.4  # /health said 503 while "loading": readiness waited for it
    pid = server.proc.pid
    assert os.getpgid(pid) == pid  # its own process group
    entries = json.loads((tmp_path / "servers.json").read_text())
    assert [e["pid"] for e in entries][-1] == pid and entries[-1]["stopped"] is None
    assert S.pgrep_group(pid) == ([pid], f"pgrep -g {pid}")  # the group the study gave it, found by pgrep
    assert f"`pgrep -g {pid}`: {pid} STILL RUNNING" in S.leftover_text(tmp_path)
    S.stop(server)
    assert gone(pid) and not S.leftover(tmp_path)
    assert all(e["stopped"] is not None for e in json.loads((tmp_path / "servers.json").read_text()))
    assert "none is still running" in S.leftover_text(tmp_path)
    assert f"`pgrep -g {pid}`: no process" in S.leftover_text(tmp_path)


def test_a_foreign_server_on_the_port_is_not_taken_for_ours(tmp_path):
    """Readiness asks for our model name: a process that holds the port and answers /health is refused."""
    other = start_fake(tmp_path)
    try:
        ours = S.Server("llama-server", other.url, "llama-3.2-1b", other.proc, other.log, other.pids_file)
        with pytest.raises(S.ServerFailed, match="serves \\['fake-model'\\], not 'llama-3.2-1b': another process holds"):
            S.wait_ready(ours, timeout=10)
    finally:
        S.stop(other)


def test_poisson_run_times_every_request_from_its_schedule(tmp_path):
    server = start_fake(tmp_path, "--ttft", 0.05, "--tpot", 0.01, "--slots", 4)
    try:
        prompts = [[1] * 16 for _ in range(12)]
        results, info = S.run_poisson(server, prompts, rate=20.0, warmup=2, new_tokens=8, run_s=0.5,
                                      max_requests=10, max_run_s=30, seed=1)
    finally:
        S.stop(server)
    assert info == {"stopped_at": None, "server_died": None}
    assert len(results) == 2 + 10 and all(r.ok for r in results)
    assert [r.warmup for r in results] == [True, True] + [False] * 10
    schedule = SM.poisson_schedule(20.0, 12, seed=1)
    assert [r.scheduled for r in results] == pytest.approx(schedule)
    for r in results:
        assert r.output_tokens == 8 and r.prompt_tokens == 16 and len(r.chunks) == 8
        m = SM.request_metrics(r)
        assert m["ttft"] >= 0.05 - 1e-3 and m["send_lag"] >= 0
        assert m["tpot"] == pytest.approx(0.01, abs=0.01)


def test_overload_saturates_and_the_time_limit_cancels(tmp_path):
    # one slot of 0.2 s per request (capacity 5 req/s) offered 40 req/s: the queue grows
    server = start_fake(tmp_path, "--ttft", 0.1, "--tpot", 0.02, "--slots", 1)
    try:
        results, info = S.run_poisson(server, [[1] * 4] * 30, rate=40.0, warmup=0, new_tokens=6, run_s=0.5,
                                      max_requests=20, max_run_s=1.5, seed=0)
    finally:
        S.stop(server)
    s = SM.summarize_run(results, SM.limits(), 40.0, info["stopped_at"])
    assert info["stopped_at"] >= 1.5 and s["incomplete"] > 0 and s["stale"] > 0 and s["saturated"]
    assert all(r.error.startswith("cancelled: run time limit") for r in results if not r.ok)


def test_closed_loop_keeps_concurrency_in_flight(tmp_path):
    server = start_fake(tmp_path, "--ttft", 0.05, "--tpot", 0.005, "--slots", 8)
    try:
        results, _ = S.run_closed(server, [[1] * 4] * 20, concurrency=3, warmup=1, new_tokens=4,
                                  max_requests=9, max_run_s=30)
    finally:
        S.stop(server)
    assert len(results) == 1 + 6 and all(r.ok for r in results)  # 2 x concurrency counted
    starts = sorted(r.scheduled for r in results)
    assert starts[2] - starts[0] < 0.04  # the first three went out together


def test_no_usage_means_no_tpot_rather_than_a_guess(tmp_path):
    server = start_fake(tmp_path, "--no-usage")
    try:
        results, _ = S.run_poisson(server, [[1] * 4] * 6, 20.0, 1, 5, 0.2, 4, 30)
    finally:
        S.stop(server)
    s = SM.summarize_run(results, SM.limits(), 20.0)
    assert s["completed"] == 4 and s["missing_usage"] == 4 and s["tpot"] == []


class Ctx(dict):
    pass


def ctx_for(tmp_path):
    from llmbench.experiments.session import Session, out_dir
    params = {"out_dir": str(tmp_path), "model": "tiny-1b", "weights": "synthetic", "dtype": "fp32",
              "quant": "none", "device": "cpu", "tokens": "random"}
    return Session(notebook="04_serving", params=params, kind="cpu", info={"device_name": "test cpu"}, spec=None,
                   spec_ceilings={"flops": {}, "bandwidth": None}, dir=out_dir(params, "04_serving"),
                   base={"run_id": tmp_path.name, "study": "serving", "device": "cpu", "device_name": "test cpu",
                         "model": "tiny-1b", "weights": "synthetic", "dtype": "fp32", "quant": "none",
                         "tokens": "random"})


def test_a_server_that_dies_mid_run_keeps_the_finished_rows(tmp_path):
    ctx = ctx_for(tmp_path)
    server = start_fake(tmp_path, "--ttft", 0.02, "--tpot", 0.002, "--slots", 4, "--die-after", 7)
    load = S.Load(rates=[5.0, 10.0, 20.0], concurrencies=[2], requests=5, run_s=0.5, max_run_s=20, warmup=1,
                  prompt_len=8, new_tokens=4)
    try:
        summaries = S.sweep(ctx, server, load, lambda n, seed: [[seed % 100 + 1] * 8] * n,
                            dict(engine="llama-server", prompt_len=8, new_tokens=4, tokens="random"))
    finally:
        S.stop(server)
    assert not S.leftover(tmp_path)
    rec = pd.read_parquet(tmp_path / "records.parquet")  # what the run saved, not what it holds in memory
    first = rec[(rec.request_rate == 5.0) & (rec.metric == "serving_ttft")]
    assert first.status.tolist() == ["ok"] and int(first.n.iloc[0]) == 4  # 1 warm-up + 4 counted: all before the death
    assert first.other_cores.notna().all() and first.quiet.notna().all()  # how busy the machine was, per run
    second = rec[(rec.request_rate == 10.0) & (rec.metric == "request_throughput")]
    assert second.status.iloc[0].startswith("failed: server exited with code 3")
    skipped = rec[rec.status.str.startswith("skipped")]
    assert set(skipped.request_rate.dropna()) == {20.0} and set(skipped.concurrency.dropna()) == {2.0}
    assert [s["status"] == "ok" for s in summaries] == [True, False]
    runs = [json.loads(x)["run"] for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert runs == [0] * 5 + [1] * 6  # every request of both runs kept raw, the failed ones too


def test_unreachable_endpoint_is_one_clear_failure(tmp_path):
    port = S.free_port()
    with pytest.raises(S.ServerFailed, match=f"endpoint http://127.0.0.1:{port} is unreachable: ConnectError"):
        S.connect_endpoint(f"http://127.0.0.1:{port}/", timeout=2)
    ctx = ctx_for(tmp_path)
    assert S.start_server(ctx, "endpoint", {"endpoint": f"http://127.0.0.1:{port}"}, 8, 4) is None
    assert ctx.rows[0]["status"].startswith("failed: endpoint") and ctx.rows[0]["metric"] == "server_startup_time"


def test_endpoint_reached_and_its_model_named(tmp_path):
    server = start_fake(tmp_path)
    try:
        e = S.connect_endpoint(server.url + "/v1")
        assert (e.kind, e.model, e.proc) == ("endpoint", "fake-model", None)
        with pytest.raises(S.ServerFailed, match="does not serve model 'other'; it serves: fake-model"):
            S.connect_endpoint(server.url, "other")
    finally:
        S.stop(server)


def test_port_in_use_is_refused_before_anything_starts(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(S.ServerFailed, match=f"port {port} on 127.0.0.1 is in use"):
            S.start_llama_server(Path("/nonexistent/llama-server"), Path("x.gguf"), "m", tmp_path, 1, 256, 1,
                                 "cpu", "F32", "off", port=port)
    assert not (tmp_path / "servers.json").exists()


@pytest.mark.parametrize("name,value,msg", [
    ("rates", [0.1, 0.0], "must be positive"), ("rates", [-1.0], "must be positive"),
    ("concurrencies", [-1], "must be 0 or more"), ("server", "sglang", "valid: llama-server, endpoint, vllm"),
    ("endpoint", "localhost:8000", "expected a base URL"), ("port", 70000, "must be a TCP port")])
def test_bad_parameters_are_one_clear_message(name, value, msg):
    from llmbench.experiments.params import check_value
    with pytest.raises(UserError, match=msg):
        check_value("04_serving", name, value)


def test_parameters_that_only_make_sense_together():
    base = {"server": "endpoint", "endpoint": "", "endpoint_model": "", "run_s": 10.0, "max_run_s": 60.0}
    with pytest.raises(UserError, match="needs endpoint="):
        S.check_params(base)
    with pytest.raises(UserError, match="use server='endpoint'"):
        S.check_params({**base, "server": "llama-server", "endpoint": "http://x:1"})
    with pytest.raises(UserError, match="max_run_s=5.0 is shorter than run_s=10.0"):
        S.check_params({**base, "endpoint": "http://x:1", "max_run_s": 5.0})


def test_a_rate_of_zero_never_reaches_the_schedule():
    with pytest.raises(UserError, match="must be positive"):
        S.run_poisson(None, [], 0.0, 0, 1, 1, 1, 1)


RUNNER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {lib!r})
    from pathlib import Path
    from llmbench.experiments import serving as S
    cmd = {cmd!r}
    proc = S.spawn(cmd, Path({log!r}), Path({pids!r}))
    print(proc.pid, flush=True)
    time.sleep(120)
""")


def start_runner(tmp_path) -> tuple[subprocess.Popen, int]:
    """(a runner process that spawned a fake server and then waits, the server's pid)."""
    script = RUNNER.format(lib=str(ROOT / "lib"), cmd=fake_cmd(S.free_port()), log=str(tmp_path / "s.log"),
                           pids=str(tmp_path / "servers.json"))
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    return runner, int(runner.stdout.readline())


def test_sigkill_of_the_process_that_started_the_server_kills_the_server(tmp_path):
    """PR_SET_PDEATHSIG: a runner killed with SIGKILL (no atexit, no handler runs) takes its server along."""
    runner, pid = start_runner(tmp_path)
    assert S.pid_alive(pid)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert gone(pid), f"server {pid} outlived its runner"
    assert [e["pid"] for e in json.loads((tmp_path / "servers.json").read_text())] == [pid]
    assert not S.leftover(tmp_path) and S.pgrep_group(pid)[0] == []
    assert f"`pgrep -g {pid}`: no process" in S.leftover_text(tmp_path)


def test_sigterm_of_the_runner_stops_the_server_through_its_handler(tmp_path):
    runner, pid = start_runner(tmp_path)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=20) == -signal.SIGTERM  # the handler stops the server, then the signal still ends it
    assert gone(pid)
    assert json.loads((tmp_path / "servers.json").read_text())[0]["stopped"] is not None  # the handler's stop


def test_llama_server_build_is_cached_per_version_flags_and_cpu(tmp_path, monkeypatch):
    from llmbench.system import llamacpp_build
    from llmbench.system import llamaserver_build as B
    monkeypatch.setenv("LLMBENCH_WHEEL_CACHE", str(tmp_path))
    a, b = B.cache_dir("0.3.36", ["-DGGML_NATIVE=ON"]), B.cache_dir("0.3.36", ["-DGGML_NATIVE=ON", "-DGGML_CUDA=ON"])
    assert a != b and a != B.cache_dir("0.3.37", ["-DGGML_NATIVE=ON"]) and a.parent == tmp_path
    assert a != llamacpp_build.cache_dir("0.3.36", ["-DGGML_NATIVE=ON"])  # never the wheel's folder
    assert B.cached() is None  # nothing built under this cache: no binary, and nothing is built by asking
    out = B.cache_dir(llamacpp_build.pins()["llama-cpp-python"], llamacpp_build.cmake_args())
    out.mkdir(parents=True)
    (out / "llama-server").write_text("")
    assert B.cached() is None  # a binary without its build.json is not a finished build
    (out / "build.json").write_text('{"cmake_args": []}')
    assert B.cached() == (out / "llama-server", {"cmake_args": []})


def test_a_grid_point_never_builds_llama_server(tmp_path, monkeypatch):
    from llmbench.system import llamaserver_build as B
    monkeypatch.setattr(B, "cached", lambda: None)
    monkeypatch.setattr(B, "ensure", lambda *a: pytest.fail("a grid point started a build"))
    ctx = ctx_for(tmp_path)
    p = {"model": "tiny-1b", "weights": "synthetic", "dtype": "fp32", "quant": "none", "parallel": 1}
    assert S.start_server(ctx, "llama-server", p, 8, 4) is None
    assert ctx.rows[0]["status"].startswith("unsupported: llama-server is not built")
