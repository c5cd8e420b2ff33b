"""llama-server itself (skipped where `python -m llmbench.system.llamaserver_build` has not built it): the GGUF
with the test vocabulary streams one chunk per token with exact usage, and a SIGKILLed grid runner
leaves no server behind (runner -> run-point -> Jupyter kernel -> llama-server)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmbench.model import gguf_export
from llmbench.system import llamaserver_build
from llmbench.experiments import serving as S
from llmbench.measure import serving_metrics as SM

ROOT = Path(__file__).resolve().parents[1]
BUILT = llamaserver_build.cached()
pytestmark = pytest.mark.skipif(BUILT is None, reason="llama-server is not built here (python -m llmbench.system.llamaserver_build)")


def test_llama_server_streams_one_chunk_per_token_with_the_servers_usage(tmp_path):
    binary, _ = BUILT
    g = gguf_export.export("tiny-1b", "synthetic", 0, "F32", "fp32")
    server = S.start_llama_server(binary, g.path, "tiny-1b", tmp_path, 2, 256, 1, "cpu", "F32", "off")
    try:
        prompts = [[(7 * i + j) % 500 + 1 for j in range(24)] for i in range(4)]
        results, info = S.run_poisson(server, prompts, rate=5.0, warmup=1, new_tokens=12, run_s=0.1,
                                      max_requests=3, max_run_s=60)
    finally:
        S.stop(server)
    assert info["server_died"] is None and not S.leftover(tmp_path)
    for r in results:
        assert r.ok, r.error
        assert (r.prompt_tokens, r.output_tokens, len(r.chunks)) == (24, 12, 12)  # ids in as given, EOS ignored
    assert json.loads((tmp_path / "servers.json").read_text())[0]["exit_code"] is not None


def test_port_taken_by_another_process_after_it_was_chosen_is_a_recorded_failure(tmp_path):
    """A server that cannot bind exits; with a fixed port that is one clear failure, no retry, no orphan."""
    import socket
    binary, _ = BUILT
    g = gguf_export.export("tiny-1b", "synthetic", 0, "F32", "fp32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        with pytest.raises(S.ServerFailed, match="in use"):
            S.start_llama_server(binary, g.path, "tiny-1b", tmp_path, 1, 256, 1, "cpu", "F32", "off", port=port)
    assert not S.leftover(tmp_path)


GRID = """name: serve-kill
timeout_s: 600
cell_timeout_s: 550
params:
  device: [cpu]
  model: [tiny-1b]
  tokens: [random]
notebooks:
  04_serving:
    params: {prompt_len: [32], new_tokens: [16], rates: [[0.5]], concurrencies: [[1]], requests: [40],
             run_s: [80.0], max_run_s: [200.0], parallel: [1]}
"""


def test_sigkill_of_the_grid_runner_leaves_no_server(tmp_path):
    """The whole chain: the runner SIGKILLed mid-sweep; run-point dies with it (PR_SET_PDEATHSIG), the
    kernel exits when its parent goes (ipykernel's parent poller), and the server with the kernel."""
    grid = tmp_path / "serve-kill.yaml"
    grid.write_text(GRID)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    runner = subprocess.Popen([sys.executable, "-m", "llmbench.cli", "run", str(grid), "--runs", str(tmp_path / "runs")],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid, t0 = None, time.time()
    try:
        while time.time() - t0 < 240 and pid is None:  # until the server is up and the load has begun
            for f in (tmp_path / "runs").rglob("servers.json"):
                entries = json.loads(f.read_text() or "[]")
                logs = list(f.parent.glob("server-*.log"))
                if entries and logs and "launch_slot" in logs[0].read_text(errors="replace"):
                    pid = entries[0]["pid"]
            time.sleep(0.5)
        assert pid is not None, "the server never started serving"
        assert S.pid_alive(pid)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    t1 = time.time()
    while S.pid_alive(pid) and time.time() - t1 < 20:
        time.sleep(0.2)
    assert not S.pid_alive(pid), f"llama-server {pid} outlived the SIGKILLed runner"
    print(f"server {pid} gone {time.time() - t1:.1f} s after the runner's SIGKILL")
