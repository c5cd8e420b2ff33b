"""llama.cpp as a peer engine: the GGUF it runs holds the torch weights, and it computes the same model."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from llmbench import engines as engine
from llmbench.engines import llamacpp as engine_llamacpp
from llmbench.model import gguf_export
from llmbench.model.rope import rope_freqs
from llmbench.system import llamacpp_build
from llmbench.engines import LoadRequest
from llmbench.model.models import load_model
from llmbench.core.errors import Unsupported

from conftest import ROOT


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path_factory, monkeypatch):
    """GGUF files of the tiny models, shared by this module's tests, away from data/cache."""
    monkeypatch.setattr(gguf_export, "CACHE", tmp_path_factory.getbasetemp() / "gguf")


def eager(model, dtype="fp32"):
    m, _ = load_model(model, "synthetic", dtype, "cpu", 0)
    return m


def load(model, dtype="fp32", quant="none", batch=2, seq=64):
    return engine.load(LoadRequest("llamacpp", model, "synthetic", dtype, quant, "cpu", max_batch=batch, max_seq=seq,
                                   tokens="random"))


def ids(batch, n, vocab, seed=1):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_permute_interleaves_the_rotate_half_halves_per_head():
    rows = torch.arange(8.0).view(8, 1)  # two heads of four rows: halves (0,1)(2,3) -> pairs (0,2)(1,3)
    assert gguf_export.permute(rows, 2).view(-1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("model", ["tiny-1b", "llama-3.2-1b"])
def test_rope_freqs_are_transformers_llama3_scaling(model):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from llmbench.model.models import head_dim, load_config
    cfg = load_config(model)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim, base = head_dim(cfg), cfg.rope_parameters["rope_theta"]
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    np.testing.assert_allclose(rope_freqs(cfg), (plain / scaled).numpy(), rtol=1e-5)


def test_gguf_holds_the_torch_weights_and_is_cached():
    import gguf
    f = gguf_export.export("tiny-1b", "synthetic", 0, "F32")
    r = gguf.GGUFReader(f.path)
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    sd = eager("tiny-1b").state_dict()
    assert "output.weight" not in t  # tied head: llama.cpp reads token_embd
    np.testing.assert_array_equal(t["token_embd.weight"], sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(t["blk.1.attn_k.weight"],
                                  gguf_export.permute(sd["model.layers.1.self_attn.k_proj.weight"], 2).numpy())
    np.testing.assert_array_equal(t["blk.1.ffn_down.weight"], sd["model.layers.1.mlp.down_proj.weight"].numpy())
    assert sum(f.tensor_bytes.values()) == sum(x.n_bytes for x in r.tensors)
    again = gguf_export.export("tiny-1b", "synthetic", 0, "F32")
    assert again.cached and again.path == f.path and again.export_s == 0.0
    assert gguf_export.export("tiny-1b", "synthetic", 1, "F32").path != f.path  # another seed, another file


@pytest.mark.parametrize("model", ["tiny-1b", "tiny-3b"])
def test_f32_logits_match_eager_fp32(model):
    m = eager(model)
    e = load(model)
    x = ids(2, 24, m.config.vocab_size)
    with torch.no_grad():
        ref = m(x).logits.float()
    got = engine.logits(e, x)
    assert got.shape == ref.shape
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, f"relative logit error {err:.2e}"  # fp32 throughout: ~3e-7 measured
    engine_llamacpp.close(e)


@pytest.mark.parametrize("model", ["tiny-1b", "tiny-3b"])
def test_greedy_tokens_agree_for_16_steps(model):
    m = eager(model)
    e = load(model, batch=1)
    x = ids(1, 12, m.config.vocab_size, seed=2)
    with torch.no_grad():
        ref = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    got = engine.generate(e, x, 16)
    assert got.tolist() == ref.tolist()
    engine_llamacpp.close(e)


def test_sequences_in_one_batch_decode_as_they_do_alone():
    e = load("tiny-1b", batch=3)
    x = ids(3, 10, 512, seed=3)
    together = engine.generate(e, x, 8)
    alone = torch.cat([engine.generate(e, x[i:i + 1], 8) for i in range(3)])
    assert together.tolist() == alone.tolist()
    state, tok = engine.prefill(e, x)  # prefill + decode steps are the generate path
    assert state.pos == 10 and tok.tolist() == together[:, 10:11].tolist()
    state, tok = engine.decode(e, state, tok)
    assert state.pos == 11 and tok.tolist() == together[:, 11:12].tolist()
    engine.release(e, state)
    engine_llamacpp.close(e)


@pytest.mark.parametrize("dtype,quant,gtype,tol", [("fp16", "none", "F16", 2e-3), ("bf16", "none", "BF16", 2e-2),
                                                   ("fp32", "w8a8", "Q8_0", 2e-2), ("fp32", "w4a16", "Q4_0", 0.2)])
def test_other_types_run_near_the_torch_model_of_their_dtype(dtype, quant, gtype, tol):
    m = eager("tiny-1b", dtype)  # 16-bit synthetic weights are their own draws, not rounded fp32 ones
    e = load("tiny-1b", dtype, quant, batch=1)
    assert e.extra["gguf_type"] == gtype and gtype in e.description
    x = ids(1, 16, 512)
    with torch.no_grad():
        ref = m(x).logits.float()
    err = (engine.logits(e, x) - ref).abs().max() / ref.abs().max()
    assert 0 < err < tol, f"{gtype}: relative logit error {err:.2e}"
    f32 = gguf_export.export("tiny-1b", "synthetic", 0, "F32")
    assert e.weight_bytes < sum(f32.tensor_bytes.values())
    engine_llamacpp.close(e)


def test_types_map_honestly_or_are_unsupported():
    assert engine_llamacpp.gguf_type("bf16", "none", "cpu") == "BF16"
    assert engine_llamacpp.gguf_type("fp32", "w8a8", "cpu") == "Q8_0"
    assert engine_llamacpp.compute_dtype("Q8_0", "fp32", "cpu") == "int8"
    assert engine_llamacpp.gguf_type("fp16", "w8a16", "npu") == "Q8_0"
    assert engine_llamacpp.compute_dtype("Q8_0", "fp16", "npu") == "fp16"
    with pytest.raises(Unsupported, match="w8a8"):
        engine_llamacpp.gguf_type("fp32", "w8a16", "cpu")
    with pytest.raises(Unsupported, match="w8a16"):
        engine_llamacpp.gguf_type("fp16", "w8a8", "npu")


def test_a_backend_the_build_lacks_is_unsupported():
    info = engine_llamacpp.build_info()
    if "CANN" in " ".join(info.get("cmake_args") or []) or "CANN :" in info["system_info"]:
        pytest.skip("this build has CANN")
    with pytest.raises(Unsupported, match="no CANN backend"):
        engine.load(LoadRequest("llamacpp", "tiny-1b", "synthetic", "fp16", "none", "npu", tokens="random"))


def test_build_cache_key_and_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_WHEEL_CACHE", str(tmp_path))
    a = llamacpp_build.cache_dir("0.3.36", ["-DGGML_NATIVE=ON"])
    assert a == llamacpp_build.cache_dir("0.3.36", ["-DGGML_NATIVE=ON"]) and a.parent == tmp_path
    assert a != llamacpp_build.cache_dir("0.3.36", ["-DGGML_NATIVE=ON", "-DGGML_CUDA=ON"])
    assert a != llamacpp_build.cache_dir("0.3.37", ["-DGGML_NATIVE=ON"])
    log = b"## [Unreleased]\n\n## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n" \
          b"## [0.3.35]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n"
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        ti = tarfile.TarInfo("llama_cpp_python-0.3.36/CHANGELOG.md")
        ti.size = len(log)
        tar.addfile(ti, io.BytesIO(log))
    assert llamacpp_build.llama_cpp_commit(sdist) == "0c1e57098"
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest")
    assert "-DGGML_CANN=ON" in llamacpp_build.cmake_args()
    # llama.cpp#20824: AMX CPUs build without ggml's AMX matmul, others as they are
    xeon, epyc = "Intel Xeon | fpu avx512f amx_bf16 amx_tile amx_int8", "AMD EPYC | fpu avx2 avx512f avx512_vnni"
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-int8" in llamacpp_build.cmake_args(cpu=xeon)
    assert not any("amx" in a for a in llamacpp_build.cmake_args(cpu=epyc))


def test_installed_build_is_the_pinned_one():
    import llama_cpp
    assert llamacpp_build.pins()["llama-cpp-python"] == llama_cpp.__version__
    info = json.loads(llamacpp_build.BUILD_INFO.read_text())
    assert info["llama_cpp_python"] == llama_cpp.__version__ and "-DGGML_NATIVE=ON" in info["cmake_args"]
    if "amx_int8" in llamacpp_build.cpu_id().split():  # llama.cpp#20824: its AMX matmul must not be in
        assert "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode()


def test_peer_names_the_type_and_backend_of_a_crash():
    """A segfault in the child (here a real one, after the engine's phase line) costs one figure, with its reason."""
    import subprocess
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peer
    crash = ("from llmbench.engines import llamacpp as L; import ctypes, faulthandler; faulthandler.enable(); "
             "L.say('llama-3.2-1b Q8_0 on CPU', 'first decode'); ctypes.string_at(0)")
    p = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120)
    why = peer.failure(p.returncode, p.stderr)
    assert why.startswith("failed: killed by SIGSEGV; llmbench llamacpp: llama-3.2-1b Q8_0 on CPU: first decode")
    assert "Fatal Python error: Segmentation fault" in why
    # the same crash in a served child: the parent's wait for its READY line ends with that reason
    import tempfile
    err = tempfile.TemporaryFile(mode="w+")
    child = subprocess.Popen([sys.executable, "-c", crash], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                             text=True)
    h = peer.handle(child, err)
    assert peer.reply(h, "READY", 120) is None and h["status"] == why
    peer.steps(h, 3, 5)  # a dead side is asked for nothing and keeps its reason
    assert h["blocks"] == [] and h["status"] == why
    peer.stop(h)
    dynamo = "Traceback (most recent call last):\n  File x\ntorch._dynamo.exc.Unsupported: call_method foo\n\nSet TORCHDYNAMO_VERBOSE=1"
    assert peer.failure(1, dynamo) == "failed: exit status 1; torch._dynamo.exc.Unsupported: call_method foo"


def test_peer_reads_a_line_that_came_in_the_same_write_as_another():
    """Two lines in one write land in one buffer: the second must still be read, not waited for."""
    import subprocess
    import sys
    import tempfile
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peer
    two = ('import json, sys, time; sys.stdout.write("noise\\n" + "READY " + json.dumps({"status": "ok"}) + "\\n"); '
           'sys.stdout.flush(); time.sleep(30)')
    child = subprocess.Popen([sys.executable, "-c", two], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=tempfile.TemporaryFile(mode="w+"), text=True)
    h = peer.handle(child, tempfile.TemporaryFile(mode="w+"))
    try:
        assert peer.reply(h, "READY", 10) == {"status": "ok"}
    finally:
        child.kill()
        child.wait()


def test_memory_is_rss_on_cpu_and_the_device_count_elsewhere(fake_npu):
    e = load("tiny-1b", batch=1)
    assert engine_llamacpp.memory(e) is None  # the experiments' process peak RSS covers it
    e.kind = "npu"  # the fake NPU answers mem_get_info with 60 of 64 GiB free
    used, what = engine_llamacpp.memory(e)
    assert used == 4 * 2**30 and "mem_get_info" in what
    engine_llamacpp.close(e)


def test_real_safetensors_weights_export_the_same_tensors(tmp_path):
    """The user's safetensors path: a saved model exports the tensors it holds, cached under its own key."""
    import gguf
    m = eager("tiny-1b")
    m.save_pretrained(tmp_path / "w", safe_serialization=True)
    real = gguf_export.export("tiny-1b", str(tmp_path / "w"), 0, "F32")
    synth = gguf_export.export("tiny-1b", "synthetic", 0, "F32")
    assert real.path != synth.path and "real-" in real.path.name
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(real.path).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(synth.path).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
