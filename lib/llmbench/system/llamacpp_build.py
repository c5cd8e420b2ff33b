"""Build llama-cpp-python from source once per (version, CMake flags, CPU) and install it.

llama-cpp-python compiles llama.cpp at install. A native build (-march=native) is only valid on the
CPU it was built on, so the wheel is cached outside the repository under a key of the version, the
flags and the CPU's model and flags: a second `make setup`, or a fresh clone's CI on the same
machine, installs the cached wheel in seconds. The backends follow the machine:
  -DGGML_CUDA=ON  where nvcc and nvidia-smi both exist (a compiler alone, with no GPU, is not a target)
  -DGGML_CANN=ON  where CANN's set_env.sh was sourced (ASCEND_TOOLKIT_HOME or ASCEND_HOME_PATH set)
  -mno-amx-int8   where the CPU has AMX: the pinned llama.cpp's AMX matmul (ggml_backend_amx_mul_mat)
                  segfaults on the first Q8_0/Q4_0 prefill on such CPUs (upstream issue llama.cpp#20824,
                  closed without a fix); without it, Q8_0/Q4_0 run llama.cpp's AVX-512 VNNI kernels
LLMBENCH_LLAMACPP_CMAKE_ARGS adds flags. What was built (flags, llama.cpp commit, build seconds) is
written to <venv>/share/llmbench/llamacpp-build.json; engine_llamacpp puts it in its description.

usage: python -m llmbench.system.llamacpp_build     (the Makefile's setup runs it)
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from llmbench.core import paths

REQUIREMENTS = paths.ROOT / "requirements-llamacpp.txt"
BUILD_INFO = Path(sys.prefix) / "share" / "llmbench" / "llamacpp-build.json"


def pins() -> dict[str, str]:
    """{package: version} from requirements-llamacpp.txt (exact pins only)."""
    out = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.strip().lower()] = version.strip()
    return out


def cmake_args(env=os.environ, cpu: str | None = None) -> list[str]:
    # LLAVA_BUILD=OFF: the multimodal library is not used here and is a third of the build.
    args = ["-DGGML_NATIVE=ON", "-DLLAVA_BUILD=OFF"]
    if "amx_int8" in (cpu or cpu_id()).split():
        # an explicit -mno wins over -march=native in either order: ggml's AMX code is not compiled
        args += ["-DCMAKE_C_FLAGS=-mno-amx-int8", "-DCMAKE_CXX_FLAGS=-mno-amx-int8"]
    if shutil.which("nvcc") and shutil.which("nvidia-smi"):
        args.append("-DGGML_CUDA=ON")
    if env.get("ASCEND_TOOLKIT_HOME") or env.get("ASCEND_HOME_PATH"):
        args.append("-DGGML_CANN=ON")
    return args + env.get("LLMBENCH_LLAMACPP_CMAKE_ARGS", "").split()


def cpu_id() -> str:
    """Model name and feature flags: what -march=native compiled for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    pick = [re.search(rf"^(?:{k})\s*:\s*(.*)$", text, re.M) for k in ("model name", "flags|Features")]
    return " | ".join(m.group(1).strip() for m in pick if m)


def cache_dir(version: str, args: list[str]) -> Path:
    root = Path(os.environ.get("LLMBENCH_WHEEL_CACHE") or Path.home() / ".cache" / "llmbench" / "llamacpp")
    key = hashlib.sha256(json.dumps([version, args, cpu_id()]).encode()).hexdigest()[:16]
    return root / f"{version}-{key}"


def llama_cpp_commit(sdist: Path) -> str:
    """The llama.cpp commit the sdist vendors: its CHANGELOG's entry for this version names it."""
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/CHANGELOG.md")
                       and m.name.count("/") == 1), None)
        text = tar.extractfile(member).read().decode() if member else ""
    version = re.search(r"-(\d[\w.]*)\.tar\.gz$", sdist.name).group(1)
    section = text.split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0] if f"## [{version}]" in text else ""
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return m.group(1) if m else "unknown (not named in the sdist's CHANGELOG)"


def source_available(version: str) -> bool:
    """False only when installing from a wheelhouse (LLMBENCH_WHEELHOUSE) that lacks the sdist."""
    wheelhouse = os.environ.get("LLMBENCH_WHEELHOUSE")
    return not wheelhouse or any(Path(wheelhouse).glob(f"llama_cpp_python-{version}.tar.gz"))


def not_built() -> str | None:
    """Why make setup did not build llama.cpp, if it said so."""
    try:
        return json.loads(BUILD_INFO.read_text()).get("unsupported")
    except (OSError, ValueError):
        return None


def pip(*args: str) -> None:
    extra = os.environ.get("PIP_EXTRA", "").split()
    subprocess.run([sys.executable, "-m", "pip", *args, *extra], check=True)


def build(version: str, args: list[str], out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wheelhouse = os.environ.get("LLMBENCH_WHEELHOUSE")
        if wheelhouse:  # taken as it is: pip download would build its metadata, which needs the build tools' sources
            shutil.copy(next(Path(wheelhouse).glob(f"llama_cpp_python-{version}.tar.gz")), tmp)
        else:
            pip("download", "-q", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        # llama-cpp-python forces llama.cpp's `common` library on (for its multimodal library, off here);
        # the bindings never load it and it is half the build. A normal variable set right after
        # llama.cpp's project() shadows that cache entry (CMP0077), so common is neither built nor installed.
        skip_common = Path(tmp) / "no_common.cmake"
        skip_common.write_text("set(LLAMA_BUILD_COMMON OFF)\n")
        t0 = time.perf_counter()
        env = {**os.environ, "CMAKE_ARGS": " ".join([*args, f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={skip_common}"]),
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        # --no-cache-dir: pip's own wheel cache is keyed by the sdist alone, not by the flags or CPU.
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", str(sdist),
                        "-w", str(out), *os.environ.get("PIP_EXTRA", "").split()], check=True, env=env)
        info = {"llama_cpp_python": version, "llama_cpp_commit": llama_cpp_commit(sdist), "cmake_args": args,
                "llama_build_common": False,
                "cpu": cpu_id().split(" | ")[0], "build_s": round(time.perf_counter() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "build.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> int:
    want = pins()
    version = want.pop("llama-cpp-python")
    args = cmake_args()
    out = cache_dir(version, args)
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if wheels and (out / "build.json").exists():
        info = json.loads((out / "build.json").read_text())
        print(f"llama-cpp-python {version}: cached build ({' '.join(args)}) from {out}")
    elif not source_available(version):
        # offline without the source: setup goes on, and the llamacpp engine says why it is unsupported
        why = (f"llama-cpp-python {version}'s source is not in the wheelhouse {os.environ['LLMBENCH_WHEELHOUSE']} "
               f"(make wheelhouse puts it there): llama.cpp is not built, the llamacpp engine is recorded unsupported")
        print(why, flush=True)
        BUILD_INFO.parent.mkdir(parents=True, exist_ok=True)
        BUILD_INFO.write_text(json.dumps({"unsupported": why}, indent=1))
        return 0
    else:
        print(f"llama-cpp-python {version}: building llama.cpp from source with {' '.join(args)} "
              f"({os.cpu_count()} cores; minutes)", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        info = build(version, args, out)
        wheels = sorted(out.glob("llama_cpp_python-*.whl"))
        print(f"llama-cpp-python {version}: built in {info['build_s']} s", flush=True)
    pip("install", "-q", "--no-deps", "--force-reinstall", str(wheels[-1]))
    pip("install", "-q", *(f"{k}=={v}" for k, v in want.items()))  # its runtime dependencies, pinned
    BUILD_INFO.parent.mkdir(parents=True, exist_ok=True)
    BUILD_INFO.write_text(json.dumps({**info, "wheel": str(wheels[-1])}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
