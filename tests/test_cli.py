import json

import pytest

from conftest import cli


def test_models_table_and_json():
    r = cli("models")
    assert r.returncode == 0, r.stderr
    assert "1,235,814,400" in r.stdout and "3,212,749,824" in r.stdout
    assert "32,768" in r.stdout and "114,688" in r.stdout
    rows = {d["model"]: d for d in json.loads(cli("models", "--json").stdout)}
    assert rows["llama-3.2-1b"]["params_total"] == 1_235_814_400
    assert rows["llama-3.2-3b"]["kv_bytes_per_token_bf16"] == 114_688
    assert rows["llama-3.2-1b"]["flops_per_token"] == 2 * (16 * 60_817_408 + 128_256 * 2048)
    # one decode step at context 1024 in bf16 reads all weights once plus the KV cache
    assert rows["llama-3.2-1b"]["decode_step_bytes_bf16_ctx1024"] > rows["llama-3.2-1b"]["weight_bytes_bf16"]


def test_env_json_describes_this_machine():
    info = json.loads(cli("env", "--json").stdout)
    assert info["device"] == "cpu" and info["torch"] and "torch_npu" in info["available"]["npu"]
    # where torch came from: the system's site-packages (SYSTEM_PACKAGES=1) or this venv
    assert f"torch {info['torch'].split('+')[0]}" in info["system packages"] + info["venv packages"]


def _one_clean_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmbench: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("args,needles", [
    (["env", "--device", "cuda"], ["'cuda'", "available: cpu"]),
    (["env", "--device", "tpu"], ["'tpu'", "valid: auto, npu, cuda, cpu"]),
    (["run", "data/grids/nope.yaml"], ["nope.yaml", "does not exist", "data/grids/smoke.yaml"]),
    (["report", "/no/such/results"], ["/no/such/results", "does not exist"]),
    (["run-point", "01_latency", "--grid-dir", "/tmp/x", "--run-id", "r", "--params", '{"model": "llama-9b"}'],
     ["model", "'llama-9b'", "llama-3.2-1b, llama-3.2-3b"]),
    (["run-point", "01_latency", "--grid-dir", "/tmp/x", "--run-id", "r", "--params", '{"weights": "/no/dir"}'],
     ["'/no/dir'", "does not exist", "'synthetic'"]),
    (["run-point", "01_latency", "--grid-dir", "/tmp/x", "--run-id", "r", "--params", '{"repeats": "3"}'],
     ["repeats='3'", "expected int"]),
    (["run-point", "01_latency", "--grid-dir", "/tmp/x", "--run-id", "r", "--params", '{"dtype": "int3"}'],
     ["'int3'", "fp32, fp16, bf16"]),
    (["run-point", "07_nothing", "--grid-dir", "/tmp/x", "--run-id", "r"], ["'07_nothing'", "01_latency"]),
])
def test_user_errors_are_one_line_with_exit_2(args, needles):
    _one_clean_error(cli(*args), *needles)


def test_weights_without_safetensors_are_refused_by_the_cli(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    r = cli("run-point", "01_latency", "--grid-dir", tmp_path, "--run-id", "r", "--params",
            json.dumps({"weights": str(tmp_path)}))
    _one_clean_error(r, str(tmp_path), "no *.safetensors", "pytorch_model.bin")


@pytest.mark.parametrize("kind, bf16, grid", [("npu", "", "npu"), ("npu", "no bf16 on 310P", "npu_fp16"),
                                              ("cuda", "", "cuda"), ("cpu", "no fast kernel", "cpu")])
def test_detect_grid_names_the_study_grid_of_the_device(monkeypatch, capsys, kind, bf16, grid):
    """make study runs this grid: an NPU without bf16 (310P, 910A) gets npu_fp16, where bf16 points would all be
    recorded as unsupported."""
    from llmbench.cli import main
    from llmbench.system import device
    monkeypatch.setattr(device, "pick_device", lambda d: kind)
    monkeypatch.setattr(device, "usable_dtypes", lambda k: {"fp32": "", "fp16": "", "bf16": bf16})
    assert main(["detect", "--grid"]) == 0
    assert capsys.readouterr().out.strip() == grid
    from llmbench.core import paths
    assert (paths.GRIDS / f"{grid}.yaml").is_file()
