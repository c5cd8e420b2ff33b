"""The NPU path end to end on a fake torch_npu (conftest.py): both engines at batch 4 per chip, the task queue,
npugraph_ex capture and recapture, torch-npu's autoload entry point, npu-smi's own ids, 310P weight formats and
CANN version files. Each test checks a contract of torch-npu 2.13.0 / CANN that an earlier version broke.

`python tests/test_npu_runtime.py` prints the chip x method x engine matrix (runs / unsupported: why)."""
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, NpuKernelError, fake_torch_npu
from llmbench import engines as engine
from llmbench.engines import compiled as engine_compiled
from llmbench.model.quant import npu as quant_npu
from llmbench.engines import LoadRequest
from llmbench.core.errors import Unsupported

METHODS = ("none", "w8a16", "w8a8", "w4a16")
ENGINES = ("eager", "compiled")
CHIP_DTYPE = {"Ascend910B2": "bf16", "Ascend910_9392": "bf16", "Ascend310P3": "fp16", "Ascend910A": "fp16"}
# What must happen on each chip (written from torch_npu's docs, independently of quant_npu's table): "runs",
# or a word of the refusal. Graph mode is tried on every chip: the fake captures wherever it is asked to.
RUNS = {m: "runs" for m in METHODS}
EXPECTED = {
    "Ascend910B2": {e: RUNS for e in ENGINES},
    "Ascend910_9392": {e: RUNS for e in ENGINES},
    "Ascend310P3": {e: {"none": "runs", "w8a16": "runs", "w8a8": "per-token", "w4a16": "int4"} for e in ENGINES},
    "Ascend910A": {e: {"none": "runs", "w8a16": "not listed", "w8a8": "not listed", "w4a16": "not listed"}
                   for e in ENGINES},
}


def _load(name, chip, quant, max_batch=4, max_seq=32, task_queue=2):
    return engine.load(LoadRequest(name, "tiny-1b", "synthetic", CHIP_DTYPE[chip], quant, "npu", max_batch=max_batch,
                                   max_seq=max_seq, tokens="random", task_queue=task_queue))


def _greedy(e, ids, steps):
    """prefill + decode steps, as measure.py times them: [batch, 1 + steps] tokens."""
    state, tok = engine.prefill(e, ids)
    out = [tok]
    for _ in range(steps):
        state, tok = engine.decode(e, state, tok)
        out.append(tok)
    engine.release(e, state)
    return torch.cat(out, dim=1)


def _uncompiled(e):
    """The same compiled engine with its steps run eagerly through the very same module and cache."""
    ref = engine.Engine(**{**e.__dict__, "extra": dict(e.extra)})
    ref.extra.update(decode=engine_compiled._decode_step, prefill=engine_compiled._prefill_step, compiled=set())
    return ref


def run_point(mp, chip: str, method: str, name: str, batch: int = 4, steps: int = 3) -> str:
    """Load `name` with `method` on a fake `chip` and run a batch-`batch` prefill and decode steps: "runs", or
    "unsupported: why". A compiled engine's captured graphs must give the greedy tokens of the same module run
    eagerly, and npugraph_ex must have captured them."""
    from torch._dynamo.utils import counters
    npu, mod = fake_torch_npu(mp, chip=chip)
    torch._dynamo.reset()
    try:
        e = _load(name, chip, method, max_batch=batch)
    except Unsupported as why:
        return f"unsupported: {why}"
    ids = torch.arange(batch * 5).reshape(batch, 5) * 7 % e.cfg.vocab_size
    toks = _greedy(e, ids, steps)
    assert toks.shape == (batch, 1 + steps)
    if name == "compiled":
        assert any(k.startswith("captured_") for k in counters["npugraph_ex"]) and "npugraph_ex.capture" in npu.names()
        assert torch.equal(toks, _greedy(_uncompiled(e), ids, steps)), (chip, method)
    calls = [c for c in mod.op_calls if c[0] == "npu_weight_quant_batchmatmul"]
    assert method not in ("w8a16", "w4a16") or any(c[1]["x"][0][0] == batch for c in calls)  # the LM head at batch 4
    notes = ["graph mode not documented for this chip: tried, captured"] * ("tried, and it captured" in e.description)
    notes += ["ND weights, TransData in every call"] * any(c[1]["transdata"] for c in calls)
    return "runs" + "".join(f" ({n})" for n in notes)


def npu_matrix(chips=tuple(CHIP_DTYPE)) -> dict:
    """{chip: {engine: {method: "runs" | "unsupported: why"}}} on the fake torch_npu, batch 4."""
    from llmbench.measure import ceilings
    from llmbench.system import device
    from llmbench.experiments import latency
    from llmbench.model import models
    from llmbench.experiments import quantization as quant_study
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        place = lambda kind: "cpu" if kind in ("cpu", "npu") else f"{kind}:0"  # noqa: E731
        for m in (device, ceilings, engine_compiled, latency, models, quant_study):
            mp.setattr(m, "torch_device", place)
        for chip in chips:
            out[chip] = {n: {m: run_point(mp, chip, m, n) for m in METHODS} for n in ENGINES}
    return out


def format_matrix(matrix: dict) -> str:
    lines = []
    for chip, engines in matrix.items():
        for name, methods in engines.items():
            for method, what in methods.items():
                lines.append(f"{chip:15s} {CHIP_DTYPE[chip]:4s} {method:6s} {name:8s} {what}")
    return "\n".join(lines)


# --- 1. x layout: the quantized matmul takes x contiguous or transposed; batch 4 end to end -------------------

def test_fake_refuses_a_strided_x(monkeypatch):
    """aclnnWeightQuantBatchMatmulV2 ContiguousCheck (hicann ops-nn): x contiguous or a transpose of its last two
    dims. The LM head's input at batch > 1 is hidden[:, -1], a strided view."""
    _, mod = fake_torch_npu(monkeypatch)
    w, s = torch.zeros(64, 256, dtype=torch.int8).t(), torch.ones(64, dtype=torch.float16)
    hidden = torch.randn(4, 6, 256, dtype=torch.float16)
    with pytest.raises(NpuKernelError, match="only support x tensor is contiguous or transpose last two dims"):
        mod.npu_weight_quant_batchmatmul(hidden[:, -1], w, s)
    assert mod.npu_weight_quant_batchmatmul(hidden[:, -1].contiguous(), w, s).shape == (4, 64)
    assert mod.npu_weight_quant_batchmatmul(torch.randn(256, 4, dtype=torch.float16).t(), w, s).shape == (4, 64)
    lin = torch.nn.Linear(256, 64, bias=False).half()
    y = quant_npu.NpuW8A16Linear(lin)(hidden[:, -1])  # the layer hands the kernel a contiguous x
    assert y.shape == (4, 64) and mod.op_calls[-1][1]["x"] == ((4, 256), torch.float16)


@pytest.mark.parametrize("chip", list(CHIP_DTYPE))
def test_batch4_end_to_end_per_chip(monkeypatch, npu_on_cpu, chip):
    """Both engines, every method, a batch-4 prefill and decode steps on the fake chip: runs, or is refused with
    the documented reason; a compiled engine's captured graphs give the greedy tokens of its module run eagerly."""
    got = {n: {m: run_point(monkeypatch, chip, m, n) for m in METHODS} for n in ENGINES}
    print("\n" + format_matrix({chip: got}))
    for name in ENGINES:
        for method in METHODS:
            want, what = EXPECTED[chip][name][method], got[name][method]
            assert what.startswith("runs") if want == "runs" else (what.startswith("unsupported:") and want in what), \
                (chip, name, method, what)


# --- 2. task queue: set explicitly, recorded from torch.npu; capture refuses mode 2 ---------------------------

def test_npu_grids_set_the_task_queue_and_310p_910a_run_fp16(tmp_path):
    import yaml
    from llmbench.core.errors import UserError
    from llmbench.orchestration.grid import load_grid
    for name in ("npu", "npu_fp16"):
        # every notebook that runs torch on the NPU; 04_serving's llama-server has no torch_npu dispatch queue
        points = [p for p in load_grid(ROOT / f"data/grids/{name}.yaml")["points"]
                  if p["notebook"] not in ("00_device", "04_serving")]
        assert points and all(p["params"]["task_queue"] == 2 for p in points)
    fp16 = load_grid(ROOT / "data/grids/npu_fp16.yaml")["points"]
    assert {p["params"]["dtype"] for p in fp16 if "dtype" in p["params"]} == {"fp16"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "params": {"device": ["npu"], "task_queue": [3]},
                                   "notebooks": {"01_latency": None}}))
    with pytest.raises(UserError, match=r"task_queue: unknown value 3; valid: 0, 1, 2"):
        load_grid(bad)


def test_eager_sets_the_grid_task_queue_where_ipykernel_left_0(monkeypatch, npu_on_cpu):
    import types
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # papermill's kernel
    npu, _ = fake_torch_npu(monkeypatch)
    assert npu.get_task_queue_enable() == 0  # what torch_npu leaves under ipykernel
    e = _load("eager", "Ascend910B2", "none", task_queue=2)
    assert npu.get_task_queue_enable() == 2 and "task queue mode 2 (torch.npu.get_task_queue_enable)" in e.description
    e = _load("eager", "Ascend910B2", "none", task_queue=0)
    assert npu.get_task_queue_enable() == 0 and "task queue mode 0" in e.description
    from llmbench.system import device
    with pytest.raises(device.UserError, match="valid: 0, 1, 2"):
        device.set_task_queue(3)


def test_graph_capture_refuses_mode_2_and_compiled_captures_at_1(monkeypatch, npu_on_cpu):
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "2")  # the documented inference setting, read at import
    npu, _ = fake_torch_npu(monkeypatch)
    assert npu.get_task_queue_enable() == 2
    with pytest.raises(RuntimeError, match="Do not support TASK_QUEUE_ENABLE = 2 during NPU graph capture"):
        with npu.graph(npu.NPUGraph()):
            pass
    torch._dynamo.reset()
    e = _load("compiled", "Ascend910B2", "none")
    assert npu.get_task_queue_enable() == 1 and "task queue mode 1" in e.description
    assert "NPUGraph.capture_begin" in npu.names()


# --- 6. graph recaptures: the cache is allocated once; a recapture shows in compile_count ----------------------

def test_no_recapture_after_logits_or_a_smaller_batch_and_recaptures_are_counted(monkeypatch, npu_on_cpu):
    from torch._dynamo.utils import counters
    npu, _ = fake_torch_npu(monkeypatch)
    torch._dynamo.reset()
    e = _load("compiled", "Ascend910B2", "none", max_batch=4)
    ids = torch.arange(20).reshape(4, 5) * 11 % e.cfg.vocab_size
    _greedy(e, ids, 2)
    _greedy(e, ids[:2], 2)  # a smaller batch: new shapes, captured once, on the same cache
    engine.logits(e, ids)   # fidelity's all-position logits
    before, captures = engine_compiled.compile_count(e), npu.names().count("npugraph_ex.capture")
    _greedy(e, ids, 2)      # shapes captured before: replayed, not recaptured
    assert not [k for k in counters["npugraph_ex"] if k.startswith("recapture_")], dict(counters["npugraph_ex"])
    assert engine_compiled.compile_count(e) == before and npu.names().count("npugraph_ex.capture") == captures
    # A new cache (same shapes, new addresses) makes npugraph_ex recapture every graph that mutates it: counted.
    for layer in e.model.layers:
        c = layer.self_attn.cache
        layer.self_attn.cache = type(c)(*c.k.shape[:1], c.k.shape[2], c.k.shape[1], c.k.shape[3], c.k.dtype, c.k.device)
    _greedy(e, ids, 1)
    assert sum(v for k, v in counters["npugraph_ex"].items() if k.startswith("recapture_")) >= 2  # prefill, decode
    assert engine_compiled.compile_count(e) >= before + 2


# --- 8. graph mode on chips whose docs do not list it: tried, and recorded ---------------------------------------

def test_graph_mode_is_tried_on_310p_and_a_failed_capture_is_recorded(monkeypatch, npu_on_cpu):
    npu, _ = fake_torch_npu(monkeypatch, chip="Ascend310P3")
    torch._dynamo.reset()
    e = _load("compiled", "Ascend310P3", "w8a16")
    assert "Ascend310P3: npugraph_ex graph mode is documented for Atlas A2/A3" in e.description
    assert "tried, and it captured" in e.description and "npugraph_ex.capture" in npu.names()

    def aclop(self, *a, **k):  # what torch_npu says when an operator has no aclnn kernel to capture
        raise RuntimeError("Cannot run aclop operators during NPU graph capture. Current working aclop is TransData.")
    monkeypatch.setattr(type(npu.NPUGraph()), "capture_begin", aclop)
    torch._dynamo.reset()
    with pytest.raises(Unsupported, match="torch.compile of the w8a16 decode step failed on npu: .*Cannot run aclop"):
        _load("compiled", "Ascend310P3", "w8a16")


# --- 4. 310P weight format: FRACTAL_NZ once at load, or a TransData in every call, said in the record ------------

@pytest.mark.parametrize("nz_single_op", [False, True])
def test_310p_weight_format_is_tagged(monkeypatch, npu_on_cpu, nz_single_op):
    _, mod = fake_torch_npu(monkeypatch, chip="Ascend310P3", nz_single_op=nz_single_op)
    layer = quant_npu.NpuW8A16Linear(torch.nn.Linear(64, 128, bias=False).half())
    layer(torch.randn(3, 64, dtype=torch.float16))
    call = mod.op_calls[-1][1]
    assert call["weight_format"] == ("FRACTAL_NZ" if nz_single_op else "ND") and call["transdata"] != nz_single_op
    assert ("cast to FRACTAL_NZ once at load" if nz_single_op else "TransData of the weight") in layer.layout
    e = _load("eager", "Ascend310P3", "w8a16")
    head = e.model.lm_head
    del mod.op_calls[:]
    _greedy(e, torch.arange(8).reshape(4, 2), 1)
    calls = [c[1] for c in mod.op_calls if c[0] == "npu_weight_quant_batchmatmul"]
    assert calls and {c["weight_format"] for c in calls} == {"FRACTAL_NZ" if nz_single_op else "ND"}
    assert mod.get_npu_format(head.weight0) == (29 if nz_single_op else 2)
    if nz_single_op:
        assert "310P: int8 weights cast to FRACTAL_NZ once at load" in e.description
        assert not any(c["transdata"] for c in calls)
    else:
        assert all(c["transdata"] for c in calls)
        assert "every call includes an ND -> FRACTAL_NZ TransData" in e.description
        assert "graph mode only, not as a single op" in e.description  # what the probe was told
    _, mod = fake_torch_npu(monkeypatch, chip="Ascend910B2")
    lin = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    assert quant_npu.NpuW8A16Linear(lin).layout == ""  # A2 keeps ND weights: the kernel takes them as they are
    assert not any(c[0] == "npu_format_cast" for c in mod.op_calls)


# --- 3. torch-npu's autoload entry point without CANN: llmbench still starts ------------------------------------

def test_detect_survives_an_autoload_backend_that_raises(tmp_path):
    """torch-npu registers [torch.backends] torch_npu = torch_npu:_autoload; where CANN is not sourced, loading
    it raises, and torch re-raises from `import torch` unless TORCH_DEVICE_BACKEND_AUTOLOAD=0."""
    (tmp_path / "fake_npu_backend.py").write_text(
        'raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")\n')
    info = tmp_path / "fake_npu_backend-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-npu-backend\nVersion: 2.13.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\nfake_npu = fake_npu_backend:_autoload\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_DEVICE_BACKEND_AUTOLOAD", "LLMBENCH_DEVICE")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT / "lib")])
    bare = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "Failed to load the backend extension: fake_npu" in bare.stderr  # the hazard
    r = subprocess.run([sys.executable, "-m", "llmbench.cli", "detect"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0 and r.stdout.strip() == "cpu", r.stderr[-2000:]


# --- 5. npu-smi's ids: a 310P server numbers its card 224, with two chips -----------------------------------------

MAP_310P = ("\tNPU ID                         Chip ID                        Chip Logic ID                  Chip Name\n"
            "\t224                            0                              0                              Ascend 310P3\n"
            "\t224                            1                              1                              Ascend 310P3\n"
            "\t224                            2                              -                              Mcu\n")
PROCESSES = ("| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |\n"
             "| 224     0                 | 111           | other                    | 3000                    |\n"
             "| 224     1                 | 222           | python                   | 2000                    |\n")


def fake_npu_smi_310p(tmp_path, monkeypatch):
    """An npu-smi that knows one card, NPU ID 224 with chips 0 and 1: only `-i 224` answers."""
    d = tmp_path / "bin"
    d.mkdir()
    (tmp_path / "map.txt").write_text(MAP_310P)
    (tmp_path / "procs.txt").write_text(PROCESSES)
    exe = d / "npu-smi"
    exe.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/args.txt
case "$*" in
  "info -m") cat {tmp_path}/map.txt ;;
  "info") cat {tmp_path}/procs.txt ;;
  "info -t power -i 224"|"info -t power -i 224 -c 0"|"info -t power -i 224 -c 1")
     printf '\\t%-30s : %.1f\\n' 'NPU Real-time Power(W)' 31.5 ;;
  *) echo "Error: the input parameter is invalid: $*" >&2; exit 1 ;;
esac
""")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("LLMBENCH_NPU_SMI_ID", raising=False)
    return tmp_path / "args.txt"


def test_npu_smi_power_and_processes_use_npu_smi_ids(tmp_path, monkeypatch):
    from llmbench.system import energy
    from llmbench.system import noise
    args = fake_npu_smi_310p(tmp_path, monkeypatch)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1")  # logical device 1: NPU 224, chip 1
    r, _ = energy.measure("npu", lambda: time.sleep(0.02), min_seconds=0.3, interval_s=0.05,
                          sync=lambda: None)
    assert r.status == "ok", r.status
    assert r.method.startswith("npu-smi info -t power -i 224 -c 1 sampled") and "NPU 224 chip 1" in r.method
    assert r.joules == pytest.approx(31.5 * r.seconds, rel=1e-9)
    assert "info -t power -i 224 -c 1" in args.read_text().splitlines()
    others, _, how = noise.device_others("npu")
    assert others == ["pid 222 python (2000 MB)"] and "NPU 224 chip 1" in how  # chip 0's process is not ours
    monkeypatch.setenv("LLMBENCH_NPU_SMI_ID", "224:0")
    assert noise.device_others("npu")[0] == ["pid 111 other (3000 MB)"]
    monkeypatch.delenv("LLMBENCH_NPU_SMI_ID")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "5")  # no such chip: unreadable, never another card's power
    r, calls = energy.measure("npu", lambda: None, min_seconds=0.1, sync=lambda: None)
    assert r.status.startswith("unsupported: no readable energy counter (no npu-smi NPU ID for this device: ")
    assert "LLMBENCH_NPU_SMI_ID" in r.status and calls == 0
    assert noise.device_others("npu")[0] is None


def test_npu_smi_map_parsing():
    from llmbench.system import npu_smi
    assert npu_smi.parse_map(MAP_310P) == {0: (224, 0), 1: (224, 1)}
    a3 = "NPU ID  Chip ID  Chip Logic ID  Chip Phy-ID Chip Name\n0 0 0 0 Ascend\n0 1 1 1 Ascend\n0 2 - - Mcu\n"
    assert npu_smi.parse_map(a3) == {0: (0, 0), 1: (0, 1)}


# --- 10. CANN version files ---------------------------------------------------------------------------------

def test_cann_version_from_toolkit_files(tmp_path, monkeypatch):
    from llmbench.system import device
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path))
    (tmp_path / "version.cfg").write_text("# version: 1.0\nruntime_running_version=[7.5.0.1.129:8.0.RC3]\n"
                                          "toolkit_running_version=[7.5.0.1.129:8.0.RC3]\n")
    assert device._ascend_versions()["cann"] == "8.0.RC3"  # not the component build 7.5.0.1.129
    (tmp_path / "x86_64-linux").mkdir()
    (tmp_path / "x86_64-linux/ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\ninnerversion=V100R001C20SPC001B220\nversion=8.0.0\narch=x86_64\n")
    assert device._ascend_versions()["cann"] == "8.0.0"


if __name__ == "__main__":
    print(format_matrix(npu_matrix()))
