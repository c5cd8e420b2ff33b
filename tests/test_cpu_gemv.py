"""The C decode kernel: products equal torch's on awkward shapes, in graphs too; bad inputs are refused;
a machine without a compiler gets the inductor path, and the engine says which path it used."""
import pytest
import torch

from llmbench.model.quant import cpu_gemv
from llmbench import engines as engine
from llmbench.engines import compiled as engine_compiled
from llmbench.core.errors import Unsupported


@pytest.fixture(params=["C", "AMX", "aten"])
def path(request, monkeypatch):
    """Each kernel test runs every path _tune may choose (the C kernel, its AMX path, aten's linear),
    whichever this machine chose; a kernel without that path keeps C."""
    lib = cpu_gemv.library()
    if request.param == "AMX" and not lib.amx:
        pytest.skip("this CPU, build or OS has no AMX-BF16 tiles")
    for kernel in cpu_gemv.KERNELS:
        p = request.param if request.param in cpu_gemv.candidates(lib, kernel) else "C"
        monkeypatch.setitem(lib.tuned, kernel, {"path": p, "time_vs_C": {}})
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (1, 13, 96), (3, 37, 40), (16, 130, 2048), (2, 9, 7), (1, 37, 256),
                                   (5, 48, 96)])
def test_gemv_equals_matmul(dtype, m, n, k, path):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    y = torch.ops.llmbench.gemv(x, w)
    ref = x.float() @ w.float().t()
    assert y.shape == (m, n) and y.dtype == dtype
    if dtype == torch.float32:  # summation order only
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5
    else:  # the fp32 sum rounded to nearest bf16: within half a bf16 step, plus fp32 summation order
        _, e = torch.frexp(ref)
        half_step = torch.ldexp(torch.ones_like(ref), e - 9)
        assert bool(((y.float() - ref).abs() <= half_step + 1e-5 * ref.abs().max()).all())


def test_a_measured_choice_is_kept_only_where_it_beats_the_noise_margin():
    assert cpu_gemv.pick({0: [1.0, 1.1, 1.0], 1024: [0.9, 0.9, 0.95]}) == 1024
    assert cpu_gemv.pick({0: [1.0, 1.0, 1.0], 1024: [0.98, 0.99, 0.98]}) == 0  # within 3%: noise
    assert cpu_gemv.pick({0: [1.0, 1.0, 1.0], 1024: [1.2, 1.1, 1.3]}) == 0
    assert cpu_gemv.pick({"C": [1.0, 1.0], "aten": [0.9, 0.9]}, "C") == "aten"
    lib = cpu_gemv.library()
    tuned = lib.tuned  # measured once per library, and said in the engine's description
    assert set(tuned) == set(cpu_gemv.KERNELS) and tuned["int8"]["path"] == "C"
    for kernel, c in tuned.items():
        assert c["path"] in cpu_gemv.candidates(lib, kernel)
        assert set(c["time_vs_C"]) == set(cpu_gemv.candidates(lib, kernel)) - {"C"}
    assert "measured here on 1B's linears" in cpu_gemv.paths()


def test_the_kernel_paths_follow_the_cpu_flags():
    flags = set(open("/proc/cpuinfo").read().split()) if __import__("os").path.exists("/proc/cpuinfo") else set()
    paths = cpu_gemv.paths()
    assert ("AVX512-BF16" in paths) == ("avx512_bf16" in flags)
    if "AMX tiles" in paths or cpu_gemv.library().amx:  # a compiler without -mamx-bf16 builds no AMX path
        assert "amx_bf16" in flags
    assert ("AVX512-VNNI" in paths) == ("avx512_vnni" in flags)


def test_gemv_keeps_leading_dims_and_works_inside_a_compiled_graph():
    x, w = torch.randn(2, 1, 64), torch.randn(48, 64)
    f = torch.compile(lambda x, w: torch.ops.llmbench.gemv(x, w).relu(), fullgraph=True, dynamic=False)
    out = f(x, w)
    assert out.shape == (2, 1, 48)
    assert torch.allclose(out, (x @ w.t()).relu(), atol=1e-5)


def test_gemv_refuses_mismatched_shapes_before_reading_past_a_buffer():
    with pytest.raises(ValueError, match=r"x \(1, 8\).*w \(4, 16\)"):
        torch.ops.llmbench.gemv(torch.randn(1, 8), torch.randn(4, 16))
    q = cpu_gemv.W8A8Linear(torch.nn.Linear(16, 4, bias=False))
    with pytest.raises(ValueError, match="scale"):
        torch.ops.llmbench.gemv_w8a8(torch.randn(1, 16), q.weight, q.scale[:2], q.wsum)


def test_gemv_refuses_mixed_or_unsupported_dtypes():
    with pytest.raises(ValueError, match="fp32 or bf16"):
        torch.ops.llmbench.gemv(torch.randn(1, 8), torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="fp32 or bf16"):
        torch.ops.llmbench.gemv(torch.randn(1, 8).half(), torch.randn(4, 8).half())


def test_read_probe_sums_what_it_reads():
    x = torch.rand(100_003)  # whole blocks, then a tail
    for streams in cpu_gemv.READ_STREAMS:
        assert cpu_gemv.read_f32(x, streams) == pytest.approx(float(x.double().sum()), rel=1e-4)
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_gemv.read_f32(x[::2])
    with pytest.raises(ValueError, match="streams must be one of"):
        cpu_gemv.read_f32(x, 3)


def test_without_a_compiler_the_engine_uses_inductor_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LLMBENCH_KERNEL_CACHE", str(tmp_path))
    cpu_gemv.library.cache_clear()
    try:
        with pytest.raises(Unsupported, match="needs a C compiler"):
            cpu_gemv.library()
        fn, rows, how = engine_compiled._cpu_linear_path()
        assert fn is engine_compiled._reduce_linear and rows == 1 and "C gemv unavailable" in how
    finally:
        monkeypatch.undo()
        cpu_gemv.library.cache_clear()
    e = engine.load(engine.LoadRequest(engine="compiled", model="tiny-1b", weights="synthetic", dtype="fp32",
                                       quant="none", kind="cpu", max_batch=1, max_seq=16, tokens="random"))
    assert "C gemv (" in e.description  # with the compiler back, the kernel path is named


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (3, 19, 40), (16, 24, 256), (2, 37, 512), (1, 5, 1024)])
def test_w8a8_is_the_integer_product_of_per_token_and_per_channel_int8(m, n, k, monkeypatch, path):
    monkeypatch.setattr(cpu_gemv, "PREFILL_ROWS", 7)  # the many-row path in slices, the last one ragged
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    lin = torch.nn.Linear(k, n, bias=False)
    q = cpu_gemv.W8A8Linear(lin)
    y = q(x)  # the C kernel (rows <= MAX_ROWS)
    sx = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / sx).clamp(-127, 127).to(torch.int64)
    ref = (xq @ q.weight.to(torch.int64).t()).double() * sx.double() * q.scale.double()
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)
    # the many-row path (a CPU prefill) computes the same product
    many = q(x.repeat(cpu_gemv.MAX_ROWS + 1, 1))[:m]
    assert torch.allclose(many.double(), ref, rtol=1e-5, atol=1e-6)
    # and both stay close to the float layer they replace
    assert float((y - lin(x)).abs().max() / lin(x).abs().max()) < 0.05


def test_compiled_w8a8_on_cpu_runs_the_c_kernel_and_agrees_with_its_own_eager_logits():
    e = engine.load(engine.LoadRequest(engine="compiled", model="tiny-1b", weights="synthetic", dtype="fp32",
                                       quant="w8a8", kind="cpu", max_batch=1, max_seq=24, tokens="random"))
    assert "gemv_w8a8" in e.description and e.replaced and e.read_bytes < e.weight_bytes
    ids = torch.randint(0, e.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    out = engine.generate(e, ids, 8)
    # each greedy token is the argmax of the module's own logits at that prefix, run without compiling
    lg = engine.logits(e, out[:, :-1])
    assert torch.equal(lg[:, 7:].argmax(-1), out[:, 8:])


def test_compiled_w8a8_refuses_16_bit_activations():
    with pytest.raises(Unsupported, match="fp32 activations"):
        engine.load(engine.LoadRequest(engine="compiled", model="tiny-1b", weights="synthetic", dtype="bf16",
                                       quant="w8a8", kind="cpu", max_batch=1, max_seq=24, tokens="random"))


def test_the_kernel_leaves_torchs_own_matmul_as_it_found_it(path):
    """The AMX path loads its own tile configuration in each thread and restores the one it found:
    oneDNN's bf16 matmul (AMX too, on such CPUs) gives the same result after it as before."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 512, generator=g).bfloat16(), torch.randn(512, 256, generator=g).bfloat16()
    before = a @ b
    torch.ops.llmbench.gemv(torch.randn(2, 512, generator=g).bfloat16(), torch.randn(64, 512, generator=g).bfloat16())
    assert torch.equal(a @ b, before)
