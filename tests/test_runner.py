"""The grid runner end to end: papermill, resume after SIGKILL, failures, dead kernels, timeouts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import yaml

from conftest import LLMBENCH, ROOT, cli
from llmbench.measure.records import read_all
from llmbench.core.files import read_json

TINY = {"prompt_lens": [[8]], "decode_contexts": [[8]], "decode_steps": [2], "gen_prompt_len": [8],
        "gen_new_tokens": [[3]], "repeats": [2], "tokens": ["random"]}  # tiny vocabularies: seeded ids


def grid(tmp_path, name, notebooks, params=None, **top):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "params": {"device": ["cpu"], **(params or {})},
                                 "notebooks": notebooks, **top}))
    return p


def test_smoke_grid_end_to_end(smoke_runs):
    gdir = smoke_runs / "smoke"
    runs = sorted(p for p in gdir.iterdir() if not p.name.startswith("."))
    assert len(runs) == 14  # 00_device, 01_latency x 2 models x 2 engines, 02, 03 and 04 x 2 models, 05 x 3 pairs
    for run in runs:
        info = read_json(run / "run.json")
        assert info["status"] == "ok", info.get("error")
        for key in ("parameters", "device", "versions", "git_commit", "start", "end", "duration_s", "grid"):
            assert info[key], key
        nb = nbformat.read(run / f"{info['notebook']}.ipynb", as_version=4)
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # executed, outputs kept
        df = pd.read_parquet(run / "records.parquet")
        assert len(df) and (df.run_id == run.name).all()
    df = read_all(gdir)
    assert {"prefill", "decode", "generate", "batch", "quant", "fidelity", "ceiling", "load", "pair"} <= set(df.experiment)
    r = cli("run", "data/grids/smoke.yaml", "--runs", smoke_runs)
    assert r.returncode == 0 and "14 already done, running 0" in r.stdout
    s = cli("status", "data/grids/smoke.yaml", "--runs", smoke_runs)
    assert s.returncode == 0 and "14 ok" in s.stdout
    assert {"eager", "compiled"} <= set(df.engine)  # both engines, named on every record
    agree = df[df.metric == "greedy_steps_equal"]
    assert len(agree) == 2 and (agree["median"] == 16).all()  # compiled = eager for 16 greedy steps
    err = df[df.metric == "graph_rel_logit_error"]  # of the compiled decode graph itself, not a rerun of eager
    assert len(err) == 2 and (err["median"] > 0).all() and (err["median"] < 1e-4).all()


def _children_alive(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_sigkill_mid_grid_then_resume(tmp_path):
    g = grid(tmp_path, "killme", {"00_device": {"params": {"quick": [True]}}, "01_latency": {"params": TINY}},
             {"model": ["tiny-1b", "tiny-3b"]})
    runs = tmp_path / "runs"
    proc = subprocess.Popen([*LLMBENCH, "run", str(g), "--runs", str(runs)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gdir = runs / "killme"
    deadline = time.time() + 120
    while time.time() < deadline and not any((p / "run.json").exists() for p in gdir.glob("00_device-*")):
        time.sleep(0.2)
    time.sleep(1.0)  # the next point is now under way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.5)
    assert not _children_alive(str(gdir)), "a grid point outlived its killed runner"
    finished = [p for p in gdir.iterdir() if not p.name.startswith(".")]
    assert finished and all(read_json(p / "run.json")["status"] == "ok" for p in finished)  # nothing half-written
    r = cli("run", g, "--runs", runs)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(finished)} already done" in r.stdout
    final = sorted(p.name for p in gdir.iterdir() if not p.name.startswith("."))
    assert len(final) == 3 == len(set(final))
    df = read_all(gdir)
    assert sorted(df.run_id.unique()) == final
    per_run = sum(len(pd.read_parquet(gdir / f / "records.parquet")) for f in final)
    assert len(df) == per_run  # no duplicated records
    assert not (gdir / ".tmp").exists() or not any((gdir / ".tmp").rglob("run.json"))


def test_failed_point_is_recorded_and_the_grid_goes_on(tmp_path):
    from llmbench.model.models import load_model
    m, _ = load_model("tiny-3b")
    m.save_pretrained(tmp_path / "w3", safe_serialization=True)
    g = grid(tmp_path, "failing", {"01_latency": {"params": TINY}},
             {"model": ["tiny-1b", "tiny-3b"], "weights": [str(tmp_path / "w3")]})
    runs = tmp_path / "runs"
    r = cli("run", g, "--runs", runs)
    assert r.returncode == 1 and "1 failed, 1 ok" in r.stdout
    failed = [read_json(p) for p in (runs / "failing").glob("*/run.json") if read_json(p)["status"] == "failed"]
    assert len(failed) == 1 and "architecture of tiny-1b" in failed[0]["error"]
    assert "UserError" in failed[0]["log_tail"] or failed[0]["error"].startswith("UserError")
    r2 = cli("run", g, "--runs", runs)  # the failed point is retried; its earlier record is kept aside
    assert r2.returncode == 1 and "1 already done, running 1" in r2.stdout
    assert len(list((runs / "failing" / ".superseded").iterdir())) == 1


def test_a_kernel_that_dies_is_a_recorded_failure(tmp_path):
    spec = tmp_path / "jupyter" / "kernels" / "dies"
    spec.mkdir(parents=True)
    code = ("import os, threading; threading.Timer(4, lambda: os._exit(9)).start(); "
            "from ipykernel import kernelapp; kernelapp.launch_new_instance()")
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, "-c", code, "-f", "{connection_file}"],
                                                  "display_name": "dies", "language": "python"}))
    g = grid(tmp_path, "dead", {"01_latency": {"params": {**TINY, "repeats": [50], "prompt_lens": [[8, 16, 32, 64]]}}},
             {"model": ["tiny-1b"]})
    env = {"JUPYTER_PATH": str(tmp_path / "jupyter"), "LLMBENCH_KERNEL": "dies"}
    r = cli("run", g, "--runs", tmp_path / "runs", env=env)
    assert r.returncode == 1
    (info,) = [read_json(p) for p in (tmp_path / "runs" / "dead").glob("*/run.json")]
    assert info["status"] == "failed" and "ied" in info["error"], info["error"]  # "died" / "DeadKernelError"


def test_outer_timeout_kills_the_point_and_records_it(tmp_path):
    g = grid(tmp_path, "slow", {"01_latency": {"params": TINY}}, {"model": ["tiny-1b", "tiny-3b"]}, timeout_s=3)
    r = cli("run", g, "--runs", tmp_path / "runs")
    assert r.returncode == 1 and "2 timeout" in r.stdout
    for p in (tmp_path / "runs" / "slow").glob("*/run.json"):
        info = read_json(p)
        assert info["status"] == "timeout" and "timeout_s=3" in info["error"]
