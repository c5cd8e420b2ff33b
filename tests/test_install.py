"""make setup SYSTEM_PACKAGES=1 / WHEELHOUSE=..., make wheelhouse: what lib/llmbench/system/install.py decides."""
import sys
from pathlib import Path

import pytest

from llmbench import engines as engine
from llmbench.system import install
from llmbench.system import llamacpp_build
from llmbench.engines import LoadRequest
from llmbench.system.install import InstallError, Requirement
from llmbench.core.errors import Unsupported


def pins(*specs):
    return [Requirement(s) for s in specs]


def test_declared_oldest_versions():
    r = install.ranges()
    # the versions of the GPU image the study ran on (torch 2.11.0+cu130, transformers 5.17.0): the oldest allowed
    assert str(r["torch"]) == ">=2.11" and str(r["transformers"]) == ">=5.17" and str(r["torch-npu"]) == ">=2.11"
    assert "2.10.9" not in r["torch"] and "5.16.0" not in r["transformers"]
    assert install.oldest("torch", "transformers") == ["torch==2.11", "transformers==5.17"]  # what .ci/oldest runs on


def test_plan_keeps_what_is_inside_the_range_and_installs_the_rest():
    want = install.ranges()
    todo, kept, errors = install.plan(
        pins("torch==2.13.0", "transformers==5.24.0", "papermill==2.7.0", "pandas==3.1.1", "numpy==2.4.6"),
        {"torch": "2.11.0a0+ecf3bae40a", "transformers": "5.17.0", "pandas": "1.5.3", "numpy": "1.26.4"}, want)
    assert not errors
    # numpy has no range: the system's stays; NVIDIA's container torch (2.11.0a0+commit) is a 2.11
    assert {n for n, _, _ in kept} == {"torch", "transformers", "numpy"}
    assert install.in_range("2.11.0+cu130", want["torch"]) and not install.in_range("2.10.1", want["torch"])
    assert [str(r) for r in todo] == ["papermill==2.7.0", "pandas==3.1.1"]  # missing; pandas 1.5 is below >=2


def test_a_held_package_outside_its_range_is_one_error_naming_both():
    _, _, errors = install.plan(pins("torch==2.13.0", "transformers==5.24.0", "tqdm==4.70.1"),
                                {"torch": "2.9.1", "transformers": "5.17.0", "tqdm": "4.0"}, install.ranges())
    assert len(errors) == 1 and "torch 2.9.1" in errors[0] and "torch>=2.11" in errors[0]


class FakeDist:
    def __init__(self, name, version, where):
        self.metadata, self.version, self.where = {"Name": name}, version, where

    def locate_file(self, path):
        return Path(self.where) / path


def test_install_holds_the_installed_stack_with_constraints(monkeypatch, tmp_path):
    system = tmp_path / "usr" / "lib" / "python3" / "site-packages"
    dists = {"torch": FakeDist("torch", "2.11.0+cu130", system), "triton": FakeDist("triton", "3.6.0", system),
             "transformers": FakeDist("transformers", "5.17.0", system)}
    monkeypatch.setattr(install, "installed", lambda: dists)
    calls = []
    monkeypatch.setattr(install, "pip", lambda *a: calls.append((a, Path(a[a.index("-c") + 1]).read_text())))
    (tmp_path / "req.txt").write_text("# pinned\ntorch==2.13.0\ntransformers==5.24.0  # newer\npapermill==2.7.0\n")
    monkeypatch.setattr(install, "ROOT", tmp_path)
    install.install(["req.txt"], [], False, ["-q"])
    (args, constraints), = calls
    assert args[-1] == "papermill==2.7.0" and "torch==2.13.0" not in args
    # nothing papermill pulls in may move the held packages
    assert constraints.splitlines() == ["torch==2.11.0+cu130", "transformers==5.17.0", "triton==3.6.0"]
    # offline, a missing torch cannot come from a wheelhouse: said, before pip runs
    monkeypatch.setattr(install, "installed", lambda: {})
    with pytest.raises(InstallError, match="torch==2.13.0 is not installed and a wheelhouse holds none"):
        install.install(["req.txt"], [], False, ["--no-index", "--find-links", "wheelhouse"])


def test_install_error_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(install, "installed", lambda: {"torch": FakeDist("torch", "2.6.0", tmp_path)})
    monkeypatch.setattr(install, "pip", lambda *a: pytest.fail("pip must not run"))
    assert install.main(["torch==2.13.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch 2.6.0" in err[0] and "torch>=2.11" in err[0]


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs a venv")
def test_origin_tells_the_venv_from_the_system():
    assert install.origin(FakeDist("x", "1", Path(sys.prefix) / "lib" / "site-packages")) == "venv"
    assert install.origin(FakeDist("x", "1", "/usr/lib/python3/dist-packages")) == "system"
    assert install.provenance(["pytest"])["pytest"]["from"] in ("venv", "system")


def test_wheelhouse_downloads_all_but_torch_and_the_cuda_libraries(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(install, "pip", lambda *a: calls.append(a))
    here = "%d.%d" % sys.version_info[:2]
    with pytest.raises(InstallError, match="PY=python3.9 PYTHON_VERSION=3.9"):  # pip would resolve this Python's markers
        install.wheelhouse(tmp_path / "wh", "3.9", None)
    install.wheelhouse(tmp_path / "wh", here, "manylinux_2_28_x86_64")
    got = [a for c in calls for a in c]
    pinned = [r for f in install.WHEELHOUSE_FILES for r in install.read_pins(install.ROOT / f)]
    for r in pinned:
        assert (str(r) in got) == (install.canon(r.name) not in ("torch", "torch-npu")), r
    assert not any(a.startswith(("torch==", "torch-npu", "nvidia-cu", "cuda-")) for a in got)
    assert "torchao==0.18.0" in got and "gguf==0.19.0" in got and "llama-models==0.3.0" in got
    sdist = next(c for c in calls if "--no-binary" in c)  # llama.cpp comes as source, built on the target
    assert any(a.startswith("llama-cpp-python==") for a in sdist)
    for c in calls:
        if "--no-binary" not in c:
            assert c[c.index("--python-version") + 1] == here and c[c.index("--platform") + 1] == "manylinux_2_28_x86_64"
            # and the older glibc's wheels that such a machine runs too
            assert "manylinux2014_x86_64" in c and "manylinux_2_17_x86_64" in c and "manylinux_2_29_x86_64" not in c


def test_missing_llamacpp_source_is_one_line_and_the_engine_unsupported(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLMBENCH_WHEELHOUSE", str(tmp_path / "wh"))
    monkeypatch.setenv("LLMBENCH_WHEEL_CACHE", str(tmp_path / "cache"))  # no cached build either
    monkeypatch.setattr(llamacpp_build, "BUILD_INFO", tmp_path / "llamacpp-build.json")
    monkeypatch.setattr(llamacpp_build, "pip", lambda *a: pytest.fail("nothing to fetch offline"))
    assert llamacpp_build.main() == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "not in the wheelhouse" in out[0] and "unsupported" in out[0]
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    with pytest.raises(Unsupported, match="source is not in the wheelhouse"):
        engine.load(LoadRequest("llamacpp", "tiny-1b", "synthetic", "fp32", "none", "cpu", tokens="random"))
